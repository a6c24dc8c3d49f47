"""Tests for experiments/online_hpo.py (issue #11 §5): with frozen hyperparameters the online
bilevel run trains the CNN exactly as plain Keras does, the weight-decay regularizer is Keras'
L2, the minibatch stream resumes exactly, and `--quick` runs end to end on a slice of the real
Fashion-MNIST with every method (KerasTuner included)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `experiments` is not an installed package.
from experiments import online_common as oc  # noqa: E402
from experiments import online_hpo as H  # noqa: E402
from experiments.config import apply_preset  # noqa: E402
from offline_data import write_mnist_subset  # noqa: E402
import program_runs  # noqa: E402

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
                                   reason="Debian package dataset-fashion-mnist is not installed")


def _random_data(n_train: int = 384, n_other: int = 128) -> dict:
    rng = np.random.default_rng(0)
    x = rng.random((n_train + n_other, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, n_train + n_other).astype(np.int32)
    rest = (x[n_train:], y[n_train:])
    return {"train": (x[:n_train], y[:n_train]), "val": rest, "test": rest}


def test_frozen_hyperparameters_reproduce_plain_keras_training(monkeypatch):
    # Outer step ~0: λ stays at the defaults, so the online run (w and momentum continuing across
    # hyper-iterations, one minibatch per step) must be Keras' SGD(momentum) with L2 kernel
    # regularizers on the same minibatches, step for step (2 epochs of 3 steps).
    built = []
    original = H.build_cnn
    monkeypatch.setattr(H, "build_cnn", lambda *a, **k: built.append(original(*a, **k)) or built[-1])
    cfg = H.Config(epochs=2, outer_lr=1e-30, n_val=128).validated()
    data = _random_data()
    store = oc.MethodStore(tempfile.mkdtemp())
    bilevel = H.run_bilevel(cfg, data, 1, store)
    default = H.run_default(cfg, data, store)
    (online, plain) = built
    for a, b in zip(online.weights, plain.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, err_msg=a.path)
    assert bilevel["hyper_iterations"] == 6 and bilevel["record"]["epoch"] == [0, 1, 2]
    assert bilevel["record"]["test_accuracy"] == default["record"]["test_accuracy"]
    assert bilevel["hyperparameters"]["learning_rate"] == pytest.approx(cfg.init_lr, rel=1e-6)


def test_weight_decay_regularizer_is_keras_l2():
    decays = [1e-3, 2e-4, 3e-5, 4e-2]
    model = oc.build_on(H.build_cnn(decays, seed=3), (28, 28, 1))
    keras_penalty = float(tf.add_n(model.losses))
    ours = H.weight_decay_regularizer(H.kernel_indices(model))(
        list(model.trainable_weights), {"weight_decay": tf.constant(decays)})
    assert float(ours) == pytest.approx(keras_penalty, rel=1e-5)
    assert H.kernel_indices(model) == [0, 2, 4, 6]  # kernel, bias alternate


def test_minibatch_stream_is_a_permutation_per_epoch_and_resumes_exactly():
    x = np.arange(50, dtype=np.int32)[:, None]
    y = np.arange(50, dtype=np.int32)
    full = [b[1] for b in oc.minibatch_stream(x, y, 8, seed=5).take(18).as_numpy_iterator()]  # 6 per epoch
    epoch0, epoch1 = np.concatenate(full[:6]), np.concatenate(full[6:12])
    assert len(set(epoch0)) == 48 and len(set(epoch1)) == 48  # no example twice in an epoch
    assert not np.array_equal(epoch0, epoch1)  # reshuffled every epoch
    resumed = [b[1] for b in oc.minibatch_stream(x, y, 8, seed=5, start=tf.constant(7, tf.int64)).take(11)
               .as_numpy_iterator()]
    for a, b in zip(full[7:], resumed):
        np.testing.assert_array_equal(a, b)


def test_config_validation_names_the_flag():
    with pytest.raises(ValueError, match="--methods"):
        H.Config(methods=("bilevel", "grid")).validated()
    with pytest.raises(ValueError, match="--lr_range"):
        H.Config(lr_range=(0.3, 0.001)).validated()
    with pytest.raises(ValueError, match="--truncate"):
        H.Config(truncate=(0,)).validated()
    with pytest.raises(ValueError, match="--truncate"):
        H.Config(truncate=("5:6",)).validated()
    assert H.Config(truncate=("20:1", 5, "1")).validated().truncate == ((1, 1), (5, 5), (20, 1))
    assert H.method_name(20, 1) == "bilevel_T20_K1" and H.method_name(5, 5) == "bilevel_T5"
    cfg = apply_preset(H.Config(), H.PRESETS, "quick", explicit=["epochs"])
    assert cfg.epochs == H.Config().epochs and cfg.tuner_trials == 2


@needs_fashion
@pytest.mark.slow
def test_quick_end_to_end_on_real_fashion_mnist(tmp_path):
    subset = write_mnist_subset(FASHION_DIR, tmp_path / "fashion", train=3000, test=1000)
    out = tmp_path / "out"
    log = tmp_path / "log.txt"
    command = ["-m", "experiments.online_hpo", "--quick", f"--output_dir={out}", f"--local_dir={subset}",
               f"--data_dir={tmp_path / 'tfds'}"]
    program_runs.finish(program_runs.start(command, log), log)
    results = json.loads((out / "results.json").read_text())
    methods = results["methods"]
    assert set(methods) == {"bilevel_T1", "bilevel_T4", "default", "random_search", "hyperband"}
    assert results["data"] == {**results["data"], "n_train": 2048, "n_val": 512, "n_test": 1000}
    for name, row in methods.items():
        assert 0.0 <= row["test_accuracy"] <= 1.0 and 0.0 <= row["val_accuracy"] <= 1.0, name
        assert row["record"]["epoch"] == [0, 1, 2], name
        assert row["record"]["train_seconds"][-1] > 0
        hp = row["hyperparameters"]
        assert len(hp["weight_decay"]) == 4 and all(d > 0 for d in hp["weight_decay"]) and hp["learning_rate"] > 0
    for name in ("bilevel_T1", "bilevel_T4", "default"):
        assert methods[name]["test_accuracy"] > 0.3, name  # 10 classes: chance is 0.1
    for steps in (1, 4):
        row = methods[f"bilevel_T{steps}"]
        assert row["hyper_iterations"] == 2 * (2048 // (128 * steps))
        assert row["record"]["hp_iteration"][0] == 0 and len(row["record"]["hp"]) == len(row["record"]["hp_iteration"])
        # λ moved (the hypergradient reached every layer's decay and γ), but stayed finite.
        decays = np.array([h["weight_decay"] for h in row["record"]["hp"]])
        assert np.all(np.isfinite(decays)) and np.all(np.abs(decays[-1] / decays[0] - 1) > 1e-4)
    assert methods["random_search"]["num_fits"] == 2
    assert methods["hyperband"]["num_fits"] >= 1
    for name in ("random_search", "hyperband"):
        row = methods[name]
        assert row["total_seconds"] == pytest.approx(row["search_seconds"] + row["retrain_seconds"])
        assert all(0 <= t["test_accuracy"] <= 1 for t in row["trials"])
    assert set(results["target"]["runs"]) == {"bilevel_T1", "bilevel_T4"}
    for name in results["figures"].values():
        assert (out / name).stat().st_size > 1000
    # A rerun of the same command finds every method finished and rewrites the same table.
    program_runs.finish(program_runs.start(command, log), log)
    assert log.read_text().count("finished earlier") == 5
    again = json.loads((out / "results.json").read_text())
    assert {k: v["test_accuracy"] for k, v in again["methods"].items()} == {k: v["test_accuracy"] for k, v in methods.items()}
