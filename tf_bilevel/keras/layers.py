"""Keras 3 layers whose second derivatives are exact, for use inside the inner model."""

from __future__ import annotations

import warnings
from typing import Any, Iterable

import keras
from keras import ops

__all__ = ["BatchNormalization", "batch_moments", "warn_inexact_batch_normalization"]

_FLOAT16_MAX = 65504.0

BATCH_NORM_HINT = (
    "use tf_bilevel.keras.BatchNormalization: keras.layers.BatchNormalization's second derivatives are "
    "inexact (tf.nn.moments stops the gradient of the mean inside the variance), which biases "
    "hypergradients through the inner loop"
)


def batch_moments(x: Any, axes: Any, keepdims: bool = False) -> tuple:
    """(mean(x), mean((x − mean(x))²)) over `axes`, with no gradient stopped: exact second
    derivatives, unlike `tf.nn.moments` and Keras' BatchNormalization, which compute the
    variance around `stop_gradient(mean)` (exact first derivatives only). For layers that
    normalize inside the inner model, e.g. with the statistics of each task's batch."""
    mean = ops.mean(x, axis=axes, keepdims=True)
    variance = ops.mean(ops.square(x - mean), axis=axes, keepdims=keepdims)
    return (mean if keepdims else ops.squeeze(mean, axis=axes)), variance


@keras.saving.register_keras_serializable(package="tf_bilevel")
class BatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` with exact second derivatives; a drop-in replacement
    (same arguments, moving statistics, inference mode and config).

    Keras' TF backend computes the batch variance with `tf.nn.moments`, i.e. around
    `stop_gradient(mean)`. First derivatives are still exact (the variance is stationary in
    the mean), but second derivatives are not, and a hypergradient differentiates ∇_w g once
    more: through a Keras BatchNormalization in the inner model it is silently biased. Here
    the training-mode moments are mean(x) and mean((x − mean(x))²) with no gradient stopped.
    Only second derivatives differ: outputs, moving statistics and first derivatives are
    those of Keras' layer. Masked and `synchronized=True` calls use Keras' moments, which
    do not stop the gradient there (the latter only in a replica context).
    """

    def _moments(self, inputs, mask):
        if mask is not None or self.synchronized:
            return super()._moments(inputs, mask)
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        # As Keras' moments: float16/bfloat16 statistics are computed in float32 (its `call`
        # already upcasts the inputs, so this is a safeguard).
        low_precision = dtype in ("float16", "bfloat16")
        x = ops.cast(inputs, "float32") if low_precision else inputs
        mean, variance = batch_moments(x, self._reduction_axes)
        if low_precision:  # clipped to float16's range before the cast back, as Keras does
            mean = ops.cast(ops.clip(mean, -_FLOAT16_MAX, _FLOAT16_MAX), dtype)
            variance = ops.cast(ops.clip(variance, -_FLOAT16_MAX, _FLOAT16_MAX), dtype)
        return mean, variance


def _flatten(model: Any) -> Iterable[Any]:
    if hasattr(model, "_flatten_layers"):
        return model._flatten_layers(include_self=True, recursive=True)
    return [model]


def inexact_batch_normalization_layers(model: Any) -> list:
    """The Keras 3 `BatchNormalization` layers in `model` (recursively) that are not ours."""
    return [
        layer
        for layer in _flatten(model)
        if isinstance(layer, keras.layers.BatchNormalization) and not isinstance(layer, BatchNormalization)
    ]


def warn_inexact_batch_normalization(inner_model: Any, stacklevel: int = 2) -> None:
    """One UserWarning naming the layers of `inner_model` whose second derivatives are inexact."""
    found = inexact_batch_normalization_layers(inner_model)
    if found:
        names = ", ".join(repr(layer.name) for layer in found)
        warnings.warn(
            f"inner_model {inner_model.name!r} contains keras.layers.BatchNormalization layer(s) {names}: "
            f"{BATCH_NORM_HINT}.",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
