"""The structure of one dataset element: a task = (inner batch, outer batch).

Every element of the dataset given to `fit`/`evaluate` is `((x_inner, y_inner), (x_outer,
y_outer))` (each part may carry sample weights as a third entry). The inner batch defines
g (e.g. the training set or a task's support set), the outer batch defines f (the validation
set or the task's query set). With `meta_batch=True` every leaf has an extra leading axis
of tasks (e.g. `tasks.batch(4, drop_remainder=True)`).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, NamedTuple, Optional

import tensorflow as tf

from tf_bilevel import _validate

ELEMENT_HELP = (
    "Each dataset element must be ((x_inner, y_inner), (x_outer, y_outer)), optionally with "
    "sample weights as a third entry of each pair. For hyperparameter optimization with fixed "
    "sets use tf.data.Dataset.from_tensors(((x_train, y_train), (x_val, y_val))).repeat(); for "
    "meta-learning, a dataset of tasks (support, query), batched with .batch(meta_batch_size, "
    "drop_remainder=True) when meta_batch=True."
)


class Batch(NamedTuple):
    x: Any
    y: Any
    # () when absent: an empty structure, so that tf.nest / tf.map_fn see no leaf at all.
    sample_weight: Any = ()

    @property
    def weights(self) -> Any:
        """The sample weights, or None."""
        return None if isinstance(self.sample_weight, tuple) and not self.sample_weight else self.sample_weight


class Task(NamedTuple):
    inner: Batch
    outer: Batch


def _as_batch(part: Any, role: str, element: Any) -> Batch:
    if isinstance(part, dict) or not isinstance(part, (tuple, list)) or len(part) not in (2, 3):
        raise ValueError(
            f"dataset element: the {role} part must be a pair (x, y) or a triple (x, y, sample_weight), "
            f"got {_describe(part)} in element {_describe(element)}. {ELEMENT_HELP}"
        )
    return Batch(*part) if len(part) == 3 and part[2] is not None else Batch(part[0], part[1])


def parse_task(element: Any) -> Task:
    """Splits a dataset element (tensors or TensorSpecs) into inner and outer batches."""
    if isinstance(element, dict) or not isinstance(element, (tuple, list)) or len(element) != 2:
        raise ValueError(f"dataset element of the wrong structure: got {_describe(element)}. {ELEMENT_HELP}")
    return Task(_as_batch(element[0], "inner", element), _as_batch(element[1], "outer", element))


def _describe(structure: Any) -> str:
    def leaf(x):
        if isinstance(x, (tf.TensorSpec, tf.Tensor)) or hasattr(x, "shape"):
            return f"<{getattr(x.dtype, 'name', x.dtype)}{list(x.shape) if x.shape.rank is not None else '?'}>"
        return repr(x)

    try:
        return repr(tf.nest.map_structure(leaf, structure)).replace("'", "")
    except (TypeError, ValueError):
        return repr(structure)


def num_tasks(task: Task) -> Optional[int]:
    """The leading (task) dimension shared by every leaf of a meta-batch; None if unknown.

    Raises ValueError if leaves disagree or have no task axis.
    """
    sizes = set()
    for name, leaf in _named_leaves(task):
        shape = leaf.shape
        # [tasks, examples, ...]: a leaf of rank < 2 has no examples axis once the task axis is
        # removed, so the element is most likely one unbatched task.
        if shape.rank is not None and shape.rank < 2:
            raise ValueError(
                f"meta_batch=True but {name} has shape {list(shape)}: with meta_batch=True every leaf is "
                "[tasks, examples, ...], so this looks like one task per element. Batch the task dataset, "
                "e.g. tasks.batch(4, drop_remainder=True), or use meta_batch=False for one task per element."
            )
        if shape.rank is not None and shape[0] is not None:
            sizes.add(shape[0])
    if len(sizes) > 1:
        raise ValueError(
            f"meta_batch=True but the leaves of a dataset element have different leading sizes {sorted(sizes)}: "
            "all inner and outer tensors must be stacked over the same tasks (axis 0). If each element is a "
            "single task, batch the dataset (tasks.batch(4, drop_remainder=True)) or use meta_batch=False."
        )
    return sizes.pop() if sizes else None


def _named_leaves(task: Task) -> list:
    """(name, leaf) for every present leaf of a task, e.g. ("y_inner", <spec>)."""
    named = []
    for part, batch in (("inner", task.inner), ("outer", task.outer)):
        for field, value in (("x", batch.x), ("y", batch.y), ("sample_weight", batch.weights)):
            if value is None:
                continue
            flat = tf.nest.flatten(value)
            for i, leaf in enumerate(flat):
                named.append((f"{field}_{part}" + (f"[{i}]" if len(flat) > 1 else ""), leaf))
    return named


def unstack_spec(spec: Any) -> Any:
    """The spec of one task of a meta-batch (drops the leading task axis)."""
    return tf.nest.map_structure(lambda s: None if s is None else tf.TensorSpec(s.shape[1:], s.dtype), spec)


def zeros_like_spec(spec: Any) -> Any:
    """Concrete zeros for a spec; unknown dimensions become 1 (used only to build layers)."""

    def zeros(s):
        if s is None:
            return None
        shape = [1 if d is None else d for d in s.shape.as_list()]
        return tf.zeros(shape, s.dtype)

    return tf.nest.map_structure(zeros, spec)


def element_spec_of(dataset: Any, argument: str) -> Any:
    spec = getattr(dataset, "element_spec", None)
    if spec is None:
        raise TypeError(
            f"{argument} must be a tf.data.Dataset (or a distributed dataset) of tasks, got "
            f"{type(dataset).__name__}. {ELEMENT_HELP}"
        )
    for leaf in tf.nest.flatten(spec):
        if not isinstance(leaf, tf.TensorSpec):
            raise ValueError(
                f"{argument}: dataset leaves must be dense tensors, got {leaf!r}. {ELEMENT_HELP}"
            )
    return spec


def as_inner_batch(data: Any, argument: str) -> Batch:
    """(x, y[, sample_weight]) as tensors, for one task's inner batch."""
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
        raise ValueError(f"{argument} must be (x, y) or (x, y, sample_weight), got {_describe(data)}")
    return _as_batch(tuple(tf.nest.map_structure(tf.convert_to_tensor, tuple(data))), "inner", data)


