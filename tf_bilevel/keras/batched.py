"""A Keras 3 model called on B tasks at once, each with its own weights: `batched_call`.

x is [B, n, ...] (task b's n examples), every trainable weight is stacked [B, ...], and the
output is [B, n, ...], equal to calling the model B times with `stateless_call`. Dense and
Conv2D become one batched matrix product over all tasks (a convolution as im2col: the
kh·kw shifted windows concatenated on the channel axis, times the [kh·kw·C, O] kernel),
where B separate calls run B small ops. `tf.vectorized_map` cannot do this: pfor has no
converter for a Conv2D whose kernel differs per iteration (it falls back to a loop), and XLA's
grouped convolution has no TF CPU kernel without XLA; these are plain ops (pad, slice, concat,
einsum), differentiable to any order, with and without XLA.

Supported: Sequential models (nested) of Dense, Conv2D (strides 1, dilation 1, one group,
channels_last), per-example layers without weights (pooling, activations, Flatten, Reshape,
Identity) and layers that define `batched_call(self, weights, x)` (weights: this layer's
trainable values stacked [B, ...]; x: [B, n, ...]). Anything else (Dropout, layer losses,
non-trainable state, other layers) raises `NotBatchable`: the caller then calls the model
per task.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

# Layers without weights that act on each example independently: applied to [B·n, ...].
_PER_EXAMPLE = (
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D", "AveragePooling3D",
    "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalAveragePooling1D", "GlobalAveragePooling2D",
    "ReLU", "LeakyReLU", "ELU", "Softmax", "Activation", "Flatten", "Reshape", "Identity", "InputLayer",
)


class NotBatchable(ValueError):
    """The model has a layer `batched_call` does not support (the message names it)."""


def check_batchable(model: Any) -> None:
    """Raises NotBatchable unless `batched_call` supports every layer of `model`."""
    for layer in _layers(model):
        _check_layer(layer)


def batched_call(model: Any, weights: list, x: tf.Tensor) -> tf.Tensor:
    """model(x_b; w_b) for every task b: weights = model.trainable_variables' values stacked [B, ...]."""
    position = 0
    for layer in _layers(model):
        count = len(layer.trainable_variables)
        x = _call_layer(layer, list(weights[position:position + count]), x)
        position += count
    if position != len(weights):
        raise NotBatchable(f"{model.name!r}: {len(weights)} weights given, its layers use {position}")
    return x


def _layers(model: Any) -> list:
    """The leaf layers of a (nested) Sequential model, in call order."""
    name = type(model).__name__
    if name == "Sequential":
        return [leaf for layer in model.layers for leaf in _layers(layer)]
    if name == "Functional":
        raise NotBatchable(f"functional model {model.name!r} (only Sequential models are batched)")
    return [model]


def _check_layer(layer: Any) -> None:
    kind = type(layer).__name__
    if layer.compute_dtype != layer.variable_dtype:
        raise NotBatchable(f"layer {layer.name!r} ({kind}) computes in {layer.compute_dtype} (mixed precision)")
    if layer.non_trainable_variables or getattr(layer, "_seed_generators", None):
        raise NotBatchable(f"layer {layer.name!r} ({kind}) has state or randomness")
    if getattr(layer, "activity_regularizer", None) is not None or any(
        getattr(layer, attr, None) is not None for attr in ("kernel_regularizer", "bias_regularizer")
    ):
        raise NotBatchable(f"layer {layer.name!r} ({kind}) has regularizers (layer losses)")
    if hasattr(layer, "batched_call"):
        return
    if kind == "Dense":
        return
    if kind == "Conv2D":
        if (tuple(layer.strides) != (1, 1) or tuple(layer.dilation_rate) != (1, 1) or layer.groups != 1
                or layer.data_format != "channels_last"):
            raise NotBatchable(f"Conv2D {layer.name!r}: only strides 1, dilation 1, one group, channels_last")
        return
    if kind in _PER_EXAMPLE and not layer.trainable_variables:
        return
    raise NotBatchable(f"layer {layer.name!r} ({kind})")


def _call_layer(layer: Any, weights: list, x: tf.Tensor) -> tf.Tensor:
    kind = type(layer).__name__
    if hasattr(layer, "batched_call"):
        return layer.batched_call(weights, x)
    if kind == "Dense":
        y = tf.einsum("bn...i,bio->bn...o", x, weights[0])
        if layer.use_bias:
            y = y + _broadcast_per_task(weights[1], y)
        return layer.activation(y)
    if kind == "Conv2D":
        return layer.activation(_conv2d(layer, weights, x))
    # Per-example layer without weights: the tasks merged into one batch.
    merged = tf.reshape(x, tf.concat([[-1], tf.shape(x)[2:]], axis=0))
    y = layer(merged)
    return tf.reshape(y, tf.concat([tf.shape(x)[:2], tf.shape(y)[1:]], axis=0))


def _broadcast_per_task(v: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """[B, C] -> [B, 1, ..., 1, C] to broadcast against like [B, n, ..., C]."""
    return tf.reshape(v, [tf.shape(v)[0]] + [1] * (like.shape.rank - 2) + [v.shape[-1]])


def _conv2d(layer: Any, weights: list, x: tf.Tensor) -> tf.Tensor:
    """x [B, n, H, W, C] * kernel [B, kh, kw, C, O] per task, as im2col + one batched product."""
    kernel = weights[0]
    kh, kw, channels, out = kernel.shape[1:]
    if layer.padding == "same":
        pad_h, pad_w = kh - 1, kw - 1
        x = tf.pad(x, [[0, 0], [0, 0], [pad_h // 2, pad_h - pad_h // 2], [pad_w // 2, pad_w - pad_w // 2], [0, 0]])
    elif layer.padding != "valid":
        raise NotBatchable(f"Conv2D {layer.name!r}: padding {layer.padding!r}")
    height, width = x.shape[2] - kh + 1, x.shape[3] - kw + 1
    windows = [x[:, :, i:i + height, j:j + width, :] for i in range(kh) for j in range(kw)]
    patches = tf.concat(windows, axis=-1) if len(windows) > 1 else windows[0]
    y = tf.einsum("bnhwk,bko->bnhwo", patches, tf.reshape(kernel, [-1, kh * kw * channels, out]))
    if layer.use_bias:
        y = y + _broadcast_per_task(weights[1], y)
    return y
