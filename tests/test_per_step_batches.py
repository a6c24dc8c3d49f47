"""per_step_batches=True: inner step t uses minibatch t, in every pass of every estimator.

Closed form: g_t(w, λ) = ½‖w − λ⊙s_t − b_t‖², f(w) = ½‖w − c‖², gradient descent with step γ:
    w_{t+1} = (1−γ) w_t + γ(λ⊙s_t + b_t),
    K-RMD:  h_{T−K} = (w_T − c) ⊙ γ Σ_{t=T−K}^{T−1} (1−γ)^{T−1−t} s_t   (Eq. 8; K = T is exact),
    implicit at w_T with the last batch: d_λf = (w_T − c) ⊙ s_{T−1}     (Eq. 11, ∇ww g = I).
Momentum is checked against TF differentiating a Python-unrolled loop (independent of the engine).
"""

import numpy as np
import pytest
import tensorflow as tf

import tf_bilevel as tfb

T, N, GAMMA = 12, 3, 0.3
RNG = np.random.default_rng(0)
S = RNG.normal(size=(T, N))
B = RNG.normal(size=(T, N))
C = RNG.normal(size=N)
LAM = RNG.normal(size=N)
W0 = RNG.normal(size=N)


def inner_loss(w, hp, batch):
    s, b = batch["s"], batch["b"]
    return 0.5 * tf.reduce_sum((w - hp * s - b) ** 2)


def outer_loss(w, hp):
    return 0.5 * tf.reduce_sum((w - C) ** 2)


def closed_form(K):
    w = W0.copy()
    for t in range(T):
        w = (1 - GAMMA) * w + GAMMA * (LAM * S[t] + B[t])
    weights = np.array([(1 - GAMMA) ** (T - 1 - t) if t >= T - K else 0.0 for t in range(T)])
    return w, (w - C) * GAMMA * (weights[:, None] * S).sum(0)


def batches():
    return {"s": tf.constant(S), "b": tf.constant(B)}


@pytest.mark.parametrize("jit_compile", [True, False], ids=["xla", "graph"])
@pytest.mark.parametrize(
    "estimator,K", [("reverse", None), ("reverse", 1), ("reverse", 5), ("checkpointed", None), ("checkpointed", 7), ("forward", None)]
)
def test_reverse_and_forward_match_the_closed_form(estimator, K, jit_compile):
    hg = tfb.hypergradient_fn(
        inner_loss, outer_loss, steps=T, learning_rate=GAMMA, truncate=K, estimator=estimator,
        jit_compile=jit_compile, per_step_batches=True,
    )
    result = hg.detailed(tf.constant(W0), tf.constant(LAM), batches())
    w_T, expected = closed_form(K or T)
    np.testing.assert_allclose(result.final_params.numpy(), w_T, rtol=1e-12)
    np.testing.assert_allclose(result.hypergrad.numpy(), expected, rtol=1e-10, atol=1e-13)
    # Not what the last batch alone at every step would give: step t really used element t.
    if (K or T) > 1:
        assert not np.allclose(expected, (w_T - C) * GAMMA * S[-1] * sum((1 - GAMMA) ** k for k in range(K or T)))


def test_compute_runs_eagerly_and_matches():
    hg = tfb.hypergradient_fn(inner_loss, outer_loss, steps=T, learning_rate=GAMMA, truncate=4, per_step_batches=True)
    result = hg.compute(tf.constant(W0), tf.constant(LAM), batches())  # no tf.function: eager while_loops
    np.testing.assert_allclose(result.hypergrad.numpy(), closed_form(4)[1], rtol=1e-10)


