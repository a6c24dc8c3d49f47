"""The saved state of one resumable loop: TF variables in a tf.train.Checkpoint, the Python-side
state (curves, counters) in a JSON sidecar of each checkpoint, and the result once it is done;
`run_resumable` runs such a loop (a `ResumableLoop`) so that a killed run, rerun, ends as an
uninterrupted one.

In `directory`: ckpt-<i> (the variables after i iterations, the latest only), state-<i>.json
(its sidecar) and result.json. The sidecar is written before its checkpoint and older sidecars
are removed after it, so the latest complete checkpoint always has its sidecar, wherever a kill
lands. A damaged file (truncated, garbage) is a StateFileError naming it and `remedy`; TF
checks the checksums of the variables it restores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Protocol, Sequence

import numpy as np
import tensorflow as tf

import tf_bilevel as tfb
from experiments.run_state import (
    damaged, jsonable, pause_to_be_killed, read_state_json, reading_state, write_json_atomically,
)


def arrays_sha256(arrays: Mapping[str, Any], keys: Sequence[str]) -> str:
    """A hash of the arrays `keys` (names, dtypes, shapes and bytes), for a settings fingerprint:
    a run on other data is never resumed from the state of another."""
    digest = hashlib.sha256()
    for key in keys:
        array = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class SidecarCheckpoint:
    """The checkpoints of one loop in `directory`. `remedy` ends the message of a damaged file
    (what to delete); `state_keys` / `result_keys` are the keys a sidecar / result.json must
    have; `identity` (e.g. {"truncate": 5}): items result.json must hold, else it is damaged
    (the result of another loop)."""

    def __init__(self, directory: Path, remedy: str, state_keys: Sequence[str] = (),
                 result_keys: Sequence[str] = (), counter: str = "iteration", identity: Optional[Mapping[str, Any]] = None):
        self.directory = Path(directory)
        self.result_path = self.directory / "result.json"
        self.remedy = remedy
        self.counter = counter  # the sidecar's key of the number of iterations done
        self._state_keys, self._result_keys = (counter, *state_keys), (*result_keys, *(identity or {}))
        self._identity = dict(identity or {})
        self._manager: Optional[tf.train.CheckpointManager] = None

    def result(self) -> Optional[dict]:
        """The result of a finished loop, None if it is not finished."""
        if not self.result_path.exists():
            return None
        result = read_state_json(self.result_path, self.remedy, self._result_keys)
        for key, value in self._identity.items():
            if result[key] != value:
                raise damaged(self.result_path, f"it holds {key} {result[key]!r}, not {value!r}", self.remedy)
        return result

    def save_result(self, result: dict) -> None:
        write_json_atomically(self.result_path, jsonable(result))

    def attach(self, **variables: Any) -> None:
        """Tracks `variables` (tf.Variables, built Keras optimizers): what `save` writes and
        `restore` assigns."""
        with self._reading_index():
            self._manager = tf.train.CheckpointManager(
                tf.train.Checkpoint(**variables), str(self.directory), max_to_keep=1)

    def _reading_index(self):
        """TF parses <directory>/checkpoint (the index of checkpoints) as text: garbage raises."""
        return reading_state(self.directory / "checkpoint", self.remedy,
                             (tf.errors.OpError, ValueError, UnicodeDecodeError, OSError))

    def _sidecar(self, done: int) -> Path:
        return self.directory / f"state-{done}.json"

    def latest_state(self) -> Optional[dict]:
        """The sidecar of the latest checkpoint (None if there is none); its `counter` is the
        number of iterations done."""
        index = self.directory / "checkpoint"
        with self._reading_index():
            latest = tf.train.latest_checkpoint(str(self.directory))
        if latest is None:
            if index.exists():  # TF ignores an index it cannot parse (a truncated one, say)
                raise damaged(index, "TensorFlow cannot parse it", self.remedy)
            return None
        try:
            done = int(latest.rsplit("-", 1)[1])
        except ValueError:
            raise damaged(index, f"it names the checkpoint {latest!r}", self.remedy) from None
        sidecar = self._sidecar(done)
        if not sidecar.exists():
            raise damaged(self.directory, f"checkpoint {Path(latest).name} has no sidecar {sidecar.name}", self.remedy)
        state = read_state_json(sidecar, self.remedy, self._state_keys)
        if state[self.counter] != done:
            raise damaged(sidecar, f"it holds {self.counter} {state[self.counter]!r}, not {done}", self.remedy)
        return state

    def restore(self, done: int) -> None:
        """Assigns the variables of checkpoint ckpt-<done>; all must be there."""
        prefix = self.directory / f"ckpt-{done}"
        # IndexError: TF's reader of a truncated data file; AssertionError: something not restored.
        with reading_state(f"the checkpoint {prefix} ({prefix.name}.index, {prefix.name}.data-*)", self.remedy,
                           (tf.errors.OpError, IndexError, AssertionError, ValueError, OSError)):
            self._manager.checkpoint.restore(str(prefix)).assert_consumed()

    def save(self, done: int, state: dict) -> None:
        """Saves the variables as ckpt-<done> with `state` as its sidecar."""
        self.directory.mkdir(parents=True, exist_ok=True)
        write_json_atomically(self._sidecar(done), jsonable({**state, self.counter: done}))
        self._manager.save(checkpoint_number=done)
        for old in self.directory.glob("state-*.json"):
            if old.name != self._sidecar(done).name:
                old.unlink()


# ----------------------------------------------------------------------------------------
# The loop: restore, run what is left, save every N, result.
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoopClock:
    """The run time of a loop over the processes that ran it: `process_starts`, the iterations
    done when each process started (its first iteration includes tracing and compilation), and
    `earlier_seconds`, what the earlier processes ran until their last checkpoint. Saved in the
    sidecar under KEYS."""

    KEYS: ClassVar[tuple[str, str]] = ("elapsed_seconds", "process_starts")
    process_starts: list = dataclasses.field(default_factory=list)
    earlier_seconds: float = 0.0
    total_seconds: Optional[float] = None  # set by `stop`
    _started: float = dataclasses.field(default_factory=time.perf_counter, repr=False)

    @classmethod
    def resumed(cls, state: Optional[dict]) -> "LoopClock":
        """The clock of a fresh loop (state None) or of one resumed from a sidecar."""
        return cls() if state is None else cls(list(state["process_starts"]), state["elapsed_seconds"])

    def start(self) -> None:
        self._started = time.perf_counter()

    def seconds(self) -> float:
        """Seconds of this loop: the earlier processes' and this one's since `start`."""
        return self.earlier_seconds + time.perf_counter() - self._started

    def stop(self) -> None:
        self.total_seconds = self.seconds()

    def state(self) -> dict:
        return {"elapsed_seconds": self.seconds(), "process_starts": list(self.process_starts)}

    def steady(self, per_iteration: Sequence[Any]) -> list:
        """`per_iteration` (one value per iteration, e.g. its seconds) without each process's
        first iteration (tracing and compilation); all of it if that leaves nothing."""
        keep = [i for i in range(len(per_iteration)) if i not in self.process_starts] or range(len(per_iteration))
        return [per_iteration[i] for i in keep]

    def timing(self, wall_seconds: Sequence[float], cpu_seconds: Sequence[float]) -> dict:
        """The time per iteration from each iteration's wall and CPU seconds: steady median and
        mean (`steady`), steady CPU median, the first iteration's, the total, `process_starts`."""
        steady_wall = self.steady(wall_seconds)
        return {"seconds_per_iteration_median": float(np.median(steady_wall)),
                "seconds_per_iteration_mean": float(np.mean(steady_wall)),
                "cpu_seconds_per_iteration_median": float(np.median(self.steady(cpu_seconds))),
                "first_iteration_seconds": wall_seconds[0], "total_seconds": self.total_seconds,
                "process_starts": list(self.process_starts)}


