"""IDX (.gz) files, the format MNIST ships in, read and written with NumPy alone: the tests'
independent view of the data and their way to make small local copies of it."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Optional

import numpy as np


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
