"""Few-shot data (paper §4.3): Omniglot as arrays, disjoint class pools, rotations as new
classes, and N-way K-shot episodes sampled in TF as a pure function of (seed, episode index).
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import tensorflow as tf

from experiments.data import tfds_offline


def load_omniglot(
    *, data_dir: str | None = None, image_size: int = 28
) -> tuple[np.ndarray, np.ndarray]:
    """All 1623 Omniglot characters (tfds train + test), grayscale, resized.

    tfds labels are already global character ids (0..1622) across splits, so
    the two splits are simply concatenated; use `class_split(labels,
    {"train": 1200, "val": 100, "test": 323})` for the paper's split.
    """
    data = tfds_offline.load_image_classification(
        "omniglot", data_dir=data_dir, splits=("train", "test"),
        image_size=image_size, grayscale=True,
    )
    x = np.concatenate([data["train"][0], data["test"][0]])
    y = np.concatenate([data["train"][1], data["test"][1]])
    return x, y




def class_split(
    labels: np.ndarray, sizes: Mapping[str, int], *, seed: int = 0
) -> dict[str, np.ndarray]:
    """Randomly partition the classes present in `labels` into disjoint pools.

    E.g. sizes={"train": 1200, "val": 100, "test": 323} for Omniglot or
    {"train": 5, "test": 5} for MNIST. Pools are sorted class ids.
    """
    classes = np.unique(labels)
    if sum(sizes.values()) > len(classes):
        raise ValueError(f"{sum(sizes.values())} classes requested, {len(classes)} exist")
    perm = np.random.default_rng(seed).permutation(classes)
    pools, start = {}, 0
    for name, size in sizes.items():
        pools[name] = np.sort(perm[start:start + size])
        start += size
    return pools


def add_rotations(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add 90/180/270 degree rotations as new classes (label + k * num_classes).

    The usual Omniglot augmentation; images are [N, H, W, C] with H == W.
    """
    num_classes = int(labels.max()) + 1
    xs = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
    ys = [labels + k * num_classes for k in range(4)]
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)


def rotated_classes(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Class ids of all rotations of `classes` (split base classes first, so
    rotations of a class never land in another pool)."""
    return np.concatenate([np.asarray(classes) + k * num_classes for k in range(4)])


def _class_index_table(labels: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[C, M] indices of each class's examples (padded with 0) and [C] counts.

    Every label must be in `classes`. Vectorized: thousands of classes (e.g.
    rotated Omniglot) would make a per-class scan slow.
    """
    by_value = np.argsort(classes)
    row = by_value[np.searchsorted(classes, labels, sorter=by_value)]
    counts = np.bincount(row, minlength=len(classes)).astype(np.int32)
    order = np.argsort(row, kind="stable")
    col = np.arange(len(labels)) - np.repeat(np.cumsum(counts) - counts, counts)
    table = np.zeros((len(classes), max(int(counts.max()), 1)), np.int64)
    table[row[order], col] = order
    return table, counts


def episode_sampler(
    images: np.ndarray,
    labels: np.ndarray,
    classes: np.ndarray,
    *,
    n_way: int,
    k_shot: int,
    n_query: int,
    seed: int = 0,
    normalize: bool = True,
    return_classes: bool = False,
) -> Callable[[tf.Tensor], dict]:
    """`episode(i)`: N-way K-shot episode i (i: an int64 scalar tensor) from the classes in
    `classes`, a pure function of (seed, i), for `tf_bilevel.keras.episodes` or `make_episodes`.

    An episode is {"support_x": [N*K, ...], "support_y": [N*K], "query_x": [N*Q, ...],
    "query_y": [N*Q]} (class-major order; labels relabelled 0..N-1 in a random class order),
    plus "classes": [N] original ids if `return_classes`. Sampling is pure TF with stateless
    random ops keyed on (seed, i): episode i is the same on every pass and in every run, and
    no Python runs per episode.
    """
    classes = np.asarray(classes)
    if n_way > len(classes):
        raise ValueError(f"n_way={n_way} > {len(classes)} classes in the pool")
    in_pool = np.isin(labels, classes)
    pool_x, pool_y = images[in_pool], np.asarray(labels)[in_pool]
    table, counts = _class_index_table(pool_y, classes)
    if counts.min() < k_shot + n_query:
        raise ValueError(f"a class has {counts.min()} examples < k_shot + n_query")

    x = tf.constant(pool_x)  # kept in its dtype (uint8: 4x less memory)
    scale = 255.0 if pool_x.dtype == np.uint8 else 1.0

    def images_at(idx):
        out = tf.gather(x, tf.reshape(idx, [-1]))
        return tf.cast(out, tf.float32) / scale if normalize else out

    table_t, counts_t = tf.constant(table), tf.constant(counts)
    classes_t = tf.constant(classes.astype(np.int64))
    n_per = k_shot + n_query
    width = table.shape[1]

    def episode(i):
        key = tf.stack([tf.constant(seed, tf.int64), tf.cast(i, tf.int64)])
        class_seed, example_seed = tf.unstack(tf.random.experimental.stateless_split(key, 2))
        chosen = tf.argsort(tf.random.stateless_uniform([len(classes)], class_seed))[:n_way]
        # Random keys per slot; padding slots get keys > 1 so they sort last.
        keys = tf.random.stateless_uniform([n_way, width], example_seed)
        valid = tf.range(width)[None, :] < tf.gather(counts_t, chosen)[:, None]
        slots = tf.argsort(tf.where(valid, keys, 2.0), axis=1)[:, :n_per]
        idx = tf.gather(tf.gather(table_t, chosen), slots, batch_dims=1)  # [N, K+Q]
        way = tf.range(n_way, dtype=tf.int64)
        out = {
            "support_x": images_at(idx[:, :k_shot]),
            "support_y": tf.repeat(way, k_shot),
            "query_x": images_at(idx[:, k_shot:]),
            "query_y": tf.repeat(way, n_query),
        }
        if return_classes:
            out["classes"] = tf.gather(classes_t, chosen)
        return out

    return episode


def make_episodes(
    images: np.ndarray,
    labels: np.ndarray,
    classes: np.ndarray,
    *,
    n_way: int,
    k_shot: int,
    n_query: int,
    seed: int = 0,
    num_episodes: int | None = None,
    meta_batch_size: int | None = None,
    normalize: bool = True,
    return_classes: bool = False,
) -> tf.data.Dataset:
    """The episodes of `episode_sampler` (same arguments) 0, 1, ... as a tf.data.Dataset,
    batched to [B, ...] if `meta_batch_size`. `num_episodes=None` gives an infinite stream.
    (A stream that can start at any episode: `tf_bilevel.keras.episodes(episode_sampler(...))`.)
    """
    episode = episode_sampler(images, labels, classes, n_way=n_way, k_shot=k_shot, n_query=n_query, seed=seed,
                              normalize=normalize, return_classes=return_classes)
    ds = tf.data.Dataset.range(num_episodes) if num_episodes else tf.data.Dataset.counter()
    ds = ds.map(episode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if meta_batch_size:
        ds = ds.batch(meta_batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)
