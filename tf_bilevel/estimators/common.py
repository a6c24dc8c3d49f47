"""Pieces shared by the hypergradient estimators: ∇f at w_T and one step's VJP (A_t, B_t)."""

from __future__ import annotations

from typing import Any, NamedTuple

import tensorflow as tf

from tf_bilevel._tree import fill_none_with_zeros
from tf_bilevel.dynamics.transition import InnerState, Transition
from tf_bilevel.problem import BilevelProblem


class EstimatorOutput(NamedTuple):
    outer_value: tf.Tensor
    hypergrad: list  # flat, in tf.nest order of hparams
    final_params: Any
    nonfinite_step: tf.Tensor  # the marker of tf_bilevel.nonfinite (-1: all finite)
    final_opt_state: Any = ()
    solver_iterations: Any = -1  # CG iterations / Neumann terms used (implicit estimators), else -1
    final_model_state: Any = ()  # a stateful problem's s_T, else ()
    final_tangents: Any = ()  # forward mode: Z_T = d(w_T, opt_state_T)/dλ, [N, ...] per leaf


class Reach:
    """What the gradients an estimator traced reached, recorded at trace time (not computed):
    which leaves of λ got a gradient that is not None (a path to f exists), and whether f has
    a gradient with respect to the final inner state. `Hypergradient.compute` needs its
    reachability probe only when this record leaves a leaf unreached (or f ignores the state)."""

    def __init__(self, num_hparams: int):
        self.hparams = [False] * num_hparams
        self.state = False

    def add(self, hparam_grads: Any) -> None:
        for i, g in enumerate(hparam_grads):
            self.hparams[i] = self.hparams[i] or g is not None

    def note_state(self, state_grads: Any) -> None:
        """Records whether f has a gradient (not None) with respect to some leaf of the final state."""
        self.state = self.state or any(g is not None for g in state_grads)

    @property
    def complete(self) -> bool:
        return self.state and all(self.hparams)


def _note(reach: Any, hparam_grads: Any) -> None:
    if reach is not None:
        reach.add(hparam_grads)


def internal_copy(structure: Any) -> Any:
    """tf.identity of every leaf: inside a loop body this turns captured outer tensors into
    tensors of the body's graph, which a tape created in the body can watch."""
    return tf.nest.map_structure(tf.identity, structure)


def outer_value_and_grads(
    problem: BilevelProblem, params: Any, hparams: Any, batch: Any
) -> tuple[tf.Tensor, list, list]:
    """f(w_T, λ), α_T = ∇w f and h_T = ∇λ f (the initial conditions of Eq. 6), flat."""
    flat_w, flat_hp = tf.nest.flatten(params), tf.nest.flatten(hparams)
    with tf.GradientTape() as tape:
        tape.watch(flat_w)
        tape.watch(flat_hp)
        value = problem.outer(params, hparams, batch)
    grad_w, grad_hp = tape.gradient(value, (flat_w, flat_hp))
    return value, fill_none_with_zeros(grad_w, flat_w), fill_none_with_zeros(grad_hp, flat_hp)


def state_cotangent(params_cotangent: list, state: InnerState, model_state_cotangent: Any = None) -> list:
    """α for the whole state: ∇w f for the weights, zero for the optimizer state, ∇s f for the
    model state (zero if not given)."""
    opt_leaves = tf.nest.flatten(state.opt_state)
    model_leaves = tf.nest.flatten(state.model_state)
    if model_state_cotangent is None:
        model_state_cotangent = [tf.zeros_like(x) for x in model_leaves]
    return list(params_cotangent) + [tf.zeros_like(x) for x in opt_leaves] + list(model_state_cotangent)


def outer_value_and_state_grads(
    problem: BilevelProblem, state: InnerState, hparams: Any, batch: Any, reach: Any = None
) -> tuple[tf.Tensor, list, list]:
    """f(w_T, λ; s_T), α_T = ∇ f for the whole final state (weights, optimizer state: zero, model
    state) and h_T = ∇λ f, flat: the initial conditions of Eq. 6 for a (possibly stateful) problem."""
    flat_w, flat_hp = tf.nest.flatten(state.params), tf.nest.flatten(hparams)
    flat_s = tf.nest.flatten(state.model_state)
    with tf.GradientTape() as tape:
        tape.watch(flat_w)
        tape.watch(flat_hp)
        tape.watch([x for x in flat_s if x.dtype.is_floating])
        value = problem.outer(state.params, hparams, batch, tf.nest.pack_sequence_as(state.model_state, flat_s))
    grad_w, grad_hp, grad_s = tape.gradient(value, (flat_w, flat_hp, flat_s))
    _note(reach, grad_hp)
    if reach is not None:
        reach.note_state(list(grad_w) + list(grad_s))
    alpha = state_cotangent(fill_none_with_zeros(grad_w, flat_w), state, fill_none_with_zeros(grad_s, flat_s))
    return value, alpha, fill_none_with_zeros(grad_hp, flat_hp)


def step_vjp(
    transition: Transition, state: InnerState, hparams: Any, step: tf.Tensor, batch: Any, alpha: list,
    reach: Any = None,
) -> tuple[list, list]:
    """(A_t α, B_t α) for the transition from `state` at `step` (one term of Eq. 6). `reach`: a
    `Reach` that records which leaves of λ B_t reaches."""
    state, hparams = internal_copy(state), internal_copy(hparams)
    flat_state, flat_hp = tf.nest.flatten(state), tf.nest.flatten(hparams)
    with tf.GradientTape() as tape:
        tape.watch([x for x in flat_state if x.dtype.is_floating])  # (a model state may hold integers)
        tape.watch(flat_hp)
        new_state, _ = transition(state, hparams, step, batch)
    d_state, d_hp = tape.gradient(tf.nest.flatten(new_state), (flat_state, flat_hp), output_gradients=alpha)
    _note(reach, d_hp)
    return fill_none_with_zeros(d_state, flat_state), fill_none_with_zeros(d_hp, flat_hp)


def init_vjp(problem: BilevelProblem, params: Any, hparams: Any, params_cotangent: list, reach: Any = None) -> list:
    """B0 α_0, the λ-gradient through the initial condition w0 = Ξ0(λ) (recomputed, it is cheap)."""
    flat_hp = tf.nest.flatten(hparams)
    if problem.init_params is None:
        return [tf.zeros_like(x) for x in flat_hp]
    with tf.GradientTape() as tape:
        tape.watch(flat_hp)
        w0 = problem.initial_params(params, hparams)
    grads = tape.gradient(tf.nest.flatten(w0), flat_hp, output_gradients=params_cotangent)
    _note(reach, grads)
    return fill_none_with_zeros(grads, flat_hp)
