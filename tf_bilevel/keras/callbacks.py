"""Callbacks for the bilevel trainers.

Scalar hyperparameters are in the logs of every epoch as `hp/<name>` (so `keras.callbacks.
TensorBoard` draws them); `HyperparameterHistograms` adds the vector ones (per-example weights,
per-layer strengths, ...) as TensorBoard histograms.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import keras
import tensorflow as tf

from tf_bilevel import _validate
from tf_bilevel.keras.conventions import HYPERPARAMETER_LOG_PREFIX, hyperparameter_leaves

TENSORBOARD_EXTRA = 'pip install "tf_bilevel[tensorboard]"'


def require_tensorboard(what: str) -> None:
    """A clear error naming the extra when the optional `tensorboard` package is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError as err:
        raise ImportError(f"{what} writes TensorBoard summaries, which needs the tensorboard package ({err}). "
                          f"Install it with: {TENSORBOARD_EXTRA}") from err


class HyperparameterHistograms(keras.callbacks.Callback):
    """Writes every non-scalar hyperparameter as a TensorBoard histogram each `freq` epochs
    (for `BilevelTrainer` and `LegacyBilevelTrainer`).

    Tags are `hp/<name>` (nested lists: `hp/<name>/<i>`), the step is the epoch, and the events
    go to `<log_dir>/train`, next to `keras.callbacks.TensorBoard(log_dir)`'s epoch scalars (the
    scalar hyperparameters are already there, as the `hp/<name>` logs).

    Args:
      log_dir: the TensorBoard log directory.
      freq: write every `freq` epochs.
      names: only these hyperparameters (names of `trainer.hyperparameter_values()`); default
        all, including the trainer-owned "centers"/"init"/"strengths" when used.
      include_scalars: also write scalar hyperparameters as (one-point) histograms.
    """

    def __init__(self, log_dir: str, freq: int = 1, names: Optional[Sequence[str]] = None, include_scalars: bool = False):
        super().__init__()
        require_tensorboard("tf_bilevel.keras.HyperparameterHistograms")
        freq = _validate.integer(freq, "HyperparameterHistograms(freq=...)", "write every N epochs")
        self.log_dir = os.fspath(log_dir)
        self.freq = freq
        self.names = None if names is None else list(names)
        self.include_scalars = include_scalars
        self._writer = None

    # tf-keras' CallbackList asks its callbacks these: the same class serves LegacyBilevelTrainer.
    _supports_tf_logs = False

    def _implements_train_batch_hooks(self) -> bool:
        return False

    def _implements_test_batch_hooks(self) -> bool:
        return False

    def _implements_predict_batch_hooks(self) -> bool:
        return False

    def on_train_begin(self, logs=None):
        if not hasattr(self.model, "hyperparameter_values"):
            raise TypeError(
                f"HyperparameterHistograms is a callback for tf_bilevel trainers, got a {type(self.model).__name__}"
            )
        if self.names is not None:
            unknown = sorted(set(self.names) - set(self.model.hyperparameter_values()))
            if unknown:
                raise ValueError(
                    f"HyperparameterHistograms(names=...): unknown hyperparameters {unknown}; the trainer has "
                    f"{sorted(self.model.hyperparameter_values())}"
                )
        self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "train"))

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.freq == 0:
            self._write(epoch)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write(self, epoch: int) -> None:
        values = self.model.hyperparameter_values()
        if self.names is not None:
            values = {k: v for k, v in values.items() if k in self.names}
        with self._writer.as_default():
            for tag, value in hyperparameter_leaves(values).items():
                if value.shape.num_elements() > 1 or self.include_scalars:
                    tf.summary.histogram(tag, value, step=epoch)
        self._writer.flush()


__all__ = ["HYPERPARAMETER_LOG_PREFIX", "HyperparameterHistograms", "require_tensorboard"]
