"""Noisy and long-tailed training sets and the loss-level baselines against which learned
example weights are compared (experiments/reweighting.py, issue #17): label-noise generators,
the long-tailed sampler, the clean-set estimate of the noise transition matrix with forward
loss correction (GLC idea, Hendrycks et al. 2018; Patrini et al. 2017), and class-balanced
weights by effective number (Cui et al. 2019).

Labels travel packed with their example's index (y = index · C + label) where a loss needs
per-example data (fixed example weights, the per-example hyperparameters): `unpack` splits them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

NUM_CLASSES = 10

# Fashion-MNIST classes: 0 T-shirt/top, 1 trouser, 2 pullover, 3 dress, 4 coat, 5 sandal,
# 6 shirt, 7 sneaker, 8 bag, 9 ankle boot. Flip noise sends a label to its confusable partner:
# the garment pairs swap, the three kinds of footwear rotate, a bag becomes a pullover.
FASHION_FLIP = {0: 6, 6: 0, 2: 4, 4: 2, 1: 3, 3: 1, 5: 7, 7: 9, 9: 5, 8: 2}
# MNIST (by flag): digits that are written alike.
MNIST_FLIP = {0: 6, 6: 0, 1: 7, 7: 1, 2: 5, 5: 2, 3: 8, 8: 3, 4: 9, 9: 4}
FLIP_MAPS = {"fashion_mnist": FASHION_FLIP, "mnist": MNIST_FLIP}


# ----------------------------------------------------------------------------------------
# Training sets.
# ----------------------------------------------------------------------------------------
def split(labels: np.ndarray, n_val: int, num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(val_idx: n_val/C per class, train_idx: all the others), both shuffled."""
    per_class = n_val // num_classes
    val = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(num_classes)])
    rest = np.setdiff1d(np.arange(len(labels)), val)
    return rng.permutation(val), rng.permutation(rest)


