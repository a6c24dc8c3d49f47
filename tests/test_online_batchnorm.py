"""BatchNormalization (layer state) in the online inner model: with λ frozen (outer learning rate
0) an online trainer trains the user's Conv2D + BatchNorm + Dropout network exactly as
`model.fit` does, step for step: the weights and the moving statistics (updated at every inner
step with the layer's momentum, carried across hyper-iterations in the model's own variables),
and `evaluate` scores the model in inference mode with the moving statistics.

Dropout's masks come from the trainer's stateless per-step seeds, not from the layer's Keras
seed generator, so they cannot equal model.fit's bit for bit: the comparison uses Dropout(rate
0), and a separate test checks that the masks are fresh at every inner step and have Keras'
distribution (zeros with probability `rate`, the kept units scaled by 1/(1 − rate)).
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_bilevel as tfb
from tf_bilevel.keras import losses

CE = losses.sparse_categorical_crossentropy
T, BATCH, HYPER_ITERATIONS, LR, MOMENTUM = 2, 8, 3, 0.1, 0.7
RNG = np.random.default_rng(0)
X = RNG.normal(loc=0.5, size=(T * BATCH * HYPER_ITERATIONS, 6, 6, 2)).astype("float32")
Y = RNG.integers(0, 3, size=len(X)).astype("int32")
X_VAL = RNG.normal(loc=0.5, size=(16, 6, 6, 2)).astype("float32")
Y_VAL = RNG.integers(0, 3, size=16).astype("int32")


def _cnn(bn_class, rate=0.0):
    return keras.Sequential([
        keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3, padding="same"), bn_class(momentum=MOMENTUM),
        keras.layers.Activation("relu"), keras.layers.Dropout(rate), keras.layers.Flatten(), keras.layers.Dense(3),
    ])


def _train():
    return tf.data.Dataset.from_tensor_slices((X, Y)).batch(BATCH, drop_remainder=True)


def _online_trainer(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # keras.layers.BatchNormalization: inexact 2nd derivatives
        trainer = tfb.BilevelTrainer(
            model, inner_loss=lambda y, p, hp: hp["scale"] * CE(y, p), outer_loss=CE, steps=T, online=True,
            hyperparameters={"scale": tfb.Hyperparameter(1.0)}, inner_learning_rate=LR, **kwargs,
        )
    trainer.compile(optimizer=keras.optimizers.SGD(0.0), jit_compile=True)  # λ frozen: only w moves
    return trainer


def _state(model):
    """Trainable weights and BatchNorm's moving statistics (the float non-trainable values)."""
    return [v.numpy() for v in model.trainable_variables] + [
        v.numpy() for v in model.non_trainable_variables if v.dtype == "float32"
    ]


_MODEL_FIT = {}


