"""Forward-mode hypergradient (FMD, Eq. 7): Z_0 = B_0, Z_{t+1} = Z_t A_{t+1} + B_{t+1},
d_λ f = Z_T ∇w f + ∇λ f, with Z carried across calls (real-time hypergradients, RTHO).

Z holds one tangent column per hyperparameter coordinate (N in all) for every leaf of the
dynamical system's state: the weights and the inner optimizer's state (momentum, Adam moments;
paper, footnote 2). All N columns advance together, in one pass over the inner steps: each step
is one JVP (forward-over-reverse through ∇w g) vectorized over the columns with
`tf.vectorized_map`, whose primal part does not depend on the column and so is computed once.

Carrying Z across calls gives the exact hypergradient of the current outer loss through the
whole run so far (Franceschi et al. 2017, RTHO); multiplying the carried Z by `forget` = μ at the
start of a call interpolates between that (μ = 1) and a fresh start (μ = 0, greedy): MARTHE
(Donini et al. 2020). Time O(cNT), memory O(MN) (Table 1).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tf_bilevel import nonfinite
from tf_bilevel.dynamics.loops import step_loop
from tf_bilevel.dynamics.optimizers import cast_scalar
from tf_bilevel.dynamics.transition import InnerState, Transition
from tf_bilevel.estimators import _pfor, _pfor_conv
from tf_bilevel.estimators.common import EstimatorOutput, internal_copy, outer_value_and_state_grads

_ZERO = tf.UnconnectedGradients.ZERO


def num_hparams(hparams: Any) -> int:
    """N, the number of hyperparameter coordinates (tangent columns)."""
    flat = tf.nest.flatten(hparams)
    if any(not x.shape.is_fully_defined() for x in flat):
        raise ValueError("estimator='forward' needs hyperparameters with fully defined shapes (N is static)")
    return sum(int(x.shape.num_elements()) for x in flat)


def tangent_bytes(state: Any, columns: int) -> int:
    """Bytes of N tangent columns of every leaf of `state` (weights + optimizer state)."""
    return columns * sum(int(x.shape.num_elements()) * x.dtype.size for x in tf.nest.flatten(state))


def check_tangent_memory(state: Any, columns: int, memory_budget: int) -> None:
    """Forward mode's memory bound: N tangent columns of the whole state (Table 1: O(MN)) must
    fit `memory_budget` bytes; otherwise a ValueError naming K-RMD, whose memory is O(MK)."""
    needed = tangent_bytes(state, columns)
    if needed > memory_budget:
        size = sum(int(x.shape.num_elements()) for x in tf.nest.flatten(state))
        raise ValueError(
            f"estimator='forward' carries N={columns} tangent columns (one per hyperparameter coordinate) of "
            f"the {size} weights, optimizer-state and model-state entries: {needed} bytes, more than "
            f"memory_budget={memory_budget}. Forward mode's memory grows as M·N (Table 1): for "
            "many hyperparameters use K-RMD, estimator='reverse' with truncate=K (memory O(MK), "
            "independent of N), or raise memory_budget if the memory is there."
        )


def basis(hparams: Any) -> list:
    """The identity of R^N as the hyperparameter tangents: per leaf of shape s, a [N, *s] tensor
    whose row n is e_n restricted to that leaf (leaves in tf.nest order, each row-major)."""
    flat = tf.nest.flatten(hparams)
    sizes = [int(x.shape.num_elements()) for x in flat]
    total = sum(sizes)
    parts, offset = [], 0
    for x, size in zip(flat, sizes):
        rows = tf.one_hot(tf.range(offset, offset + size), total, dtype=x.dtype, axis=0)  # [N, size]
        parts.append(tf.reshape(rows, [total] + x.shape.as_list()))
        offset += size
    return parts


def zero_tangents(state: Any, columns: int) -> Any:
    return tf.nest.map_structure(lambda x: tf.zeros([columns] + x.shape.as_list(), x.dtype), state)


def _batched_jvp(fn, primals: list, primal_tangents: list, hparams: list, hparam_tangents: list):
    """fn() and its JVPs along N directions at once: (outputs, [N, ...] tangents of every output).

    The directions are row n of every tangent. The primal computation inside the vectorized
    function reads no loop-variant value, so `tf.vectorized_map` (pfor) leaves it unbatched."""
    structure: list = []

    def one_column(tangents):
        with tf.autodiff.ForwardAccumulator(primals + hparams, list(tangents)) as acc:
            out = fn()
        structure.append(out)
        # tf.identity: an output may be a tensor of the enclosing graph (e.g. an init_params that
        # ignores its arguments), which pfor cannot return (an UnboundLocalError in TF 2.21).
        flat_out = tf.nest.flatten(out)
        flat_dot = [acc.jvp(y, unconnected_gradients=_ZERO) for y in flat_out]
        return [tf.identity(y) for y in flat_out], [tf.identity(y) for y in flat_dot]

    with _pfor_conv.forward_mode():  # pfor converts here: grouped convolutions are refused by name
        flat_out, flat_dot = tf.vectorized_map(one_column, list(primal_tangents) + list(hparam_tangents))
    # pfor returns the unbatched primal outputs broadcast over the N columns: row 0 is the value
    # (XLA folds the slice of a broadcast; the primal ops themselves exist once).
    out = tf.nest.pack_sequence_as(structure[0], [y[0] for y in flat_out])
    return out, tf.nest.pack_sequence_as(structure[0], flat_dot)


def forward_hypergradient(
    transition: Transition,
    params: Any,
    hparams: Any,
    inner_batch: Any,
    outer_batch: Any,
    *,
    steps: int,
    opt_state: Any = None,
    tangents: Any = None,
    forget: float = 1.0,
    model_state: Any = (),
) -> EstimatorOutput:
    """d_λ f = Z_T ∇w f + ∇λ f (Eq. 7), all N columns of Z in one pass over the T steps.

    `tangents`: Z of a previous call (`InnerState` of [N, ...] leaves, the previous result's
    `final_tangents`), multiplied by `forget`; None starts from zero. Either way Z_0 is then the
    total derivative of w0 = Ξ0(params, λ): J_params Ξ0 · (μZ) + B_0. `model_state`: a stateful
    problem's s_0; Z then also holds ds_t/dλ (s_t depends on λ through w), and f at s_T is
    differentiated through s_T too."""
    _pfor.install()  # also at hypergradient_fn: a RuntimeError where this TF's pfor differs
    problem = transition.problem
    flat_hp = tf.nest.flatten(hparams)
    n = num_hparams(hparams)
    hp_basis = basis(hparams)

    hp = internal_copy(hparams)
    if tangents is None:
        carried = zero_tangents(transition.init_state(params, opt_state, model_state), n)
    elif forget == 1.0:
        carried = tangents
    else:
        carried = tf.nest.map_structure(lambda z: cast_scalar(forget, z.dtype) * z, tangents)

    if problem.init_params is None:
        w0, w0_dot = params, carried.params
    else:
        flat_params, flat_hp_in = tf.nest.flatten(params), tf.nest.flatten(hp)

        def init():
            return problem.initial_params(
                tf.nest.pack_sequence_as(params, flat_params), tf.nest.pack_sequence_as(hparams, flat_hp_in)
            )

        w0, w0_dot = _batched_jvp(init, flat_params, tf.nest.flatten(carried.params), flat_hp_in, hp_basis)
    state = transition.init_state(w0, opt_state, model_state)
    state_dot = InnerState(w0_dot, carried.opt_state, carried.model_state)

    def body(t, state, state_dot, marker):
        hp_in = internal_copy(hparams)
        flat_state, flat_hp_in = tf.nest.flatten(state), tf.nest.flatten(hp_in)

        def step():
            return transition(
                tf.nest.pack_sequence_as(state, flat_state), tf.nest.pack_sequence_as(hparams, flat_hp_in), t, inner_batch
            )

        (new_state, loss), (new_dot, _) = _batched_jvp(
            step, flat_state, tf.nest.flatten(state_dot), flat_hp_in, hp_basis
        )
        return t + 1, new_state, new_dot, nonfinite.mark(marker, loss, t)

    if tf.executing_eagerly():
        # vectorized_map traces its function on every call when run eagerly: trace the step once.
        body = tf.function(body, autograph=False)
    _, state, state_dot, marker = step_loop(
        lambda t, *_: t < steps,
        body,
        (tf.constant(0), state, state_dot, tf.constant(nonfinite.NONE)),
        num_steps=steps,
        max_steps=steps,
    )
    value, alpha, grad_hp = outer_value_and_state_grads(problem, state, hp, outer_batch)
    # Z_T α_T: per state leaf, its [N, ...] tangents contracted with ∂f on the leaf's axes (the
    # weights' ∇w f and, for a stateful problem, the model state's ∇s f; f ignores opt_state).
    flat_dot = tf.nest.flatten(state_dot)
    first = len(tf.nest.flatten(state.params))
    skip = set(range(first, first + len(tf.nest.flatten(state.opt_state))))
    contributions = [
        tf.linalg.matvec(tf.reshape(z, [n, -1]), tf.reshape(tf.cast(g, z.dtype), [-1]))
        for i, (z, g) in enumerate(zip(flat_dot, alpha)) if i not in skip
    ]
    hypergrad, offset = [], 0
    for x, g in zip(flat_hp, grad_hp):
        size = int(x.shape.num_elements())
        through_w = tf.add_n([tf.cast(c[offset:offset + size], x.dtype) for c in contributions])
        hypergrad.append(tf.reshape(through_w, x.shape) + g)
        offset += size
    return EstimatorOutput(
        value, hypergrad, state.params, marker, state.opt_state, final_model_state=state.model_state,
        final_tangents=state_dot,
    )
