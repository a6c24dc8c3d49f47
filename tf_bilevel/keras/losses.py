"""Per-example losses with second derivatives.

Every reverse-mode hypergradient differentiates ∇w g once more (B_t, A_t of Eq. 6). Older
TF versions disable the second derivative of the fused softmax cross-entropy ops
(`tf.nn.sparse_softmax_cross_entropy_with_logits`, used by Keras' crossentropy losses with
`from_logits=True`; TF 2.21 supports it). These log_softmax-based versions have the same
values and full higher-order gradients on every version. They return one loss per example;
the trainer averages them.
"""

from __future__ import annotations

import tensorflow as tf


def sparse_categorical_crossentropy(y_true: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """−log softmax(logits)[y] per example; y_true holds integer class ids."""
    log_probs = tf.nn.log_softmax(logits, axis=-1)
    labels = tf.cast(tf.reshape(y_true, tf.shape(log_probs)[:-1]), tf.int32)
    return -tf.gather(log_probs, labels, axis=-1, batch_dims=log_probs.shape.rank - 1)


def categorical_crossentropy(y_true: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """−Σ_k y_k log softmax(logits)_k per example; y_true holds (soft) one-hot targets."""
    log_probs = tf.nn.log_softmax(logits, axis=-1)
    return -tf.reduce_sum(tf.cast(y_true, log_probs.dtype) * log_probs, axis=-1)


def mean_squared_error(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """Mean over the last axis of (y_pred − y_true)², per example."""
    return tf.reduce_mean(tf.square(y_pred - tf.cast(y_true, y_pred.dtype)), axis=-1)


SECOND_ORDER_HINT = (
    "An op used by the loss has its (second) derivative disabled in TensorFlow "
    "(\"Gradient explicitly disabled\"), but reverse-mode hypergradients differentiate the inner "
    "gradient once more (B_t, A_t of Eq. 6). Use twice-differentiable ops in inner_loss, e.g. "
    "tf_bilevel.keras.losses.sparse_categorical_crossentropy / categorical_crossentropy "
    "(log_softmax based; some TF versions disable the second derivative of the fused "
    "tf.nn.sparse_softmax_cross_entropy_with_logits used by Keras' crossentropy losses)."
)