def _model_fit_reference(bn_class):
    """`model.fit` (XLA) from the seed-1 network of `bn_class`: its initial weights, its state
    after each hyper-iteration's T plain steps, and its inference-mode validation loss at the
    end. It does not depend on the trainer's `truncate`, so both truncations of a layer class
    compare against one run (each run compiled Keras' train step under XLA once more)."""
    if bn_class not in _MODEL_FIT:
        keras.utils.set_random_seed(1)
        model = _cnn(bn_class)
        initial = model.get_weights()
        reference = keras.models.clone_model(model)
        reference.set_weights(initial)
        reference.compile(optimizer=keras.optimizers.SGD(LR),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
        states = []
        for k in range(HYPER_ITERATIONS):  # hyper-iteration k = plain steps kT … kT + T − 1
            reference.fit(_train().skip(k * T).take(T), epochs=1, verbose=0, shuffle=False)
            states.append([np.array(a, copy=True) for a in _state(reference)])
        expected_loss = float(np.mean(CE(Y_VAL, reference(X_VAL, training=False))))
        _MODEL_FIT[bn_class] = initial, states, expected_loss
    return _MODEL_FIT[bn_class]


@pytest.mark.parametrize("bn_class", [tfb.keras.BatchNormalization, keras.layers.BatchNormalization], ids=["tfb", "keras"])
@pytest.mark.parametrize("truncate", [None, 1], ids=["full", "k1"])
def test_online_with_frozen_hyperparameters_trains_like_model_fit_step_for_step(bn_class, truncate):
    initial, reference_states, expected_loss = _model_fit_reference(bn_class)
    keras.utils.set_random_seed(1)
    model = _cnn(bn_class)
    model.set_weights(initial)  # the reference's start (the seed gives the same weights; this makes it certain)
    trainer = _online_trainer(model, truncate=truncate)
    stream = trainer.resumable(tfb.keras.online_tasks(_train(), tf.data.Dataset.from_tensors((X_VAL, Y_VAL)), steps=T))
    moving_before = [v.numpy().copy() for v in model.non_trainable_variables if v.dtype == "float32"]
    for k in range(HYPER_ITERATIONS):  # hyper-iteration k = plain steps kT … kT + T − 1
        trainer.fit(stream, epochs=1, steps_per_epoch=1, verbose=0)
        names = [v.path for v in model.trainable_variables] + [
            v.path for v in model.non_trainable_variables if v.dtype == "float32"
        ]
        for name, got, expected in zip(names, _state(model), reference_states[k], strict=True):
            np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6, err_msg=f"hyper-iteration {k}: {name}")
    moving_after = [v.numpy() for v in model.non_trainable_variables if v.dtype == "float32"]
    assert all(not np.allclose(a, b) for a, b in zip(moving_before, moving_after))  # they did move
    assert int(trainer.meta_step.numpy()) == HYPER_ITERATIONS
    # evaluate: the current model in inference mode (moving statistics), as Keras evaluates it.
    logs = trainer.evaluate(stream.take(1), return_dict=True, verbose=0)
    assert logs["loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_online_batchnorm_hypergradient_matches_finite_differences_through_the_moving_statistics():
    """f is the validation loss in inference mode at (w_T, moving statistics s_T); s_T depends on
    λ through w_t, and the hypergradient (full RMD) includes that path: compare with central
    differences of f over one hyper-iteration, in float64."""
    keras.utils.set_random_seed(2)
    f64 = "float64"
    model = keras.Sequential([
        keras.Input((5,), dtype=f64), keras.layers.Dense(4, dtype=f64), tfb.keras.BatchNormalization(momentum=0.5, dtype=f64),
        keras.layers.Activation("tanh", dtype=f64), keras.layers.Dense(3, dtype=f64),
    ])
    rng = np.random.default_rng(4)
    x, x_val = rng.normal(loc=1.0, size=(T, BATCH, 5)), rng.normal(loc=1.0, size=(BATCH, 5))
    y, y_val = rng.integers(0, 3, size=(T, BATCH)), rng.integers(0, 3, size=BATCH)
    element = ((x, y), (x_val, y_val))
    trainer = tfb.BilevelTrainer(
        model, inner_loss=CE, outer_loss=CE, steps=T, online=True, inner_learning_rate=0.5,
        hyperparameters={"decay": tfb.Hyperparameter(0.1, dtype=f64)},
        inner_regularizer=lambda w, hp: hp["decay"] * tf.reduce_sum(tf.square(w[0])),
    )
    trainer.compile(optimizer=keras.optimizers.SGD(0.0))
    analytic = float(trainer.hypergradient_of(element)[0])
    weights, stored = model.get_weights(), [v.numpy() for v in model.non_trainable_variables]

    def validation_loss(decay):
        clone = keras.models.clone_model(model)
        clone.set_weights(weights)
        reg = lambda: decay * tf.reduce_sum(tf.square(clone.trainable_variables[0]))  # noqa: E731
        for t in range(T):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(CE(y[t], clone(x[t], training=True))) + reg()
            for v, g in zip(clone.trainable_variables, tape.gradient(loss, clone.trainable_variables)):
                v.assign_sub(0.5 * g)
        return float(tf.reduce_mean(CE(y_val, clone(x_val, training=False))))

    eps = 1e-5
    numeric = (validation_loss(0.1 + eps) - validation_loss(0.1 - eps)) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(stored, model.non_trainable_variables))  # nothing written


