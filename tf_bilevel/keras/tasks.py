"""One task's hypergradient (and evaluation), and its mean over a meta-batch of tasks.

Everything here builds graph ops on plain tensors (no variable reads, no assignments), so it
can run inside a Keras `train_step`, under XLA, and per replica under `tf.distribute`.
A meta-batch of B tasks runs on one of two paths (`meta_batch_path`, chosen when the trainer
traces its step; `BilevelTrainer(meta_batch_mode=...)` forces one):

* "stacked": the meta-batch is ONE bilevel problem (`StackedTasks`) whose inner weights are the
  B tasks' weights (w_1, ..., w_B), with g = Σ_b g_b(w_b, λ) and f = (1/B) Σ_b f_b(w_b, λ).
  The tasks are independent, so ∇_{w_b} g = ∇ g_b (each task takes its own inner steps) and
  the Hessian of g is block-diagonal: every estimator whose recursion is linear per block
  (reverse, checkpointed, forward) returns exactly the mean of the per-task hypergradients.
  One inner loop runs all tasks instead of a loop over tasks around B inner loops (under XLA
  on CPU the nested loop of `tf.map_fn` was 3–15× slower than without XLA for the one-shot
  network). The inner model (and a stateless hyper model) runs once for all tasks when
  `batched.batched_call` supports its layers (Dense/Conv2D as one batched product), else once
  per task on its slice of the stacked weights (any model; unrolled in the graph).
* "map_fn": `tf.map_fn` over tasks (one compiled loop over tasks, B inner loops). Used where
  the stacked problem is not the same computation: "implicit_cg"/"neumann" (their solvers'
  inner products and stopping rules would couple the tasks), a user-defined inner_optimizer
  (its update may couple weights, e.g. global-norm clipping), an unknown (dynamic) or large
  (> MAX_STACKED_TASKS: the graph grows with B) number of tasks.
`tf.vectorized_map` does not apply to either: the inner model's weights differ per task, which
pfor cannot vectorize for Conv2D (it falls back to a loop), and the TensorArrays of the
reverse pass do not compile under XLA.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import tensorflow as tf

from tf_bilevel import nonfinite
from tf_bilevel.keras.data import Task
from tf_bilevel.keras.data import num_tasks as count_tasks
from tf_bilevel.keras.estimator import EstimatorSettings, build_estimator
from tf_bilevel.keras.problem import CoreBatch, KerasBilevelProblem, explain_second_order, fold_seed


class StepInputs(NamedTuple):
    """Values read once per step from the trainer's variables (tensors, loop-invariant)."""

    raw: dict  # raw λ values: {"hyper_model": [...], "user": {...}, ...}
    stored_inner: list  # the inner model's stored trainable weights (source of w0)
    inner_state: list  # the inner model's non-trainable values (BatchNorm statistics)
    hyper_state: list  # the hyper model's non-trainable values
    carried: dict = {}  # the regime's values carried from the last hyper-iteration (e.g. opt_state)


class TaskResult(NamedTuple):
    outer_value: tf.Tensor
    grads: list  # d f / d(raw λ), flat in tf.nest order of StepInputs.raw
    nonfinite_step: tf.Tensor  # the core's marker (-1: all finite)
    y_pred: tf.Tensor  # outer predictions at w_T (for the compiled metrics)
    hyper_state: list  # the hyper model's non-trainable values after this task (BN statistics)
    final_params: list  # w_T
    reference: list  # full-RMD d f / d(raw λ) when requested, else zeros; [] without diagnostics
    carried: dict  # the regime's values to carry on (`Regime.carried_after`); {} on meta-batches
    inner_value: tf.Tensor  # g(w_T, λ) on the inner batch (the `inner_loss` log)


