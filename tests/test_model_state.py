"""hypergradient_fn(..., stateful=True): a model state s_t carried through the inner steps (as
BatchNorm's moving statistics are), updated by every step from (w_t, s_t) and read by f.

Checked against TF differentiating the unrolled loop (nested tapes, float64): the final state,
f and the hypergradient, which includes the path λ -> w_t -> s_T -> f.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import tf_bilevel as tfb

T, N, D, GAMMA, MOMENTUM = 4, 6, 3, 0.3, 0.8
RNG = np.random.default_rng(0)
X = tf.constant(RNG.normal(size=(T, N, D)))
X_VAL = tf.constant(RNG.normal(size=(N, D)))
W0 = tf.constant(RNG.normal(size=(D,)))
LAM = tf.constant([0.2, 0.7], tf.float64)
S0 = (tf.constant(0.1, tf.float64), tf.constant(1.5, tf.float64))


def _statistics(w, x):
    h = tf.tanh(tf.linalg.matvec(x, w))
    mean = tf.reduce_mean(h)
    return h, mean, tf.reduce_mean(tf.square(h - mean))


def inner(w, lam, x, state):
    h, mean, variance = _statistics(w, x)
    loss = tf.reduce_mean(tf.square(h - lam[1])) + lam[0] * tf.reduce_sum(tf.square(w))
    moving_mean, moving_variance = state
    return loss, (MOMENTUM * moving_mean + (1 - MOMENTUM) * mean, MOMENTUM * moving_variance + (1 - MOMENTUM) * variance)


def outer(w, lam, x, state):
    h, _, _ = _statistics(w, x)
    moving_mean, moving_variance = state
    return tf.reduce_mean(tf.square((h - moving_mean) / tf.sqrt(moving_variance + 1e-3) - 0.3))


def _unrolled(lam):
    """f(w_T, λ; s_T) with the steps written out, for TF to differentiate."""
    w, state = W0, S0
    for t in range(T):
        with tf.GradientTape() as tape:
            tape.watch(w)
            loss, new_state = inner(w, lam, X[t], state)
        w, state = w - GAMMA * tape.gradient(loss, w), new_state
    return outer(w, lam, X_VAL, state), w, state


def _reference():
    with tf.GradientTape() as tape:
        tape.watch(LAM)
        value, w, state = _unrolled(LAM)
    return value, tape.gradient(value, LAM), w, state


@pytest.mark.parametrize(
    "options",
    [{"jit_compile": True}, {"jit_compile": False}, {"backward": "store"}, {"backward": "recompute"},
     {"estimator": "checkpointed", "segment_length": 3}, {"estimator": "forward", "jit_compile": True},
     {"estimator": "forward", "jit_compile": False}],
    ids=["xla", "graph", "store", "recompute", "checkpointed", "forward-xla", "forward-graph"],
)
def test_stateful_hypergradient_matches_tf_through_the_unrolled_loop(options):
    hg = tfb.hypergradient_fn(inner, outer, steps=T, learning_rate=GAMMA, per_step_batches=True, stateful=True, **options)
    result = hg.detailed(W0, LAM, X, X_VAL, model_state=S0)
    value, grad, w, state = _reference()
    np.testing.assert_allclose(result.outer_value, value, rtol=1e-12)
    np.testing.assert_allclose(result.final_params, w, rtol=1e-12)
    np.testing.assert_allclose(result.final_model_state, state, rtol=1e-12)
    np.testing.assert_allclose(result.hypergrad, grad, rtol=1e-9)
    # The path through s_T matters here: without it the hypergradient differs.
    with tf.GradientTape() as tape:
        tape.watch(LAM)
        _, w_T, s_T = _unrolled(LAM)
        frozen = outer(w_T, LAM, X_VAL, tf.nest.map_structure(tf.stop_gradient, s_T))
    assert not np.allclose(tape.gradient(frozen, LAM), grad, rtol=1e-3)


def test_truncated_stateful_hypergradient_stops_at_the_state_k_steps_back():
    """K-RMD: the last K steps are differentiated, (w, s) at step T−K are constants."""
    K = 2
    hg = tfb.hypergradient_fn(inner, outer, steps=T, truncate=K, learning_rate=GAMMA, per_step_batches=True, stateful=True)
    result = hg.detailed(W0, LAM, X, X_VAL, model_state=S0)
    w, state = W0, S0
    for t in range(T - K):
        with tf.GradientTape() as tape:
            tape.watch(w)
            loss, state = inner(w, LAM, X[t], state)
        w = w - GAMMA * tape.gradient(loss, w)
    with tf.GradientTape() as outer_tape:
        outer_tape.watch(LAM)
        w_k, s_k = w, state
        for t in range(T - K, T):
            with tf.GradientTape() as tape:
                tape.watch(w_k)
                loss, s_k = inner(w_k, LAM, X[t], s_k)
            w_k = w_k - GAMMA * tape.gradient(loss, w_k)
        value = outer(w_k, LAM, X_VAL, s_k)
    np.testing.assert_allclose(result.hypergrad, outer_tape.gradient(value, LAM), rtol=1e-9)


def test_two_continued_calls_carry_the_state_like_one_long_call():
    half = tfb.hypergradient_fn(inner, outer, steps=T // 2, learning_rate=GAMMA, per_step_batches=True, stateful=True)
    first = half.detailed(W0, LAM, X[: T // 2], X_VAL, model_state=S0)
    second = half.detailed(first.final_params, LAM, X[T // 2:], X_VAL, model_state=first.final_model_state)
    _, _, w, state = _reference()
    np.testing.assert_allclose(second.final_params, w, rtol=1e-12)
    np.testing.assert_allclose(second.final_model_state, state, rtol=1e-12)


@pytest.mark.parametrize("forget", [1.0, 0.5])
def test_forward_tangents_of_the_model_state_carry_across_calls(forget):
    """Forward mode, stateful: two calls of T/2 steps continued from final_tangents (which hold
    ds/dλ too) give the hypergradient of the unrolled loop through all T steps with μ = 1; with
    μ < 1 the tangents carried in (w and s alike) are scaled by μ, checked against TF on an
    unrolled loop whose first half's λ-path is scaled by μ (λ' = μλ + (1 − μ) stop(λ))."""
    half = tfb.hypergradient_fn(
        inner, outer, steps=T // 2, learning_rate=GAMMA, per_step_batches=True, stateful=True,
        estimator="forward", forget=forget,
    )
    first = half.detailed(W0, LAM, X[: T // 2], X_VAL, model_state=S0)
    assert len(first.final_tangents.model_state) == 2 and first.final_tangents.model_state[0].shape == [2]
    second = half.detailed(
        first.final_params, LAM, X[T // 2:], X_VAL, opt_state=first.final_opt_state,
        model_state=first.final_model_state, tangents=first.final_tangents,
    )
    with tf.GradientTape() as tape:
        tape.watch(LAM)
        early = forget * LAM + (1 - forget) * tf.stop_gradient(LAM)
        w, state = W0, S0
        for t in range(T):
            with tf.GradientTape() as inner_tape:
                inner_tape.watch(w)
                loss, new_state = inner(w, early if t < T // 2 else LAM, X[t], state)
            w, state = w - GAMMA * inner_tape.gradient(loss, w), new_state
        value = outer(w, LAM, X_VAL, state)
    np.testing.assert_allclose(second.outer_value, value, rtol=1e-12)
    np.testing.assert_allclose(second.final_model_state, state, rtol=1e-12)
    np.testing.assert_allclose(second.hypergrad, tape.gradient(value, LAM), rtol=1e-9)


def test_stateful_arguments_are_checked():
    with pytest.raises(ValueError, match="stateful=True.*'reverse'/'checkpointed'/'forward' only.*'implicit_cg'"):
        tfb.hypergradient_fn(inner, outer, steps=T, learning_rate=GAMMA, estimator="implicit_cg", stateful=True)
    counter = tfb.hypergradient_fn(
        lambda w, lam, x, s: (inner(w, lam, x, S0)[0], s + 1), lambda w, lam, x, s: outer(w, lam, x, S0),
        steps=T, learning_rate=GAMMA, per_step_batches=True, stateful=True, estimator="forward",
    )
    with pytest.raises(ValueError, match="model_state.*dtype int32, not floating point"):
        counter(W0, LAM, X, X_VAL, model_state=tf.constant(0))
    hg = tfb.hypergradient_fn(inner, outer, steps=T, learning_rate=GAMMA, per_step_batches=True, stateful=True)
    with pytest.raises(ValueError, match="pass the initial model state"):
        hg(W0, LAM, X, X_VAL)
    stateless = tfb.hypergradient_fn(
        lambda w, lam, x: inner(w, lam, x, S0)[0], lambda w, lam, x: outer(w, lam, x, S0),
        steps=T, learning_rate=GAMMA, per_step_batches=True,
    )
    with pytest.raises(ValueError, match="stateful=False"):
        stateless(W0, LAM, X, X_VAL, model_state=S0)
    wrong = tfb.hypergradient_fn(
        lambda w, lam, x, s: (inner(w, lam, x, s)[0], s[0]), outer, steps=T, learning_rate=GAMMA,
        per_step_batches=True, stateful=True,
    )
    with pytest.raises(ValueError, match="model state with the structure it was given"):
        wrong(W0, LAM, X, X_VAL, model_state=S0)
