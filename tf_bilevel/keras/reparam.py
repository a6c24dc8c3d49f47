"""Hyperparameters with a domain: positive, in a range, symmetric (paper, appendix G.2).

A `Hyperparameter` is stored as an unconstrained raw variable ν and used through a smooth
map λ = φ(ν) (softplus, sigmoid, A + Aᵀ, …), so that plain gradient steps on ν always give
a valid λ. The hypergradient reaches ν by the chain rule d_ν f = φ'(ν)ᵀ d_λ f. A projection
after each outer update (a Keras constraint on ν, or `bounds` with the exp/softplus transforms:
projected gradient descent) can be used instead of, or on top of, a reparametrization.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import keras
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


# Transforms whose `bounds` are a projection of ν after each outer update (the others: see Hyperparameter).
PROJECTED_BOUNDS = ("exp", "softplus")


def _in_domain(name: str, value: np.ndarray, sigmoid_range: Optional[tuple[float, float]]) -> bool:
    if name in ("softplus", "exp"):
        return bool(np.all(value > 0))
    if name == "sigmoid":
        low, high = sigmoid_range if sigmoid_range is not None else (0.0, 1.0)
        return bool(np.all((value > low) & (value < high)))
    if name in ("symmetric", "symmetric_softplus"):
        if value.ndim < 2 or value.shape[-1] != value.shape[-2]:
            return False
        symmetric = np.allclose(value, np.swapaxes(value, -1, -2))
        return symmetric and (name == "symmetric" or bool(np.all(value > 0)))
    return True


class RawRange(keras.constraints.Constraint):
    """Keeps the raw variable ν in [low, high] (values of its dtype): the projection of
    `Hyperparameter(bounds=...)` for transform="exp"/"softplus", applied by the outer optimizer
    after each update like any Keras constraint. A value inside is returned bit for bit."""

    def __init__(self, low: float, high: float):
        if not low < high:
            raise ValueError(f"RawRange(low={low!r}, high={high!r}): needs low < high")
        self.low, self.high = float(low), float(high)

    def __call__(self, raw: tf.Tensor) -> tf.Tensor:
        return tf.clip_by_value(raw, self.low, self.high)

    def get_config(self) -> dict:
        return {"low": self.low, "high": self.high}

    def __repr__(self) -> str:
        return f"RawRange(low={self.low!r}, high={self.high!r})"


class _Then(keras.constraints.Constraint):
    """`first`, then `second`: a user's constraint, then the bounds' projection (so that the
    bounds hold whatever the user's constraint does)."""

    def __init__(self, first: Callable, second: Callable):
        self.first, self.second = first, second

    def __call__(self, raw: tf.Tensor) -> tf.Tensor:
        return self.second(self.first(raw))

    def get_config(self) -> dict:
        return {"first": self.first, "second": self.second}

    def __repr__(self) -> str:
        return f"_Then(first={self.first!r}, second={self.second!r})"


# λ = transform(ν) in extended precision (np.longdouble): the reference the raw ends are rounded against.
_EXACT = {"exp": np.exp, "softplus": lambda v: np.logaddexp(np.longdouble(0.0), v)}

_BITS = {2: np.uint16, 4: np.uint32, 8: np.uint64}  # float itemsize -> unsigned view


def _ordinal(x: np.ndarray) -> int:
    """x's position among the values of its dtype: consecutive values are consecutive integers."""
    bits = int(x.view(_BITS[x.dtype.itemsize]))
    sign = 1 << (8 * x.dtype.itemsize - 1)
    return -(bits - sign) if bits & sign else bits


def _from_ordinal(n: int, dtype: np.dtype) -> np.ndarray:
    """The value of `dtype` at position n (the inverse of `_ordinal`; 0 is +0.0)."""
    sign = 1 << (8 * dtype.itemsize - 1)
    return np.asarray(n if n >= 0 else sign - n, _BITS[dtype.itemsize]).view(dtype)


def _first_inside(start: np.ndarray, inward: int, inside: Callable[[np.ndarray], bool]) -> Optional[np.ndarray]:
    """start if inside(start), else a value r of start's dtype in the direction `inward` (+1 or
    -1) on a boundary: inside(r), and not inside(r's outward neighbour). Not always the nearest
    such r: TF's exp/softplus are not monotone at the ulp level, so `inside` may switch more than
    once. None if the largest finite value that way is not inside either. Found by steps that
    double from one ulp (near ν = 0 one ulp of ν moves λ far less than λ's own rounding: the
    sweep in tests/test_public_api.py needs over 10⁶ ulps in float32), then bisection: at most
    2 × the dtype's bits calls of `inside`."""
    if inside(start):
        return start
    origin = _ordinal(start)
    finite = _ordinal(np.asarray(np.inf, start.dtype)) - 1  # the largest finite value's
    outside, step = origin, 1
    while True:
        candidate = min(max(origin + inward * step, -finite), finite)
        if inside(_from_ordinal(candidate, start.dtype)):
            break
        if abs(candidate) == finite:
            return None
        outside, step = candidate, 2 * step
    while abs(candidate - outside) > 1:
        middle = (outside + candidate) // 2
        if inside(_from_ordinal(middle, start.dtype)):
            candidate = middle
        else:
            outside = middle
    return _from_ordinal(candidate, start.dtype)


_SPREAD = 65  # λ computed on this many copies of ν: vectorized kernels (packets) and their scalar remainder


@functools.lru_cache(maxsize=None)
def _compiled_forward(transform: str) -> Callable[[tf.Tensor], tf.Tensor]:
    """The transform compiled by XLA (as the trainer computes λ under jit_compile=True), once per
    transform (and dtype, by tracing)."""
    return tf.function(TRANSFORMS[transform].forward, jit_compile=True, autograph=False)


def _raw_ends(transform: str, bounds: tuple[float, float], dtype: str) -> tuple[float, float]:
    """[inverse(low), inverse(high)] in `dtype`, each rounded like `raw_initial` and, if
    transform(end) is outside [low, high], moved inward to a value of `dtype` where it is inside
    (`_first_inside`): exactly (long double) and as TF computes it in `dtype` on the default
    device, eagerly (by vectorized and scalar kernels) and compiled by XLA; or a ValueError naming
    `bounds` and `dtype`."""
    numpy_dtype = np.dtype(dtype)
    low, high = bounds
    forward, exact = TRANSFORMS[transform].forward, _EXACT[transform]

    def values(raw: np.ndarray) -> tuple[np.longdouble, float, float]:
        """λ exactly, and the least and greatest λ as computed in dtype."""
        with tf.init_scope():  # eager even if constructed inside a tf.function
            spread = tf.fill([_SPREAD], tf.constant(raw))
            computed = np.concatenate([forward(spread).numpy(), _compiled_forward(transform)(spread).numpy()])
        computed = computed.astype(np.float64)
        return exact(np.longdouble(raw)), float(computed.min()), float(computed.max())

    ends = []
    for end, inward, beyond in ((low, 1, lambda v: low <= min(v)), (high, -1, lambda v: max(v) <= high)):
        with np.errstate(over="ignore"):  # an end too large for dtype: refused below
            start = np.asarray(TRANSFORMS[transform].inverse(np.float64(end)), numpy_dtype)
        with tf.init_scope():
            value = float(forward(tf.constant(start)))
        if not (np.isfinite(start) and np.isfinite(value) and value > 0):
            raise ValueError(
                f"Hyperparameter(bounds={bounds!r}, transform={transform!r}, dtype={dtype!r}): the end {end!r} does "
                f"not fit {dtype}: its raw value is {float(start)!r} and {transform} of it is {value!r} (needs finite "
                "and > 0). Use ends nearer 1, or dtype='float64'."
            )
        raw = _first_inside(start, inward, lambda raw: beyond(values(raw)))  # on the inner side of `end`
        if raw is None or not all(low <= value <= high for value in values(raw)):
            raise ValueError(
                f"Hyperparameter(bounds={bounds!r}, transform={transform!r}, dtype={dtype!r}): no {dtype} raw value "
                f"near {transform}^-1({end!r}) gives a λ in [{low!r}, {high!r}]. Widen `bounds` or use dtype='float64'."
            )
        ends.append(float(raw))
    if not ends[0] < ends[1]:
        raise ValueError(
            f"Hyperparameter(bounds={bounds!r}, transform={transform!r}, dtype={dtype!r}): the bounds are too close "
            f"for {dtype}: no two raw values give λ in [{low!r}, {high!r}]. Widen `bounds` or use dtype='float64'."
        )
    return ends[0], ends[1]


class Hyperparameter:
    """A learned hyperparameter λ = transform(ν) with ν a trainable raw variable.

    Args:
      initial: the initial value of λ itself (not of ν): e.g. `Hyperparameter(0.1,
        transform="softplus")` starts at λ = 0.1. The raw initial value is computed with the
        inverse transform, so it must lie in the transform's domain (and in `bounds`).
      transform: "identity" (default), "softplus" / "exp" (λ > 0), "sigmoid" (λ ∈ (0, 1), or
        (low, high) with `bounds`), "symmetric" (λ = A + Aᵀ) or "symmetric_softplus"
        (λ = A + Aᵀ, A = softplus(B): symmetric, positive; appendix G.2).
      bounds: (low, high) with low < high, one meaning per transform:
        - "sigmoid": a reparametrization, λ = low + (high − low)·sigmoid(ν). λ is always strictly
          inside and never reaches an end (the gradient vanishes as it nears one); `initial` must
          be in the open interval (low, high).
        - "exp" / "softplus" (0 < low): a projection. After each outer update ν is clipped to
          `raw_bounds`: [inverse(low), inverse(high)] (log, resp. `inverse_softplus`) rounded
          inward in `dtype`, so that transform(end), exactly and as computed in `dtype`, is in
          [low, high] (another implementation of the transform, e.g. under XLA, may round λ a
          few ulps differently). λ can sit on an end (projected gradient descent on ν, e.g. on
          log λ for "exp"). Inside the bounds the clip changes nothing, bit for bit; `initial`
          must be in the closed interval [low, high] (on an end it starts on the raw end). Ends
          that do not fit `dtype` (an infinite raw end, or λ = 0 or ∞ there) are refused.
        - other transforms: refused.
      constraint: an optional Keras constraint on ν (e.g. `keras.constraints.NonNeg()`, or a
        name/class `keras.constraints.get` resolves, like "non_neg"), applied by the outer optimizer after every update (projected gradient). With `bounds`
        for "exp"/"softplus", this constraint runs first and the bounds' clip second.
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
        bounds = _checked_bounds(bounds, transform)
        if not tf.as_dtype(dtype).is_floating:
            raise TypeError(f"Hyperparameter(dtype={dtype!r}): hyperparameters must be floating-point")
        value = np.asarray(initial.numpy() if hasattr(initial, "numpy") else initial, dtype=np.float64)
        if not np.all(np.isfinite(value)):
            raise ValueError("Hyperparameter(initial=...) contains NaN or Inf")
        self.initial = value
        self.transform = transform
        self.bounds = bounds
        self.constraint = _resolved_constraint(constraint)
        self.dtype = tf.as_dtype(dtype).name
        self._raw_ends: Optional[tuple[float, float]] = None
        if not _in_domain(transform, value, self._sigmoid_range):
            if self._sigmoid_range is not None:
                raise ValueError(
                    f"Hyperparameter(bounds={bounds!r}, transform='sigmoid'): initial=... must be in the open "
                    f"interval {bounds}: λ = low + (high − low)·sigmoid(ν) never reaches an end. Change `initial` "
                    "or widen `bounds`."
                )
            domain = TRANSFORMS[transform].domain
            raise ValueError(f"Hyperparameter(initial=...) must be {domain} for transform={transform!r}")
        if bounds is not None and transform in PROJECTED_BOUNDS:
            low, high = bounds
            outside = value[(value < low) | (value > high)]
            if outside.size:
                raise ValueError(
                    f"Hyperparameter(bounds={bounds!r}): initial={float(outside.flat[0])!r} is outside [{low!r}, "
                    f"{high!r}], the range λ is kept in: change `initial` or widen `bounds`."
                )
            self._raw_ends = _raw_ends(transform, bounds, self.dtype)
        self._check_round_trip()

    @property
    def shape(self) -> tuple:
        return self.initial.shape

    @property
    def _sigmoid_range(self) -> Optional[tuple[float, float]]:
        """(low, high) of the reparametrization λ = low + (high − low)·sigmoid(ν), if any."""
        return self.bounds if self.transform == "sigmoid" else None

    @property
    def raw_bounds(self) -> Optional[tuple[float, float]]:
        """The ends of the projection of ν, values of `dtype` (inverse(low) and inverse(high)
        rounded inward: transform(end) is in [low, high]), or None when λ is not projected (no
        bounds, or transform="sigmoid")."""
        return self._raw_ends

    @property
    def raw_constraint(self) -> Optional[Callable[[tf.Tensor], tf.Tensor]]:
        """What the outer optimizer applies to ν after each update: the user's `constraint`, then
        the bounds' projection (for "exp"/"softplus"); None if neither."""
        if self._raw_ends is None:
            return self.constraint
        clip = RawRange(*self._raw_ends)
        return clip if self.constraint is None else _Then(self.constraint, clip)

    def raw_initial(self) -> np.ndarray:
        """ν0 such that transform(ν0) = initial."""
        value = self.initial
        if self._sigmoid_range is not None:
            low, high = self._sigmoid_range
            value = (value - low) / (high - low)
        raw = np.asarray(TRANSFORMS[self.transform].inverse(value)).astype(self.dtype)
        if self._raw_ends is not None:  # an initial value on an end starts on the (inward-rounded) raw end
            raw = np.clip(raw, *np.asarray(self._raw_ends, self.dtype))
        return raw

    def _check_round_trip(self) -> None:
        """The value λ0 = transform(ν0) actually used, computed in `dtype`, must still lie in the
        domain: e.g. sigmoid(logit(1 − 1e-9)) is exactly 1.0 in float32, where the sigmoid is
        saturated (zero gradient) and λ is outside (0, 1). (Projection bounds hold up to the
        rounding of their ends in `dtype`, so they are not checked again here.)"""
        with tf.init_scope():  # eager even if constructed inside a tf.function
            raw = self.raw_initial()
            value = np.asarray(self.value_from_raw(tf.constant(raw)), dtype=np.float64)
        finite = np.all(np.isfinite(raw)) and np.all(np.isfinite(value))
        if finite and _in_domain(self.transform, value, self._sigmoid_range):
            return
        domain = TRANSFORMS[self.transform].domain if self._sigmoid_range is None else f"in {self.bounds}"
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
        if self._sigmoid_range is not None:
            low, high = self._sigmoid_range
            value = low + (high - low) * value
        return value

    def __repr__(self) -> str:
        bounds = "" if self.bounds is None else f", bounds={self.bounds!r}"
        return f"Hyperparameter(shape={self.shape}, transform={self.transform!r}{bounds})"


def _resolved_constraint(constraint: Any) -> Optional[Callable[[tf.Tensor], tf.Tensor]]:
    """A Keras constraint name, class, config or callable as a callable (`keras.constraints.get`)."""
    try:
        return keras.constraints.get(constraint)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"Hyperparameter(constraint={constraint!r}): not a Keras constraint ({err}); pass a callable on ν, "
            "e.g. keras.constraints.NonNeg(), or a name Keras knows ('non_neg')"
        ) from None


