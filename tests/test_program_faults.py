"""The experiment programs under faults (issue #8): two runs on one --output_dir, damaged state
files, unusable output folders.

* In process, against the state writers and readers (tf_bilevel/resume.py, experiments/common/run_state.py,
  the readers of each program): concurrent atomic writers never collide; the output folder lock
  refuses a second holder naming the folder and the PID; a program's settings mismatch is
  `tfb.SettingsMismatchError`, and fingerprints written before the library owned them still
  resume; damaged JSON state and damaged TF checkpoints and Keras backups (truncated, garbage,
  missing) are StateFileErrors naming the file and the fix, never a restored value.
* The programs as subprocesses (tests/program_runs.py), one damaged-state case per program for the
  one-line-error contract (`<program>: error: <file> is damaged ... --restart`, no traceback); a
  second run on the folder of a running one is refused while the first completes; an output
  folder under a regular file (benchmark) or read-only (toy) is one line.
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
import tf_bilevel as tfb  # noqa: E402
from tf_bilevel import resume  # noqa: E402
from experiments import hypercleaning as H  # noqa: E402
from experiments.common import keras_resume  # noqa: E402
from experiments.common import run_state  # noqa: E402
from experiments import task_interaction as TI  # noqa: E402
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
    assert (path.stat().st_mode & 0o777) == 0o666 & ~resume._UMASK  # not mkstemp's 0600


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
        probe = ("import sys; sys.path.insert(0, sys.argv[2]); from experiments.common import run_state\n"
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


def test_a_programs_settings_mismatch_is_the_librarys_error(tmp_path):
    assert run_state.SettingsMismatchError is H.SettingsMismatchError is tfb.SettingsMismatchError
    assert run_state.StateFileError is tfb.StateFileError
    run_state.guard_settings(tmp_path, {"lr": 0.1, "seed": 0})
    try:
        run_state.guard_settings(tmp_path, {"lr": 0.2, "seed": 0})
    except tfb.SettingsMismatchError as err:
        message = str(err)
    else:
        pytest.fail("a program's guard accepted other settings")
    assert message.startswith(f"{tmp_path} holds the state of a run with other settings (lr: 0.1 then, 0.2 now)")
    assert "--output_dir" in message and "--restart" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fingerprint.json"]  # the programs' file name


def test_fingerprint_written_before_the_library_owned_it_still_resumes(tmp_path):
    """Output folders keep fingerprint.json: one written by the programs' own guard (json.dump,
    mode 0600 of mkstemp) is read back by the library's, so a run from before this change resumes."""
    settings = {"outer_lr": 0.01, "truncate": ["1", "full"], "trials": 2}
    path = tmp_path / "fingerprint.json"
    path.write_text(json.dumps(settings))
    path.chmod(0o600)
    run_state.guard_settings(tmp_path, {**settings, "truncate": ("1", "full")})  # tuples read back as lists
    with pytest.raises(tfb.SettingsMismatchError, match="trials: 2 then, 3 now"):
        run_state.guard_settings(tmp_path, {**settings, "trials": 3})
    assert json.loads(path.read_text()) == settings  # never rewritten


def _hypercleaning_arrays(n: int = 20, d: int = 6) -> dict:
    rng = np.random.default_rng(0)
    return {"x_train": rng.normal(size=(n, d)).astype(np.float32), "y_train": rng.integers(0, 10, n),
            "x_val": rng.normal(size=(n, d)).astype(np.float32), "y_val": rng.integers(0, 10, n),
            "corrupted": rng.random(n) < 0.5, "replaced": rng.random(n) < 0.5}


def test_hypercleaning_checkpoints_of_the_earlier_layout_are_refused_by_name(tmp_path):
    """Hypercleaning's checkpoints became tfb.HyperStepCheckpoints (λ saved as "hparams", not
    "lam"): a folder of the earlier layout is a settings mismatch naming checkpoint_format and
    --restart, not a 'damaged checkpoint'."""
    arrays = _hypercleaning_arrays()
    cfg = H.Config(output_dir=str(tmp_path), truncate=[1], n_train=20, n_val=20, save_every=4).validated()
    root = H.prepare_checkpoints(cfg, arrays)
    fingerprint = json.loads((root / "fingerprint.json").read_text())
    assert fingerprint.pop("checkpoint_format") == 2
    (root / "fingerprint.json").write_text(json.dumps(fingerprint))  # as the earlier layout wrote it
    with pytest.raises(tfb.SettingsMismatchError) as err:
        H.prepare_checkpoints(cfg, arrays)
    assert "checkpoint_format: None then, 2 now" in str(err.value) and "--restart" in str(err.value)


