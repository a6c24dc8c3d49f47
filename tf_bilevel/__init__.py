"""tf_bilevel: gradient-based bilevel optimization for TensorFlow/Keras with truncated
back-propagation (K-RMD; Shaban, Cheng, Hatch & Boots, AISTATS 2019)."""

from tf_bilevel import diagnostics
from tf_bilevel.api import ESTIMATORS, Hypergradient, HypergradientResult, NonFiniteError, hypergradient_fn
from tf_bilevel.dynamics.optimizers import InnerOptimizer, adam, momentum, sgd

__version__ = "0.1.0"

__all__ = [
    "ESTIMATORS",
    "Hypergradient",
    "HypergradientResult",
    "InnerOptimizer",
    "NonFiniteError",
    "adam",
    "diagnostics",
    "hypergradient_fn",
    "momentum",
    "sgd",
]
