"""Resuming Keras fits method by method, for the programs that train several methods (K values,
baselines) one after the other and must survive SIGKILL.

A method trains with `CheckedBackupAndRestore` under <root>/backup/<method> (a checkpoint per
Keras epoch) and keeps its curves in a `ResumableRecord` at <root>/<method>.record.json, written
at every epoch end BEFORE the checkpoint (place the record first in the callbacks), so that a
restart cuts the record back to the restored epoch, never finds it behind. A finished method is
<root>/<method>.weights.h5 + <root>/<method>.json (its row, written last: its existence marks the
method finished); `MethodStore` reads and writes these files. `PauseOnce` is the tests' hook
that stops a fit at a known hyper-iteration or epoch to be killed there.
(experiments/common/online_program.py's per-epoch store extends `MethodStore` and uses `PauseOnce`.)
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable, Optional, Sequence

import keras

import tf_bilevel as tfb

from experiments.common.run_state import (
    RESTART_HINT, StateFileError, damaged, pause_to_be_killed, read_state_json, reading_state, write_atomically,
    write_json_atomically,
)


class PauseOnce(keras.callbacks.Callback):
    """--pause_after (tests): writes `marker` and waits to be killed (once: not if `marker` exists)
    after hyper-iteration `step` (1-based, counted over the whole fit, resumed epochs included) or
    at the end of epoch `epoch` (1-based; after its checkpoint if placed after BackupAndRestore)."""

    def __init__(self, marker: str, *, step: Optional[int] = None, epoch: Optional[int] = None,
                 seconds: float = 300.0):
        super().__init__()
        if (step is None) == (epoch is None):
            raise ValueError("PauseOnce needs exactly one of step= and epoch=")
        self.marker, self.step, self.epoch, self.seconds = marker, step, epoch, seconds

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.step is not None and self._epoch * self.params["steps"] + batch + 1 == self.step:
            pause_to_be_killed(self.marker, self.seconds)

    def on_epoch_end(self, epoch, logs=None):
        if self.epoch is not None and epoch + 1 == self.epoch:
            pause_to_be_killed(self.marker, self.seconds)


class CheckedBackupAndRestore(keras.callbacks.BackupAndRestore):
    """keras.callbacks.BackupAndRestore whose restore of a damaged backup (truncated weights,
    garbage metadata) is a StateFileError naming the folder and `remedy`, not a traceback from
    h5py or json."""

    def __init__(self, backup_dir: str, remedy: str, **kwargs: Any):
        super().__init__(backup_dir, **kwargs)
        self.remedy = remedy

    def on_train_begin(self, logs=None):
        with reading_state(self.backup_dir, self.remedy, (OSError, ValueError, KeyError, TypeError)):
            super().on_train_begin(logs)


class ResumableRecord(keras.callbacks.Callback):
    """Per-epoch curves and per-step wall times of one fit, saved to `state_path` at every epoch
    end and, in a resumed fit, reloaded and cut back to the restored epoch.

    `series` maps each x-series (hyper-iterations) to the y-series recorded with it; subclasses
    append to `self.rec` and call `super().on_epoch_end`. `on_fresh_start()` runs at the start of
    a fit from scratch (e.g. the curves' point at iteration 0). Step times leave out the first
    step of each fit (tracing) and the steps `timed(it)` refuses. `position(model)`: the restored
    model's hyper-iteration, checked against the restored epoch (a mismatch is a damaged
    checkpoint). `progress`: {shown name: logs key} of a `tfb.Progress` bar. Call `finish()`
    after `fit`: a fit killed after its last checkpoint has no epoch left, and `finish` loads the
    record."""

    def __init__(self, label: str, epochs: int, steps_per_epoch: int, series: dict[str, Sequence[str]],
                 state_path: Optional[str], remedy: str, *, position: Optional[Callable[[Any], int]] = None,
                 progress: Optional[dict[str, str]] = None):
        super().__init__()
        self.label, self.epochs, self.steps_per_epoch = label, epochs, steps_per_epoch
        self.series, self.state_path, self.remedy = series, state_path, remedy
        self.position, self.progress, self.bar = position, progress, None
        self.rec: dict[str, list] = {name: [] for x, ys in series.items() for name in (x, *ys)}
        self.step_times: list[tuple[int, float]] = []  # (0-based hyper-iteration, seconds)
        self.started, self._traced = False, False

    # -- hooks for subclasses ---------------------------------------------------------
    def on_fresh_start(self) -> None:
        pass

    def timed(self, it: int) -> bool:
        return True

    # -- resume -----------------------------------------------------------------------
    def begin(self, epoch: int) -> None:
        self.started, self._traced = True, False
        step = epoch * self.steps_per_epoch
        if self.position is not None and self.position(self.model) != step:
            raise StateFileError(
                f"{self.label}: the restored checkpoint is at hyper-iteration {self.position(self.model)} but epoch "
                f"{epoch} (x {self.steps_per_epoch}): it is damaged (killed while it was written?). "
                f"To go on: {self.remedy}.")
        if self.progress:
            self.bar = tfb.Progress(self.epochs * self.steps_per_epoch, initial=step, label=self.label)
        if step == 0:
            self.on_fresh_start()
            return
        if not (self.state_path and os.path.exists(self.state_path)):
            raise StateFileError(f"{self.label}: resumed at hyper-iteration {step} but the record {self.state_path} "
                                 f"is missing. To go on: {self.remedy}.")
        saved = read_state_json(self.state_path, self.remedy, ("rec", "step_times"))
        try:
            for x, ys in self.series.items():
                keep = [i for i, it in enumerate(saved["rec"][x]) if it <= step]
                for name in (x, *ys):
                    self.rec[name] = [saved["rec"][name][i] for i in keep]
            self.step_times = [(int(it), float(t)) for it, t in saved["step_times"] if it < step]
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise damaged(self.state_path, f"not the record this program writes ({type(err).__name__}: {err})",
                          self.remedy) from None
        first = next(iter(self.series))
        if self.rec[first][-1:] != [step]:
            raise damaged(self.state_path, f"it stops before the checkpoint (hyper-iteration {step})", self.remedy)
        print(f"{self.label} resumed at hyper-iteration {step}/{self.epochs * self.steps_per_epoch}", flush=True)

    def finish(self, model: keras.Model) -> None:
        if not self.started:
            self.set_model(model)
            self.begin(self.epochs)

    def seconds_per_step(self) -> list[float]:
        return [t for _, t in self.step_times]

    # -- callbacks --------------------------------------------------------------------
    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if not self.started:
            self.begin(epoch)

    def on_train_batch_begin(self, batch, logs=None):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        it = self._epoch * self.steps_per_epoch + batch
        if self._traced and self.timed(it):
            self.step_times.append((it, time.perf_counter() - self._t0))
        self._traced = True
        if self.bar is not None:
            self.bar.update(it + 1, **{shown: float(logs[key]) for shown, key in self.progress.items()})

    def on_epoch_end(self, epoch, logs=None):
        if self.state_path:
            write_json_atomically(self.state_path, {"rec": self.rec, "step_times": self.step_times}, indent=1)


class MethodStore:
    """<root>: the backup, record and finished files of each method of a program."""

    def __init__(self, root: str):
        self.root = root

    def path(self, method: str, suffix: str) -> str:
        return os.path.join(self.root, f"{method}{suffix}")

    def backup_dir(self, method: str) -> str:
        return os.path.join(self.root, "backup", method)

    def record_path(self, method: str) -> str:
        return self.path(method, ".record.json")

    def unfinished_remedy(self, method: str, what: str = "this method") -> str:
        """Backup and record go together: one without the other cannot be resumed."""
        return (f"delete {self.backup_dir(method)} and {self.record_path(method)} to train {what} from the start, "
                f"{RESTART_HINT}")

    def backup(self, method: str) -> CheckedBackupAndRestore:
        # Not deleted by Keras at the end of fit: `save` deletes it once the row is stored.
        return CheckedBackupAndRestore(self.backup_dir(method), self.unfinished_remedy(method, "it"),
                                       delete_checkpoint=False)

    def finished(self, method: str) -> bool:
        return os.path.exists(self.path(method, ".json"))

    def load(self, method: str, model: keras.Model, required: Sequence[str]) -> dict:
        """The row of `method`, finished by an earlier run (at least the keys `required`), its weights
        loaded into `model` (built)."""
        row_path, weights = self.path(method, ".json"), self.path(method, ".weights.h5")
        remedy = f"delete {row_path} (and {os.path.basename(weights)}) to train method {method} again, {RESTART_HINT}"
        row = read_state_json(row_path, remedy, required)
        with reading_state(weights, remedy):  # h5py: OSError when truncated or garbage; Keras: ValueError
            model.load_weights(weights)
        return row

    def save(self, method: str, model: keras.Model, row: dict) -> None:
        """Weights first, the row last (it marks the method finished); then drops backup and record."""
        write_atomically(self.path(method, ".weights.h5"), model.save_weights)
        self.save_row(method, row)

    def save_row(self, method: str, row: dict) -> None:
        """Writes the finished method's row (its existence marks it finished), then drops its
        backup and record."""
        write_json_atomically(self.path(method, ".json"), row, indent=1)
        shutil.rmtree(self.backup_dir(method), ignore_errors=True)
        if os.path.exists(self.record_path(method)):
            os.remove(self.record_path(method))
