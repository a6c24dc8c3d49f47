"""Estimators against each other and against closed forms (float64).

* A small NON-quadratic problem (weighted logistic regression): forward mode (FMD, Eq. 7), full
  reverse mode (RMD, Eq. 6) and checkpointed RMD compute the same exact hypergradient; truncated
  "reverse" and "checkpointed" compute the same K-RMD h_{T−K} (Eq. 8) for any segment length.
* Ridge regression (quadratic inner problem, closed-form w*(λ) and d_λf by the implicit function
  theorem in numpy): implicit CG, Neumann (Eq. 11/12) and full RMD at a converged w_T, and
  Neumann-with-K-terms == K-RMD (Prop. 3.6).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import tf_bilevel as tfb

from conftest import flat_numpy  # noqa: E402  (tests/ is on sys.path: pytest's default rootdir import)

# ---------------------------------------------------------------------------------------
# Weighted logistic regression. params: {"w": (d,), "b": ()}; hparams: per-example weight
# logits (σ(λ_i) weights example i, as in data hypercleaning) and an L2 strength.
# ---------------------------------------------------------------------------------------
RNG = np.random.default_rng(7)
N_TRAIN, N_VAL, DIM = 6, 8, 3
X_TRAIN = RNG.normal(size=(N_TRAIN, DIM))
Y_TRAIN = (RNG.uniform(size=N_TRAIN) < 0.5).astype(np.float64)
X_VAL = RNG.normal(size=(N_VAL, DIM))
Y_VAL = (X_VAL @ np.array([1.0, -1.0, 0.5]) > 0).astype(np.float64)
EXAMPLE_LOGITS = RNG.normal(size=N_TRAIN)
STEPS = 24
GAMMA = 0.7


def _logistic_loss(params, X, y):
    logits = tf.linalg.matvec(X, params["w"]) + params["b"]
    return tf.nn.softplus(logits) - y * logits  # = binary cross-entropy, twice differentiable


def logistic_inner(params, hparams):
    weights = tf.sigmoid(hparams["example_logits"])
    data = tf.reduce_sum(weights * _logistic_loss(params, X_TRAIN, Y_TRAIN)) / N_TRAIN
    return data + 0.5 * tf.exp(hparams["log_l2"]) * tf.reduce_sum(params["w"] ** 2)


def logistic_outer(params, hparams):
    return tf.reduce_mean(_logistic_loss(params, X_VAL, Y_VAL))


def logistic_start():
    params = {"w": tf.constant([0.3, -0.2, 0.1], tf.float64), "b": tf.constant(0.05, tf.float64)}
    hparams = {
        "example_logits": tf.constant(EXAMPLE_LOGITS),
        "log_l2": tf.constant(-1.0, tf.float64),
    }
    return params, hparams


def _hypergradient(estimator, *, optimizer=None, **kwargs):
    hg = tfb.hypergradient_fn(
        logistic_inner,
        logistic_outer,
        steps=STEPS,
        estimator=estimator,
        jit_compile=False,
        **({"learning_rate": GAMMA} if optimizer is None else {"inner_optimizer": optimizer}),
        **kwargs,
    )
    params, hparams = logistic_start()
    value, hypergrad = hg(params, hparams)
    assert set(hypergrad) == set(hparams)
    return float(value), flat_numpy(hypergrad)


@pytest.mark.parametrize(
    "optimizer_name, segment_length",
    # None = the default segment ⌈√T⌉ = 5, which does not divide T = 24; 1 stores every state.
    [("sgd", (None, 1, 7)), ("momentum", (None,))],
    ids=["sgd", "momentum"],
)
def test_forward_equals_reverse_equals_checkpointed(optimizer_name, segment_length):
    optimizer = None if optimizer_name == "sgd" else tfb.momentum(0.3, beta=0.8)
    value_fwd, h_fwd = _hypergradient("forward", optimizer=optimizer)
    value_rev, h_rev = _hypergradient("reverse", optimizer=optimizer)
    assert np.linalg.norm(h_rev) > 1e-3  # a non-trivial hypergradient
    np.testing.assert_allclose(value_rev, value_fwd, rtol=1e-12)
    np.testing.assert_allclose(h_rev, h_fwd, rtol=0, atol=1e-8 * max(1.0, np.abs(h_fwd).max()))
    for every in segment_length:
        value_ckpt, h_ckpt = _hypergradient("checkpointed", optimizer=optimizer, segment_length=every)
        np.testing.assert_allclose(value_ckpt, value_rev, rtol=1e-12)
        np.testing.assert_allclose(h_ckpt, h_rev, rtol=0, atol=1e-10, err_msg=f"segment_length={every}")


@pytest.mark.parametrize(
    "K, segment_length",
    # segments longer than K, not dividing K (5 = 2+2+1, default ⌈√5⌉ = 3 → 3+2, 12 = 5+5+2), one per step
    [(1, (3,)), (5, (None, 2)), (12, (5, 1))],
    ids=["K1", "K5", "K12"],
)
def test_truncated_reverse_equals_truncated_checkpointed(K, segment_length):
    _, h_rev = _hypergradient("reverse", truncate=K)
    if K == 12:  # truncation changes the answer (so the comparison is not vacuous)
        _, h_full = _hypergradient("reverse")
        assert np.linalg.norm(h_rev - h_full) > 1e-6
    for every in segment_length:
        _, h_ckpt = _hypergradient("checkpointed", truncate=K, segment_length=every)
        np.testing.assert_allclose(h_ckpt, h_rev, rtol=0, atol=1e-10, err_msg=f"K={K}, segment_length={every}")


# ---------------------------------------------------------------------------------------
# Ridge regression (conftest.Ridge): closed forms.
# ---------------------------------------------------------------------------------------
RIDGE_STEPS = 250


def _ridge_hypergradient(ridge, estimator, **kwargs):
    hg = tfb.hypergradient_fn(
        ridge.inner_loss, ridge.outer_loss, steps=RIDGE_STEPS, learning_rate=ridge.learning_rate,
        estimator=estimator, jit_compile=False, **kwargs,
    )
    params = {"w": tf.zeros(ridge.X.shape[1], tf.float64)}
    result = hg.detailed(params, {"log_l2": tf.constant(ridge.lam)})
    return result


def test_ridge_inner_loop_converges(ridge):
    """The premise of the implicit estimators: w_T = w*(λ) to machine precision."""
    assert ridge.contraction() ** RIDGE_STEPS < 1e-15
    hg = tfb.hypergradient_fn(ridge.inner_loss, ridge.outer_loss, steps=RIDGE_STEPS, learning_rate=ridge.learning_rate)
    w_T = hg.solve({"w": tf.zeros(ridge.X.shape[1], tf.float64)}, {"log_l2": tf.constant(ridge.lam)})["w"]
    np.testing.assert_allclose(w_T.numpy(), ridge.w_star(), rtol=0, atol=1e-12)


def test_implicit_cg_with_dim_w_iterations_matches_closed_form(ridge):
    exact = ridge.implicit_hypergradient()
    result = _ridge_hypergradient(ridge, "implicit_cg", tolerance=None, iterations=ridge.X.shape[1])
    np.testing.assert_allclose(result.hypergrad["log_l2"].numpy(), exact, rtol=0, atol=1e-8)
    np.testing.assert_allclose(float(result.outer_value), ridge.outer_value(ridge.w_star()), rtol=1e-12)
    # fewer CG iterations than dim(w) is not exact on this problem
    fewer = _ridge_hypergradient(ridge, "implicit_cg", tolerance=None, iterations=ridge.X.shape[1] - 2)
    assert np.linalg.norm(fewer.hypergrad["log_l2"].numpy() - exact) > 1e-6


def test_neumann_is_the_numpy_partial_sum_and_converges(ridge):
    exact = ridge.implicit_hypergradient()
    errors = []
    for K in (1, 4, 16, 64, RIDGE_STEPS):
        h = _ridge_hypergradient(ridge, "neumann", iterations=K, tolerance=None).hypergrad["log_l2"].numpy()
        np.testing.assert_allclose(h, ridge.neumann_hypergradient(K), rtol=0, atol=1e-12, err_msg=f"K={K}")
        errors.append(np.linalg.norm(h - exact))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-10


def test_full_rmd_at_convergence_matches_implicit_closed_form(ridge):
    """With w_T = w* and B0 = 0, Eq. 5 is the Neumann series up to (I − γH)^T ≈ 0."""
    result = _ridge_hypergradient(ridge, "reverse")
    np.testing.assert_allclose(result.hypergrad["log_l2"].numpy(), ridge.implicit_hypergradient(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("K", [1, 3, 10])
def test_neumann_with_K_terms_equals_K_rmd_at_convergence(ridge, K):
    """Prop. 3.6: h_{T−K} = ∇λf + B∞ Σ_{k<K} A∞^k ∇wf when w_{T−K} … w_T = w*."""
    h_rmd = _ridge_hypergradient(ridge, "reverse", truncate=K).hypergrad["log_l2"].numpy()
    h_neumann = _ridge_hypergradient(ridge, "neumann", iterations=K, tolerance=None).hypergrad["log_l2"].numpy()
    np.testing.assert_allclose(h_rmd, h_neumann, rtol=0, atol=1e-12)
    np.testing.assert_allclose(h_rmd, ridge.neumann_hypergradient(K), rtol=0, atol=1e-12)


def test_implicit_cg_stops_at_the_tolerance_with_the_same_accuracy(ridge):
    """CG with a relative-residual tolerance stops before the iteration bound and still solves
    Eq. 11 (reported in solver_iterations); without a tolerance it runs every iteration."""
    dim = ridge.X.shape[1]
    bound = 10 * dim
    stopped = _ridge_hypergradient(ridge, "implicit_cg", iterations=bound, tolerance=1e-10)
    exhaustive = _ridge_hypergradient(ridge, "implicit_cg", iterations=bound, tolerance=None)
    assert 1 <= int(stopped.solver_iterations) <= dim + 1 < bound
    assert int(exhaustive.solver_iterations) == bound
    np.testing.assert_allclose(
        stopped.hypergrad["log_l2"].numpy(), ridge.implicit_hypergradient(), rtol=1e-8
    )


def test_neumann_stops_when_its_terms_are_below_the_tolerance(ridge):
    full = _ridge_hypergradient(ridge, "neumann", iterations=100000, tolerance=1e-12)
    used = int(full.solver_iterations)
    assert 1 < used < 100000
    np.testing.assert_allclose(full.hypergrad["log_l2"].numpy(), ridge.neumann_hypergradient(used), rtol=1e-12, atol=1e-14)


def test_reverse_estimators_report_no_solver_iterations(ridge):
    assert int(_ridge_hypergradient(ridge, "reverse").solver_iterations) == -1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"estimator": "implicit_cg", "truncate": 5}, r"truncate does not apply.*iterations=5"),
        ({"estimator": "reverse", "iterations": 5}, "iterations applies to"),
        ({"estimator": "implicit_cg", "tolerance": 2.0}, "tolerance must be"),
    ],
)
def test_solver_arguments_are_checked(ridge, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tfb.hypergradient_fn(ridge.inner_loss, ridge.outer_loss, steps=RIDGE_STEPS, learning_rate=ridge.learning_rate, **kwargs)
