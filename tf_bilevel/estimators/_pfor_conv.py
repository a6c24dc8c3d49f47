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

Every other case (NCHW, both operands batched, ...) goes to TF's own converter.

Under XLA the filter gradients (the columns' and, through `canonical_filter_gradients`, the
primal step's own) are Conv2D ops in XLA:CPU's canonical layout: XLA lowers
Conv2DBackpropFilter to a convolution with the batch as feature axis, which XLA:CPU rewrites into
its fast (Eigen) layout only for top-level instructions, not inside the inner-step while loop.
"""

from __future__ import annotations

import contextlib

import tensorflow as tf
from tensorflow.python.framework import ops
from tensorflow.python.ops import control_flow_util

_SHARED_ATTRS = ("strides", "padding", "explicit_paddings", "use_cudnn_on_gpu", "dilations")


def _attrs(pfor_input) -> dict:
    return {name: pfor_input.get_attr(name) for name in _SHARED_ATTRS}


def _in_xla() -> bool:
    return control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph())


def _nhwc(op) -> bool:
    data_format = op.get_attr("data_format")
    return (data_format.decode() if isinstance(data_format, bytes) else data_format) == "NHWC"


def _conv2d(wrap, original):
    def convert(pfor_input):
        x, x_stacked, _ = pfor_input.input(0)
        k, k_stacked, _ = pfor_input.input(1)
        if x_stacked or not k_stacked or not _nhwc(pfor_input):
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
        if dy_stacked or not k_stacked or not _nhwc(pfor_input):
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


def filter_gradient_as_conv2d(x: tf.Tensor, dy: tf.Tensor, kernel_size, op):
    """Conv2DBackpropFilter(x, dy) as a Conv2D in XLA:CPU's canonical layout (NHWC input, HWIO
    filter), or None where it does not apply (dilated, or shapes not static).

    XLA lowers the filter gradient to a convolution with the batch as its feature axis, which
    XLA:CPU rewrites into the fast (Eigen) layout only outside while loops (its convolution
    canonicalization visits top-level instructions only): inside the inner-step loop it ran
    ~300× slower. With the channels as batch and the batch as features,
    dk[p, q, c, o] = Σ_{b,i,j} x_pad[b, i·s + p, j·s + q, c] dy[b, i, j, o] is a convolution of
    x [C, H, W, B] with dy [OH, OW, B, O] as filter dilated by the stride s."""
    if not _nhwc(op) or any(d != 1 for d in op.get_attr("dilations")):
        return None
    (h, w), (out_h, out_w), (kh, kw) = x.shape[1:3], dy.shape[1:3], kernel_size
    if None in (h, w, out_h, out_w):
        return None
    strides = list(op.get_attr("strides"))
    sh, sw = strides[1], strides[2]
    padding = op.get_attr("padding")
    padding = padding.decode() if isinstance(padding, bytes) else padding
    if padding == "VALID":
        pads = [[0, 0], [0, 0]]
    elif padding == "SAME":
        total_h, total_w = max((out_h - 1) * sh + kh - h, 0), max((out_w - 1) * sw + kw - w, 0)
        pads = [[total_h // 2, total_h - total_h // 2], [total_w // 2, total_w - total_w // 2]]
    elif padding == "EXPLICIT":
        explicit = list(op.get_attr("explicit_paddings"))
        pads = [explicit[2:4], explicit[4:6]]
    else:
        return None
    dk = tf.nn.conv2d(tf.transpose(x, [3, 1, 2, 0]), tf.transpose(dy, [1, 2, 0, 3]), 1,
                      [[0, 0], *pads, [0, 0]], dilations=[sh, sw])  # [C, >= kh, >= kw, O]
    return tf.transpose(dk[:, :kh, :kw, :], [1, 2, 0, 3])


def _conv2d_backprop_filter(wrap, original):
    def convert(pfor_input):
        x, x_stacked, _ = pfor_input.input(0)
        dy, dy_stacked, _ = pfor_input.input(2)
        if not x_stacked or dy_stacked or not _nhwc(pfor_input):
            return original(pfor_input)
        sizes = pfor_input.unstacked_input(1)  # [kh, kw, C, O]
        n = tf.shape(x)[0]
        shape = tf.shape(x)  # [N, B, H, W, C]
        folded = tf.reshape(tf.transpose(x, [1, 2, 3, 0, 4]), tf.concat([shape[1:4], [-1]], 0))
        static_sizes = tf.get_static_value(sizes)
        dk = None
        if static_sizes is not None and _in_xla():
            dk = filter_gradient_as_conv2d(folded, dy, static_sizes[:2], pfor_input)
        if dk is None:
            dk = tf.raw_ops.Conv2DBackpropFilter(
                input=folded, filter_sizes=sizes * tf.stack([1, 1, n, 1]), out_backprop=dy, data_format="NHWC",
                **_attrs(pfor_input),
            )
        dk = tf.reshape(dk, tf.concat([sizes[:2], [n], sizes[2:]], 0))
        return [wrap(tf.transpose(dk, [2, 0, 1, 3, 4]), True)]

    return convert


@contextlib.contextmanager
def canonical_filter_gradients():
    """While tracing under XLA: Conv2D's registered gradient computes the filter gradient with
    `filter_gradient_as_conv2d` (the input gradient unchanged), so that the primal step's own
    filter gradients also stay fast inside the inner-step while loop (pfor copies them as they
    are: they do not depend on the column). The swap is process-wide for the duration of the
    `with` block, which only traces."""
    if not _in_xla():
        yield
        return
    registry = ops._gradient_registry._registry  # noqa: SLF001 (no public way to scope a gradient)
    entry = registry.get("Conv2D")
    if entry is None:
        yield
        return
    original = entry["type"]

    def conv2d_grad(op, dy):
        dx, dk = original(op, dy)  # dk unused when replaced: XLA drops it
        canonical = filter_gradient_as_conv2d(op.inputs[0], dy, op.inputs[1].shape[:2], op)
        return dx, (dk if canonical is None else canonical)

    registry["Conv2D"] = {**entry, "type": conv2d_grad}
    try:
        yield
    finally:
        registry["Conv2D"] = entry


CONVERTERS = {
    "Conv2D": _conv2d,
    "Conv2DBackpropInput": _conv2d_backprop_input,
    "Conv2DBackpropFilter": _conv2d_backprop_filter,
}
