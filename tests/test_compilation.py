"""Every estimator in every execution mode (tf.function, XLA on CPU, hg.compute inside the
user's own tf.function(jit_compile=True)), checked against the closed form of ridge regression
(conftest.Ridge), and no retracing when only tensor values change."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import tf_bilevel as tfb

from conftest import make_ridge  # noqa: E402  (tests/ is on sys.path: pytest's default rootdir import)

STEPS = 200
RIDGE = make_ridge(seed=1)
DIM = RIDGE.X.shape[1]
HEAD = 2  # λ is passed as two leaves, so the hypergradient's structure is checked on a dict


def split_inner(params, hp):
    return RIDGE.inner_loss(params, {"log_l2": tf.concat([hp["head"], hp["tail"]], 0)})


def split_outer(params, hp):
    return RIDGE.outer_loss(params, {"log_l2": tf.concat([hp["head"], hp["tail"]], 0)})


def as_split_hparams(lam, variables: bool):
    make = tf.Variable if variables else tf.constant
    return {"head": make(lam[:HEAD]), "tail": make(lam[HEAD:])}


def joined(hypergrad) -> np.ndarray:
    return np.concatenate([hypergrad["head"].numpy(), hypergrad["tail"].numpy()])


# (estimator kwargs, numpy reference, tolerance)
CONFIGS = {
    "reverse": ({"estimator": "reverse"}, lambda r: r.implicit_hypergradient(), 1e-10),
    "reverse_K5": ({"estimator": "reverse", "truncate": 5}, lambda r: r.neumann_hypergradient(5), 1e-12),
    "checkpointed": ({"estimator": "checkpointed"}, lambda r: r.implicit_hypergradient(), 1e-10),
    "checkpointed_K5": (
        {"estimator": "checkpointed", "truncate": 5, "segment_length": 2},
        lambda r: r.neumann_hypergradient(5),
        1e-12,
    ),
    "forward": ({"estimator": "forward"}, lambda r: r.implicit_hypergradient(), 1e-10),
    "implicit_cg": ({"estimator": "implicit_cg", "iterations": DIM}, lambda r: r.implicit_hypergradient(), 1e-8),
    "neumann": ({"estimator": "neumann", "iterations": STEPS}, lambda r: r.implicit_hypergradient(), 1e-10),
}


def test_ridge_premise():
    assert RIDGE.contraction() ** STEPS < 1e-16  # w_T = w* to machine precision


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_estimator_in_every_mode_matches_closed_form(make_hg, config):
    kwargs, reference, atol = CONFIGS[config]
    hg = make_hg(split_inner, split_outer, steps=STEPS, learning_rate=RIDGE.learning_rate, **kwargs)
    params = {"w": tf.zeros(DIM, tf.float64)}
    hparams = as_split_hparams(RIDGE.lam, variables=True)
    result = hg.detailed(params, hparams)
    assert set(result.hypergrad) == {"head", "tail"}
    tf.nest.assert_same_structure(result.hypergrad, hparams, expand_composites=False)
    assert [g.shape for g in tf.nest.flatten(result.hypergrad)] == [(HEAD,), (DIM - HEAD,)]
    assert all(g.dtype == tf.float64 for g in tf.nest.flatten(result.hypergrad))
    np.testing.assert_allclose(joined(result.hypergrad), reference(RIDGE), rtol=0, atol=atol)
    np.testing.assert_allclose(float(result.outer_value), RIDGE.outer_value(RIDGE.w_star()), rtol=1e-12)
    np.testing.assert_allclose(result.final_params["w"].numpy(), RIDGE.w_star(), rtol=0, atol=1e-12)
    assert int(result.nonfinite_step) == -1


# -- no retracing -----------------------------------------------------------------------
def _datasets(count: int, seed: int):
    """`count` ridge problems of identical shapes and a step size that makes GD converge on all."""
    problems = [make_ridge(seed=seed + i) for i in range(count)]
    gamma = min(p.learning_rate for p in problems)
    return [p._replace(learning_rate=gamma) for p in problems], gamma


def test_same_shapes_new_values_do_not_retrace(make_hg):
    problems, gamma = _datasets(5, seed=20)
    base = problems[0]
    hg = make_hg(base.inner_loss_batch, base.outer_loss_batch, steps=STEPS, learning_rate=gamma)
    rng = np.random.default_rng(0)
    for problem in problems:
        assert problem.contraction() ** STEPS < 1e-15
        params = {"w": tf.constant(rng.normal(size=DIM))}  # new w0 each call (forgotten by w_T)
        hparams = {"log_l2": tf.constant(problem.lam)}
        inner_batch = (tf.constant(problem.X), tf.constant(problem.y))
        outer_batch = (tf.constant(problem.Xv), tf.constant(problem.yv))
        value, hypergrad = hg(params, hparams, inner_batch, outer_batch)
        # the new values are used (nothing was baked into the trace as a constant)
        np.testing.assert_allclose(hypergrad["log_l2"].numpy(), problem.implicit_hypergradient(), rtol=0, atol=1e-10)
        np.testing.assert_allclose(float(value), problem.outer_value(problem.w_star()), rtol=1e-12)
    assert hg.tracing_count() == 1


def test_variable_hparams_updated_between_calls_do_not_retrace(make_hg):
    hg = make_hg(split_inner, split_outer, steps=STEPS, learning_rate=RIDGE.learning_rate, truncate=7)
    hparams = as_split_hparams(RIDGE.lam, variables=True)
    params = {"w": tf.zeros(DIM, tf.float64)}
    for shift in (0.0, 0.2, -0.3):
        lam = RIDGE.lam + shift
        hparams["head"].assign(lam[:HEAD])
        hparams["tail"].assign(lam[HEAD:])
        _, hypergrad = hg(params, hparams)
        assert RIDGE.contraction(lam) ** (STEPS - 7) < 1e-15
        np.testing.assert_allclose(joined(hypergrad), RIDGE.neumann_hypergradient(7, lam), rtol=0, atol=1e-12)
    assert hg.tracing_count() == 1


def test_solve_does_not_retrace_and_matches_closed_form():
    problems, gamma = _datasets(3, seed=40)
    hg = tfb.hypergradient_fn(problems[0].inner_loss_batch, problems[0].outer_loss_batch, steps=STEPS, learning_rate=gamma)
    for problem in problems:
        w_T = hg.solve({"w": tf.zeros(DIM, tf.float64)}, {"log_l2": tf.constant(problem.lam)}, (problem.X, problem.y))
        np.testing.assert_allclose(w_T["w"].numpy(), problem.w_star(), rtol=0, atol=1e-12)
    assert hg._compiled_solve.experimental_get_tracing_count() == 1


def test_compute_inside_a_user_xla_function_with_variables_and_a_hyper_step():
    """The Keras-train_step pattern: hypergradient + hyper-update in one XLA-compiled step."""
    hg = tfb.hypergradient_fn(split_inner, split_outer, steps=STEPS, learning_rate=RIDGE.learning_rate)
    hparams = as_split_hparams(RIDGE.lam, variables=True)
    params = {"w": tf.zeros(DIM, tf.float64)}
    meta_lr = 0.1

    @tf.function(jit_compile=True)
    def hyper_step():
        result = hg.compute(params, hparams)
        for name in ("head", "tail"):
            hparams[name].assign_sub(meta_lr * result.hypergrad[name])
        return result.outer_value

    lam = RIDGE.lam.copy()
    for _ in range(3):
        expected = RIDGE.implicit_hypergradient(lam)
        hyper_step()
        lam = lam - meta_lr * expected
        np.testing.assert_allclose(joined(hparams), lam, rtol=0, atol=1e-10)
    assert hyper_step.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_user_functions_keep_python_control_flow_on_tensors(mode):
    """The engine is traced without AutoGraph; the user's losses and schedule are converted on
    their own, so `if` and `for` on tensors work (eagerly, in a tf.function and under XLA) and
    give the same hypergradient as the same losses written with tf.where and matvec."""
    x = tf.constant([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]], tf.float64)
    y = tf.constant([1.0, -1.0, 2.0], tf.float64)

    def inner_python(w, lam):
        total = tf.constant(0.0, tf.float64)
        for i in tf.range(tf.shape(x)[0]):  # Python `for` over a tensor: needs AutoGraph
            total += (tf.tensordot(x[i], w, 1) - y[i]) ** 2
        if tf.reduce_sum(w) > 100.0:  # Python `if` on a tensor: needs AutoGraph
            total = total * 0.0
        return total + lam * tf.reduce_sum(w**2)

    def inner_ops(w, lam):
        residual = tf.linalg.matvec(x, w) - y
        residual = tf.where(tf.reduce_sum(w) > 100.0, residual * 0.0, residual)
        return tf.reduce_sum(residual**2) + lam * tf.reduce_sum(w**2)

    def schedule_python(step):
        if step < 5:
            return tf.constant(0.05, tf.float64)
        return tf.constant(0.02, tf.float64)

    def schedule_ops(step):
        return tf.where(step < 5, tf.constant(0.05, tf.float64), tf.constant(0.02, tf.float64))

    def outer(w, lam):
        return tf.reduce_sum((w - 1.0) ** 2)

    w0, lam = tf.zeros([2], tf.float64), tf.constant(0.3, tf.float64)
    results = []
    tf.config.run_functions_eagerly(mode == "eager")
    try:
        for inner, schedule in ((inner_python, schedule_python), (inner_ops, schedule_ops)):
            hg = tfb.hypergradient_fn(inner, outer, steps=12, learning_rate=schedule, truncate=4,
                                      jit_compile=mode == "xla")
            results.append([t.numpy() for t in hg(w0, lam)])
    finally:
        tf.config.run_functions_eagerly(False)
    np.testing.assert_allclose(results[0], results[1], rtol=1e-12)
    assert results[0][1] != 0.0
