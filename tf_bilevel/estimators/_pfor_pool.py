"""Max pooling's backward ops vectorized over forward mode's tangent columns without copies.

The JVP of a max-pool step has two linear terms whose pooled operand x (and its output y) is
the primal's, shared by all N columns, and only the routed tensor differs per column:

  MaxPoolGradGrad(x, y, ẋ_n)   the pooled output's tangent: ẋ_n read at each window's max
  MaxPoolGrad(x, y, ġ_n)       ∇x's tangent: ġ_n written to each window's max, zeros elsewhere

TF's pfor converters tile x and y N times and run the op on an N-times larger batch; XLA lowers
MaxPoolGradGrad to a reduce-window over (value, index) tuples and a scatter, so that costs N
times the primal's (most of a forward step on a pooled CNN). When the windows do not overlap
(stride = window, the usual 2×2/2 pooling) each input position belongs to at most one window,
and both ops are a selection by a 0/1 mask of the primal's shape:

  MaxPoolGrad:      out_n = where(R, upsample(ġ_n), 0), R = MaxPoolGrad(x, y, 1) ≠ 0
  MaxPoolGradGrad:  out_n = ẋ_n gathered at the positions MaxPoolGradGrad(x, y, c) reads,
                    c = each position's index in its window

Mask and positions are computed once, by the op they replace on the unbatched operands, so
ties (common: ReLU zeros) are broken as that op breaks them (XLA and TF's kernels differ); the
values are copied, never multiplied, so the result equals TF's per column exactly (non-finite
values included).
Overlapping windows, NCHW and the V2 ops (ksize as a tensor) go to TF's own converters.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf


def _geometry(pfor_input, x: tf.Tensor):
    """(stride_h, stride_w, offset_h, offset_w, out_h, out_w) of a non-overlapping NHWC pooling
    of x, where input row i lies in window (i + offset_h) // stride_h; None when not applicable."""
    data_format = pfor_input.get_attr("data_format")
    if (data_format.decode() if isinstance(data_format, bytes) else data_format) != "NHWC":
        return None
    ksize, strides = list(pfor_input.get_attr("ksize")), list(pfor_input.get_attr("strides"))
    padding = pfor_input.get_attr("padding")
    padding = padding.decode() if isinstance(padding, bytes) else padding
    if ksize != strides or ksize[0] != 1 or ksize[3] != 1 or not x.shape[1:3].is_fully_defined():
        return None
    (sh, sw), (h, w) = strides[1:3], x.shape[1:3]
    if padding == "VALID":
        if h < sh or w < sw:
            return None
        return sh, sw, 0, 0, h // sh, w // sw
    if padding == "SAME":
        out_h, out_w = -(-h // sh), -(-w // sw)
        return sh, sw, (out_h * sh - h) // 2, (out_w * sw - w) // 2, out_h, out_w
    return None


def _to_windows(t: tf.Tensor, geometry, fill) -> tf.Tensor:
    """[..., H, W, C] -> [..., out_h·stride_h, out_w·stride_w, C]: the window grid's rows and
    columns (cropped where VALID drops a remainder, padded with `fill` where SAME pads)."""
    sh, sw, oh, ow, out_h, out_w = geometry
    h, w = t.shape[-3], t.shape[-2]
    keep_h, keep_w = min(h, out_h * sh - oh), min(w, out_w * sw - ow)
    if keep_h < h or keep_w < w:
        t = t[..., :keep_h, :keep_w, :]
    pad_h, pad_w = out_h * sh - oh - keep_h, out_w * sw - ow - keep_w
    if oh or ow or pad_h or pad_w:
        t = tf.pad(t, [[0, 0]] * (t.shape.rank - 3) + [[oh, pad_h], [ow, pad_w], [0, 0]], constant_values=fill)
    return t


def _from_windows(t: tf.Tensor, geometry, h: int, w: int) -> tf.Tensor:
    """The inverse of `_to_windows`: back to [..., H, W, C], zeros where no window reaches."""
    sh, sw, oh, ow, out_h, out_w = geometry
    if oh or ow or out_h * sh > h or out_w * sw > w:
        t = t[..., oh: oh + h, ow: ow + w, :]
    pad_h, pad_w = h - t.shape[-3], w - t.shape[-2]
    if pad_h or pad_w:
        t = tf.pad(t, [[0, 0]] * (t.shape.rank - 3) + [[0, pad_h], [0, pad_w], [0, 0]])
    return t


_ATTRS = ("ksize", "strides", "padding", "data_format")


class _Pooling(NamedTuple):
    """What both converters read off the op: the primal's pooled input x and output y, the
    per-column routed tensor, the window geometry, the op's attributes, and x's batch size and
    channels (dynamic)."""

    x: tf.Tensor
    y: tf.Tensor
    routed: tf.Tensor
    geometry: tuple
    attrs: dict
    batch: tf.Tensor
    channels: tf.Tensor


def _pooling(pfor_input) -> _Pooling | None:
    """The op's operands and geometry when a converter here applies: x and y the primal's
    (unstacked), the routed tensor per column (stacked), non-overlapping NHWC windows; else None."""
    x, x_stacked, _ = pfor_input.input(0)
    y, y_stacked, _ = pfor_input.input(1)
    routed, routed_stacked, _ = pfor_input.input(2)
    if x_stacked or y_stacked or not routed_stacked:
        return None
    geometry = _geometry(pfor_input, x)
    if geometry is None:
        return None
    attrs = {name: pfor_input.get_attr(name) for name in _ATTRS}
    return _Pooling(x, y, routed, geometry, attrs, tf.shape(x)[0], tf.shape(x)[3])


def _max_pool_grad(wrap, original):
    def convert(pfor_input):
        pool = _pooling(pfor_input)
        if pool is None:
            return original(pfor_input)
        x, y, grads, geometry, attrs, batch, channels = pool  # grads: [N, B, out_h, out_w, C]
        sh, sw, _, _, out_h, out_w = geometry
        routed = tf.raw_ops.MaxPoolGrad(orig_input=x, orig_output=y, grad=tf.ones_like(y), **attrs)
        mask = _to_windows(tf.not_equal(routed, 0), geometry, False)
        mask = tf.reshape(mask, tf.stack([1, batch * out_h, sh, out_w, sw, channels]))
        n = tf.shape(grads)[0]
        spread = tf.reshape(grads, tf.stack([n, batch * out_h, 1, out_w, 1, channels]))
        out = tf.where(mask, spread, tf.zeros([], grads.dtype))
        out = tf.reshape(out, tf.stack([n, batch, out_h * sh, out_w * sw, channels]))
        return [wrap(_from_windows(out, geometry, x.shape[1], x.shape[2]), True)]

    return convert


def _max_pool_grad_grad(wrap, original):
    def convert(pfor_input):
        pool = _pooling(pfor_input)
        if pool is None:
            return original(pfor_input)
        x, y, tangents, geometry, attrs, batch, channels = pool  # tangents: [N, B, H, W, C]
        sh, sw, oh, ow, out_h, out_w = geometry
        h, w = x.shape[1], x.shape[2]
        # Each position's index in its window (small integers: exact in any float type); the op
        # returns, per window, the index of the position it reads.
        offsets = tf.reshape(tf.range(sh * sw, dtype=x.dtype), [1, 1, sh, 1, sw, 1])
        code = tf.broadcast_to(offsets, tf.stack([batch, out_h, sh, out_w, sw, channels]))
        code = _from_windows(tf.reshape(code, tf.stack([batch, out_h * sh, out_w * sw, channels])), geometry, h, w)
        picked = tf.raw_ops.MaxPoolGradGrad(orig_input=x, orig_output=y, grad=code, **attrs)
        index_dtype = tf.int32 if x.shape.num_elements() and x.shape.num_elements() < 2**31 else tf.int64
        picked = tf.cast(picked, index_dtype)
        row = tf.reshape(tf.range(out_h, dtype=index_dtype), [1, out_h, 1, 1]) * sh + picked // sw - oh
        col = tf.reshape(tf.range(out_w, dtype=index_dtype), [1, 1, out_w, 1]) * sw + picked % sw - ow
        image = tf.reshape(tf.range(tf.cast(batch, index_dtype)), [-1, 1, 1, 1])
        channel = tf.reshape(tf.range(tf.cast(channels, index_dtype)), [1, 1, 1, -1])
        flat = ((image * h + row) * w + col) * tf.cast(channels, index_dtype) + channel
        n = tf.shape(tangents)[0]
        out = tf.gather(tf.reshape(tangents, tf.stack([n, -1])), tf.reshape(flat, [-1]), axis=1)
        return [wrap(tf.reshape(out, tf.stack([n, batch, out_h, out_w, channels])), True)]

    return convert


CONVERTERS = {
    "MaxPoolGrad": _max_pool_grad,
    "MaxPoolGradGrad": _max_pool_grad_grad,
}
