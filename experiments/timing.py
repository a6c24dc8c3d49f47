"""Wall time for results.json: per phase of a program, and the median time of several methods'
steps measured round by round (interleaved, so that they all see the same machine load).
(Progress display: `tf_bilevel.Progress`.)"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, Mapping, MutableMapping

import numpy as np


@contextlib.contextmanager
def phase(seconds: MutableMapping[str, float], name: str) -> Iterator[None]:
    """Adds the wall time of the block to `seconds[name]` (tracing and compilation included)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


def interleaved_median_seconds(steps: Mapping[str, Callable[[int], object]], rounds: int) -> dict[str, float]:
    """Median wall time of `steps[name](round)` over `rounds` rounds, every round calling each step
    once in turn: the methods share the machine's load instead of each getting its own."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step(r)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}
