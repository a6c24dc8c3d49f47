"""A learned inner learning-rate schedule with few parameters θ: γ_s = schedule(s; θ).

Passed as `BilevelTrainer(inner_learning_rate=LearnedSchedule...)`, θ joins λ (under the
name "inner_learning_rate") and the hypergradient reaches it through every inner step's γ_s
(the learning rate as a function of (step, λ): paper, Sec. 2, the "ε" of Eq. 4). In online
mode s is the global inner step of the run, hyper-iteration × T + t (carried in a trainer
variable, resumed with it), so the schedule is learned over the whole run rather than as one
greedy number per hyper-iteration; pair it with estimator="forward" (real-time hypergradients
through the whole run, `forget`) to avoid the short-horizon bias towards small rates.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from tf_bilevel import _validate
from tf_bilevel.keras.reparam import Hyperparameter


def _positive_steps(value: Any, argument: str) -> int:
    return _validate.integer(value, f"LearnedSchedule: {argument}", "inner steps")


class LearnedSchedule:
    """γ(step; θ), built with `LearnedSchedule.cosine(...)` or `LearnedSchedule.piecewise(...)`.

    `hyperparameters` maps θ's names to `Hyperparameter` specs (their initial values);
    `schedule(step, theta)` is γ at a (float or int) step for values θ. Steps past
    `total_steps` keep the last value.
    """

    def __init__(self, kind: str, total_steps: int, hyperparameters: dict, warmup_steps: int = 0):
        self.kind = kind
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.hyperparameters = hyperparameters

    @classmethod
    def cosine(cls, peak: float, total_steps: int, *, warmup_steps: int = 0, final: float = 0.1,
               dtype: str = "float32") -> "LearnedSchedule":
        """Linear warm-up over `warmup_steps` to `peak`, then a cosine decay to `final` × peak at
        `total_steps`. Learned: the peak (in log space) and the final fraction (in (0, 1))."""
        total_steps = _positive_steps(total_steps, "total_steps")
        warmup_steps = _validate.integer(
            warmup_steps, "LearnedSchedule.cosine: warmup_steps", "inner steps of linear warm-up, fewer than total_steps",
            minimum=0, below=total_steps,
        )
        if not (isinstance(peak, (int, float)) and peak > 0):
            raise ValueError(f"LearnedSchedule.cosine: peak must be a positive number (the largest γ), got {peak!r}")
        if not (isinstance(final, (int, float)) and 0 < final < 1):
            raise ValueError(f"LearnedSchedule.cosine: final must be in (0, 1) (γ at total_steps / peak), got {final!r}")
        hps = {
            "peak": Hyperparameter(float(peak), transform="exp", dtype=dtype),
            "final": Hyperparameter(float(final), transform="sigmoid", dtype=dtype),
        }
        return cls("cosine", total_steps, hps, int(warmup_steps))

    @classmethod
    def piecewise(cls, values: Sequence[float], total_steps: int, *, dtype: str = "float32") -> "LearnedSchedule":
        """S constant segments of equal length over `total_steps`, segment k holding γ_k =
        values[k] initially. Learned: the S values (in log space)."""
        total_steps = _positive_steps(total_steps, "total_steps")
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 1 or values.size < 1 or not np.all(values > 0):
            raise ValueError(
                f"LearnedSchedule.piecewise: values must be a non-empty list of positive learning rates, got {values!r}"
            )
        if values.size > total_steps:
            raise ValueError(
                f"LearnedSchedule.piecewise: {values.size} segments do not fit total_steps={total_steps}: use at most "
                "one segment per inner step."
            )
        return cls("piecewise", total_steps, {"segments": Hyperparameter(values, transform="exp", dtype=dtype)})

    def __call__(self, step: Any, theta: dict) -> tf.Tensor:
        """γ at inner step `step` (0-based over the run) for the schedule's values θ."""
        if self.kind == "piecewise":
            segments = tf.convert_to_tensor(theta["segments"])
            count = int(segments.shape[0])
            s = tf.cast(step, tf.int64)
            index = tf.minimum(s * count // self.total_steps, count - 1)
            return tf.gather(segments, index)
        peak, final = tf.convert_to_tensor(theta["peak"]), tf.convert_to_tensor(theta["final"])
        s = tf.cast(step, peak.dtype)
        warm = float(self.warmup_steps)
        ramp = tf.minimum(1.0, (s + 1.0) / warm) if self.warmup_steps else tf.ones_like(s)
        progress = tf.clip_by_value((s - warm) / float(self.total_steps - self.warmup_steps), 0.0, 1.0)
        cosine = 0.5 * (1.0 + tf.cos(math.pi * progress))
        return peak * ramp * (final + (1.0 - final) * cosine)

    def __repr__(self) -> str:
        return f"LearnedSchedule({self.kind!r}, total_steps={self.total_steps})"