class TaskFunction:
    """One per-task computation of the trainer, with what it needs fixed once the
    hyperparameters exist: built once per trainer (`task_functions`) and reused by every
    traced step. Subclasses define how it runs on one dataset element, for each path of
    `run_on_element`:

    * `__call__(inputs, task, seed, *extra)`: one task;
    * `stacked(stacked, inputs, tasks, seeds, *extra)`: a meta-batch as one `StackedTasks` problem;
    * `output_signature(inputs, task)` and `combine(per_task)`: a meta-batch through
      `tf.map_fn` (static output specs; the per-task results stacked -> the element's result).
    """

    def __init__(
        self,
        problem: KerasBilevelProblem,
        specs: dict,
        settings: EstimatorSettings,
        raw_names: Sequence[str] = (),
        reference: Optional[EstimatorSettings] = None,
    ):
        self.problem = problem
        self.specs = specs  # the Hyperparameter specs of λ's leaves
        self.settings = settings  # the core estimator's settings (one task's and the stacked problem's)
        self.hypergradient = problem.hypergradient(settings)  # the core estimator of one task
        self.raw_names = list(raw_names)  # the raw variables' names in the user's terms (errors)
        # diagnostics: the full-RMD estimator's settings and estimator, else None
        self.reference_settings = reference
        self.reference = None if reference is None else problem.hypergradient(reference)


