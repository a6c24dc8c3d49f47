"""Keras conventions of BilevelTrainer (Keras 3): the inner model's own losses (layer
regularizers, add_loss) in g, mixed precision, log names, hyperparameter logs and
histograms, saving, optional dependencies and dir(tf_bilevel).

References: a NumPy implementation of the inner gradient descent with an L2 term (and
central finite differences of it for the hypergradient), the equivalent explicit
formulation (inner_regularizer / an inner_loss term), and the float32 run for mixed
precision. The tf-keras counterparts run in tests/test_trainer_legacy.py's subprocess.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import tensorflow as tf

import keras

import tf_bilevel as tfb
from tf_bilevel.keras import losses

CE = losses.sparse_categorical_crossentropy
N, D, K, T, C = 16, 4, 5, 4, 0.25  # C: exactly representable (Keras casts the L2 factor via float32)
LR = 0.5


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _data(seed=0, dtype="float64"):
    rng = np.random.default_rng(seed)
    x, xv = rng.normal(size=(2, N, D)).astype(dtype)
    y, yv = rng.integers(0, K, N), rng.integers(0, K, N)
    W0 = (0.3 * rng.normal(size=(D, K))).astype(dtype)
    return x, y, xv, yv, W0, np.zeros(K, dtype)


def numpy_inner_gd(W, b, x, y, weights, steps, l2):
    """T steps of GD on mean_i w_i CE_i + l2‖W‖² (softmax regression)."""
    n = len(x)
    for _ in range(steps):
        p = _softmax(x @ W + b)
        p[np.arange(n), y] -= 1.0
        g = weights[:, None] * p / n
        W, b = W - LR * (x.T @ g + 2.0 * l2 * W), b - LR * g.sum(0)
    return W, b


def numpy_ce(W, b, x, y, weights=None):
    p = _softmax(x @ W + b)
    ce = -np.log(p[np.arange(len(y)), y])
    return float(np.mean(ce if weights is None else weights * ce))


class OutputPenalty(keras.layers.Layer):
    """Identity that adds C·mean(z²) with add_loss (an activity penalty)."""

    def call(self, z):
        self.add_loss(C * keras.ops.mean(keras.ops.square(z)))
        return z


def _run_one_step(kind, data, jit_compile, dtype="float64"):
    """One hyper-iteration with SGD(1): returns (w_T kernel, d f / d ν, history)."""
    x, y, xv, yv, W0, b0 = data
    regularizer = keras.regularizers.L2(C) if kind == "kernel_regularizer" else None
    activity = keras.regularizers.L2(C) if kind == "activity_regularizer" else None
    layers = [keras.Input((D,), dtype=dtype),
              keras.layers.Dense(K, dtype=dtype, kernel_regularizer=regularizer, activity_regularizer=activity)]
    if kind == "add_loss":
        layers.append(OutputPenalty(dtype=dtype))
    model = keras.Sequential(layers)
    model.set_weights([W0, b0])

    def inner_loss(y_true, logits, hp):
        value = hp["w"] * CE(y_true, logits)
        if kind == "add_loss_equivalent":  # mean_i (w_i CE_i + C mean_j z_ij²) = mean(w CE) + C mean(z²)
            value = value + C * tf.reduce_mean(tf.square(logits), axis=-1)
        if kind == "activity_equivalent":  # Keras: C·Σ z² / batch size = mean_i C Σ_j z_ij²
            value = value + C * tf.reduce_sum(tf.square(logits), axis=-1)
        return value

    trainer = tfb.BilevelTrainer(
        model, hyperparameters={"w": tfb.Hyperparameter(np.full(N, 0.5), transform="sigmoid", dtype=dtype)},
        inner_loss=inner_loss, outer_loss=CE, steps=T, inner_learning_rate=LR, inner_init="warm_start",
        inner_regularizer=(lambda w, hp: C * tf.reduce_sum(tf.square(w[0]))) if kind == "inner_regularizer" else None)
    trainer.compile(optimizer=keras.optimizers.SGD(1.0), jit_compile=jit_compile)
    dataset = tf.data.Dataset.from_tensors(((x, y), (xv, yv)))
    trainer.build_from_spec(dataset.element_spec)
    before = trainer.hyper_variables[0].numpy().copy()
    history = trainer.fit(dataset, verbose=0).history
    return model.get_weights()[0], before - trainer.hyper_variables[0].numpy(), history


# ------------------------------------------------------------------------------------
# A. The inner model's own losses are part of g (first and second derivatives), not of f.
# ------------------------------------------------------------------------------------
def test_kernel_regularizer_counts_in_g_like_the_equivalent_inner_regularizer_with_xla():
    data = _data()
    x, y, xv, yv, W0, b0 = data
    layer_w, layer_grad, layer_logs = _run_one_step("kernel_regularizer", data, jit_compile=True)
    explicit_w, explicit_grad, explicit_logs = _run_one_step("inner_regularizer", data, jit_compile=False)
    plain_w, plain_grad, _ = _run_one_step("none", data, jit_compile=False)

    np.testing.assert_allclose(layer_w, explicit_w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(layer_grad, explicit_grad, rtol=1e-10, atol=1e-14)
    assert np.abs(layer_w - plain_w).max() > 1e-2 and np.abs(layer_grad - plain_grad).max() > 1e-4

    # w_T against NumPy GD with the L2 term; f (`loss`) is the plain outer cross-entropy at w_T,
    # `inner_loss` = g(w_T) includes the regularizer.
    W, b = numpy_inner_gd(W0, b0, x, y, np.full(N, 0.5), T, l2=C)
    np.testing.assert_allclose(layer_w, W, rtol=1e-10)
    assert layer_logs["loss"][0] == pytest.approx(numpy_ce(W, b, xv, yv), rel=1e-6)
    assert layer_logs["inner_loss"][0] == pytest.approx(
        numpy_ce(W, b, x, y, np.full(N, 0.5)) + C * np.sum(W**2), rel=1e-6)
    assert explicit_logs["inner_loss"][0] == pytest.approx(layer_logs["inner_loss"][0], rel=1e-12)

    # The hypergradient needs the regularizer's second derivatives (2C·I in the Hessian):
    # central finite differences of the NumPy objective along random directions.
    raw = np.zeros(N)  # sigmoid⁻¹(0.5)
    rng = np.random.default_rng(1)
    for _ in range(2):
        v = rng.normal(size=N)
        f = [numpy_ce(*numpy_inner_gd(W0, b0, x, y, _sigmoid(raw + s * 1e-6 * v), T, l2=C), xv, yv) for s in (1, -1)]
        assert float(layer_grad @ v) == pytest.approx((f[0] - f[1]) / 2e-6, rel=1e-6)


def test_add_loss_layer_and_activity_regularizer_count_in_g_like_the_equivalent_inner_loss_terms():
    data = _data(2)
    layer_w, layer_grad, layer_logs = _run_one_step("add_loss", data, jit_compile=False)
    explicit_w, explicit_grad, explicit_logs = _run_one_step("add_loss_equivalent", data, jit_compile=False)
    plain_w, plain_grad, plain_logs = _run_one_step("none", data, jit_compile=False)
    np.testing.assert_allclose(layer_w, explicit_w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(layer_grad, explicit_grad, rtol=1e-10, atol=1e-14)
    assert layer_logs["inner_loss"][0] == pytest.approx(explicit_logs["inner_loss"][0], rel=1e-12)
    assert np.abs(layer_w - plain_w).max() > 1e-3 and np.abs(layer_grad - plain_grad).max() > 1e-5
    activity_w, activity_grad, _ = _run_one_step("activity_regularizer", data, jit_compile=False)
    equivalent_w, equivalent_grad, _ = _run_one_step("activity_equivalent", data, jit_compile=False)
    np.testing.assert_allclose(activity_w, equivalent_w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(activity_grad, equivalent_grad, rtol=1e-10, atol=1e-14)
    assert np.abs(activity_w - plain_w).max() > 1e-3


# ------------------------------------------------------------------------------------
# B. Mixed precision: the inner model in its compute dtype, λ and d f / d λ in float32.
# ------------------------------------------------------------------------------------
@pytest.fixture
def restore_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def _mixed_run(policy, data, weights):
    keras.mixed_precision.set_global_policy(policy)
    x, y, xv, yv = data
    model = keras.Sequential([
        keras.Input((D,)), keras.layers.Dense(16, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.01)),
        keras.layers.Dense(K)])
    model.set_weights(weights)
    trainer = tfb.BilevelTrainer(
        model, hyperparameters={"w": tfb.Hyperparameter(np.full(N, 0.5), transform="sigmoid"),
                                "l2": tfb.Hyperparameter(0.05, transform="softplus")},
        inner_loss=lambda y_true, logits, hp: hp["w"] * CE(y_true, logits), outer_loss=CE, steps=T,
        inner_regularizer=lambda w, hp: hp["l2"] * tf.reduce_sum(tf.square(w[2])), inner_learning_rate=LR)
    trainer.compile(optimizer=keras.optimizers.SGD(1.0), jit_compile=True)
    dataset = tf.data.Dataset.from_tensors(((x, y), (xv, yv)))
    trainer.build_from_spec(dataset.element_spec)
    before = [v.numpy().copy() for v in trainer.hyper_variables]
    history = trainer.fit(dataset, verbose=0).history
    grad = np.concatenate([(b - v.numpy()).ravel() for b, v in zip(before, trainer.hyper_variables)])
    return trainer, grad, history


@pytest.fixture(scope="module")
def mixed_problem():
    """Data, initial weights and the float32 run's (hypergradient, logs)."""
    x, y, xv, yv, _, _ = _data(3, dtype="float32")
    keras.utils.set_random_seed(3)
    weights = keras.Sequential([keras.Input((D,)), keras.layers.Dense(16), keras.layers.Dense(K)]).get_weights()
    _, reference, reference_logs = _mixed_run("float32", (x, y, xv, yv), weights)
    return (x, y, xv, yv), weights, reference, reference_logs