def prediction_task(data: Any) -> Task:
    """predict/call input: ((x_inner, y_inner), x_outer), or a full task element (y_outer unused)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[1], (tuple, list)):
        data = (data[0], (data[1], data[1]))
    return parse_task(data)


def prediction_task_spec(spec: Any) -> Any:
    """The element spec of a `predict` input as that of a full task (x_outer's spec for y_outer)."""
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[1], tf.TensorSpec):
        return (spec[0], (spec[1], spec[1]))
    return spec


def _merge_task_axis(x: tf.Tensor) -> tf.Tensor:
    """[tasks, n, ...] -> [tasks·n, ...] (per-example metrics over the whole meta-batch)."""
    return tf.reshape(x, tf.concat([[-1], tf.shape(x)[2:]], axis=0))


def outer_targets(task: Task, y_pred: tf.Tensor, meta_batch: bool) -> tuple:
    """(y_true, y_pred, sample_weight) of the outer batch for the compiled metrics; with
    meta_batch, the tasks merged into one batch ([B, n, ...] -> [B·n, ...])."""
    y_true, sample_weight = task.outer.y, task.outer.weights
    if not meta_batch:
        return y_true, y_pred, sample_weight
    sample_weight = None if sample_weight is None else _merge_task_axis(sample_weight)
    return _merge_task_axis(y_true), _merge_task_axis(y_pred), sample_weight


def resumable(tasks: Any, meta_step: Any) -> tf.data.Dataset:
    """`BilevelTrainer.resumable`: the stream `tasks` started at element `meta_step` (read when
    the iterator starts)."""
    if isinstance(tasks, tf.data.Dataset):
        start_at = lambda start: tasks.skip(start)  # noqa: E731
    elif callable(tasks):
        start_at = tasks
    else:
        raise TypeError(
            "resumable(tasks): tasks must be a tf.data.Dataset of tasks or a function "
            f"start -> tf.data.Dataset (start: the first hyper-iteration, an int64 tensor), got {tasks!r}"
        )
    # A captured variable is read when the iterator starts, not when the dataset is built.
    return tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).flat_map(
        lambda _: start_at(tf.cast(tf.convert_to_tensor(meta_step), tf.int64))
    )


