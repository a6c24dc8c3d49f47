"""The Keras-flavor-independent half of `BilevelTrainer`: the Keras glue and the train/test/predict steps.

Mixed into `keras.Model` (trainer.py, Keras 3) and `tf_keras.Model` (legacy.py). Its
`train_step` is one hyper-iteration: for every task of the (per-replica) meta-batch, T inner
steps and the K-RMD backward pass (through `tfb.hypergradient_fn(...).compute`), the mean
hypergradient, then `optimizer.apply_gradients` on the hyperparameter variables, the Keras
way, so that `tf.distribute` all-reduces it across replicas.

Its parts: the trainer's variables (trainer_variables.py: `meta_step`, λ, carried state; all
captured by checkpoints, with the outer optimizer's slots), the non-finite update gate
(update_gate.py), the reported metrics (trainer_metrics.py), the training regime (regime.py)
and the per-task computations (tasks.py). This module is the Keras glue and the step.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import tensorflow as tf

from tf_bilevel import _tf_patches
from tf_bilevel.keras import conventions
from tf_bilevel.keras import data as data_lib
from tf_bilevel.keras.estimator import EstimatorSettings
from tf_bilevel.keras.problem import KerasBilevelProblem
from tf_bilevel.keras.regime import regime_for
from tf_bilevel.keras.reparam import Hyperparameter
from tf_bilevel.keras.spec import TrainerSpec
from tf_bilevel.keras.tasks import (
    StepInputs,
    TaskFunction,
    TaskResult,
    adapted_weights,
    choose_meta_batch_path,
    run_on_element,
    task_functions,
    task_seeds,
)
from tf_bilevel.keras.trainer_metrics import TRAIN_ONLY, StepMetrics
from tf_bilevel.keras.trainer_variables import TrainerVariables
from tf_bilevel.keras.trainer_variables import read as _read
from tf_bilevel.keras.update_gate import UpdateGate


class BilevelTrainerMixin:
    """Shared implementation, the constructor included (both flavors take the same arguments);
    see `tf_bilevel.BilevelTrainer` for the public documentation."""

    _calls: Any = None  # the flavor's functional-call adapter (compat.Keras3Calls / legacy.LegacyCalls)

    # -- construction ---------------------------------------------------------------------
    def __init__(
        self,
        inner_model: Any,
        *,
        inner_loss: Callable,
        outer_loss: Callable,
        steps: int,
        truncate: Optional[int] = EstimatorSettings.truncate,
        estimator: str = EstimatorSettings.estimator,
        iterations: Optional[int] = EstimatorSettings.iterations,
        tolerance: Optional[float] = EstimatorSettings.tolerance,
        forget: Optional[float] = EstimatorSettings.forget,
        hyper_model: Any = None,
        hyperparameters: Optional[dict] = None,
        inner_regularizer: Optional[Callable] = None,
        proximal_strength: Optional[float] = None,
        inner_learning_rate: Union[float, Hyperparameter, Callable] = 0.1,
        inner_optimizer: Union[str, Callable] = "sgd",
        inner_init: Union[str, Callable] = "fixed",
        meta_batch: bool = False,
        meta_batch_mode: str = "auto",
        online: bool = False,
        diagnostics_every: Optional[int] = None,
        on_nonfinite: str = "raise",
        seed: int = 0,
        name: Optional[str] = None,
    ):
        """The arguments are documented in `tf_bilevel.BilevelTrainer` and validated, once, by
        `tf_bilevel.keras.spec.TrainerSpec` (held as `trainer.spec`)."""
        super().__init__(name=name or "bilevel_trainer", dtype="float32")
        self._init_bilevel(TrainerSpec(
            self._calls.flavor, inner_model, inner_loss=inner_loss, outer_loss=outer_loss, steps=steps,
            truncate=truncate, estimator=estimator, iterations=iterations, tolerance=tolerance, forget=forget, hyper_model=hyper_model, hyperparameters=hyperparameters,
            inner_regularizer=inner_regularizer, proximal_strength=proximal_strength,
            inner_learning_rate=inner_learning_rate, inner_optimizer=inner_optimizer, inner_init=inner_init,
            meta_batch=meta_batch, meta_batch_mode=meta_batch_mode, online=online,
            diagnostics_every=diagnostics_every, on_nonfinite=on_nonfinite, seed=seed,
        ))

    def _init_bilevel(self, spec: TrainerSpec) -> None:
        self.spec = spec
        # The path the last traced meta-batch step took ("stacked" | "map_fn"); None before.
        self.meta_batch_path: Optional[str] = None
        # The training regime (episodic, warm start, online), chosen once: see regime.py.
        self.regime = regime_for(spec, self._calls)
        self.problem = KerasBilevelProblem(self._calls, spec, self.regime)
        # One settings record for every core estimator the trainer builds (per task and stacked).
        self.estimator_settings = EstimatorSettings.of(spec)
        self._reference_settings = self.estimator_settings.full_rmd() if spec.diagnostics_every is not None else None
        # Validates steps / truncate / estimator / iterations / tolerance now, with the core's messages.
        self._build_estimators()
        self.inner_model = spec.inner_model
        self.hyper_model = spec.hyper_model
        # Plain attributes (Keras tracks the variables through add_weight and does not re-wrap these).
        self._compiled_functions = _Untracked()  # the task functions and the traced helpers, once built
        self._trainer_variables = TrainerVariables(self.add_weight, self._calls.first_replica_aggregation)
        self._update_gate = UpdateGate(spec.on_nonfinite, spec.steps, self._trainer_variables.new)
        self._step_metrics = StepMetrics(
            self._calls.metrics_module(), with_diagnostics=spec.diagnostics_every is not None,
            count_skipped=spec.on_nonfinite == "skip",
        )

    # -- public helpers -----------------------------------------------------------------
    @property
    def meta_step(self) -> Any:
        """The variable counting the hyper-iterations run (checkpointed; seeds the per-task RNG)."""
        return self._trainer_variables.meta_step

    @property
    def hyper_variables(self) -> list:
        """The raw variables ν of λ that the outer optimizer updates (in tf.nest order of
        {"hyper_model": ..., named hyperparameters ...})."""
        self._require_built("hyper_variables")
        return self._trainer_variables.hyper_variables

    @property
    def inner_optimizer_variables(self) -> list:
        """online=True: the variables holding the inner optimizer's state (momentum, Adam
        moments) between hyper-iterations; [] otherwise (each task starts it fresh)."""
        self._require_built("inner_optimizer_variables")
        carried = self.regime.carried.get("opt_state")
        return [] if carried is None else list(carried.variables)

    @property
    def inner_steps_done(self) -> Any:
        """online=True: the variable counting the inner steps applied so far over the run (the
        global step a learning-rate schedule sees next); None otherwise."""
        self._require_built("inner_steps_done")
        return getattr(self.regime, "steps_done", None)

    def hyperparameter_values(self) -> dict:
        """The current values λ = transform(ν) of the named hyperparameters, plus (if used)
        "inner_learning_rate", "centers", "strengths" and "init", as tensors."""
        self._require_built("hyperparameter_values")
        return self._trainer_variables.hyperparameter_values()

    def adapted_inner_model(self, inner_data: Any) -> Any:
        """A copy of `inner_model` trained on one task's inner batch `(x, y[, sample_weight])`
        for `steps` inner steps with the current λ, exactly as `fit` trains it per task.

        With online=False the inner model itself is only each task's starting point w0; this
        gives the trained weights w_T of a task. With online=True the inner model is trained
        in place: use `inner_model` directly."""
        self._require_built("adapted_inner_model")
        if self.regime.trains_inner_model:
            raise ValueError("adapted_inner_model: with online=True the inner model itself is trained; use trainer.inner_model")
        if self.spec.meta_batch:
            raise ValueError("adapted_inner_model takes one task's inner batch (x, y); with meta_batch=True pass task i's tensors")
        batch = data_lib.as_inner_batch(inner_data, "adapted_inner_model(inner_data)")
        trained = self._adapt_function(batch)
        copy = self._calls.clone(self.inner_model)
        for variable, value in zip(self._calls.trainable(copy), trained):
            variable.assign(value)
        return copy

    def _adapt_function(self, batch: Any) -> list:
        functions = self._compiled_functions
        if getattr(functions, "adapt", None) is None:
            def adapt(inputs, task):
                hp, _ = self.problem.hparams(inputs.raw, self._trainer_variables.specs, inputs.hyper_state, task.inner, task.outer)
                seed = self._task_seeds(task, tf.constant(-1, tf.int64))[0]
                return adapted_weights(self.problem, self.hypergradient, inputs, task, seed, hp)

            functions.adapt = _tf_patches.compiled(tf.function(adapt, autograph=False))
        return functions.adapt(self._step_inputs(), data_lib.Task(batch, batch))

    def resumable(self, tasks: Any) -> tf.data.Dataset:
        """A stream of tasks that starts where the last hyper-iteration stopped, for `fit`.

        `tasks` is a `tf.data.Dataset` (one element per hyper-iteration; it is started at
        element `meta_step` with `skip`, which still produces the skipped elements) or a
        function `start -> tf.data.Dataset` (start: an int64 scalar tensor, e.g.
        `lambda start: tf.data.Dataset.range(4 * start, 2**62).map(make_episode).batch(4)` for
        meta-batches of episodes derived from their index, which jumps there directly).
        `meta_step` is read when `fit` starts iterating, after `keras.callbacks.BackupAndRestore`
        restored it, so a restarted run sees exactly the tasks the interrupted run had not
        learned from yet. The stream continues across `fit` calls (it does not restart).
        """
        return data_lib.resumable(tasks, self.meta_step)

    def build_from_spec(self, element_spec: Any) -> None:
        """Builds the models, the hyperparameter variables, the compiled metrics and the outer
        optimizer from a dataset's `element_spec` (done automatically by fit/evaluate/predict)."""
        task = data_lib.parse_task(element_spec)
        if self.spec.meta_batch:
            data_lib.num_tasks(task)
            task = data_lib.unstack_spec(task)
        task = self.regime.check_element(task, self.spec.steps, self.distribute_strategy.num_replicas_in_sync)
        # Variables are created in the strategy the trainer was created under (tf.distribute).
        with self.distribute_strategy.scope():
            x_inner = data_lib.zeros_like_spec(task.inner.x)
            y_pred = self.problem.build_models(x_inner)  # builds both models (inference mode: no side effects)
            if not self._trainer_variables.created:
                self._compiled_functions.input_spec = tf.nest.map_structure(
                    lambda s: tf.TensorSpec([None] + s.shape.as_list()[1:], s.dtype), task.inner.x
                )
                self._create_hyperparameters()
            if self._compiled_for_metrics():
                # Builds the compiled metrics here, eagerly: they update inside a tf.cond in train_step,
                # where variables cannot be created.
                self.compute_metrics(None, data_lib.zeros_like_spec(task.inner.y), y_pred, None)
                self.reset_metrics()
            optimizer = getattr(self, "optimizer", None)
            if optimizer is not None and not self._calls.optimizer_built(optimizer):
                optimizer.build(self.hyper_variables)
        self.built = True

    def build(self, *args, **kwargs) -> None:
        """Keras' shape-based build does not apply (a trainer consumes whole tasks): it would lock
        the layer before the hyperparameter variables exist. Use `build_from_spec`."""
        self._require_built("build")
        self.built = True

    @property
    def export_input_signature(self) -> Optional[list]:
        """[TensorSpec] of the hyper model's inputs (batch axis None), known once built."""
        spec = getattr(self._compiled_functions, "input_spec", None)
        return None if spec is None else list(tf.nest.flatten(spec))

    # -- Keras entry points ----------------------------------------------------------------
    def fit(self, x=None, *args, **kwargs):
        self.build_from_spec(data_lib.element_spec_of(x, "fit(x=...)"))
        kwargs.setdefault("shuffle", False)  # tasks come from a tf.data pipeline (Keras would warn)
        validation = kwargs.get("validation_data")
        if validation is not None:
            data_lib.parse_task(data_lib.element_spec_of(validation, "fit(validation_data=...)"))
        return super().fit(x, *args, **kwargs)

    def evaluate(self, x=None, *args, **kwargs):
        self.build_from_spec(data_lib.element_spec_of(x, "evaluate(x=...)"))
        return super().evaluate(x, *args, **kwargs)

    def predict(self, x=None, *args, **kwargs):
        spec = data_lib.element_spec_of(x, "predict(x=...)")
        self.build_from_spec(data_lib.prediction_task_spec(spec))
        return super().predict(x, *args, **kwargs)

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)
        conventions.refuse_loss_scaling(getattr(self, "optimizer", None))

    def save(self, filepath: Any, *args, **kwargs):
        """Not supported (a clear error): see `tf_bilevel.keras.conventions.SAVE_MESSAGE`."""
        raise NotImplementedError(conventions.SAVE_MESSAGE.format(cls=type(self).__name__, method="save"))

    def get_config(self):
        raise NotImplementedError(conventions.SAVE_MESSAGE.format(cls=type(self).__name__, method="get_config"))

    def make_train_function(self, force: bool = False):
        if self.train_function is not None and not force:
            return self.train_function
        super().make_train_function(force=force)
        compiled = _tf_patches.compiled(self.train_function)

        def train_function(iterator):
            logs = compiled(iterator)
            self._update_gate.raise_if_recorded()
            return logs

        self.train_function = train_function
        return train_function

    # Evaluation and prediction train the inner model in a loop too (episodic regimes).
    def make_test_function(self, force: bool = False):
        if self.test_function is not None and not force:
            return self.test_function
        super().make_test_function(force=force)
        self.test_function = _tf_patches.compiled(self.test_function)
        return self.test_function

    def make_predict_function(self, force: bool = False):
        if self.predict_function is not None and not force:
            return self.predict_function
        super().make_predict_function(force=force)
        self.predict_function = _tf_patches.compiled(self.predict_function)
        return self.predict_function

    @property
    def metrics(self) -> list:
        # The trainer's trackers first (the progress bar's order), then the compiled metrics; not
        # Keras 3's own `loss` tracker, which the trainer's `loss` (= outer_loss) stands for.
        own = self._step_metrics.trackers
        return own + [m for m in super().metrics if all(m is not o for o in own) and m.name != "loss"]

    # -- steps -----------------------------------------------------------------------------
    def train_step(self, data):
        """One hyper-iteration: the element's hypergradient, the (cross-replica) decision to
        apply it, the update of λ and of the trainer's state, then the metrics."""
        task = data_lib.parse_task(data)
        step = _read(self.meta_step)
        with_reference = self._diagnostics_due(step)
        result = self._element_hypergradient(task, step, with_reference)
        apply, finite = self._update_gate.decide(result.nonfinite_step, result.outer_value, result.grads, step)
        self._apply_update(apply, result)
        # Only once this step's element has arrived: a `resumable` stream reads meta_step when it
        # starts, and nothing else orders the increment after the iterator's get_next.
        with tf.control_dependencies([tf.nest.flatten(data)[0]]):
            self.meta_step.assign_add(1)
        return self._update_train_metrics(finite, task, result, with_reference)

    def _element_hypergradient(self, task: data_lib.Task, step: tf.Tensor, with_reference: tf.Tensor) -> TaskResult:
        """One element's hypergradient (the mean over its tasks), f, g, w_T, the hyper model's
        state and the outer predictions (stacked [B, n, ...] with meta_batch), nothing updated."""
        return self._run_tasks(self._compiled_functions.tasks.hypergradient, task, step, with_reference)

    def hypergradient_of(self, data: Any) -> list:
        """The hypergradient d f / dν that `fit` would apply for one dataset element (the mean
        over its tasks with meta_batch=True), at the current λ, with nothing updated: one tensor
        per variable of `hyper_variables`. Compiled like `fit` (compile(jit_compile=...)); the
        per-task seeds are those of the current `meta_step`."""
        data = tf.nest.map_structure(tf.convert_to_tensor, data)
        self.build_from_spec(tf.nest.map_structure(lambda x: tf.TensorSpec(x.shape, x.dtype), data))
        functions = self._compiled_functions
        fn = getattr(functions, "hypergradient_of", None)
        if fn is None:
            def compute(data):
                task = data_lib.parse_task(data)
                return self._element_hypergradient(task, _read(self.meta_step), tf.constant(False)).grads

            fn = functions.hypergradient_of = _tf_patches.compiled(tf.function(
                compute, jit_compile=bool(getattr(self, "jit_compile", False)), autograph=False
            ))
        return list(fn(data))

    def test_step(self, data):
        task = data_lib.parse_task(data)
        evaluation = self._compiled_functions.tasks.evaluation
        value, inner_value, y_pred = self._run_tasks(evaluation, task, tf.constant(-1, tf.int64))
        y_true, y_pred, sample_weight = data_lib.outer_targets(task, y_pred, self.spec.meta_batch)
        self._step_metrics.update_losses(tf.constant(True), value, inner_value)
        logs = self.compute_metrics(None, y_true, y_pred, sample_weight)
        return {k: v for k, v in logs.items() if k not in TRAIN_ONLY}

    def predict_step(self, data):
        return self._adapted_predictions(data)

    def call(self, inputs, training=None):
        """`trainer(((x_inner, y_inner), x_outer))`: predictions on x_outer of the inner model
        trained for T steps on (x_inner, y_inner) with the current λ (stacked over tasks if
        meta_batch)."""
        self._require_built("call")
        return self._adapted_predictions(inputs)

    # -- the steps' parts ---------------------------------------------------------------------
    def _run_tasks(self, fn: TaskFunction, task: data_lib.Task, step: tf.Tensor, *extra: Any) -> Any:
        """`fn` on this element with the seeds of `step`: one task, or the meta-batch on the
        path `_choose_meta_batch_path` picks (see `tasks.run_on_element`)."""
        inputs = self._step_inputs()
        seeds = self._task_seeds(task, step)
        path = self._choose_meta_batch_path(task) if self.spec.meta_batch else None
        return run_on_element(fn, inputs, task, seeds, path, *extra)

    def _diagnostics_due(self, step: tf.Tensor) -> tf.Tensor:
        """Whether this step also computes the full-RMD hypergradient (`diagnostics_every`)."""
        every = self.spec.diagnostics_every
        return tf.equal(step % every, 0) if every is not None else tf.constant(False)

    def _apply_update(self, apply: tf.Tensor, result: TaskResult) -> None:
        """When `apply`: λ (the outer optimizer), the hyper model's BatchNorm statistics and what
        the regime writes back (warm start: the stored inner weights; online: also the inner
        optimizer's state). Otherwise nothing changes."""
        replica = tf.distribute.get_replica_context()
        # Mean over tasks here; the optimizer all-reduces a SUM over replicas: scale by 1/R.
        num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
        scaled = [g / tf.cast(num_replicas, g.dtype) for g in result.grads]
        self._update_gate.apply_if(apply, self.optimizer, scaled, self.hyper_variables)
        self._update_hyper_state(apply, result.hyper_state, replica)
        self.regime.write_back(apply, result.final_params, result.carried, replica)

    def _update_train_metrics(self, finite: tf.Tensor, task: data_lib.Task, result: TaskResult,
                              with_reference: tf.Tensor) -> dict:
        """The step's logs: f, g, ‖hypergradient‖, the diagnostics, the skipped count, the
        compiled metrics (a non-finite step counts for nothing) and the scalar λ."""
        grads, reference = result.grads, result.reference
        if tf.distribute.get_strategy().num_replicas_in_sync > 1:  # the global (all-replica) mean
            replica = tf.distribute.get_replica_context()
            grads = replica.all_reduce(tf.distribute.ReduceOp.MEAN, grads)
            reference = replica.all_reduce(tf.distribute.ReduceOp.MEAN, reference) if reference else reference
        self._step_metrics.update_hypergradient(finite, grads, reference, with_reference)
        self._step_metrics.update_losses(finite, result.outer_value, result.inner_value)
        y_true, y_pred, sample_weight = data_lib.outer_targets(task, result.y_pred, self.spec.meta_batch)
        logs = self._compute_metrics_if(finite, y_true, y_pred, sample_weight)
        return {**logs, **conventions.scalar_hyperparameter_logs(self.hyperparameter_values())}

    def _warn_inexact_second_order(self) -> None:
        """Warns (once, when the trainer builds) about inner-model layers whose second derivatives
        are inexact (per flavor). Only the inner model matters: the hyper model is applied outside
        the inner loop and differentiated once (d_λ f = (∂φ/∂λ)ᵀ d_φ f)."""

    def _adapted_predictions(self, data):
        return self._run_tasks(self._compiled_functions.tasks.prediction, data_lib.prediction_task(data), tf.constant(-1, tf.int64))

    def _choose_meta_batch_path(self, task: data_lib.Task) -> str:
        """"stacked" or "map_fn" for this (traced) meta-batch; recorded in `meta_batch_path`."""
        spec = self.spec
        self.meta_batch_path = choose_meta_batch_path(
            spec.meta_batch_mode, data_lib.num_tasks(task), spec.estimator, spec.builtin_inner_optimizer
        )
        return self.meta_batch_path

    def _create_hyperparameters(self) -> None:
        """The raw variables of λ and the regime's state (called once the models are built)."""
        self.problem.check_models()
        self._warn_inexact_second_order()
        variables = self._trainer_variables
        hyper_model_variables = self._calls.trainable(self.hyper_model) if self.hyper_model is not None else []
        variables.create_hyperparameters(self.problem.hyper_specs(), hyper_model_variables)
        self.regime.create_state(self.problem, variables.new)
        self._build_estimators()  # again: a regime may have become stateful (online BatchNorm) once the models were built
        self._compiled_functions.tasks = task_functions(
            self.problem, variables.specs, self.estimator_settings, variables.raw_names, self._reference_settings
        )
        if not variables.hyper_variables:
            raise ValueError(
                "there are no hyperparameters to learn: pass a hyper_model (with trainable weights), "
                "hyperparameters={name: tf_bilevel.Hyperparameter(...)}, a learned inner_learning_rate, "
                "proximal_strength=..., or inner_init='learned'."
            )
        variables.created = True

    def _build_estimators(self) -> None:
        """`hypergradient` (and the diagnostics' `reference_hypergradient`) from the settings record."""
        self.hypergradient = self.problem.hypergradient(self.estimator_settings)
        self.reference_hypergradient = (
            None if self._reference_settings is None else self.problem.hypergradient(self._reference_settings)
        )

    def _step_inputs(self) -> StepInputs:
        raw = self._trainer_variables.read_raw()
        inner_state = [_read(v) for v in self._calls.non_trainable(self.inner_model)]
        hyper_state = [_read(v) for v in self._calls.non_trainable(self.hyper_model)] if self.hyper_model is not None else []
        stored = [_read(v) for v in self._calls.trainable(self.inner_model)]
        return StepInputs(raw, stored, inner_state, hyper_state, self.regime.read_carried())

    def _task_seeds(self, task: data_lib.Task, step: tf.Tensor) -> tf.Tensor:
        return task_seeds(self.spec.seed, step, task, self.spec.meta_batch)

    def _update_hyper_state(self, apply: tf.Tensor, new_state: list, replica: Any) -> None:
        """The hyper model's BatchNorm statistics: the mean over tasks (and replicas) of the
        values its training-mode calls produced, so that exported layers serve with them."""
        if self.hyper_model is None:
            return
        for variable, value in zip(self._calls.non_trainable(self.hyper_model), new_state):
            if value.dtype.is_floating:
                value = replica.all_reduce(tf.distribute.ReduceOp.MEAN, value)
            variable.assign(tf.where(apply, value, _read(variable)))

    def _require_built(self, what: str) -> None:
        if not self._trainer_variables.created:
            raise ValueError(
                f"BilevelTrainer.{what}: the trainer is not built yet. It builds itself in fit/evaluate/predict; "
                "to build it earlier call trainer.build_from_spec(dataset.element_spec)."
            )

    def _compiled_for_metrics(self) -> bool:
        return bool(getattr(self, "compiled", False) or getattr(self, "_is_compiled", False))

    def _compute_metrics_if(self, finite: tf.Tensor, y_true: Any, y_pred: tf.Tensor, sample_weight: Any) -> dict:
        """The compiled metrics on the outer predictions, left untouched on a non-finite step."""

        def update():
            self.compute_metrics(None, y_true, y_pred, sample_weight)
            return tf.constant(True)

        tf.cond(finite, update, lambda: tf.constant(False))
        return self.get_metrics_result()


class _Untracked:
    """A plain attribute bag: Keras does not track (or re-wrap) what it holds."""