# The README's claim: the hypergradient within 0.2% / 1% of float32's (measured 7e-4, 4.5e-3).
@pytest.mark.parametrize("policy, compute_dtype, grad_tolerance, tolerance", [
    ("mixed_float16", "float16", 2e-3, 1e-2), ("mixed_bfloat16", "bfloat16", 1e-2, 2e-2)])
def test_mixed_precision_hypergradient_matches_float32_with_xla(
        mixed_problem, restore_policy, policy, compute_dtype, grad_tolerance, tolerance):
    data, weights, reference, reference_logs = mixed_problem
    trainer, grad, logs = _mixed_run(policy, data, weights)

    assert trainer.inner_model.layers[0].compute_dtype == compute_dtype
    assert trainer.inner_model(data[0]).dtype == compute_dtype  # the inner model computes in float16/bfloat16
    assert all(v.dtype == "float32" for v in trainer.hyper_variables)
    assert "LossScale" not in type(trainer.optimizer).__name__  # the hypergradient is not loss-scaled
    assert np.linalg.norm(grad - reference) <= grad_tolerance * np.linalg.norm(reference)
    assert logs["loss"][0] == pytest.approx(reference_logs["loss"][0], rel=tolerance)
    assert logs["inner_loss"][0] == pytest.approx(reference_logs["inner_loss"][0], rel=tolerance)