@pytest.mark.parametrize("jit_compile", [True, False], ids=["xla", "graph"])
def test_implicit_estimators_use_the_last_batch(jit_compile):
    w_T, _ = closed_form(T)
    exact_at_last = (w_T - C) * S[-1]
    cg = tfb.hypergradient_fn(
        inner_loss, outer_loss, steps=T, learning_rate=GAMMA, truncate=3, estimator="implicit_cg",
        jit_compile=jit_compile, per_step_batches=True,
    )
    np.testing.assert_allclose(cg(tf.constant(W0), tf.constant(LAM), batches())[1].numpy(), exact_at_last, rtol=1e-10)
    neumann = tfb.hypergradient_fn(
        inner_loss, outer_loss, steps=T, learning_rate=GAMMA, truncate=4, estimator="neumann",
        jit_compile=jit_compile, per_step_batches=True,
    )
    series = 1 - (1 - GAMMA) ** 4  # γ Σ_{k<4} (1−γ)^k
    np.testing.assert_allclose(
        neumann(tf.constant(W0), tf.constant(LAM), batches())[1].numpy(), series * exact_at_last, rtol=1e-10
    )


def _unrolled_momentum(K, beta, w0, velocity0, lam):
    """TF differentiating a Python-unrolled loop, truncated by stop_gradient before step T−K."""
    lam = tf.constant(lam)
    with tf.GradientTape() as tape:
        tape.watch(lam)
        w, v = tf.constant(w0), tf.constant(velocity0)
        for t in range(T):
            hp = lam if t >= T - K else tf.stop_gradient(lam)
            if t == T - K:
                w, v = tf.stop_gradient(w), tf.stop_gradient(v)
            g = w - hp * S[t] - B[t]
            v = beta * v + g
            w = w - GAMMA * v
        f = outer_loss(w, lam)
    return w.numpy(), v.numpy(), tape.gradient(f, lam).numpy()


@pytest.mark.parametrize("K", [None, 1, 6])
@pytest.mark.parametrize("estimator", ["reverse", "checkpointed"])
def test_momentum_continued_from_a_given_state_matches_unrolled_autodiff(K, estimator):
    beta = 0.8
    velocity0 = RNG.normal(size=N)
    hg = tfb.hypergradient_fn(
        inner_loss, outer_loss, steps=T, inner_optimizer=tfb.momentum(GAMMA, beta), truncate=K,
        estimator=estimator, per_step_batches=True,
    )
    result = hg.detailed(tf.constant(W0), tf.constant(LAM), batches(), opt_state=tf.constant(velocity0))
    w_T, v_T, expected = _unrolled_momentum(K or T, beta, W0, velocity0, LAM)
    np.testing.assert_allclose(result.final_params.numpy(), w_T, rtol=1e-12)
    np.testing.assert_allclose(result.final_opt_state.numpy(), v_T, rtol=1e-12)
    np.testing.assert_allclose(result.hypergrad.numpy(), expected, rtol=1e-10, atol=1e-13)


