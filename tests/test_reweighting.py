"""Tests for experiments/reweighting.py (issue #11 §5): the symmetric noise, the Meta-Weight-Net
inner loss against NumPy (value, and gradient that treats the weights as constants), and
`--quick` end to end on a slice of real MNIST: the learned weighting gives the examples with
wrong labels lower weights than the others."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `experiments` is not an installed package.
from experiments import reweighting as R  # noqa: E402
from offline_data import MNIST_DIR, needs_mnist, write_mnist_subset  # noqa: E402
import program_runs  # noqa: E402


def test_symmetric_noise_changes_the_requested_fraction_to_other_classes():
    labels = np.repeat(np.arange(10), 2000)
    noisy = R.symmetric_noise(labels, 0.4, 10, np.random.default_rng(0))
    wrong = noisy != labels
    assert abs(wrong.mean() - 0.4) < 0.015  # every flip lands on another class: no 1/C dilution
    counts = np.bincount((noisy[wrong] - labels[wrong]) % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.8 * counts[1:].mean()  # uniform over the 9 others


def test_split_is_class_balanced_and_disjoint():
    labels = np.repeat(np.arange(10), 30)
    val, train = R.split(labels, 100, 10, np.random.default_rng(1))
    assert np.all(np.bincount(labels[val], minlength=10) == 10)
    assert len(np.intersect1d(val, train)) == 0 and len(val) + len(train) == len(labels)


@pytest.mark.parametrize("normalization", R.NORMALIZATIONS)
def test_weighted_inner_loss_matches_numpy_and_treats_weights_as_constants(normalization):
    rng = np.random.default_rng(0)
    theta = [t.astype(np.float32) for t in R.initial_weighting(7, seed=0)]
    logits = tf.constant(rng.normal(size=(6, 4)).astype(np.float32))
    y = tf.constant([0, 1, 2, 3, 0, 1])
    with tf.GradientTape() as tape:
        tape.watch(logits)
        values = R.make_inner_loss(normalization)(y, logits, {"weighting": [tf.constant(t) for t in theta]})
        mean = tf.reduce_mean(values)
    # NumPy: ℓ_i, v_i = V(ℓ_i) (/ mean_j V(ℓ_j)), and d/dlogits of mean(v ℓ) with v held fixed.
    z = logits.numpy().astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    losses = -np.log(p[np.arange(6), y.numpy()])
    v = R.weighting_net([t.astype(np.float64) for t in theta], losses)
    if normalization == "mean":
        v = v / v.mean()
    np.testing.assert_allclose(values.numpy(), v * losses, rtol=1e-5)
    expected_grad = v[:, None] * (p - np.eye(4)[y.numpy()]) / 6
    np.testing.assert_allclose(tape.gradient(mean, logits).numpy(), expected_grad, rtol=1e-4, atol=1e-7)


def test_config_validation_names_the_flag():
    with pytest.raises(ValueError, match="--noise"):
        R.Config(noise=1.0).validated()
    with pytest.raises(ValueError, match="--n_val"):
        R.Config(n_val=1005).validated()
    with pytest.raises(ValueError, match="--methods"):
        R.Config(methods=("mwn", "coteaching")).validated()
    with pytest.raises(ValueError, match="--weight_normalization"):
        R.Config(weight_normalization="sum").validated()


@needs_mnist
@pytest.mark.slow
def test_quick_end_to_end_on_real_mnist(tmp_path):
    subset = write_mnist_subset(MNIST_DIR, tmp_path / "mnist", train=4000, test=1000)
    out = tmp_path / "out"
    log = tmp_path / "log.txt"
    command = ["-m", "experiments.reweighting", "--quick", f"--output_dir={out}", f"--local_dir={subset}",
               f"--data_dir={tmp_path / 'tfds'}"]
    program_runs.finish(program_runs.start(command, log), log)
    results = json.loads((out / "results.json").read_text())
    data, methods = results["data"], results["methods"]
    assert (data["n_train"], data["n_val"], data["n_test"]) == (3000, 1000, 1000)
    assert 0.35 < data["wrong_fraction"] < 0.45
    assert set(methods) == {"mwn", "noisy", "clean"}
    for name, row in methods.items():
        assert 0.0 <= row["test_accuracy"] <= 1.0, name
        assert len(row["record"]["test_accuracy"]) == 11  # epochs 0..10
        assert row["test_accuracy"] > 0.5, name  # 10 classes: chance is 0.1
    weights = methods["mwn"]["example_weights"]
    # The learned V downweights the examples whose label is wrong (they keep high losses).
    assert weights["mean_weight_wrong_labels"] < 0.5 * weights["mean_weight_right_labels"]
    assert weights["mean_normalized_weight_wrong_labels"] < 1.0 < weights["mean_normalized_weight_right_labels"]
    assert sum(weights["histogram_wrong"]) == data["wrong_labels"]
    grid = np.array([h["grid_weights"] for h in methods["mwn"]["record"]["hp"]])
    assert grid.shape == (len(methods["mwn"]["record"]["hp_iteration"]), len(R.LOSS_GRID))
    assert np.all((grid > 0) & (grid < 1))
    early = methods["noisy"]["early_stopped"]
    assert methods["noisy"]["record"]["val_accuracy"][early["epoch"]] == early["val_accuracy"]
    assert set(results["target"]) == {"gain_points", "reached"}
    for name in results["figures"].values():
        assert (out / name).stat().st_size > 1000


@needs_mnist
@pytest.mark.slow
def test_killed_runs_rerun_with_the_same_command_end_identical(tmp_path):
    # Killed twice (in the bilevel run after its epoch-3 checkpoint, then in the plain noisy run
    # after epoch 2), rerun: the same curves, θ and weights as an uninterrupted run.
    subset = write_mnist_subset(MNIST_DIR, tmp_path / "mnist", train=4000, test=1000)

    def command(out, *extra):
        return ["-m", "experiments.reweighting", "--quick", "--epochs=4", "--methods=mwn,noisy",
                f"--output_dir={out}", f"--local_dir={subset}", f"--data_dir={tmp_path / 'tfds'}", *extra]

    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
    log = tmp_path / "interrupted.log"
    program_runs.kill_when_paused(program_runs.start(command(interrupted, "--pause_after=mwn,3"), log),
                                  interrupted / "resume" / "paused_mwn_3", log)
    program_runs.kill_when_paused(program_runs.start(command(interrupted, "--pause_after=noisy,2"), log),
                                  interrupted / "resume" / "paused_noisy_2", log)
    program_runs.finish(program_runs.start(command(interrupted), log), log)
    reference_log = tmp_path / "reference.log"
    program_runs.finish(program_runs.start(command(reference), reference_log), reference_log)
    text = log.read_text()
    assert "[mwn] resumed at epoch 3/4" in text and "[noisy] resumed at epoch 2/4" in text
    assert "[mwn] finished earlier" in text

    got = json.loads((interrupted / "results.json").read_text())["methods"]
    want = json.loads((reference / "results.json").read_text())["methods"]
    for name in ("mwn", "noisy"):
        for key in ("epoch", "test_accuracy", "val_accuracy"):
            assert got[name]["record"][key] == want[name]["record"][key], (name, key)
    assert got["mwn"]["record"]["hp_iteration"] == want["mwn"]["record"]["hp_iteration"]
    np.testing.assert_allclose(np.concatenate([np.ravel(t) for t in got["mwn"]["theta"]]),
                               np.concatenate([np.ravel(t) for t in want["mwn"]["theta"]]), rtol=1e-6, atol=1e-7)
    assert got["mwn"]["example_weights"]["histogram_wrong"] == want["mwn"]["example_weights"]["histogram_wrong"]


def test_damaged_state_and_a_busy_output_dir_are_clear_errors(tmp_path):
    from experiments import run_state

    cfg = R.Config(output_dir=str(tmp_path), methods=("noisy",))
    (tmp_path / "resume").mkdir()
    (tmp_path / "resume" / "noisy.json").write_text('{"test_accuracy": 0.9, "rec')  # killed mid-write by hand
    with pytest.raises(run_state.StateFileError, match=r"noisy\.json is damaged.*--restart"):
        R.run_experiment(cfg, arrays={}, data_info={})
    with run_state.exclusive_output_dir(tmp_path, "another run"):
        with pytest.raises(run_state.OutputDirError, match="in use by another run"):
            R.run_experiment(cfg, arrays={}, data_info={})
