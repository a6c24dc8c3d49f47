"""Tests for experiments/hypercleaning.py (paper §4.2.1): the F1 of flagged examples against a
hand-computed example, the losses against numpy, `--quick` end to end on real MNIST, and a run
killed with SIGKILL and rerun with the same command against an uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `experiments` is not an installed package.
from experiments import hypercleaning as H  # noqa: E402
from experiments.common.config import apply_preset  # noqa: E402
from offline_data import MNIST_DIR, needs_mnist, write_mnist_subset  # noqa: E402
import program_runs  # noqa: E402



def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["TF_BILEVEL_OFFLINE"] = "1"  # never let a test wait on the network
    return env


def test_flag_scores_hand_computed():
    # λ:          -5    -3.5   -2    0.5   -4    1     -3    2
    # corrupted:   T     T      T    F      F    F      T    F
    # flagged (λ < -3): idx 0, 1, 4 -> TP = 2 (0, 1), FP = 1 (4), FN = 2 (2, 6; -3 is not < -3)
    lam = np.array([-5.0, -3.5, -2.0, 0.5, -4.0, 1.0, -3.0, 2.0])
    corrupted = np.array([1, 1, 1, 0, 0, 0, 1, 0], bool)
    s = H.flag_scores(lam, corrupted, -3.0)
    assert (s["tp"], s["fp"], s["fn"], s["flagged"]) == (2, 1, 2, 3)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 4)
    assert s["f1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))  # = 4/7
    # τ = -1: flags 0, 1, 2, 4, 6 -> TP = 4, FP = 1, FN = 0 -> F1 = 8/9.
    assert H.flag_scores(lam, corrupted, -1.0)["f1"] == pytest.approx(8 / 9)
    # Nothing flagged: precision, recall and F1 are 0, not NaN.
    s = H.flag_scores(lam, corrupted, -10.0)
    assert (s["precision"], s["recall"], s["f1"]) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("normalization", H.NORMALIZATIONS)
def test_losses_match_numpy(normalization):
    rng = np.random.default_rng(0)
    n, d, c = 20, 7, 4
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, c, n).astype(np.int32)
    W = rng.normal(size=(c, d)).astype(np.float32)
    lam = rng.normal(size=n).astype(np.float32)
    logits = x @ W.T
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ce = -log_probs[np.arange(n), y]
    weighted = np.sum(ce / (1 + np.exp(-lam)))
    rho = 0.001
    expected = {
        "mean": weighted / n + rho * np.sum(W**2),
        "mean_all": (weighted + rho * np.sum(W**2)) / n,
        "sum": weighted + rho * np.sum(W**2),
    }[normalization]
    inner, outer = H.make_losses(rho, normalization, n)
    assert float(inner(tf.constant(W), tf.constant(lam), (tf.constant(x), tf.constant(y)))) == pytest.approx(
        expected, rel=1e-5)
    assert float(outer(tf.constant(W), None, (tf.constant(x), tf.constant(y)))) == pytest.approx(ce.mean(), rel=1e-5)


def test_config_validation_names_the_flag():
    with pytest.raises(ValueError, match="--truncate"):
        H.Config(truncate=[0, 5]).validated()
    with pytest.raises(ValueError, match="--n_train"):
        H.Config(n_train=1234).validated()
    cfg = apply_preset(H.Config(), H.PRESETS, "readme", explicit=["hyper_iterations"])
    assert list(cfg.truncate) == [1, 5, 100] and cfg.hyper_iterations == 1000


@needs_mnist
@pytest.mark.slow
def test_quick_end_to_end_on_real_mnist(tmp_path):
    out = tmp_path / "out"
    # A slice of real MNIST (the 2000 training and validation examples drawn from 3000, 1000 test
    # images): preparing all 70 000 images for tfds took more CPU than the run.
    mnist = write_mnist_subset(MNIST_DIR, tmp_path / "mnist_subset", train=3000, test=1000)
    command = [sys.executable, "-m", "experiments.hypercleaning", "--quick", f"--output_dir={out}",
               f"--local_dir={mnist}", f"--data_dir={tmp_path / 'tfds'}", "--truncate=1,100"]
    done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Table 2 after 12 hyper-iterations" in done.stdout

    results = json.loads((out / "results.json").read_text())
    assert results["config"]["hyper_iterations"] == 12
    assert results["data"]["n_train"] == 1000 and results["data"]["n_val"] == 1000
    assert 0.3 < results["data"]["n_corrupted"] / 1000 < 0.6  # ½ replaced, 9/10 of those changed
    assert set(results["runs"]) == {"1", "100"}
    for k, run in results["runs"].items():
        final, curves = run["final"], run["curves"]
        for key in ("test_accuracy", "val_accuracy"):
            assert 0.0 <= final[key] <= 1.0
        assert final["test_accuracy"] > 0.6  # a linear MNIST classifier, even on noisy labels
        assert set(final["flagging"]) == {"-4.0", "-3.0", "-1.0"}
        assert all(0.0 <= s["f1"] <= 1.0 for s in final["flagging"].values())
        assert len(curves["val_loss"]) == 13  # λ_0 … λ_12
        # The outer objective decreases (Adam on a smooth f with a small step), and λ separates:
        # corrupted examples get lower weights than clean ones.
        assert curves["val_loss"][-1] < curves["val_loss"][0] - 0.05
        assert final["lambda_mean_corrupted"] < final["lambda_mean_clean"] - 0.2
        assert run["tracing_count"] == 1  # one compiled hyper-iteration, never retraced
        assert curves["exact_iterations"][0] == 0 and curves["exact_iterations"][-1] == 12
        assert all(np.isfinite(curves["exact_hypergrad_norm"]))
    # K = T is full RMD: its own hypergradient is the exact one, recorded at every iteration.
    assert results["runs"]["100"]["full_rmd"] and len(results["runs"]["100"]["curves"]["exact_iterations"]) == 13
    # η0 tuned per K: the first updates have the requested norm.
    target = results["config"]["first_update_norm"]
    for run in results["runs"].values():
        assert run["first_update_norm"] == pytest.approx(target, rel=1e-4)
    for name in results["figures"].values():
        assert (out / name).stat().st_size > 1000


@pytest.mark.slow
def test_memory_probes_run_in_fresh_processes(tmp_path):
    # Tiny synthetic problem: the point is the subprocess protocol and the record, not the sizes.
    rng = np.random.default_rng(0)
    n, d = 20, 6
    arrays = {
        "x_train": rng.normal(size=(n, d)).astype(np.float32), "y_train": rng.integers(0, 10, n),
        "x_val": rng.normal(size=(n, d)).astype(np.float32), "y_val": rng.integers(0, 10, n),
        "corrupted": rng.random(n) < 0.5, "replaced": rng.random(n) < 0.5,
    }
    arrays["y_train"][:10] = np.arange(10)  # every class present: W has 10 rows
    cfg = H.Config(output_dir=str(tmp_path), truncate=[2], inner_steps=3, n_train=n, n_val=n,
                   memory_probe_calls=1).validated()
    memory = H.measure_memory(cfg, arrays)
    assert set(memory) == {"0", "2"}
    for k, record in memory.items():
        assert "error" not in record, record
        assert record["stored_state_bytes"] == int(k) * 10 * d * 4  # K states of W ∈ R^{10×d}
        for key in ("first_call_peak_growth_bytes", "steady_peak_growth_bytes", "steady_allocator_peak_growth_bytes"):
            if sys.platform.startswith("linux"):  # the probes give a value on Linux (tests/test_memory.py checks it)
                assert record[key] is not None, key
            assert record[key] is None or record[key] >= 0
    assert not list(tmp_path.glob("*.npz"))  # the data handed to the probes is removed


def test_missing_data_fails_fast_with_a_clear_error(tmp_path, monkeypatch):
    # The program's data reader, in process (the exit status and the line "hypercleaning: error:
    # no MNIST data: <this error>": tests/test_program.py; hypercleaning's subprocess case for the
    # one-line contract: tests/test_program_faults.py, damaged state).
    from experiments.data.tfds_offline import DataUnavailableError

    monkeypatch.setenv("TF_BILEVEL_OFFLINE", "1")  # never let a test wait on the network
    empty = tmp_path / "no_mnist"
    empty.mkdir()
    cfg = apply_preset(H.Config(local_dir=str(empty), data_dir=str(tmp_path / "tfds"),
                                output_dir=str(tmp_path / "out")), H.PRESETS, "quick")
    start = time.perf_counter()
    with pytest.raises(DataUnavailableError, match=f"{empty} lacks the IDX files"):
        H.load_split(cfg)
    print(f"failed in {time.perf_counter() - start:.1f} s")


# ------------------------------------------------------------------------------------
# Resumption: SIGKILL, rerun the same command, same results as an uninterrupted run.
# ------------------------------------------------------------------------------------
TIMING_ONLY = ("wall_seconds", "cpu_seconds")


def _resume_command(tmp_path: Path, output_dir: Path, *extra: str) -> list:
    # K = 1 finishes, K = 5 is killed after hyper-iteration 6 (checkpoints at 4 and 8: 5-6 are lost).
    # A slice of real MNIST (2000 train/val examples drawn from 3000): a faster start for each process.
    mnist = tmp_path / "mnist_subset"
    if not mnist.is_dir():
        write_mnist_subset(MNIST_DIR, mnist, train=3000, test=500)
    return [sys.executable, "-m", "experiments.hypercleaning", "--quick", "--truncate=1,5", "--save_every=4",
            f"--output_dir={output_dir}", f"--local_dir={mnist}", f"--data_dir={tmp_path / 'tfds'}", *extra]


def _final_lambda(output_dir: Path, truncate: int) -> dict:
    """λ_R and the outer Adam's variables, as saved in the last checkpoint of K (iteration 12)."""
    reader = tf.train.load_checkpoint(str(output_dir / "checkpoints" / f"K{truncate}" / "ckpt-12"))
    names = [n for n in reader.get_variable_to_shape_map() if n.startswith(("hparams/", "optimizer/"))]
    return {n: reader.get_tensor(n) for n in names}


