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

    Path(out_dir, "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        raise SystemExit("run with TF_USE_LEGACY_KERAS=1 (the tests do)")
    _main(sys.argv[1])
