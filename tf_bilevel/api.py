"""`hypergradient_fn`: the public entry point of the functional core."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Union

import tensorflow as tf

from tf_bilevel import _tf_patches, _validate, nonfinite
from tf_bilevel._tree import leaf_names
from tf_bilevel.dynamics.loops import run
from tf_bilevel.dynamics.optimizers import InnerOptimizer, LearningRate, sgd
from tf_bilevel.dynamics.transition import BatchAtStep, InnerState, Transition, gather_step
from tf_bilevel.estimators import _pfor, forward_hypergradient, implicit_hypergradient, reverse_hypergradient
from tf_bilevel.estimators.forward import check_tangent_memory, num_hparams, zero_tangents
from tf_bilevel.estimators.common import Reach
from tf_bilevel.estimators.reverse import profile_step, step_profile_key
from tf_bilevel.problem import BilevelProblem

ESTIMATORS = ("reverse", "checkpointed", "forward", "implicit_cg", "neumann")
BACKWARD_PASSES = ("auto", "store", "recompute")
DEFAULT_MEMORY_BUDGET = 2**28  # bytes of stored per-step intermediates "auto" allows (256 MiB)


class NonFiniteError(FloatingPointError):
    """The inner loop, the outer loss or the hypergradient produced NaN or Inf (which one:
    `HypergradientResult.nonfinite_step`, decoded by `tf_bilevel.nonfinite.describe`)."""


class HypergradientResult(NamedTuple):
    outer_value: tf.Tensor
    hypergrad: Any
    final_params: Any
    # tf_bilevel.nonfinite's marker. -1: all finite; t < T: g(w_t) was the first non-finite
    # inner loss; T: f(w_T); T+1: the hypergradient.
    nonfinite_step: tf.Tensor
    # The inner optimizer's state after step T (momentum, Adam moments): pass it back as
    # `opt_state` to continue the inner optimization in the next call (online bilevel).
    final_opt_state: Any = ()
    # implicit_cg / neumann: the CG iterations / Neumann terms actually used (≤ iterations,
    # fewer when the tolerance was met); -1 for the other estimators.
    solver_iterations: Any = -1
    # stateful=True: the model state after step T (pass it back as `model_state` to continue).
    final_model_state: Any = ()
    # estimator="forward": Z_T, the tangents dw_T/dλ, d opt_state_T/dλ (and ds_T/dλ if stateful), as
    # InnerState(params=..., opt_state=..., model_state=...) with every leaf of w_T / final_opt_state / s_T given a
    # leading axis of length N (row n: the derivative along hyperparameter coordinate n, the
    # leaves of hparams in tf.nest order, each flattened row-major). Pass it back as
    # `tangents=` (with final_params, final_opt_state) to carry Z across calls. () otherwise.
    final_tangents: Any = ()


def _as_tensors(structure: Any, role: str, passed_variables: Optional[dict] = None, *,
                differentiated: Optional[bool] = None) -> Any:
    """Validates the leaves of params/hparams and converts them to tensors. `differentiated`
    (default: role == "hparams"): variables among them must be trainable."""
    if differentiated is None:
        differentiated = role == "hparams"
    leaves = tf.nest.flatten(structure)
    if not leaves:
        raise ValueError(f"{role} is empty: pass at least one tensor")
    names = leaf_names(structure, role)
    tensors = []
    for name, leaf in zip(names, leaves):
        if leaf is None:
            raise ValueError(
                f"{name} is None: every leaf of {role} must be a floating-point tensor. Give it a value "
                f"(e.g. tf.zeros(shape)) or remove the entry from {role}."
            )
        if isinstance(leaf, tf.Variable):
            if differentiated and not leaf.trainable:
                raise ValueError(
                    f"{name} is a non-trainable tf.Variable ({leaf.name}); hyperparameters must be "
                    "differentiable: make it trainable=True or pass it as a constant outside hparams."
                )
            if passed_variables is not None:
                passed_variables[id(leaf)] = name
        try:
            tensor = tf.convert_to_tensor(leaf)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} cannot be converted to a tensor ({type(leaf).__name__}: {err})") from None
        if not tensor.dtype.is_floating:
            raise TypeError(
                f"{name} has dtype {tensor.dtype.name}; {role} must be floating-point to be "
                f"differentiated (cast it, e.g. tf.cast(x, tf.float32), or move it out of {role})."
            )
        tensors.append(tensor)
    return tf.nest.pack_sequence_as(structure, tensors)


class Hypergradient:
    """A compiled hypergradient estimator. Build it with `hypergradient_fn`."""

    def __init__(
        self,
        problem: BilevelProblem,
        optimizer: InnerOptimizer,
        *,
        steps: int,
        truncate: int,
        estimator: str,
        segment_length: Optional[int],
        jit_compile: bool,
        check_numerics: bool,
        per_step_batches: Union[bool, BatchAtStep] = False,
        backward: str = "auto",
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        iterations: Optional[int] = None,
        tolerance: Optional[float] = None,
        forget: float = 1.0,
    ):
        self.problem = problem
        self.stateful = problem.stateful
        self.forget = forget
        self.iterations = iterations
        self.tolerance = tolerance
        self.per_step_batches = per_step_batches
        self.backward = backward
        self.memory_budget = memory_budget
        # What "auto" chose at the last trace ("store" or "recompute"), with what it was based on:
        # the per-step residuals' bytes and whether XLA can store them at all.
        self.backward_used: Optional[str] = None
        self.step_residual_bytes: Optional[int] = None
        self.step_storable: Optional[bool] = None
        # "auto"'s step profiles by the specs of the step's inputs: tracing a step to profile it
        # costs about as much as a step of the estimator's own trace. Estimators whose transitions
        # trace the same step (one Keras problem's, per settings) may share this dict.
        self.step_profiles: dict = {}
        batch_at_step = gather_step if per_step_batches is True else (per_step_batches or None)
        self.transition = Transition(problem, optimizer, batch_at_step)
        self.steps = steps
        self.truncate = truncate
        self.estimator = estimator
        self.segment_length = segment_length  # None: ⌈√K⌉ (see _segment_length)
        self.check_numerics = check_numerics
        self.jit_compile = jit_compile
        # partial, not the bound method: TF counts traces per code object, so bound methods of
        # several estimators would trigger a spurious "excessive retracing" warning.
        # No AutoGraph for the engine (see tf_bilevel/_autograph.py): the user's functions are
        # converted on their own, so they keep Python control flow on tensors.
        self._compiled = tf.function(
            functools.partial(Hypergradient.compute, self), jit_compile=jit_compile, autograph=False
        )
        self._compiled_solve = tf.function(
            functools.partial(Hypergradient.solve_uncompiled, self), jit_compile=jit_compile, autograph=False
        )
        self._call, self._call_solve = _tf_patches.compiled(self._compiled), _tf_patches.compiled(self._compiled_solve)

    # -- eager entry points -------------------------------------------------------------
    def __call__(self, params: Any, hparams: Any, inner_batch: Any = None, outer_batch: Any = None, *,
                 opt_state: Any = None, model_state: Any = None):
        """Returns (f(w_T, λ), hypergradient), the hypergradient with the structure of hparams."""
        result = self.detailed(params, hparams, inner_batch, outer_batch, opt_state=opt_state, model_state=model_state)
        return result.outer_value, result.hypergrad

    def detailed(
        self, params: Any, hparams: Any, inner_batch: Any = None, outer_batch: Any = None, *,
        opt_state: Any = None, model_state: Any = None, tangents: Any = None,
    ) -> HypergradientResult:
        """Like `__call__`, also returning w_T, the inner optimizer's final state and the
        non-finite marker. `opt_state` (e.g. a previous result's `final_opt_state`) continues
        the inner optimizer instead of starting it fresh. `model_state`: s_0 of a stateful
        problem (required there; e.g. a previous result's `final_model_state`).
        estimator="forward": `tangents` (a previous result's `final_tangents`) continues
        forward mode from that Z, multiplied by `forget` (RTHO / MARTHE); None starts from
        Z_0 = B_0. The result's `final_tangents` is Z_T."""
        self._check_tangents_apply(tangents)
        passed: dict = {}
        params = _as_tensors(params, "params", passed)
        hparams = _as_tensors(hparams, "hparams", passed)
        # On every call, not only when tracing: a variable that an earlier trace saw read
        # through a closure may be passed now, and no retrace would see it.
        self.problem.check_not_read_through_closure(passed)
        try:
            result = self._call(
                params, hparams, inner_batch, outer_batch, opt_state=opt_state, model_state=model_state, tangents=tangents
            )
        except ValueError:
            # Read through a closure by the trace that failed (a leaf used only that way looks unreached): say so.
            self._raise_if_read_through_closure(passed)
            raise
        self.problem.check_not_read_through_closure(passed)  # read by the trace just made
        if self.check_numerics:
            if tf.executing_eagerly():
                self._raise_if_nonfinite(int(result.nonfinite_step))
            else:
                assertion = tf.debugging.assert_less(
                    result.nonfinite_step, 0, message=nonfinite.describe_graph(self.steps)
                )
                with tf.control_dependencies([assertion]):
                    result = tf.nest.map_structure(tf.identity, result)
        return result

    def solve(self, params: Any, hparams: Any, inner_batch: Any = None, *, model_state: Any = None) -> Any:
        """w_T: the T inner steps alone, compiled, with no tape (the cost floor of every estimator)."""
        return self._call_solve(
            _as_tensors(params, "params"), _as_tensors(hparams, "hparams"), inner_batch, model_state=model_state
        )

    @property
    def tracing_count(self) -> int:
        """Number of times the hypergradient has been traced (it must not grow per call)."""
        return self._compiled.experimental_get_tracing_count()

    # -- graph builders (call these inside your own tf.function, e.g. a Keras train_step) ---
    @tf.autograph.experimental.do_not_convert
    @_tf_patches.canonical_conv_gradients()  # under XLA: Conv2D gradients in the inner-step loop stay fast
    def solve_uncompiled(self, params: Any, hparams: Any, inner_batch: Any = None, *, model_state: Any = None) -> Any:
        self._check_per_step_batch(inner_batch)
        model_state = self._checked_model_state(model_state)
        w0 = self.problem.initial_params(params, hparams)
        final, _ = run(
            self.transition, self.transition.init_state(w0, None, model_state), hparams, inner_batch,
            start=0, num_steps=self.steps, max_steps=self.steps,
        )
        return final.params

    @tf.autograph.experimental.do_not_convert
    @_tf_patches.canonical_conv_gradients()  # under XLA: Conv2D gradients in the inner-step loop stay fast
    def compute(
        self, params: Any, hparams: Any, inner_batch: Any = None, outer_batch: Any = None, *,
        opt_state: Any = None, model_state: Any = None, tangents: Any = None, check_reached: bool = True,
    ) -> HypergradientResult:
        """Builds the estimator's ops in the current graph and returns its result.
        `check_reached=False` skips the trace-time checks that every hyperparameter reaches f and
        that no passed variable is read through a closure: only for a second estimator of the same
        problem on the same hparams, after the first one's `compute` in this graph (the diagnostics'
        full-RMD reference). The reverse estimators record which leaves their own gradients reached
        (`Reach`); the probe (one step and f traced once more) runs only when that record leaves one
        unreached, and before the other estimators."""
        self._check_tangents_apply(tangents)
        passed: dict = {}
        params = _as_tensors(params, "params", passed)
        hparams = tf.nest.map_structure(tf.identity, _as_tensors(hparams, "hparams", passed))
        self._check_per_step_batch(inner_batch)
        opt_state = self._checked_opt_state(params, opt_state)
        model_state = self._checked_model_state(model_state)
        if self.estimator == "forward":
            tangents = self._checked_tangents(params, hparams, opt_state, model_state, tangents)
        reverse = self.estimator in ("reverse", "checkpointed")
        reach = Reach(len(tf.nest.flatten(hparams))) if check_reached and reverse else None
        if check_reached and not reverse:
            self._check_every_hparam_reaches_outer(params, hparams, inner_batch, outer_batch, opt_state, model_state, passed)
        T = self.steps
        if reverse:
            out = reverse_hypergradient(
                self.transition, params, hparams, inner_batch, outer_batch,
                steps=T, truncate=self.truncate,
                segment_length=self._segment_length() if self.estimator == "checkpointed" else None,
                opt_state=opt_state, model_state=model_state,
                store_intermediates=self._stores_intermediates(params, hparams, inner_batch, opt_state, model_state),
                reach=reach,
            )
            if reach is not None:
                self.problem.check_not_read_through_closure(passed)  # as the probe does, before its verdict
                if not reach.complete:  # the probe's verdict (and error) for what these gradients did not reach
                    self._check_every_hparam_reaches_outer(
                        params, hparams, inner_batch, outer_batch, opt_state, model_state, passed)
        elif self.estimator == "forward":
            out = forward_hypergradient(
                self.transition, params, hparams, inner_batch, outer_batch, steps=T, opt_state=opt_state,
                tangents=tangents, forget=self.forget, model_state=model_state,
            )
        else:
            out = implicit_hypergradient(
                self.transition, params, hparams, inner_batch, outer_batch, steps=T,
                iterations=self.iterations, solver="cg" if self.estimator == "implicit_cg" else "neumann",
                opt_state=opt_state, tolerance=self.tolerance,
            )
        # In the order of computation: inner steps (the estimator's marker), f(w_T), hypergradient.
        marker = nonfinite.mark(out.nonfinite_step, out.outer_value, nonfinite.at_outer_loss(T))
        marker = nonfinite.mark(marker, out.hypergrad, nonfinite.at_hypergradient(T))
        hypergrad = tf.nest.pack_sequence_as(hparams, out.hypergrad)
        return HypergradientResult(
            out.outer_value, hypergrad, out.final_params, marker, out.final_opt_state, out.solver_iterations,
            out.final_model_state, out.final_tangents,
        )

    # -- helpers ----------------------------------------------------------------------
    def _stores_intermediates(self, params, hparams, inner_batch, opt_state, model_state=()) -> bool:
        """The backward pass of "reverse": "store" when asked, or ("auto") when K times the
        per-step residuals fit in memory_budget; "recompute" (O(MK)) otherwise."""
        if self.estimator != "reverse":
            self.backward_used = "recompute"
            return False
        if self.backward == "auto":
            state = self.transition.init_state(self.problem.initial_params(params, hparams), opt_state, model_state)
            key = step_profile_key(state, hparams, inner_batch)
            profile = self.step_profiles.get(key)
            if profile is None:
                profile = self.step_profiles[key] = profile_step(self.transition, state, hparams, inner_batch)
            self.step_residual_bytes, self.step_storable = profile.residual_bytes, profile.storable
            store = profile.storable and self.truncate * profile.residual_bytes <= self.memory_budget
        else:
            store = self.backward == "store"
        self.backward_used = "store" if store else "recompute"
        return store

    def _check_per_step_batch(self, inner_batch: Any) -> None:
        """per_step_batches=True: every inner_batch leaf must have a leading axis of length T."""
        if self.per_step_batches is not True:
            return
        if inner_batch is None:
            raise ValueError(
                "per_step_batches=True but no inner_batch was passed: pass one minibatch per inner step, "
                f"every leaf stacked on a leading axis of length steps={self.steps}."
            )
        for name, leaf in zip(leaf_names(inner_batch, "inner_batch"), tf.nest.flatten(inner_batch)):
            shape = tf.TensorShape(getattr(leaf, "shape", None))
            if shape.rank == 0 or (shape.rank is not None and shape[0] is not None and shape[0] != self.steps):
                raise ValueError(
                    f"per_step_batches=True: {name} has shape {shape}, but its leading axis must be the "
                    f"inner step (length steps={self.steps}): stack one minibatch per step, e.g. "
                    f"dataset.batch(batch_size).batch({self.steps}, drop_remainder=True)."
                )

    def _checked_opt_state(self, params: Any, opt_state: Any) -> Any:
        """The given inner optimizer state as tensors, checked against a fresh one's structure."""
        if opt_state is None:
            return None
        fresh = self.transition.optimizer.init(params)
        try:
            tf.nest.assert_same_structure(fresh, opt_state)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"opt_state does not have the structure of the inner optimizer's state ({err}); pass "
                "the final_opt_state of a previous result of this estimator."
            ) from None
        for name, given, expected in zip(leaf_names(opt_state, "opt_state"), tf.nest.flatten(opt_state), tf.nest.flatten(fresh)):
            given = tf.convert_to_tensor(given)
            if not given.shape.is_compatible_with(expected.shape):
                raise ValueError(f"{name} has shape {given.shape}, the inner optimizer's state has {expected.shape}")
        return tf.nest.map_structure(lambda g, e: tf.cast(g, e.dtype), opt_state, fresh)

    def _checked_model_state(self, model_state: Any) -> Any:
        """s_0 as tensors: required by a stateful problem, refused by a stateless one (() there)."""
        if not self.stateful:
            if model_state is not None:
                raise ValueError(
                    "model_state was given but this estimator was built with stateful=False: build it with "
                    "hypergradient_fn(..., stateful=True) to carry a model state through the inner steps."
                )
            return ()
        if model_state is None:
            raise ValueError(
                "stateful=True: pass the initial model state, hg(..., model_state=s0) (e.g. a layer's "
                "moving statistics, or a previous result's final_model_state)."
            )
        return tf.nest.map_structure(tf.convert_to_tensor, model_state)

    def _check_tangents_apply(self, tangents: Any) -> None:
        if tangents is not None and self.estimator != "forward":
            raise ValueError(
                f"tangents= applies to estimator='forward' only (they are its Z = dw/dλ), not "
                f"estimator={self.estimator!r}: build with estimator='forward' to carry them, or drop tangents=."
            )

    def _checked_tangents(self, params: Any, hparams: Any, opt_state: Any, model_state: Any, tangents: Any) -> Any:
        """Forward mode: N × (params + optimizer state + model state) must fit memory_budget; the
        given Z (a previous result's final_tangents) as an InnerState of [N, ...] tensors, checked."""
        n = num_hparams(hparams)
        state = self.transition.init_state(params, opt_state, model_state)
        for name, leaf in zip(leaf_names(model_state, "model_state"), tf.nest.flatten(model_state)):
            if not leaf.dtype.is_floating:
                raise ValueError(
                    f"estimator='forward' with stateful=True differentiates the model state: {name} has dtype "
                    f"{leaf.dtype.name}, not floating point. Keep integer state (counters, seeds) out of the "
                    "model state, or use estimator='reverse'."
                )
        check_tangent_memory(state, n, self.memory_budget)
        if tangents is None:
            return None
        if opt_state is None and tf.nest.flatten(state.opt_state):
            raise ValueError(
                "tangents= was given without opt_state=: the tangents continue a run, so pass the inner "
                "optimizer's state too (opt_state=result.final_opt_state with tangents=result.final_tangents)."
            )
        if not isinstance(tangents, (tuple, list)) or len(tangents) not in (2, 3):
            raise ValueError(
                "tangents must be the final_tangents of a previous estimator='forward' result: "
                f"InnerState(params=..., opt_state=..., model_state=...), got {type(tangents).__name__}"
            )
        tangents = InnerState(*tangents)
        expected = zero_tangents(state, n)
        for part in ("params", "opt_state", "model_state"):
            try:
                tf.nest.assert_same_structure(getattr(expected, part), getattr(tangents, part), check_types=False)
            except (ValueError, TypeError) as err:
                raise ValueError(
                    f"tangents.{part} does not have the structure of {part} ({err}); pass the final_tangents "
                    "of a previous result of this estimator."
                ) from None
        checked = []
        for name, given, like in zip(leaf_names(tangents, "tangents"), tf.nest.flatten(tangents), tf.nest.flatten(expected)):
            given = tf.convert_to_tensor(given)
            if not given.shape.is_compatible_with(like.shape):
                raise ValueError(
                    f"{name} has shape {given.shape}, expected {like.shape}: a leading axis of N={n} (one row per "
                    "hyperparameter coordinate) on the shape of the leaf it differentiates. Pass the "
                    "final_tangents of a previous result with the same params, opt_state and hparams."
                )
            checked.append(tf.cast(given, like.dtype))
        return tf.nest.pack_sequence_as(expected, checked)

    def _segment_length(self) -> int:
        return self.segment_length or max(1, math.ceil(math.sqrt(self.truncate)))

    def _check_every_hparam_reaches_outer(self, params, hparams, inner_batch, outer_batch, opt_state=None,
                                          model_state=(), passed=None) -> None:
        """Trace-time probe through Ξ0, one step and f: a leaf with no path to f is a mistake.
        (Its ops have no consumer, so they are pruned from the compiled function.) `passed`: the
        variables passed as params/hparams (id -> name); one the probe saw a loss read through a
        closure is named as such first (it is used, just not through the argument)."""
        flat_hp = tf.nest.flatten(hparams)
        with tf.GradientTape() as tape:
            tape.watch(flat_hp)
            w0 = self.problem.initial_params(params, hparams)
            state, _ = self.transition(
                self.transition.init_state(w0, opt_state, model_state), hparams, tf.constant(0), inner_batch
            )
            flat_w1 = tf.nest.flatten(state.params)
            tape.watch(flat_w1)
            value = self.problem.outer(state.params, hparams, outer_batch, state.model_state)
        self.problem.check_not_read_through_closure(passed or {})
        grads_w, grads = tape.gradient(value, (flat_w1, flat_hp))
        unreached = [name for name, g in zip(leaf_names(hparams, "hparams"), grads) if g is None]
        if unreached and all(g is None for g in grads_w):
            # The hyperparameters may well be used (by inner_loss): f just ignores w.
            constant = all(g is None for g in grads)
            raise ValueError(
                f"outer_loss does not depend on params{' or hparams (does it return a constant?)' if constant else ''}, "
                f"so {', '.join(unreached)}, acting through the inner problem, cannot change it: its "
                "hypergradient would be silently zero. Compute outer_loss from its params argument "
                "(the inner solution w_T)."
            )
        if unreached:
            raise ValueError(
                f"{', '.join(unreached)} not reached by the losses: neither inner_loss, the inner "
                "learning rate, init_params nor outer_loss depends on it, so its hypergradient would "
                "be silently zero. Use it in one of them or remove it from hparams."
            )

    def _raise_if_read_through_closure(self, passed: dict) -> None:
        try:
            self.problem.check_not_read_through_closure(passed)
        except ValueError as err:
            raise err from None

    def _raise_if_nonfinite(self, marker: int) -> None:
        if marker != nonfinite.NONE:
            raise NonFiniteError(nonfinite.describe(marker, self.steps))


def hypergradient_fn(
    inner_loss: Callable[..., tf.Tensor],
    outer_loss: Callable[..., tf.Tensor],
    *,
    steps: int,
    learning_rate: Optional[LearningRate] = None,
    inner_optimizer: Optional[InnerOptimizer] = None,
    truncate: Optional[int] = None,
    estimator: str = "reverse",
    jit_compile: bool = True,
    init_params: Optional[Callable[[Any, Any], Any]] = None,
    segment_length: Optional[int] = None,
    check_numerics: bool = True,
    per_step_batches: Union[bool, BatchAtStep] = False,
    backward: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    iterations: Optional[int] = None,
    tolerance: Optional[float] = 1e-10,
    stateful: bool = False,
    forget: Optional[float] = None,
    **removed: Any,  # only to name the new name of a renamed argument (a TypeError)
) -> Hypergradient:
    """Builds a compiled estimator of d_λ f(ŵ(λ), λ), ŵ = w_T after `steps` inner steps.

    Args:
      inner_loss: g(params, hparams[, inner_batch]) -> scalar.
      outer_loss: f(params, hparams[, outer_batch]) -> scalar (may depend on hparams: ∇λf ≠ 0).
      steps: T, the number of inner optimization steps.
      learning_rate: γ for plain gradient descent: a number, a schedule `step -> γ`, or
        `(step, hparams) -> γ` to learn it. Exactly one of learning_rate / inner_optimizer.
      inner_optimizer: a `tf_bilevel.sgd/momentum/adam(...)` update rule.
      truncate: K. "reverse"/"checkpointed": back-propagate through the last K steps only
        (K-RMD, Eq. 8), 1 <= K <= T; None means K = T (full RMD, Eq. 6).
      estimator: "reverse" | "checkpointed" | "forward" (FMD, Eq. 7: all N tangent columns in
        one pass, O(MN) memory; its tangents Z carry across calls, see `forget`; a RuntimeError
        here where this TF's pfor internals, which it needs, are not the expected ones) |
        "implicit_cg" | "neumann" (Eq. 11 at w_T, Eq. 12).
      jit_compile: compile with XLA (True/False; anything else is a TypeError).
      init_params: optional w0 = Ξ0(params, hparams), e.g. a learned initialization (B0 term).
      segment_length: "checkpointed" only: the steps per segment, c. The state at the start of
        every segment is stored, and the backward pass recomputes one segment at a time
        (O(M(K/c + c)) memory; default c = ⌈√K⌉). Formerly `checkpoint_every`.
      check_numerics: raise `NonFiniteError` naming the inner step where a loss became NaN/Inf.
      per_step_batches: True: stochastic inner problem, g_t(w, λ) on minibatch t. Every leaf
        of `inner_batch` has a leading axis of length `steps` and inner step t (0-based) uses
        element t, in the forward pass, in that step's VJP (A_t, B_t of Eq. 6) and in
        checkpointed recomputation. "implicit_cg"/"neumann" solve Eq. 11 with the last
        step's batch. A function `(inner_batch, step) -> batch of that step` selects it
        otherwise (e.g. part of the batch per step, or a random seed derived from the step).
      backward: the backward pass of estimator="reverse" through the last K steps. "recompute":
        explicit VJPs from the K stored states, O(MK) memory, each step recomputed once.
        "store": TF differentiates the recorded K steps keeping every intermediate (no
        recomputation, ~1 forward pass per step less; memory K × per-step residuals). Under
        XLA it fails to compile when a step's inner gradient computes shapes or permutations
        (tf.transpose, broadcasting, concat: tensorflow/tensorflow#62861). "auto" (default):
        "store" when the traced step has none of those ops and K × (its residual bytes) ≤
        memory_budget, else "recompute". `hg.backward_used` tells which one ran.
      memory_budget: bytes of stored intermediates "auto" may use (default 256 MiB). Forward
        mode: the most bytes its tangents, N × (params + optimizer state), may take; more is a
        ValueError naming K-RMD.
      iterations: "implicit_cg"/"neumann" only: the most CG iterations / Neumann terms for the
        linear system of Eq. 11 at w_T (default T; not bounded by T). A static bound: the
        solver is a tf.while_loop with maximum_iterations, under XLA too.
      tolerance: "implicit_cg"/"neumann": stop once the relative residual ‖r‖/‖b‖ (CG) or the
        relative norm of the next Neumann term is ≤ tolerance (None: always run `iterations`).
        `hg.detailed(...).solver_iterations` reports the number used.
      stateful: True: the problem carries a model state s_t through the inner steps (layer
        state such as BatchNorm's moving statistics): inner_loss(params, hparams, batch,
        state) returns (loss, next state) and outer_loss(params, hparams, batch, state) reads
        s_T; pass s_0 as `hg(..., model_state=s0)`, `detailed(...).final_model_state` is s_T.
        f is differentiated through s_T too (s_T depends on w_t, hence on λ).
        estimator="reverse"/"checkpointed"/"forward" (forward mode also carries ds_t/dλ in
        its tangents; the model state must then be floating point).
      forget: "forward" only: μ in [0, 1] (default 1). `hg.detailed(..., tangents=Z)` continues
        forward mode from the tangents Z of a previous call (`result.final_tangents`),
        multiplied by μ first: μ = 1 carries them whole (the exact hypergradient through the
        whole run so far: RTHO, Franceschi et al. 2017), μ = 0 forgets them (greedy, as a
        fresh call), in between discounts the past (MARTHE, Donini et al. 2020).

    Returns:
      A `Hypergradient`; `hg(params, hparams[, inner_batch, outer_batch])` returns
      `(outer_value, hypergrad)` with hypergrad structured like hparams.
    """
    _reject_unknown_arguments(removed)
    steps = _validate.positive_int(steps, "steps", "the number T of inner steps")
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "forward":
        _pfor.install()  # at build: a RuntimeError naming the fix where this TF's pfor internals differ
    truncate = _checked_truncate(truncate, steps, estimator)
    forget = _checked_forget(forget, estimator)
    iterations, tolerance = _checked_solver(iterations, tolerance, steps, estimator)
    if segment_length is not None:
        if estimator != "checkpointed":
            raise ValueError("segment_length only applies to estimator='checkpointed'")
        segment_length = _validate.positive_int(segment_length, "segment_length", "steps per recomputed segment")
    jit_compile = _validate.boolean(jit_compile, "jit_compile")
    stateful = _validate.boolean(stateful, "stateful")
    if stateful and estimator not in ("reverse", "checkpointed", "forward"):
        raise ValueError(
            f"stateful=True (a model state, e.g. BatchNorm's moving statistics, carried through the inner "
            f"steps) is supported by estimator='reverse'/'checkpointed'/'forward' only, not estimator={estimator!r}."
        )
    check_numerics = _validate.boolean(check_numerics, "check_numerics")
    if (learning_rate is None) == (inner_optimizer is None):
        raise ValueError(
            "pass exactly one of learning_rate= (plain gradient descent) or inner_optimizer= "
            "(e.g. tf_bilevel.momentum(0.1))"
        )
    if backward not in BACKWARD_PASSES:
        raise ValueError(f"backward must be one of {BACKWARD_PASSES}, got {backward!r}")
    if backward == "store" and estimator != "reverse":
        raise ValueError(
            f"backward='store' applies to estimator='reverse' only (estimator={estimator!r} has its own "
            "memory profile): leave backward='auto'."
        )
    memory_budget = _validate.integer(memory_budget, "memory_budget", "bytes of stored intermediates", minimum=0)
    if not (isinstance(per_step_batches, bool) or callable(per_step_batches)):
        raise TypeError(
            "per_step_batches must be True (one minibatch per inner step on the leading axis of inner_batch), "
            f"False, or a function (inner_batch, step) -> batch of that step, got {per_step_batches!r}"
        )
    if inner_optimizer is None:
        optimizer = sgd(_validate.learning_rate(learning_rate, "learning_rate"))
    else:
        optimizer = inner_optimizer
    if not isinstance(optimizer, InnerOptimizer):
        raise TypeError(f"inner_optimizer must be a tf_bilevel.InnerOptimizer (sgd/momentum/adam), got {optimizer!r}")
    if estimator == "neumann" and optimizer.learning_rate is None:
        raise ValueError(
            "estimator='neumann' expands (∇ww g)^-1 with the step size γ of plain gradient descent "
            "(Eq. 12): use learning_rate= or tf_bilevel.sgd(...), not momentum/adam."
        )
    return Hypergradient(
        BilevelProblem(inner_loss, outer_loss, init_params, stateful),
        optimizer,
        steps=steps,
        truncate=truncate,
        estimator=estimator,
        segment_length=segment_length,
        jit_compile=jit_compile,
        check_numerics=check_numerics,
        per_step_batches=per_step_batches,
        backward=backward,
        memory_budget=memory_budget,
        iterations=iterations,
        tolerance=tolerance,
        forget=forget,
    )


def _checked_forget(forget: Any, estimator: str) -> float:
    """μ, the factor on the carried forward-mode tangents (1 when not given)."""
    if forget is None:
        return 1.0
    if estimator != "forward":
        raise ValueError(
            f"forget applies to estimator='forward' only (it discounts the forward-mode tangents carried "
            f"across calls), not estimator={estimator!r}: use estimator='forward' or drop forget=."
        )
    return float(_validate.real_in_range(
        forget, "forget", low=0.0, high=1.0, high_open=False,
        meaning="μ, the factor on the carried tangents: 1 keeps them (RTHO), 0 forgets them (greedy)",
    ))


# Keyword arguments that were renamed (pre-1.0: no silent alias): old name -> new name.
_RENAMED_ARGUMENTS = {"checkpoint_every": "segment_length"}


def _reject_unknown_arguments(removed: dict) -> None:
    """A TypeError for a keyword argument hypergradient_fn does not take, naming the new
    name of a renamed one."""
    for name in removed:
        if name in _RENAMED_ARGUMENTS:
            new = _RENAMED_ARGUMENTS[name]
            raise TypeError(
                f"hypergradient_fn() got the keyword argument {name!r}, which was renamed {new!r} "
                f"(the steps per recomputed segment of estimator='checkpointed'): pass {new}={removed[name]!r}."
            )
        raise TypeError(f"hypergradient_fn() got an unexpected keyword argument {name!r}")


def _checked_truncate(truncate: Optional[int], steps: int, estimator: str) -> int:
    """K: the steps back-propagated through (reverse/checkpointed, 1 <= K <= T)."""
    if truncate is None:
        return steps
    if estimator in ("implicit_cg", "neumann"):
        raise ValueError(
            f"estimator={estimator!r} does not back-propagate through steps, so truncate does not apply: "
            f"give the number of {'CG iterations' if estimator == 'implicit_cg' else 'Neumann terms'} as "
            f"iterations={truncate} (and optionally tolerance=)."
        )
    truncate = _validate.positive_int(truncate, "truncate", "K, the number of steps to back-propagate through")
    if estimator == "forward" and truncate != steps:
        raise ValueError("estimator='forward' computes the exact hypergradient: leave truncate=None")
    if truncate > steps:
        raise ValueError(
            f"truncate={truncate} is larger than steps={steps}: K-RMD back-propagates through the "
            f"last K of the T inner steps, so 1 <= truncate <= steps. Use truncate=None for full RMD."
        )
    return truncate


def _checked_solver(iterations: Any, tolerance: Any, steps: int, estimator: str) -> tuple[Optional[int], Optional[float]]:
    """(iterations, tolerance) of the implicit estimators' linear solver; (None, None) otherwise."""
    if estimator not in ("implicit_cg", "neumann"):
        if iterations is not None:
            raise ValueError(
                f"iterations applies to estimator='implicit_cg'/'neumann' only; estimator={estimator!r} "
                "takes truncate=K (the steps to back-propagate through)."
            )
        return None, None
    meaning = "the most CG iterations" if estimator == "implicit_cg" else "the most Neumann terms"
    iterations = steps if iterations is None else _validate.positive_int(iterations, "iterations", meaning)
    if tolerance is not None:
        tolerance = float(_validate.real_in_range(tolerance, "tolerance", low=0.0, high=1.0,
                                                  meaning="a relative residual, e.g. 1e-10; None runs all iterations"))
    return iterations, tolerance
