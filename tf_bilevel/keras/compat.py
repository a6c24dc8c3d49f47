"""Which Keras a layer belongs to, and how to call it on plain weight tensors.

The inner loop threads the weights w_t through `tf.while_loop` as tensors, so the inner
model must be called *functionally* on given weight values: Keras 3 provides this as
`Layer.stateless_call`; tf-keras (Keras 2) gets a small shim in `legacy.py`.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

KERAS3 = "keras3"
TF_KERAS = "tf_keras"

_PACKAGE_NAMES = {KERAS3: "Keras 3 (`import keras`)", TF_KERAS: "tf-keras (Keras 2: `import tf_keras` or tf.keras with TF_USE_LEGACY_KERAS=1)"}
_TRAINER_FOR = {KERAS3: "tf_bilevel.BilevelTrainer", TF_KERAS: "tf_bilevel.LegacyBilevelTrainer"}


def keras_flavor(obj: Any) -> Optional[str]:
    """KERAS3, TF_KERAS or None, from the modules of the object's classes."""
    for cls in type(obj).__mro__:
        module = getattr(cls, "__module__", "") or ""
        if module.startswith("tf_keras"):
            return TF_KERAS
        if module == "keras" or module.startswith("keras."):
            return KERAS3
    return None


def require_layer(obj: Any, argument: str, flavor: str) -> None:
    """A clear error for a non-layer, or a layer of the other Keras."""
    actual = keras_flavor(obj)
    if actual is None or not hasattr(type(obj), "trainable_weights"):
        raise TypeError(f"{argument} must be a Keras layer or model ({_PACKAGE_NAMES[flavor]}), got {obj!r}")
    if actual != flavor:
        raise TypeError(
            f"{argument} is a {_PACKAGE_NAMES[actual]} layer, but {_TRAINER_FOR[flavor]} works with "
            f"{_PACKAGE_NAMES[flavor]} layers. Either build the model with {_PACKAGE_NAMES[flavor].split(' (')[0]}, "
            f"or use {_TRAINER_FOR[actual]}."
        )


def accepts_training(layer: Any) -> bool:
    try:
        return "training" in inspect.signature(layer.call).parameters
    except (TypeError, ValueError):
        return False


class FlavorCalls:
    """What the two flavors' adapters (`Keras3Calls`, `legacy.LegacyCalls`) do alike; each
    names its Keras through `models_module`."""

    @staticmethod
    def models_module() -> Any:
        raise NotImplementedError

    @staticmethod
    def trainable(layer: Any) -> list:
        return list(layer.trainable_variables)

    @staticmethod
    def non_trainable(layer: Any) -> list:
        return list(layer.non_trainable_variables)

    @classmethod
    def clone(cls, layer: Any) -> Any:
        """A copy of a model with the same weights (trainable and not)."""
        try:
            copy = cls.models_module().clone_model(layer)
            # (tf-keras clones a subclassed model unbuilt: then it cannot take the weights)
            copy.set_weights(layer.get_weights())
        except Exception as err:  # subclassed models cannot be cloned from their config
            raise ValueError(
                f"cannot copy inner_model {layer.name!r} ({err}); give it a get_config, or use a "
                "Sequential/functional model"
            ) from None
        return copy


class Keras3Calls(FlavorCalls):
    """Functional calls of Keras 3 layers (`stateless_call`)."""

    flavor = KERAS3
    first_replica_aggregation = "only_first_replica"

    @staticmethod
    def models_module() -> Any:
        import keras

        return keras.models

    @staticmethod
    def metrics_module():
        import keras

        return keras.metrics

    @staticmethod
    def optimizer_built(optimizer: Any) -> bool:
        return bool(optimizer.built)

    @staticmethod
    def seed_state_positions(layer: Any) -> list:
        """Indices, in `layer.non_trainable_variables`, of the states of its `SeedGenerator`s."""
        ids = {
            id(generator.state)
            for sub in layer._flatten_layers(include_self=True)
            for generator in getattr(sub, "_seed_generators", [])
        }
        return [i for i, v in enumerate(layer.non_trainable_variables) if id(v) in ids]

    @staticmethod
    def variable_owners(layer: Any, positions: list) -> list:
        """Names of the sublayers owning the non-trainable variables at `positions`."""
        wanted = {id(layer.non_trainable_variables[i]) for i in positions}
        owners = []
        for sub in layer._flatten_layers(include_self=False):
            if any(id(v) in wanted for v in sub._non_trainable_variables) and sub.name not in owners:
                owners.append(sub.name)
        return owners or [layer.name]

    @staticmethod
    def call(
        layer: Any, trainable_values: list, non_trainable_values: list, x: Any, training: bool,
        return_losses: bool = False,
    ):
        """Returns (outputs, updated non-trainable values[, losses]); the layer's variables are
        untouched. `losses`: the layer's `add_loss` terms, activity regularizers and weight
        regularizers, evaluated at the given weight values (so differentiable in them)."""
        kwargs = {"training": training} if accepts_training(layer) else {}
        if return_losses:
            kwargs["return_losses"] = True
        return layer.stateless_call(list(trainable_values), list(non_trainable_values), x, **kwargs)
