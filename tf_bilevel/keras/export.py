"""Export of the meta-learned layers (e.g. the hyper-representation convs of the Omniglot
network, appendix G.3) as a SavedModel with a serving signature.

The exported function is the hyper model in inference mode (`training=False`: BatchNorm
uses the moving statistics the trainer accumulated). Reload it with any of

    features = tfb.keras.load_hyper_model(path)(x)                      # keeps what it loaded
    loaded = tf.saved_model.load(path); features = loaded.serve(x)      # keep `loaded` alive
    (features,) = tf.saved_model.load(path).signatures["serving_default"](x).values()
    layer = keras.layers.TFSMLayer(path, call_endpoint="serve")         # a Keras layer

but not `tf.saved_model.load(path).serve(x)` in one expression: TF functions hold only weak
references to the variables they read, the loaded object (which owns them) is freed as soon
as `.serve` has been looked up, and the call fails with "Called a function referencing
variables which have been deleted".
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import tensorflow as tf

from tf_bilevel.keras.compat import KERAS3, keras_flavor
from tf_bilevel.keras.trainer_base import BilevelTrainerMixin

ENDPOINT = "serve"


def _signature_of(layer: Any) -> Optional[list]:
    """[TensorSpec] from a built functional model's inputs, if it has them."""
    inputs = getattr(layer, "inputs", None)
    if not inputs:
        return None
    return [tf.TensorSpec([None] + list(x.shape)[1:], getattr(x.dtype, "name", x.dtype)) for x in inputs]


def export_hyper_model(
    trainer_or_layer: Any,
    filepath: str,
    *,
    input_signature: Optional[Sequence[tf.TensorSpec]] = None,
    verbose: bool = False,
) -> None:
    """Writes a SavedModel serving `layer(x, training=False)` under the endpoint "serve" (also
    the "serving_default" signature).

    Args:
      trainer_or_layer: a `BilevelTrainer` (its `hyper_model` is exported) or any Keras layer.
      filepath: the SavedModel directory.
      input_signature: `[tf.TensorSpec(...)]`; default: the inputs the trainer was built with
        (batch axis None), or a functional model's inputs.
      verbose: print the endpoint summary.
    """
    layer, signature = trainer_or_layer, input_signature
    if isinstance(trainer_or_layer, BilevelTrainerMixin):
        if trainer_or_layer.hyper_model is None:
            raise ValueError(
                "export: this BilevelTrainer has no hyper_model, so there are no meta-learned layers to serve "
                "(its hyperparameters live in trainer.hyperparameter_values())."
            )
        layer = trainer_or_layer.hyper_model
        if signature is None:
            signature = trainer_or_layer.export_input_signature
    flavor = keras_flavor(layer)
    if flavor is None:
        raise TypeError(f"export_hyper_model expects a BilevelTrainer or a Keras layer, got {trainer_or_layer!r}")
    if signature is None:
        signature = _signature_of(layer)
    if signature is None:
        raise ValueError(
            "export: the input signature is unknown (the trainer was never built by fit/evaluate). Pass "
            "input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32)] (your input shape), or call fit first."
        )
    signature = list(signature)
    if not layer.built:  # build it on zeros of the signature (unknown dims -> 1)
        zeros = [tf.zeros([1 if d is None else d for d in s.shape.as_list()], s.dtype) for s in signature]
        layer(zeros[0] if len(zeros) == 1 else zeros)
    if flavor == KERAS3:
        import keras

        archive = keras.export.ExportArchive()
    else:
        import tf_keras

        archive = tf_keras.export.ExportArchive()
    archive.track(layer)
    if len(signature) == 1:
        archive.add_endpoint(ENDPOINT, lambda x: layer(x, training=False), input_signature=signature)
    else:
        archive.add_endpoint(ENDPOINT, lambda *xs: layer(list(xs), training=False), input_signature=signature)
    if flavor == KERAS3:
        archive.write_out(filepath, verbose=verbose)
    else:
        archive.write_out(filepath)


class LoadedHyperModel:
    """The "serve" endpoint of an exported hyper model, holding the loaded SavedModel (which
    owns the variables the endpoint reads), so that it can be used in one expression."""

    def __init__(self, loaded: Any, path: str):
        self.loaded = loaded
        self.path = path
        self._serve = getattr(loaded, ENDPOINT)

    def __call__(self, *inputs: Union[tf.Tensor, Any]) -> tf.Tensor:
        """The hyper model in inference mode on `inputs` (as many as the exported signature)."""
        return self._serve(*inputs)

    @property
    def variables(self) -> list:
        return list(self.loaded.variables)

    def __repr__(self) -> str:
        return f"LoadedHyperModel({self.path!r})"


def load_hyper_model(filepath: str) -> LoadedHyperModel:
    """Reloads a SavedModel written by `export_hyper_model` / `trainer.export` as a callable:
    `load_hyper_model(path)(x)` works in one expression (unlike `tf.saved_model.load(path).serve(x)`,
    see the module docstring)."""
    loaded = tf.saved_model.load(filepath)
    if not hasattr(loaded, ENDPOINT):
        raise ValueError(
            f"load_hyper_model({filepath!r}): this SavedModel has no {ENDPOINT!r} endpoint; was it written by "
            "tf_bilevel.keras.export_hyper_model / trainer.export? Use tf.saved_model.load for other SavedModels."
        )
    return LoadedHyperModel(loaded, str(filepath))