_RECORD = {"outer_lr": 0.5, "unit_lr_first_update_norm": 1.0, "initial_hypergrad_norm": 1.0, "curves": {},
           "test_iterations": [], "test_accuracy": [], "exact_iterations": [], "exact_hypergrad_norm": [],
           "exact_hypergradient_seconds": 0.0, "elapsed_seconds": 0.0, "process_starts": [0]}


def _hypercleaning_checkpoint(root: Path) -> tuple:
    """(K=3's store, its HyperStepCheckpoint, λ): a HyperStep as hypercleaning builds one (λ of 50
    examples, Keras Adam), not run: its counter is set to the hyper-iterations 'done'."""
    store = H.truncation_store(root, 3)
    hg = tfb.hypergradient_fn(lambda w, lam: tf.reduce_sum(tf.sigmoid(lam)) * tf.reduce_sum(w**2),
                              lambda w, lam: tf.reduce_sum(w), steps=1, learning_rate=0.1, jit_compile=False)
    step = tfb.HyperStep(hg, tf.Variable(tf.range(50, dtype=tf.float32)), keras.optimizers.Adam(0.1))
    return store, store.checkpoint(step), step.hparams


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("name", ["ckpt-4.index", "ckpt-4.data-00000-of-00001", "checkpoint", "state-4.json"])
def test_damaged_hypercleaning_checkpoint_is_named_never_restored(tmp_path, name, damage):
    """TF checksums the checkpoint's index and data: damage raises (OpError, IndexError), which
    must come out as a StateFileError naming the K's folder, never as a restored λ."""
    store, checkpoint, _ = _hypercleaning_checkpoint(tmp_path)
    checkpoint.hyper_step.iterations.assign(4)
    checkpoint.save(_RECORD)
    DAMAGE[damage](store.directory / name)
    lam = None
    with pytest.raises(run_state.StateFileError) as err:
        assert store.latest_state() is not None  # read before the step is built (it holds η0)
        _, fresh, lam = _hypercleaning_checkpoint(tmp_path)
        lam.assign(tf.zeros([50]))
        fresh.restore()
    message = str(err.value)
    assert str(store.directory) in message and f"delete {store.directory} to rerun K=3" in message
    assert "--restart" in message
    assert (name.split(".")[0] if name.startswith("ckpt") else name) in message
    if lam is not None:
        assert not np.any(lam.numpy())  # nothing restored


def test_hypercleaning_checkpoint_round_trip_missing_sidecar_and_damaged_result(tmp_path):
    store, checkpoint, _ = _hypercleaning_checkpoint(tmp_path)
    checkpoint.hyper_step.iterations.assign(4)
    checkpoint.save(_RECORD)
    _, fresh, fresh_lam = _hypercleaning_checkpoint(tmp_path)
    fresh_lam.assign(tf.zeros([50]))
    assert store.latest_state() == _RECORD
    assert fresh.restore() == 4 and fresh.sidecar == _RECORD
    assert np.array_equal(fresh_lam.numpy(), np.arange(50))
    (store.directory / "state-4.json").unlink()
    with pytest.raises(run_state.StateFileError, match="ckpt-4 has no sidecar state-4.json"):
        store.latest_state()
    store.save_result({"truncate": 3, "outer_lr": 0.5, "final": {}, "timing": {}, "curves": {}})
    assert store.result()["truncate"] == 3
    truncate(store.result_path)
    with pytest.raises(run_state.StateFileError, match=f"{store.result_path} is damaged.*delete {store.directory}"):
        store.result()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_task_interaction_row_is_named(tmp_path, damage):
    path = tmp_path / "trial1_1.json"
    path.write_text(json.dumps({key: 1 for key in TI.ROW_KEYS}))
    assert TI.load_stored_run(str(path), 1)["trial"] == 1
    DAMAGE[damage](path)
    with pytest.raises(run_state.StateFileError, match=f"{path} is damaged.*delete it to redo that run.*--restart"):
        TI.load_stored_run(str(path), 1)


def _fitted(backup_dir: Path) -> keras.Model:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    model.fit(np.ones((4, 2), np.float32), np.ones((4, 1), np.float32), epochs=1, verbose=0,
              callbacks=[keras.callbacks.BackupAndRestore(str(backup_dir), delete_checkpoint=False)])
    return model


