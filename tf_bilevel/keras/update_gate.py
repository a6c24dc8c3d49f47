"""The trainer's non-finite update gate: whether a hyper-iteration may update λ.

A step updates λ only if its outer value and hypergradient are finite on every replica (one
all-reduced decision, so replicas never diverge). With on_nonfinite="raise" the first failure
(its hyper-iteration and the core's marker, `tf_bilevel.nonfinite`) is recorded in two
variables inside the compiled step and raised as `NonFiniteError` once the compiled function
has returned (`raise_if_recorded`); later steps of the same execution do not update either.
With "skip" the step is skipped and training continues.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import tensorflow as tf

from tf_bilevel import nonfinite
from tf_bilevel.api import NonFiniteError


def _read(variable: Any) -> tf.Tensor:
    return tf.convert_to_tensor(variable)


def _all_finite(tensors: list) -> tf.Tensor:
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors])


class UpdateGate:
    """`decide` (in the compiled step), `apply_if` (the guarded optimizer update) and
    `raise_if_recorded` (eagerly, after each compiled train function)."""

    def __init__(self, on_nonfinite: str, steps: int, new_variable: Callable[[str, np.ndarray], Any]):
        """`new_variable(name, initial)`: a non-trainable trainer variable (checkpointed), so an
        interrupted run resumes with the record."""
        self.on_nonfinite = on_nonfinite
        self.steps = steps
        self.failed_at = new_variable("nonfinite_at", np.asarray(-1, np.int64))
        self.failure_code = new_variable("nonfinite_code", np.asarray(-1, np.int32))

    def decide(self, marker: tf.Tensor, outer_value: tf.Tensor, grads: list,
               step: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(apply, finite): whether to update λ at this step, and whether the step was finite on
        every replica (`marker`: the core's non-finite marker of the inner loop, < 0 if none)."""
        replica = tf.distribute.get_replica_context()
        local_finite = (marker < 0) & tf.math.is_finite(outer_value) & _all_finite(grads)
        # Every replica must take the same decision: a failure anywhere skips the update everywhere.
        failures = replica.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(~local_finite, tf.int32))
        finite = tf.equal(failures, 0)
        code = nonfinite.mark(marker, [outer_value, *grads], nonfinite.at_hypergradient(self.steps))
        code = nonfinite.earliest_of(replica.all_gather(code[None], axis=0))
        if self.on_nonfinite != "raise":
            return finite, finite
        # After a recorded failure, later steps of the same execution do not update either.
        none_recorded = _read(self.failed_at) < 0
        failed_now = ~finite & none_recorded
        self.failed_at.assign(tf.where(failed_now, step, _read(self.failed_at)))
        self.failure_code.assign(tf.where(failed_now, code, _read(self.failure_code)))
        return finite & none_recorded, finite

    @staticmethod
    def apply_if(apply: tf.Tensor, optimizer: Any, grads: list, variables: list) -> None:
        """optimizer.apply_gradients when `apply` (the same on every replica), else nothing: no
        NaN ever reaches λ."""

        def update():
            optimizer.apply_gradients(zip(grads, variables))
            return tf.constant(True)

        if tf.__internal__.distribute.strategy_supports_no_merge_call():
            tf.cond(apply, update, lambda: tf.constant(False))
            return

        def cross_replica(distribution, apply, grads):
            # As keras.mixed_precision.LossScaleOptimizer: a cond that calls merge_call must run in
            # cross-replica context. `apply` was all-reduced, so every replica holds the same value.
            apply = distribution.experimental_local_results(apply)[0]

            def update_all():
                distribution.extended.call_for_each_replica(
                    lambda g: optimizer.apply_gradients(zip(g, variables)), args=(grads,)
                )
                return tf.constant(True)

            tf.cond(apply, update_all, lambda: tf.constant(False))

        tf.distribute.get_replica_context().merge_call(cross_replica, args=(apply, grads))

    def raise_if_recorded(self) -> None:
        """Raises `NonFiniteError` for a failure the compiled steps recorded (and clears it, so
        that the next `fit` starts clean)."""
        if self.on_nonfinite != "raise":
            return
        at = int(self.failed_at.numpy())
        if at < 0:
            return
        code = int(self.failure_code.numpy())
        self.failed_at.assign(-1)
        self.failure_code.assign(-1)
        raise NonFiniteError(
            f"BilevelTrainer: non-finite value at hyper-iteration {at} (trainer.meta_step): "
            f"{nonfinite.describe(code, self.steps)} The hyperparameters were not updated at that "
            "step. Pass on_nonfinite='skip' to skip such steps and continue instead."
        )
