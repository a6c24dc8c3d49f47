"""Keras conventions of the trainers: log names, hyperparameter logs, saving, mixed precision.

Log names (`History`, `TensorBoard`, `EarlyStopping`, `CSVLogger`):

  loss          the outer loss f(w_T, λ) on the outer batch (kept under Keras' name, so that
                `EarlyStopping()`, `ModelCheckpoint` and `ReduceLROnPlateau` defaults see it);
  outer_loss    the same value, under a name that says what it is;
  inner_loss    the inner objective g(w_T, λ) on the inner batch at the trained weights
                (user inner loss + layer regularizers/`add_loss` + `inner_regularizer` +
                proximal term);
  hp/<name>     the value of every scalar hyperparameter after the step's update (vector ones:
                `tf_bilevel.keras.HyperparameterHistograms`).

With `validation_data`, `val_loss` (= `val_outer_loss`: f on held-out tasks) is the quantity
to monitor with `EarlyStopping`; `inner_loss` measures the fit to the training batch, which a
too-weak regularization improves, so it is no stopping criterion.
"""

from __future__ import annotations

import re
from typing import Any

import tensorflow as tf

from tf_bilevel._tree import leaf_names

HYPERPARAMETER_LOG_PREFIX = "hp/"
# Trainer-owned copies of the inner weights: λ leaves, but not knobs to plot per epoch.
_WEIGHT_COPIES = ("centers", "init")

SAVE_MESSAGE = (
    "{cls}.{method}: a bilevel trainer cannot be saved as a whole model (.keras/.h5/SavedModel): its "
    "losses, regularizer and schedules are arbitrary Python callables that Keras cannot serialize, so "
    "there is no get_config/from_config. Instead: save or restore the state with "
    "trainer.save_weights('x.weights.h5') / load_weights (λ, meta_step, the models' weights) on a "
    "trainer built with the same arguments; resume an interrupted fit with "
    "keras.callbacks.BackupAndRestore; save the trained inner model itself with "
    "trainer.inner_model.save('model.keras'); export the meta-learned hyper model with "
    "trainer.export('dir') (a SavedModel for serving)."
)


def hyperparameter_leaves(values: dict, include_weight_copies: bool = True) -> dict:
    """{"hp/<name>[/i...]": tensor} for every leaf of `trainer.hyperparameter_values()`."""
    leaves = {}
    for name, value in values.items():
        if not include_weight_copies and name in _WEIGHT_COPIES:
            continue
        for path, leaf in zip(leaf_names(value, ""), tf.nest.flatten(value)):
            # "[0]['a']" -> "/0/a": TensorBoard groups tags by their "/" prefixes.
            suffix = "".join("/" + part.strip("'") for part in re.findall(r"\[([^\]]*)\]", path))
            leaves[HYPERPARAMETER_LOG_PREFIX + name + suffix] = tf.convert_to_tensor(leaf)
    return leaves


def scalar_hyperparameter_logs(values: dict) -> dict:
    """The scalar hyperparameters as float32 log entries (TensorBoard draws them as curves)."""
    return {
        name: tf.cast(tf.reshape(leaf, []), tf.float32)
        for name, leaf in hyperparameter_leaves(values, include_weight_copies=False).items()
        if leaf.shape.num_elements() == 1
    }


def refuse_loss_scaling(optimizer: Any) -> None:
    """The outer optimizer receives unscaled float32 hypergradients: a LossScaleOptimizer would
    divide them by its loss scale."""
    if optimizer is not None and "LossScaleOptimizer" in type(optimizer).__name__:
        raise ValueError(
            "compile(optimizer=...): a LossScaleOptimizer cannot be the outer optimizer: the hypergradient is "
            "computed in float32 without loss scaling (the losses are cast to float32 under mixed precision), "
            "so it would be divided by the loss scale. Pass the wrapped optimizer itself, e.g. "
            "keras.optimizers.Adam(0.01)."
        )
