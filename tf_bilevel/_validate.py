"""Validation of the numbers users pass (counts, rates, decay factors, flags), in one place.

Python and NumPy scalars are accepted alike (`np.int64(100)` steps, `np.float32(0.1)` rates);
bools are refused where a number is meant, and a number that would give a finite but
meaningless hypergradient (a negative or NaN rate, a momentum β ≥ 1) is refused here, when
the object is built, not discovered later as "the inner loop diverged".
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import tensorflow as tf


def _unwrap(value: Any) -> Any:
    """A 0-d NumPy array as its scalar (np.asarray(3) behaves like np.int64(3))."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value[()]
    return value


def is_bool(value: Any) -> bool:
    return isinstance(_unwrap(value), (bool, np.bool_))


def is_real_number(value: Any) -> bool:
    """A Python or NumPy int/float (not a bool, not a tensor)."""
    value = _unwrap(value)
    return not is_bool(value) and isinstance(value, (int, float, np.integer, np.floating))


def is_int(value: Any) -> bool:
    """A Python or NumPy int (not a bool, not a float)."""
    value = _unwrap(value)
    return not is_bool(value) and isinstance(value, (int, np.integer))


def integer(
    value: Any, name: str, meaning: str, *, minimum: Optional[int] = 1, below: Optional[int] = None,
    optional: bool = False,
) -> Optional[int]:
    """`value` as a Python int in [minimum, below) (either bound optional; Python/NumPy ints only:
    no bools, no floats), or None if `optional`; else a ValueError naming `name`, the range and
    what the number means."""
    if optional and value is None:
        return None
    raw = _unwrap(value)
    if not is_int(raw) or (minimum is not None and raw < minimum) or (below is not None and raw >= below):
        if below is not None:
            kind = f"an integer in [{minimum}, {below})"
        elif minimum is None:
            kind = "an integer"
        else:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(
            f"{name} must be {'None or ' if optional else ''}{kind} ({meaning}; a Python or NumPy int), got {value!r}"
        )
    return int(raw)


def positive_int(value: Any, name: str, meaning: str, *, minimum: int = 1) -> int:
    """`value` as a Python int >= minimum; integral Python/NumPy ints only (no bools, no floats)."""
    return integer(value, name, meaning, minimum=minimum)


def boolean(value: Any, name: str) -> bool:
    """`value` as a bool; anything else (a string like "no", a number) is a TypeError."""
    if not is_bool(value):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(_unwrap(value))


def real_in_range(
    value: Any,
    name: str,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = True,
    meaning: str = "",
) -> Any:
    """A finite real number in [low, high) (bounds optional, openness configurable); returned as
    given (a NumPy scalar keeps its dtype), or raises naming `name`."""
    raw = _unwrap(value)
    about = f" ({meaning})" if meaning else ""
    if not is_real_number(raw):
        raise TypeError(f"{name} must be a real number{about}, got {value!r} of type {type(value).__name__}")
    number = float(raw)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite{about}, got {value!r}")
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high:
        raise ValueError(f"{name} must be {_describe_range(low, high, low_open, high_open)}{about}, got {value!r}")
    return raw


def _describe_range(low, high, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


LEARNING_RATE_KINDS = (
    "a positive number, a schedule `step -> γ` (e.g. a Keras LearningRateSchedule) or "
    "`(step, hparams) -> γ` to learn it"
)


def learning_rate(value: Any, name: str) -> Any:
    """A constant γ must be a finite number > 0 (a negative γ ascends g, NaN poisons every step);
    schedules (callables) and tf.Variables are checked by the numerics check when they run."""
    if callable(value) or isinstance(value, tf.Variable):
        return value
    if value is None or isinstance(value, (str, bytes)) or is_bool(value):
        raise TypeError(f"{name} must be {LEARNING_RATE_KINDS}, got {value!r}")
    if tf.is_tensor(value):
        if not (value.dtype.is_floating or value.dtype.is_integer):
            raise TypeError(f"{name} must be a real scalar tensor, got dtype {value.dtype.name}")
        if value.shape.rank != 0:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {value.shape}")
        if not hasattr(value, "numpy"):  # symbolic: its value is unknown here
            return value
        real_in_range(value.numpy(), name, low=0.0, low_open=True, meaning="the inner step size γ")
        return value
    if not is_real_number(value):
        raise TypeError(f"{name} must be {LEARNING_RATE_KINDS}, got {value!r} of type {type(value).__name__}")
    return real_in_range(value, name, low=0.0, low_open=True, meaning="the inner step size γ")
