"""What the two online applications (experiments/online_hpo.py, experiments/reweighting.py)
share: resumable minibatch streams, the online task stream of the trainer, a per-epoch recorder
(test / validation accuracy against training wall-clock, hyperparameters against
hyper-iteration) that survives SIGKILL, per-method result files, and the experiment around the
methods (`methods_experiment`, run by experiments/common/program.py).

Resuming. Each method of a program trains with `keras.callbacks.BackupAndRestore` under
<output_dir>/resume/backup/<method> (one checkpoint per Keras epoch) and keeps its curves in
<output_dir>/resume/<method>.record.json, written at every epoch end BEFORE the checkpoint
(place the recorder first in the callback list), so that a restart cuts the record back to the
restored epoch. A finished method's row is <output_dir>/resume/<method>.json: a rerun of the
same command skips it (`MethodStore.run_once`). The minibatch streams are functions of the
position in the stream (the permutation of epoch e is drawn from the stateless seed (seed, e)),
so a restarted fit starts exactly where the checkpoint was taken.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

import tf_bilevel as tfb
from experiments.common import keras_resume, provenance
from experiments.common.config import option
from experiments.common.run_state import RESTART_HINT, parse_pause_after, read_state_json, write_json_atomically


# ----------------------------------------------------------------------------------------
# Data streams.
# ----------------------------------------------------------------------------------------
def scale_images(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W(, C)] -> float32 [N, H, W, C] in [0, 1]."""
    x = images.astype(np.float32) / 255.0
    return x if x.ndim == 4 else x[..., None]


