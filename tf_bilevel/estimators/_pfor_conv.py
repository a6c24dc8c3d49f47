"""Loop-free vectorization of convolutions for forward mode's `tf.vectorized_map`.

The JVP of a convolution step along tangent column n has terms in which ONE operand differs per
column and the other is the primal's, shared by all N columns:

  Conv2D(x, k̇_n)                  the output's tangent from the filter's
  Conv2DBackpropInput(k̇_n, dy)     ∇x's tangent from the filter's
  Conv2DBackpropFilter(ẋ_n, dy)    ∇k's tangent from the input's

TF's pfor converters (TF 2.21) only batch the image operand of these ops; a batched filter (or a
batched input of the filter gradient) makes them run a `tf.while_loop` over the N columns, and
XLA:CPU runs convolutions and their gradients inside a while loop many times slower than
outside (see the README's online benchmark). None of the three needs a loop: a convolution never
mixes the channels that are folded together below, so with the N columns folded into a channel
axis one op computes all of them exactly:

  Conv2D:               k̇ [N, kh, kw, C, O] -> [kh, kw, C, N·O]; output channel n·O + o
  Conv2DBackpropInput:  k̇ [N, kh, kw, C, O] -> [kh, kw, N·C, O]; input channel n·C + c
  Conv2DBackpropFilter: ẋ [N, B, H, W, C]   -> [B, H, W, N·C];   filter input channel n·C + c

Every other case (NCHW, both operands batched, a grouped convolution, channel counts not static,
...) goes to TF's own converter; inside `forward_mode()` a grouped convolution is refused, and so
are channel counts not static where TF's converter would be wrong for a grouped one. The
convolutions `_conv_layout` builds (and TF's gradients of them) count as one group whatever their
channel counts read as (`one_group`): their channel axis holds the batch, unknown when the data's is.

Under XLA inside a while loop the columns' filter gradients are Conv2D ops in XLA:CPU's canonical layout
(tf_bilevel/_conv_layout.py; the primal step's own gradients are, through
`_tf_patches.canonical_conv_gradients`): XLA:CPU makes TF's filter-gradient op fast only outside
while loops, not inside the inner-step loop.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import tensorflow as tf
from tf_bilevel._conv_layout import _held_shape, channels, filter_gradient_as_conv2d, is_nhwc, one_group
from tf_bilevel._tf_patches import in_compiled_loop

_SHARED_ATTRS = ("strides", "padding", "explicit_paddings", "use_cudnn_on_gpu", "dilations")
_forward_mode_blocks = threading.local()  # .depth: forward_mode() blocks open in this thread


def _attrs(pfor_input) -> dict:
    return {name: pfor_input.get_attr(name) for name in _SHARED_ATTRS}


@contextlib.contextmanager
def forward_mode() -> Iterator[None]:
    """Forward mode's own `tf.vectorized_map` is traced inside this block: a grouped convolution
    (or channel counts not static, where TF's converter would be wrong for a grouped one) met by
    pfor in this thread is then refused (`refuse_unless_one_group`). Outside it (any other
    vectorized_map in the process) the converters give those to TF's own."""
    _forward_mode_blocks.depth = getattr(_forward_mode_blocks, "depth", 0) + 1
    try:
        yield
    finally:
        _forward_mode_blocks.depth -= 1


def refuse_unless_one_group(op: tf.Operation, tf_mixes_groups: bool = True) -> None:
    """Forward mode's check of the convolution `op` (any layout): a ValueError naming the fix for
    a grouped convolution, and for channel counts not static where TF's converter would mix the
    groups of a grouped one (`tf_mixes_groups`: a filter gradient with per-column output
    gradients, which TF 2.21 folds into the output channels: wrong values, with or without XLA;
    forward mode meets it in every step of a convolutional net)."""
    if one_group(op):  # static and equal, or one of _conv_layout's (one group by construction)
        return
    input_channels, kernel_channels = channels(op)
    if input_channels is None or kernel_channels is None:
        if tf_mixes_groups:
            raise ValueError(
                f"forward mode (estimator='forward') needs the channel counts of every convolution (op {op.name!r}: "
                f"input channels {input_channels}, kernel input channels {kernel_channels}; None = not static) "
                "to tell a grouped convolution, for which TF's vectorization is wrong (the convolutions forward mode "
                "builds itself under XLA are known to be one group): give the data static shapes, a static batch size "
                "(e.g. dataset.batch(b, drop_remainder=True)) and a static channel dimension (e.g. a tf.function "
                "input_signature of shape [B, H, W, C]), or use "
                "reverse mode (estimator='reverse', K-RMD)")
    elif input_channels != kernel_channels:
        raise ValueError(
            f"forward mode (estimator='forward') does not support grouped convolutions (input channels "
            f"{input_channels}, kernel input channels {kernel_channels}: e.g. keras.layers.Conv2D(groups="
            f"{input_channels // max(kernel_channels, 1)})): use reverse mode (estimator='reverse', K-RMD), "
            "or groups=1")


def _folds(op: tf.Operation, tf_mixes_groups: bool = False) -> bool:
    """Whether the folding below applies to the convolution `op`: NHWC and one group, the channel
    counts static (not static: TF's converter, as _tf_patches does). Inside `forward_mode()`
    `refuse_unless_one_group` first; `tf_mixes_groups`: TF's converter of this case is wrong for
    a grouped convolution (there)."""
    if getattr(_forward_mode_blocks, "depth", 0):
        refuse_unless_one_group(op, tf_mixes_groups)
    return is_nhwc(op) and one_group(op)


def _conv2d(wrap, original):
    def convert(pfor_input):
        x, x_stacked, _ = pfor_input.input(0)
        k, k_stacked, _ = pfor_input.input(1)
        if not _folds(pfor_input.op) or x_stacked or not k_stacked:
            return original(pfor_input)
        n, kh, kw, c, o = tf.unstack(tf.shape(k))
        folded = tf.reshape(tf.transpose(k, [1, 2, 3, 0, 4]), tf.stack([kh, kw, c, n * o]))
        y = tf.raw_ops.Conv2D(input=x, filter=folded, data_format="NHWC", **_attrs(pfor_input))
        shape = tf.shape(y)
        y = tf.reshape(y, tf.concat([shape[:3], [n, o]], 0))
        return [wrap(tf.transpose(y, [3, 0, 1, 2, 4]), True)]

    return convert


def _conv2d_backprop_input(wrap, original):
    def convert(pfor_input):
        k, k_stacked, _ = pfor_input.input(1)
        dy, dy_stacked, _ = pfor_input.input(2)
        if not _folds(pfor_input.op) or dy_stacked or not k_stacked:
            return original(pfor_input)
        sizes = pfor_input.unstacked_input(0)  # [B, H, W, C]
        n, kh, kw, c, o = tf.unstack(tf.shape(k))
        folded = tf.reshape(tf.transpose(k, [1, 2, 0, 3, 4]), tf.stack([kh, kw, n * c, o]))
        dx = tf.raw_ops.Conv2DBackpropInput(
            input_sizes=sizes * tf.stack([1, 1, 1, n]), filter=folded, out_backprop=dy, data_format="NHWC",
            **_attrs(pfor_input),
        )
        dx = tf.reshape(dx, tf.concat([sizes[:3], [n, c]], 0))
        return [wrap(tf.transpose(dx, [3, 0, 1, 2, 4]), True)]

    return convert


def _conv2d_backprop_filter(wrap, original):
    def convert(pfor_input):
        x, x_stacked, _ = pfor_input.input(0)
        dy, dy_stacked, _ = pfor_input.input(2)
        tf_mixes_groups = not x_stacked and dy_stacked  # TF 2.21's converter folds dy's columns
        if not _folds(pfor_input.op, tf_mixes_groups) or not x_stacked or dy_stacked:
            return original(pfor_input)
        sizes = pfor_input.unstacked_input(1)  # [kh, kw, C, O]
        kernel_size = _held_shape(pfor_input.op.inputs[1])[:2]  # [kh, kw] static even when C is not
        n = tf.shape(x)[0]
        shape = tf.shape(x)  # [N, B, H, W, C]
        folded = tf.reshape(tf.transpose(x, [1, 2, 3, 0, 4]), tf.concat([shape[1:4], [-1]], 0))
        dk = None
        if kernel_size.is_fully_defined() and in_compiled_loop():
            dk = filter_gradient_as_conv2d(folded, dy, kernel_size.as_list(), pfor_input.op)
        if dk is None:
            dk = tf.raw_ops.Conv2DBackpropFilter(
                input=folded, filter_sizes=sizes * tf.stack([1, 1, n, 1]), out_backprop=dy, data_format="NHWC",
                **_attrs(pfor_input),
            )
        dk = tf.reshape(dk, tf.concat([sizes[:2], [n], sizes[2:]], 0))
        return [wrap(tf.transpose(dk, [2, 0, 1, 3, 4]), True)]

    return convert


CONVERTERS = {
    "Conv2D": _conv2d,
    "Conv2DBackpropInput": _conv2d_backprop_input,
    "Conv2DBackpropFilter": _conv2d_backprop_filter,
}
