"""Conv2D's two gradients written as plain Conv2D ops in XLA:CPU's canonical layout.

XLA lowers TF's gradient ops to convolutions whose dimension numbers are not XLA:CPU's fast
(Eigen) form, NHWC input, HWIO filter, NHWC output (`b01f_01io->b01f`):

  Conv2DBackpropFilter  ->  the batch as feature axis (`f01b_i01o->01bf`)
  Conv2DBackpropInput   ->  the filter's I and O swapped (`b01f_01oi->b01f`)

XLA:CPU's convolution canonicalization rewrites them into the fast form only for top-level
instructions; inside a while loop (the inner steps of every estimator, K-RMD's backward loop)
they run as naive loops, hundreds of times slower. The functions below compute the same values
with Conv2D ops already in that form (transposes and a reversal of small tensors around them),
and are differentiable by TF's own rules (their gradients are Conv2D ops again), so estimators
that differentiate the inner gradient (K-RMD, forward mode) get exact second derivatives.
Each returns None where it does not apply (NCHW, dilated filters, shapes not static; the
input gradient also for a grouped convolution): the caller then uses TF's op. The filter gradient
is written for an ungrouped convolution (its kernel_size holds no channels): its callers check.

The Conv2D ops built here are one group by construction, whatever their channel counts read as
(the batch sits on a channel axis, unknown for a dataset batched without drop_remainder): they
are built inside `one_group_scope()`, which `one_group` recognizes, so their own gradients and
forward mode's vectorization of them (estimators/_pfor_conv.py) need no static channel counts.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import tensorflow as tf
from tensorflow.python.framework import tensor_util  # constant_value_as_shape: no public equivalent


_ONE_GROUP_SCOPE = "tf_bilevel_one_group"
_IN_ONE_GROUP_SCOPE = re.compile(rf"(^|/){_ONE_GROUP_SCOPE}(_\d+)?/[^/]+$")  # TF numbers a reused scope


def one_group_scope() -> tf.name_scope:
    """The name scope that marks the ops built directly in it (not in nested scopes) as parts of
    an ungrouped convolution; `one_group` reads the mark off a convolution's own name or its
    second operand's. A user's scope of the same name would mark its ops too."""
    return tf.name_scope(_ONE_GROUP_SCOPE)


def one_group(op: tf.Operation) -> bool:
    """Whether the convolution op is known to be ungrouped: built in `one_group_scope()` (by this
    module, or by TF's gradient of such a conv, see _tf_patches), or its second operand (the
    filter, or the filter gradient's filter_sizes) built there, or its channel counts static and
    equal. The operand too: GradientTape passes a gradient function a mock op holding only the
    inputs. The name too: in a while loop's gradient the operand is an accumulator's pop."""
    name = getattr(op, "name", None)  # None: GradientTape's mock op
    if name is not None and _IN_ONE_GROUP_SCOPE.search(name):
        return True
    producer = getattr(op.inputs[1], "op", None)  # None: an eager tensor (nothing traced to mark)
    if producer is not None and _IN_ONE_GROUP_SCOPE.search(producer.name):
        return True
    input_channels, kernel_channels = channels(op)
    return input_channels is not None and input_channels == kernel_channels


def _attr(op: tf.Operation, name: str):
    value = op.get_attr(name)
    return value.decode() if isinstance(value, bytes) else value


def is_nhwc(op: tf.Operation) -> bool:
    """Whether the convolution op (Conv2D or one of its gradients) has data_format NHWC."""
    return _attr(op, "data_format") == "NHWC"


def _dim(shape: tf.TensorShape, index: int) -> Optional[int]:
    return None if shape.rank is None else tf.compat.dimension_value(shape[index])


def _held_shape(shape_operand: tf.Tensor) -> tf.TensorShape:
    """The static part of the shape that a shape operand holds: read entry by entry (tf.shape(x)
    of an x whose batch is unknown still gives its channels; tf.get_static_value gives None for
    the whole), and from x itself for tf.shape_n (TF's Conv2D gradient builds its shape operands so)."""
    if shape_operand.op.type == "ShapeN":
        return shape_operand.op.inputs[shape_operand.value_index].shape
    return tensor_util.constant_value_as_shape(shape_operand)


def channels(op: tf.Operation) -> tuple[Optional[int], Optional[int]]:
    """(input channels, the kernel's input channels) of a Conv2D, Conv2DBackpropInput or
    Conv2DBackpropFilter op (NHWC or NCHW; the kernel is HWIO in both), each None where not
    static; they differ for a grouped convolution (input channels = groups × the kernel's)."""
    first, second = op.inputs[0], op.inputs[1]
    axis = -1 if is_nhwc(op) else 1
    if op.type == "Conv2DBackpropInput":  # (input_sizes, filter, out_backprop)
        return _dim(_held_shape(first), axis), _dim(second.shape, 2)
    if op.type == "Conv2DBackpropFilter":  # (input, filter_sizes, out_backprop)
        return _dim(first.shape, axis), _dim(_held_shape(second), 2)
    return _dim(first.shape, axis), _dim(second.shape, 2)  # Conv2D


def _applies(op: tf.Operation) -> bool:
    return is_nhwc(op) and all(d == 1 for d in op.get_attr("dilations"))


def _pads(op: tf.Operation, size, out, kernel) -> Optional[list]:
    """[[top, bottom], [left, right]]: the forward convolution's padding of the input."""
    padding = _attr(op, "padding")
    if padding == "VALID":
        return [[0, 0], [0, 0]]
    if padding == "SAME":
        strides = list(op.get_attr("strides"))[1:3]
        totals = [max((o - 1) * s + k - n, 0) for n, o, k, s in zip(size, out, kernel, strides)]
        return [[t // 2, t - t // 2] for t in totals]
    if padding == "EXPLICIT":
        explicit = list(op.get_attr("explicit_paddings"))
        return [explicit[2:4], explicit[4:6]]
    return None


def filter_gradient_as_conv2d(
    x: tf.Tensor, dy: tf.Tensor, kernel_size: Sequence[int], op: tf.Operation
) -> Optional[tf.Tensor]:
    """Conv2DBackpropFilter(x, dy) of the NHWC Conv2D `op`: with the channels as batch and the
    batch as features, dk[p, q, c, o] = Σ_{b,i,j} x_pad[b, i·s + p, j·s + q, c] dy[b, i, j, o]
    is a convolution of x_pad [C, H, W, B] with dy_s [OH, OW, B, O] as filter (dy_s: s − 1
    zeros between neighbouring rows and columns of dy; s the stride)."""
    if not _applies(op):
        return None
    size, out, kernel = tuple(x.shape[1:3]), tuple(dy.shape[1:3]), tuple(int(k) for k in kernel_size)
    if None in size + out:
        return None
    pads = _pads(op, size, out, kernel)
    if pads is None:
        return None
    # dy dilated by explicit zeros, not by a window dilation: TF's gradient of a dilated Conv2D
    # is not canonical under XLA (and has no CPU kernel without XLA).
    dy = _dilate(dy, list(op.get_attr("strides"))[1:3])
    conv_pads = [[0, 0], *pads, [0, 0]]
    if dy.shape[1] * dy.shape[2] > size[0] * size[1]:
        # XLA swaps a convolution's operands (out of the canonical layout) when its window is
        # larger than its unpadded input (the filter gradient of an input gradient, in K-RMD's
        # backward loop): x padded by tf.pad before the transpose, which XLA does not fold.
        x, conv_pads = tf.pad(x, conv_pads), "VALID"
    with one_group_scope():  # [C, >= kh, >= kw, O]
        dk = tf.nn.conv2d(tf.transpose(x, [3, 1, 2, 0]), tf.transpose(dy, [1, 2, 0, 3]), 1, conv_pads)
    if tuple(dk.shape[1:3]) != kernel:
        dk = dk[:, :kernel[0], :kernel[1], :]
    return tf.transpose(dk, [1, 2, 0, 3])


def _dilate(dy: tf.Tensor, strides: Sequence[int]) -> tf.Tensor:
    """dy with s − 1 zeros between neighbouring rows (columns): [B, (OH−1)·s + 1, ...]."""
    sh, sw = strides
    if sh == sw == 1:
        return dy
    b, out_h, out_w, o = [d if d is not None else tf.shape(dy)[i] for i, d in enumerate(dy.shape)]
    # Stacked with zeros, not tf.pad: the gradient of a pad is a Slice, whose gradient under XLA
    # (XlaDynamicUpdateSlice) pfor cannot vectorize (forward mode would loop over its columns).
    zeros = tf.zeros_like(dy)
    spread = tf.stack([dy] + [zeros] * (sh - 1), 2)  # [B, OH, sh, OW, O]
    spread = tf.stack([spread] + [tf.zeros_like(spread)] * (sw - 1), 4)  # [B, OH, sh, OW, sw, O]
    spread = tf.reshape(spread, tf.stack([b, out_h * sh, out_w * sw, o]))
    return spread[:, :(out_h - 1) * sh + 1, :(out_w - 1) * sw + 1, :]


def input_gradient_as_conv2d(x: tf.Tensor, kernel: tf.Tensor, dy: tf.Tensor, op: tf.Operation) -> Optional[tf.Tensor]:
    """Conv2DBackpropInput(shape(x), kernel, dy) of the NHWC Conv2D `op`, with dy_s the dilated
    dy (L = (OH−1)·s + 1 rows) and p_top the forward padding:

      dx[b, i, j, c] = Σ_{u,v,o} dy_s[b, u, v, o] k[i + p_top − u, j + p_left − v, c, o]

    computed as a correlation whose window is the smaller operand (XLA swaps the operands of a
    convolution whose window is the larger one, out of the canonical layout): dy_s padded by
    k − 1 − p_top with the reversed kernel as window, or, when the kernel is the larger one (the
    input gradient of a filter gradient in K-RMD's backward loop), the kernel padded by
    L − 1 − p_top with the reversed dy_s as window, the channels C as batch."""
    if not _applies(op):
        return None
    size, out, ksize = tuple(x.shape[1:3]), tuple(dy.shape[1:3]), tuple(kernel.shape[:2])
    if None in size + out + ksize:  # not static
        return None
    if not one_group(op):  # grouped (callers pass one-group ops only; kept as a guard)
        return None
    pads = _pads(op, size, out, ksize)
    if pads is None:
        return None
    strides = list(op.get_attr("strides"))[1:3]
    dy = _dilate(dy, strides)
    lengths = [(o - 1) * s + 1 for o, s in zip(out, strides)]
    swapped = lengths[0] * lengths[1] < ksize[0] * ksize[1]
    if not swapped:
        # dy_s padded to n + k − 1 rows: k − 1 − top before, what is left after.
        conv_pads = [[k - 1 - top, n + top - length] for n, k, length, (top, _) in zip(size, ksize, lengths, pads)]
    else:
        # The kernel (as [C, kh, kw, O]) padded to n + L − 1 rows: L − 1 − top before.
        conv_pads = [[length - 1 - top, n + top - k] for n, k, length, (top, _) in zip(size, ksize, lengths, pads)]
    if any(p < 0 for pair in conv_pads for p in pair):
        return None  # padding wider than the kernel (EXPLICIT only)
    with one_group_scope():  # the window (the second operand) built here too
        if not swapped:
            window, conv_input = tf.reverse(tf.transpose(kernel, [0, 1, 3, 2]), [0, 1]), dy  # [kh, kw, O, C]
        else:
            window, conv_input = tf.reverse(tf.transpose(dy, [1, 2, 3, 0]), [0, 1]), tf.transpose(kernel, [2, 0, 1, 3])
        dx = tf.nn.conv2d(conv_input, window, 1, [[0, 0], *conv_pads, [0, 0]])
    return tf.transpose(dx, [3, 1, 2, 0]) if swapped else dx
