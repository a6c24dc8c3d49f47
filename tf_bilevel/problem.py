"""The bilevel problem (Eq. 1): inner loss g, outer loss f, and the initial condition Ξ0(λ).

The losses are user functions of plain tensors. This module calls them and turns the
mistakes that would otherwise give a silently wrong hypergradient into clear errors.

A stateful problem also carries a model state s_t through the inner steps (layer state such
as BatchNorm's moving statistics): g_t returns s_{t+1} next to its value, computed from
(w_t, s_t) and the step's batch, and f reads s_T. The state is part of the dynamical system
(Eq. 4: (w_{t+1}, s_{t+1}) = Ξ_{t+1}(w_t, s_t, λ)), not a hyperparameter and not trained by
the inner optimizer.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import tensorflow as tf

from tf_bilevel._autograph import convert_user_function
from tf_bilevel._signature import positional_arity
from tf_bilevel._tree import leaf_names

Params = Any
HParams = Any
Batch = Any

_ASSIGN_OPS = {
    "AssignVariableOp",
    "AssignAddVariableOp",
    "AssignSubVariableOp",
    "ResourceScatterUpdate",
    "ResourceScatterAdd",
    "ResourceScatterNdUpdate",
}


class BilevelProblem:
    """min_λ f(ŵ(λ), λ) where ŵ(λ) runs an inner optimizer on g(·, λ) from w0 = Ξ0(λ)."""

    def __init__(
        self,
        inner_loss: Callable[..., tf.Tensor],
        outer_loss: Callable[..., tf.Tensor],
        init_params: Optional[Callable[[Params, HParams], Params]] = None,
        stateful: bool = False,
    ):
        """`stateful`: inner_loss(params, hparams, batch, state) returns (loss, new state) and
        outer_loss(params, hparams, batch, state) reads the state (see the module docstring)."""
        for name, fn in (("inner_loss", inner_loss), ("outer_loss", outer_loss)):
            if not callable(fn):
                raise TypeError(f"{name} must be a callable (params, hparams[, batch]) -> scalar, got {fn!r}")
        if init_params is not None and not callable(init_params):
            raise TypeError(f"init_params must be a callable (params, hparams) -> params, got {init_params!r}")
        # (required, maximum) positional arguments, to explain a missing/unexpected batch.
        self._arity = {"inner_loss": positional_arity(inner_loss), "outer_loss": positional_arity(outer_loss)}
        self.inner_loss = convert_user_function(inner_loss)
        self.outer_loss = convert_user_function(outer_loss)
        self.init_params = None if init_params is None else convert_user_function(init_params)
        self.stateful = stateful
        # The tf.Variables the losses read through closures (seen when they are traced), by id.
        # Passing one of them as params/hparams is an error on every call: the loss would read
        # the variable, not the argument, and the hypergradient would miss that path.
        self.closure_variables: dict[int, tuple[str, tf.Variable]] = {}

    def inner(self, params: Params, hparams: HParams, batch: Batch = None) -> tf.Tensor:
        """g(w, λ) (a stateless problem)."""
        return self._call_loss(self.inner_loss, "inner_loss", params, hparams, batch)

    def inner_and_state(self, params: Params, hparams: HParams, batch: Batch, state: Any) -> tuple[tf.Tensor, Any]:
        """(g(w, λ; s), the next model state); a stateless problem keeps `state` (= ())."""
        if not self.stateful:
            return self.inner(params, hparams, batch), state
        new_state = []

        def loss_only(params, hparams, batch):
            value, next_state = self.inner_loss(params, hparams, batch, state)
            new_state.append(next_state)
            return value

        value = self._call_loss(loss_only, "inner_loss", params, hparams, batch, check_arity=False)
        return value, _checked_state(new_state[0], state)

    def outer(self, params: Params, hparams: HParams, batch: Batch = None, state: Any = ()) -> tf.Tensor:
        """f(w, λ) (a stateful problem: at model state `state`)."""
        if not self.stateful:
            return self._call_loss(self.outer_loss, "outer_loss", params, hparams, batch)
        return self._call_loss(
            lambda w, hp, b: self.outer_loss(w, hp, b, state), "outer_loss", params, hparams, batch, check_arity=False
        )

    def initial_params(self, params: Params, hparams: HParams) -> Params:
        """w0 = Ξ0(λ) (the B0 term of Eq. 5 when it depends on λ)."""
        if self.init_params is None:
            return params
        w0 = self.init_params(params, hparams)
        try:
            tf.nest.assert_same_structure(w0, params)
        except (ValueError, TypeError) as err:
            raise ValueError(f"init_params must return the structure of params: {err}") from None
        for name, a, b in zip(leaf_names(params, "params"), tf.nest.flatten(w0), tf.nest.flatten(params)):
            if not a.shape.is_compatible_with(b.shape):
                raise ValueError(f"init_params returned shape {a.shape} for {name}, which has shape {b.shape}")
        return tf.nest.map_structure(lambda a, b: tf.cast(a, b.dtype), w0, params)

    def check_not_read_through_closure(self, passed_variables: dict[int, str]) -> None:
        """Raises if a variable passed as params/hparams (id -> leaf name) is one a loss reads
        through a closure (a dict lookup per passed variable: cheap enough for every call)."""
        for var_id, name in passed_variables.items():
            if var_id in self.closure_variables:
                role = self.closure_variables[var_id][0]
                argument = name.split("[")[0]
                raise ValueError(
                    f"{role} reads the tf.Variable passed as {name} through a closure, so the "
                    f"hypergradient cannot flow through it (it reaches the loss, but not as the "
                    f"argument). Read it from the `{argument}` argument instead of the closure: "
                    f"{name} in {role}(params, hparams[, batch])."
                )

    def _check_arity(self, role: str, batch: Batch) -> None:
        required, maximum = self._arity[role]
        which = "inner_batch" if role == "inner_loss" else "outer_batch"
        if batch is None and required >= 3:
            raise TypeError(
                f"{role} takes a batch argument {role}(params, hparams, batch) but no {which} was "
                f"given: call hg(params, hparams, inner_batch, outer_batch), or give the batch "
                f"argument a default."
            )
        if batch is not None and maximum is not None and maximum < 3:
            raise TypeError(
                f"{which} was given but {role} takes only (params, hparams): add a batch argument "
                f"{role}(params, hparams, batch), or do not pass {which}."
            )

    def _call_loss(self, fn, role: str, params, hparams, batch, check_arity: bool = True) -> tf.Tensor:
        graph = tf.compat.v1.get_default_graph()
        first_new_op = len(graph.get_operations()) if not tf.executing_eagerly() else 0
        if check_arity:
            self._check_arity(role, batch)
        with tf.GradientTape(watch_accessed_variables=True) as probe:
            value = fn(params, hparams) if batch is None and check_arity else fn(params, hparams, batch)
        if value is None:
            raise TypeError(f"{role} returned None: it must return a scalar tensor (is a `return` missing?)")
        try:
            value = tf.convert_to_tensor(value)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{role} must return a scalar tensor, got {type(value).__name__}: {err}") from None
        if value.shape.rank != 0:
            raise ValueError(
                f"{role} must return a scalar, got shape {value.shape}; reduce it (e.g. tf.reduce_mean)."
            )
        if not value.dtype.is_floating:
            raise TypeError(f"{role} must return a floating-point scalar, got dtype {value.dtype.name}")
        for var in probe.watched_variables():
            self.closure_variables.setdefault(id(var), (role, var))
        if not tf.executing_eagerly():
            for op in graph.get_operations()[first_new_op:]:
                if op.type in _ASSIGN_OPS:
                    raise ValueError(
                        f"{role} assigns to a tf.Variable (op {op.name!r}). Inner weights must be "
                        "plain tensors threaded through the loop: updating a variable with .assign() "
                        "inside the inner loop silently gives a None hypergradient. Compute the loss "
                        "from the `params` argument (for Keras models: model.stateless_call)."
                    )
        return value


def _checked_state(new_state: Any, state: Any) -> Any:
    """The model state inner_loss returned, checked against the one it was given (a loop
    variable must keep its structure, shapes and dtypes)."""
    try:
        tf.nest.assert_same_structure(new_state, state)
    except (ValueError, TypeError) as err:
        raise ValueError(f"inner_loss must return the model state with the structure it was given: {err}") from None
    checked = []
    for name, new, old in zip(leaf_names(state, "state"), tf.nest.flatten(new_state), tf.nest.flatten(state)):
        new, old = tf.convert_to_tensor(new), tf.convert_to_tensor(old)
        if new.dtype != old.dtype or not new.shape.is_compatible_with(old.shape):
            raise ValueError(
                f"inner_loss returned the model state's {name} as {new.dtype.name}{new.shape}, it was given "
                f"{old.dtype.name}{old.shape}: return every state leaf with its shape and dtype."
            )
        # (ensure_shape only where needed: under tf.vectorized_map, forward mode, it fails to trace.)
        checked.append(new if new.shape == old.shape and new.shape.is_fully_defined() else tf.ensure_shape(new, old.shape))
    return tf.nest.pack_sequence_as(state, checked)