def minibatch_stream(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int,
                     start: Any = 0) -> tf.data.Dataset:
    """The infinite stream of shuffled minibatches (x[B, ...], y[B]) from minibatch `start` on.

    Epoch e is a permutation drawn from the stateless seed (seed, e), cut into len(x) // B
    minibatches (the remainder is dropped), so minibatch i is the same in every run and a
    stream started at `start` (an int or an int64 tensor read when iteration starts) continues
    an interrupted one exactly."""
    n = len(x)
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ValueError(f"{n} examples do not fill one minibatch of {batch_size}")
    xs, ys = tf.constant(x), tf.constant(y)
    start = tf.cast(start, tf.int64)

    def epoch(e):
        keys = tf.random.stateless_uniform([n], tf.stack([tf.constant(seed, tf.int64), e]), alg="philox")
        order = tf.argsort(keys)[: per_epoch * batch_size]
        return tf.data.Dataset.from_tensor_slices(tf.reshape(order, [per_epoch, batch_size]))

    first_epoch = start // per_epoch
    batches = (tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch).skip(start - first_epoch * per_epoch))
    return batches.map(lambda i: (tf.gather(xs, i), tf.gather(ys, i)),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def online_task_stream(train: tuple, val: tuple, *, steps: int, batch_size: int, val_batch_size: int,
                       seed: int, start: Any, extra: Optional[tuple] = None) -> tf.data.Dataset:
    """The elements of `BilevelTrainer(online=True)` from hyper-iteration `start` on
    (`tfb.keras.online_tasks`): training minibatches start·T … start·T + T − 1 and validation
    batch `start` (a seeded stream of its own), so `trainer.resumable(lambda start: ...)`
    jumps straight to where an interrupted run stopped. `extra` = (x, y, n): n examples of (x, y)
    (a seeded stream of their own) are appended to every training minibatch."""
    start = tf.cast(start, tf.int64)
    train_ds = minibatch_stream(*train, batch_size, seed, start * steps)
    if extra is not None:
        extra_ds = minibatch_stream(extra[0], extra[1], extra[2], seed + 2, start * steps)
        train_ds = tf.data.Dataset.zip((train_ds, extra_ds)).map(
            lambda t, e: (tf.concat([t[0], e[0]], 0), tf.concat([t[1], e[1]], 0)))
    val_ds = minibatch_stream(*val, min(val_batch_size, len(val[0])), seed + 1, start)
    return tfb.keras.online_tasks(train_ds, val_ds, steps=steps).prefetch(2)


# ----------------------------------------------------------------------------------------
# Recording.
# ----------------------------------------------------------------------------------------
def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy of `model`'s logits on (x, y)."""
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


class EpochRecorder(keras.callbacks.Callback):
    """Per epoch: cumulative training wall-clock (evaluation excluded), and the test and
    validation accuracy of `inner_model` (the model being trained: the trainer's inner model,
    or the fitted model itself); every `hp_every` hyper-iterations the trainer's
    hyperparameter values (`hyperparameters(values) -> {name: list}`); a progress line.

    With `state_path` the record is written at every epoch end and reloaded (cut back to the
    restored epoch) when a fit resumes: place it BEFORE BackupAndRestore in the callbacks."""

    def __init__(self, label: str, epochs: int, steps_per_epoch: int, inner_model: keras.Model,
                 test: tuple, val: tuple, state_path: Optional[str] = None, hp_every: int = 0,
                 hyperparameters: Optional[Callable[[dict], dict]] = None, eval_every: int = 1):
        super().__init__()
        self.label, self.epochs, self.steps_per_epoch = label, epochs, steps_per_epoch
        self.inner_model, self.test, self.val = inner_model, test, val
        self.state_path, self.hp_every, self.hyperparameters = state_path, hp_every, hyperparameters
        self.eval_every = eval_every
        self.tty = sys.stdout.isatty()
        self.rec: dict[str, list] = {"epoch": [], "train_seconds": [], "test_accuracy": [],
                                     "val_accuracy": [], "hp_iteration": [], "hp": []}
        self.started = False
        self._last_line = 0.0

    # -- resume ---------------------------------------------------------------------
    def _begin(self, epoch: int) -> None:
        self.started = True
        if epoch == 0:
            self.rec["epoch"].append(0)
            self.rec["train_seconds"].append(0.0)
            self._evaluate()
            self._record_hp(0)
            return
        if not (self.state_path and os.path.exists(self.state_path)):
            raise RuntimeError(f"{self.label}: resumed at epoch {epoch} but the record {self.state_path} is "
                               "missing; delete the resume folder and rerun.")
        saved = read_state_json(self.state_path, f"delete {os.path.dirname(self.state_path)} to start over, {RESTART_HINT}",
                                ("epoch", "train_seconds", "test_accuracy", "val_accuracy", "hp_iteration", "hp"))
        keep = [i for i, e in enumerate(saved["epoch"]) if e <= epoch]
        for key in ("epoch", "train_seconds", "test_accuracy", "val_accuracy"):
            self.rec[key] = [saved[key][i] for i in keep]
        keep_hp = [i for i, it in enumerate(saved["hp_iteration"]) if it <= epoch * self.steps_per_epoch]
        self.rec["hp_iteration"] = [saved["hp_iteration"][i] for i in keep_hp]
        self.rec["hp"] = [saved["hp"][i] for i in keep_hp]
        if self.rec["epoch"][-1:] != [epoch]:
            raise RuntimeError(f"{self.label}: the record {self.state_path} stops before the checkpoint (epoch "
                               f"{epoch}); delete the resume folder and rerun.")
        print(f"{self.label} resumed at epoch {epoch}/{self.epochs}", flush=True)

    def finish(self) -> None:
        """After fit: loads the record if fit had nothing left to run (killed after its last checkpoint)."""
        if not self.started:
            self._begin(self.epochs)

    # -- callbacks ------------------------------------------------------------------
    def on_epoch_begin(self, epoch, logs=None):
        if not self.started:
            self._begin(epoch)
        self._epoch = epoch
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        it = self._epoch * self.steps_per_epoch + batch + 1
        if self.hp_every and it % self.hp_every == 0:
            self._record_hp(it)
        now = time.perf_counter()
        if self.tty and now - self._last_line > 0.2:
            self._last_line = now
            done = self.rec["train_seconds"][-1] + now - self._t0
            shown = {k: float(v) for k, v in (logs or {}).items() if k in ("loss", "accuracy", "outer_loss")}
            text = " ".join(f"{k}={v:.3f}" for k, v in shown.items())
            print(f"\r{self.label} epoch {self._epoch + 1}/{self.epochs} step {batch + 1}/{self.steps_per_epoch} "
                  f"[{done:.0f}s] {text}", end="", flush=True)

    def on_epoch_end(self, epoch, logs=None):
        elapsed = time.perf_counter() - self._t0
        self.rec["epoch"].append(epoch + 1)
        self.rec["train_seconds"].append(self.rec["train_seconds"][-1] + elapsed)
        evaluated = (epoch + 1) % self.eval_every == 0 or epoch + 1 == self.epochs
        self._evaluate() if evaluated else (self.rec["test_accuracy"].append(None),
                                            self.rec["val_accuracy"].append(None))
        line = (f"{self.label} epoch {epoch + 1}/{self.epochs} [{self.rec['train_seconds'][-1]:.0f}s train] "
                + (f"test_acc={self.rec['test_accuracy'][-1]:.4f} val_acc={self.rec['val_accuracy'][-1]:.4f}"
                   if evaluated else ""))
        print(("\r" if self.tty else "") + line, flush=True)
        if self.state_path:
            write_json_atomically(self.state_path, self.rec)

    def _evaluate(self) -> None:
        self.rec["test_accuracy"].append(accuracy(self.inner_model, *self.test))
        self.rec["val_accuracy"].append(accuracy(self.inner_model, *self.val))

    def _record_hp(self, it: int) -> None:
        if self.hyperparameters is None:
            return
        values = self.model.hyperparameter_values()
        self.rec["hp_iteration"].append(it)
        self.rec["hp"].append(self.hyperparameters(values))


# ----------------------------------------------------------------------------------------
# Methods, results.
# ----------------------------------------------------------------------------------------
class MethodStore(keras_resume.MethodStore):
    """<output_dir>/resume: the backup, record and result row of each method (no weights: the
    row holds what the tables and figures need)."""

    def __init__(self, output_dir: str, pause_after: Optional[str] = None):
        super().__init__(os.path.join(output_dir, "resume"))
        os.makedirs(self.root, exist_ok=True)
        self.pause = parse_pause_after(pause_after, "METHOD,EPOCH")

    def run_once(self, method: str, train: Callable[[], dict],
                 required: Sequence[str] = ("test_accuracy", "record")) -> dict:
        """The row of `method`: the stored one if it finished earlier, else `train()`'s, stored.
        `required`: the keys a stored row must have (else it is a damaged state file)."""
        if (row := self.row(method, required)) is not None:
            print(f"[{method}] finished earlier", flush=True)
            return row
        return self.save(method, train())

    def row(self, method: str, required: Sequence[str] = ("test_accuracy", "record")) -> Optional[dict]:
        if not self.finished(method):
            return None
        return read_state_json(self.path(method, ".json"), f"delete it to rerun {method}, {RESTART_HINT}", required)

    def callbacks(self, method: str, recorder: EpochRecorder) -> list:
        """[recorder, BackupAndRestore (a damaged backup is a named error), (PauseOnce)] for one
        method's fit: the record is written before the checkpoint."""
        callbacks = [recorder, self.backup(method)]
        if self.pause and self.pause[0] == method:
            marker = os.path.join(self.root, f"paused_{method}_{self.pause[1]}")
            callbacks.append(keras_resume.PauseOnce(marker, epoch=self.pause[1]))
        return callbacks

    def save(self, method: str, row: dict) -> dict:
        self.save_row(method, row)
        return row


def final_row(recorder: EpochRecorder, **extra: Any) -> dict:
    """The result row of a trained method: final accuracies, training wall-clock, curves."""
    rec = recorder.rec
    return {"test_accuracy": rec["test_accuracy"][-1], "val_accuracy": rec["val_accuracy"][-1],
            "train_seconds": rec["train_seconds"][-1], "record": rec, **extra}


def restored_epoch(backup_dir: str) -> int:
    """The epoch a BackupAndRestore checkpoint in `backup_dir` resumes at (0 if none)."""
    path = os.path.join(backup_dir, "training_metadata.json")
    if not os.path.exists(path):
        return 0
    return int(read_state_json(path, f"delete {backup_dir} to redo that method, {RESTART_HINT}", ("epoch",))["epoch"])


class CheckRestoredPosition(keras.callbacks.Callback):
    """After BackupAndRestore (place it later in the list): the restored optimizer step must be
    where the data stream was started, else the run would silently see other minibatches."""

    def __init__(self, expected: int):
        super().__init__()
        self.expected = expected

    def on_train_begin(self, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step != self.expected:
            raise RuntimeError(f"the restored checkpoint is at SGD step {step}, not {self.expected} (its metadata was "
                               "damaged?): delete the method's folder under <output_dir>/resume/backup and rerun.")


def fit_recorded(model: keras.Model, method: str, make_stream: Callable[[int], tf.data.Dataset], *, epochs: int,
                 steps_per_epoch: int, test: tuple, val: tuple, store: MethodStore,
                 recorded: Optional[keras.Model] = None) -> EpochRecorder:
    """`model.fit` (compiled, built) on `make_stream(start)` for `epochs` x `steps_per_epoch`,
    resumable per epoch, recording `recorded` (default `model`: the network evaluated on test and
    val); returns the record. The stream starts at the checkpoint's SGD step, read from the
    backup's metadata before fit (a tf.data function reading `optimizer.iterations` at run time
    saw a wrong value once prefetching or callbacks were involved: other minibatches)."""
    start = restored_epoch(store.backup_dir(method)) * steps_per_epoch
    recorder = EpochRecorder(f"[{method}]", epochs, steps_per_epoch, model if recorded is None else recorded, test,
                             val, store.record_path(method))
    callbacks = store.callbacks(method, recorder)
    callbacks.insert(2, CheckRestoredPosition(start))
    model.fit(make_stream(start).prefetch(2), epochs=epochs, steps_per_epoch=steps_per_epoch, shuffle=False,
              callbacks=callbacks, verbose=0)
    recorder.finish()
    return recorder


def fit_keras(model: keras.Model, method: str, train: tuple, *, test: tuple, val: tuple, epochs: int,
              steps_per_epoch: int, batch_size: int, seed: int, store: MethodStore) -> EpochRecorder:
    """Plain Keras training of a compiled, built `model` on minibatches of `train` (`fit_recorded`)."""
    return fit_recorded(model, method, lambda start: minibatch_stream(*train, batch_size, seed, start), epochs=epochs,
                        steps_per_epoch=steps_per_epoch, test=test, val=val, store=store)


def fit_online(trainer: tfb.BilevelTrainer, model: keras.Model, method: str, data: dict, cfg: Any,
               store: MethodStore, hyperparameters: Callable[[dict], dict], steps: int = 1,
               extra: Optional[tuple] = None) -> EpochRecorder:
    """`BilevelTrainer(online=True)` on `data` for cfg.epochs passes of T = `steps` minibatches
    per hyper-iteration, resumable per epoch; `model` is the trainer's inner model (evaluated
    by the recorder); `extra`: see `online_task_stream`; returns the record."""
    steps_per_epoch = len(data["train"][1]) // (cfg.batch_size * steps)
    tasks = trainer.resumable(lambda start: online_task_stream(
        data["train"], data["val"], steps=steps, batch_size=cfg.batch_size, val_batch_size=cfg.val_batch_size,
        seed=cfg.seed, start=start, extra=extra))
    trainer.build_from_spec(tasks.element_spec)
    recorder = EpochRecorder(f"[{method}]", cfg.epochs, steps_per_epoch, model, data["test"], data["val"],
                             store.record_path(method), hp_every=cfg.hp_every, hyperparameters=hyperparameters)
    trainer.fit(tasks, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, callbacks=store.callbacks(method, recorder),
                verbose=0)
    recorder.finish()
    return recorder


def sparse_ce_logits() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def build_on(model: keras.Model, x_shape: Sequence[int]) -> keras.Model:
    """Builds `model` (BackupAndRestore needs the variables before fit)."""
    model(np.zeros((1, *x_shape), np.float32))
    return model


# ----------------------------------------------------------------------------------------
# The program around the methods.
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class StateOptions:
    """The Config fields of both programs that only steer the saved state."""

    restart: bool = option(False, "Delete the saved state (<output_dir>/resume, and online_hpo's "
                           "<output_dir>/tuner) and start over.", result=False)
    pause_after: Optional[str] = option(None, "(tests) METHOD,EPOCH: after that epoch's checkpoint, write "
                                        "<output_dir>/resume/paused_METHOD_EPOCH and wait to be killed (once).",
                                        internal=True, result=False)


def check_ranges(cfg: Any, at_least_one: Sequence[str] = (), positive: Sequence[str] = ()) -> None:
    """ValueError naming the flag when a field of `at_least_one` is < 1 or one of `positive` is <= 0;
    also checks --pause_after and --momentum (in [0, 1))."""
    for name in at_least_one:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.momentum < 1:
        raise ValueError(f"--momentum must be in [0, 1), got {cfg.momentum}")
    parse_pause_after(cfg.pause_after, "METHOD,EPOCH")


def methods_experiment(program: str, run_methods: Callable[[Any, dict, MethodStore], dict],
                       target: Callable[[dict], dict]) -> Callable:
    """The `experiment` of an online program (experiments/common/program.py) from its parts: runs the
    methods (finished ones are read back from <output_dir>/resume) on data = (arrays, data
    description); the results hold the config, data, environment, the methods' rows and the
    target check."""

    def experiment(cfg: Any, data: tuple[dict, dict], run: Any) -> dict:
        arrays, data_info = data
        keras.utils.set_random_seed(cfg.seed)
        store = MethodStore(cfg.output_dir, cfg.pause_after)
        print(f"[{program}] {data_info}", flush=True)
        methods = run_methods(cfg, arrays, store)
        provenance.mark_end(run.environment)
        return {"config": dataclasses.asdict(cfg), "data": data_info, "environment": run.environment,
                "methods": methods, "target": target(methods), "runtime_seconds": run.seconds()}

    return experiment
