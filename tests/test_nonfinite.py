"""tf_bilevel.nonfinite: the marker's encoding (-1, t < T, T, T + 1), how markers combine, and
the messages; and that the estimators' markers decode to the right place."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import tf_bilevel as tfb
from tf_bilevel import nonfinite

T = 5
NAN = float("nan")


def test_the_encoding():
    assert nonfinite.NONE == -1
    assert nonfinite.at_outer_loss(T) == T
    assert nonfinite.at_hypergradient(T) == T + 1
    assert tfb.nonfinite is nonfinite  # public, next to tfb.diagnostics


def test_mark_keeps_the_first_failure():
    marker = tf.constant(nonfinite.NONE)
    marker = nonfinite.mark(marker, tf.constant(1.0), 0)
    assert int(marker) == -1  # finite: nothing recorded
    marker = nonfinite.mark(marker, tf.constant(NAN), tf.constant(2))
    assert int(marker) == 2
    marker = nonfinite.mark(marker, tf.constant(np.inf), 3)
    assert int(marker) == 2  # a later failure does not overwrite the first
    marker = nonfinite.mark(marker, tf.constant(NAN), nonfinite.at_outer_loss(T))
    assert int(marker) == 2


def test_mark_of_a_nest_of_tensors():
    finite = {"a": tf.ones([2, 3]), "b": [tf.constant(0.0)]}
    inf_somewhere = {"a": tf.constant([[1.0, np.inf, 1.0], [1.0, 1.0, 1.0]]), "b": [tf.constant(0.0)]}
    code = nonfinite.at_hypergradient(T)
    assert int(nonfinite.mark(tf.constant(-1), finite, code)) == -1
    assert int(nonfinite.mark(tf.constant(-1), inf_somewhere, code)) == T + 1
    assert int(nonfinite.mark(tf.constant(T), inf_somewhere, code)) == T  # outer loss came first


@pytest.mark.parametrize(
    "a, b, expected",
    [(-1, -1, -1), (-1, 4, 4), (4, -1, 4), (2, 4, 2), (4, 2, 2), (0, -1, 0), (T, T + 1, T)],
)
def test_earliest(a, b, expected):
    assert int(nonfinite.earliest(tf.constant(a), tf.constant(b))) == expected


@pytest.mark.parametrize(
    "markers, expected",
    [([-1], -1), ([-1, -1, -1], -1), ([-1, 5, 3], 3), ([0, -1], 0), ([T + 1, T, -1], T), ([7], 7)],
)
def test_earliest_of_a_vector(markers, expected):
    assert int(nonfinite.earliest_of(tf.constant(markers, tf.int32))) == expected


def test_combining_compiles_with_xla():
    @tf.function(jit_compile=True)
    def combine(markers, loss):
        marker = nonfinite.earliest_of(markers)
        return nonfinite.earliest(nonfinite.mark(marker, loss, 1), tf.constant(-1))

    assert int(combine(tf.constant([-1, -1]), tf.constant(NAN))) == 1
    assert int(combine(tf.constant([-1, 0]), tf.constant(NAN))) == 0
    assert int(combine(tf.constant([-1, -1]), tf.constant(1.0))) == -1


def test_describe_each_case():
    assert nonfinite.describe(-1, T) == ""
    for step in (0, T - 1):
        assert nonfinite.describe(step, T) == (
            f"inner_loss became non-finite (NaN/Inf) at inner step {step} of steps={T}: the inner "
            "optimization diverged. Lower the inner learning rate, or check inputs for NaN/Inf."
        )
    assert nonfinite.describe(T, T) == (
        f"outer_loss is non-finite (NaN/Inf) at w_T (after steps={T}); check outer_loss and its data."
    )
    assert nonfinite.describe(T + 1, T) == "the hypergradient is non-finite (NaN/Inf) although the losses are finite."
    assert nonfinite.describe(np.int32(T), T) == nonfinite.describe(T, T)  # a marker read with .numpy()
    assert nonfinite.describe(tf.constant(2), T) == nonfinite.describe(2, T)
    with pytest.raises(ValueError, match=rf"{T + 2} is not a non-finite marker .*steps={T}"):
        nonfinite.describe(T + 2, T)


def test_describe_graph_states_the_encoding():
    assert nonfinite.describe_graph(T) == (
        "tf_bilevel: non-finite value in the bilevel computation; nonfinite_step < steps is the "
        f"inner step where inner_loss became NaN/Inf, {T} means outer_loss, {T + 1} the hypergradient"
    )


# -- round trip through the estimators: each place of failure gives its marker ----------------
def _inner(p, h):
    return tf.reduce_sum((p["w"] - h["c"]) ** 2)


def _hypergradient(outer, learning_rate=0.25, estimator="reverse", check_numerics=False):
    return tfb.hypergradient_fn(
        _inner, outer, steps=T, learning_rate=learning_rate, estimator=estimator,
        jit_compile=False, check_numerics=check_numerics,
    )


def _norm_outer(p, h):
    # Finite value 0 at w = 0, but d‖w‖/dw = w/‖w‖ is 0/0 there: a NaN hypergradient.
    return tf.norm(p["w"])


ESTIMATORS = ["reverse", "checkpointed", "forward"]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_finite_problem_marks_none(estimator):
    result = _hypergradient(lambda p, h: tf.reduce_sum(p["w"] ** 2), estimator=estimator).detailed(
        {"w": tf.constant([1.0])}, {"c": tf.constant([0.5])}
    )
    assert int(result.nonfinite_step) == nonfinite.NONE


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_inner_step_marker(estimator):
    # γ_t = NaN at step 2 makes w_3 NaN, so g(w_3) is the first non-finite inner loss.
    schedule = lambda step: tf.where(tf.equal(step, 2), tf.constant(NAN), tf.constant(0.25))  # noqa: E731
    hg = _hypergradient(lambda p, h: tf.reduce_sum(p["w"] ** 2), learning_rate=schedule, estimator=estimator)
    result = hg.detailed({"w": tf.constant([1.0])}, {"c": tf.constant([0.5])})
    assert int(result.nonfinite_step) == 3
    assert "at inner step 3 of steps=5" in nonfinite.describe(result.nonfinite_step, T)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_outer_loss_marker(estimator):
    hg = _hypergradient(lambda p, h: tf.math.log(tf.reduce_sum(p["w"]) - 100.0), estimator=estimator)
    result = hg.detailed({"w": tf.constant([1.0])}, {"c": tf.constant([0.5])})
    assert int(result.nonfinite_step) == nonfinite.at_outer_loss(T)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_hypergradient_marker_and_error(estimator):
    params, hparams = {"w": tf.constant([0.0])}, {"c": tf.constant([0.0])}  # w_t = 0 for every t
    result = _hypergradient(_norm_outer, estimator=estimator).detailed(params, hparams)
    assert float(result.outer_value) == 0.0 and not np.isfinite(result.hypergrad["c"].numpy()).all()
    assert int(result.nonfinite_step) == nonfinite.at_hypergradient(T)
    with pytest.raises(tfb.NonFiniteError, match=r"^the hypergradient is non-finite \(NaN/Inf\) although the losses are finite\.$"):
        _hypergradient(_norm_outer, estimator=estimator, check_numerics=True)(params, hparams)