def _without_timings(run: dict) -> dict:
    run = json.loads(json.dumps(run))
    del run["timing"]
    for key in TIMING_ONLY:
        del run["curves"][key]
    return run


@needs_mnist
@pytest.mark.slow
def test_killed_run_rerun_with_the_same_command_ends_identical(tmp_path):
    interrupted, uninterrupted = tmp_path / "interrupted", tmp_path / "uninterrupted"
    log = tmp_path / "interrupted.log"
    command = _resume_command(tmp_path, interrupted, "--pause_after=5,6")
    marker = interrupted / "paused_K5_at_6"

    # 1st run: SIGKILL once it waits after hyper-iteration 6 of K = 5.
    program_runs.kill_when_paused(program_runs.start(command, log), marker, log)
    assert (interrupted / "checkpoints" / "K1" / "result.json").exists()
    assert (interrupted / "checkpoints" / "K5" / "state-4.json").exists()  # the last checkpoint before the kill
    assert not (interrupted / "results.json").exists()

    # The uninterrupted reference (after the 1st run prepared the data: no two tfds builds at once),
    # and the 2nd run of the same command, side by side.
    reference_log = tmp_path / "uninterrupted.log"
    reference = program_runs.start(_resume_command(tmp_path, uninterrupted), reference_log)
    try:
        program_runs.finish(program_runs.start(command, log), log)
        program_runs.finish(reference, reference_log)
    finally:
        if reference.poll() is None:
            reference.kill()
    text = log.read_text()
    assert "K=1: finished earlier" in text
    assert "resuming K=5 at hyper-iteration 4/12" in text

    resumed = json.loads((interrupted / "results.json").read_text())
    expected = json.loads((uninterrupted / "results.json").read_text())
    assert set(resumed["runs"]) == set(expected["runs"]) == {"1", "5"}
    for k in ("1", "5"):
        assert len(resumed["runs"][k]["curves"]["val_loss"]) == 13  # λ_0 … λ_12, none lost or repeated
        assert _without_timings(resumed["runs"][k]) == _without_timings(expected["runs"][k]), k
        assert len(resumed["runs"][k]["timing"]["interleaved"]["wall_seconds"]) == 2  # timing ran for a skipped K too
    assert resumed["runs"]["5"]["timing"]["process_starts"] == [0, 4]
    assert expected["runs"]["5"]["timing"]["process_starts"] == [0]
    # λ_R and Adam's state (iteration counter, learning rate, moments), bit for bit.
    for k in (1, 5):
        got, want = _final_lambda(interrupted, k), _final_lambda(uninterrupted, k)
        assert set(got) == set(want) and "hparams/.ATTRIBUTES/VARIABLE_VALUE" in got and len(got) == 5
        for name in want:
            assert np.array_equal(got[name], want[name]), f"K={k} {name}: max |Δ| = {np.max(np.abs(got[name] - want[name]))}"
        assert int(got["optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"]) == 12


