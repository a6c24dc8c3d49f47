"""The data-hypercleaning problem (paper §4.2.1, appendix G.1): a class-balanced training set
with a fraction of its labels replaced at random, a clean validation set, the rest as test set.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np



class HypercleaningData(NamedTuple):
    """Hypercleaning problem; features are flattened pixels in [0,1] plus a 1.

    `y_train` holds the noisy labels. `replaced` marks the examples selected
    for replacement by a uniformly random label; `corrupted` marks those whose
    label actually changed (about 1/num_classes of the replacements keep their
    true label by chance). `corrupted` is the ground truth for precision /
    recall / F1 of flagged examples, as a replacement that kept the true label
    is a clean example.

    `train_idx` / `val_idx` index `images`; `test_idx` indexes the
    concatenation [images; test_images] (values >= len(images) are test images).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    y_train_clean: np.ndarray
    replaced: np.ndarray
    corrupted: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray


def _linear_features(images: np.ndarray) -> np.ndarray:
    """Flatten, scale integer pixels to [0, 1], append a constant 1 (bias)."""
    x = images.reshape(len(images), -1).astype(np.float32)
    if np.issubdtype(images.dtype, np.integer):
        x /= 255.0
    return np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1)


def _balanced_indices(
    labels: np.ndarray, per_class: int, num_classes: int, rng: np.random.Generator,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """`per_class` random indices of each class, not in `exclude`, shuffled."""
    available = np.ones(len(labels), bool)
    if exclude is not None:
        available[exclude] = False
    chosen = []
    for c in range(num_classes):
        idx = np.flatnonzero((labels == c) & available)
        if len(idx) < per_class:
            raise ValueError(f"class {c} has {len(idx)} examples, needs {per_class}")
        chosen.append(rng.choice(idx, per_class, replace=False))
    return rng.permutation(np.concatenate(chosen))


def hypercleaning_split(
    images: np.ndarray,
    labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    n_train: int = 5000,
    n_val: int = 5000,
    corruption: float = 0.5,
    seed: int = 0,
    num_classes: int | None = None,
) -> HypercleaningData:
    """Class-balanced noisy train / clean val / rest-as-test split.

    `round(corruption * n_train)` training examples get a label drawn
    uniformly from all classes (it may equal the true one). Deterministic
    for a given seed.
    """
    labels = np.asarray(labels, np.int64)
    test_labels = np.asarray(test_labels, np.int64)
    if num_classes is None:
        num_classes = int(max(labels.max(), test_labels.max())) + 1
    if n_train % num_classes or n_val % num_classes:
        raise ValueError("n_train and n_val must be multiples of num_classes")
    rng = np.random.default_rng(seed)
    train_idx = _balanced_indices(labels, n_train // num_classes, num_classes, rng)
    val_idx = _balanced_indices(labels, n_val // num_classes, num_classes, rng, exclude=train_idx)

    y_clean = labels[train_idx]
    replaced = np.zeros(n_train, bool)
    replaced[rng.choice(n_train, int(round(corruption * n_train)), replace=False)] = True
    y_noisy = y_clean.copy()
    y_noisy[replaced] = rng.integers(0, num_classes, int(replaced.sum()))

    rest = np.setdiff1d(np.arange(len(labels)), np.concatenate([train_idx, val_idx]))
    test_idx = np.concatenate([rest, len(labels) + np.arange(len(test_labels))])
    return HypercleaningData(
        x_train=_linear_features(images[train_idx]),
        y_train=y_noisy,
        y_train_clean=y_clean,
        replaced=replaced,
        corrupted=y_noisy != y_clean,
        x_val=_linear_features(images[val_idx]),
        y_val=labels[val_idx],
        x_test=np.concatenate([_linear_features(images[rest]), _linear_features(test_images)]),
        y_test=np.concatenate([labels[rest], test_labels]),
        train_idx=train_idx,
        val_idx=val_idx,
        test_idx=test_idx,
    )
