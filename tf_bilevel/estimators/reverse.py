"""Reverse-mode hypergradients: full RMD (Eq. 6), K-RMD (Eq. 8) and checkpointed RMD.

The backward pass is explicit: the last K states are stored in the forward pass (O(MK)
memory, Table 1) and Eq. 6 is applied one VJP per step, each VJP recomputing ∇w g under a
nested tape. The first T−K steps run with no tape at all.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import tensorflow as tf

from tf_bilevel.dynamics.loops import Trajectory, earliest_nonfinite, run, run_and_record
from tf_bilevel.dynamics.transition import Transition
from tf_bilevel.estimators.common import (
    EstimatorOutput,
    init_vjp,
    outer_value_and_grads,
    state_cotangent,
    step_vjp,
)


def backprop_through(
    transition: Transition,
    trajectory: Trajectory,
    hparams: Any,
    batch: Any,
    *,
    start: Any,
    num_steps: Any,
    max_steps: int,
    alpha: list,
    h: list,
) -> tuple[list, list]:
    """Eq. 6 over steps start+num_steps … start+1: h ← h + B_t α_t, α_{t−1} ← A_t α_t."""
    start = tf.convert_to_tensor(start, tf.int32)

    def body(i, alpha, h):
        index = num_steps - 1 - i
        state = trajectory.read(index)
        d_state, d_hp = step_vjp(transition, state, hparams, start + index, batch, alpha)
        return i + 1, d_state, [a + b for a, b in zip(h, d_hp)]

    _, alpha, h = tf.while_loop(
        lambda i, *_: i < num_steps, body, (tf.constant(0), alpha, h), maximum_iterations=max_steps
    )
    return alpha, h


def _checkpointed_forward(transition, state, hparams, batch, *, start, truncate, segment):
    """Runs `truncate` steps storing only the state at the start of every segment."""
    num_segments = math.ceil(truncate / segment)
    flat = tf.nest.flatten(state)
    arrays = [tf.TensorArray(x.dtype, size=num_segments, element_shape=x.shape, clear_after_read=False) for x in flat]

    def body(j, state, arrays, marker):
        arrays = [ta.write(j, x) for ta, x in zip(arrays, tf.nest.flatten(state))]
        length = tf.minimum(segment, truncate - j * segment)
        state, seg_marker = run(
            transition, state, hparams, batch, start=start + j * segment, num_steps=length, max_steps=segment
        )
        return j + 1, state, arrays, earliest_nonfinite(marker, seg_marker)

    _, state, arrays, marker = tf.while_loop(
        lambda j, *_: j < num_segments,
        body,
        (tf.constant(0), state, arrays, tf.constant(-1)),
        maximum_iterations=num_segments,
    )
    return state, Trajectory(arrays, state), marker


def _checkpointed_backward(transition, checkpoints, hparams, batch, *, start, truncate, segment, alpha, h):
    """Recomputes each segment from its checkpoint, newest first, and back-propagates through it."""
    num_segments = math.ceil(truncate / segment)

    def body(i, alpha, h):
        j = num_segments - 1 - i
        seg_start = start + j * segment
        length = tf.minimum(segment, truncate - j * segment)
        _, trajectory, _ = run_and_record(
            transition, checkpoints.read(j), hparams, batch, start=seg_start, num_steps=length, max_steps=segment
        )
        alpha, h = backprop_through(
            transition, trajectory, hparams, batch,
            start=seg_start, num_steps=length, max_steps=segment, alpha=alpha, h=h,
        )
        return i + 1, alpha, h

    _, alpha, h = tf.while_loop(
        lambda i, *_: i < num_segments, body, (tf.constant(0), alpha, h), maximum_iterations=num_segments
    )
    return alpha, h


def reverse_hypergradient(
    transition: Transition,
    params: Any,
    hparams: Any,
    inner_batch: Any,
    outer_batch: Any,
    *,
    steps: int,
    truncate: int,
    checkpoint_segment: Optional[int] = None,
    opt_state: Any = None,
) -> EstimatorOutput:
    """h_{T−K} of Eq. 8 (= d_λ f of Eq. 5/6 when K = T, including the B0 term).

    With `checkpoint_segment=c`, only every c-th of the last K states is stored and each
    segment is recomputed in the backward pass (O(M(K/c + c)) memory, one extra forward pass).
    `opt_state` continues the inner optimizer from a given state (None: a fresh one).
    """
    problem = transition.problem
    T, K = steps, truncate
    w0 = problem.initial_params(params, hparams)
    state = transition.init_state(w0, opt_state)
    state, marker = run(transition, state, hparams, inner_batch, start=0, num_steps=T - K, max_steps=T - K)
    if checkpoint_segment is None:
        final, trajectory, marker_k = run_and_record(
            transition, state, hparams, inner_batch, start=T - K, num_steps=K, max_steps=K
        )
    else:
        final, trajectory, marker_k = _checkpointed_forward(
            transition, state, hparams, inner_batch, start=T - K, truncate=K, segment=checkpoint_segment
        )
    marker = earliest_nonfinite(marker, marker_k)

    value, grad_w, grad_hp = outer_value_and_grads(problem, final.params, hparams, outer_batch)
    alpha = state_cotangent(grad_w, final)
    if checkpoint_segment is None:
        alpha, h = backprop_through(
            transition, trajectory, hparams, inner_batch,
            start=T - K, num_steps=K, max_steps=K, alpha=alpha, h=grad_hp,
        )
    else:
        alpha, h = _checkpointed_backward(
            transition, trajectory, hparams, inner_batch,
            start=T - K, truncate=K, segment=checkpoint_segment, alpha=alpha, h=grad_hp,
        )
    if K == T:  # the B0 term of Eq. 5 belongs to full RMD only
        num_param_leaves = len(tf.nest.flatten(w0))
        h = [a + b for a, b in zip(h, init_vjp(problem, params, hparams, alpha[:num_param_leaves]))]
    return EstimatorOutput(value, h, final.params, marker, final.opt_state)
