"""The tf-keras (Keras 2) path: `LegacyBilevelTrainer`, a `tf_keras.Model`.

Same behaviour and arguments as `tf_bilevel.BilevelTrainer`. tf-keras has no
`stateless_call`, so `LegacyCalls` calls a layer on given weight tensors by temporarily
substituting the attributes that hold its variables (`layer.kernel`, `layer.moving_mean`,
…) for the duration of one call. Non-trainable variables are replaced by holders that
record `assign`/`assign_sub` instead of performing them (so BatchNorm's moving-statistics
updates become returned values, exactly like Keras 3's `stateless_call`). Layers that keep
their variables in containers rather than attributes are not supported (a clear error).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import tensorflow as tf

from tf_bilevel.keras.compat import TF_KERAS, FlavorCalls, accepts_training
from tf_bilevel.keras.trainer_base import BilevelTrainerMixin

try:
    import tf_keras
    from tf_keras.src.mixed_precision import autocast_variable
except ImportError as err:  # an optional dependency: name the extra that installs it
    raise ImportError(
        "tf_bilevel.LegacyBilevelTrainer (tf-keras, Keras 2) needs the tf-keras package, which is not "
        f'installed ({err}). Install it with: pip install "tf_bilevel[legacy]"'
    ) from err

_TF_KERAS_BATCH_NORMS = (tf_keras.layers.BatchNormalization, tf_keras.layers.experimental.SyncBatchNormalization)


class _StateHolder:
    """Stands in for a non-trainable variable during a functional call: reads give the
    current value, assignments update the holder only (returned as the new state)."""

    def __init__(self, variable: Any, value: tf.Tensor):
        self.variable = variable
        self.value = tf.convert_to_tensor(value)
        self.dtype = variable.dtype
        self.shape = variable.shape
        self.name = variable.name
        self.trainable = False

    def assign(self, value, name=None, read_value=True):
        self.value = tf.cast(tf.convert_to_tensor(value), self.value.dtype)
        return self.value

    def assign_sub(self, delta, name=None, read_value=True):
        return self.assign(self.value - tf.cast(delta, self.value.dtype))

    def assign_add(self, delta, name=None, read_value=True):
        return self.assign(self.value + tf.cast(delta, self.value.dtype))

    def read_value(self):
        return self.value


tf.register_tensor_conversion_function(
    _StateHolder, lambda holder, dtype=None, name=None, as_ref=False: tf.cast(holder.value, dtype or holder.value.dtype)
)


def _attribute_slots(model: Any, variables: list) -> list:
    """For each variable, the (layer, attribute name) pairs that hold it."""
    wanted = {id(v): i for i, v in enumerate(variables)}
    slots: list = [[] for _ in variables]
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for name, value in list(vars(layer).items()):
            if isinstance(value, tf.Variable) and id(value) in wanted:
                slots[wanted[id(value)]].append((layer, name))
    for variable, found in zip(variables, slots):
        if not found:
            raise ValueError(
                f"tf-keras layer weight {variable.name!r} of {model.name!r} is not held in a layer attribute, "
                "so the tf-keras path cannot call the layer on given weight values. Use built-in layers (Dense, "
                "Conv2D, BatchNormalization, …) or Keras 3 (tf_bilevel.BilevelTrainer, which uses stateless_call)."
            )
    return slots


def _as_read_by(owner: Any, variable: Any, replacement: Any) -> Any:
    """What `owner.<attribute>` must be: under a mixed-precision policy tf-keras reads an
    AutoCastVariable in the layer's compute dtype, so a float32 weight value is cast likewise."""
    if isinstance(variable, autocast_variable.AutoCastVariable) and not isinstance(replacement, _StateHolder):
        compute = tf.as_dtype(getattr(owner, "compute_dtype", None) or replacement.dtype)
        if compute.is_floating and compute != replacement.dtype:
            return tf.cast(replacement, compute)
    return replacement


def _layer_losses(model: Any, values: dict) -> list:
    """The losses tf-keras' `model.losses` would hold after the call, at the given weight values:
    the `add_loss` tensors of the call (activity regularizers included), and the weight
    regularizers re-evaluated on the substituted values (tf-keras binds them to the variable
    objects, which would silently give them no gradient in w)."""
    losses = []
    for sub in model._flatten_layers(include_self=True, recursive=True):
        eager = list(sub._eager_losses)
        losses.extend(eager)
        for callable_loss in sub._callable_losses:
            losses.append(_weight_regularization(sub, callable_loss, values))
        if sub._losses and not eager:
            raise ValueError(
                f"tf-keras layer {sub.name!r} of inner_model {model.name!r} holds losses added outside of "
                "call() (symbolic tensors from build() or construction), which cannot be evaluated at the inner "
                "weights w_t. Add them inside call(), as kernel_regularizer=... or in inner_regularizer."
            )
    return losses


def _weight_regularization(layer: Any, callable_loss: Any, values: dict) -> tf.Tensor:
    """A weight regularizer of `layer` (tf-keras: partial(_tag_callable, partial(_loss_for_variable,
    variable))) evaluated at the variable's substituted value."""
    fn = callable_loss
    if isinstance(fn, functools.partial) and getattr(fn.func, "__name__", "") == "_tag_callable" and fn.args:
        fn = fn.args[0]
    if (
        isinstance(fn, functools.partial)
        and getattr(fn.func, "__name__", "") == "_loss_for_variable"
        and len(fn.args) == 1
        and id(fn.args[0]) in values
    ):
        value = values[id(fn.args[0])]
        return fn.func(value.value if isinstance(value, _StateHolder) else value)
    raise ValueError(
        f"tf-keras layer {layer.name!r} has a loss added as a callable (add_loss(lambda: ...)) that is not a "
        "weight regularizer: the tf-keras path cannot evaluate it at the inner weights w_t (it would silently "
        "use the stored weights). Use kernel_regularizer=... on the layer, add_loss(tensor) inside call(), "
        "inner_regularizer=..., or Keras 3 (tf_bilevel.BilevelTrainer)."
    )


