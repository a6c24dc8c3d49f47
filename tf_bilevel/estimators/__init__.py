"""Hypergradient estimators: reverse (full, truncated, checkpointed), forward, implicit."""

from tf_bilevel.estimators.common import EstimatorOutput
from tf_bilevel.estimators.forward import forward_hypergradient
from tf_bilevel.estimators.implicit import implicit_hypergradient
from tf_bilevel.estimators.reverse import reverse_hypergradient

__all__ = ["EstimatorOutput", "forward_hypergradient", "implicit_hypergradient", "reverse_hypergradient"]
