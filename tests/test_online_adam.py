"""Online trainer with inner_optimizer="adam": the Adam moments and step count continue across
hyper-iterations and fit calls (README). With the outer learning rate 0 (λ frozen) the online
trainer must train exactly like plain Keras training with keras.optimizers.Adam, step for step.

tfb.adam puts eps outside the bias-corrected root (m̂/(√(v̂+eps_root)+eps)); Keras uses
α_t·m/(√v+eps) with α_t = lr·√(1−b2^t)/(1−b1^t), i.e. eps/√(1−b2^t) in place of eps. With
|g| ≫ 1e-4 both are equal to ~1e-7 relative, far below the tolerance; a reset moment or count
(bias correction restarting at t = 1) changes the step by O(1) and fails the comparison."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import keras

import tf_bilevel as tfb

T, BATCH, DIM, LR, HYPER_ITERATIONS = 3, 8, 4, 0.01, 4
RNG = np.random.default_rng(3)
X = RNG.normal(size=(HYPER_ITERATIONS * T * BATCH, DIM)).astype("float32")
Y = (X @ RNG.normal(size=(DIM,)) + 1.0 + 0.1 * RNG.normal(size=len(X))).astype("float32")
X_VAL = RNG.normal(size=(16, DIM)).astype("float32")
Y_VAL = (X_VAL @ RNG.normal(size=(DIM,))).astype("float32")


def squared_error(y_true, y_pred):
    return tf.square(y_true - y_pred[:, 0])


def _train():
    return tf.data.Dataset.from_tensor_slices((X, Y)).batch(BATCH, drop_remainder=True)


def _models():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(1)])
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    reference.compile(optimizer=keras.optimizers.Adam(LR, beta_1=0.9, beta_2=0.999, epsilon=1e-8), loss="mse")
    return model, reference


def _online_trainer(model, truncate, jit_compile=True):
    trainer = tfb.BilevelTrainer(
        model, inner_loss=lambda y, p, hp: hp["scale"] * squared_error(y, p), outer_loss=squared_error,
        steps=T, truncate=truncate, online=True, inner_optimizer="adam", inner_learning_rate=LR,
        hyperparameters={"scale": tfb.Hyperparameter(1.0)},
    )
    trainer.compile(optimizer=keras.optimizers.SGD(0.0), jit_compile=jit_compile)  # λ frozen: only w moves
    return trainer


@pytest.mark.parametrize(
    "truncate, per_fit, jit_compile",
    [(None, 1, True), (1, 1, True), (1, 2, True), (2, 2, False)],
    ids=["full-1perfit-xla", "k1-1perfit-xla", "k1-2perfit-xla", "k2-2perfit-graph"],
)
def test_online_adam_with_frozen_hyperparameters_trains_like_keras_adam_step_for_step(truncate, per_fit, jit_compile):
    model, reference = _models()
    trainer = _online_trainer(model, truncate, jit_compile)
    stream = trainer.resumable(tfb.keras.online_tasks(_train(), tf.data.Dataset.from_tensors((X_VAL, Y_VAL)), steps=T))
    for k in range(0, HYPER_ITERATIONS, per_fit):  # per_fit hyper-iterations per fit: the state survives both
        trainer.fit(stream, epochs=1, steps_per_epoch=per_fit, verbose=0)
        reference.fit(_train().skip(k * T).take(per_fit * T), epochs=1, verbose=0, shuffle=False)
        for got, expected in zip(model.get_weights(), reference.get_weights(), strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=f"after hyper-iteration {k + per_fit - 1}")
    # The moments themselves: Keras' m and v equal tfb's mu and nu after HYPER_ITERATIONS × T steps.
    keras_moments = {v.path: v.numpy() for v in reference.optimizer.variables}
    count = [v for v in trainer.inner_optimizer_variables if v.shape == ()]
    assert [int(c.numpy()) for c in count] == [HYPER_ITERATIONS * T]
    arrays = [v.numpy() for v in trainer.inner_optimizer_variables if v.shape != ()]
    expected = [a for name, a in keras_moments.items() if "momentum" in name] + [
        a for name, a in keras_moments.items() if "velocity" in name
    ]
    assert len(arrays) == len(expected) == 4
    for got, want in zip(arrays, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert int(trainer.meta_step.numpy()) == HYPER_ITERATIONS


def test_restarting_adam_every_hyper_iteration_is_caught_by_the_keras_comparison():
    """Negative control: the same comparison against Keras Adam restarted at each hyper-iteration
    (fresh moments, count 1) must fail, so the test above can tell continued from reset state."""
    model, reference = _models()
    trainer = _online_trainer(model, truncate=1)
    stream = trainer.resumable(tfb.keras.online_tasks(_train(), tf.data.Dataset.from_tensors((X_VAL, Y_VAL)), steps=T))
    for k in range(2):
        trainer.fit(stream, epochs=1, steps_per_epoch=1, verbose=0)
        reference.compile(optimizer=keras.optimizers.Adam(LR, epsilon=1e-8), loss="mse")  # fresh Adam
        reference.fit(_train().skip(k * T).take(T), epochs=1, verbose=0, shuffle=False)
    gap = max(np.max(np.abs(a - b)) for a, b in zip(model.get_weights(), reference.get_weights()))
    assert gap > 100 * (1e-6 + 1e-5 * max(np.max(np.abs(w)) for w in model.get_weights()))