def symmetric_noise(labels: np.ndarray, rate: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Labels where each is, with probability `rate`, replaced by a uniformly drawn other class."""
    flip = rng.random(len(labels)) < rate
    shift = rng.integers(1, num_classes, len(labels))  # 1..C-1: never the true class
    return np.where(flip, (labels + shift) % num_classes, labels).astype(labels.dtype)


def flip_noise(labels: np.ndarray, rate: float, mapping: dict[int, int], rng: np.random.Generator) -> np.ndarray:
    """Class-dependent noise: each label is, with probability `rate`, replaced by mapping[label]."""
    partner = np.array([mapping[c] for c in range(len(mapping))], labels.dtype)
    if np.any(partner == np.arange(len(mapping))):
        raise ValueError(f"flip map {mapping} sends a class to itself")
    flip = rng.random(len(labels)) < rate
    return np.where(flip, partner[labels], labels).astype(labels.dtype)


def noise_transition(kind: str, rate: float, num_classes: int, mapping: dict[int, int] | None = None) -> np.ndarray:
    """T[i, j] = P(noisy label j | true label i) of `symmetric_noise` / `flip_noise`."""
    if kind == "symmetric":
        t = np.full((num_classes, num_classes), rate / (num_classes - 1))
        np.fill_diagonal(t, 1.0 - rate)
        return t
    if kind == "flip":
        t = (1.0 - rate) * np.eye(num_classes)
        for i, j in mapping.items():
            t[i, j] += rate
        return t
    raise ValueError(f"noise kind must be 'symmetric' or 'flip', got {kind!r}")


def long_tail_counts(n_max: int, ratio: float, num_classes: int) -> np.ndarray:
    """Exponential profile (Cui et al. 2019): class c keeps ⌊n_max · ratio^(−c/(C−1))⌋ examples,
    from n_max (class 0) down to n_max / ratio (class C−1)."""
    return np.floor(n_max * ratio ** (-np.arange(num_classes) / (num_classes - 1))).astype(np.int64)


def long_tail_subset(labels: np.ndarray, ratio: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (shuffled) of a long-tailed subset: `long_tail_counts` from the rarest class's
    count as n_max, each class's examples drawn without replacement."""
    n_max = int(np.bincount(labels, minlength=num_classes).min())
    counts = long_tail_counts(n_max, ratio, num_classes)
    keep = np.concatenate([rng.choice(np.flatnonzero(labels == c), counts[c], replace=False) for c in range(num_classes)])
    return rng.permutation(keep)


# ----------------------------------------------------------------------------------------
# Losses of the baselines (per example; Keras averages them over the minibatch).
# ----------------------------------------------------------------------------------------
def pack(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """y = index · C + label (int32), so a loss can look up per-example data."""
    if len(labels) * num_classes >= 2**24:  # Keras hands y_true to losses as float32: exact below 2^24
        raise ValueError(f"{len(labels)} examples are too many to pack into float32-exact labels")
    return (np.arange(len(labels)) * num_classes + labels).astype(np.int32)


def unpack(y: Any, num_classes: int = NUM_CLASSES) -> tuple[tf.Tensor, tf.Tensor]:
    """(label, index) int32 tensors of packed labels."""
    y = tf.cast(tf.round(tf.cast(y, tf.float64)), tf.int32) if y.dtype.is_floating else tf.cast(y, tf.int32)
    y = tf.reshape(y, [-1])
    return y % num_classes, y // num_classes


def log_softmax_ce(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    return -tf.gather(tf.nn.log_softmax(logits, axis=-1), labels, axis=-1, batch_dims=1)


def weighted_ce(example_weights: np.ndarray, num_classes: int = NUM_CLASSES):
    """loss(y_packed, logits) = example_weights[index] · CE(label, logits): plain training
    (all ones), fixed random weights (Ren et al.'s control), class-balanced weights."""
    table = tf.constant(np.asarray(example_weights, np.float32))

    def loss(y_true, logits):
        labels, index = unpack(y_true, num_classes)
        return tf.gather(table, index) * log_softmax_ce(labels, logits)

    return loss


def forward_corrected_ce(transition: np.ndarray, num_classes: int = NUM_CLASSES):
    """loss(y_packed, logits) = −log (softmax(logits) · C)[ỹ] (forward correction, Patrini et
    al. 2017): the model's clean-class probabilities pushed through the noise C[i, j] ≈ P(ỹ=j | y=i)."""
    c = tf.constant(np.asarray(transition, np.float32))

    def loss(y_true, logits):
        labels, _ = unpack(y_true, num_classes)
        noisy_probs = tf.matmul(tf.nn.softmax(logits, axis=-1), c)
        picked = tf.gather(noisy_probs, labels, axis=-1, batch_dims=1)
        return -tf.math.log(tf.maximum(picked, 1e-12))

    return loss


def estimate_transition(noisy_model_probs: np.ndarray, clean_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """GLC's estimate from trusted data: row i = mean of a noisy-trained model's predicted
    P(ỹ | x) over the clean examples of true class i."""
    rows = [noisy_model_probs[clean_labels == i].mean(axis=0) for i in range(num_classes)]
    return np.stack(rows).astype(np.float64)


def class_balanced_weights(counts: np.ndarray, beta: float) -> np.ndarray:
    """Per-class weights (1 − β) / (1 − β^n_c), scaled to sum to C (Cui et al. 2019, Eq. 5)."""
    counts = np.asarray(counts, np.float64)
    if np.any(counts < 1):
        raise ValueError(f"every class needs at least one training example, got counts {counts.tolist()}")
    w = (1.0 - beta) / (1.0 - np.power(beta, counts))
    return w * len(counts) / w.sum()


def random_example_weights(n: int, seed: int) -> np.ndarray:
    """Ren et al.'s control: weights drawn once, uniform in (0, 1), scaled to mean 1."""
    u = np.random.default_rng(seed + 2000).uniform(0.0, 1.0, n)
    return u / u.mean()
