"""Quantities the paper plots: norms, relative error and cosine similarity between two
hypergradients (Figs. 6–7), and the bounds of Proposition 3.1 (Fig. 1)."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tf_bilevel.dynamics.optimizers import cast_scalar


def _to_float64(x: Any) -> tf.Tensor:
    """x as float64; Python numbers are converted directly (tf.cast would round them to float32 first)."""
    return cast_scalar(x, tf.float64)


def _flat_vector(tree: Any) -> tf.Tensor:
    leaves = [tf.reshape(_to_float64(x), [-1]) for x in tf.nest.flatten(tree)]
    return tf.concat(leaves, axis=0)


def global_norm(tree: Any) -> tf.Tensor:
    """‖x‖₂ of all leaves taken together (e.g. ‖d_λ f‖ of Figs. 5–6), in float64."""
    return tf.norm(_flat_vector(tree))


def relative_error(estimate: Any, reference: Any) -> tf.Tensor:
    """‖estimate − reference‖ / ‖reference‖ (Fig. 7, right), in float64."""
    a, b = _flat_vector(estimate), _flat_vector(reference)
    return tf.math.divide_no_nan(tf.norm(a - b), tf.norm(b))


def cosine_similarity(a: Any, b: Any) -> tf.Tensor:
    """⟨a, b⟩ / (‖a‖‖b‖) (Figs. 6–7), in float64; 0 if either is zero."""
    a, b = _flat_vector(a), _flat_vector(b)
    return tf.math.divide_no_nan(tf.reduce_sum(a * b), tf.norm(a) * tf.norm(b))


def descent_ratio(estimate: Any, exact: Any) -> tf.Tensor:
    """h_{T−K}ᵀ d_λ f / ‖d_λ f‖² (Fig. 2): positive for a descent direction (Lemma 3.2)."""
    a, b = _flat_vector(estimate), _flat_vector(exact)
    return tf.math.divide_no_nan(tf.reduce_sum(a * b), tf.reduce_sum(b * b))


def truncation_bound(
    truncate: Any, learning_rate: float, strong_convexity: float, outer_grad_norm: Any, max_b_norm: Any
) -> tf.Tensor:
    """Eq. 10 (g globally α-strongly convex, γ ≤ 1/β):
    ‖h_{T−K} − d_λ f‖ ≤ (1 − γα)^K / (γα) · ‖∇_ŵ f‖ · M_B."""
    ga = tf.constant(learning_rate * strong_convexity, tf.float64)
    k = _to_float64(truncate)
    return tf.pow(1.0 - ga, k) / ga * _to_float64(outer_grad_norm) * _to_float64(max_b_norm)


def local_truncation_bound(
    truncate: Any, steps: int, learning_rate: float, strong_convexity: float, outer_grad_norm: Any, max_b_norm: Any
) -> tf.Tensor:
    """Eq. 9 (g only locally α-strongly convex around w_{T−K−1} … w_T):
    ‖h_{T−K} − d_λ f‖ ≤ 2^{T−K+1} (1 − γα)^K ‖∇_ŵ f‖ M_B."""
    k = _to_float64(truncate)
    ga = tf.constant(learning_rate * strong_convexity, tf.float64)
    return (
        tf.pow(tf.constant(2.0, tf.float64), steps - k + 1.0)
        * tf.pow(1.0 - ga, k)
        * _to_float64(outer_grad_norm)
        * _to_float64(max_b_norm)
    )
