"""tf_bilevel.keras.BatchNormalization: Keras' BatchNormalization with exact second derivatives.

Keras' TF backend takes the batch variance around stop_gradient(mean) (`tf.nn.moments`):
first derivatives are exact, second derivatives are not, and a hypergradient differentiates
the inner gradient once more. The checks below are float64 central differences; each is
also run on Keras' layer to show that it detects the error the layer exists to fix.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_bilevel as tfb
from tf_bilevel.keras import BatchNormalization, losses

CE = losses.sparse_categorical_crossentropy
F64 = "float64"


def _relative_error(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


# ------------------------------------------------------------------------------------
# (a) Hessian-vector products against central differences of the gradient.
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, axis", [((6, 3), -1), ((4, 3, 2, 2), 1)])
def test_hessian_vector_product_is_exact_for_ours_and_wrong_for_keras(shape, axis):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=shape) + 0.5)
    v = tf.constant(rng.normal(size=shape) + 1.0)  # per-channel sums ≠ 0: the error shows there
    c = tf.constant(rng.normal(size=shape))

    def hvp_error(layer):
        layer.build(shape)
        layer.gamma.assign(rng.uniform(0.5, 1.5, size=layer.gamma.shape))
        layer.beta.assign(rng.normal(size=layer.beta.shape))

        def grad(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(c * tf.sin(layer(x, training=True)))
            return tape.gradient(loss, x)

        with tf.GradientTape() as outer:
            outer.watch(x)
            directional = tf.reduce_sum(grad(x) * v)
        analytic = outer.gradient(directional, x)
        eps = 1e-5
        fd = (grad(x + eps * v) - grad(x - eps * v)) / (2 * eps)
        return _relative_error(analytic, fd)

    assert hvp_error(BatchNormalization(axis=axis, dtype=F64)) < 1e-6
    # The reason for the layer: Keras' second derivative is off by percents.
    assert hvp_error(keras.layers.BatchNormalization(axis=axis, dtype=F64)) > 1e-2


# ------------------------------------------------------------------------------------
# (b) Same forward pass and moving statistics as Keras' layer.
# ------------------------------------------------------------------------------------
def _pair(shape, **kwargs):
    ours, theirs = BatchNormalization(**kwargs), keras.layers.BatchNormalization(**kwargs)
    rng = np.random.default_rng(1)
    ours.build(shape)
    theirs.build(shape)
    values = [rng.uniform(0.5, 1.5, size=w.shape) for w in ours.weights]
    ours.set_weights(values)
    theirs.set_weights(values)
    return ours, theirs


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape, kwargs", [((8, 3), {}), ((4, 3, 3, 2), {"axis": 1, "momentum": 0.9})])
def test_outputs_and_moving_statistics_equal_keras(dtype, shape, kwargs):
    ours, theirs = _pair(shape, dtype=dtype, **kwargs)
    rng = np.random.default_rng(2)
    for step in range(2):
        x = tf.constant(rng.normal(loc=1.0 + step, scale=2.0, size=shape), dtype)
        np.testing.assert_allclose(ours(x, training=True), theirs(x, training=True), rtol=1e-6, atol=1e-6)
        for a, b in zip(ours.non_trainable_weights, theirs.non_trainable_weights):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ours(x, training=False), theirs(x, training=False), rtol=1e-6, atol=1e-6)
    # A masked call falls back to Keras' masked moments.
    x = tf.constant(rng.normal(size=(4, 5, 3)), dtype)
    mask = tf.constant(rng.random((4, 5)) < 0.7)
    ours, theirs = _pair((4, 5, 3), dtype=dtype)
    np.testing.assert_allclose(
        ours(x, training=True, mask=mask), theirs(x, training=True, mask=mask), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_moments_are_computed_in_float32_like_keras(dtype):
    ours, theirs = _pair((16, 3), dtype="float32")
    x = tf.cast(tf.constant(np.random.default_rng(3).normal(loc=3.0, size=(16, 3))), dtype)
    for a, b in zip(ours._moments(x, None), theirs._moments(x, None)):
        assert a.dtype == b.dtype == tf.as_dtype(dtype)
        np.testing.assert_array_equal(tf.cast(a, tf.float32), tf.cast(b, tf.float32))
    ours, theirs = _pair((16, 3), dtype=f"mixed_{dtype}")
    np.testing.assert_array_equal(ours(x, training=True), theirs(x, training=True))


# ------------------------------------------------------------------------------------
# (c) A trainer's hypergradient through an inner model with BatchNorm vs. finite differences.
# ------------------------------------------------------------------------------------
def _trainer_hypergradient_error(bn_class) -> float:
    """Relative error of d_λ f (one SGD(1) step of the trainer) against central differences of
    the outer loss computed from the trainer's own predictions. λ: per-example weights of the
    inner loss and a learned inner learning rate. The inputs have a nonzero batch mean (with
    batch-centered inputs, Keras' second-derivative error cancels in the hypergradient)."""
    keras.utils.set_random_seed(5)
    rng = np.random.default_rng(5)
    x, xv = rng.normal(loc=1.0, size=(2, 8, 3))
    y, yv = rng.integers(0, 2, size=(2, 8))
    data = tf.data.Dataset.from_tensors(((x, y), (xv, yv)))
    inner = keras.Sequential([
        keras.Input((3,), dtype=F64), keras.layers.Dense(4, dtype=F64), bn_class(dtype=F64),
        keras.layers.Activation("tanh", dtype=F64), keras.layers.Dense(2, dtype=F64),
    ])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer = tfb.BilevelTrainer(
            inner, inner_loss=lambda y, logits, hp: hp["weights"] * CE(y, logits), outer_loss=CE, steps=3,
            hyperparameters={"weights": tfb.Hyperparameter(rng.uniform(0.5, 1.5, 8), dtype=F64)},
            inner_learning_rate=tfb.Hyperparameter(0.5, transform="softplus", dtype=F64),
        )
        trainer.compile(optimizer=keras.optimizers.SGD(1.0))
        trainer.build_from_spec(data.element_spec)
    raw = [np.array(v.numpy()) for v in trainer.hyper_variables]  # 0-d arrays, not numpy scalars
    trainer.fit(data, epochs=1, verbose=0)
    analytic = np.concatenate([(r - v.numpy()).ravel() for r, v in zip(raw, trainer.hyper_variables)])

    def outer_loss(values):
        for variable, value in zip(trainer.hyper_variables, values):
            variable.assign(value)
        logits = trainer.predict(data, verbose=0).astype(np.float64)
        logits = logits - logits.max(-1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return -np.mean(log_p[np.arange(len(yv)), yv])

    eps, fd = 1e-6, []
    for j, r in enumerate(raw):
        for i in range(r.size):
            shifted = []
            for sign in (1.0, -1.0):
                values = [v.copy() for v in raw]
                values[j].reshape(-1)[i] += sign * eps
                shifted.append(outer_loss(values))
            fd.append((shifted[0] - shifted[1]) / (2 * eps))
    return _relative_error(analytic, np.array(fd))


def test_trainer_hypergradient_through_batchnorm_matches_finite_differences():
    assert _trainer_hypergradient_error(BatchNormalization) < 1e-6
    # The same check catches the bias of Keras' layer (hence the trainer's warning).
    assert _trainer_hypergradient_error(keras.layers.BatchNormalization) > 1e-3


# ------------------------------------------------------------------------------------
# (d) The trainer warns about Keras' BatchNormalization in the inner model.
# ------------------------------------------------------------------------------------
SPEC = tf.data.Dataset.from_tensors(
    ((tf.zeros([4, 3]), tf.zeros([4], tf.int32)), (tf.zeros([4, 3]), tf.zeros([4], tf.int32)))
).element_spec


def _nested_inner(bn_class):
    """A functional model holding a Sequential that holds two BatchNorms (recursion)."""
    block = keras.Sequential([keras.layers.Dense(4), bn_class(name="bn_a"), bn_class(name="bn_b")], name="block")
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(2)(block(inputs)), name="inner")


def _build_trainer(inner, hyper=None):
    trainer = tfb.BilevelTrainer(
        inner, hyper_model=hyper, inner_loss=CE, outer_loss=CE, steps=1,
        hyperparameters={} if hyper is not None else {"scale": tfb.Hyperparameter(1.0)},
        inner_regularizer=None if hyper is not None else (lambda w, hp: hp["scale"] * tf.reduce_sum(w[0] ** 2)),
    )
    trainer.build_from_spec(SPEC)
    return trainer


def test_trainer_warns_once_for_keras_batchnorm_in_the_inner_model():
    with pytest.warns(UserWarning, match=r"use tf_bilevel\.keras\.BatchNormalization") as record:
        _build_trainer(_nested_inner(keras.layers.BatchNormalization))
    messages = [str(w.message) for w in record if "BatchNormalization" in str(w.message)]
    assert len(messages) == 1, messages
    assert "'bn_a'" in messages[0] and "'bn_b'" in messages[0] and "second derivatives" in messages[0]


def test_trainer_does_not_warn_for_ours_or_for_keras_batchnorm_in_the_hyper_model():
    # The hyper model is applied outside the inner loop and differentiated once: Keras' layer is exact there.
    hyper = keras.Sequential([keras.layers.Dense(3), keras.layers.BatchNormalization()])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _build_trainer(_nested_inner(BatchNormalization))
        _build_trainer(_nested_inner(BatchNormalization), hyper=hyper)
    assert not [w for w in record if "BatchNormalization" in str(w.message)]


def test_legacy_trainer_warns_for_non_fused_tf_keras_batchnorm_only():
    tf_keras = pytest.importorskip("tf_keras")
    from tf_bilevel.keras.legacy import LegacyBilevelTrainer

    def build(inner, shape):
        spec = tf.data.Dataset.from_tensors(
            ((tf.zeros(shape), tf.zeros([4], tf.int32)), (tf.zeros(shape), tf.zeros([4], tf.int32)))
        ).element_spec
        LegacyBilevelTrainer(
            inner, inner_loss=CE, outer_loss=CE, steps=1, hyperparameters={"scale": tfb.Hyperparameter(1.0)},
            inner_regularizer=lambda w, hp: hp["scale"] * tf.reduce_sum(w[0] ** 2),
        ).build_from_spec(spec)

    k = tf_keras
    dense_bn = k.Sequential([k.layers.Dense(4), k.layers.BatchNormalization(name="bn_2d"), k.layers.Dense(2)])
    with pytest.warns(UserWarning, match="non-fused tf_keras BatchNormalization layer.*'bn_2d'"):
        build(dense_bn, [4, 3])
    conv_bn = k.Sequential([  # 4D float32: fused batch norm, whose second derivatives are exact
        k.layers.Conv2D(2, 1), k.layers.BatchNormalization(), k.layers.Flatten(), k.layers.Dense(2)
    ])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        build(conv_bn, [4, 2, 2, 1])
    assert not [w for w in record if "BatchNormalization" in str(w.message)]


# ------------------------------------------------------------------------------------
# (e) Serialization.
# ------------------------------------------------------------------------------------
def test_config_round_trip_and_keras_file(tmp_path):
    layer = BatchNormalization(axis=1, momentum=0.9, epsilon=1e-4, center=False, name="bn", dtype=F64)
    clone = BatchNormalization.from_config(layer.get_config())
    assert type(clone) is BatchNormalization and clone.get_config() == layer.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is BatchNormalization and restored.get_config() == layer.get_config()

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3), BatchNormalization()])
    x = np.random.default_rng(4).normal(size=(5, 3)).astype("float32")
    model(x, training=True)  # non-default moving statistics
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.layers[-1]) is BatchNormalization
    np.testing.assert_array_equal(loaded(x, training=False), model(x, training=False))


@pytest.mark.slow
def test_layer_is_reachable_as_tfb_keras_after_a_plain_import():
    # The README writes `tfb.keras.BatchNormalization`: it must work right after `import tf_bilevel`.
    import subprocess
    import sys

    code = "import tf_bilevel as tfb; print(tfb.keras.BatchNormalization.__module__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "tf_bilevel.keras.layers"