def test_checkpoints_of_another_configuration_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 20, 6
    arrays = {"x_train": rng.normal(size=(n, d)).astype(np.float32), "y_train": rng.integers(0, 10, n),
              "x_val": rng.normal(size=(n, d)).astype(np.float32), "y_val": rng.integers(0, 10, n),
              "corrupted": rng.random(n) < 0.5, "replaced": rng.random(n) < 0.5}
    cfg = H.Config(output_dir=str(tmp_path), truncate=[1, 5], n_train=n, n_val=n, save_every=4).validated()
    root = H.prepare_checkpoints(cfg, arrays)
    assert root == tmp_path / "checkpoints" and (root / "fingerprint.json").exists()
    # What cannot change a K's numbers may change: the K list, timing, memory, the data's location.
    same = H.Config(output_dir=str(tmp_path), truncate=[25], n_train=n, n_val=n, save_every=10,
                    timing_rounds=0, measure_memory=False, local_dir="/elsewhere").validated()
    assert H.prepare_checkpoints(same, arrays) == root
    with pytest.raises(H.SettingsMismatchError) as err:
        H.prepare_checkpoints(H.Config(**{**vars(cfg), "inner_lr": 0.5}).validated(), arrays)
    message = str(err.value)
    assert str(root) in message and "inner_lr: 1.0 then, 0.5 now" in message and "--output_dir" in message
    # Other data (one label flipped) under the same flags: refused too.
    other = dict(arrays, y_train=np.where(np.arange(n) == 0, (arrays["y_train"] + 1) % 10, arrays["y_train"]))
    with pytest.raises(H.SettingsMismatchError, match="data_sha256"):
        H.prepare_checkpoints(cfg, other)
    # --save_every=0: no checkpoints, nothing checked.
    assert H.prepare_checkpoints(H.Config(**{**vars(cfg), "inner_lr": 0.5, "save_every": 0}).validated(),
                                 arrays) is None