def test_loss_scale_optimizer_is_refused_as_outer_optimizer():
    trainer = tfb.BilevelTrainer(keras.Sequential([keras.layers.Dense(2)]), hyperparameters={"a": 1.0},
                                 inner_loss=CE, outer_loss=CE, steps=2)
    with pytest.raises(ValueError, match="LossScaleOptimizer cannot be the outer optimizer.*Adam"):
        trainer.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)))


# ------------------------------------------------------------------------------------
# C. Log names, hyperparameters in the logs and as TensorBoard histograms.
# ------------------------------------------------------------------------------------
def _events(directory):
    values = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                values.setdefault(v.tag, []).append((event.step, v))
    return values


def test_logs_say_outer_and_inner_loss_and_hold_scalar_hyperparameters_with_tensorboard(tmp_path):
    x, y, xv, yv, _, _ = _data(4, dtype="float32")
    trainer = tfb.BilevelTrainer(
        keras.Sequential([keras.layers.Dense(K)]),
        hyperparameters={"example_weights": tfb.Hyperparameter(np.full(N, 0.5), transform="sigmoid"),
                         "l2": tfb.Hyperparameter(0.1, transform="softplus")},
        inner_loss=lambda y_true, logits, hp: hp["example_weights"] * CE(y_true, logits), outer_loss=CE,
        inner_regularizer=lambda w, hp: hp["l2"] * tf.reduce_sum(tf.square(w[0])), steps=T,
        inner_learning_rate=tfb.Hyperparameter(0.3, transform="softplus"), proximal_strength=0.1)
    trainer.compile(optimizer=keras.optimizers.Adam(0.05), jit_compile=True)
    data = tf.data.Dataset.from_tensors(((x, y), (xv, yv)))
    per_epoch = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: per_epoch.append(
            {k: trainer.hyperparameter_values()[k].numpy() for k in ("l2", "inner_learning_rate")}))
    log_dir = tmp_path / "tb"
    history = trainer.fit(
        data.repeat(), epochs=3, steps_per_epoch=2, validation_data=data, verbose=0,
        callbacks=[record, keras.callbacks.TensorBoard(str(log_dir)), tfb.keras.HyperparameterHistograms(str(log_dir)),
                   tfb.keras.HyperparameterHistograms(str(tmp_path / "every_2"), freq=2, names=["example_weights"]),
                   keras.callbacks.EarlyStopping("val_loss", patience=5)])
    h = history.history

    expected = {"loss", "outer_loss", "inner_loss", "hypergradient_norm", "val_loss", "val_outer_loss",
                "val_inner_loss", "hp/l2", "hp/inner_learning_rate"}
    assert set(h) == expected  # vectors (example weights, the 2 proximal strengths) are histograms
    assert h["outer_loss"] == h["loss"] and h["val_outer_loss"] == h["val_loss"]
    for name in ("l2", "inner_learning_rate"):  # the values after each epoch's last update
        np.testing.assert_allclose(h[f"hp/{name}"], [e[name] for e in per_epoch], rtol=1e-6)

    result = trainer.evaluate(data, verbose=0, return_dict=True)
    assert set(result) == {"loss", "outer_loss", "inner_loss"}

    train_events = _events(log_dir / "train")
    assert {"epoch_hp/l2", "epoch_hp/inner_learning_rate", "epoch_outer_loss", "epoch_inner_loss"} <= set(train_events)
    histograms = train_events["hp/example_weights"]
    assert [step for step, _ in histograms] == [0, 1, 2]
    assert histograms[0][1].metadata.plugin_data.plugin_name == "histograms"
    buckets = tf.make_ndarray(histograms[-1][1].tensor)  # [bins, (left, right, count)]
    final = trainer.hyperparameter_values()["example_weights"].numpy()
    assert buckets[:, 2].sum() == pytest.approx(N)
    assert buckets[0, 0] <= final.min() and final.max() <= buckets[-1, 1]
    assert "hp/strengths" in train_events  # the two proximal strengths: a vector
    assert "hp/l2" not in train_events  # scalars are curves, not histograms
    # freq=2, names=["example_weights"]: that histogram only, after epochs 2, 4, ... (step 1 here)
    every_2 = _events(tmp_path / "every_2" / "train")
    assert set(every_2) == {"hp/example_weights"} and [step for step, _ in every_2["hp/example_weights"]] == [1]
    np.testing.assert_array_equal(tf.make_ndarray(every_2["hp/example_weights"][0][1].tensor),
                                  tf.make_ndarray(histograms[1][1].tensor))


