"""A long-running BilevelTrainer job that tests/test_resume.py kills with SIGKILL and restarts.

    python tests/resume_job.py --workdir DIR [--pause_after hypercleaning=6,meta=6]

Four fits run one after the other, each resumable with `keras.callbacks.BackupAndRestore`
(its own directory under DIR, a checkpoint every STEPS_PER_EPOCH hyper-iterations):

* hypercleaning: the deterministic regime, one fixed (training, validation) pair repeated;
  per-example weights σ(λ_i), Adam on λ.
* online: tune while you train (online=True): a network with BatchNormalization and Dropout
  trained by momentum on shuffled minibatches (seeded), T = 3 minibatches per hyper-iteration,
  a learned weight decay; the inner model's weights, its moving statistics and the inner
  optimizer's momentum continue across hyper-iterations and must resume exactly too (they are
  saved with λ).
* meta: the stochastic regime, an endless stream of few-shot episodes (episode i drawn from
  stateless seeds of i) in meta-batches of 2, a hyper model, a learned inner learning rate,
  w0 redrawn per task (seeded by meta_step), Adam on λ. `trainer.resumable(...)` starts the
  stream at the restored meta_step.
* online_forward: the online network trained by forward mode carried across hyper-iterations
  (estimator="forward", forget=0.9) with a learned cosine learning-rate schedule over the run:
  the tangents (trainer variables) and the global inner step must resume exactly too.

Op determinism is on and every seed is fixed, so rerunning the same command after a kill
must end with the same λ, bit for bit, as an uninterrupted run. (Keras 3 compiles without
XLA when op determinism is on, whatever `jit_compile` says.) A finished fit saves
DIR/<fit>.npy (raw λ), DIR/<fit>_optimizer.npy (the outer optimizer's variables) and
DIR/<fit>.json, and is skipped when the job is rerun.

--pause_after FIT=STEP: after hyper-iteration STEP of that fit the job writes
DIR/<fit>.paused and waits to be killed (only once: not if that file exists already), so
that the kill lands at a known step, between two checkpoints, with work lost since the
last one. The same command, rerun, goes past that step.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import tf_bilevel as tfb
from experiments.common.run_state import write_atomically
from tf_bilevel.keras import losses

EPOCHS, STEPS_PER_EPOCH = 3, 4  # 12 hyper-iterations per fit, a checkpoint every 4
PAUSE_SECONDS = 120  # nobody killed the job: exit with an error rather than hang
FITS = ("hypercleaning", "meta", "online", "online_forward")


def _episode(index):
    ways, shots, queries, dim = 3, 2, 3, 5
    index = tf.cast(index, tf.int64)
    centers = tf.random.stateless_normal([ways, dim], seed=tf.stack([index, 0]))
    xs = centers[:, None, :] + 0.5 * tf.random.stateless_normal([ways, shots, dim], seed=tf.stack([index, 1]))
    xq = centers[:, None, :] + 0.5 * tf.random.stateless_normal([ways, queries, dim], seed=tf.stack([index, 2]))
    support = (tf.reshape(xs, [-1, dim]), tf.repeat(tf.range(ways), shots))
    query = (tf.reshape(xq, [-1, dim]), tf.repeat(tf.range(ways), queries))
    return support, query


def hypercleaning():
    """(trainer, dataset): the deterministic regime."""
    rng = np.random.default_rng(0)
    n, dim, classes = 200, 10, 5
    teacher = rng.normal(size=(dim, classes))
    x, x_val = rng.normal(size=(2, n, dim)).astype("float32")
    y, y_val = (x @ teacher).argmax(-1), (x_val @ teacher).argmax(-1)
    y = np.where(rng.random(n) < 0.4, rng.integers(0, classes, n), y)
    ce = losses.sparse_categorical_crossentropy
    trainer = tfb.BilevelTrainer(
        keras.Sequential([keras.layers.Dense(classes)]),
        hyperparameters={"example_weights": tfb.Hyperparameter(np.full(n, 0.5), transform="sigmoid")},
        inner_loss=lambda y_true, logits, hp: hp["example_weights"] * ce(y_true, logits),
        outer_loss=ce, steps=20, truncate=5, inner_learning_rate=1.0)
    trainer.compile(optimizer=keras.optimizers.Adam(0.05))
    return trainer, tf.data.Dataset.from_tensors(((x, y), (x_val, y_val))).repeat()


def meta():
    """(trainer, dataset): the stochastic regime, a stream of episodes."""
    ce = losses.sparse_categorical_crossentropy
    trainer = tfb.BilevelTrainer(
        keras.Sequential([keras.layers.Dense(3)]),
        hyper_model=keras.Sequential([keras.layers.Dense(8, activation="tanh")]),
        inner_loss=ce, outer_loss=ce, steps=5, truncate=3, meta_batch=True, inner_init="random", seed=11,
        inner_learning_rate=tfb.Hyperparameter(0.5, transform="softplus"))
    trainer.compile(optimizer=keras.optimizers.Adam(0.02))
    episodes = tf.data.Dataset.range(2**62).map(_episode).batch(2, drop_remainder=True)
    return trainer, trainer.resumable(episodes)


def online(**options):
    """(trainer, dataset): tune while you train, minibatches from an ordinary tf.data pipeline."""
    rng = np.random.default_rng(1)
    n, dim, classes = 96, 6, 3
    teacher = rng.normal(size=(dim, classes))
    x, x_val = rng.normal(size=(2, n, dim)).astype("float32")
    y, y_val = (x @ teacher).argmax(-1), (x_val @ teacher).argmax(-1)
    ce = losses.sparse_categorical_crossentropy
    model = keras.Sequential([
        keras.layers.Dense(8), tfb.keras.BatchNormalization(momentum=0.8), keras.layers.Activation("relu"),
        keras.layers.Dropout(0.3), keras.layers.Dense(classes),
    ])
    arguments = dict(
        inner_loss=ce, outer_loss=ce, steps=3, truncate=2, online=True, inner_optimizer="momentum",
        hyperparameters={"decay": tfb.Hyperparameter(1e-2, transform="exp")},
        inner_regularizer=lambda w, hp: hp["decay"] * tf.add_n([tf.reduce_sum(tf.square(v)) for v in w]),
        inner_learning_rate=0.1, seed=5)
    trainer = tfb.BilevelTrainer(model, **{**arguments, **options})
    trainer.compile(optimizer=keras.optimizers.Adam(0.05))
    train = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(n, seed=3).batch(16, drop_remainder=True)
    val = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(32)
    return trainer, trainer.resumable(tfb.keras.online_tasks(train, val, steps=3))


def online_forward():
    """(trainer, dataset): `online` by forward mode with a learned schedule over the run."""
    schedule = tfb.keras.LearnedSchedule.cosine(0.1, total_steps=3 * EPOCHS * STEPS_PER_EPOCH, warmup_steps=3)
    return online(estimator="forward", truncate=None, forget=0.9, inner_learning_rate=schedule)


class PauseOnce(keras.callbacks.Callback):
    """Writes `marker` after hyper-iteration `step` and waits to be killed, unless it exists."""

    def __init__(self, marker: Path, step: int):
        super().__init__()
        self.marker, self.step = marker, step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.meta_step.numpy()) != self.step or self.marker.exists():
            return
        _write_atomically(self.marker, lambda path: path.write_text(str(self.step)))
        time.sleep(PAUSE_SECONDS)
        os._exit(3)


def _write_atomically(path: Path, write) -> None:
    """A kill never leaves a half-written result: the experiment programs' writer (a unique
    temporary name aside, then rename)."""
    write_atomically(path, lambda temporary: write(Path(temporary)))


def _save_npy(array: np.ndarray):
    def write(path: Path) -> None:
        with open(path, "wb") as f:
            np.save(f, array)

    return write


def run_fit(name: str, workdir: Path, pause_after: dict) -> None:
    if (workdir / f"{name}.npy").exists():
        print(f"{name}: finished earlier", flush=True)
        return
    keras.utils.set_random_seed(FITS.index(name))  # the same initial weights however the job got here
    trainer, tasks = {"hypercleaning": hypercleaning, "meta": meta, "online": online, "online_forward": online_forward}[name]()
    callbacks = [keras.callbacks.BackupAndRestore(str(workdir / f"{name}_backup"))]
    if name in pause_after:
        callbacks.append(PauseOnce(workdir / f"{name}.paused", pause_after[name]))
    history = trainer.fit(tasks, epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH, callbacks=callbacks, verbose=0)
    flat = lambda variables: np.concatenate([np.ravel(v.numpy()).astype(np.float64) for v in variables])  # noqa: E731
    steps_done = getattr(trainer.regime, "steps_done", None)  # online: the global inner step
    summary = {
        "meta_step": int(trainer.meta_step.numpy()),
        "optimizer_iterations": int(trainer.optimizer.iterations.numpy()),
        "epochs_run": len(history.history["loss"]),
        "last_epoch_loss": float(history.history["loss"][-1]),
        "inner_steps_done": int(steps_done.numpy()) if steps_done is not None else 0,
    }
    _write_atomically(workdir / f"{name}.json", lambda path: path.write_text(json.dumps(summary)))
    _write_atomically(workdir / f"{name}_optimizer.npy", _save_npy(flat(trainer.optimizer.variables)))
    # Last: its existence marks the fit as finished.
    # λ, the inner model's weights (trained in place when online), its moving statistics (float
    # non-trainable values; not Dropout's seed state), the inner optimizer's state and forward
    # mode's carried tangents.
    moving = [v for v in trainer.inner_model.non_trainable_variables if v.dtype == "float32"]
    tangents = trainer.regime.carried["tangents"].variables if "tangents" in trainer.regime.carried else []
    state = trainer.hyper_variables + trainer.inner_model.trainable_variables + moving + trainer.inner_optimizer_variables + tangents
    _write_atomically(workdir / f"{name}.npy", _save_npy(np.concatenate([np.ravel(v.numpy()) for v in state])))
    print(f"{name}: {summary}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--pause_after", default="", help="FIT=STEP[,FIT=STEP]: pause (once) to be killed")
    args = parser.parse_args()
    pause_after = {}
    for item in filter(None, args.pause_after.split(",")):
        name, step = item.split("=")
        if name not in FITS:
            parser.error(f"--pause_after: unknown fit {name!r}, expected one of {FITS}")
        pause_after[name] = int(step)
    args.workdir.mkdir(parents=True, exist_ok=True)
    tf.config.experimental.enable_op_determinism()
    for name in FITS:
        run_fit(name, args.workdir, pause_after)


if __name__ == "__main__":
    main()
