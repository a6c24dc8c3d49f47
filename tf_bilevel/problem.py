"""The bilevel problem (Eq. 1): inner loss g, outer loss f, and the initial condition Ξ0(λ).

The losses are user functions of plain tensors. This module calls them and turns the
mistakes that would otherwise give a silently wrong hypergradient into clear errors.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import tensorflow as tf

from tf_bilevel._autograph import convert_user_function
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
    ):
        for name, fn in (("inner_loss", inner_loss), ("outer_loss", outer_loss)):
            if not callable(fn):
                raise TypeError(f"{name} must be a callable (params, hparams[, batch]) -> scalar, got {fn!r}")
        if init_params is not None and not callable(init_params):
            raise TypeError(f"init_params must be a callable (params, hparams) -> params, got {init_params!r}")
        self.inner_loss = convert_user_function(inner_loss)
        self.outer_loss = convert_user_function(outer_loss)
        self.init_params = None if init_params is None else convert_user_function(init_params)
        # ids of the tf.Variables the caller passed as params/hparams: reading them through a
        # closure inside a loss would bypass the hypergradient, so it is an error.
        self.passed_variables: dict[int, str] = {}

    def inner(self, params: Params, hparams: HParams, batch: Batch = None) -> tf.Tensor:
        """g(w, λ)."""
        return self._call_loss(self.inner_loss, "inner_loss", params, hparams, batch)

    def outer(self, params: Params, hparams: HParams, batch: Batch = None) -> tf.Tensor:
        """f(w, λ)."""
        return self._call_loss(self.outer_loss, "outer_loss", params, hparams, batch)

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

    def _call_loss(self, fn, role: str, params, hparams, batch) -> tf.Tensor:
        graph = tf.compat.v1.get_default_graph()
        first_new_op = len(graph.get_operations()) if not tf.executing_eagerly() else 0
        with tf.GradientTape(watch_accessed_variables=True) as probe:
            value = fn(params, hparams) if batch is None else fn(params, hparams, batch)
        value = tf.convert_to_tensor(value)
        if value.shape.rank != 0:
            raise ValueError(
                f"{role} must return a scalar, got shape {value.shape}; reduce it (e.g. tf.reduce_mean)."
            )
        if not value.dtype.is_floating:
            raise TypeError(f"{role} must return a floating-point scalar, got dtype {value.dtype.name}")
        for var in probe.watched_variables():
            name = self.passed_variables.get(id(var))
            if name is not None:
                raise ValueError(
                    f"{role} reads the tf.Variable passed as {name} through a closure, so the "
                    f"hypergradient cannot flow through it. Use the tensor argument "
                    f"{role}(params, hparams) receives instead of the variable."
                )
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
