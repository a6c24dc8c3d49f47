"""Compiled loops over inner steps: `tf.while_loop` with a Python-int `maximum_iterations`
(required for differentiable loops under XLA), never Python loops over steps."""

from __future__ import annotations

from typing import Any, NamedTuple

import tensorflow as tf

from tf_bilevel import nonfinite
from tf_bilevel.dynamics.transition import InnerState, Transition

def step_loop(cond, body, loop_vars: tuple, *, num_steps: Any, max_steps: int):
    """`tf.while_loop(cond, body, loop_vars, maximum_iterations=max_steps)`, except that a loop
    statically known to take exactly one step is its body applied once: XLA:CPU runs the
    gradients of convolutions inside a while loop up to ~40× slower than outside (T = K = 1,
    the greedy online setting, has nothing to loop over)."""
    if isinstance(num_steps, int) and num_steps == max_steps == 1:
        return tuple(body(*loop_vars))
    return tf.while_loop(cond, body, loop_vars, maximum_iterations=max_steps)


def run(
    transition: Transition,
    state: InnerState,
    hparams: Any,
    batch: Any,
    *,
    start: Any,
    num_steps: Any,
    max_steps: int,
) -> tuple[InnerState, tf.Tensor]:
    """Applies `num_steps` (≤ `max_steps`) transitions from step `start`, recording no tape.

    Returns the final state and the non-finite marker of these steps (`tf_bilevel.nonfinite`:
    the first step whose inner loss was NaN/Inf, -1 if none).
    """
    marker = tf.constant(nonfinite.NONE, tf.int32)
    if max_steps == 0:
        return state, marker
    hparams = tf.nest.map_structure(tf.stop_gradient, hparams)
    start = tf.convert_to_tensor(start, tf.int32)

    def body(i, state, marker):
        new_state, loss = transition(state, hparams, start + i, batch)
        return i + 1, new_state, nonfinite.mark(marker, loss, start + i)

    _, state, marker = step_loop(
        lambda i, *_: i < num_steps, body, (tf.constant(0), state, marker), num_steps=num_steps, max_steps=max_steps
    )
    return tf.nest.map_structure(tf.stop_gradient, state), marker


class Trajectory(NamedTuple):
    """The states w_start … w_{start+n−1} stored by `run_and_record` (O(M·n) memory)."""

    arrays: list
    structure: Any

    def read(self, index: tf.Tensor) -> InnerState:
        return tf.nest.pack_sequence_as(self.structure, [ta.read(index) for ta in self.arrays])


def run_and_record(
    transition: Transition,
    state: InnerState,
    hparams: Any,
    batch: Any,
    *,
    start: Any,
    num_steps: Any,
    max_steps: int,
) -> tuple[InnerState, Trajectory, tf.Tensor]:
    """Like `run`, but also stores the state before each step, for the backward pass."""
    flat = tf.nest.flatten(state)
    arrays = [
        tf.TensorArray(x.dtype, size=max_steps, element_shape=x.shape, clear_after_read=False) for x in flat
    ]
    hparams = tf.nest.map_structure(tf.stop_gradient, hparams)
    start = tf.convert_to_tensor(start, tf.int32)

    def body(i, state, arrays, marker):
        arrays = [ta.write(i, x) for ta, x in zip(arrays, tf.nest.flatten(state))]
        new_state, loss = transition(state, hparams, start + i, batch)
        return i + 1, new_state, arrays, nonfinite.mark(marker, loss, start + i)

    _, state, arrays, marker = step_loop(
        lambda i, *_: i < num_steps,
        body,
        (tf.constant(0), state, arrays, tf.constant(nonfinite.NONE, tf.int32)),
        num_steps=num_steps,
        max_steps=max_steps,
    )
    return tf.nest.map_structure(tf.stop_gradient, state), Trajectory(arrays, state), marker