def _greedy_hypergradient(bn_class, truncate):
    keras.utils.set_random_seed(6)
    f64 = "float64"
    model = keras.Sequential([
        keras.Input((5,), dtype=f64), keras.layers.Dense(4, dtype=f64), bn_class(momentum=0.5, dtype=f64),
        keras.layers.Activation("tanh", dtype=f64), keras.layers.Dense(3, dtype=f64),
    ])
    rng = np.random.default_rng(5)
    x, x_val = rng.normal(loc=1.0, size=(T, BATCH, 5)), rng.normal(loc=1.0, size=(BATCH, 5))
    y, y_val = rng.integers(0, 3, size=(T, BATCH)), rng.integers(0, 3, size=BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer = tfb.BilevelTrainer(
            model, inner_loss=lambda y, p, hp: hp["weights"] * CE(y, p), outer_loss=CE, steps=T, truncate=truncate,
            online=True, inner_learning_rate=0.5, hyperparameters={
                "weights": tfb.Hyperparameter(rng.uniform(0.5, 1.5, BATCH), dtype=f64),
                "decay": tfb.Hyperparameter(0.1, dtype=f64)},
            inner_regularizer=lambda w, hp: hp["decay"] * tf.reduce_sum(tf.square(w[0])),
        )
        trainer.compile(optimizer=keras.optimizers.SGD(0.0))
        grads = trainer.hypergradient_of(((x, y), (x_val, y_val)))
    return np.concatenate([np.ravel(g) for g in grads])


def test_keras_batchnorm_is_exact_for_the_greedy_hypergradient_only():
    """With truncate=1 the hypergradient needs first derivatives of the layer only (∇λ of ∇w g
    at w_{T−1}, and f through w_T and the moving statistics): Keras' layer gives ours. Through
    two or more steps it needs second derivatives, which Keras' batch variance gets wrong."""
    greedy = [_greedy_hypergradient(cls, truncate=1) for cls in (tfb.keras.BatchNormalization, keras.layers.BatchNormalization)]
    np.testing.assert_allclose(greedy[1], greedy[0], rtol=1e-10, atol=1e-13)
    full = [_greedy_hypergradient(cls, truncate=None) for cls in (tfb.keras.BatchNormalization, keras.layers.BatchNormalization)]
    assert np.linalg.norm(full[1] - full[0]) > 1e-6 * np.linalg.norm(full[0])


def test_dropout_masks_in_the_online_inner_loop_are_fresh_and_have_keras_distribution():
    """The masks the inner loss sees at inner step t of hyper-iteration k (its seeds: the
    trainer's per-step stateless seeds, the same in a step's forward pass and recomputation)."""
    from tf_bilevel.keras.problem import CoreBatch

    rate, width = 0.3, 4000
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((width,)), keras.layers.Dropout(rate), keras.layers.Dense(1, use_bias=False)])
    trainer = _online_trainer(model)
    ones = np.ones((1, width), "float32")
    stream = tf.data.Dataset.from_tensors(((np.stack([ones] * T), np.zeros((T, 1), "float32")), (ones, np.zeros(1, "float32"))))
    trainer.build_from_spec(stream.element_spec)
    problem, task = trainer.problem, tfb.keras.data.parse_task(next(iter(stream)))
    stored = [tf.convert_to_tensor(v) for v in model.non_trainable_variables]
    masks = []
    for k in range(2):
        seed = trainer._task_seeds(task, tf.constant(k, tf.int64))[0]
        for t in range(T):
            batch = problem.batch_at_step(problem.inner_batch(task.inner, stored, seed), tf.constant(t))
            state = problem._seeded_state(CoreBatch(batch.data, batch.inner_state, batch.seed))
            out, _ = model.layers[0].stateless_call([], [state[i] for i in problem.seed_positions], ones, training=True)
            masks.append(out.numpy()[0])
    for out in masks:
        kept = out != 0
        np.testing.assert_allclose(out[kept], 1 / (1 - rate), rtol=1e-6)  # the kept units scaled as Keras does
        assert abs((~kept).mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / width)  # dropped with probability rate
    assert all(not np.array_equal(masks[i] != 0, masks[j] != 0) for i in range(len(masks)) for j in range(i))


@pytest.mark.slow  # ~10 CPU s: a CNN at the experiment's batch sizes, big enough for the rewrite
def test_online_krmd_on_a_batchnorm_cnn_runs_without_xla_past_grapplers_addn_rewrite():
    """experiments/online_hpo.py's cnn_bn (batch 128, 256 validation images) with K-RMD online,
    not under XLA: Grappler's memory optimizer rewrites AddNs of the backward loop into
    TemporaryVariables that leak in the loop's exit iteration, and without
    tf_bilevel/_tf_patches.py the second hyper-iteration failed with AlreadyExistsError
    (tests/test_grappler.py has the mechanism on a 5-line loop)."""
    keras.utils.set_random_seed(7)
    layers, bn = keras.layers, tfb.keras.BatchNormalization
    model = keras.Sequential([
        keras.Input((28, 28, 1)), layers.Conv2D(32, 3, use_bias=False), bn(), layers.Activation("relu"), layers.MaxPooling2D(),
        layers.Conv2D(64, 3, use_bias=False), bn(), layers.Activation("relu"), layers.MaxPooling2D(), layers.Flatten(),
        layers.Dense(128, use_bias=False), bn(), layers.Activation("relu"), layers.Dense(10),
    ])
    kernels = [i for i, v in enumerate(model.trainable_weights) if v.path.endswith("kernel")]
    steps, batch, hyper_iterations = 2, 128, 3
    rng = np.random.default_rng(8)
    x = rng.normal(size=(steps * batch * hyper_iterations, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=len(x)).astype("int32")
    val = (rng.normal(size=(256, 28, 28, 1)).astype("float32"), rng.integers(0, 10, size=256).astype("int32"))
    trainer = tfb.BilevelTrainer(
        model, inner_loss=CE, outer_loss=CE, steps=steps, truncate=steps, online=True,
        hyperparameters={"decay": tfb.Hyperparameter(np.full(len(kernels), 5e-4, np.float32), transform="exp")},
        inner_regularizer=lambda w, hp: tf.add_n([hp["decay"][i] * tf.reduce_sum(tf.square(w[k])) for i, k in enumerate(kernels)]),
        inner_learning_rate=0.05, inner_optimizer=lambda rate: tfb.momentum(rate, beta=0.9),
    )
    trainer.compile(optimizer=keras.optimizers.Adam(0.01), jit_compile=False)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True)
    tasks = tfb.keras.online_tasks(train, tf.data.Dataset.from_tensors(val).repeat(), steps=steps)
    history = trainer.fit(tasks, epochs=1, steps_per_epoch=hyper_iterations, verbose=0)
    assert int(trainer.meta_step.numpy()) == hyper_iterations
    assert np.isfinite(history.history["loss"]).all()
    decays = trainer.hyperparameter_values()["decay"]
    assert np.isfinite(decays).all() and not np.allclose(decays, 5e-4)  # the hypergradients were applied