def test_forward_mode_with_momentum_state_matches_unrolled_autodiff():
    velocity0 = RNG.normal(size=N)
    hg = tfb.hypergradient_fn(
        inner_loss, outer_loss, steps=T, inner_optimizer=tfb.momentum(GAMMA, 0.5), estimator="forward",
        per_step_batches=True,
    )
    result = hg.detailed(tf.constant(W0), tf.constant(LAM), batches(), opt_state=tf.constant(velocity0))
    _, v_T, expected = _unrolled_momentum(T, 0.5, W0, velocity0, LAM)
    np.testing.assert_allclose(result.hypergrad.numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(result.final_opt_state.numpy(), v_T, rtol=1e-12)


@pytest.mark.parametrize("make_optimizer", [lambda: tfb.momentum(GAMMA, 0.9), lambda: tfb.adam(0.05)], ids=["momentum", "adam"])
def test_two_continued_runs_equal_one_run_of_twice_the_steps(make_optimizer):
    """Online use: feeding w_T and the final optimizer state back continues the same trajectory
    (for Adam, the bias correction keeps counting), and 1-RMD only sees the last step anyway."""
    long_hg = tfb.hypergradient_fn(inner_loss, outer_loss, steps=2 * T, inner_optimizer=make_optimizer(), truncate=1, per_step_batches=True)
    half_hg = tfb.hypergradient_fn(inner_loss, outer_loss, steps=T, inner_optimizer=make_optimizer(), truncate=1, per_step_batches=True)
    both = {"s": tf.constant(np.concatenate([S, S[::-1]])), "b": tf.constant(np.concatenate([B, -B]))}
    first = {"s": both["s"][:T], "b": both["b"][:T]}
    second = {"s": both["s"][T:], "b": both["b"][T:]}
    whole = long_hg.detailed(tf.constant(W0), tf.constant(LAM), both)
    a = half_hg.detailed(tf.constant(W0), tf.constant(LAM), first)
    b = half_hg.detailed(a.final_params, tf.constant(LAM), second, opt_state=a.final_opt_state)
    np.testing.assert_allclose(b.final_params.numpy(), whole.final_params.numpy(), rtol=1e-12)
    np.testing.assert_allclose(b.hypergrad.numpy(), whole.hypergrad.numpy(), rtol=1e-10)
    restarted = half_hg.detailed(a.final_params, tf.constant(LAM), second)  # fresh optimizer state
    assert not np.allclose(restarted.final_params.numpy(), whole.final_params.numpy(), rtol=1e-6)


def test_a_batch_without_the_step_axis_is_an_error_naming_it():
    hg = tfb.hypergradient_fn(inner_loss, outer_loss, steps=T, learning_rate=GAMMA, per_step_batches=True)
    wrong = {"s": tf.constant(S[:5]), "b": tf.constant(B)}
    with pytest.raises(ValueError, match=r"inner_batch\['s'\].*leading axis.*steps=12"):
        hg(tf.constant(W0), tf.constant(LAM), wrong)
    with pytest.raises(ValueError, match="no inner_batch"):
        hg(tf.constant(W0), tf.constant(LAM))


def test_an_opt_state_of_the_wrong_structure_is_an_error():
    hg = tfb.hypergradient_fn(inner_loss, outer_loss, steps=T, inner_optimizer=tfb.momentum(GAMMA), per_step_batches=True)
    with pytest.raises(ValueError, match="opt_state"):
        hg(tf.constant(W0), tf.constant(LAM), batches(), opt_state=(tf.constant(W0), tf.constant(W0)))


def test_a_function_selects_each_steps_batch():
    """per_step_batches=callable: here only `s` is per step, `b` is shared by all steps."""

    def batch_at_step(batch, step):
        return {"s": tf.gather(batch["s"], step), "b": batch["b"]}

    hg = tfb.hypergradient_fn(inner_loss, outer_loss, steps=T, learning_rate=GAMMA, per_step_batches=batch_at_step)
    shared_b = np.broadcast_to(B[0], (T, N))
    _, grads = hg(tf.constant(W0), tf.constant(LAM), {"s": tf.constant(S), "b": tf.constant(B[0])})
    stacked = tfb.hypergradient_fn(inner_loss, outer_loss, steps=T, learning_rate=GAMMA, per_step_batches=True)
    _, expected = stacked(tf.constant(W0), tf.constant(LAM), {"s": tf.constant(S), "b": tf.constant(shared_b)})
    np.testing.assert_allclose(grads.numpy(), expected.numpy(), rtol=1e-12)


def test_per_step_batches_must_be_a_bool_or_function():
    with pytest.raises(TypeError, match="per_step_batches"):
        tfb.hypergradient_fn(inner_loss, outer_loss, steps=T, learning_rate=GAMMA, per_step_batches="yes")


def test_no_retracing_for_new_batches():
    hg = tfb.hypergradient_fn(inner_loss, outer_loss, steps=T, learning_rate=GAMMA, truncate=2, per_step_batches=True)
    for k in range(3):
        hg(tf.constant(W0), tf.constant(LAM), {"s": tf.constant(S + k), "b": tf.constant(B)})
    assert hg.tracing_count == 1
