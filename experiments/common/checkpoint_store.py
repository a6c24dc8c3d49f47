"""The saved state of one resumable loop of hyper-steps, and `run_resumable`, which runs such a
loop (a `ResumableLoop`) so that a killed run, rerun, ends as an uninterrupted one.

In `directory`: the `tfb.HyperStepCheckpoint` of the loop's `HyperStep` (ckpt-<i>, the latest
only) with the Python-side state (curves, counters, the clock) in its JSON sidecar state-<i>.json,
and result.json once the loop is done. A damaged file (truncated, garbage) is a StateFileError
naming it and `remedy`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Protocol, Sequence

import numpy as np

import tf_bilevel as tfb
from experiments.common.run_state import damaged, jsonable, pause_to_be_killed, read_state_json, write_json_atomically


def arrays_sha256(arrays: Mapping[str, Any], keys: Sequence[str]) -> str:
    """A hash of the arrays `keys` (names, dtypes, shapes and bytes), for a settings fingerprint:
    a run on other data is never resumed from the state of another."""
    digest = hashlib.sha256()
    for key in keys:
        array = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


@dataclasses.dataclass
class LoopStore:
    """Where one loop keeps its state. `remedy` ends the message of a damaged file (what to
    delete); `state_keys` / `result_keys`: the keys a sidecar / result.json must have;
    `identity` (e.g. {"truncate": 5}): items result.json must hold, else it is damaged (the
    result of another loop)."""

    directory: Path
    remedy: str
    state_keys: Sequence[str] = ()
    result_keys: Sequence[str] = ()
    identity: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.directory = Path(self.directory)
        self.result_path = self.directory / "result.json"

    def result(self) -> Optional[dict]:
        """The result of a finished loop, None if it is not finished."""
        if not self.result_path.exists():
            return None
        result = read_state_json(self.result_path, self.remedy, (*self.result_keys, *self.identity))
        for key, value in self.identity.items():
            if result[key] != value:
                raise damaged(self.result_path, f"it holds {key} {result[key]!r}, not {value!r}", self.remedy)
        return result

    def save_result(self, result: dict) -> None:
        write_json_atomically(self.result_path, jsonable(result))

    def latest_state(self) -> Optional[dict]:
        """The sidecar of the latest checkpoint, None if there is none."""
        return tfb.HyperStepCheckpoint.latest_sidecar(self.directory, sidecar_keys=self.state_keys, remedy=self.remedy)

    def checkpoint(self, step: tfb.HyperStep) -> tfb.HyperStepCheckpoint:
        return tfb.HyperStepCheckpoint(self.directory, step, sidecar_keys=self.state_keys, remedy=self.remedy)


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
    """What `run_resumable` runs: a `tfb.HyperStep` (checkpointed), called once per iteration,
    and Python-side state (the checkpoint's sidecar)."""

    def build(self, state: Optional[dict]) -> tfb.HyperStep:
        """Builds the loop, fresh (state None) or from the sidecar of the latest checkpoint;
        returns its HyperStep, whose state `run_resumable` restores after this call."""

    def build_finished(self, result: dict) -> tfb.HyperStep:
        """Builds the loop of a finished run from its `result`; returns its HyperStep, restored
        at the last checkpoint (the state after the last iteration)."""

    def describe(self, done: int) -> str:
        """The label of the progress bar, `done` iterations having been done before."""

    def iteration(self, i: int) -> Mapping[str, float]:
        """Runs iteration i (from 0), one hyper-step; returns the metrics the progress bar shows."""

    def state(self) -> dict:
        """The JSON-able Python-side state, saved with each checkpoint (and given to `build`)."""

    def result(self, clock: LoopClock) -> dict:
        """The result after the last iteration (saved as result.json); `clock` is stopped."""


def run_resumable(loop: ResumableLoop, store: Optional[LoopStore], iterations: int, save_every: int, *,
                  pause: Optional[tuple[int, Path]] = None, pause_seconds: float = 300.0,
                  unit_name: str = "it") -> dict:
    """Runs `iterations` iterations of `loop`, resumably, and returns its result.

    With a `store`: a finished loop is not rerun (its result is returned, its HyperStep restored
    at the last checkpoint); otherwise the loop resumes after the latest checkpoint (its
    HyperStep restored, its sidecar given to `loop.build`), saves a checkpoint every
    `save_every` iterations (0: none) and after the last one, then saves the result. Iterations
    lost by a kill since the last checkpoint are rerun from it, so that the calls and values are
    those of an uninterrupted run. `pause=(i, marker)` (tests): after iteration i (counted from
    1) and its checkpoint, `run_state.pause_to_be_killed(marker, pause_seconds)`."""
    finished = store.result() if store is not None else None
    if finished is not None:
        done = store.checkpoint(loop.build_finished(finished)).restore()
        if done != iterations:
            raise damaged(store.directory, f"result.json is there but the latest checkpoint is ckpt-{done}, not "
                          f"ckpt-{iterations}", store.remedy)
        return finished
    state = store.latest_state() if store is not None else None
    step = loop.build(state)
    checkpoint = store.checkpoint(step) if store is not None else None
    done = checkpoint.restore() if checkpoint is not None else 0
    clock = LoopClock.resumed(state)
    if done < iterations:
        clock.process_starts.append(done)
    bar = tfb.Progress(iterations, initial=done, label=loop.describe(done), unit_name=unit_name)
    clock.start()
    for i in range(done, iterations):
        bar.update(i + 1, **loop.iteration(i))
        if checkpoint is not None and ((save_every > 0 and (i + 1) % save_every == 0) or i + 1 == iterations):
            if int(step.iterations) != i + 1:
                raise RuntimeError(f"{type(loop).__name__}.iteration must run one hyper-step: {i + 1} iterations "
                                   f"ran {int(step.iterations)}")
            checkpoint.save({**loop.state(), **clock.state()})
        if pause is not None and pause[0] == i + 1:
            pause_to_be_killed(pause[1], pause_seconds)
    clock.stop()
    result = loop.result(clock)
    if store is not None:
        store.save_result(result)
    return result
