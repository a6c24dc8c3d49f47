"""Peak-memory probes for the benchmark: process RSS (Linux /proc) and TF's CPU allocator; and
the weight-sized states each estimator keeps (`stored_states`, Table 1).

Two views of "how much memory did this computation need":

* process: the resident-set high-water mark (VmHWM) minus the RSS at the start. The mark is
  reset by writing "5" to /proc/self/clear_refs (Linux >= 4.0); where that is not possible
  the lifetime maximum `ru_maxrss` is used, which is only meaningful in a fresh process.
  It includes everything: tracing, XLA compilation, and the allocator's cached pools.
* allocator: `tf.config.experimental.get_memory_info("CPU:0")` peak minus current, after
  `reset_memory_stats`. It counts the tensors and XLA buffers alive at once during the call
  (the working set the paper's Table 1 is about), not compiler memory.
"""

from __future__ import annotations

import math
import resource
from typing import Callable, Optional

import tensorflow as tf

_DEVICE = "CPU:0"


def stored_states(estimator: str, truncate: Optional[int]) -> Optional[int]:
    """The weight-sized states an estimator keeps alive (Table 1's space, in units of M): K for
    K-RMD ("reverse"), ⌈K/s⌉ + s for checkpointed RMD with segments of s = ⌈√K⌉, 2 for forward
    mode (w_t and one tangent column), 4 for implicit CG (x, r, p, H p), 0 for the floor; None for
    another estimator."""
    if estimator == "floor":
        return 0
    if estimator == "reverse":
        return truncate
    if estimator == "checkpointed":
        segment = max(1, math.ceil(math.sqrt(truncate)))
        return math.ceil(truncate / segment) + segment
    return {"forward": 2, "implicit_cg": 4}.get(estimator)


def _status_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def current_rss() -> int:
    """Resident set size now, in bytes (the lifetime peak where /proc is unavailable)."""
    rss = _status_bytes("VmRSS")
    return rss if rss is not None else peak_rss()


def peak_rss() -> int:
    """Resident-set high-water mark since the last `reset_peaks`, in bytes."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _allocator_info() -> Optional[dict]:
    try:
        return tf.config.experimental.get_memory_info(_DEVICE)
    except (ValueError, RuntimeError):  # allocator without statistics
        return None


class PeakMemory:
    """Context manager: peak memory growth of the enclosed code, in bytes.

    After exit: `rss_before`, `process_peak_growth` (VmHWM − RSS before; None if the peak
    could not be reset and is older than the block) and `allocator_peak_growth` (None if TF
    keeps no statistics for the CPU allocator).
    """

    def __enter__(self) -> "PeakMemory":
        self.rss_before = current_rss()
        self.peak_was_reset = _reset_rss_peak()
        self.peak_before_block = peak_rss()
        info = None
        try:
            tf.config.experimental.reset_memory_stats(_DEVICE)
            info = _allocator_info()
        except (ValueError, RuntimeError):
            pass
        self._allocator_before = None if info is None else info["current"]
        return self

    def __exit__(self, *exc) -> None:
        peak = peak_rss()
        # Without a reset, a peak reached before the block hides the block's own peak.
        trustworthy = self.peak_was_reset or peak > self.peak_before_block
        self.process_peak_growth = peak - self.rss_before if trustworthy else None
        info = _allocator_info()
        if info is None or self._allocator_before is None:
            self.allocator_peak_growth = None
        else:
            self.allocator_peak_growth = info["peak"] - self._allocator_before


# What `probe` records, for a results.json.
PROBE_METHOD = (
    "fresh subprocess per configuration. steady_allocator_peak_growth: peak minus current bytes of TF's CPU "
    "allocator (tf.config.experimental.get_memory_info, after reset_memory_stats) over the steady-state calls = "
    "the working set of tensors and XLA buffers; first_call / steady_peak_growth: process RSS high-water mark "
    "(VmHWM, reset via /proc/self/clear_refs) minus RSS before, first call = build + trace + XLA compile + run")


def probe(build: Callable[[], Callable[[], object]], steady_calls: int) -> dict:
    """Memory of `call = build()` in THIS process (call it in a fresh one): the first call (with
    the build: tracing and compilation) and `steady_calls` more, as bytes."""
    with PeakMemory() as first:
        call = build()
        call()
    with PeakMemory() as steady:
        for _ in range(steady_calls):
            call()
    return {
        "rss_before_bytes": first.rss_before,
        "first_call_peak_growth_bytes": first.process_peak_growth,
        "steady_peak_growth_bytes": steady.process_peak_growth,
        "steady_allocator_peak_growth_bytes": steady.allocator_peak_growth,
        "final_rss_bytes": current_rss(),
        "process_peak_rss_bytes": peak_rss() if not first.peak_was_reset else None,
    }


def mib(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def format_probes(probes: dict, names: dict) -> list[str]:
    """Text lines of `probe` records (each may be {"error": ...}): `names[key]` names each."""
    lines = ["Memory, fresh process each (MiB): TF allocator peak of a steady call (working set) | RSS peak "
             "growth of the first call (incl. XLA compile) / of steady calls | stored states"]
    for key, record in probes.items():
        if "error" in record:
            lines.append(f"  {names[key]:>7}: error {record['error'][-200:]}")
        else:
            lines.append(f"  {names[key]:>7}: {mib(record['steady_allocator_peak_growth_bytes']):>6} | "
                         f"{mib(record['first_call_peak_growth_bytes']):>7} / "
                         f"{mib(record['steady_peak_growth_bytes']):>5} | {mib(record.get('stored_state_bytes'))}")
    return lines
