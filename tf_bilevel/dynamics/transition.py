"""One inner step Ξ_{t+1}(w_t, λ) (Eq. 4): the inner optimizer applied to ∇w g."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import tensorflow as tf

from tf_bilevel._tree import leaf_names
from tf_bilevel.dynamics.optimizers import InnerOptimizer
from tf_bilevel.problem import BilevelProblem


class InnerState(NamedTuple):
    """The state of the dynamical system: weights w_t, optimizer state (momentum, moments) and,
    for a stateful problem, the model state s_t (e.g. BatchNorm's moving statistics)."""

    params: Any
    opt_state: Any
    model_state: Any = ()


BatchAtStep = Callable[[Any, tf.Tensor], Any]


def gather_step(batch: Any, step: tf.Tensor) -> Any:
    """Element `step` of every leaf's leading axis (a per-step minibatch), gathered in-graph."""
    return tf.nest.map_structure(lambda x: tf.gather(x, step), batch)


class Transition:
    """Ξ_{t+1}: maps (w_t, opt_state_t) to (w_{t+1}, opt_state_{t+1}) for a given λ.

    `batch_at_step(inner_batch, t)` selects the data of step t (stochastic inner problems:
    g_t(w, λ) on minibatch t); None means every step sees the whole inner batch. Every pass
    (forward, each step's VJP, checkpointed recomputation, forward mode) goes through
    `__call__` with the absolute step index, so they all see the same batch for a step.
    """

    def __init__(self, problem: BilevelProblem, optimizer: InnerOptimizer, batch_at_step: Optional[BatchAtStep] = None):
        self.problem = problem
        self.optimizer = optimizer
        self.batch_at_step = batch_at_step

    def init_state(self, params: Any, opt_state: Any = None, model_state: Any = ()) -> InnerState:
        """(w0, optimizer state, model state): a fresh optimizer state unless one is given (to
        continue a run)."""
        return InnerState(params, self.optimizer.init(params) if opt_state is None else opt_state, model_state)

    def batch_at(self, batch: Any, step: Any) -> Any:
        """The inner batch that step `step` (0-based) uses."""
        if self.batch_at_step is None or batch is None:
            return batch
        return self.batch_at_step(batch, tf.convert_to_tensor(step, tf.int32))

    def __call__(self, state: InnerState, hparams: Any, step: tf.Tensor, batch: Any = None):
        """Returns (next state, g(w_t, λ)). The inner tape is what makes B_t, A_t second-order."""
        params = state.params
        batch = self.batch_at(batch, step)
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss, model_state = self.problem.inner_and_state(params, hparams, batch, state.model_state)
        grads = tape.gradient(loss, params)
        flat_grads = tf.nest.flatten(grads)
        flat_params = tf.nest.flatten(params)
        if all(g is None for g in flat_grads):
            raise ValueError(
                "inner_loss does not depend on params: its gradient with respect to every leaf of "
                "params is None. Compute the inner loss from the `params` argument."
            )
        grads = tf.nest.pack_sequence_as(
            params, [tf.zeros_like(p) if g is None else g for g, p in zip(flat_grads, flat_params)]
        )
        updates, opt_state = self.optimizer.update(grads, state.opt_state, params, hparams, step)
        for name, u, p in zip(leaf_names(params, "params"), tf.nest.flatten(updates), flat_params):
            if not u.shape.is_compatible_with(p.shape):
                raise ValueError(f"inner optimizer returned an update of shape {u.shape} for {name} of shape {p.shape}")
        new_params = tf.nest.map_structure(lambda p, u: p + tf.cast(u, p.dtype), params, updates)
        return InnerState(new_params, opt_state, model_state), loss
