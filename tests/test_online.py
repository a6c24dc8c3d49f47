"""Online bilevel optimization in the Keras trainer (tune while you train) and the inner model's
randomness: per-step minibatches, weights and inner-optimizer state continued across
hyper-iterations, fresh reproducible Dropout masks per inner step."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import keras

import tf_bilevel as tfb
from tf_bilevel.keras import losses

T, K, BATCH, DIM = 3, 2, 8, 4
RNG = np.random.default_rng(0)
X = RNG.normal(size=(10 * T * BATCH, DIM)).astype("float32")
Y = (X @ RNG.normal(size=(DIM,)) + 0.1 * RNG.normal(size=len(X))).astype("float32")
X_VAL = RNG.normal(size=(16, DIM)).astype("float32")
Y_VAL = (X_VAL @ RNG.normal(size=(DIM,))).astype("float32")
GAMMA, BETA, OUTER_LR = 0.05, 0.9, 0.5


def squared_error(y_true, y_pred):
    return tf.square(y_true - y_pred[:, 0])


def _datasets():
    train = tf.data.Dataset.from_tensor_slices((X, Y)).batch(BATCH, drop_remainder=True)
    val = tf.data.Dataset.from_tensor_slices((X_VAL, Y_VAL)).batch(16)
    return train, val


def _linear_trainer(**kwargs):
    model = keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(1)])
    trainer = tfb.BilevelTrainer(
        model, inner_loss=squared_error, outer_loss=squared_error, steps=T, truncate=K, online=True,
        inner_optimizer="momentum", inner_learning_rate=GAMMA,
        hyperparameters={"decay": tfb.Hyperparameter(0.1, transform="exp")},
        inner_regularizer=lambda w, hp: hp["decay"] * tf.reduce_sum(tf.square(w[0])),
        **kwargs,
    )
    return model, trainer


def _reference_run(kernel, bias, hyper_iterations):
    """The same online run written with the functional core: w and momentum carried by hand."""

    def inner(w, raw, batch):
        x, y = batch
        pred = x @ w[0] + w[1]
        return tf.reduce_mean(tf.square(y - pred[:, 0])) + tf.exp(raw) * tf.reduce_sum(tf.square(w[0]))

    def outer(w, raw, batch):
        x, y = batch
        return tf.reduce_mean(tf.square(y - (x @ w[0] + w[1])[:, 0]))

    hg = tfb.hypergradient_fn(
        inner, outer, steps=T, truncate=K, inner_optimizer=tfb.momentum(GAMMA, BETA), per_step_batches=True
    )
    w, raw, velocity = [tf.constant(kernel), tf.constant(bias)], tf.constant(np.log(0.1), tf.float32), None
    for k in range(hyper_iterations):
        x = X[k * T * BATCH:(k + 1) * T * BATCH].reshape(T, BATCH, DIM)
        y = Y[k * T * BATCH:(k + 1) * T * BATCH].reshape(T, BATCH)
        result = hg.detailed(w, raw, (tf.constant(x), tf.constant(y)), (tf.constant(X_VAL), tf.constant(Y_VAL)), opt_state=velocity)
        w, velocity = result.final_params, result.final_opt_state
        raw = raw - OUTER_LR * result.hypergrad
    return [v.numpy() for v in w], [v.numpy() for v in velocity], float(raw)


@pytest.mark.parametrize("jit_compile", [True, False], ids=["xla", "graph"])
def test_online_fit_matches_the_core_with_state_carried_by_hand(jit_compile):
    model, trainer = _linear_trainer()
    trainer.compile(optimizer=keras.optimizers.SGD(OUTER_LR), jit_compile=jit_compile)
    train, val = _datasets()
    initial = [v.numpy().copy() for v in model.trainable_variables]
    trainer.fit(tfb.keras.online_tasks(train, val, steps=T), epochs=2, steps_per_epoch=3, verbose=0)

    weights, velocity, raw = _reference_run(*initial, hyper_iterations=6)
    for got, expected in zip(model.trainable_variables, weights):  # the user's model holds w
        np.testing.assert_allclose(got.numpy(), expected, rtol=2e-5, atol=2e-6)
    for got, expected in zip(trainer.inner_optimizer_variables, velocity):
        np.testing.assert_allclose(got.numpy(), expected, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(trainer.hyper_variables[0].numpy(), raw, rtol=1e-5, atol=2e-6)
    assert int(trainer.meta_step.numpy()) == 6
    # The trained model is a plain Keras model: it predicts with the trained weights.
    np.testing.assert_allclose(model.predict(X_VAL, verbose=0)[:, 0], X_VAL @ weights[0][:, 0] + weights[1], rtol=1e-4, atol=1e-5)


def test_online_evaluate_scores_the_current_model_without_training_it():
    model, trainer = _linear_trainer()
    trainer.compile(optimizer=keras.optimizers.SGD(OUTER_LR), jit_compile=True)
    train, val = _datasets()
    tasks = tfb.keras.online_tasks(train, val, steps=T)
    trainer.fit(tasks, epochs=1, steps_per_epoch=2, verbose=0)
    before = [v.numpy().copy() for v in model.trainable_variables]
    logs = trainer.evaluate(tasks, steps=1, return_dict=True, verbose=0)
    for a, v in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(a, v.numpy())
    expected = np.mean((Y_VAL - (X_VAL @ before[0][:, 0] + before[1])) ** 2)
    np.testing.assert_allclose(logs["loss"], expected, rtol=1e-5)


def _dropout_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((20,)), keras.layers.Dropout(0.5), keras.layers.Dense(1, use_bias=False)])


def test_dropout_draws_a_fresh_mask_at_every_inner_step_and_hyper_iteration():
    """With one mask for all steps, the weights of dropped inputs would never move."""
    model = _dropout_model()
    trainer = tfb.BilevelTrainer(
        model, inner_loss=lambda y, p, hp: hp["scale"] * squared_error(y, p), outer_loss=squared_error,
        steps=5, truncate=1, online=True, hyperparameters={"scale": tfb.Hyperparameter(1.0, transform="exp")},
        inner_learning_rate=0.01,
    )  # no regularizer: the weight of an input dropped at every step gets exactly zero gradient
    trainer.compile(optimizer=keras.optimizers.SGD(0.0), jit_compile=True)
    x = np.ones((1, 20), "float32")
    train = tf.data.Dataset.from_tensors((x, np.full([1], 5.0, "float32"))).repeat()
    val = tf.data.Dataset.from_tensors((x, np.full([1], 5.0, "float32")))
    before = model.trainable_variables[0].numpy().copy()
    trainer.fit(tfb.keras.online_tasks(train, val, steps=5), epochs=1, steps_per_epoch=6, verbose=0)
    moved = np.abs(model.trainable_variables[0].numpy() - before)[:, 0] > 1e-7
    assert moved.all(), f"{(~moved).sum()} of 20 inputs were dropped at all 30 inner steps"


def _dropout_task():
    rng = np.random.default_rng(3)
    x, x_val = rng.normal(size=(2, 32, 20)).astype("float32")
    y, y_val = rng.normal(size=(2, 32)).astype("float32")
    return tf.data.Dataset.from_tensors(((x, y), (x_val, y_val))).repeat()


def _episodic_dropout_trainer(estimator, seed=7):
    return tfb.BilevelTrainer(
        _dropout_model(), inner_loss=lambda y, p, hp: hp["w"] * squared_error(y, p), outer_loss=squared_error,
        steps=4, estimator=estimator, hyperparameters={"w": tfb.Hyperparameter(np.ones(32), transform="softplus")},
        inner_learning_rate=0.05, seed=seed,
    )


def test_dropout_masks_are_the_same_in_a_steps_forward_pass_and_its_recomputation():
    """Full RMD recomputes each step in its VJP; forward mode differentiates the forward pass
    itself. They agree only if a step's mask is a function of (seed, meta_step, task, step)."""
    results = []
    for estimator in ("reverse", "forward"):
        trainer = _episodic_dropout_trainer(estimator)
        trainer.compile(optimizer=keras.optimizers.SGD(1.0), jit_compile=True)
        trainer.fit(_dropout_task(), epochs=1, steps_per_epoch=2, verbose=0)
        results.append(trainer.hyper_variables[0].numpy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-4, atol=1e-6)
    # The control without XLA (it only has to differ; XLA changes λ by rounding, far below
    # rtol=1e-4, so masks that ignored the seed would still fail it): one XLA compilation less.
    other_seed = _episodic_dropout_trainer("reverse", seed=8)
    other_seed.compile(optimizer=keras.optimizers.SGD(1.0), jit_compile=False)
    other_seed.fit(_dropout_task(), epochs=1, steps_per_epoch=2, verbose=0)
    assert not np.allclose(other_seed.hyper_variables[0].numpy(), results[0], rtol=1e-4)  # the masks are random


