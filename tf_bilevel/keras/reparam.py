"""Hyperparameters with a domain: positive, in a range, symmetric (paper, appendix G.2).

A `Hyperparameter` is stored as an unconstrained raw variable ν and used through a smooth
map λ = φ(ν) (softplus, sigmoid, A + Aᵀ, …), so that plain gradient steps on ν always give
a valid λ. The hypergradient reaches ν by the chain rule d_ν f = φ'(ν)ᵀ d_λ f. A Keras
constraint (projection after each outer update) can be used instead of, or on top of, a
reparametrization.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import numpy as np
import tensorflow as tf


class _Transform(NamedTuple):
    forward: Callable[[tf.Tensor], tf.Tensor]  # raw ν -> λ (in TF, differentiable)
    inverse: Callable[[np.ndarray], np.ndarray]  # λ -> ν (in NumPy, for the initial value)
    domain: str  # for error messages


def inverse_softplus(x: Any) -> np.ndarray:
    """ν with softplus(ν) = x, for x > 0 (a number or array; in NumPy, float64): the raw value
    that starts a softplus-transformed hyperparameter at x. log(eˣ − 1), written
    x + log(−expm1(−x)) so that it neither overflows for large x nor loses digits for small x."""
    x = np.asarray(x, dtype=np.float64)
    return x + np.log(-np.expm1(-x))


def _logit(x: np.ndarray) -> np.ndarray:
    return np.log(x) - np.log1p(-x)


def _symmetric(a: tf.Tensor) -> tf.Tensor:
    return a + tf.linalg.matrix_transpose(a)


TRANSFORMS: dict[str, _Transform] = {
    "identity": _Transform(lambda v: v, lambda x: x, "any real value"),
    "softplus": _Transform(tf.nn.softplus, inverse_softplus, "> 0"),
    "exp": _Transform(tf.exp, np.log, "> 0"),
    "sigmoid": _Transform(tf.sigmoid, _logit, "in (0, 1)"),
    # C = A + Aᵀ: any symmetric matrix.
    "symmetric": _Transform(_symmetric, lambda c: c / 2.0, "a symmetric matrix"),
    # C = A + Aᵀ with A = softplus(B): symmetric with positive entries (paper G.2, task interaction).
    "symmetric_softplus": _Transform(
        lambda b: _symmetric(tf.nn.softplus(b)), lambda c: inverse_softplus(c / 2.0), "a symmetric matrix with entries > 0"
    ),
}


def _in_domain(name: str, value: np.ndarray, bounds: Optional[tuple[float, float]]) -> bool:
    if name in ("softplus", "exp"):
        return bool(np.all(value > 0))
    if name == "sigmoid":
        low, high = bounds if bounds is not None else (0.0, 1.0)
        return bool(np.all((value > low) & (value < high)))
    if name in ("symmetric", "symmetric_softplus"):
        if value.ndim < 2 or value.shape[-1] != value.shape[-2]:
            return False
        symmetric = np.allclose(value, np.swapaxes(value, -1, -2))
        return symmetric and (name == "symmetric" or bool(np.all(value > 0)))
    return True


class Hyperparameter:
    """A learned hyperparameter λ = transform(ν) with ν a trainable raw variable.

    Args:
      initial: the initial value of λ itself (not of ν): e.g. `Hyperparameter(0.1,
        transform="softplus")` starts at λ = 0.1. The raw initial value is computed with the
        inverse transform, so it must lie in the transform's domain.
      transform: "identity" (default), "softplus" / "exp" (λ > 0), "sigmoid" (λ ∈ (0, 1), or
        (low, high) with `bounds`), "symmetric" (λ = A + Aᵀ) or "symmetric_softplus"
        (λ = A + Aᵀ, A = softplus(B): symmetric, positive; appendix G.2).
      bounds: (low, high) for transform="sigmoid": λ = low + (high − low)·sigmoid(ν).
      constraint: an optional Keras constraint on ν (e.g. `keras.constraints.NonNeg()`),
        applied by the outer optimizer after every update (projected gradient).
      dtype: the variable dtype ("float32" by default, "float64" for precise problems).
    """

    def __init__(
        self,
        initial: Any,
        transform: Optional[str] = None,
        *,
        bounds: Optional[Sequence[float]] = None,
        constraint: Any = None,
        dtype: str = "float32",
    ):
        transform = transform or "identity"
        if transform not in TRANSFORMS:
            raise ValueError(f"Hyperparameter(transform={transform!r}): use one of {sorted(TRANSFORMS)}")
        if bounds is not None:
            if transform != "sigmoid" or len(bounds) != 2 or not bounds[0] < bounds[1]:
                raise ValueError(
                    f"Hyperparameter(bounds={bounds!r}) needs transform='sigmoid' and bounds=(low, high) with low < high"
                )
            bounds = (float(bounds[0]), float(bounds[1]))
        if not tf.as_dtype(dtype).is_floating:
            raise TypeError(f"Hyperparameter(dtype={dtype!r}): hyperparameters must be floating-point")
        value = np.asarray(initial.numpy() if hasattr(initial, "numpy") else initial, dtype=np.float64)
        if not np.all(np.isfinite(value)):
            raise ValueError("Hyperparameter(initial=...) contains NaN or Inf")
        if not _in_domain(transform, value, bounds):
            domain = TRANSFORMS[transform].domain if bounds is None else f"in {bounds}"
            raise ValueError(f"Hyperparameter(initial=...) must be {domain} for transform={transform!r}")
        self.initial = value
        self.transform = transform
        self.bounds = bounds
        self.constraint = constraint
        self.dtype = tf.as_dtype(dtype).name
        self._check_round_trip()

    @property
    def shape(self) -> tuple:
        return self.initial.shape

    def raw_initial(self) -> np.ndarray:
        """ν0 such that transform(ν0) = initial."""
        value = self.initial
        if self.bounds is not None:
            low, high = self.bounds
            value = (value - low) / (high - low)
        return TRANSFORMS[self.transform].inverse(value).astype(self.dtype)

    def _check_round_trip(self) -> None:
        """The value λ0 = transform(ν0) actually used, computed in `dtype`, must still lie in the
        domain: e.g. sigmoid(logit(1 − 1e-9)) is exactly 1.0 in float32, where the sigmoid is
        saturated (zero gradient) and λ is outside (0, 1)."""
        with tf.init_scope():  # eager even if constructed inside a tf.function
            raw = self.raw_initial()
            value = np.asarray(self.value_from_raw(tf.constant(raw)), dtype=np.float64)
        if np.all(np.isfinite(raw)) and np.all(np.isfinite(value)) and _in_domain(self.transform, value, self.bounds):
            return
        domain = TRANSFORMS[self.transform].domain if self.bounds is None else f"in {self.bounds}"
        worst = value.flat[int(np.argmax(np.abs(value - self.initial)))] if value.size else value
        raise ValueError(
            f"Hyperparameter(initial=..., transform={self.transform!r}, dtype={self.dtype!r}): the initial "
            f"value does not survive {self.dtype}: stored as transform(ν0) it becomes {float(worst)!r}, which is not "
            f"{domain} (the transform saturates there and its gradient vanishes). Start further from the "
            f"boundary of the domain, or use dtype='float64'."
        )

    def value_from_raw(self, raw: tf.Tensor) -> tf.Tensor:
        """λ = transform(ν), differentiable in ν."""
        value = TRANSFORMS[self.transform].forward(raw)
        if self.bounds is not None:
            low, high = self.bounds
            value = low + (high - low) * value
        return value

    def __repr__(self) -> str:
        return f"Hyperparameter(shape={self.shape}, transform={self.transform!r})"


HyperparameterLike = Union[Hyperparameter, float, np.ndarray, Sequence[float]]


def as_hyperparameter(value: Any, name: str) -> Hyperparameter:
    """Numbers and arrays become identity-transformed hyperparameters."""
    if isinstance(value, Hyperparameter):
        return value
    if isinstance(value, tf.Variable) or type(value).__name__ == "Variable":
        raise TypeError(
            f"{name} is a variable; pass its initial value or a tf_bilevel.Hyperparameter(initial, "
            "transform=...) instead: the trainer creates and tracks the hyperparameter variables "
            "(so that checkpoints and the outer optimizer see them)."
        )
    try:
        return Hyperparameter(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name}: expected a Hyperparameter, a number or an array, got {value!r} ({err})") from None