def test_histogram_callback_rejects_unknown_names_and_bad_freq(tmp_path):
    with pytest.raises(ValueError, match="freq"):
        tfb.keras.HyperparameterHistograms(str(tmp_path), freq=0)
    trainer = tfb.BilevelTrainer(keras.Sequential([keras.layers.Dense(2)]), hyperparameters={"a": 1.0},
                                 inner_loss=lambda y_, p, hp: hp["a"] * CE(y_, p), outer_loss=CE, steps=2)
    trainer.compile(optimizer="sgd")
    data = tf.data.Dataset.from_tensors(((tf.zeros([4, 3]), tf.zeros([4], tf.int32)),) * 2)
    with pytest.raises(ValueError, match=r"unknown hyperparameters \['b'\].*\['a'\]"):
        trainer.fit(data, verbose=0, callbacks=[tfb.keras.HyperparameterHistograms(str(tmp_path), names=["b"])])


# ------------------------------------------------------------------------------------
# Saving: a clear error pointing to what works, and save_weights round-trips.
# ------------------------------------------------------------------------------------
def test_save_and_get_config_point_to_save_weights_backup_and_export(tmp_path):
    x, y, xv, yv, _, _ = _data(5, dtype="float32")
    data = tf.data.Dataset.from_tensors(((x, y), (xv, yv)))

    def make():
        trainer = tfb.BilevelTrainer(
            keras.Sequential([keras.layers.Dense(K)]), hyperparameters={"w": np.full(N, 0.5)},
            inner_loss=lambda y_true, logits, hp: hp["w"] * CE(y_true, logits), outer_loss=CE, steps=2)
        trainer.compile(optimizer=keras.optimizers.Adam(0.1))
        return trainer

    trainer = make()
    trainer.fit(data.repeat(3), verbose=0)
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "m.keras"))  # saves the whole model
    for call in (lambda: trainer.save(str(tmp_path / "x.keras")), trainer.get_config,
                 lambda: trainer.fit(data, verbose=0, callbacks=[checkpoint])):
        with pytest.raises(NotImplementedError, match=r"save_weights.*BackupAndRestore.*export"):
            call()
    trainer.save_weights(str(tmp_path / "t.weights.h5"))
    fresh = make()
    fresh.build_from_spec(data.element_spec)
    fresh.load_weights(str(tmp_path / "t.weights.h5"))
    for a, b in zip(trainer.hyper_variables + [trainer.meta_step], fresh.hyper_variables + [fresh.meta_step]):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# ------------------------------------------------------------------------------------
