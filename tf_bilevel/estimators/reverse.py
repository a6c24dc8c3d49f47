"""Reverse-mode hypergradients: full RMD (Eq. 6), K-RMD (Eq. 8) and checkpointed RMD.

Two backward passes over the last K steps (the first T−K steps run with no tape at all):

* "recompute": explicit. The last K states are stored in the forward pass (O(MK) memory,
  Table 1) and Eq. 6 is applied one VJP per step, each VJP recomputing the step (∇w g under
  a nested tape) from its stored state.
* "store": TF differentiates the recorded while_loop of the K steps, which keeps every
  intermediate of every step (activations, the inner gradient's residuals): no recomputation
  (one fewer forward pass per step), O(K · per-step residuals) memory.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import tensorflow as tf

from tf_bilevel import nonfinite
from tf_bilevel._tree import fill_none_with_zeros
from tf_bilevel.dynamics.loops import Trajectory, run, run_and_record, step_loop
from tf_bilevel.dynamics.transition import Transition
from tf_bilevel.estimators.common import (
    EstimatorOutput,
    init_vjp,
    internal_copy,
    outer_value_and_state_grads,
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
    reach: Any = None,
) -> tuple[list, list]:
    """Eq. 6 over steps start+num_steps … start+1: h ← h + B_t α_t, α_{t−1} ← A_t α_t."""
    start = tf.convert_to_tensor(start, tf.int32)

    def body(i, alpha, h):
        index = num_steps - 1 - i
        state = trajectory.read(index)
        d_state, d_hp = step_vjp(transition, state, hparams, start + index, batch, alpha, reach)
        return i + 1, d_state, [a + b for a, b in zip(h, d_hp)]

    _, alpha, h = step_loop(
        lambda i, *_: i < num_steps, body, (tf.constant(0), alpha, h), num_steps=num_steps, max_steps=max_steps
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
        return j + 1, state, arrays, nonfinite.earliest(marker, seg_marker)

    _, state, arrays, marker = tf.while_loop(
        lambda j, *_: j < num_segments,
        body,
        (tf.constant(0), state, arrays, tf.constant(nonfinite.NONE)),
        maximum_iterations=num_segments,
    )
    return state, Trajectory(arrays, state), marker


def _checkpointed_backward(transition, checkpoints, hparams, batch, *, start, truncate, segment, alpha, h, reach=None):
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
            start=seg_start, num_steps=length, max_steps=segment, alpha=alpha, h=h, reach=reach,
        )
        return i + 1, alpha, h

    _, alpha, h = tf.while_loop(
        lambda i, *_: i < num_segments, body, (tf.constant(0), alpha, h), maximum_iterations=num_segments
    )
    return alpha, h


def _differentiate_stored_steps(transition, state, hparams, inner_batch, outer_batch, *, start, K, reach=None):
    """f(w_T), ∇λ of it through the K steps from `state` (the sum of Eq. 8's terms plus ∇λf), its
    gradient α with respect to `state` (for the B0 term) and the final state, by TF autodiff."""
    problem = transition.problem
    # Copies: w0 may be a hyperparameter tensor itself (a learned init); the tape must tell
    # the path through the state (α, for the B0 term) from the direct one.
    state, hparams = internal_copy(state), internal_copy(hparams)
    flat_state, flat_hp = tf.nest.flatten(state), tf.nest.flatten(hparams)
    with tf.GradientTape() as tape:
        tape.watch([x for x in flat_state if x.dtype.is_floating])
        tape.watch(flat_hp)
        state_in = tf.nest.pack_sequence_as(state, flat_state)
        hp = tf.nest.pack_sequence_as(hparams, flat_hp)

        def body(i, state, marker):
            new_state, loss = transition(state, hp, start + i, inner_batch)
            return i + 1, new_state, nonfinite.mark(marker, loss, start + i)

        _, final, marker = step_loop(
            lambda i, *_: i < K, body, (tf.constant(0), state_in, tf.constant(nonfinite.NONE)), num_steps=K, max_steps=K
        )
        value = problem.outer(final.params, hp, outer_batch, final.model_state)
    d_state, h = tape.gradient(value, (flat_state, flat_hp))
    if reach is not None:
        reach.add(h)
        reach.note_state(d_state)  # f depends on the state
    return value, fill_none_with_zeros(h, flat_hp), fill_none_with_zeros(d_state, flat_state), final, marker


def reverse_hypergradient(
    transition: Transition,
    params: Any,
    hparams: Any,
    inner_batch: Any,
    outer_batch: Any,
    *,
    steps: int,
    truncate: int,
    segment_length: Optional[int] = None,
    opt_state: Any = None,
    store_intermediates: bool = False,
    model_state: Any = (),
    reach: Any = None,
) -> EstimatorOutput:
    """h_{T−K} of Eq. 8 (= d_λ f of Eq. 5/6 when K = T, including the B0 term).

    With `segment_length=c` (checkpointed RMD), only every c-th of the last K states is stored
    and each segment of c steps is recomputed in the backward pass (O(M(K/c + c)) memory, one extra forward pass).
    `opt_state` continues the inner optimizer from a given state (None: a fresh one).
    `store_intermediates=True` uses the "store" backward pass (see the module docstring).
    `model_state`: a stateful problem's s_0; f at s_T is differentiated through s_T too.
    `reach`: a `common.Reach` recording, at trace time, which leaves of λ the gradients reached.
    """
    problem = transition.problem
    T, K = steps, truncate
    w0 = problem.initial_params(params, hparams)
    state = transition.init_state(w0, opt_state, model_state)
    state, marker = run(transition, state, hparams, inner_batch, start=0, num_steps=T - K, max_steps=T - K)
    if store_intermediates and segment_length is None:
        value, h, alpha, final, marker_k = _differentiate_stored_steps(
            transition, state, hparams, inner_batch, outer_batch, start=T - K, K=K, reach=reach
        )
        if K == T:
            num_param_leaves = len(tf.nest.flatten(w0))
            h = [a + b for a, b in zip(h, init_vjp(problem, params, hparams, alpha[:num_param_leaves], reach))]
        final = tf.nest.map_structure(tf.stop_gradient, final)
        return EstimatorOutput(
            value, h, final.params, nonfinite.earliest(marker, marker_k), final.opt_state,
            final_model_state=final.model_state,
        )
    if segment_length is None:
        final, trajectory, marker_k = run_and_record(
            transition, state, hparams, inner_batch, start=T - K, num_steps=K, max_steps=K
        )
    else:
        final, trajectory, marker_k = _checkpointed_forward(
            transition, state, hparams, inner_batch, start=T - K, truncate=K, segment=segment_length
        )
    marker = nonfinite.earliest(marker, marker_k)

    value, alpha, grad_hp = outer_value_and_state_grads(problem, final, hparams, outer_batch, reach)
    if segment_length is None:
        alpha, h = backprop_through(
            transition, trajectory, hparams, inner_batch,
            start=T - K, num_steps=K, max_steps=K, alpha=alpha, h=grad_hp, reach=reach,
        )
    else:
        alpha, h = _checkpointed_backward(
            transition, trajectory, hparams, inner_batch,
            start=T - K, truncate=K, segment=segment_length, alpha=alpha, h=grad_hp, reach=reach,
        )
    if K == T:  # the B0 term of Eq. 5 belongs to full RMD only
        num_param_leaves = len(tf.nest.flatten(w0))
        h = [a + b for a, b in zip(h, init_vjp(problem, params, hparams, alpha[:num_param_leaves], reach))]
    return EstimatorOutput(value, h, final.params, marker, final.opt_state, final_model_state=final.model_state)


# Ops whose values XLA needs at compile time (shapes, permutations) and that a step's inner
# gradient computes inside the loop body: differentiating the recorded loop accumulates them
# per iteration, and XLA then refuses to compile (tensorflow/tensorflow#62861).
_XLA_UNSAFE_WHEN_STORED = frozenset(
    {"InvertPermutation", "ConcatOffset", "BroadcastGradientArgs", "Shape", "ShapeN", "Size", "Rank", "Range", "DynamicStitch"}
)


class StepProfile(NamedTuple):
    residual_bytes: int  # upper bound on what the "store" backward keeps per step
    storable: bool  # False: a step computes a shape-like value that XLA cannot accumulate


def _spec(x: Any) -> Optional[tf.TensorSpec]:
    if x is None:
        return None
    x = tf.convert_to_tensor(x)
    return tf.TensorSpec(x.shape, x.dtype)


def step_profile_key(state: Any, hparams: Any, batch: Any) -> str:
    """What `profile_step` of one transition depends on: the structure and specs of its inputs."""
    return repr(tf.nest.map_structure(_spec, (state, hparams, batch)))


def profile_step(transition: Transition, state: Any, hparams: Any, batch: Any) -> StepProfile:
    """Traces one inner step in a scratch graph (nothing runs): the bytes of every floating-point
    tensor it produces (its forward ops and the inner gradient's), and whether the "store"
    backward pass can compile with XLA."""

    def one_step(state, hparams, batch):
        with tf.GradientTape() as tape:
            tape.watch(tf.nest.flatten(state))
            tape.watch(tf.nest.flatten(hparams))
            new_state, _ = transition(state, hparams, tf.constant(0), batch)
        return new_state

    specs = tf.nest.map_structure(_spec, (state, hparams, batch))
    graph = tf.function(one_step, autograph=False).get_concrete_function(*specs).graph
    total, storable = 0, True
    for op in graph.get_operations():
        storable = storable and op.type not in _XLA_UNSAFE_WHEN_STORED
        if op.type in ("Placeholder", "Const"):  # the step's inputs and constants are not stored per step
            continue
        for out in op.outputs:
            if out.dtype.is_floating and out.shape.is_fully_defined():
                total += out.shape.num_elements() * out.dtype.size
    return StepProfile(total, storable)
