"""Forward-mode hypergradient (FMD, Eq. 7): Z_{t+1} = Z_t A_{t+1} + B_{t+1}, one column of Z
per hyperparameter coordinate, with JVPs (forward-over-reverse through ∇w g).

Time O(cNT), memory O(M) per column (Table 1): for checking the reverse estimators and for
problems with few hyperparameters.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tf_bilevel import nonfinite
from tf_bilevel._tree import fill_none_with_zeros
from tf_bilevel.dynamics.transition import Transition
from tf_bilevel.estimators.common import EstimatorOutput, internal_copy

_ZERO = tf.UnconnectedGradients.ZERO


def _basis_vector(index: tf.Tensor, flat_hp: list) -> list:
    """e_index of R^N, split into the shapes and dtypes of the hyperparameter leaves."""
    sizes = [int(x.shape.num_elements()) for x in flat_hp]
    onehot = tf.one_hot(index, sum(sizes), dtype=tf.float64)
    return [tf.cast(tf.reshape(part, x.shape), x.dtype) for part, x in zip(tf.split(onehot, sizes), flat_hp)]


def _jvp(fn, primals: list, tangents: list):
    with tf.autodiff.ForwardAccumulator(primals, tangents) as acc:
        out = fn()
    return out, acc.jvp(out, unconnected_gradients=_ZERO)


def forward_hypergradient(
    transition: Transition, params: Any, hparams: Any, inner_batch: Any, outer_batch: Any, *, steps: int,
    opt_state: Any = None,
) -> EstimatorOutput:
    """d_λ f = Z_T ∇w f + ∇λ f, computed column by column in a `tf.while_loop` over N."""
    problem = transition.problem
    flat_hp = tf.nest.flatten(hparams)
    num_hparams = sum(int(x.shape.num_elements()) for x in flat_hp)
    if any(not x.shape.is_fully_defined() for x in flat_hp):
        raise ValueError("estimator='forward' needs hyperparameters with fully defined shapes")

    def column(i):
        hp = internal_copy(hparams)
        hp_flat = tf.nest.flatten(hp)
        hp_dot = _basis_vector(i, hp_flat)
        w0, w0_dot = _jvp(lambda: problem.initial_params(params, hp), hp_flat, hp_dot)
        state = transition.init_state(w0, opt_state)
        state_dot = type(state)(w0_dot, tf.nest.map_structure(tf.zeros_like, state.opt_state))

        def body(t, state, state_dot, marker):
            hp_in = internal_copy(hparams)
            hp_in_flat = tf.nest.flatten(hp_in)
            primals = tf.nest.flatten(state) + hp_in_flat
            tangents = tf.nest.flatten(state_dot) + _basis_vector(i, hp_in_flat)
            (new_state, loss), (new_dot, _) = _jvp(
                lambda: transition(state, hp_in, t, inner_batch), primals, tangents
            )
            marker = nonfinite.mark(marker, loss, t)
            return t + 1, new_state, new_dot, marker

        _, state, state_dot, marker = tf.while_loop(
            lambda t, *_: t < steps,
            body,
            (tf.constant(0), state, state_dot, tf.constant(nonfinite.NONE)),
            maximum_iterations=steps,
        )
        hp_out = internal_copy(hparams)
        hp_out_flat = tf.nest.flatten(hp_out)
        value, d_value = _jvp(
            lambda: problem.outer(state.params, hp_out, outer_batch),
            tf.nest.flatten(state.params) + hp_out_flat,
            tf.nest.flatten(state_dot.params) + _basis_vector(i, hp_out_flat),
        )
        return value, d_value, state, marker

    def loop_body(i, column_values, value, final_state, marker):
        value, d_value, final_state, col_marker = column(i)
        return i + 1, column_values.write(i, d_value), value, final_state, nonfinite.earliest(marker, col_marker)

    # The first column is peeled off the loop: it fixes the dtypes of the loop variables.
    value, d_value, final_state, marker = column(tf.constant(0))
    column_values = tf.TensorArray(d_value.dtype, size=num_hparams).write(0, d_value)
    _, column_values, value, final_state, marker = tf.while_loop(
        lambda i, *_: i < num_hparams,
        loop_body,
        (tf.constant(1), column_values, value, final_state, marker),
        maximum_iterations=max(num_hparams - 1, 1),
    )
    flat_h = tf.split(column_values.stack(), [int(x.shape.num_elements()) for x in flat_hp])
    h = [tf.cast(tf.reshape(part, x.shape), x.dtype) for part, x in zip(flat_h, flat_hp)]
    return EstimatorOutput(value, fill_none_with_zeros(h, flat_hp), final_state.params, marker, final_state.opt_state)
