"""No lost work (issue #3): a fit killed with SIGKILL and restarted with the same command ends
with the same hyperparameters, bit for bit, as an uninterrupted run; a HyperStepCheckpoint's
sidecar is restored with its checkpoint wherever a kill lands; non-finite hypergradients never
reach λ.

The kill test runs tests/resume_job.py (four fits: the deterministic hypercleaning regime,
the stochastic regime of a stream of few-shot episodes, and online training of a network with BatchNorm and
Dropout on shuffled minibatches, by K-RMD and by forward mode with a learned schedule) six times: an uninterrupted run in the background, and the
same command five times in a row: killed in the middle of each fit in turn (after resuming and
finishing the previous one), and run to the end. The job reports the step it reached in a marker file and waits there, so the
kill lands between two checkpoints, with hyper-iterations done since the last one that must
be redone (and tasks of the stream that must be seen again).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import keras

import tf_bilevel as tfb
from tf_bilevel.keras import losses

import program_runs

REPO = Path(__file__).resolve().parents[1]
JOB = Path(__file__).resolve().with_name("resume_job.py")
FITS = ("hypercleaning", "meta", "online", "online_forward")
EPOCHS, STEPS_PER_EPOCH = 3, 4  # as in resume_job.py
PAUSE_AFTER = 6  # a checkpoint after step 4, killed after step 6: steps 5-6 are lost


def _start(workdir: Path, log: Path, pause: bool) -> subprocess.Popen:
    command = [str(JOB), "--workdir", str(workdir)]
    if pause:
        command += ["--pause_after", ",".join(f"{name}={PAUSE_AFTER}" for name in FITS)]
    return program_runs.start(command, log)


@pytest.mark.slow
def test_fit_killed_and_rerun_with_the_same_command_ends_bit_identical(tmp_path):
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    reference_log, log = tmp_path / "uninterrupted.log", tmp_path / "interrupted.log"
    reference = _start(uninterrupted, reference_log, pause=False)
    try:
        # 1st run: killed after step 6 of the first fit (the last checkpoint holds step 4).
        program_runs.kill_when_paused(_start(interrupted, log, pause=True), interrupted / "hypercleaning.paused", log)
        assert (interrupted / "hypercleaning_backup").is_dir()
        assert not (interrupted / "hypercleaning.npy").exists()
        # 2nd run: resumes and finishes the first fit, killed after step 6 of the second.
        program_runs.kill_when_paused(_start(interrupted, log, pause=True), interrupted / "meta.paused", log)
        assert (interrupted / "hypercleaning.npy").exists() and not (interrupted / "meta.npy").exists()
        # 3rd run: resumes and finishes the second fit, killed after step 6 of the third (online).
        program_runs.kill_when_paused(_start(interrupted, log, pause=True), interrupted / "online.paused", log)
        assert (interrupted / "meta.npy").exists() and not (interrupted / "online.npy").exists()
        # 4th run: resumes the online fit (weights, moving statistics, momentum, λ, stream position) and
        # finishes it, killed after step 6 of the fourth (online, forward mode with a learned schedule).
        program_runs.kill_when_paused(_start(interrupted, log, pause=True), interrupted / "online_forward.paused", log)
        assert (interrupted / "online.npy").exists() and not (interrupted / "online_forward.npy").exists()
        # 5th run: resumes the forward-mode fit (also its tangents and the schedule's global step) and finishes.
        program_runs.finish(_start(interrupted, log, pause=True), log)
        program_runs.finish(reference, reference_log)
    finally:
        if reference.poll() is None:
            reference.kill()

    for name in FITS:
        resumed = np.load(interrupted / f"{name}.npy")
        expected = np.load(uninterrupted / f"{name}.npy")
        assert resumed.dtype == np.float32 and resumed.size > 1
        assert np.array_equal(resumed, expected), f"{name}: max |Δλ| = {np.max(np.abs(resumed - expected))}"
        assert np.array_equal(np.load(interrupted / f"{name}_optimizer.npy"), np.load(uninterrupted / f"{name}_optimizer.npy"))
        summary = json.loads((interrupted / f"{name}.json").read_text())
        reference_summary = json.loads((uninterrupted / f"{name}.json").read_text())
        assert summary["meta_step"] == summary["optimizer_iterations"] == EPOCHS * STEPS_PER_EPOCH
        assert reference_summary["epochs_run"] == EPOCHS
        assert summary["epochs_run"] == EPOCHS - 1  # resumed after the checkpointed epoch
        assert summary["last_epoch_loss"] == reference_summary["last_epoch_loss"]
        if name.startswith("online"):  # the global inner step of a schedule: T per hyper-iteration, resumed
            assert summary["inner_steps_done"] == reference_summary["inner_steps_done"] == 3 * EPOCHS * STEPS_PER_EPOCH
        assert not (interrupted / f"{name}_backup").exists()  # BackupAndRestore cleans up after a finished fit
    assert "hypercleaning: finished earlier" in log.read_text()


# ------------------------------------------------------------------------------------
# tfb.HyperStepCheckpoint's JSON sidecar (the mechanism behind experiments/hypercleaning.py,
# whose kill test is in test_hypercleaning.py): values restored together were saved together.
# ------------------------------------------------------------------------------------
def _hyper_step() -> tfb.HyperStep:
    hg = tfb.hypergradient_fn(lambda w, lam: 0.5 * tf.reduce_sum((w - 1.0) ** 2) + 0.5 * tf.exp(lam) * tf.reduce_sum(w**2),
                              lambda w, lam: 0.5 * tf.reduce_sum((w - 2.0) ** 2), steps=3, learning_rate=0.3,
                              jit_compile=False)
    return tfb.HyperStep(hg, tf.constant(0.5), tfb.adam(0.1))


def _run_with_sidecar(directory, steps: int, *, kill_before_checkpoint_at: int = -1, max_to_keep: int = 1):
    """A fresh step and checkpoint (as in a new process) resumed from `directory` and run to
    `steps` hyper-steps with the outer values in the sidecar, saving after every one;
    `kill_before_checkpoint_at=k`: dies after writing the sidecar of k, before its checkpoint."""
    step = _hyper_step()
    ckpt = tfb.HyperStepCheckpoint(directory, step, sidecar_keys=["values"], max_to_keep=max_to_keep)
    done = ckpt.restore()
    values = list(ckpt.sidecar["values"]) if done else []
    assert len(values) == done
    for k in range(done, steps):
        values.append(float(step(tf.zeros([2])).outer_value))
        if k + 1 == kill_before_checkpoint_at:
            ckpt.manager.save = lambda **kwargs: (_ for _ in ()).throw(KeyboardInterrupt("killed"))
        ckpt.save({"values": values})
    return step, values, done


def test_sidecar_is_restored_with_its_checkpoint_wherever_a_kill_lands(tmp_path):
    reference, expected, _ = _run_with_sidecar(tmp_path / "reference", 6)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # the sidecar of 3 is written, ckpt-3 is not
        _run_with_sidecar(run, 6, kill_before_checkpoint_at=3)
    assert (run / "state-3.json").exists() and (run / "state-2.json").exists()
    assert tfb.HyperStepCheckpoint.latest_sidecar(run)["values"] == expected[:2]  # ckpt-2's, read before a step exists
    resumed, values, done = _run_with_sidecar(run, 6)
    assert done == 2 and values == expected
    assert np.array_equal(resumed.hparams.numpy(), reference.hparams.numpy())
    assert sorted(p.name for p in run.glob("state-*.json")) == ["state-6.json"]
    # A kill after the checkpoint, before the older sidecar is removed: a stale sidecar is harmless.
    (run / "state-5.json").write_text('{"values": []}')
    assert _run_with_sidecar(run, 6)[1:] == (expected, 6)
    # max_to_keep: each kept checkpoint keeps its sidecar.
    _run_with_sidecar(tmp_path / "two", 4, max_to_keep=2)
    assert sorted(p.name for p in (tmp_path / "two").glob("state-*.json")) == ["state-3.json", "state-4.json"]


def test_sidecar_misuse_and_damage_are_named(tmp_path):
    ckpt = tfb.HyperStepCheckpoint(tmp_path, _hyper_step(), sidecar_keys=["values"])
    with pytest.raises(ValueError, match="sidecar=...\\) needs a dict exactly when"):
        ckpt.save()
    with pytest.raises(ValueError, match="lacks the keys \\['values'\\]"):
        ckpt.save({"other": 1})
    with pytest.raises(ValueError, match="needs a dict exactly when"):
        tfb.HyperStepCheckpoint(tmp_path / "plain", _hyper_step()).save({"values": []})
    with pytest.raises(TypeError, match="sidecar_keys=...\\) must be a list of keys"):
        tfb.HyperStepCheckpoint(tmp_path, _hyper_step(), sidecar_keys="values")
    ckpt.save({"values": [1.0]})
    (tmp_path / "state-0.json").write_text('{"values": [1.0')
    with pytest.raises(tfb.StateFileError, match=f"state-0.json is damaged .not valid JSON.*delete {tmp_path} to start over"):
        tfb.HyperStepCheckpoint(tmp_path, _hyper_step(), sidecar_keys=["values"]).restore()
    (tmp_path / "state-0.json").unlink()
    with pytest.raises(tfb.StateFileError, match=r"ckpt-0 has no sidecar state-0.json\). To go on: start afresh"):
        tfb.HyperStepCheckpoint(tmp_path, _hyper_step(), sidecar_keys=["values"], remedy="start afresh").restore()
    # The library's settings file, damaged: named, with the folder to delete (not the file alone).
    tfb.guard_settings(tmp_path / "guarded", {"lr": 0.1})
    (tmp_path / "guarded" / "settings.json").write_text("{")
    with pytest.raises(tfb.StateFileError, match=f"settings.json is damaged.*delete {tmp_path / 'guarded'} to start over"):
        tfb.guard_settings(tmp_path / "guarded", {"lr": 0.1})


# ------------------------------------------------------------------------------------
# trainer.resumable: where the stream starts.
# ------------------------------------------------------------------------------------
def _trainer(**kwargs):
    ce = losses.sparse_categorical_crossentropy
    return tfb.BilevelTrainer(keras.Sequential([keras.layers.Dense(2)]),
                              **{"inner_loss": ce, "outer_loss": ce, "steps": 2, "hyperparameters": {"a": 1.0},
                                 "inner_regularizer": lambda w, hp: 0.01 * hp["a"] * tf.reduce_sum(tf.square(w[0])),
                                 **kwargs})


def test_resumable_stream_starts_at_meta_step_when_iterated_not_when_built():
    trainer = _trainer()
    tasks = tf.data.Dataset.range(100)
    from_dataset = trainer.resumable(tasks)
    from_index = trainer.resumable(lambda start: tf.data.Dataset.range(start * 10, 10**6, 10))
    trainer.meta_step.assign(7)  # e.g. restored by BackupAndRestore after the datasets were built
    assert [int(x) for x in from_dataset.take(3)] == [7, 8, 9]
    assert [int(x) for x in from_index.take(2)] == [70, 80]
    trainer.meta_step.assign(0)
    assert int(next(iter(from_dataset))) == 0
    with pytest.raises(TypeError, match="resumable\\(tasks\\): tasks must be a tf.data.Dataset"):
        trainer.resumable([1, 2, 3])


def _indexed_task(i):
    x = tf.random.stateless_normal([6, 3], seed=tf.stack([i, 0]))
    return (x, tf.constant([0, 1, 0, 1, 0, 1])), (x + 0.1, tf.constant([0, 1, 0, 1, 0, 1]))


def test_resumable_stream_feeds_the_first_step_the_task_at_meta_step():
    """The increment of meta_step in a step must not overtake the stream's read of it (a race
    that started resumed streams one element late, nondeterministically)."""
    tasks = tf.data.Dataset.range(100).map(_indexed_task)
    losses_by_stream = []
    for resumed in (True, False):
        keras.utils.set_random_seed(5)
        trainer = _trainer()
        trainer.compile(optimizer=keras.optimizers.SGD(0.1))
        trainer.build_from_spec(tasks.element_spec)
        if resumed:
            trainer.meta_step.assign(3)  # as restored by BackupAndRestore
        stream = trainer.resumable(tasks) if resumed else tasks.skip(3)
        history = trainer.fit(stream, epochs=3, steps_per_epoch=1, verbose=0)
        losses_by_stream.append(history.history["loss"])
    assert losses_by_stream[0] == losses_by_stream[1]
    assert len(set(losses_by_stream[0])) == 3  # the three tasks differ


# ------------------------------------------------------------------------------------
# Non-finite hypergradient with finite losses (test_trainer.py covers a NaN inner loss,
# raise, and a NaN outer loss, skip).
# ------------------------------------------------------------------------------------
def _sqrt_penalty_trainer(on_nonfinite):
    # g = CE + √a·‖W‖² at a = 0: g, w_T and f are finite, but d∇_w g/da = W/√a is not, so
    # the hypergradient with respect to a is non-finite.
    trainer = _trainer(hyperparameters={"a": 0.0, "b": 1.0}, on_nonfinite=on_nonfinite,
                       inner_regularizer=lambda w, hp: tf.sqrt(hp["a"]) * tf.reduce_sum(tf.square(w[0])),
                       inner_loss=lambda y, p, hp: hp["b"] * losses.sparse_categorical_crossentropy(y, p))
    trainer.compile(optimizer=keras.optimizers.SGD(0.1))
    return trainer


_DATA = tf.data.Dataset.from_tensors(
    ((tf.ones([4, 3]), tf.constant([0, 1, 0, 1])), (tf.ones([4, 3]), tf.constant([0, 1, 0, 1])))).repeat(3)


def test_nonfinite_hypergradient_raises_naming_the_step_and_leaves_hyperparameters_untouched():
    trainer = _sqrt_penalty_trainer("raise")
    trainer.build_from_spec(_DATA.element_spec)
    before = [v.numpy().copy() for v in trainer.hyper_variables]
    with pytest.raises(tfb.NonFiniteError, match=r"hyper-iteration 0 .*hypergradient is non-finite"):
        trainer.fit(_DATA, verbose=0)
    for value, variable in zip(before, trainer.hyper_variables):
        np.testing.assert_array_equal(value, variable.numpy())
    assert trainer.optimizer.iterations.numpy() == 0


def test_nonfinite_hypergradient_update_is_skipped_when_asked():
    trainer = _sqrt_penalty_trainer("skip")
    history = trainer.fit(_DATA, verbose=0)
    assert history.history["skipped_updates"] == [3.0]
    assert trainer.optimizer.iterations.numpy() == 0 and trainer.meta_step.numpy() == 3
    assert all(np.all(np.isfinite(v.numpy())) for v in trainer.hyper_variables)
