"""Wall and CPU time of calls that return TF values (the time includes waiting for them),
round-robin timing of several calls so that a change of machine load hits each alike, and the
wall time per phase of a program for results.json. (Progress display: `tf_bilevel.Progress`.)"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Hashable, Iterator, Mapping, MutableMapping, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf


class Timing(NamedTuple):
    wall: float
    cpu: float  # process CPU time, all threads: much less sensitive to other processes' load


def timed(fn: Callable[[], Any]) -> tuple[Timing, list]:
    """(the time of `fn()`, its result's leaves as NumPy arrays: converting them waits for them)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = [np.asarray(x) for x in tf.nest.flatten(fn())]
    return Timing(time.perf_counter() - wall, time.process_time() - cpu), out


def block(values: Any) -> None:
    """Waits for the TF values in the structure `values` (converting them to NumPy waits for them)."""
    tf.nest.map_structure(np.asarray, values)


def wall_seconds(call: Callable[[], Any]) -> float:
    """Wall time of `call()` (which should wait for its own results: `block`)."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def round_robin(calls: Mapping[Hashable, Callable[[], Any]], rounds: int) -> dict[Hashable, list[Timing]]:
    """`rounds` timings of every call, taken in turn (a, b, …, a, b, …)."""
    timings = {key: [] for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            timings[key].append(timed(call)[0])
    return timings


def round_robin_medians(calls: Mapping[Hashable, Callable[[], Any]], rounds: int,
                        unit: str = "iteration") -> dict[Hashable, dict]:
    """`round_robin`, per call: the rounds, the median wall and CPU seconds (as
    seconds_per_<unit>_median, cpu_seconds_per_<unit>_median) and every wall time."""
    return {key: {"rounds": rounds, f"seconds_per_{unit}_median": float(np.median([t.wall for t in ts])),
                  f"cpu_seconds_per_{unit}_median": float(np.median([t.cpu for t in ts])),
                  "wall_seconds": [t.wall for t in ts]} for key, ts in round_robin(calls, rounds).items()}


def median(timings: Sequence[Timing]) -> Timing:
    """The median wall and the median CPU time (each on its own)."""
    return Timing(statistics.median(t.wall for t in timings), statistics.median(t.cpu for t in timings))


def alternate(fn: Callable[[], Any], floor: Optional[Callable[[], Any]], repeats: int) -> tuple[list, list]:
    """(timings of `fn`, of `floor`), `repeats` of each taken in turn so that a change of machine
    load hits both alike; without a floor, its timings are fn's."""
    times, floor_times = [], []
    for _ in range(repeats):
        if floor is not None:
            floor_times.append(timed(floor)[0])
        times.append(timed(fn)[0])
    return times, floor_times or times


class FloorRun(NamedTuple):
    """What `against_floor` measured: the built objects, the first call (build + trace + compile
    + run) with its result, the memory of the first and of one steady call (PeakMemory), the
    floor's first call, and the alternating timings."""

    built: Any
    first: Timing
    first_out: list
    first_memory: Any
    steady_memory: Any
    floor_first: Timing
    times: list
    floor_times: list

    def row(self) -> dict:
        """The times and memory of a benchmark row: every timed call's wall and CPU seconds (and
        the floor's), the medians, the ratios over the floor (median wall time, fastest wall
        time, median CPU time), the compile time (first call − median, wall and CPU), RSS before
        the first call, the process's and the allocator's peak growth in the first call and the
        allocator's in a steady call."""
        mid, floor_mid = median(self.times), median(self.floor_times)
        return {
            "repeats": len(self.times),
            "times_seconds": [t.wall for t in self.times],
            "cpu_times_seconds": [t.cpu for t in self.times],
            "floor_times_seconds": [t.wall for t in self.floor_times],
            "floor_cpu_times_seconds": [t.cpu for t in self.floor_times],
            "median_seconds": mid.wall,
            "floor_median_seconds": floor_mid.wall,
            "time_over_floor": mid.wall / floor_mid.wall,
            "min_time_over_floor": min(t.wall for t in self.times) / min(t.wall for t in self.floor_times),
            "cpu_over_floor": mid.cpu / floor_mid.cpu,
            "first_call_seconds": self.first.wall,
            "compile_seconds": max(self.first.wall - mid.wall, 0.0),
            "compile_cpu_seconds": max(self.first.cpu - mid.cpu, 0.0),
            "floor_compile_seconds": max(self.floor_first.wall - floor_mid.wall, 0.0),
            "rss_before_bytes": self.first_memory.rss_before,
            "process_peak_growth_bytes": self.first_memory.process_peak_growth,
            "first_call_allocator_peak_growth_bytes": self.first_memory.allocator_peak_growth,
            "allocator_peak_growth_bytes": self.steady_memory.allocator_peak_growth,
        }


def against_floor(build: Callable[[], tuple[Any, Callable[[], Any], Callable[[], Any]]], is_floor: bool,
                  repeats: Callable[[Timing, Callable[[], Any]], int]) -> FloorRun:
    """Measures `fn` against `floor` ((built, fn, floor) = build(), the build timed with the first
    call): `repeats(steady timing, floor)` alternating calls of each. With `is_floor`, fn is the
    floor itself and is timed alone."""
    from experiments.common.memory import PeakMemory

    with PeakMemory() as first_memory:
        wall, cpu = time.perf_counter(), time.process_time()
        built, fn, floor = build()
        _, first_out = timed(fn)
        first = Timing(time.perf_counter() - wall, time.process_time() - cpu)
    with PeakMemory() as steady_memory:
        warm, _ = timed(fn)
    floor_first = first if is_floor else timed(floor)[0]
    times, floor_times = alternate(fn, None if is_floor else floor, repeats(warm, floor))
    return FloorRun(built, first, first_out, first_memory, steady_memory, floor_first, times, floor_times)


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
            times[name].append(wall_seconds(lambda: step(r)))
    return {name: float(np.median(t)) for name, t in times.items()}