def check_online_spec(task: Task, steps: int) -> None:
    """online=True: the inner part stacks `steps` minibatches on axis 0."""
    for leaf in tf.nest.flatten(task.inner):
        shape = leaf.shape
        if shape.rank is None or shape.rank < 2 or shape[0] != steps:
            raise ValueError(
                f"online=True: each element's inner part must hold steps={steps} minibatches stacked on "
                f"axis 0, got a leaf of shape {shape}. Build the stream with "
                f"tf_bilevel.keras.online_tasks(train_dataset, validation_dataset, steps={steps}), from a "
                "training dataset of minibatches of a fixed size (batch(n, drop_remainder=True))."
            )


def online_tasks(train: tf.data.Dataset, validation: tf.data.Dataset, *, steps: int) -> tf.data.Dataset:
    """The element stream of `BilevelTrainer(..., online=True)` from ordinary pipelines.

    `train` yields minibatches `(x, y[, sample_weight])` of a fixed size (batch with
    `drop_remainder=True`); shuffling, augmentation and batching stay yours. `validation`
    yields the batches of the outer loss. Element k of the result is
    `((x[steps, b, ...], y[steps, b]), (x_val, y_val))`: training minibatches
    k·steps … k·steps + steps − 1 (train is repeated: the stream is endless, so give `fit`
    `steps_per_epoch`, e.g. `len(train) // steps` for epochs over the training set) and
    validation batch k (validation is repeated too).

    For an exact resume after an interruption pass `trainer.resumable(online_tasks(...))`,
    and make the pipelines deterministic (a `seed=` in `shuffle` and in random augmentation).
    """
    for dataset, name in ((train, "train"), (validation, "validation")):
        if not isinstance(dataset, tf.data.Dataset):
            raise TypeError(f"online_tasks: {name} must be a tf.data.Dataset of batches, got {type(dataset).__name__}")
        _as_batch(dataset.element_spec, name, dataset.element_spec)
    steps = _validate.integer(steps, "online_tasks: steps", "T, the trainer's steps")
    for leaf in tf.nest.flatten(train.element_spec):
        if leaf.shape.rank is None or leaf.shape.rank < 1 or leaf.shape[0] is None:
            raise ValueError(
                f"online_tasks: train must yield minibatches of a fixed size, got a leaf of shape {leaf.shape}: "
                "batch it with drop_remainder=True (e.g. train.batch(128, drop_remainder=True))."
            )
    inner = train.repeat().batch(steps, drop_remainder=True)
    return tf.data.Dataset.zip((inner, validation.repeat()))


def episodes(
    make_episode: Callable[[tf.Tensor], Any], *, batch: Optional[int] = None, count: Optional[int] = None
) -> Callable[[Any], tf.data.Dataset]:
    """An episode stream that starts at any hyper-iteration: `stream(start) -> tf.data.Dataset`.

    `make_episode(i)` builds episode i (i: an int64 scalar tensor) as a pure function of i:
    its randomness from stateless ops seeded with i (e.g.
    `tf.random.stateless_uniform(shape, seed=tf.stack([seed, i]))`), so that episode i is the
    same in every run. Element s of `stream(start)`, for s = start, start + 1, ..., is episode
    s, or with `batch=B` the meta-batch of episodes s·B … s·B + B − 1 stacked on a new axis 0
    (for `meta_batch=True`). The stream is endless; `count` ends it after `count` elements
    (counted from s = 0). `stream(start)` builds only the episodes from there on, so
    `trainer.resumable(stream)` jumps to the hyper-iteration a resumed run starts at, where a
    `tf.data.Dataset` is started with `skip`, which still produces every skipped episode.
    Episodes are built in parallel, in order (`map(..., deterministic=True)`).
    """
    if not callable(make_episode):
        raise TypeError(f"episodes(make_episode=...): expected a function i -> episode i, got {make_episode!r}")
    batch = _validate.integer(batch, "episodes(batch=...)", "episodes per meta-batch", optional=True)
    count = _validate.integer(count, "episodes(count=...)", "elements before the stream ends", optional=True)
    per_element = batch or 1
    stop = sys.maxsize if count is None else count * per_element

    def stream(start: Any = 0) -> tf.data.Dataset:
        first = tf.cast(start, tf.int64) * per_element
        ds = tf.data.Dataset.range(first, stop).map(make_episode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if batch:
            ds = ds.batch(batch, drop_remainder=True)
        return ds.prefetch(tf.data.AUTOTUNE)

    return stream
