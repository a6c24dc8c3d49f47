"""tools/long_runs/state.sh: a run folder saved and restored on a new machine is the same folder
(minus its lock and the weights of RandomSearch/Bayesian trials); a save never catches a run in
use, never drops a finished method unasked, and is replaced only as a whole."""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

import pytest

# Not resolved: under Bazel this is the runfiles copy, which must hold the script (test data).
STATE_SH = Path(os.path.abspath(__file__)).parents[1] / "tools" / "long_runs" / "state.sh"

# The programs' own names (experiments/common/keras_resume.py's MethodStore: <method>.json is a
# finished row, with its .weights.h5; an unfinished one has a backup folder and a .record.json;
# KerasTuner: trial_<id>/trial.json and checkpoint.weights.h5).
KEPT = {
    "online_hpo/resume/fingerprint.json": b'{"epochs": 10}',
    "online_hpo/resume/cnn.default_cosine.seed0.json": b"{}",
    "online_hpo/resume/cnn.krmd_wd.seed0.record.json": b"{}",
    "online_hpo/resume/backup/cnn.krmd_wd.seed0/latest.weights.h5": bytes(range(256)),
    "online_hpo/resume/backup/cnn.krmd_wd.seed0/training_metadata.json": b'{"epoch": 3}',
    "online_hpo/tuner/cnn/random_search/trial_00/trial.json": b'{"status": "COMPLETED"}',
    "online_hpo/tuner/cnn/hyperband/trial_0003/trial.json": b'{"status": "COMPLETED"}',
    "online_hpo/tuner/cnn/hyperband/trial_0003/checkpoint.weights.h5": b"promoted trials start here",
    "omniglot_kanji/resume/fingerprint.json": b"{}",
    "omniglot_kanji/resume/1.json": b"{}",
    "omniglot_kanji/resume/1.weights.h5": b"w",
    "omniglot_kanji/resume/10.record.json": b"{}",
    "omniglot_kanji/resume/backup/10/latest.weights.h5": b"w10",
}
DROPPED = ["online_hpo/.lock", "omniglot_kanji/.lock",
           "online_hpo/tuner/cnn/random_search/trial_00/checkpoint.weights.h5",
           "online_hpo/tuner/cnn_bn/bayesian/trial_01/checkpoint.weights.h5"]


def _state(action: str, runs: Path, store: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, RUNS_DIR=str(runs), STORE_DIR=str(store))
    return subprocess.run(["bash", str(STATE_SH), action, *args], env=env, capture_output=True, text=True,
                          check=check, timeout=60)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _make_runs(runs: Path) -> None:
    for name in [*KEPT, *DROPPED]:
        (runs / name).parent.mkdir(parents=True, exist_ok=True)
        (runs / name).write_bytes(KEPT.get(name, b"x"))


def test_save_then_restore_on_a_new_machine_gives_the_run_folders_back(tmp_path):
    runs, store = tmp_path / "runs", tmp_path / "store"
    _make_runs(runs)
    out = _state("save", runs, store).stdout
    assert "saved online_hpo" in out and "saved omniglot_kanji" in out
    assert _files(store) == KEPT
    (store / "README.md").write_text("not a run")  # the store's own files are not runs

    new_machine = tmp_path / "new_runs"
    out = _state("restore", new_machine, store).stdout
    assert "restored omniglot_kanji" in out and "restored online_hpo" in out
    assert _files(new_machine) == KEPT
    # restore never overwrites a run folder
    (store / "online_hpo/resume/extra.json").write_text("{}")
    assert "exists, left as it is" in _state("restore", new_machine, store, "online_hpo").stdout
    assert not (new_machine / "online_hpo/resume/extra.json").exists()


def test_save_refuses_to_drop_a_finished_method_unless_forced(tmp_path):
    runs, store = tmp_path / "runs", tmp_path / "store"
    _make_runs(runs)
    _state("save", runs, store, "online_hpo")
    (runs / "online_hpo/resume/cnn.default_cosine.seed0.json").unlink()  # as in a run started without restore
    (runs / "online_hpo/resume/cnn.krmd_wd.seed0.record.json").unlink()  # an unfinished one may go
    refused = _state("save", runs, store, "online_hpo", check=False)
    assert refused.returncode == 1 and "cnn.default_cosine.seed0.json" in refused.stderr and "--force" in refused.stderr
    assert (store / "online_hpo/resume/cnn.default_cosine.seed0.json").exists()
    _state("save", runs, store, "--force", "online_hpo")
    assert not (store / "online_hpo/resume/cnn.default_cosine.seed0.json").exists()


def test_a_run_in_use_is_not_saved(tmp_path):
    runs, store = tmp_path / "runs", tmp_path / "store"
    _make_runs(runs)
    with open(runs / "online_hpo/.lock", "w") as lock:  # what the program holds while it runs
        lock.write("PID 1: experiments.online_hpo")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused = _state("save", runs, store, "online_hpo", check=False)
    assert refused.returncode == 1 and "in use" in refused.stderr and "state.sh stop" in refused.stderr
    assert not (store / "online_hpo").exists()


def test_stop_ends_the_program_of_a_run_and_waits_for_its_lock(tmp_path):
    runs, store = tmp_path / "runs", tmp_path / "store"
    run = runs / "online_hpo"
    run.mkdir(parents=True)
    # What a program does while it runs: hold the lock, with its output folder on the command line.
    program = subprocess.Popen(["flock", "--close", str(run / ".lock"), "bash", "-c", "echo locked; sleep 60", "program",
                                f"--output_dir={run}"], stdout=subprocess.PIPE, text=True)
    try:
        assert program.stdout.readline().strip() == "locked"
        assert "online_hpo stopped" in _state("stop", runs, store, "online_hpo").stdout
        assert program.wait(timeout=10) != 0
        assert "saved online_hpo" in _state("save", runs, store, "online_hpo").stdout
    finally:
        program.kill()
        program.wait()


def test_an_interrupted_save_leaves_the_last_snapshot_usable(tmp_path):
    runs, store = tmp_path / "runs", tmp_path / "store"
    _make_runs(runs)
    _state("save", runs, store, "omniglot_kanji")
    # Interrupted between the two moves of the swap: only <name>.old, and a half-written <name>.tmp.
    (store / "omniglot_kanji").rename(store / "omniglot_kanji.old")
    (store / "omniglot_kanji.tmp/resume").mkdir(parents=True)
    new_machine = tmp_path / "new_runs"
    out = _state("restore", new_machine, store).stdout
    assert "restored omniglot_kanji" in out and "omniglot_kanji.tmp" not in out
    assert _files(new_machine) == {k: v for k, v in KEPT.items() if k.startswith("omniglot_kanji/")}
    _state("save", runs, store, "omniglot_kanji")
    assert sorted(p.name for p in store.iterdir()) == ["omniglot_kanji"]


def test_restoring_a_missing_snapshot_fails_and_creates_nothing(tmp_path):
    refused = _state("restore", tmp_path / "runs", tmp_path / "store", "online_hpo", check=False)
    assert refused.returncode == 1 and "no snapshot" in refused.stderr
    assert not (tmp_path / "runs" / "online_hpo").exists()


@pytest.mark.parametrize("names", [(), ("online_hpo",)])
def test_an_unknown_action_is_refused_by_name(tmp_path, names):
    refused = _state("backup", tmp_path / "runs", tmp_path / "store", *names, check=False)
    assert refused.returncode == 2 and "unknown action backup" in refused.stderr