class TaskHypergradient(TaskFunction):
    """d_λ f for one task, through the core estimator and the chain rule to the raw variables."""

    def __call__(self, inputs: StepInputs, task: Task, seed: tf.Tensor, with_reference: tf.Tensor) -> TaskResult:
        problem, regime = self.problem, self.problem.regime
        w0 = problem.initial_params(inputs.stored_inner, seed)
        inner_batch = problem.inner_batch(task.inner, inputs.inner_state, seed)
        outer_batch = problem.outer_batch(task.outer, inputs.inner_state, seed)
        hp, hyper_state, result, grads, reference = self._hypergradients_of_raw(
            inputs.raw,
            lambda raw: problem.hparams(raw, self.specs, inputs.hyper_state, task.inner, task.outer),
            lambda estimator, hp, **options: estimator.compute(
                w0, hp, inner_batch, outer_batch, **regime.estimator_arguments(inputs.carried, estimator), **options
            ),
            (self.hypergradient, self.reference),
            with_reference,
        )
        # At the final layer state (online BatchNorm: the moving statistics f was computed with).
        y_pred = problem.predict(result.final_params, hp, problem.with_layer_state(outer_batch, result.final_model_state), "outer")
        inner_value = problem.inner_loss(result.final_params, hp, problem.last_step_batch(inner_batch, self.hypergradient.steps))
        return TaskResult(
            result.outer_value, grads, result.nonfinite_step, y_pred, hyper_state,
            list(result.final_params), reference, regime.carried_after(result, inputs.carried), inner_value,
        )

    def stacked(self, stacked: StackedTasks, inputs: StepInputs, tasks: Task, seeds: tf.Tensor,
                with_reference: tf.Tensor) -> TaskResult:
        """The mean hypergradient of a meta-batch through `StackedTasks` (one inner loop for all
        tasks): a TaskResult of means over tasks (y_pred stacked [B, n, ...])."""
        w0 = stacked.initial_params(inputs.stored_inner, seeds)
        inner_batch, outer_batch = stacked.batches(tasks, inputs.inner_state, seeds)
        hp, hyper_states, result, grads, reference = self._hypergradients_of_raw(
            inputs.raw,
            lambda raw: stacked.hparams(raw, self.specs, inputs.hyper_state, tasks),
            lambda estimator, hp, **options: estimator.compute(w0, hp, inner_batch, outer_batch, **options),
            (stacked.hypergradient(self.settings),
             None if self.reference_settings is None else stacked.hypergradient(self.reference_settings)),
            with_reference,
        )
        final = list(result.final_params)
        inner_values = stacked.inner_values(final, hp, inner_batch, self.hypergradient.steps)
        return TaskResult(
            result.outer_value, grads, result.nonfinite_step, stacked.predictions(final, hp, outer_batch),
            mean_hyper_state(hyper_states), [tf.reduce_mean(w, axis=0) for w in final],
            reference, {}, tf.add_n(inner_values) / len(inner_values),
        )

    def _hypergradients_of_raw(self, raw: Any, hparams_of: Callable, compute: Callable, estimators: tuple,
                               with_reference: tf.Tensor) -> tuple:
        """The estimator's d_λ f chained to the raw variables (eq. 6 for λ = hparams_of(raw), then
        the tape of that map), and, when the trainer has a full-RMD reference and `with_reference`
        is true, the reference's the same way (zeros otherwise). `estimators`: (the core
        estimator, the full-RMD reference or None); `compute(estimator, λ, **options)` runs one
        (options: `Hypergradient.compute`'s keywords). Returns
        (λ, hyper_state, the estimator's result, raw grads, raw reference grads or [])."""
        estimator, reference_estimator = estimators
        flat_raw = tf.nest.flatten(raw)
        with tf.GradientTape(persistent=reference_estimator is not None) as tape:
            tape.watch(flat_raw)
            hp, hyper_state = hparams_of(tf.nest.pack_sequence_as(raw, flat_raw))
        try:
            result = compute(estimator, hp)
        except LookupError as err:  # "Gradient explicitly disabled" (fused cross-entropy)
            raise explain_second_order(err) from None
        flat_hp = tf.nest.flatten(hp)
        grads = tape.gradient(flat_hp, flat_raw, output_gradients=tf.nest.flatten(result.hypergrad))
        self.check_reached(grads)
        reference = []
        if reference_estimator is not None:
            def full_rmd():
                # The same problem and λ as the estimator above: its reachability probe covers this one.
                return tf.nest.flatten(compute(reference_estimator, hp, check_reached=False).hypergrad)

            def skipped():
                return [tf.zeros_like(x) for x in flat_hp]

            # A constant `with_reference` (hypergradient_of: False) picks its branch now, so the
            # full-RMD estimator is not traced for nothing.
            requested = tf.get_static_value(with_reference)
            chosen = tf.cond(with_reference, full_rmd, skipped) if requested is None else (full_rmd() if requested else skipped())
            reference = tape.gradient(flat_hp, flat_raw, output_gradients=chosen)
        return hp, hyper_state, result, list(grads), list(reference)

    def combine(self, results: TaskResult) -> TaskResult:
        """The per-task results of `tf.map_fn` (stacked on axis 0) -> their means over tasks
        (y_pred stays stacked [B, n, ...]), as `stacked` returns them."""
        return TaskResult(
            tf.reduce_mean(results.outer_value),
            [tf.reduce_mean(g, axis=0) for g in results.grads],
            earliest_marker(results.nonfinite_step),
            results.y_pred,
            [_mean_over_tasks(x) for x in results.hyper_state],
            [tf.reduce_mean(w, axis=0) for w in results.final_params],
            [tf.reduce_mean(g, axis=0) for g in results.reference],
            {},
            tf.reduce_mean(results.inner_value),
        )

    def check_reached(self, grads: list) -> None:
        unreached = [name for name, g in zip(self.raw_names, grads) if g is None]
        if unreached:
            raise ValueError(
                f"{', '.join(unreached)} not reached by the losses: no path leads from it to the outer "
                "loss, so its hypergradient would be silently zero. Use it (in a loss, the regularizer "
                "or the hyper model's output), freeze it (trainable=False) or remove it."
            )

    def output_signature(self, inputs: StepInputs, task: Task) -> TaskResult:
        """Static specs of a TaskResult, from a forward probe at w0 (its ops are unused, pruned)."""
        value, y_pred, hyper_state, w0 = forward_probe(self.problem, self.specs, inputs, task)
        flat_raw = [_spec(x) for x in tf.nest.flatten(inputs.raw)]
        return TaskResult(
            value, flat_raw, tf.TensorSpec([], tf.int32), y_pred, hyper_state, w0,
            flat_raw if self.reference is not None else [], {}, value,
        )


def _spec(x: tf.Tensor) -> tf.TensorSpec:
    return tf.TensorSpec(x.shape, x.dtype)


