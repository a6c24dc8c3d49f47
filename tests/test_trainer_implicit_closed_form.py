"""The Keras trainer's implicit estimators (estimator="implicit_cg" / "neumann") against the
closed-form implicit-function-theorem hypergradient of ridge regression (Eq. 11, conftest.Ridge).

The inner model is a bias-free Dense(1); g(w, λ) = mean ½(x·w − y)² + ½ Σ_j e^{λ_j} w_j² and
f(w) = mean ½(x_v·w − y_v)². As per-sample means these are the sum-form Ridge losses with X, y
scaled by 1/√n (and X_v, y_v by 1/√m). With T = 60 gradient steps of γ = 0.5 the inner problem
is solved to float32 precision (contraction ≤ 0.5 per step), so the implicit estimators must
give Eq. 11; negative controls (1 or d − 1 CG iterations, 1 or 10 Neumann terms,
K-RMD with K = 1; relative errors 0.45, 0.03, 0.47, 3e-4, 0.47) miss it."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import keras

import tf_bilevel as tfb
from conftest import Ridge

D, N, M, T, LR = 4, 64, 32, 60, 0.5
RNG = np.random.default_rng(11)
X = RNG.normal(size=(N, D))
Y = X @ RNG.normal(size=D) + 0.5 * RNG.normal(size=N)
XV = RNG.normal(size=(M, D))
YV = XV @ RNG.normal(size=D) + 0.5 * RNG.normal(size=M)
LAMBDA = np.array([-1.0, -0.3, 0.2, 0.6])
RIDGE = Ridge(X / np.sqrt(N), Y / np.sqrt(N), XV / np.sqrt(M), YV / np.sqrt(M), LAMBDA, outer_l2=0.0, learning_rate=LR)
EXACT = RIDGE.implicit_hypergradient()
TOLERANCE = dict(rtol=2e-5, atol=1e-6)  # float32 trainer vs float64 closed form (measured error ~5e-7 relative)


def half_squared_error(y_true, y_pred):
    return 0.5 * tf.square(y_true - y_pred[:, 0])


def _hypergradient(**estimator):
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    trainer = tfb.BilevelTrainer(
        model, inner_loss=half_squared_error, outer_loss=half_squared_error, steps=T, inner_learning_rate=LR,
        hyperparameters={"log_l2": tfb.Hyperparameter(LAMBDA.astype("float32"))},
        inner_regularizer=lambda w, hp: 0.5 * tf.reduce_sum(tf.exp(hp["log_l2"]) * tf.square(w[0][:, 0])),
        **estimator,
    )
    trainer.compile(optimizer=keras.optimizers.SGD(0.0), jit_compile=True)
    element = ((X.astype("float32"), Y.astype("float32")), (XV.astype("float32"), YV.astype("float32")))
    (h,) = trainer.hypergradient_of(element)
    return h.numpy().reshape(-1)


def test_the_closed_form_is_not_trivial():
    assert np.all(np.abs(EXACT) > 1e-3), EXACT


@pytest.mark.parametrize(
    "estimator",
    [dict(estimator="implicit_cg", iterations=D, tolerance=None), dict(estimator="implicit_cg"),
     dict(estimator="neumann", iterations=T, tolerance=None)],
    ids=["cg_d_iterations", "cg_default", "neumann_T_terms"],
)
def test_trainer_implicit_estimator_matches_the_closed_form(estimator):
    np.testing.assert_allclose(_hypergradient(**estimator), EXACT, **TOLERANCE)


@pytest.mark.parametrize(
    "estimator",
    [dict(estimator="implicit_cg", iterations=1, tolerance=None), dict(estimator="implicit_cg", iterations=D - 1, tolerance=None),
     dict(estimator="neumann", iterations=1, tolerance=None), dict(estimator="neumann", iterations=10, tolerance=None),
     dict(truncate=1)],
    ids=["cg_1_iteration", "cg_d_minus_1", "neumann_1_term", "neumann_10_terms", "krmd_k1"],
)
def test_a_cut_short_solver_misses_the_closed_form_tolerance(estimator):
    """Negative controls: the tolerance above separates a right from a wrong estimator."""
    h = _hypergradient(**estimator)
    assert not np.allclose(h, EXACT, **TOLERANCE), (h, EXACT)


def test_neumann_with_one_term_is_the_numpy_partial_sum():
    """The 1-term control is itself right: γ∇_w f term of Eq. 12, computed independently."""
    np.testing.assert_allclose(
        _hypergradient(estimator="neumann", iterations=1, tolerance=None), RIDGE.neumann_hypergradient(1), **TOLERANCE
    )