def test_the_data_entries_of_the_fingerprint_are_the_ones_data_settings_names(tmp_path, monkeypatch):
    """DATA_SETTINGS (checked later than the flags) and the entries prepare_checkpoints reads from
    the data are written in two places: a key added in one only fails here, loudly, not as a
    false SettingsMismatchError on resume."""
    cfg = H.Config(output_dir=str(tmp_path), truncate=[1], n_train=20, n_val=20, save_every=4).validated()
    arrays = {"x_train": np.zeros((20, 6), np.float32), "y_train": np.zeros(20, int), "x_val": np.zeros((20, 6), np.float32),
              "y_val": np.zeros(20, int), "corrupted": np.zeros(20, bool), "replaced": np.zeros(20, bool)}
    assert H.prepare_checkpoints(cfg, arrays) is not None  # the two agree as written
    monkeypatch.setattr(H, "DATA_SETTINGS", H.DATA_SETTINGS + ("n_val_data",))
    with pytest.raises(AssertionError, match=r"DATA_SETTINGS names .*n_val_data.*keep the two the same"):
        H.prepare_checkpoints(cfg, arrays)


def test_other_flags_are_refused_before_the_data_is_loaded(tmp_path, monkeypatch):
    """The checkpoints' fingerprint holds a hash of the data, checked once it is loaded; the flags'
    part is checked before the load (minutes on a busy machine): a rerun with another flag fails
    first, before the data reader runs (here it would fail: no data in local_dir)."""
    from experiments.data.tfds_offline import DataUnavailableError

    monkeypatch.setenv("TF_BILEVEL_OFFLINE", "1")
    rng = np.random.default_rng(0)
    n, d = 20, 6
    arrays = {"x_train": rng.normal(size=(n, d)).astype(np.float32), "y_train": rng.integers(0, 10, n),
              "x_val": rng.normal(size=(n, d)).astype(np.float32), "y_val": rng.integers(0, 10, n),
              "corrupted": rng.random(n) < 0.5, "replaced": rng.random(n) < 0.5}
    empty = tmp_path / "no_mnist"
    empty.mkdir()
    cfg = H.Config(output_dir=str(tmp_path / "out"), truncate=[1, 5], n_train=n, n_val=n, save_every=4,
                   local_dir=str(empty), data_dir=str(tmp_path / "tfds")).validated()
    with pytest.raises(DataUnavailableError):  # a fresh folder: nothing to check, the reader runs
        H.load_data(cfg)
    root = H.prepare_checkpoints(cfg, arrays)
    with pytest.raises(H.SettingsMismatchError, match=r"inner_lr: 1.0 then, 0.5 now.*--restart") as err:
        H.load_data(H.Config(**{**vars(cfg), "inner_lr": 0.5}).validated())
    assert str(root) in str(err.value) and "data_sha256" not in str(err.value)
    with pytest.raises(DataUnavailableError):  # the same flags: on to the data (whose hash comes later)
        H.load_data(cfg)
    with pytest.raises(DataUnavailableError):  # --save_every=0: no checkpoints, nothing checked
        H.load_data(H.Config(**{**vars(cfg), "inner_lr": 0.5, "save_every": 0}).validated())
