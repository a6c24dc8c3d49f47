"""The tf-keras (Keras 2) path: LegacyBilevelTrainer, run with TF_USE_LEGACY_KERAS=1.

The variable must be set before TensorFlow is imported, so the checks run in one subprocess
(this file executed as a script) that writes its findings to JSON; the tests below assert on
them. The subprocess also runs the Keras 3 trainer on the same problem and weights: the two
independent ways of calling a model on given weights (tf-keras attribute substitution,
Keras 3 stateless_call) must give the same hypergradient.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here starts Python processes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def legacy(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("legacy")
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, __file__, str(out)], env=env, cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "results.json").read_text())


def test_tf_keras_is_the_keras_of_the_subprocess(legacy):
    assert legacy["tf_keras_module"].startswith("tf_keras")


def test_hypercleaning_with_xla_learns_and_evaluates_like_numpy(legacy):
    r = legacy["hypercleaning"]
    assert r["jit_compile"] is True
    assert r["loss"][-1] < r["loss"][0] - 0.05
    assert r["corrupted_weight"] < r["clean_weight"] - 0.1
    assert r["evaluate_loss"] == pytest.approx(r["numpy_loss"], rel=1e-4)


def test_batchnorm_meta_batch_hypergradient_equals_the_keras3_path(legacy):
    r = legacy["meta"]
    assert r["inner_stats_unchanged"] and r["hyper_stats_changed"]
    assert r["max_relative_difference"] < 1e-4, r
    assert r["gradient_norm"] > 1e-3


def test_layer_regularizers_and_add_loss_count_in_g_like_the_explicit_terms(legacy):
    r = legacy["layer_losses"]
    for pair in ("kernel_regularizer_vs_inner_regularizer", "add_loss_vs_inner_loss_term", "kernel_regularizer_vs_keras3"):
        assert r[pair]["w_T"] <= 1e-6 and r[pair]["hypergradient"] <= 1e-6, (pair, r[pair])
    assert r["kernel_regularizer_vs_none"]["w_T"] > 1e-2 and r["kernel_regularizer_vs_none"]["hypergradient"] > 1e-4
    assert r["add_loss_vs_none"]["w_T"] > 1e-3 and r["add_loss_vs_none"]["hypergradient"] > 1e-5
    assert r["outer_loss_is_plain"] is True
    assert "'bad_loss'" in r["callable_add_loss_error"] and "not a weight regularizer" in r["callable_add_loss_error"]


def test_mixed_float16_hypergradient_matches_float32(legacy):
    r = legacy["mixed_float16"]
    assert r["compute_dtype"] == "float16" and r["optimizer"] == "SGD" and r["hyper_dtypes"] == ["float32"]
    assert r["relative_error"] < 1e-2, r


def test_online_batchnorm_trains_like_tf_keras_fit(legacy):
    assert 0.0 <= legacy["online_batchnorm_max_difference"] < 1e-5


def test_log_names_histograms_and_save_error(legacy):
    assert {"loss", "outer_loss", "inner_loss", "hp/inner_learning_rate"} <= set(legacy["history_keys"])
    assert "save_weights" in legacy["save_error"] and "BackupAndRestore" in legacy["save_error"]
    assert legacy["histograms"] == [[0, "hp/w"], [1, "hp/w"]]


def test_wrong_flavor_nonfinite_checkpoint_and_export(legacy):
    assert "LegacyBilevelTrainer works with tf-keras" in legacy["wrong_flavor_error"]
    assert "use tf_bilevel.BilevelTrainer" in legacy["wrong_flavor_error"]
    assert "inner step 0" in legacy["nonfinite_error"]
    assert legacy["checkpoint_round_trip"] is True
    assert legacy["export_bit_identical"] is True


# ---------------------------------------------------------------------------------------
# The subprocess (TF_USE_LEGACY_KERAS=1).
# ---------------------------------------------------------------------------------------
def _main(out_dir: str) -> None:
    import numpy as np
    import tensorflow as tf

    import keras as keras3
    import tf_bilevel as tfb
    from tf_bilevel.keras.losses import sparse_categorical_crossentropy as CE

    keras2 = tf.keras
    results: dict = {"tf_keras_module": keras2.__name__}

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    # 1. Hypercleaning (deterministic regime) with XLA, evaluate against NumPy.
    rng = np.random.default_rng(0)
    n, d, c, T = 200, 10, 3, 20
    teacher = rng.normal(size=(d, c))
    x, xv = rng.normal(size=(2, n, d)).astype("float32")
    y, yv = (x @ teacher).argmax(-1), (xv @ teacher).argmax(-1)
    corrupted = rng.random(n) < 0.5
    y = np.where(corrupted, rng.integers(0, c, n), y)
    trainer = tfb.LegacyBilevelTrainer(
        keras2.Sequential([keras2.layers.Dense(c)]),
        hyperparameters={"w": tfb.Hyperparameter(np.full(n, 0.5), transform="sigmoid")},
        inner_loss=lambda y_, p, hp: hp["w"] * CE(y_, p), outer_loss=CE, steps=T, truncate=5, inner_learning_rate=1.0)
    trainer.compile(optimizer=keras2.optimizers.Adam(0.1), jit_compile=True)
    element = ((x, y), (xv, yv))
    history = trainer.fit(tf.data.Dataset.from_tensors(element).repeat(), epochs=2, steps_per_epoch=15, verbose=0)
    weights = trainer.hyperparameter_values()["w"].numpy().astype(np.float64)
    W, b = [v.astype(np.float64) for v in trainer.inner_model.get_weights()]
    for _ in range(T):
        p = softmax(x @ W + b)
        p[np.arange(n), y] -= 1.0
        g = weights[:, None] * p / n
        W, b = W - x.T @ g, b - g.sum(0)
    pv = softmax(xv @ W + b)
    results["hypercleaning"] = {
        "jit_compile": bool(trainer._jit_compile),
        "loss": history.history["loss"],
        "clean_weight": float(weights[~corrupted].mean()),
        "corrupted_weight": float(weights[corrupted].mean()),
        "evaluate_loss": trainer.evaluate(tf.data.Dataset.from_tensors(element), verbose=0, return_dict=True)["loss"],
        "numpy_loss": float(-np.mean(np.log(pv[np.arange(n), yv]))),
    }

    # 2. Meta-batch with BatchNorm: one SGD(1) step gives -hypergradient; compare with Keras 3.
    def task(i):
        centers = tf.random.stateless_normal([3, 5], seed=[i, 0])
        xs = tf.reshape(centers[:, None] + 0.5 * tf.random.stateless_normal([3, 2, 5], seed=[i, 1]), [-1, 5])
        xq = tf.reshape(centers[:, None] + 0.5 * tf.random.stateless_normal([3, 3, 5], seed=[i, 2]), [-1, 5])
        return (xs, tf.repeat(tf.range(3), 2)), (xq, tf.repeat(tf.range(3), 3))

    tasks = tf.data.Dataset.range(2).map(task).batch(2)

    def build(k, trainer_class):
        hyper = k.Sequential([k.layers.Dense(6, activation="tanh"), k.layers.BatchNormalization()])
        inner = k.Sequential([k.layers.Dense(6), k.layers.BatchNormalization(), k.layers.Activation("tanh"),
                              k.layers.Dense(3)])
        t = trainer_class(inner, hyper_model=hyper, inner_loss=CE, outer_loss=CE, steps=4, truncate=2,
                          meta_batch=True, proximal_strength=0.05,
                          inner_learning_rate=tfb.Hyperparameter(0.3, transform="softplus"))
        t.compile(optimizer=k.optimizers.SGD(1.0))
        t.build_from_spec(tasks.element_spec)
        return t

    legacy_trainer = build(keras2, tfb.LegacyBilevelTrainer)
    keras3_trainer = build(keras3, tfb.BilevelTrainer)
    for src, dst in ((legacy_trainer.hyper_model, keras3_trainer.hyper_model),
                     (legacy_trainer.inner_model, keras3_trainer.inner_model)):
        dst.set_weights(src.get_weights())
    for src, dst in zip(legacy_trainer.hyper_variables, keras3_trainer.hyper_variables):
        dst.assign(src.numpy())
    inner_stats = [v.numpy().copy() for v in legacy_trainer.inner_model.non_trainable_variables]
    hyper_stats = [v.numpy().copy() for v in legacy_trainer.hyper_model.non_trainable_variables]
    grads = []
    for t in (legacy_trainer, keras3_trainer):
        before = [np.array(v.numpy()) for v in t.hyper_variables]
        t.fit(tasks, epochs=1, verbose=0)
        grads.append(np.concatenate([(b - v.numpy()).reshape(-1) for b, v in zip(before, t.hyper_variables)]))
    results["meta"] = {
        "max_relative_difference": float(np.max(np.abs(grads[0] - grads[1])) / np.max(np.abs(grads[1]))),
        "gradient_norm": float(np.linalg.norm(grads[1])),
        "inner_stats_unchanged": all(
            np.array_equal(a, v.numpy()) for a, v in zip(inner_stats, legacy_trainer.inner_model.non_trainable_variables)),
        "hyper_stats_changed": any(
            not np.allclose(a, v.numpy()) for a, v in zip(hyper_stats, legacy_trainer.hyper_model.non_trainable_variables)),
    }

    # 3. A Keras 3 layer given to the tf-keras trainer.
    try:
        tfb.LegacyBilevelTrainer(keras3.layers.Dense(2), inner_loss=CE, outer_loss=CE, steps=2)
        results["wrong_flavor_error"] = ""
    except TypeError as err:
        results["wrong_flavor_error"] = str(err)

    # 4. Non-finite inner loss: a clear error.
    bad = tfb.LegacyBilevelTrainer(keras2.Sequential([keras2.layers.Dense(c)]), hyperparameters={"a": 1.0},
                                   inner_loss=lambda y_, p, hp: hp["a"] * CE(y_, p), outer_loss=CE, steps=3)
    bad.compile(optimizer=keras2.optimizers.SGD(0.1))
    x_nan = x.copy()
    x_nan[0, 0] = np.nan
    try:
        bad.fit(tf.data.Dataset.from_tensors(((x_nan, y), (xv, yv))), verbose=0)
        results["nonfinite_error"] = ""
    except tfb.NonFiniteError as err:
        results["nonfinite_error"] = str(err)

    # 5. tf.train.Checkpoint captures λ, the optimizer slots and meta_step.
    path = tf.train.Checkpoint(model=trainer, optimizer=trainer.optimizer).save(os.path.join(out_dir, "ckpt"))
    fresh = tfb.LegacyBilevelTrainer(
        keras2.Sequential([keras2.layers.Dense(c)]),
        hyperparameters={"w": tfb.Hyperparameter(np.full(n, 0.5), transform="sigmoid")},
        inner_loss=lambda y_, p, hp: hp["w"] * CE(y_, p), outer_loss=CE, steps=T, truncate=5, inner_learning_rate=1.0)
    fresh.compile(optimizer=keras2.optimizers.Adam(0.1))
    fresh.build_from_spec(tf.data.Dataset.from_tensors(element).element_spec)
    tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).restore(path).assert_existing_objects_matched()
    same = lambda a, b: all(np.array_equal(u.numpy(), v.numpy()) for u, v in zip(a, b))  # noqa: E731
    results["checkpoint_round_trip"] = bool(
        same(trainer.hyper_variables, fresh.hyper_variables)
        and same(trainer.optimizer.variables, fresh.optimizer.variables)
        and len(fresh.optimizer.variables) > 1
        and int(fresh.meta_step.numpy()) == 30
    )

    # 6. Export of the tf-keras hyper model, reloaded bit-identically.
    export_dir = os.path.join(out_dir, "export")
    legacy_trainer.export(export_dir)
    loaded = tf.saved_model.load(export_dir)
    probe = tf.random.stateless_normal([4, 5], seed=[3, 3])
    served = tf.function(lambda t: legacy_trainer.hyper_model(t, training=False))(probe)
    results["export_bit_identical"] = bool(np.array_equal(loaded.serve(probe).numpy(), served.numpy()))

    # 7. Layer regularizers and add_loss in g (not in f), against the explicit formulations and Keras 3.
    results["layer_losses"] = _layer_losses(keras2, keras3, tfb, CE)

    # 8. Mixed precision (float16 compute) against float32.
    results["mixed_float16"] = _mixed_float16(keras2, tfb, CE)

    # 10. Online BatchNorm: with λ frozen, the tf-keras online trainer trains like tf-keras fit
    # (weights and moving statistics, carried through the inner steps and hyper-iterations).
    results["online_batchnorm_max_difference"] = _online_batchnorm(keras2, tfb, CE)

    # 9. Log names (outer/inner loss, scalar hyperparameters) and the save() error.
    logged = tfb.LegacyBilevelTrainer(
        keras2.Sequential([keras2.layers.Dense(c)]), hyperparameters={"w": np.full(n, 0.5)},
        inner_loss=lambda y_, p, hp: hp["w"] * CE(y_, p), outer_loss=CE, steps=2,
        inner_learning_rate=tfb.Hyperparameter(0.5, transform="softplus"))
    logged.compile(optimizer=keras2.optimizers.SGD(0.1))
    log_dir = os.path.join(out_dir, "tb")
    history = logged.fit(tf.data.Dataset.from_tensors(element).repeat(2), epochs=2, steps_per_epoch=1, verbose=0,
                         callbacks=[tfb.keras.HyperparameterHistograms(log_dir)])  # a Keras 3 class, tf-keras fit
    results["history_keys"] = sorted(history.history)
    results["histograms"] = sorted(
        (event.step, value.tag) for path in Path(log_dir, "train").glob("events.out.tfevents.*")
        for event in tf.compat.v1.train.summary_iterator(str(path)) for value in event.summary.value)
    try:
        logged.save(os.path.join(out_dir, "trainer.keras"))
        results["save_error"] = ""
    except NotImplementedError as err:
        results["save_error"] = str(err)

    Path(out_dir, "results.json").write_text(json.dumps(results))


def _one_step(trainer, element):
    """(w_T kernel, d f / d ν, logged f) of one hyper-iteration with SGD(1) and warm start."""
    import numpy as np
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensors(element)
    trainer.build_from_spec(dataset.element_spec)
    before = [v.numpy().copy() for v in trainer.hyper_variables]
    loss = trainer.fit(dataset, verbose=0).history["loss"][0]
    grad = np.concatenate([(b - v.numpy()).ravel() for b, v in zip(before, trainer.hyper_variables)])
    return trainer.inner_model.get_weights()[0], grad, loss


def _layer_losses(keras2, keras3, tfb, CE) -> dict:
    import numpy as np
    import tensorflow as tf

    n, d, k, steps, strength = 16, 4, 5, 4, 0.25
    rng = np.random.default_rng(0)
    x, xv = rng.normal(size=(2, n, d)).astype("float32")
    element = ((x, rng.integers(0, k, n)), (xv, rng.integers(0, k, n)))
    weights = [(0.3 * rng.normal(size=(d, k))).astype("float32"), np.zeros(k, "float32")]

    class Penalty(keras2.layers.Layer):
        def call(self, z):
            self.add_loss(strength * tf.reduce_mean(tf.square(z)))
            return z

    def run(kind, k_=keras2, trainer_class=tfb.LegacyBilevelTrainer):
        regularizer = k_.regularizers.L2(strength) if kind == "kernel_regularizer" else None
        layers = [k_.Input((d,)), k_.layers.Dense(k, kernel_regularizer=regularizer)]
        layers += [Penalty()] if kind == "add_loss" else []
        model = k_.Sequential(layers)
        model.set_weights(weights)

        def inner_loss(y_true, logits, hp):
            value = hp["w"] * CE(y_true, logits)
            if kind == "inner_loss_term":
                value = value + strength * tf.reduce_mean(tf.square(logits), axis=-1)
            return value

        explicit = (lambda w, hp: strength * tf.reduce_sum(tf.square(w[0]))) if kind == "inner_regularizer" else None
        trainer = trainer_class(
            model, hyperparameters={"w": tfb.Hyperparameter(np.full(n, 0.5), transform="sigmoid")},
            inner_loss=inner_loss, outer_loss=CE, steps=steps, inner_learning_rate=0.5, inner_init="warm_start",
            inner_regularizer=explicit)
        trainer.compile(optimizer=k_.optimizers.SGD(1.0), jit_compile=kind == "kernel_regularizer")
        return _one_step(trainer, element)

    runs = {kind: run(kind) for kind in ("kernel_regularizer", "inner_regularizer", "none", "add_loss", "inner_loss_term")}
    runs["keras3"] = run("kernel_regularizer", keras3, tfb.BilevelTrainer)

    def differences(a, b):
        (wa, ga, _), (wb, gb, _) = runs[a], runs[b]
        return {"w_T": float(np.max(np.abs(wa - wb))), "hypergradient": float(np.max(np.abs(ga - gb)))}

    result = {
        "kernel_regularizer_vs_inner_regularizer": differences("kernel_regularizer", "inner_regularizer"),
        "kernel_regularizer_vs_keras3": differences("kernel_regularizer", "keras3"),
        "kernel_regularizer_vs_none": differences("kernel_regularizer", "none"),
        "add_loss_vs_inner_loss_term": differences("add_loss", "inner_loss_term"),
        "add_loss_vs_none": differences("add_loss", "none"),
    }
    # f is the plain cross-entropy at w_T: the same for the layer and the explicit regularizer (whose
    # inner_regularizer is never part of f).
    result["outer_loss_is_plain"] = abs(runs["kernel_regularizer"][2] - runs["inner_regularizer"][2]) < 1e-6

    # A callable add_loss that is not a weight regularizer cannot be evaluated at w_t: refused.
    dense = keras2.layers.Dense(k)
    model = keras2.Sequential([keras2.Input((d,)), dense], name="bad_loss")
    model.add_loss(lambda: tf.reduce_sum(dense.kernel))
    bad = tfb.LegacyBilevelTrainer(model, hyperparameters={"w": np.full(n, 0.5)},
                                   inner_loss=lambda y_, p, hp: hp["w"] * CE(y_, p), outer_loss=CE, steps=2)
    bad.compile(optimizer=keras2.optimizers.SGD(0.1))
    try:
        bad.fit(tf.data.Dataset.from_tensors(element), verbose=0)
        result["callable_add_loss_error"] = ""
    except ValueError as err:
        result["callable_add_loss_error"] = str(err)
    return result


def _online_batchnorm(keras2, tfb, CE) -> float:
    """max |online trainer − model.fit| over every weight after 2 hyper-iterations of T = 2."""
    import warnings

    import numpy as np
    import tensorflow as tf

    steps, batch = 2, 8
    rng = np.random.default_rng(7)
    x = rng.normal(loc=0.5, size=(steps * batch * 2, 5)).astype("float32")
    y = rng.integers(0, 3, len(x)).astype("int32")
    keras2.utils.set_random_seed(1)
    model = keras2.Sequential([keras2.layers.InputLayer((5,)), keras2.layers.Dense(4),
                               keras2.layers.BatchNormalization(momentum=0.7), keras2.layers.Dense(3)])
    reference = keras2.models.clone_model(model)
    reference.set_weights(model.get_weights())
    reference.compile(optimizer=keras2.optimizers.SGD(0.1), loss=keras2.losses.SparseCategoricalCrossentropy(from_logits=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer = tfb.LegacyBilevelTrainer(
            model, inner_loss=lambda y_, p, hp: hp["s"] * CE(y_, p), outer_loss=CE, steps=steps, online=True,
            hyperparameters={"s": tfb.Hyperparameter(1.0)}, inner_learning_rate=0.1)
    trainer.compile(optimizer=keras2.optimizers.SGD(0.0))
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True)
    stream = tfb.keras.online_tasks(train, tf.data.Dataset.from_tensors((x[:4], y[:4])), steps=steps)
    trainer.fit(stream, epochs=1, steps_per_epoch=2, verbose=0)
    reference.fit(train, epochs=1, verbose=0, shuffle=False)
    moving_mean = [w for w in model.weights if "moving_mean" in w.name][0]
    moved = not np.allclose(moving_mean.numpy(), 0.0)  # the moving mean left its initial zeros
    return float(max(np.abs(a.numpy() - b.numpy()).max() for a, b in zip(model.weights, reference.weights))) if moved else -1.0


def _mixed_float16(keras2, tfb, CE) -> dict:
    import numpy as np

    n, d, k = 32, 5, 3
    rng = np.random.default_rng(0)
    x, xv = rng.normal(size=(2, n, d)).astype("float32")
    element = ((x, rng.integers(0, k, n)), (xv, rng.integers(0, k, n)))
    keras2.utils.set_random_seed(0)
    weights = keras2.Sequential([keras2.Input((d,)), keras2.layers.Dense(8), keras2.layers.Dense(k)]).get_weights()

    def run(policy):
        keras2.mixed_precision.set_global_policy(policy)
        try:
            model = keras2.Sequential([
                keras2.Input((d,)), keras2.layers.Dense(8, activation="tanh", kernel_regularizer=keras2.regularizers.L2(0.01)),
                keras2.layers.Dense(k)])
            model.set_weights(weights)
            trainer = tfb.LegacyBilevelTrainer(
                model, hyperparameters={"w": tfb.Hyperparameter(np.full(n, 0.5), transform="sigmoid")},
                inner_loss=lambda y_, p, hp: hp["w"] * CE(y_, p), outer_loss=CE, steps=5, inner_learning_rate=0.5)
            trainer.compile(optimizer=keras2.optimizers.SGD(1.0))
            return trainer, _one_step(trainer, element)[1]
        finally:
            keras2.mixed_precision.set_global_policy("float32")

    _, reference = run("float32")
    trainer, grad = run("mixed_float16")
    return {
        "compute_dtype": trainer.inner_model.layers[0].compute_dtype,
        "optimizer": type(trainer.optimizer).__name__,
        "hyper_dtypes": sorted({v.dtype.name for v in trainer.hyper_variables}),
        "relative_error": float(np.linalg.norm(grad - reference) / np.linalg.norm(reference)),
    }


if __name__ == "__main__":
    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        raise SystemExit("run with TF_USE_LEGACY_KERAS=1 (the tests do)")
    _main(sys.argv[1])
