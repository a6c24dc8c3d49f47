"""The outer loop: one compiled hyper-step λ_{k+1} = λ_k + u_k(h(λ_k)).

A hyper-step runs the T inner steps, the hypergradient h(λ_k) of a `tfb.Hypergradient`
(d_λf, Eq. 6, or its K-RMD truncation h_{T−K}, Eq. 8) and the outer optimizer's update of λ
as ONE `tf.function` (XLA-compiled by default, like the hypergradient): no Python between the
backward pass and the update, and data passed as arguments, so it is traced once.

Its state — λ, the outer optimizer's state and the hyper-step counter k — lives in
`tf.Variable`s, so `tf.train.Checkpoint` saves and restores it exactly (the variables' bytes);
`tf_bilevel.resume.HyperStepCheckpoint` adds the settings guard. `HyperStep.state` is a
`HyperStepState` snapshot of it.

The outer optimizer is either a Keras optimizer (`keras.optimizers.Adam(...)`, its variables
are the state) or one of the library's optax-style update rules (`tfb.sgd/momentum/adam`,
whose state NamedTuple is held in variables here; their learning rate may be a number or a
schedule of k).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import tensorflow as tf

from tf_bilevel import _tf_patches, _validate
from tf_bilevel._autograph import convert_user_function
from tf_bilevel._tree import leaf_names
from tf_bilevel import nonfinite
from tf_bilevel.api import Hypergradient, HypergradientResult, NonFiniteError, _as_tensors
from tf_bilevel.dynamics.optimizers import InnerOptimizer

# metrics(result, inner_batch, outer_batch) -> {name: tensor}, computed inside the compiled call.
Metrics = Callable[[HypergradientResult, Any, Any], Mapping[str, tf.Tensor]]


class HyperStepState(NamedTuple):
    """The state a hyper-step updates (a snapshot of its variables)."""

    hparams: Any  # λ_k, structured like the hparams given
    opt_state: Any  # the outer optimizer's state: its state NamedTuple, or a Keras optimizer's variables
    step: tf.Tensor  # k, hyper-steps applied so far (int64)


class HyperStepResult(NamedTuple):
    """What one hyper-step computed, at the λ_k it started from."""

    hparams: Any  # λ_k (before the update)
    outer_value: tf.Tensor  # f(w_T(λ_k), λ_k)
    hypergrad: Any  # h(λ_k), structured like hparams
    final_params: Any  # w_T(λ_k)
    # -1: all finite, the update was applied; otherwise the marker of `HypergradientResult`
    # (t < T: inner step t, T: outer loss, T+1: hypergradient) and the state was left unchanged.
    nonfinite_step: tf.Tensor
    step: tf.Tensor  # k, the index of this hyper-step (0-based)
    metrics: Mapping[str, tf.Tensor]  # the `metrics=` function's values


def _is_keras_optimizer(optimizer: Any) -> bool:
    # Duck-typed, so that `tf_bilevel.outer` does not import Keras.
    return all(callable(getattr(optimizer, name, None)) for name in ("apply", "build")) and hasattr(
        optimizer, "variables"
    )


def _as_variables(hparams: Any) -> Any:
    """hparams as tf.Variables: given variables are used (and updated) as they are. The leaves
    are checked as `hypergradient_fn` checks hparams (floating, trainable variables)."""
    tensors = tf.nest.flatten(_as_tensors(hparams, "HyperStep(hparams=...)", differentiated=True))
    variables = [
        leaf if isinstance(leaf, tf.Variable)
        else tf.Variable(tensor, name=name.replace("[", "_").replace("]", "").replace("'", ""))
        for name, leaf, tensor in zip(leaf_names(hparams, "hparams"), tf.nest.flatten(hparams), tensors)
    ]
    return tf.nest.pack_sequence_as(hparams, variables)


class HyperStep:
    """One compiled outer iteration: h = hypergradient(params, λ_k, batches), then λ ← update(λ, h).

    `step(params, inner_batch, outer_batch)` returns a `HyperStepResult`; λ, the optimizer's
    state and the counter k are updated in place. With the paper's outer gradient descent
    (`tfb.sgd(η)`) it is λ_{k+1} = λ_k − η h_{T−K}(λ_k) (Eq. 8, §3.2); with Adam, the
    hypercleaning setting of §4.2.1.

    A hyper-step whose inner loss, outer loss or hypergradient is NaN/Inf leaves the whole
    state unchanged (λ, the optimizer's moments and both counters) and, called eagerly with
    `check_numerics`, raises `tfb.NonFiniteError` naming where it happened.

    Args:
      hypergradient: a `tfb.Hypergradient` from `tfb.hypergradient_fn`; its graph builder
        (`compute`) runs inside this step's compiled function.
      hparams: λ_0: a tensor or a nested structure of floating-point tensors (copied into new
        variables) or trainable `tf.Variable`s (used and updated as they are).
      optimizer: the outer optimizer: a Keras optimizer (built here on λ's variables if it is
        not built yet), or `tfb.sgd/momentum/adam(...)` (state created by its `init(λ_0)`;
        a learning-rate schedule receives k).
      jit_compile: XLA-compile the step (default: as the hypergradient was built).
      metrics: optional `(result, inner_batch, outer_batch) -> {name: tensor}` with `result` the
        `tfb.HypergradientResult` at λ_k, computed inside the compiled step (e.g. a validation
        accuracy of `result.final_params`): no second pass over w_T outside.
      check_numerics: raise `NonFiniteError` after a non-finite step (default: as the
        hypergradient was built). The check reads one scalar per step.
    """

    def __init__(
        self,
        hypergradient: Hypergradient,
        hparams: Any,
        optimizer: Any,
        *,
        jit_compile: Optional[bool] = None,
        metrics: Optional[Metrics] = None,
        check_numerics: Optional[bool] = None,
    ):
        if not isinstance(hypergradient, Hypergradient):
            raise TypeError(
                f"HyperStep(hypergradient=...) must be a tfb.Hypergradient (from tfb.hypergradient_fn), "
                f"got {type(hypergradient).__name__}"
            )
        if metrics is not None and not callable(metrics):
            raise TypeError(f"HyperStep(metrics=...) must be a function (result, inner_batch, outer_batch) -> dict, got {metrics!r}")
        self.hypergradient = hypergradient
        self.hparams = _as_variables(hparams)
        self._flat_hparams = tf.nest.flatten(self.hparams)
        self.optimizer = optimizer
        self._keras = _is_keras_optimizer(optimizer)
        if self._keras:
            if not optimizer.built:
                optimizer.build(self._flat_hparams)  # its variables must exist before tracing
            built_on = getattr(optimizer, "_trainable_variables", None)  # Keras 3: what build() received
            if built_on is not None and [id(v) for v in built_on] != [id(v) for v in self._flat_hparams]:
                raise ValueError(
                    "HyperStep(optimizer=...): the Keras optimizer is already built on other variables than "
                    "hparams; pass a fresh optimizer (it is built here on λ's variables)"
                )
            self._opt_state = None
        elif isinstance(optimizer, InnerOptimizer):
            initial = optimizer.init(tf.nest.map_structure(tf.convert_to_tensor, self.hparams))
            self._opt_state = tf.nest.map_structure(lambda x: tf.Variable(x, trainable=False), initial)
        else:
            raise TypeError(
                "HyperStep(optimizer=...) must be a Keras optimizer (e.g. keras.optimizers.Adam(0.01)) or a "
                f"tfb.sgd/momentum/adam update rule, got {type(optimizer).__name__}"
            )
        # k: hyper-steps applied (a Keras optimizer counts too, but only its own applications).
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="hyper_step_iterations")
        self.metrics = metrics
        # The step is traced without AutoGraph (as the engine); the metrics are converted on
        # their own, so Python `if` on tensors works in them, as in the losses.
        self._metrics = convert_user_function(metrics) if metrics is not None else None
        self.jit_compile = hypergradient.jit_compile if jit_compile is None else _validate.boolean(
            jit_compile, "HyperStep(jit_compile=...)")
        self.check_numerics = hypergradient.check_numerics if check_numerics is None else _validate.boolean(
            check_numerics, "HyperStep(check_numerics=...)")
        self._compiled = tf.function(self.step_uncompiled, jit_compile=self.jit_compile, autograph=False)
        self._call = _tf_patches.compiled(self._compiled)

    # -- state ----------------------------------------------------------------------------
    @property
    def optimizer_variables(self) -> list[tf.Variable]:
        """The outer optimizer's state variables (a Keras optimizer's own, counter included)."""
        if self._keras:
            return list(self.optimizer.variables)
        return tf.nest.flatten(self._opt_state)

    @property
    def variables(self) -> list[tf.Variable]:
        """Every variable of the state: λ, the optimizer's, the counter k."""
        return [*self._flat_hparams, *self.optimizer_variables, self.iterations]

    @property
    def state(self) -> HyperStepState:
        """A snapshot (tensors) of the current state."""
        read = lambda v: tf.identity(v)  # noqa: E731
        opt_state = (tuple(read(v) for v in self.optimizer.variables) if self._keras
                     else tf.nest.map_structure(read, self._opt_state))
        return HyperStepState(tf.nest.map_structure(read, self.hparams), opt_state, read(self.iterations))

    def assign(self, state: HyperStepState) -> None:
        """Sets the state to `state` (e.g. an earlier snapshot)."""
        flat = [*tf.nest.flatten(state.hparams), *tf.nest.flatten(state.opt_state), state.step]
        if len(flat) != len(self.variables):
            raise ValueError(f"HyperStep.assign(state): {len(flat)} tensors, the state has {len(self.variables)}")
        for variable, value in zip(self.variables, flat):
            variable.assign(value)

    def checkpoint(self, **more: Any) -> tf.train.Checkpoint:
        """A `tf.train.Checkpoint` of the state (hparams=, optimizer=, iterations=; `more`: other
        objects to save with it, e.g. a model)."""
        optimizer = self.optimizer if self._keras else list(tf.nest.flatten(self._opt_state))
        return tf.train.Checkpoint(hparams=self.hparams, optimizer=optimizer, iterations=self.iterations, **more)

    @property
    def tracing_count(self) -> int:
        """Times the step was traced (one per input signature: it must not grow per call)."""
        return self._compiled.experimental_get_tracing_count()

    # -- the step -------------------------------------------------------------------------
    def __call__(self, params: Any, inner_batch: Any = None, outer_batch: Any = None) -> HyperStepResult:
        """One hyper-step, compiled. Raises `NonFiniteError` (state unchanged) if it is not finite."""
        result = self._call(params, inner_batch, outer_batch)
        if self.check_numerics and tf.executing_eagerly():
            marker = int(result.nonfinite_step)
            if marker >= 0:
                raise NonFiniteError(
                    f"hyper-step {int(result.step)}: {nonfinite.describe(marker, self.hypergradient.steps)} "
                    "λ and the outer optimizer's state were left unchanged."
                )
        return result

    @tf.autograph.experimental.do_not_convert
    def step_uncompiled(self, params: Any, inner_batch: Any = None, outer_batch: Any = None) -> HyperStepResult:
        """The ops of one hyper-step in the current graph (call it inside your own tf.function)."""
        lam = tf.nest.map_structure(tf.identity, self.hparams)  # λ_k, read before the update
        step = tf.identity(self.iterations)
        result = self.hypergradient.compute(params, lam, inner_batch, outer_batch)
        finite = result.nonfinite_step < 0
        # A non-finite step must not leave a NaN λ or NaN moments behind: snapshot, update, and
        # keep the snapshot where the step was not finite (a select: exact when it was). The
        # reads and writes run in program order (tf.function's automatic control dependencies).
        state = self.variables[:-1]
        before = [tf.identity(v) for v in state]
        self._apply(tf.nest.flatten(result.hypergrad), step)
        for variable, old in zip(state, before):
            variable.assign(tf.where(finite, variable, old))
        self.iterations.assign_add(tf.cast(finite, tf.int64))
        metrics = dict(self._metrics(result, inner_batch, outer_batch)) if self._metrics is not None else {}
        return HyperStepResult(lam, result.outer_value, result.hypergrad, result.final_params,
                               result.nonfinite_step, step, metrics)

    def _apply(self, grads: list, step: tf.Tensor) -> None:
        if self._keras:
            self.optimizer.apply(grads, self._flat_hparams)
            return
        lam = tf.nest.map_structure(tf.identity, self.hparams)
        opt_state = tf.nest.map_structure(tf.identity, self._opt_state)
        grads = tf.nest.pack_sequence_as(self.hparams, grads)
        # The outer optimizer's `hparams` argument is (): its learning rate is a number or a schedule of k.
        updates, opt_state = self.optimizer.update(grads, opt_state, lam, (), tf.cast(step, tf.int32))
        for variable, update in zip(self._flat_hparams, tf.nest.flatten(updates)):
            variable.assign_add(update)
        for variable, value in zip(tf.nest.flatten(self._opt_state), tf.nest.flatten(opt_state)):
            variable.assign(value)
