"""Tests for experiments/checkpoint_store.run_resumable, the skeleton of the programs' resumable
loops of hyper-steps: a run interrupted after a checkpoint and rerun makes the calls of the lost
iterations again from that checkpoint and ends with the values of an uninterrupted run; a
finished run is not rerun; a result of another loop is refused."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import pytest
import tensorflow as tf

import tf_bilevel as tfb

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `experiments` is not an installed package.
from experiments.common.checkpoint_store import LoopClock, LoopStore, run_resumable  # noqa: E402
from experiments.common.run_state import StateFileError  # noqa: E402

ITERATIONS, SAVE_EVERY = 10, 4


class Interrupted(Exception):
    """Stands for a kill: the process stops in the middle of an iteration."""


def _inner(w, lam):
    return 0.5 * tf.reduce_sum((w - 1.0) ** 2) + 0.5 * tf.exp(lam) * tf.reduce_sum(w**2)


def _outer(w, lam):
    return 0.5 * tf.reduce_sum((w - 2.0) ** 2)


class StepLoop:
    """Hyper-steps of λ (Adam) on a 2-parameter ridge problem: λ and Adam's state are the
    checkpointed state, the outer values f(w_T(λ_k)) a Python list (the sidecar); records every
    call. `stop_at`: raise `Interrupted` at that iteration."""

    def __init__(self, stop_at: Optional[int] = None):
        self.stop_at, self.calls = stop_at, []
        self.step: Optional[tfb.HyperStep] = None
        self.values: list = []

    def _build(self) -> tfb.HyperStep:
        hg = tfb.hypergradient_fn(_inner, _outer, steps=3, learning_rate=0.3, jit_compile=False)
        self.step = tfb.HyperStep(hg, tf.constant(0.5), tfb.adam(0.1))
        return self.step

    def build(self, state: Optional[dict]) -> tfb.HyperStep:
        self.calls.append(("build", None if state is None else len(state["values"])))
        self.values = [] if state is None else list(state["values"])
        return self._build()

    def build_finished(self, result: dict) -> tfb.HyperStep:
        self.calls.append(("build_finished", result["lam"]))
        return self._build()

    def describe(self, done: int) -> str:
        return f"step loop from {done}"

    def iteration(self, i: int) -> dict:
        self.calls.append(("iteration", i))
        if i == self.stop_at:
            raise Interrupted
        self.values.append(float(self.step(tf.zeros([2])).outer_value))
        return {"f": self.values[-1]}

    def state(self) -> dict:
        return {"values": self.values}

    def result(self, clock: LoopClock) -> dict:
        assert clock.total_seconds is not None  # stopped
        return {"lam": float(self.step.hparams.numpy()), "values": self.values,
                "process_starts": clock.process_starts, "steady_values": clock.steady(self.values), "name": "steps"}


def _store(directory: Path, name: str = "steps") -> LoopStore:
    return LoopStore(directory, f"delete {directory}", state_keys=["values", *LoopClock.KEYS],
                     result_keys=["lam", "values"], identity={"name": name})


def test_interrupted_run_resumed_makes_the_calls_and_values_of_an_uninterrupted_one(tmp_path):
    reference = StepLoop()
    expected = run_resumable(reference, _store(tmp_path / "reference"), ITERATIONS, SAVE_EVERY)
    assert reference.calls == [("build", None)] + [("iteration", i) for i in range(ITERATIONS)]
    assert expected["process_starts"] == [0]
    assert expected["steady_values"] == expected["values"][1:]  # the first (compiling) iteration left out

    # Interrupted in iteration 6: the checkpoint after 4 iterations is the latest; 4 and 5 are lost.
    with pytest.raises(Interrupted):
        run_resumable(StepLoop(stop_at=6), _store(tmp_path / "run"), ITERATIONS, SAVE_EVERY)
    resumed = StepLoop()
    result = run_resumable(resumed, _store(tmp_path / "run"), ITERATIONS, SAVE_EVERY)
    assert resumed.calls == [("build", 4)] + [("iteration", i) for i in range(4, ITERATIONS)]
    assert result["lam"] == expected["lam"] and result["values"] == expected["values"]
    assert len(result["values"]) == ITERATIONS  # none lost, none repeated
    assert result["process_starts"] == [0, 4]
    assert result["steady_values"] == [v for i, v in enumerate(expected["values"]) if i not in (0, 4)]
    assert sorted(p.name for p in (tmp_path / "run").glob("state-*.json")) == [f"state-{ITERATIONS}.json"]

    # Finished: not rerun; its variables are restored at the last checkpoint.
    again = StepLoop()
    assert run_resumable(again, _store(tmp_path / "run"), ITERATIONS, SAVE_EVERY) == result
    assert again.calls == [("build_finished", result["lam"])]
    assert float(again.step.hparams.numpy()) == result["lam"]


def test_without_a_store_nothing_is_saved_and_a_pause_comes_after_its_checkpoint(tmp_path):
    unsaved = run_resumable(StepLoop(), None, 3, SAVE_EVERY)
    assert not list(tmp_path.iterdir())
    assert unsaved["values"] == run_resumable(StepLoop(), _store(tmp_path / "saved"), 3, SAVE_EVERY)["values"]

    marker = tmp_path / "paused_at_4"
    Path(f"{marker}.continue").touch()  # the paused run goes on at once instead of waiting to be killed
    seen = []
    loop = StepLoop()
    iteration = loop.iteration
    loop.iteration = lambda i: (seen.append((i, marker.exists(), (tmp_path / "run" / "state-4.json").exists())),
                                iteration(i))[1]
    run_resumable(loop, _store(tmp_path / "run"), 6, SAVE_EVERY, pause=(4, marker))
    assert seen[3] == (3, False, False) and seen[4] == (4, True, True)  # after iteration 4 and its checkpoint


def test_result_of_another_loop_is_refused(tmp_path):
    run_resumable(StepLoop(), _store(tmp_path), 2, SAVE_EVERY)
    with pytest.raises(StateFileError, match="it holds name 'steps', not 'other'"):
        run_resumable(StepLoop(), _store(tmp_path, name="other"), 2, SAVE_EVERY)
