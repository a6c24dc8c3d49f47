"""The Keras trainer with estimator="checkpointed", inner_optimizer="adam" and a learned
initialization (inner_init="learned", the B0 term of Eq. 5) against central finite differences
of a hand-written float64 NumPy Adam loop (tfb.adam's rule: m̂ / (√(v̂ + eps_root) + eps))."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import keras

import tf_bilevel as tfb

D, N, M, T, LR = 3, 12, 10, 10, 0.05  # T = 10: segments of ⌈√10⌉ = 4 steps, the last one ragged
B1, B2, EPS, EPS_ROOT = 0.9, 0.999, 1e-8, 1e-12
RNG = np.random.default_rng(5)
X = RNG.normal(size=(N, D))
Y = np.tanh(X @ RNG.normal(size=D)) + 0.3 * RNG.normal(size=N)
XV = RNG.normal(size=(M, D))
YV = np.tanh(XV @ RNG.normal(size=D))
LOG_L2 = np.array([-1.0, 0.0, 0.5])


def half_squared_error(y_true, y_pred):
    return 0.5 * tf.square(y_true - y_pred[:, 0])


def _trainer(**kwargs):
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((D,), dtype="float64"), keras.layers.Dense(1, use_bias=False, dtype="float64")])
    trainer = tfb.BilevelTrainer(
        model, inner_loss=half_squared_error, outer_loss=half_squared_error, steps=T, inner_optimizer="adam",
        inner_learning_rate=LR, inner_init="learned",
        hyperparameters={"log_l2": tfb.Hyperparameter(LOG_L2, dtype="float64")},
        inner_regularizer=lambda w, hp: 0.5 * tf.reduce_sum(tf.exp(hp["log_l2"]) * tf.square(w[0][:, 0])),
        **kwargs,
    )
    trainer.compile(optimizer=keras.optimizers.SGD(0.0), jit_compile=True)
    return trainer


def _objective(w0, log_l2, steps=T):
    """f(w_T) after `steps` NumPy Adam steps on g from w0 (float64, first-order only)."""
    w, m, v = w0.copy(), np.zeros(D), np.zeros(D)
    for t in range(1, steps + 1):
        grad = X.T @ (X @ w - Y) / N + np.exp(log_l2) * w
        m = B1 * m + (1 - B1) * grad
        v = B2 * v + (1 - B2) * grad**2
        m_hat, v_hat = m / (1 - B1**t), v / (1 - B2**t)
        w = w - LR * m_hat / (np.sqrt(v_hat + EPS_ROOT) + EPS)
    return 0.5 * np.mean((XV @ w - YV) ** 2)


def _finite_differences(w0, log_l2, step=1e-6):
    def central(f, x):
        out = np.zeros_like(x)
        for i in range(x.size):
            e = np.zeros_like(x)
            e[i] = step
            out[i] = (f(x + e) - f(x - e)) / (2 * step)
        return out
    return central(lambda z: _objective(z, log_l2), w0), central(lambda z: _objective(w0, z), log_l2)


def _hypergradients(trainer):
    element = ((X, Y), (XV, YV))
    grads = trainer.hypergradient_of(element)
    by_name = {v.path.split("/")[-1]: g.numpy() for v, g in zip(trainer.hyper_variables, grads, strict=True)}
    (init,) = [v.numpy().reshape(-1) for v in trainer.hyper_variables if "init" in v.path]
    (log_l2,) = [by_name[k] for k in by_name if "log_l2" in k]
    (d_init,) = [by_name[k].reshape(-1) for k in by_name if "init" in k]
    return init, d_init, log_l2


@pytest.mark.parametrize("estimator", ["checkpointed", "reverse"])
def test_checkpointed_adam_with_learned_init_matches_numpy_finite_differences(estimator):
    trainer = _trainer(estimator=estimator)
    init, d_init, d_log_l2 = _hypergradients(trainer)
    fd_init, fd_log_l2 = _finite_differences(init, LOG_L2)
    assert np.all(np.abs(fd_init) > 1e-3) and np.all(np.abs(fd_log_l2) > 1e-4)  # both terms are seen
    np.testing.assert_allclose(d_init, fd_init, rtol=1e-6, atol=1e-9, err_msg="init (B0 term)")
    np.testing.assert_allclose(d_log_l2, fd_log_l2, rtol=1e-6, atol=1e-9, err_msg="log_l2")


def test_truncated_checkpointed_misses_the_finite_differences():
    """Negative control: dropping the first step (truncate = T − 1, which drops B0) is caught."""
    init, d_init, d_log_l2 = _hypergradients(_trainer(estimator="checkpointed", truncate=T - 1))
    fd_init, fd_log_l2 = _finite_differences(init, LOG_L2)
    assert not np.allclose(np.concatenate([d_init, d_log_l2]), np.concatenate([fd_init, fd_log_l2]), rtol=1e-6, atol=1e-9)
