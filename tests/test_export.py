"""Export of meta-learned layers (tf_bilevel/keras/export.py) as a SavedModel that
tf.saved_model.load and keras.layers.TFSMLayer reload with bit-identical outputs."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import keras

import tf_bilevel as tfb
from tf_bilevel.keras import export_hyper_model
from tf_bilevel.keras.losses import sparse_categorical_crossentropy as CE


def _served_by_the_original(layer, x):
    """The original layer run the way a SavedModel runs it (a graph): bit-identity is compared
    with this. Eager execution may differ in the last bit (grappler fuses e.g. MatMul+BiasAdd+Tanh
    into one oneDNN kernel in graphs only), so eager outputs are compared to 1e-6."""
    graph = tf.function(lambda t: layer(t, training=False))(x).numpy()
    np.testing.assert_allclose(graph, layer(x, training=False).numpy(), rtol=1e-6, atol=1e-6)
    return graph


def _image_task(i, ways=2, shots=1, queries=2, size=8):
    """A tiny few-shot task of random 8×8 images (a stand-in for Omniglot)."""
    prototypes = tf.random.stateless_uniform([ways, size, size, 1], seed=[i, 0])
    noise = lambda n, s: 0.2 * tf.random.stateless_normal([ways, n, size, size, 1], seed=[i, s])  # noqa: E731
    support = tf.reshape(prototypes[:, None] + noise(shots, 1), [-1, size, size, 1])
    query = tf.reshape(prototypes[:, None] + noise(queries, 2), [-1, size, size, 1])
    return (support, tf.repeat(tf.range(ways), shots)), (query, tf.repeat(tf.range(ways), queries))


def _omniglot_like_trainer():
    """The structure of the paper's Omniglot network (Fig. 8) in miniature: conv → max-pool →
    BatchNorm → ReLU, the first block meta-learned (λ), the rest trained per task (w)."""
    keras.utils.set_random_seed(0)
    hyper = keras.Sequential([
        keras.layers.Conv2D(4, 3, padding="same"), keras.layers.MaxPooling2D(),
        keras.layers.BatchNormalization(), keras.layers.ReLU(),
    ])
    inner = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(2)])
    trainer = tfb.BilevelTrainer(inner, hyper_model=hyper, inner_loss=CE, outer_loss=CE, steps=3, truncate=1,
                                 meta_batch=True, inner_learning_rate=0.3)
    trainer.compile(optimizer=keras.optimizers.Adam(0.01))
    return trainer


def test_export_right_after_fit_reloads_with_bit_identical_outputs(tmp_path):
    trainer = _omniglot_like_trainer()
    tasks = tf.data.Dataset.range(4).map(_image_task).batch(2)
    trainer.fit(tasks, epochs=1, verbose=0)
    path = str(tmp_path / "hyper_representation")
    trainer.export(path, verbose=False)

    x = tf.random.stateless_uniform([5, 8, 8, 1], seed=[9, 9])
    expected = _served_by_the_original(trainer.hyper_model, x)
    # The moving statistics learned during meta-training are what inference mode uses.
    assert not np.allclose(expected, trainer.hyper_model(x, training=True).numpy())

    loaded = tf.saved_model.load(path)
    np.testing.assert_array_equal(loaded.serve(x).numpy(), expected)
    serving = loaded.signatures["serving_default"]
    (output,) = serving(x).values()
    np.testing.assert_array_equal(output.numpy(), expected)
    layer = keras.layers.TFSMLayer(path, call_endpoint="serve")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x)), expected)
    # Any batch size: the signature's batch axis is None.
    np.testing.assert_array_equal(loaded.serve(x[:2]).numpy(), expected[:2])


def test_export_of_an_unbuilt_trainer_needs_and_uses_an_input_signature(tmp_path):
    trainer = _omniglot_like_trainer()
    with pytest.raises(ValueError, match="input_signature"):
        trainer.export(str(tmp_path / "a"))
    signature = [tf.TensorSpec([None, 8, 8, 1], tf.float32)]
    trainer.export(str(tmp_path / "b"), input_signature=signature, verbose=False)
    x = tf.ones([3, 8, 8, 1])
    loaded = tf.saved_model.load(str(tmp_path / "b"))  # keep a reference: it owns the variables
    np.testing.assert_array_equal(loaded.serve(x).numpy(), _served_by_the_original(trainer.hyper_model, x))


def test_export_of_a_functional_layer_and_of_a_trainer_without_hyper_model(tmp_path):
    inputs = keras.Input([6])
    model = keras.Model(inputs, keras.layers.Dense(3, activation="tanh")(inputs))
    export_hyper_model(model, str(tmp_path / "functional"))
    x = tf.reshape(tf.range(12, dtype=tf.float32), [2, 6]) / 10.0
    loaded = tf.saved_model.load(str(tmp_path / "functional"))
    np.testing.assert_array_equal(loaded.serve(x).numpy(), _served_by_the_original(model, x))

    plain = tfb.BilevelTrainer(keras.Sequential([keras.layers.Dense(2)]), inner_loss=CE, outer_loss=CE, steps=2,
                               hyperparameters={"a": 1.0})
    with pytest.raises(ValueError, match="no hyper_model"):
        plain.export(str(tmp_path / "none"))


def test_documented_reload_idioms_work_as_written(tmp_path):
    """The lines of tf_bilevel/keras/export.py's docstring, verbatim, each in one expression
    (no other reference to the loaded object exists, so a freed variable would fail the call)."""
    import gc

    inputs = keras.Input([6])
    model = keras.Model(inputs, keras.layers.Dense(3, activation="tanh")(inputs))
    path = str(tmp_path / "served")
    export_hyper_model(model, path)
    x = tf.reshape(tf.range(12, dtype=tf.float32), [2, 6]) / 10.0
    expected = _served_by_the_original(model, x)

    features = tfb.keras.load_hyper_model(path)(x)  # keeps what it loaded
    np.testing.assert_array_equal(features.numpy(), expected)
    # Collect only what this test creates (a full collection over a pytest worker's earlier
    # objects is slow); a cycle holding the loaded object is created after the freeze, so it is
    # still collected.
    gc.freeze()
    try:
        served = tfb.keras.load_hyper_model(path)
        gc.collect()
    finally:
        gc.unfreeze()
    np.testing.assert_array_equal(served(x).numpy(), expected)
    assert len(served.variables) == 2  # kernel and bias

    loaded = tf.saved_model.load(path); features = loaded.serve(x)  # noqa: E702 - the documented line
    np.testing.assert_array_equal(features.numpy(), expected)

    (features,) = tf.saved_model.load(path).signatures["serving_default"](x).values()
    np.testing.assert_array_equal(features.numpy(), expected)

    layer = keras.layers.TFSMLayer(path, call_endpoint="serve")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x)), expected)

    tf.saved_model.save(tf.Module(), str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="no 'serve' endpoint"):
        tfb.keras.load_hyper_model(str(tmp_path / "plain"))