@pytest.mark.parametrize("name", ["record", "backup", "row", "weights"])
def test_damaged_keras_method_state_is_named(tmp_path, name):
    """experiments/common/keras_resume.py's readers (omniglot, online_hpo, reweighting): a killed
    method's record or backup, a finished method's row or weights, damaged."""
    store = keras_resume.MethodStore(str(tmp_path))
    model = _fitted(Path(store.backup_dir("1")))
    if name == "record":
        path = Path(store.record_path("1"))
        path.write_text(json.dumps({"rec": {"it": [0, 4]}, "step_times": []}))
        truncate(path)
        record = keras_resume.ResumableRecord("method 1", 2, 4, {"it": []}, str(path), store.unfinished_remedy("1"))
        call, fix = (lambda: record.begin(1)), "train this method from the start"
    elif name == "backup":
        path = Path(store.backup_dir("1"))
        truncate(path / "latest.weights.h5")
        backup = store.backup("1")
        backup.set_model(model)
        call, fix = (lambda: backup.on_train_begin()), "train it from the start"
    else:
        store.save("1", model, {"test_accuracy": 0.5})
        path = Path(store.path("1", ".json" if name == "row" else ".weights.h5"))
        garbage(path)
        call, fix = (lambda: store.load("1", model, ["test_accuracy"])), "to train method 1 again"
    with pytest.raises(run_state.StateFileError) as err:
        call()
    assert f"{path} is damaged" in str(err.value) and fix in str(err.value) and "--restart" in str(err.value)


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


def _garbage_state(out: Path, name: str) -> Path:
    """<out>/<name> written as garbage (no run needed: the readers' cases are tested in process;
    here the program's way of reporting one)."""
    path = out / name
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x89\xff\x00garbage")
    return path


@needs_mnist
@pytest.mark.slow
def test_task_interaction_damaged_state_is_one_line(tmp_path, mnist):
    # (--restart discarding it and the run starting: in process, tests/test_program.py.)
    out, tfds, log = tmp_path / "out", tmp_path / "tfds", tmp_path / "log"
    path = _garbage_state(out, "resume/fingerprint.json")
    returncode, output = program_runs.run(_task_interaction(mnist, tfds, out), log)
    program_runs.assert_clear_error(returncode, output, "task_interaction: error:", f"{path} is damaged",
                                    f"delete {out / 'resume'} to start over", "--restart")


@needs_mnist
@pytest.mark.slow
def test_hypercleaning_damaged_state_is_one_line(tmp_path):
    out = tmp_path / "out"
    path = _garbage_state(out, "checkpoints/fingerprint.json")
    # The program reads its state after the data (2000 examples from the 3000 of a slice).
    mnist = write_mnist_subset(MNIST_DIR, tmp_path / "mnist", train=3000, test=500)
    command = ["-m", "experiments.hypercleaning", "--quick", "--truncate=5", "--save_every=4", f"--local_dir={mnist}",
               f"--data_dir={tmp_path / 'tfds'}", f"--output_dir={out}"]
    returncode, output = program_runs.run(command, tmp_path / "log")
    program_runs.assert_clear_error(returncode, output, "hypercleaning: error:", f"{path} is damaged",
                                    f"delete {out / 'checkpoints'}", "--restart")


@needs_mnist
@pytest.mark.slow
def test_omniglot_damaged_state_is_one_line(tmp_path, mnist):
    out = tmp_path / "out"
    path = _garbage_state(out, "resume/1.json")  # method 1 "finished" by an earlier run
    command = ["-m", "experiments.omniglot", "--quick", "--dataset=mnist", f"--local_dir={mnist}", "--truncate=1",
               "--noshort_horizon", "--relerr_truncations=", "--timing_rounds=0", f"--data_dir={tmp_path / 'tfds'}",
               f"--output_dir={out}"]
    returncode, output = program_runs.run(command, tmp_path / "log")
    program_runs.assert_clear_error(returncode, output, "omniglot: error:", f"{path} is damaged",
                                    "to train method 1 again", "--restart")


@pytest.mark.slow
@pytest.mark.parametrize("program", ["benchmark"])
def test_output_dir_under_a_regular_file_is_one_clear_line(tmp_path, program):
    # One subprocess case per program: hypercleaning, omniglot and task_interaction report their
    # damaged state above, toy its read-only folder below; every program maps these errors to the
    # line in one place (experiments/common/program.py), the folder checks are in process above.
    a_file = tmp_path / "results.json"
    a_file.write_text("{}")
    out = a_file / "out"
    command = ["-m", f"experiments.{program}", "--quick", f"--output_dir={out}"]
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