def test_online_stream_with_the_wrong_shape_is_an_error_naming_the_helper():
    _, trainer = _linear_trainer()
    trainer.compile(optimizer=keras.optimizers.SGD(0.1))
    fixed = tf.data.Dataset.from_tensors(((X[:BATCH], Y[:BATCH]), (X_VAL, Y_VAL))).repeat()
    with pytest.raises(ValueError, match=r"online=True.*steps=3 minibatches.*online_tasks"):
        trainer.fit(fixed, epochs=1, steps_per_epoch=1, verbose=0)


def test_online_tasks_refuses_minibatches_of_unknown_size():
    ragged = tf.data.Dataset.from_tensor_slices((X, Y)).batch(BATCH)  # last batch may be smaller
    val = tf.data.Dataset.from_tensor_slices((X_VAL, Y_VAL)).batch(4)
    with pytest.raises(ValueError, match="drop_remainder=True"):
        tfb.keras.online_tasks(ragged, val, steps=T)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"meta_batch": True}, "meta_batch"),
        ({"inner_init": "random"}, "inner_init"),
        ({"hyper_model": keras.Sequential([keras.layers.Dense(3)])}, "hyper_model"),
        ({"online": 1}, "online must be True or False"),
    ],
)
def test_online_refuses_arguments_that_do_not_apply(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tfb.BilevelTrainer(
            keras.Sequential([keras.layers.Dense(1)]), inner_loss=squared_error, outer_loss=squared_error, steps=T,
            hyperparameters={"a": tfb.Hyperparameter(1.0)}, **{"online": True, **kwargs},
        )


@pytest.mark.parametrize("estimator", ["implicit_cg", "neumann"])
def test_online_batch_normalization_with_an_estimator_that_cannot_carry_its_state_is_refused_by_name(estimator):
    """Online, BatchNorm's moving statistics are carried through the inner steps (see
    test_online_batchnorm.py), which the reverse estimators and forward mode support
    (tests/test_model_state.py, tests/resume_job.py's online_forward fit)."""
    model = keras.Sequential([keras.Input((DIM,)), tfb.keras.BatchNormalization(name="bn"), keras.layers.Dense(1)])
    trainer = tfb.BilevelTrainer(
        model, inner_loss=squared_error, outer_loss=squared_error, steps=T, online=True, estimator=estimator,
        hyperparameters={"decay": tfb.Hyperparameter(0.1, transform="exp")},
        inner_regularizer=lambda w, hp: hp["decay"] * tf.reduce_sum(tf.square(w[-2])),
    )
    trainer.compile(optimizer=keras.optimizers.SGD(0.1))
    train, val = _datasets()
    with pytest.raises(ValueError, match=r"\['bn'\].*moving statistics.*'reverse', 'checkpointed' or 'forward' only"):
        trainer.fit(tfb.keras.online_tasks(train, val, steps=T), epochs=1, steps_per_epoch=1, verbose=0)


def test_adapted_inner_model_returns_the_weights_fit_trains_per_task():
    """online=False: the inner model is each task's w0; adapted_inner_model gives w_T."""
    ce = losses.sparse_categorical_crossentropy
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, DIM)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(2)])
    trainer = tfb.BilevelTrainer(
        model, inner_loss=ce, outer_loss=ce, steps=20, inner_learning_rate=0.5,
        hyperparameters={"decay": tfb.Hyperparameter(0.01, transform="exp")},
        inner_regularizer=lambda w, hp: hp["decay"] * tf.reduce_sum(tf.square(w[0])),
    )
    trainer.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=True)
    task = tf.data.Dataset.from_tensors(((x, y), (x, y)))
    trainer.fit(task.repeat(), epochs=1, steps_per_epoch=2, verbose=0)
    adapted = trainer.adapted_inner_model((x, y))
    assert adapted is not model
    # trainer.predict gives the outer predictions of w_T: the adapted copy reproduces them.
    np.testing.assert_allclose(adapted.predict(x, verbose=0), trainer.predict(task.map(lambda i, o: (i, o[0])), verbose=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(adapted.predict(x, verbose=0), model.predict(x, verbose=0))  # the stored w0 is not trained
