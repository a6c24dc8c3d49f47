"""Small helpers for nested structures of tensors (params, hparams, optimizer state)."""

from __future__ import annotations

from typing import Any, Sequence

import tensorflow as tf


def leaf_names(structure: Any, root: str) -> list[str]:
    """Human-readable paths of the leaves of `structure`, in `tf.nest.flatten` order.

    Used only to name the offending leaf in error messages, e.g. "hparams['lr']".
    """
    names: list[str] = []

    def visit(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key in sorted(node):  # tf.nest flattens dicts in sorted-key order
                visit(node[key], f"{path}[{key!r}]")
        elif isinstance(node, (list, tuple)):
            fields = getattr(node, "_fields", None)
            for i, child in enumerate(node):
                visit(child, f"{path}.{fields[i]}" if fields else f"{path}[{i}]")
        else:  # None too: tf.nest.flatten keeps it as a leaf (and the caller rejects it by name)
            names.append(path)

    visit(structure, root)
    return names


def fill_none_with_zeros(grads: Sequence[tf.Tensor | None], like: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    return [tf.zeros_like(x) if g is None else g for g, x in zip(grads, like)]


def vdot(xs: Sequence[tf.Tensor], ys: Sequence[tf.Tensor]) -> tf.Tensor:
    """Inner product of two flat lists of tensors, treated as one long vector."""
    return tf.add_n([tf.reduce_sum(x * y) for x, y in zip(xs, ys)])


def axpy(a: tf.Tensor, xs: Sequence[tf.Tensor], ys: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """a * x + y, leaf by leaf."""
    from tf_bilevel.dynamics.optimizers import cast_scalar  # avoid an import cycle at load time

    return [cast_scalar(a, x.dtype) * x + y for x, y in zip(xs, ys)]
