"""The experiment programs under faults (issue #8): two runs on one --output_dir, damaged state
files, unusable output folders.

* experiments/run_state.py in-process: concurrent atomic writers never collide, the output
  folder lock refuses a second holder naming the folder and the PID, damaged JSON state and
  damaged TF checkpoints (truncated, garbage) are StateFileErrors naming the file.
* The programs as subprocesses (tests/program_runs.py): a second run on the folder of a running
  one is refused while the first completes; each kind of state file truncated or overwritten
  with garbage ends the rerun with one line naming the file and the fix, never a traceback;
  --restart starts over; an output folder under a regular file or read-only is one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import keras

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `experiments` is not an installed package.
from experiments import hypercleaning as H  # noqa: E402
from experiments import run_state  # noqa: E402
from offline_data import MNIST_DIR, HAVE_MNIST, needs_mnist, write_mnist_subset  # noqa: E402
import program_runs  # noqa: E402


def truncate(path: Path) -> None:
    """Cuts the file to half its size (a write killed half-way)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path) -> None:
    """Overwrites the file with as many random bytes (a disk or a program gone wrong)."""
    path.write_bytes(np.random.default_rng(0).bytes(max(path.stat().st_size, 16)))


DAMAGE = {"truncated": truncate, "garbage": garbage}


