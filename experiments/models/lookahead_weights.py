r"""Learning to reweight examples by one look-ahead step (Ren et al. 2018, Alg. 1), with the
hypergradient from tf_bilevel (`tfb.hypergradient_fn`, T = K = 1).

At every SGD step, the minibatch's examples get weights ε_i = 0 in a look-ahead step
ŵ(ε) = w − α ∇_w Σ_i ε_i ℓ_i(w); the hypergradient h = ∂f(ŵ(ε))/∂ε at ε = 0 of the clean
validation loss f (paper, Eq. 6 with T = 1) is −α ∇ℓ_i(w)·∇f(w). The step's weights are
w̃_i = max(−h_i, 0), normalized to sum to 1 (all zero if every h_i ≥ 0), and the actual
update is the optimizer's on Σ_i w̃_i ℓ_i(w). The weights are fresh per step, not persistent
hyperparameters (experiments/reweighting.py's `l2rw` learns those).

Optionally (`clean_per_batch` > 0) each training minibatch is joined by that many clean
examples at a fixed weight of 1/B each (the careful user's use of the clean set in the stream).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

import tf_bilevel as tfb
from experiments.data import noisy_labels as nl


def lookahead_weights(hypergrad: Any) -> tf.Tensor:
    """Ren et al.'s weights from h = ∂f/∂ε at ε = 0: max(−h, 0) / Σ max(−h, 0) (zeros if the sum is 0)."""
    w = tf.maximum(-tf.convert_to_tensor(hypergrad), 0.0)
    total = tf.reduce_sum(w)
    return tf.where(total > 0, w / tf.where(total > 0, total, 1.0), tf.zeros_like(w))


def lookahead_weights_numpy(hypergrad: np.ndarray) -> np.ndarray:
    w = np.maximum(-np.asarray(hypergrad, np.float64), 0.0)
    return w / w.sum() if w.sum() > 0 else np.zeros_like(w)


def example_hypergradient(classifier: keras.Model, lookahead_lr: float, jit_compile: bool) -> tfb.Hypergradient:
    """h(params, ε, (x, y), (x_val, y_val)) = ∂/∂ε of the mean validation cross-entropy after one
    SGD step of size `lookahead_lr` on Σ_i ε_i CE_i (the classifier evaluated statelessly at params)."""
    if classifier.non_trainable_variables:
        raise ValueError("lookahead reweighting: the classifier must have no non-trainable state (e.g. BatchNorm)")

    def logits(params, x):
        out, _ = classifier.stateless_call(list(params), [], x)
        return out

    def inner_loss(params, eps, batch):
        x, y = batch
        return tf.reduce_sum(eps * nl.log_softmax_ce(y, logits(params, x)))

    def outer_loss(params, eps, batch):
        x, y = batch
        return tf.reduce_mean(nl.log_softmax_ce(y, logits(params, x)))

    return tfb.hypergradient_fn(inner_loss, outer_loss, steps=1, learning_rate=lookahead_lr, jit_compile=jit_compile,
                                check_numerics=False)


class LookAheadReweighting(keras.Model):
    """Trains `classifier` (its variables are this model's) on elements ((x, x_val, y_val[, x_c, y_c]), y_packed):
    Ren et al.'s per-step weights of the minibatch (x, y), then one optimizer step on the weighted
    loss. `last_weights[i]` holds B·w̃_i of training example i at its latest step (1 = uniform),
    `mean_weights()` its mean over all the steps that saw it."""

    def __init__(self, classifier: keras.Model, n_train: int, lookahead_lr: float, jit_compile: bool = False,
                 clean_per_batch: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.classifier = classifier
        self.clean_per_batch = clean_per_batch
        self.hypergradient = example_hypergradient(classifier, lookahead_lr, jit_compile)
        self.last_weights = self.add_weight(shape=(n_train,), initializer="ones", trainable=False, name="last_weights")
        # Σ over the steps that saw example i of B·w̃_i, and how many: their ratio is its mean weight.
        self.weight_sums = self.add_weight(shape=(n_train,), initializer="zeros", trainable=False, name="weight_sums")
        self.times_seen = self.add_weight(shape=(n_train,), initializer="zeros", trainable=False, name="times_seen")

    def mean_weights(self) -> np.ndarray:
        """Each training example's B·w̃_i averaged over the steps that saw it (1 if never seen)."""
        seen = self.times_seen.numpy()
        return np.where(seen > 0, self.weight_sums.numpy() / np.maximum(seen, 1), 1.0)

    def call(self, inputs, training=False):
        return self.classifier(inputs[0] if isinstance(inputs, (tuple, list)) else inputs, training=training)

    def train_step(self, data):
        inputs, y_packed, _ = keras.utils.unpack_x_y_sample_weight(data)
        x, x_val, y_val = inputs[:3]
        labels, index = nl.unpack(y_packed)
        params = [v.value for v in self.classifier.trainable_variables]
        eps = tf.zeros(tf.shape(labels), tf.float32)
        _, h = self.hypergradient(params, eps, (x, labels), (x_val, y_val))
        w = tf.stop_gradient(lookahead_weights(h))
        batch = tf.cast(tf.shape(labels)[0], tf.float32)
        self.last_weights.assign(tf.tensor_scatter_nd_update(self.last_weights.value, index[:, None], w * batch))
        self.weight_sums.assign(tf.tensor_scatter_nd_add(self.weight_sums.value, index[:, None], w * batch))
        self.times_seen.assign(tf.tensor_scatter_nd_add(self.times_seen.value, index[:, None], tf.ones_like(w)))
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(w * nl.log_softmax_ce(labels, self.classifier(x, training=True)))
            if self.clean_per_batch:
                x_c, y_c = inputs[3:5]
                loss += tf.reduce_sum(nl.log_softmax_ce(y_c, self.classifier(x_c, training=True))) / batch
        variables = self.classifier.trainable_variables
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        return {"loss": loss, "flagged": tf.reduce_mean(tf.cast(w <= 0, tf.float32))}
