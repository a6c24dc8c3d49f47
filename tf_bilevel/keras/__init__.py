"""Keras integration: `BilevelTrainer` (Keras 3), `LegacyBilevelTrainer` (tf-keras),
`TrainerSpec` (their validated arguments), `Hyperparameter` reparametrizations
(`inverse_softplus`), second-order-safe losses and layers (`BatchNormalization`), task streams
(`online_tasks`, `episodes`), the `HyperparameterHistograms` callback and SavedModel export.

`tf_bilevel.keras.legacy` (tf-keras) is imported only on first use.
"""

from tf_bilevel.keras import losses
from tf_bilevel.keras.callbacks import HyperparameterHistograms
from tf_bilevel.keras.data import episodes, online_tasks
from tf_bilevel.keras.export import export_hyper_model, load_hyper_model
from tf_bilevel.keras.layers import BatchNormalization
from tf_bilevel.keras.reparam import TRANSFORMS, Hyperparameter, inverse_softplus
from tf_bilevel.keras.schedule import LearnedSchedule
from tf_bilevel.keras.spec import TrainerSpec
from tf_bilevel.keras.trainer import BilevelTrainer

__all__ = [
    "BatchNormalization",
    "BilevelTrainer",
    "Hyperparameter",
    "HyperparameterHistograms",
    "LearnedSchedule",
    "LegacyBilevelTrainer",
    "TRANSFORMS",
    "TrainerSpec",
    "episodes",
    "export_hyper_model",
    "inverse_softplus",
    "load_hyper_model",
    "losses",
    "online_tasks",
]


def __getattr__(name):
    if name == "LegacyBilevelTrainer":
        from tf_bilevel.keras.legacy import LegacyBilevelTrainer

        return LegacyBilevelTrainer
    raise AttributeError(f"module 'tf_bilevel.keras' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
