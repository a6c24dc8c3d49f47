"""The structure of one dataset element: a task = (inner batch, outer batch).

Every element of the dataset given to `fit`/`evaluate` is `((x_inner, y_inner), (x_outer,
y_outer))` (each part may carry sample weights as a third entry). The inner batch defines
g (e.g. the training set or a task's support set), the outer batch defines f (the validation
set or the task's query set). With `meta_batch=True` every leaf has an extra leading axis
of tasks (e.g. `tasks.batch(4, drop_remainder=True)`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import tensorflow as tf

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
