"""Inner dynamics: differentiable update rules Ξ (Eq. 4) and the loops that run them."""

from tf_bilevel.dynamics.optimizers import InnerOptimizer, adam, momentum, resolve_learning_rate, sgd
from tf_bilevel.dynamics.transition import InnerState, Transition

__all__ = ["InnerOptimizer", "InnerState", "Transition", "adam", "momentum", "resolve_learning_rate", "sgd"]