# Optional dependencies name their extra; dir() lists the lazily resolved names.
# ------------------------------------------------------------------------------------
def test_missing_tensorboard_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    with pytest.raises(ImportError, match=r'pip install "tf_bilevel\[tensorboard\]"'):
        tfb.keras.HyperparameterHistograms(str(tmp_path))


def test_missing_tf_keras_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tf_keras", None)
    monkeypatch.delitem(sys.modules, "tf_bilevel.keras.legacy", raising=False)
    with pytest.raises(ImportError, match=r'pip install "tf_bilevel\[legacy\]"'):
        importlib.import_module("tf_bilevel.keras.legacy")
    with pytest.raises(ImportError, match=r"tf_bilevel\[legacy\]"):
        tfb.LegacyBilevelTrainer  # noqa: B018


def test_dir_lists_the_lazily_resolved_names():
    names = dir(tfb)
    assert {"BilevelTrainer", "Hyperparameter", "LegacyBilevelTrainer", "keras", "hypergradient_fn"} <= set(names)
    assert {"LegacyBilevelTrainer", "HyperparameterHistograms", "BilevelTrainer"} <= set(dir(tfb.keras))
    for name in ("BilevelTrainer", "Hyperparameter"):
        assert getattr(tfb, name) is getattr(tfb.keras, name)
