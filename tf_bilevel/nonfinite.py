"""The non-finite marker: where a bilevel computation first produced NaN or Inf.

Every estimator returns it as `HypergradientResult.nonfinite_step`, an int32 scalar. For a
problem with `steps` = T inner steps it reads:

====================  ========================================================================
``-1`` (`NONE`)       every value was finite
``t``, 0 <= t < T     the inner loss g(w_t, λ) of inner step t (0-based) was the first
                      non-finite value: the inner optimization (Eq. 2) diverged there
``T``                 the inner losses are finite, the outer loss f(w_T, λ) is not
                      (`at_outer_loss`)
``T + 1``             the losses are finite, the hypergradient is not (`at_hypergradient`)
====================  ========================================================================

The codes are in the order the values are computed, so the marker of several parts of one
computation (segments of the inner loop, the tasks of a meta-batch, replicas) is the smallest
non-negative one: `earliest` and `earliest_of`. `mark` records a code only where none is yet, so
calling it in computation order keeps the first failure. `describe` turns a marker into the
message of `tf_bilevel.NonFiniteError`.

Everything here is graph-safe (no Python control flow on tensors) except `describe` and
`describe_graph`, which build Python strings.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

NONE = -1  # the marker when every value is finite


def at_outer_loss(steps: int) -> int:
    """The marker of a non-finite outer loss f(w_T, λ): T."""
    return steps


def at_hypergradient(steps: int) -> int:
    """The marker of a non-finite hypergradient (with finite losses): T + 1."""
    return steps + 1


def _all_finite(values: Any) -> tf.Tensor:
    checks = []
    for x in tf.nest.flatten(values):
        x = tf.convert_to_tensor(x)
        # A scalar loss (every inner step) needs no reduction.
        checks.append(tf.math.is_finite(x) if x.shape.rank == 0 else tf.reduce_all(tf.math.is_finite(x)))
    if not checks:
        return tf.constant(True)
    return checks[0] if len(checks) == 1 else tf.reduce_all(checks)


def mark(marker: tf.Tensor, values: Any, code: Any) -> tf.Tensor:
    """`code` if `marker` is still `NONE` and some element of `values` (a tensor, or a nest of
    them such as a hypergradient) is NaN/Inf; `marker` otherwise.

    Inside the inner loop `code` is the step t whose loss is `values`; after it,
    `at_outer_loss(T)` for f(w_T) and `at_hypergradient(T)` for the hypergradient."""
    return tf.where((marker < 0) & ~_all_finite(values), tf.cast(code, tf.int32), marker)


def earliest(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """The earlier of two markers (`NONE` only if both are `NONE`)."""
    both = (a >= 0) & (b >= 0)
    return tf.where(both, tf.minimum(a, b), tf.maximum(a, b))


def earliest_of(markers: tf.Tensor) -> tf.Tensor:
    """The earliest of a vector of markers (e.g. one per task of a meta-batch); `NONE` if all are."""
    big = tf.int32.max
    smallest = tf.reduce_min(tf.where(markers >= 0, markers, big))
    return tf.where(smallest == big, NONE, smallest)


def describe(marker: int, steps: int) -> str:
    """The message of `NonFiniteError` for a (Python int) marker of a problem with `steps` inner
    steps; '' for `NONE`."""
    marker = int(marker)
    if marker < 0:
        return ""
    if marker < steps:
        return (
            f"inner_loss became non-finite (NaN/Inf) at inner step {marker} of steps={steps}: the inner "
            "optimization diverged. Lower the inner learning rate, or check inputs for NaN/Inf."
        )
    if marker == at_outer_loss(steps):
        return f"outer_loss is non-finite (NaN/Inf) at w_T (after steps={steps}); check outer_loss and its data."
    if marker == at_hypergradient(steps):
        return "the hypergradient is non-finite (NaN/Inf) although the losses are finite."
    raise ValueError(f"{marker} is not a non-finite marker of a problem with steps={steps} (valid: -1 … {steps + 1})")


def describe_graph(steps: int) -> str:
    """The message of the graph-mode assertion (the marker is a tensor there): the encoding."""
    return (
        "tf_bilevel: non-finite value in the bilevel computation; nonfinite_step < steps is the "
        f"inner step where inner_loss became NaN/Inf, {at_outer_loss(steps)} means outer_loss, "
        f"{at_hypergradient(steps)} the hypergradient"
    )