def forward_probe(problem: KerasBilevelProblem, specs: dict, inputs: StepInputs, task: Task, with_loss: bool = True):
    """Specs of (f, outer predictions, hyper state, w0) for one task, from one forward pass at
    w0: `tf.map_fn` needs static output specs, and the inner loop need not run to know them.
    The probe's ops have no consumer and are pruned from the compiled step. `with_loss=False`
    (predict: the outer labels are absent) skips f and returns None for its spec."""
    hp, hyper_state = problem.hparams(inputs.raw, specs, inputs.hyper_state, task.inner, task.outer)
    seed = tf.zeros([2], tf.int64)
    outer_batch = problem.outer_batch(task.outer, inputs.inner_state, seed)
    w0 = problem.initial_params(inputs.stored_inner, seed)
    y_pred = problem.predict(w0, hp, outer_batch, "outer")
    value = _spec(problem.outer_loss(w0, hp, outer_batch)) if with_loss else None
    return value, _spec(y_pred), [_spec(x) for x in hyper_state], [_spec(x) for x in w0]


class TaskEvaluation(TaskFunction):
    """f(w_T, λ), g(w_T, λ) and the outer predictions for one task: T inner steps, no tape (Keras `evaluate`)."""

    def __call__(self, inputs: StepInputs, task: Task, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        hp, _ = self.problem.hparams(inputs.raw, self.specs, inputs.hyper_state, task.inner, task.outer)
        w_T = adapted_weights(self.problem, self.hypergradient, inputs, task, seed, hp)
        inner_batch = self.problem.inner_batch(task.inner, inputs.inner_state, seed)
        outer_batch = self.problem.outer_batch(task.outer, inputs.inner_state, seed)
        return (
            self.problem.outer_loss(w_T, hp, outer_batch),
            self.problem.inner_loss(w_T, hp, self.problem.last_step_batch(inner_batch, self.hypergradient.steps)),
            self.problem.predict(w_T, hp, outer_batch, "outer"),
        )

    def stacked(self, stacked: StackedTasks, inputs: StepInputs, tasks: Task, seeds: tf.Tensor):
        """(mean f, mean g, stacked outer predictions) of a meta-batch."""
        hp, _ = stacked.hparams(inputs.raw, self.specs, inputs.hyper_state, tasks)
        w_T = stacked_adapted(stacked, self.settings, inputs, tasks, seeds, hp)
        inner_batch, outer_batch = stacked.batches(tasks, inputs.inner_state, seeds)
        values = stacked.outer_values(w_T, hp, outer_batch)
        inner_values = stacked.inner_values(w_T, hp, inner_batch, self.hypergradient.steps)
        return (tf.add_n(values) / len(values), tf.add_n(inner_values) / len(inner_values),
                stacked.predictions(w_T, hp, outer_batch))

    def output_signature(self, inputs: StepInputs, task: Task) -> tuple:
        value, y_pred, _, _ = forward_probe(self.problem, self.specs, inputs, task)
        return value, value, y_pred

    def combine(self, results: tuple) -> tuple:
        values, inner_values, y_preds = results
        return tf.reduce_mean(values), tf.reduce_mean(inner_values), y_preds


class TaskPrediction(TaskFunction):
    """Outer predictions of the inner model after T steps on the task's inner batch (no tape)."""

    def __call__(self, inputs: StepInputs, task: Task, seed: tf.Tensor) -> tf.Tensor:
        hp, _ = self.problem.hparams(inputs.raw, self.specs, inputs.hyper_state, task.inner, task.outer)
        w_T = adapted_weights(self.problem, self.hypergradient, inputs, task, seed, hp)
        return self.problem.predict(w_T, hp, self.problem.outer_batch(task.outer, inputs.inner_state, seed), "outer")

    def stacked(self, stacked: StackedTasks, inputs: StepInputs, tasks: Task, seeds: tf.Tensor) -> tf.Tensor:
        """The outer predictions of every task, stacked [B, n, ...]."""
        hp, _ = stacked.hparams(inputs.raw, self.specs, inputs.hyper_state, tasks)
        w_T = stacked_adapted(stacked, self.settings, inputs, tasks, seeds, hp)
        _, outer_batch = stacked.batches(tasks, inputs.inner_state, seeds)
        return stacked.predictions(w_T, hp, outer_batch)

    def output_signature(self, inputs: StepInputs, task: Task) -> tf.TensorSpec:
        return forward_probe(self.problem, self.specs, inputs, task, with_loss=False)[1]

    def combine(self, results: tf.Tensor) -> tf.Tensor:
        return results


class TaskFunctions(NamedTuple):
    """The trainer's three task functions (fit, evaluate, predict), sharing one setup."""

    hypergradient: TaskHypergradient
    evaluation: TaskEvaluation
    prediction: TaskPrediction


def task_functions(problem: KerasBilevelProblem, specs: dict, settings: EstimatorSettings, raw_names: Sequence[str],
                   reference: Optional[EstimatorSettings] = None) -> TaskFunctions:
    """Built once, when the trainer creates its hyperparameters (`specs`, `raw_names` are known
    then). `reference`: the settings of the diagnostics' full-RMD estimator, or None."""
    return TaskFunctions(
        TaskHypergradient(problem, specs, settings, raw_names, reference),
        TaskEvaluation(problem, specs, settings),
        TaskPrediction(problem, specs, settings),
    )


def task_seeds(seed: int, step: tf.Tensor, task: Task, meta_batch: bool) -> tf.Tensor:
    """The stateless seeds of an element's tasks at hyper-iteration `step`, one per task:
    fold_in(fold_in((seed, 0), step), global task index) (the index across replicas)."""
    leaf = tf.nest.flatten(task.inner)[0]
    count = (leaf.shape[0] or tf.shape(leaf)[0]) if meta_batch else 1
    replica = tf.distribute.get_replica_context()
    offset = tf.cast(replica.replica_id_in_sync_group, tf.int64) * tf.cast(count, tf.int64)
    step_seed = tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), tf.cast(step, tf.int64), alg="philox")
    indices = offset + tf.range(tf.cast(count, tf.int64), dtype=tf.int64)
    return tf.map_fn(
        lambda i: tf.cast(tf.random.experimental.stateless_fold_in(step_seed, i, alg="philox"), tf.int64),
        indices,
        fn_output_signature=tf.TensorSpec([2], tf.int64),
    )


