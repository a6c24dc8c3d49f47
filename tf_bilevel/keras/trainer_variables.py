"""The trainer's own variables: the hyper-iteration counter, the raw hyperparameters ν of λ and
the state other parts keep between hyper-iterations (the update gate's record, a regime's
carried state).

Every one is created through the trainer's `add_weight`, so Keras tracks it and every
checkpoint (`save_weights`, `BackupAndRestore`, `tf.train.Checkpoint`) holds it; the creation
order is the checkpoint layout: `meta_step`, then what `new` creates in order (the gate's
record, at construction), then λ and the regime's state (when the trainer builds).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

import numpy as np
import tensorflow as tf

from tf_bilevel._tree import leaf_names


def read(variable: Any) -> tf.Tensor:
    return tf.convert_to_tensor(variable)


class TrainerVariables:
    """Held by the trainer as a plain attribute (Keras tracks the variables through `add_weight`,
    and does not re-wrap the dicts held here)."""

    def __init__(self, add_weight: Callable[..., Any], first_replica: Any):
        """`add_weight`: the trainer's; `first_replica`: its flavor's ONLY_FIRST_REPLICA
        aggregation (non-trainable state is written identically by every replica)."""
        self._add_weight = add_weight
        self._first_replica = first_replica
        # Hyper-iterations run so far: seeds the per-task stateless RNG, so a resumed run draws the same w0.
        self.meta_step = self.new("meta_step", np.asarray(0, np.int64))
        self.specs: Optional[dict] = None  # the Hyperparameter specs of λ's leaves
        self.raw: Optional[dict] = None  # {"hyper_model": [its trainable variables], "user": {...}, ...}
        self.raw_names: list = []  # the raw variables in the user's terms (for errors)
        self.created = False  # set by the trainer once λ and everything built from it exist

    def new(self, name: str, initial: np.ndarray) -> Any:
        """A non-trainable trainer variable holding `initial` (its shape and dtype)."""
        initial = np.asarray(initial)
        return self._add_weight(
            name=name, shape=initial.shape, dtype=initial.dtype, initializer=_constant(initial), trainable=False,
            aggregation=self._first_replica,
        )

    def create_hyperparameters(self, specs: dict, hyper_model_variables: list) -> None:
        """The raw variables ν of λ, one per leaf of `specs` (at `raw_initial()`), next to the
        hyper model's trainable variables (also part of λ, owned by the hyper model)."""
        names = leaf_names(specs, "")
        flat = [
            self._add_weight(
                name=_variable_name(name) or "hyperparameter", shape=spec.shape, dtype=spec.dtype,
                initializer=_constant(spec.raw_initial()), trainable=True, constraint=spec.raw_constraint,
            )
            for name, spec in zip(names, tf.nest.flatten(specs))
        ]
        self.specs = specs
        self.raw_names = [f"hyper_model weight {v.name!r}" for v in hyper_model_variables] + [
            _describe_leaf(name) for name in names
        ]
        self.raw = {"hyper_model": list(hyper_model_variables), **tf.nest.pack_sequence_as(specs, flat)}

    @property
    def hyper_variables(self) -> list:
        """The variables the outer optimizer updates, in tf.nest order of `raw`."""
        return tf.nest.flatten(self.raw)

    def read_raw(self) -> dict:
        return tf.nest.map_structure(read, self.raw)

    def hyperparameter_values(self) -> dict:
        """λ = transform(ν) of the leaves the trainer owns: the named hyperparameters (flat),
        then "inner_learning_rate", "centers", "strengths", "init" where used."""
        raw = {k: v for k, v in self.raw.items() if k != "hyper_model"}
        values = tf.nest.map_structure(lambda spec, v: spec.value_from_raw(read(v)), self.specs, raw)
        user = values.pop("user")
        return {**user, **values}


def _constant(value: Any):
    value = np.asarray(value)

    def initializer(shape, dtype=None, **kwargs):
        return tf.cast(tf.reshape(tf.constant(value), shape), dtype or value.dtype)

    return initializer


def _variable_name(path: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]+", "_", path).strip("_")


def _describe_leaf(name: str) -> str:
    """"['user']['w']" -> "hyperparameters['w']" (names in the user's terms)."""
    if name.startswith("['user']"):
        return "hyperparameters" + name[len("['user']"):]
    return name.lstrip("[").split("]")[0].strip("'") + name[name.index("]") + 1:]
