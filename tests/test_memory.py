"""K-RMD's memory is flat in T, full RMD's grows with T (Table 1: O(MK) vs O(MT)), measured
in-process on TF's CPU allocator (experiments.common.memory.PeakMemory: the peak of
`tf.config.experimental.get_memory_info("CPU:0")` after `reset_memory_stats`), which counts
every buffer alive at once during the call. Allocator peaks do not depend on load, unlike time,
but they do depend on what ran before in the process: TF's BFC allocator hands out a free chunk
whole when it is less than twice the request, so a buffer can count up to 2x its size, on either
side of a comparison. The flat-in-T bound is therefore a ratio < 3, against the >= 10x that holding
the T states (O(T)) would read at T = 500 over T = 50.

The hypergradient runs under XLA (the compiled path, the proxy for the GPU one): TF 2.21's
CPU allocator statistics count XLA's buffers and eager tensors, while the plain tf.function
executor's CPU allocations read 0. backward="recompute" stores exactly the K states (Eq. 8);
"store" keeps every intermediate of the last K steps (more per step, still O(K)).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import tf_bilevel as tfb
from experiments.common.memory import PeakMemory

D = 20_000  # parameters: one float32 state is 80 kB
STATE_BYTES = D * 4
K = 5
HORIZONS = (50, 500)
TARGET = np.linspace(-1.0, 1.0, D).astype(np.float32)


def inner_loss(w, lam):
    return 0.5 * tf.reduce_sum(tf.exp(lam) * (w - TARGET) ** 2)


def outer_loss(w, lam):
    return 0.5 * tf.reduce_sum((w - 0.5) ** 2)


def allocator_peak(steps: int, truncate, backward: str) -> int:
    """Peak bytes the allocator held above its level before a (compiled, warmed-up) call."""
    hg = tfb.hypergradient_fn(inner_loss, outer_loss, steps=steps, truncate=truncate, learning_rate=0.1,
                              jit_compile=True, backward=backward)
    w0, lam = tf.zeros([D]), tf.zeros([D])
    hg(w0, lam)[1].numpy()  # trace and compile outside the measurement
    with PeakMemory() as memory:
        _, hypergrad = hg(w0, lam)
        hypergrad.numpy()
    assert memory.allocator_peak_growth is not None, "TF keeps no CPU allocator statistics here"
    return memory.allocator_peak_growth


@pytest.fixture(scope="module")
def peaks() -> dict:
    return {(backward, T, k): allocator_peak(T, k, backward)
            for backward in ("recompute", "store") for T in HORIZONS for k in (K, None)}


@pytest.mark.parametrize("backward", ["recompute", "store"])
def test_truncated_rmd_peak_is_the_same_at_T_50_and_T_500(peaks, backward):
    short, long = (peaks[backward, T, K] for T in HORIZONS)
    assert short > STATE_BYTES  # it measured the call (at least the K states and w_T)
    assert max(short, long) < 3 * min(short, long), (short, long)  # O(T) would read >= 10x


def test_truncated_rmd_recompute_holds_about_K_states(peaks):
    for T in HORIZONS:
        assert peaks["recompute", T, K] < 4 * K * STATE_BYTES, peaks["recompute", T, K] / STATE_BYTES


@pytest.mark.parametrize("backward", ["recompute", "store"])
def test_full_rmd_peak_grows_with_T(peaks, backward):
    short, long = (peaks[backward, T, None] for T in HORIZONS)
    assert long >= 3 * short, (short, long)  # T grows 10x; the T = 50 peak can read up to 2x
    assert long >= HORIZONS[-1] * STATE_BYTES  # the T states are alive at once
    assert long >= 20 * peaks[backward, HORIZONS[-1], K]