def _checked_bounds(bounds: Optional[Sequence[float]], transform: str) -> Optional[tuple[float, float]]:
    """(low, high) as floats, or a ValueError naming `bounds` and the fix."""
    if bounds is None:
        return None
    if transform not in ("sigmoid",) + PROJECTED_BOUNDS:
        raise ValueError(
            f"Hyperparameter(bounds={bounds!r}, transform={transform!r}): bounds need transform='sigmoid' (λ = "
            "low + (high − low)·sigmoid(ν)) or 'exp'/'softplus' (ν projected after each outer update); for "
            "other transforms pass a Keras `constraint=` on ν instead."
        )
    try:
        low, high = (float(end) for end in bounds)
    except (TypeError, ValueError):
        raise ValueError(
            f"Hyperparameter(bounds={bounds!r}): needs two numbers (low, high) with low < high"
        ) from None
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"Hyperparameter(bounds={bounds!r}): needs finite (low, high) with low < high")
    if transform in PROJECTED_BOUNDS and not low > 0:
        raise ValueError(
            f"Hyperparameter(bounds={bounds!r}, transform={transform!r}): needs 0 < low: λ = {transform}(ν) > 0, "
            f"so a bound low <= 0 has no raw value (pass low > 0, or drop `bounds` for just λ > 0)."
        )
    return low, high


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