# ------------------------------------------------------------------------------------
# run_state, in process.
# ------------------------------------------------------------------------------------
def test_concurrent_atomic_writers_of_one_file_never_collide(tmp_path):
    """With one shared temporary name (<path>.partial) concurrent writers removed each other's
    file (FileNotFoundError); with unique names every write lands whole."""
    path = tmp_path / "state.json"
    values = [{"writer": i, "payload": list(range(2000))} for i in range(6)]
    errors = []

    def write_many(value):
        try:
            for _ in range(40):
                run_state.write_json_atomically(path, value)
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=write_many, args=(v,)) for v in values]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    assert json.loads(path.read_text()) in values
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temporaries left
    assert (path.stat().st_mode & 0o777) == 0o666 & ~run_state._UMASK  # not mkstemp's 0600


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "result.json"
    run_state.write_json_atomically(path, {"old": 1})
    with pytest.raises(TypeError):
        run_state.write_json_atomically(path, {"not json": object()})
    assert json.loads(path.read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    # The temporary name ends like the target: Keras' ".weights.h5" check passes.
    seen = []
    run_state.write_atomically(tmp_path / "m.weights.h5", lambda t: (seen.append(t), Path(t).write_bytes(b"w")))
    assert seen[0].endswith("-m.weights.h5") and Path(seen[0]).name.startswith(".tmp-")
    assert (tmp_path / "m.weights.h5").read_bytes() == b"w"


@pytest.mark.slow
def test_output_dir_lock_refuses_a_second_run_naming_the_folder_and_the_pid(tmp_path):
    out = tmp_path / "out"
    with run_state.exclusive_output_dir(out, "test"):
        assert f"PID {os.getpid()}: test" in (out / ".lock").read_text()
        # Another process (the real case) and this one again (flock: per open file) are refused.
        probe = ("import sys; sys.path.insert(0, sys.argv[2]); from experiments import run_state\n"
                 "try:\n    run_state.exclusive_output_dir(sys.argv[1], 'probe').__enter__()\n"
                 "except run_state.OutputDirError as err:\n    print(err); sys.exit(2)\n")
        done = subprocess.run([sys.executable, "-c", probe, str(out), str(REPO)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2, done.stderr
        assert str(out) in done.stdout and f"PID {os.getpid()}" in done.stdout and "another --output_dir" in done.stdout
        with pytest.raises(run_state.OutputDirError, match=f"in use by another run .PID {os.getpid()}"):
            with run_state.exclusive_output_dir(out, "again"):
                pass
    with run_state.exclusive_output_dir(out, "after"):  # released at the end of the block
        assert "after" in (out / ".lock").read_text()


def test_unusable_output_dir_is_one_clear_error(tmp_path, monkeypatch):
    a_file = tmp_path / "results.json"
    a_file.write_text("{}")
    for path in (a_file, a_file / "sub" / "dir"):
        with pytest.raises(run_state.OutputDirError, match=f"--output_dir={path} cannot be used: {a_file} is a file"):
            with run_state.exclusive_output_dir(path, "test"):
                pass
    read_only = tmp_path / "read_only"
    read_only.mkdir()

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(run_state.os, "open", refuse)  # as for a read-only folder, even as root
    with pytest.raises(run_state.OutputDirError, match="read_only cannot be used: Permission denied"):
        with run_state.exclusive_output_dir(read_only, "test"):
            pass


@pytest.mark.parametrize("content, problem", [
    (b'{"a": 1, "b": [1, 2', "not valid JSON"), (b"\x89\xff\x00garbage", "not valid JSON"), (b"", "empty"),
    (b"[1, 2]", "a JSON list"), (b'{"a": 1}', "no 'b'")])
def test_read_state_json_names_the_file_the_problem_and_the_remedy(tmp_path, content, problem):
    path = tmp_path / "state-4.json"
    path.write_bytes(content)
    with pytest.raises(run_state.StateFileError) as err:
        run_state.read_state_json(path, "delete it", required=("a", "b"))
    assert str(err.value).startswith(f"{path} is damaged (") and problem in str(err.value)
    assert str(err.value).endswith("To go on: delete it.")


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_fingerprint_says_delete_the_state_folder_not_the_file(tmp_path, damage):
    run_state.guard_settings(tmp_path, {"--lr": 0.1})
    DAMAGE[damage](tmp_path / "fingerprint.json")
    with pytest.raises(run_state.StateFileError) as err:
        run_state.guard_settings(tmp_path, {"--lr": 0.1})
    # Deleting the fingerprint alone would let a run with other settings adopt the state.
    assert "fingerprint.json is damaged" in str(err.value) and f"delete {tmp_path} to start over" in str(err.value)
    assert "--restart" in str(err.value)


_STATE = {"outer_lr": 0.5, "unit_lr_first_update_norm": 1.0, "initial_hypergrad_norm": 1.0, "curves": {},
          "test_iterations": [], "test_accuracy": [], "exact_iterations": [], "exact_hypergrad_norm": [],
          "exact_hypergradient_seconds": 0.0, "elapsed_seconds": 0.0, "process_starts": [0]}


def _checkpointed_store(root: Path) -> tuple:
    store = H.TruncationCheckpoint(root, 3)
    lam = tf.Variable(tf.range(50, dtype=tf.float32))
    optimizer = keras.optimizers.Adam(0.1)
    optimizer.build([lam])
    store.attach(lam, optimizer)
    return store, lam, optimizer


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("name", ["ckpt-4.index", "ckpt-4.data-00000-of-00001", "checkpoint", "state-4.json"])
def test_damaged_hypercleaning_checkpoint_is_named_never_restored(tmp_path, name, damage):
    """TF checksums the checkpoint's index and data: damage raises (OpError, IndexError), which
    must come out as a StateFileError naming the K's folder, never as a restored λ."""
    store, _, _ = _checkpointed_store(tmp_path)
    store.save(4, _STATE)
    DAMAGE[damage](store.directory / name)
    fresh, lam, _ = (None, None, None)
    with pytest.raises(run_state.StateFileError) as err:
        fresh, lam, _ = _checkpointed_store(tmp_path)
        state = fresh.latest_state()
        fresh.restore(state["hyper_iteration"])
    message = str(err.value)
    assert str(store.directory) in message and f"delete {store.directory} to rerun K=3" in message
    assert (name.split(".")[0] if name.startswith("ckpt") else name) in message
    if lam is not None:
        assert np.array_equal(lam.numpy(), np.arange(50))  # nothing restored


def test_hypercleaning_checkpoint_round_trip_and_missing_sidecar(tmp_path):
    store, lam, optimizer = _checkpointed_store(tmp_path)
    store.save(4, _STATE)
    fresh, fresh_lam, _ = _checkpointed_store(tmp_path)
    fresh_lam.assign(tf.zeros([50]))
    assert fresh.latest_state()["hyper_iteration"] == 4
    fresh.restore(4)
    assert np.array_equal(fresh_lam.numpy(), np.arange(50))
    (store.directory / "state-4.json").unlink()
    with pytest.raises(run_state.StateFileError, match="ckpt-4 has no sidecar state-4.json"):
        fresh.latest_state()


# ------------------------------------------------------------------------------------
# The programs, as subprocesses.
# ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> Path:
    if not HAVE_MNIST:
        pytest.skip(f"no MNIST IDX .gz files in {MNIST_DIR} (set TF_BILEVEL_MNIST_DIR)")
    return write_mnist_subset(MNIST_DIR, tmp_path_factory.mktemp("mnist") / "subset", train=1500, test=300)


def _task_interaction(mnist: Path, tfds: Path, out: Path, *extra: str) -> list:
    return ["-m", "experiments.task_interaction", "--quick", "--dataset=mnist", "--features=pixels",
            f"--local_dir={mnist}", f"--data_dir={tfds}", f"--output_dir={out}", *extra]


@needs_mnist
@pytest.mark.slow
def test_second_run_on_the_output_dir_of_a_running_one_is_refused_and_the_first_completes(tmp_path, mnist):
    """The first run waits (--pause_after) in the middle of its work, holding the folder; the
    second, with other settings, is refused at once naming the folder and the first's PID,
    and writes nothing; the first then goes on and ends with its own settings and results."""
    out, tfds = tmp_path / "out", tmp_path / "tfds"
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = program_runs.start(_task_interaction(mnist, tfds, out, "--pause_after=0,1"), first_log)
    try:
        marker = out / "resume" / "paused_0_1"
        program_runs.wait_for(first, marker, first_log)
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        returncode, output = program_runs.run(_task_interaction(mnist, tfds, out, "--outer_lr=0.5"), second_log)
        program_runs.assert_clear_error(returncode, output, "task_interaction: error:", f"--output_dir={out}",
                                        f"PID {first.pid}", "in use by another run")
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # the second wrote nothing
        Path(f"{marker}.continue").touch()
        program_runs.finish(first, first_log)
    finally:
        if first.poll() is None:
            first.kill()
    fingerprint = json.loads((out / "resume" / "fingerprint.json").read_text())
    assert fingerprint["outer_lr"] == 0.01  # the first's (the default), not the refused 0.5
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["outer_lr"] == 0.01
    assert {name: len(rows) for name, rows in results["runs"].items()} == {"1": 2, "full": 2}
    assert "Traceback" not in first_log.read_text()


@pytest.fixture(scope="module")
def task_interaction_state(tmp_path_factory, mnist) -> tuple:
    """(a finished run's output folder, its command's tail): the state every case damages a copy of."""
    root = tmp_path_factory.mktemp("task_interaction")
    tfds, out = root / "tfds", root / "finished"
    program_runs.finish(program_runs.start(_task_interaction(mnist, tfds, out), root / "log"), root / "log")
    return out, mnist, tfds


def _damaged_copy(state: Path, tmp_path: Path, name: str, damage: str) -> tuple[Path, Path]:
    out = tmp_path / "out"
    shutil.copytree(state, out)
    DAMAGE[damage](out / name)
    return out, out / name


@needs_mnist
@pytest.mark.slow
@pytest.mark.parametrize("name, damage, fix", [
    ("resume/trial1_1.json", "truncated", "delete it to redo that run"),
    ("resume/fingerprint.json", "garbage", "resume to start over")])
def test_task_interaction_damaged_state_is_named_and_restart_recovers(tmp_path, task_interaction_state,
                                                                      name, damage, fix):
    state, mnist, tfds = task_interaction_state
    out, path = _damaged_copy(state, tmp_path, name, damage)
    returncode, output = program_runs.run(_task_interaction(mnist, tfds, out), tmp_path / "log")
    program_runs.assert_clear_error(returncode, output, f"{path} is damaged", fix, "--restart")
    if name.endswith("fingerprint.json"):
        program_runs.finish(program_runs.start(_task_interaction(mnist, tfds, out, "--restart"), tmp_path / "log"),
                            tmp_path / "log")
        expected = json.loads((state / "results.json").read_text())
        results = json.loads((out / "results.json").read_text())
        assert [r["test_acc"] for r in results["runs"]["full"]] == [r["test_acc"] for r in expected["runs"]["full"]]


def _hypercleaning(mnist: Path, tfds: Path, out: Path) -> list:
    return ["-m", "experiments.hypercleaning", "--quick", "--truncate=5", "--save_every=4", "--timing_rounds=0",
            "--nomeasure_memory", f"--local_dir={mnist}", f"--data_dir={tfds}", f"--output_dir={out}"]


@pytest.fixture(scope="module")
def hypercleaning_state(tmp_path_factory) -> tuple:
    if not HAVE_MNIST:
        pytest.skip(f"no MNIST IDX .gz files in {MNIST_DIR} (set TF_BILEVEL_MNIST_DIR)")
    root = tmp_path_factory.mktemp("hypercleaning")
    # --quick draws 1000 + 1000 class-balanced examples: 3000 images have enough of every digit.
    mnist = write_mnist_subset(MNIST_DIR, root / "mnist", train=3000, test=500)
    tfds, out = root / "tfds", root / "finished"
    program_runs.finish(program_runs.start(_hypercleaning(mnist, tfds, out), root / "log"), root / "log")
    return out, mnist, tfds


@needs_mnist
@pytest.mark.slow
@pytest.mark.parametrize("name, damage, unfinished", [
    ("fingerprint.json", "garbage", False),
    ("K5/result.json", "truncated", False),
    ("K5/state-12.json", "garbage", True),
    ("K5/ckpt-12.data-00000-of-00001", "truncated", True),
    ("K5/state-12.json", "missing", True)])  # the "has no sidecar" case
def test_hypercleaning_damaged_state_is_named(tmp_path, hypercleaning_state, name, damage, unfinished):
    """`unfinished`: without result.json, so that the rerun resumes K = 5 from its checkpoint."""
    state, mnist, tfds = hypercleaning_state
    out = tmp_path / "out"
    shutil.copytree(state, out)
    path = out / "checkpoints" / name
    if unfinished:
        (out / "checkpoints" / "K5" / "result.json").unlink()
    if damage == "missing":
        path.unlink()
    else:
        DAMAGE[damage](path)
    returncode, output = program_runs.run(_hypercleaning(mnist, tfds, out), tmp_path / "log")
    folder = out / "checkpoints" if name == "fingerprint.json" else out / "checkpoints" / "K5"
    named = {"missing": "has no sidecar state-12.json", "truncated": "ckpt-12" if "ckpt" in name else str(path)}
    program_runs.assert_clear_error(returncode, output, "hypercleaning: error:", named.get(damage, str(path)),
                                    f"delete {folder}", "--restart")


def _omniglot(mnist: Path, tfds: Path, out: Path, *extra: str) -> list:
    return ["-m", "experiments.omniglot", "--quick", "--dataset=mnist", f"--local_dir={mnist}", "--truncate=1",
            "--noshort_horizon", "--relerr_truncations=", "--timing_rounds=0", f"--data_dir={tfds}",
            f"--output_dir={out}", *extra]


@pytest.fixture(scope="module")
def omniglot_states(tmp_path_factory, mnist) -> tuple:
    """(state of a run killed after hyper-iteration 3 of 4: backup + record; state of a finished run)."""
    root = tmp_path_factory.mktemp("omniglot")
    tfds, out, log = root / "tfds", root / "run", root / "log"
    command = _omniglot(mnist, tfds, out, "--pause_after=1,3")
    program_runs.kill_when_paused(program_runs.start(command, log), out / "resume" / "paused_1_3", log)
    shutil.copytree(out, root / "killed")
    program_runs.finish(program_runs.start(command, log), log)
    return root / "killed", out, mnist, tfds


@needs_mnist
@pytest.mark.slow
@pytest.mark.parametrize("name, damage, killed, fix", [
    ("resume/1.record.json", "truncated", True, "train this method from the start"),
    ("resume/backup/1/latest.weights.h5", "truncated", True, "train it from the start"),
    ("resume/1.json", "garbage", False, "to train method 1 again"),
    ("resume/1.weights.h5", "garbage", False, "to train method 1 again")])
def test_omniglot_damaged_state_is_named(tmp_path, omniglot_states, name, damage, killed, fix):
    killed_state, finished_state, mnist, tfds = omniglot_states
    out, path = _damaged_copy(killed_state if killed else finished_state, tmp_path, name, damage)
    returncode, output = program_runs.run(_omniglot(mnist, tfds, out), tmp_path / "log")
    named = str(path.parent) if "backup" in name else str(path)  # the backup is a folder Keras writes
    program_runs.assert_clear_error(returncode, output, "omniglot: error:", f"{named} is damaged", fix, "--restart")


@pytest.mark.slow
@pytest.mark.parametrize("program", ["hypercleaning", "omniglot", "task_interaction", "toy", "benchmark"])
def test_output_dir_under_a_regular_file_is_one_clear_line(tmp_path, program):
    a_file = tmp_path / "results.json"
    a_file.write_text("{}")
    out = a_file / "out"
    command = ["-m", f"experiments.{program}", "--quick", f"--output_dir={out}"]
    if program == "hypercleaning":
        command.append(f"--local_dir={MNIST_DIR}")
    returncode, output = program_runs.run(command, tmp_path / "log")
    program_runs.assert_clear_error(returncode, output, f"{program}: error: --output_dir={out} cannot be used",
                                    f"{a_file} is a file, not a folder")


@pytest.mark.slow
def test_read_only_output_dir_is_one_clear_line(tmp_path):
    out = tmp_path / "read_only"
    out.mkdir()
    if os.geteuid() == 0:  # root writes into 0555 folders: an immutable folder refuses root too
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(out)]).returncode != 0:
            pytest.skip("as root, a read-only folder needs `chattr +i` (e2fsprogs, CAP_LINUX_IMMUTABLE)")
        unprotect, refusal = ["chattr", "-i", str(out)], "Operation not permitted"
    else:
        out.chmod(0o555)
        unprotect, refusal = None, "Permission denied"
    try:
        returncode, output = program_runs.run(["-m", "experiments.toy", "--quick", f"--output_dir={out}"],
                                              tmp_path / "log")
    finally:
        if unprotect:
            subprocess.run(unprotect, check=True)
        out.chmod(0o755)
    program_runs.assert_clear_error(returncode, output, f"toy: error: --output_dir={out} cannot be used", refusal)
