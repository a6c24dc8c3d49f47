"""The metrics a trainer reports besides the compiled ones (see `tf_bilevel.keras.conventions`).

`loss` = `outer_loss` = f(w_T, λ), `inner_loss` = g(w_T, λ), `hypergradient_norm`, and where
asked for the diagnostics (`cosine_to_full_rmd`, `relative_error_to_full_rmd`) and the count of
skipped updates: Keras `Mean`/`Sum` trackers of the trainer's flavor. A non-finite step
counts for nothing (weight 0), so one NaN does not poison the epoch's mean.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tf_bilevel import diagnostics

TRAIN_ONLY = ("hypergradient_norm", "cosine_to_full_rmd", "relative_error_to_full_rmd", "skipped_updates")


def _where_finite(finite: tf.Tensor, value: Any) -> tf.Tensor:
    return tf.where(finite, tf.cast(value, tf.float32), 0.0)


class StepMetrics:
    """The trackers, in the order the progress bar and History show them (`trackers`)."""

    def __init__(self, metrics_module: Any, with_diagnostics: bool, count_skipped: bool):
        mean = metrics_module.Mean
        self.loss = mean(name="loss")  # = outer_loss, under Keras' name (see conventions.py)
        self.outer_loss = mean(name="outer_loss")
        self.inner_loss = mean(name="inner_loss")
        self.hypergradient_norm = mean(name="hypergradient_norm")
        self.diagnostic_trackers = (
            [mean(name="cosine_to_full_rmd"), mean(name="relative_error_to_full_rmd")] if with_diagnostics else []
        )
        self.skipped = metrics_module.Sum(name="skipped_updates") if count_skipped else None

    @property
    def trackers(self) -> list:
        skipped = [] if self.skipped is None else [self.skipped]
        return [self.loss, self.outer_loss, self.inner_loss, self.hypergradient_norm, *self.diagnostic_trackers, *skipped]

    def update_losses(self, finite: tf.Tensor, outer_value: tf.Tensor, inner_value: tf.Tensor) -> None:
        weight = tf.cast(finite, tf.float32)
        for tracker, value in ((self.loss, outer_value), (self.outer_loss, outer_value), (self.inner_loss, inner_value)):
            tracker.update_state(_where_finite(finite, value), sample_weight=weight)

    def update_hypergradient(self, finite: tf.Tensor, grads: list, reference: list, with_reference: tf.Tensor) -> None:
        """‖hypergradient‖, the skipped count and, at the steps that computed the full-RMD
        `reference` (`with_reference`), the diagnostics. `grads`/`reference`: global means."""
        weight = tf.cast(finite, tf.float32)
        if self.skipped is not None:
            self.skipped.update_state(tf.cast(~finite, tf.float32))
        self.hypergradient_norm.update_state(_where_finite(finite, diagnostics.global_norm(grads)), sample_weight=weight)
        if reference:
            computed = weight * tf.cast(with_reference, tf.float32)
            for tracker, value in zip(self.diagnostic_trackers, (diagnostics.cosine_similarity(grads, reference),
                                                         diagnostics.relative_error(grads, reference))):
                tracker.update_state(tf.where(computed > 0, tf.cast(value, tf.float32), 0.0), sample_weight=computed)