def run_on_element(fn: TaskFunction, inputs: StepInputs, tasks: Task, seeds: tf.Tensor, path: Optional[str],
                   *extra: Any) -> Any:
    """`fn` on one dataset element: one task (`path` None: `seeds[0]`), or a meta-batch as one
    stacked problem (`path` "stacked") or mapped over its tasks ("map_fn"), its results combined
    (means over tasks, outer predictions stacked [B, n, ...]). `extra`: `fn`'s further arguments."""
    if path is None:
        return fn(inputs, tasks, seeds[0], *extra)
    if path == "stacked":
        return fn.stacked(stacked_tasks(fn.problem, count_tasks(tasks)), inputs, tasks, seeds, *extra)
    signature = fn.output_signature(inputs, first_task(tasks))
    return fn.combine(map_tasks(lambda t, s: fn(inputs, t, s, *extra), tasks, seeds, signature))


def adapted_weights(problem: KerasBilevelProblem, hypergradient: Any, inputs: StepInputs, task: Task, seed, hp) -> list:
    """The weights `evaluate`/`predict` use, as the regime decides: w_T after T steps on the
    task's inner batch, or (online) the current weights of the model being trained."""

    def solve():
        w0 = problem.initial_params(inputs.stored_inner, seed)
        return hypergradient.solve_uncompiled(w0, hp, problem.inner_batch(task.inner, inputs.inner_state, seed))

    return problem.regime.evaluation_weights(solve, inputs.stored_inner)


def map_tasks(fn: Callable, tasks: Task, seeds: tf.Tensor, signature: Any) -> Any:
    """fn(task, seed) for every task of a meta-batch, stacked: one `tf.while_loop` in the graph."""
    body = tf.autograph.experimental.do_not_convert(lambda args: fn(args[0], args[1]))
    return tf.map_fn(body, (tasks, seeds), fn_output_signature=signature)


