"""ReLU's gradient op vectorized over forward mode's tangent columns without copies.

ReluGrad(ġ_n, f) (the tangent of ReLU's output, and of its gradient) has the primal's
features f, shared by all N columns, and a per-column ġ_n. TF's pfor converter tiles f N times
(the op does not broadcast). With the mask f > 0 computed once and broadcast over the columns,

  ReluGrad(ġ_n, f) = ġ_n · cast(f > 0)      (TF's kernel: -0 and inf · 0 = nan as there)
                   = where(f > 0, ġ_n, 0)    (XLA's lowering, a select)

gives each backend's values exactly.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.python.framework import ops
from tensorflow.python.ops import control_flow_util


def _relu_grad(wrap, original):
    def convert(pfor_input):
        grads, grads_stacked, _ = pfor_input.input(0)
        features, features_stacked, _ = pfor_input.input(1)
        if features_stacked or not grads_stacked:
            return original(pfor_input)
        n = tf.shape(grads)[0]
        mask = tf.reshape(features > 0, [1, -1])
        flat = tf.reshape(grads, tf.stack([n, -1]))
        if control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph()):
            out = tf.where(mask, flat, tf.zeros([], grads.dtype))
        else:
            out = flat * tf.cast(mask, grads.dtype)
        return [wrap(tf.reshape(out, tf.shape(grads)), True)]

    return convert


CONVERTERS = {"ReluGrad": _relu_grad}
