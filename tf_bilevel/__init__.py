"""tf_bilevel: gradient-based bilevel optimization for TensorFlow/Keras with truncated
back-propagation (K-RMD; Shaban, Cheng, Hatch & Boots, AISTATS 2019)."""

from tf_bilevel import diagnostics, nonfinite
from tf_bilevel.api import ESTIMATORS, Hypergradient, HypergradientResult, NonFiniteError, hypergradient_fn
from tf_bilevel.dynamics.optimizers import InnerOptimizer, adam, momentum, sgd
from tf_bilevel.outer import HyperStep, HyperStepResult, HyperStepState
from tf_bilevel.resume import HyperStepCheckpoint, SettingsMismatchError, StateFileError, guard_settings

__version__ = "0.1.0"

# The Keras integration is imported on first use, so that `import tf_bilevel` stays light.
_KERAS_EXPORTS = {
    "BilevelTrainer": "tf_bilevel.keras.trainer",
    "LegacyBilevelTrainer": "tf_bilevel.keras.legacy",
    "Hyperparameter": "tf_bilevel.keras.reparam",
    "Progress": "tf_bilevel.progress",  # keras.utils.Progbar
}


def __getattr__(name):
    import importlib

    if name in _KERAS_EXPORTS:
        return getattr(importlib.import_module(_KERAS_EXPORTS[name]), name)
    if name == "keras":  # `tfb.keras.BatchNormalization` etc. without importing tf_bilevel.keras first
        return importlib.import_module("tf_bilevel.keras")
    raise AttributeError(f"module 'tf_bilevel' has no attribute {name!r}")


def __dir__():
    # The lazily resolved names too (tab completion, dir(tf_bilevel)).
    return sorted(set(globals()) | set(__all__) | set(_KERAS_EXPORTS) | {"keras"})


__all__ = [
    "BilevelTrainer",
    "ESTIMATORS",
    "Hyperparameter",
    "LegacyBilevelTrainer",
    "Hypergradient",
    "HypergradientResult",
    "HyperStep",
    "HyperStepCheckpoint",
    "HyperStepResult",
    "HyperStepState",
    "InnerOptimizer",
    "NonFiniteError",
    "Progress",
    "SettingsMismatchError",
    "StateFileError",
    "adam",
    "diagnostics",
    "guard_settings",
    "hypergradient_fn",
    "momentum",
    "nonfinite",
    "sgd",
]