class ResumableLoop(Protocol):
    """What `run_resumable` runs: TF variables (checkpointed) and Python-side state (the sidecar)."""

    def build(self, state: Optional[dict]) -> Mapping[str, Any]:
        """Builds the loop, fresh (state None) or from the sidecar of the latest checkpoint;
        returns the variables to checkpoint (tf.Variables, built Keras optimizers), whose values
        `run_resumable` restores after this call."""

    def build_finished(self, result: dict) -> Mapping[str, Any]:
        """Builds the loop of a finished run from its `result`; returns the variables, restored
        at the last checkpoint (the state after the last iteration)."""

    def describe(self, done: int) -> str:
        """The label of the progress bar, `done` iterations having been done before."""

    def iteration(self, i: int) -> Mapping[str, float]:
        """Runs iteration i (from 0); returns the metrics the progress bar shows."""

    def state(self) -> dict:
        """The JSON-able Python-side state, saved with each checkpoint (and given to `build`)."""

    def result(self, clock: LoopClock) -> dict:
        """The result after the last iteration (saved as result.json); `clock` is stopped."""


def run_resumable(loop: ResumableLoop, store: Optional[SidecarCheckpoint], iterations: int, save_every: int, *,
                  pause: Optional[tuple[int, Path]] = None, pause_seconds: float = 300.0,
                  unit_name: str = "it") -> dict:
    """Runs `iterations` iterations of `loop`, resumably, and returns its result.

    With a `store`: a finished loop is not rerun (its result is returned, its variables restored
    at the last checkpoint); otherwise the loop resumes after the latest checkpoint (its
    variables restored, its sidecar given to `loop.build`), saves a checkpoint every
    `save_every` iterations (0: none) and after the last one, then saves the result. Iterations
    lost by a kill since the last checkpoint are rerun from it, so that the calls and values are
    those of an uninterrupted run. `pause=(i, marker)` (tests): after iteration i (counted from
    1) and its checkpoint, `run_state.pause_to_be_killed(marker, pause_seconds)`."""
    finished = store.result() if store is not None else None
    if finished is not None:
        store.attach(**loop.build_finished(finished))
        store.restore(iterations)
        return finished
    state = store.latest_state() if store is not None else None
    done = 0 if state is None else state[store.counter]
    variables = loop.build(state)
    if store is not None:
        store.attach(**variables)
        if state is not None:
            store.restore(done)
    clock = LoopClock.resumed(state)
    if done < iterations:
        clock.process_starts.append(done)
    bar = tfb.Progress(iterations, initial=done, label=loop.describe(done), unit_name=unit_name)
    clock.start()
    for i in range(done, iterations):
        bar.update(i + 1, **loop.iteration(i))
        if store is not None and ((save_every > 0 and (i + 1) % save_every == 0) or i + 1 == iterations):
            store.save(i + 1, {**loop.state(), **clock.state()})
        if pause is not None and pause[0] == i + 1:
            pause_to_be_killed(pause[1], pause_seconds)
    clock.stop()
    result = loop.result(clock)
    if store is not None:
        store.save_result(result)
    return result
