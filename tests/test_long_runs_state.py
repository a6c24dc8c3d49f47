"""tools/long_runs/state.sh: a run folder saved and restored is the same folder, minus its lock
and KerasTuner's per-trial weights; restore leaves an existing run folder alone."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

STATE_SH = Path(__file__).resolve().parents[1] / "tools" / "long_runs" / "state.sh"


def _state(action: str, runs: Path, store: Path, *names: str) -> str:
    env = dict(os.environ, RUNS_DIR=str(runs), STORE_DIR=str(store))
    done = subprocess.run(["bash", str(STATE_SH), action, *names], env=env, capture_output=True, text=True, check=True)
    return done.stdout


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_save_then_restore_on_a_new_machine_gives_the_run_folder_back(tmp_path):
    runs, store = tmp_path / "runs", tmp_path / "store"
    kept = {
        "online_hpo/resume/fingerprint.json": b'{"epochs": 10}',
        "online_hpo/resume/cnn.krmd_wd.seed0.json": b"{}",
        "online_hpo/tuner/cnn/random_search/trial_00/trial.json": b'{"status": "COMPLETED"}',
        "omniglot_kanji/1-RMD/ckpt-250.index": bytes(range(256)),
    }
    dropped = ["online_hpo/.lock", "online_hpo/tuner/cnn/random_search/trial_00/checkpoint.weights.h5"]
    for name in [*kept, *dropped]:
        (runs / name).parent.mkdir(parents=True, exist_ok=True)
        (runs / name).write_bytes(kept.get(name, b"x"))
    assert "saved online_hpo" in _state("save", runs, store)
    assert _files(store) == kept
    (store / "README.md").write_text("not a run")  # the store's own files are not runs

    new_machine = tmp_path / "new_runs"
    out = _state("restore", new_machine, store)
    assert "restored omniglot_kanji" in out and "restored online_hpo" in out
    assert _files(new_machine) == kept
    assert not (new_machine / "README.md").exists()

    # A second save replaces the snapshot (a deleted file goes); restore never overwrites a run.
    (runs / "online_hpo/resume/cnn.krmd_wd.seed0.json").unlink()
    _state("save", runs, store, "online_hpo")
    assert "online_hpo/resume/cnn.krmd_wd.seed0.json" not in _files(store)
    assert "exists, left as it is" in _state("restore", new_machine, store, "online_hpo")
    assert (new_machine / "online_hpo/resume/cnn.krmd_wd.seed0.json").exists()


@pytest.mark.parametrize("names", [(), ("online_hpo",)])
def test_an_unknown_action_is_refused_by_name(tmp_path, names):
    with pytest.raises(subprocess.CalledProcessError) as failure:
        _state("backup", tmp_path / "runs", tmp_path / "store", *names)
    assert failure.value.returncode == 2 and "unknown action backup" in failure.value.stderr