def _mean_over_tasks(x: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(x, axis=0) if x.dtype.is_floating else x[0]


def first_task(tasks: Task) -> Task:
    return tf.nest.map_structure(lambda x: x[0], tasks)


def earliest_marker(markers: tf.Tensor) -> tf.Tensor:
    """The earliest non-negative marker over tasks (-1 if none)."""
    return nonfinite.earliest_of(markers)


# -- the meta-batch as one stacked bilevel problem ---------------------------------------------

MAX_STACKED_TASKS = 64  # "auto" above this: the stacked graph (B model calls per step) grows with B
PER_TASK_ESTIMATORS = ("reverse", "checkpointed", "forward")  # linear recursions per block of w


def choose_meta_batch_path(mode: str, num_tasks: Optional[int], estimator: str, builtin_optimizer: bool) -> str:
    """"stacked" or "map_fn" for `meta_batch_mode` (see the module docstring); a forced
    "stacked" that would not compute the per-task mean is an error naming the reason."""
    reasons = []
    if estimator not in PER_TASK_ESTIMATORS:
        reasons.append(f"estimator={estimator!r} (its solver's inner products would couple the tasks)")
    if num_tasks is None:
        reasons.append("the number of tasks per element is not static (batch with drop_remainder=True)")
    if mode == "map_fn":
        return "map_fn"
    if mode == "stacked":
        if reasons:
            raise ValueError(
                f"meta_batch_mode='stacked' does not apply: {'; '.join(reasons)}. Use meta_batch_mode='auto' "
                "(it falls back to tf.map_fn there) or 'map_fn'."
            )
        return "stacked"
    if reasons or not builtin_optimizer or num_tasks > MAX_STACKED_TASKS:
        return "map_fn"
    return "stacked"


def task_slice(tasks: Task, b: int) -> Task:
    return tf.nest.map_structure(lambda x: x[b], tasks)


def stacked_tasks(problem: KerasBilevelProblem, num_tasks: int) -> StackedTasks:
    """The `StackedTasks` of `problem` for `num_tasks`, built once: the traces of fit, evaluate,
    predict and `hypergradient_of` share its estimators (and their step profiles)."""
    if num_tasks not in problem.stacked_by_count:
        problem.stacked_by_count[num_tasks] = StackedTasks(problem, num_tasks)
    return problem.stacked_by_count[num_tasks]


class StackedTasks:
    """B tasks as one problem for the core: params = the inner weights stacked [B, ...], hp =
    λ's shared leaves + the hyper-model features stacked [B, n, ...], one CoreBatch of the
    stacked data with seeds [B, 2]; g = Σ_b g_b(w_b) (so each task's inner step is its own),
    f = (1/B) Σ_b f_b(w_b) (so the hypergradient is the mean over tasks).

    The inner model runs once for all tasks (`batched.batched_call`: one batched product per
    Dense/Conv2D layer) when it supports that (`self.batched`), else once per task on its
    slice of the weights (any model: Dropout, BatchNormalization, layer losses, ...)."""

    def __init__(self, problem: KerasBilevelProblem, num_tasks: int):
        self.problem = problem
        self.num_tasks = num_tasks
        self.batched = _batchable(problem, problem.inner_model)
        self.batched_hyper = problem.hyper_model is not None and _batchable(problem, problem.hyper_model)
        self._built: dict = {}
        self._step_profiles: dict = {}  # shared by the estimators of `hypergradient` (one inner step)

    # -- λ and the data of B tasks ------------------------------------------------------------
    def hparams(self, raw: dict, specs: dict, hyper_state: list, tasks: Task) -> tuple[dict, list]:
        """The stacked hp and, per task, the hyper model's state after its calls on that task.
        A stateless hyper model that `batched_call` supports runs once for all tasks (its
        weights broadcast over tasks), else once per task."""
        problem = self.problem
        if problem.hyper_model is not None and self.batched_hyper:
            from tf_bilevel.keras.batched import batched_call

            hp, _ = problem.hparams(raw, specs, hyper_state, None, None, with_features=False)
            weights = [tf.broadcast_to(w, [self.num_tasks] + w.shape.as_list()) for w in raw["hyper_model"]]
            hp["features"] = {which: batched_call(problem.hyper_model, weights, batch.x)
                              for which, batch in (("inner", tasks.inner), ("outer", tasks.outer))}
            return hp, [list(hyper_state)] * self.num_tasks
        per_task = [self.problem.hparams(raw, specs, hyper_state, t.inner, t.outer) for t in self._tasks(tasks)]
        hp = dict(per_task[0][0])  # the shared leaves (the same values in every task)
        if self.problem.hyper_model is not None:
            hp["features"] = tf.nest.map_structure(lambda *f: tf.stack(f), *[h["features"] for h, _ in per_task])
        return hp, [state for _, state in per_task]

    def task_hp(self, hp: dict, b: int) -> dict:
        if self.problem.hyper_model is None:
            return hp
        return {**hp, "features": tf.nest.map_structure(lambda f: f[b], hp["features"])}

    def _tasks(self, tasks: Task) -> list:
        return [task_slice(tasks, b) for b in range(self.num_tasks)]

    def batches(self, tasks: Task, inner_state: list, seeds: tf.Tensor) -> tuple[CoreBatch, CoreBatch]:
        """The stacked inner and outer batches (the outer seeds folded as in `outer_batch`)."""
        outer_seeds = tf.stack([self.problem.outer_batch(tasks.outer, inner_state, seeds[b]).seed for b in range(self.num_tasks)])
        return CoreBatch(tasks.inner, inner_state, seeds), CoreBatch(tasks.outer, inner_state, outer_seeds)

    def task_batch(self, batch: CoreBatch, b: int) -> CoreBatch:
        return CoreBatch(tf.nest.map_structure(lambda x: x[b], batch.data), batch.inner_state, batch.seed[b])

    def initial_params(self, stored: list, seeds: tf.Tensor) -> list:
        per_task = [self.problem.initial_params(stored, seeds[b]) for b in range(self.num_tasks)]
        return [tf.stack(ws) for ws in zip(*per_task)]

    @staticmethod
    def task_params(params: list, b: int) -> list:
        return [w[b] for w in params]

    # -- the core's g, f, Ξ0 and per-step batches -------------------------------------------------
    def inner_loss(self, params: list, hp: dict, batch: CoreBatch) -> tf.Tensor:
        if not self.batched:
            return tf.add_n([
                self.problem.inner_loss(self.task_params(params, b), self.task_hp(hp, b), self.task_batch(batch, b))
                for b in range(self.num_tasks)
            ])
        problem = self.problem
        y_pred = self._batched_predictions(params, hp, batch, "inner")
        loss = tf.add_n(self._user_losses(problem.inner_loss_fn, "inner_loss", batch, y_pred, hp))
        if problem.inner_regularizer is not None:
            penalties = [tf.convert_to_tensor(problem.inner_regularizer(self.task_params(params, b), hp["user"]))
                         for b in range(self.num_tasks)]
            if penalties[0].shape.rank != 0:
                raise ValueError(f"inner_regularizer must return a scalar, got shape {penalties[0].shape}")
            loss = loss + tf.cast(tf.add_n(penalties), loss.dtype)
        if problem.proximal_strength is not None:  # Σ_b Σ_j ρ_j ‖w_j,b − c_j‖²: c_j broadcast over tasks
            loss = loss + tf.add_n([
                tf.cast(hp["strengths"][j], loss.dtype) * tf.cast(tf.reduce_sum(tf.square(w - c)), loss.dtype)
                for j, (w, c) in enumerate(zip(params, hp["centers"]))
            ])
        return loss

    def outer_loss(self, params: list, hp: dict, batch: CoreBatch) -> tf.Tensor:
        return tf.add_n(self.outer_values(params, hp, batch)) / self.num_tasks

    def outer_values(self, params: list, hp: dict, batch: CoreBatch) -> list:
        if self.batched:
            y_pred = self._batched_predictions(params, hp, batch, "outer")
            return self._user_losses(self.problem.outer_loss_fn, "outer_loss", batch, y_pred, hp)
        return [
            self.problem.outer_loss(self.task_params(params, b), self.task_hp(hp, b), self.task_batch(batch, b))
            for b in range(self.num_tasks)
        ]

    def inner_values(self, params: list, hp: dict, batch: CoreBatch, steps: int) -> list:
        """g_b(w_b) on each task's last-step batch (the `inner_loss` log)."""
        last = self.batch_at_step(batch, tf.constant(steps - 1))
        return [
            self.problem.inner_loss(self.task_params(params, b), self.task_hp(hp, b), self.task_batch(last, b))
            for b in range(self.num_tasks)
        ]

    def predictions(self, params: list, hp: dict, batch: CoreBatch) -> tf.Tensor:
        """[B, n, ...]: each task's outer predictions at its weights."""
        if self.batched:
            return self._batched_predictions(params, hp, batch, "outer")
        return tf.stack([
            self.problem.predict(self.task_params(params, b), self.task_hp(hp, b), self.task_batch(batch, b), "outer")
            for b in range(self.num_tasks)
        ])

    def _batched_predictions(self, params: list, hp: dict, batch: CoreBatch, which: str) -> tf.Tensor:
        from tf_bilevel.keras.batched import batched_call

        x = hp["features"][which] if self.problem.hyper_model is not None else batch.data.x
        return batched_call(self.problem.inner_model, params, x)

    def _user_losses(self, fn: Callable, role: str, batch: CoreBatch, y_pred: tf.Tensor, hp: dict) -> list:
        return [
            self.problem._user_loss(fn, role, self.task_batch(batch, b).data, y_pred[b], hp["user"])
            for b in range(self.num_tasks)
        ]

    def batch_at_step(self, batch: CoreBatch, step: tf.Tensor) -> CoreBatch:
        """Every task's seed folded with the step (Dropout: a fresh mask per step and task)."""
        seeds = tf.stack([fold_seed(batch.seed[b], step) for b in range(self.num_tasks)])
        return CoreBatch(batch.data, batch.inner_state, seeds)

    def init_params(self) -> Optional[Callable]:
        single = self.problem.init_params()
        if single is None:
            return None
        return lambda params, hp: [tf.stack([w] * self.num_tasks) for w in single(None, hp)]

    def hypergradient(self, settings: EstimatorSettings) -> Any:
        """The core estimator of the stacked problem with `settings` (the trainer's, as for one
        task: `estimator.build_estimator`), built once per settings."""
        if settings not in self._built:
            self._built[settings] = build_estimator(
                settings, self.inner_loss, self.outer_loss, inner_optimizer=self.problem.inner_optimizer,
                init_params=self.init_params(), per_step_batches=self.batch_at_step,
            )
            self._built[settings].step_profiles = self._step_profiles
        return self._built[settings]


def _batchable(problem: KerasBilevelProblem, model: Any) -> bool:
    """Whether `model` runs batched over tasks (Keras 3, supported layers, no state)."""
    from tf_bilevel.keras.batched import NotBatchable, check_batchable

    if problem.calls.flavor != "keras3":
        return False
    try:
        check_batchable(model)
    except NotBatchable:
        return False
    return True


def mean_hyper_state(states: list) -> list:
    """Per-task hyper-model states [[v_1..]_b] -> their mean (non-float values: task 0's)."""
    return [tf.add_n(list(vs)) / len(vs) if vs[0].dtype.is_floating else vs[0] for vs in zip(*states)]


def stacked_adapted(stacked: StackedTasks, settings: EstimatorSettings, inputs: StepInputs, tasks: Task, seeds, hp) -> list:
    """w_T of every task from one stacked inner loop (no tape)."""
    inner_batch, _ = stacked.batches(tasks, inputs.inner_state, seeds)
    w0 = stacked.initial_params(inputs.stored_inner, seeds)
    return list(stacked.hypergradient(settings).solve_uncompiled(w0, hp, inner_batch))
