"""Public API that no other test exercised, each against an independent reference: Nesterov
momentum against a NumPy loop and finite differences, the Keras-layer losses against Keras'
own, Hyperparameter bounds/constraint in a fit, HyperStepCheckpoint(max_to_keep=)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_bilevel as tfb
from tf_bilevel.keras import losses

# -- tfb.momentum(nesterov=True) ------------------------------------------------------------
# g(w, λ) = ½ Σ e^λ (w − c)²,  f(w) = ½ ‖w − 1‖²,  in float64.
C = np.array([0.5, -1.0, 2.0])
W0 = np.array([0.3, 0.1, -0.2])
STEPS, GAMMA, BETA = 8, 0.2, 0.7


def _inner(w, lam):
    return 0.5 * tf.reduce_sum(tf.exp(lam) * (w - C) ** 2)


def _outer(w, lam):
    return 0.5 * tf.reduce_sum((w - 1.0) ** 2)


def _nesterov_numpy(lam: np.ndarray) -> np.ndarray:
    """w_T of v ← βv + g, w ← w − γ(g + βv), written out in NumPy."""
    w, v = W0.copy(), np.zeros_like(W0)
    for _ in range(STEPS):
        g = np.exp(lam) * (w - C)
        v = BETA * v + g
        w = w - GAMMA * (g + BETA * v)
    return w


@pytest.mark.parametrize("jit_compile", [False, True], ids=["function", "xla"])
def test_nesterov_momentum_matches_numpy_and_finite_differences(jit_compile):
    lam = np.array([0.2, -0.4, 0.1])
    hg = tfb.hypergradient_fn(_inner, _outer, steps=STEPS, inner_optimizer=tfb.momentum(GAMMA, beta=BETA, nesterov=True),
                              jit_compile=jit_compile)
    w_T = _nesterov_numpy(lam)
    np.testing.assert_allclose(hg.solve(tf.constant(W0), tf.constant(lam)).numpy(), w_T, rtol=1e-12)
    value, hypergrad = hg(tf.constant(W0), tf.constant(lam))
    np.testing.assert_allclose(float(value), 0.5 * np.sum((w_T - 1.0) ** 2), rtol=1e-12)

    def f(l):
        return 0.5 * np.sum((_nesterov_numpy(l) - 1.0) ** 2)

    eps = 1e-6
    fd = np.array([(f(lam + eps * e) - f(lam - eps * e)) / (2 * eps) for e in np.eye(3)])
    np.testing.assert_allclose(hypergrad.numpy(), fd, rtol=1e-6, atol=1e-9)
    # and Nesterov is not heavy-ball: the option changes the result
    plain = tfb.hypergradient_fn(_inner, _outer, steps=STEPS, inner_optimizer=tfb.momentum(GAMMA, beta=BETA),
                                 jit_compile=jit_compile)
    assert np.max(np.abs(plain.solve(tf.constant(W0), tf.constant(lam)).numpy() - w_T)) > 1e-3


# -- tf_bilevel.keras.losses against Keras ------------------------------------------------------
def test_categorical_crossentropy_and_mean_squared_error_match_keras():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)).astype("float32") * 3
    soft = rng.dirichlet(np.ones(4), size=6).astype("float32")
    np.testing.assert_allclose(losses.categorical_crossentropy(soft, logits).numpy(),
                               keras.losses.categorical_crossentropy(soft, logits, from_logits=True).numpy(), rtol=1e-5)
    labels = rng.integers(0, 4, 6)
    np.testing.assert_allclose(losses.sparse_categorical_crossentropy(labels, logits).numpy(),
                               keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True).numpy(),
                               rtol=1e-5)
    y_true, y_pred = rng.normal(size=(2, 5, 3)).astype("float32")
    np.testing.assert_allclose(losses.mean_squared_error(y_true, y_pred).numpy(),
                               keras.losses.mean_squared_error(y_true, y_pred).numpy(), rtol=1e-6)
    # second derivatives exist (the reason these losses exist): d²/dlogits² of the mean CE
    x = tf.constant(logits)
    with tf.GradientTape() as outer_tape:
        outer_tape.watch(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(losses.categorical_crossentropy(soft, x))
        first_column = tf.reduce_sum(tape.gradient(loss, x)[:, 0])
    hessian_rows = outer_tape.gradient(first_column, x).numpy()
    p = tf.nn.softmax(logits).numpy()
    # ∂/∂z Σ_i (p_i0 − y_i0 Σ y): for each row i, ∂p_0/∂z_k = p_0 (δ_0k − p_k) (targets sum to 1)
    expected = p[:, :1] * ((np.arange(4) == 0) - p)
    np.testing.assert_allclose(hessian_rows, expected, rtol=1e-4, atol=1e-6)


# -- Hyperparameter(bounds=..., constraint=...) in a fit -------------------------------------------
def _weighted_problem(hyperparameter):
    rng = np.random.default_rng(1)
    x, x_val = rng.normal(size=(2, 32, 4)).astype("float32")
    teacher = rng.normal(size=(4, 3))
    y, y_val = (x @ teacher).argmax(-1), (x_val @ teacher).argmax(-1)
    ce = losses.sparse_categorical_crossentropy
    keras.utils.set_random_seed(0)
    trainer = tfb.BilevelTrainer(
        keras.Sequential([keras.layers.Dense(3)]), hyperparameters={"scale": hyperparameter},
        inner_loss=lambda y_true, logits, hp: hp["scale"] * ce(y_true, logits),
        outer_loss=ce, steps=4, inner_learning_rate=0.5)
    data = tf.data.Dataset.from_tensors(((x, y), (x_val, y_val))).repeat()
    trainer.build_from_spec(data.element_spec)
    return trainer, data


def test_hyperparameter_with_bounds_starts_at_its_value_and_stays_inside():
    trainer, data = _weighted_problem(tfb.Hyperparameter(0.5, "sigmoid", bounds=(0.25, 3.0)))
    (raw,) = trainer.hyper_variables
    low, high = 0.25, 3.0
    initial = raw.numpy().copy()
    np.testing.assert_allclose(low + (high - low) / (1 + np.exp(-initial)), 0.5, rtol=1e-6)
    trainer.compile(optimizer=keras.optimizers.SGD(50.0))  # large steps: the sigmoid keeps λ inside
    trainer.fit(data, epochs=1, steps_per_epoch=5, verbose=0)
    scale = low + (high - low) / (1 + np.exp(-raw.numpy()))
    assert abs(raw.numpy() - initial) > 0.1 and low < scale < high


def test_hyperparameter_constraint_is_applied_after_every_update():
    trainer, data = _weighted_problem(tfb.Hyperparameter(0.05, constraint=keras.constraints.NonNeg()))
    (raw,) = trainer.hyper_variables
    trainer.compile(optimizer=keras.optimizers.SGD(-100.0))  # ascent: drives the scale below 0
    trainer.fit(data, epochs=1, steps_per_epoch=1, verbose=0)
    unconstrained, data2 = _weighted_problem(tfb.Hyperparameter(0.05))
    unconstrained.compile(optimizer=keras.optimizers.SGD(-100.0))
    unconstrained.fit(data2, epochs=1, steps_per_epoch=1, verbose=0)
    (free,) = unconstrained.hyper_variables
    assert free.numpy() < 0.0  # the update alone leaves the domain ...
    assert raw.numpy() == 0.0  # ... and NonNeg projects it back


# -- HyperStepCheckpoint(max_to_keep=) ------------------------------------------------------------
def test_hyper_step_checkpoint_keeps_the_latest_max_to_keep(tmp_path):
    def inner(w, lam):
        return 0.5 * tf.reduce_sum(tf.exp(lam) * (w - 1.0) ** 2)

    def outer(w, lam):
        return tf.reduce_sum(w**2)

    hg = tfb.hypergradient_fn(inner, outer, steps=3, learning_rate=0.3, jit_compile=False)
    step = tfb.HyperStep(hg, tf.zeros([2], tf.float64), keras.optimizers.SGD(0.1))
    checkpoint = tfb.HyperStepCheckpoint(tmp_path, step, max_to_keep=2)
    w0 = tf.zeros([2], tf.float64)
    saved = []
    for _ in range(4):
        step(w0)
        checkpoint.save()
        saved.append(step.hparams.numpy().copy())
    kept = checkpoint.manager.checkpoints
    assert len(kept) == 2 and kept[-1].endswith("-4") and kept[0].endswith("-3")
    assert len(list(tmp_path.glob("*.index"))) == 2
    step.hparams.assign(tf.zeros([2], tf.float64))
    assert checkpoint.restore() == 4
    np.testing.assert_array_equal(step.hparams.numpy(), saved[-1])