class LegacyCalls(FlavorCalls):
    """Functional calls of tf-keras layers by attribute substitution."""

    flavor = TF_KERAS
    first_replica_aggregation = tf.VariableAggregation.ONLY_FIRST_REPLICA

    @staticmethod
    def models_module() -> Any:
        return tf_keras.models

    @staticmethod
    def metrics_module():
        return tf_keras.metrics

    @staticmethod
    def optimizer_built(optimizer: Any) -> bool:
        if not hasattr(optimizer, "_build_index_dict"):  # tf_keras.optimizers.legacy.*: lazy slots
            return True
        return bool(getattr(optimizer, "_built", False))

    @staticmethod
    def seed_state_positions(layer: Any) -> list:
        """tf-keras' random layers draw from an RNG the functional call cannot replay, so a
        step's VJP would see a different mask than its forward pass: they are refused."""
        random_layers = [
            sub.name for sub in layer._flatten_layers(include_self=True, recursive=True)
            if getattr(sub, "_random_generator", None) is not None
        ]
        if random_layers:
            raise ValueError(
                f"LegacyBilevelTrainer: inner_model layer(s) {random_layers} draw random numbers (Dropout, "
                "noise, augmentation), which the tf-keras path cannot make identical in an inner step and "
                "its recomputation in the backward pass. Use Keras 3 and tf_bilevel.BilevelTrainer (fresh, "
                "reproducible masks per inner step) or remove the layer from the inner model."
            )
        return []

    @staticmethod
    def variable_owners(layer: Any, positions: list) -> list:
        wanted = {id(layer.non_trainable_variables[i]) for i in positions}
        owners = [
            sub.name for sub in layer._flatten_layers(include_self=False, recursive=True)
            if any(id(v) in wanted for v in sub.non_trainable_variables)
        ]
        return owners or [layer.name]

    @staticmethod
    def call(
        layer: Any, trainable_values: list, non_trainable_values: list, x: Any, training: bool,
        return_losses: bool = False,
    ):
        """As `Keras3Calls.call`: (outputs, updated non-trainable values[, losses])."""
        trainable = LegacyCalls.trainable(layer)
        non_trainable = LegacyCalls.non_trainable(layer)
        if len(trainable_values) != len(trainable) or len(non_trainable_values) != len(non_trainable):
            raise ValueError(f"{layer.name}: expected {len(trainable)}+{len(non_trainable)} weight values")
        holders = [_StateHolder(v, value) for v, value in zip(non_trainable, non_trainable_values)]
        replacements = [tf.convert_to_tensor(t) for t in trainable_values] + holders
        slots = _attribute_slots(layer, trainable + non_trainable)
        originals = [[(owner, name, getattr(owner, name)) for owner, name in found] for found in slots]
        if return_losses:
            layer._clear_losses()  # only this call's add_loss terms (an enclosing call does not clear them)
        try:
            for found, replacement in zip(slots, replacements):
                for owner, name in found:
                    # bypasses tf-keras' weight tracking
                    object.__setattr__(owner, name, _as_read_by(owner, getattr(owner, name), replacement))
            kwargs = {"training": training} if accepts_training(layer) else {}
            outputs = layer(x, **kwargs)
            if return_losses:
                values = {id(v): r for v, r in zip(trainable + non_trainable, replacements)}
                losses = _layer_losses(layer, values)
        finally:
            for restore in originals:
                for owner, name, original in restore:
                    object.__setattr__(owner, name, original)
            if return_losses:
                layer._clear_losses()  # no graph tensors left behind in the layers
        if return_losses:
            return outputs, [h.value for h in holders], losses
        return outputs, [h.value for h in holders]


class LegacyBilevelTrainer(BilevelTrainerMixin, tf_keras.Model):
    """`tf_bilevel.BilevelTrainer` for tf-keras (Keras 2) models: the same arguments (documented
    there, validated by `tf_bilevel.keras.spec.TrainerSpec`) and behaviour."""

    _calls = LegacyCalls

    def _warn_inexact_second_order(self) -> None:
        # tf-keras' fused batch norm (4D/5D float16/32 inputs, the default there) has exact second
        # derivatives; its non-fused path (other ranks, float64, renorm, virtual batches, ...) uses
        # tf.nn.moments, which stops the gradient of the mean inside the variance.
        layers = [
            layer for layer in self.inner_model._flatten_layers(include_self=True, recursive=True)
            if isinstance(layer, _TF_KERAS_BATCH_NORMS) and not getattr(layer, "fused", False)
        ]
        if layers:
            names = ", ".join(repr(layer.name) for layer in layers)
            warnings.warn(
                f"inner_model {self.inner_model.name!r} contains non-fused tf_keras BatchNormalization layer(s) "
                f"{names}: their second derivatives are inexact (tf.nn.moments stops the gradient of the mean "
                "inside the variance), which biases hypergradients through the inner loop. Use fused batch "
                "norm (4D/5D float32 inputs, fused=None or True), or Keras 3 with tf_bilevel.BilevelTrainer "
                "and tf_bilevel.keras.BatchNormalization.",
                UserWarning,
                stacklevel=6,
            )

    def export(self, filepath: str, input_signature=None, verbose: bool = True, **kwargs):
        """Exports the meta-learned hyper model as a SavedModel (see `tf_bilevel.keras.export_hyper_model`)."""
        from tf_bilevel.keras.export import export_hyper_model

        return export_hyper_model(self, filepath, input_signature=input_signature, verbose=verbose)

