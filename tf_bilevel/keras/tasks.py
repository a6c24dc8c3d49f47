"""One task's hypergradient (and evaluation), and its mean over a meta-batch of tasks.

Everything here builds graph ops on plain tensors (no variable reads, no assignments), so it
can run inside a Keras `train_step`, under XLA, and per replica under `tf.distribute`.
A meta-batch is mapped with `tf.map_fn` (one compiled loop over tasks): `tf.vectorized_map`
cannot vectorize it (the inner model's weights differ per task, which pfor rejects for
Conv2D, and the TensorArrays of the reverse pass do not compile under XLA).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import tensorflow as tf

from tf_bilevel.keras.data import Task
from tf_bilevel.keras.problem import KerasBilevelProblem, explain_second_order


class StepInputs(NamedTuple):
    """Values read once per step from the trainer's variables (tensors, loop-invariant)."""

    raw: dict  # raw λ values: {"hyper_model": [...], "user": {...}, ...}
    stored_inner: list  # the inner model's stored trainable weights (source of w0)
    inner_state: list  # the inner model's non-trainable values (BatchNorm statistics)
    hyper_state: list  # the hyper model's non-trainable values
    inner_opt_state: Any = None  # online: the inner optimizer's state to continue from


class TaskResult(NamedTuple):
    outer_value: tf.Tensor
    grads: list  # d f / d(raw λ), flat in tf.nest order of StepInputs.raw
    nonfinite_step: tf.Tensor  # the core's marker (-1: all finite)
    y_pred: tf.Tensor  # outer predictions at w_T (for the compiled metrics)
    hyper_state: list  # the hyper model's non-trainable values after this task (BN statistics)
    final_params: list  # w_T
    reference: list  # full-RMD d f / d(raw λ) when requested, else zeros; [] without diagnostics
    final_opt_state: list  # online: the inner optimizer's state after step T, flat; else []
    inner_value: tf.Tensor  # g(w_T, λ) on the inner batch (the `inner_loss` log)


class TaskHypergradient:
    """d_λ f for one task, through the core estimator and the chain rule to the raw variables."""

    def __init__(
        self,
        problem: KerasBilevelProblem,
        specs: dict,
        raw_names: list,
        hypergradient: Any,
        reference: Optional[Any] = None,
    ):
        self.problem = problem
        self.specs = specs
        self.raw_names = raw_names
        self.hypergradient = hypergradient
        self.reference = reference

    def __call__(self, inputs: StepInputs, task: Task, seed: tf.Tensor, with_reference: tf.Tensor) -> TaskResult:
        problem = self.problem
        flat_raw = tf.nest.flatten(inputs.raw)
        with tf.GradientTape(persistent=self.reference is not None) as tape:
            tape.watch(flat_raw)
            raw = tf.nest.pack_sequence_as(inputs.raw, flat_raw)
            hp, hyper_state = problem.hparams(raw, self.specs, inputs.hyper_state, task.inner, task.outer)
        w0 = problem.initial_params(inputs.stored_inner, seed)
        inner_batch = problem.inner_batch(task.inner, inputs.inner_state, seed)
        outer_batch = problem.outer_batch(task.outer, inputs.inner_state, seed)
        try:
            result = self.hypergradient.compute(w0, hp, inner_batch, outer_batch, opt_state=inputs.inner_opt_state)
        except LookupError as err:  # "Gradient explicitly disabled" (fused cross-entropy)
            raise explain_second_order(err) from None
        flat_hp = tf.nest.flatten(hp)
        grads = tape.gradient(flat_hp, flat_raw, output_gradients=tf.nest.flatten(result.hypergrad))
        unreached = [name for name, g in zip(self.raw_names, grads) if g is None]
        if unreached:
            raise ValueError(
                f"{', '.join(unreached)} not reached by the losses: no path leads from it to the outer "
                "loss, so its hypergradient would be silently zero. Use it (in a loss, the regularizer "
                "or the hyper model's output), freeze it (trainable=False) or remove it."
            )
        reference = []
        if self.reference is not None:
            def full_rmd():
                return tf.nest.flatten(self.reference.compute(w0, hp, inner_batch, outer_batch).hypergrad)

            def skipped():
                return [tf.zeros_like(x) for x in flat_hp]

            ref_hp = tf.cond(with_reference, full_rmd, skipped)
            reference = tape.gradient(flat_hp, flat_raw, output_gradients=ref_hp)
        y_pred = problem.predict(result.final_params, hp, outer_batch, "outer")
        final_opt_state = tf.nest.flatten(result.final_opt_state) if inputs.inner_opt_state is not None else []
        inner_value = problem.inner_loss(result.final_params, hp, problem.last_step_batch(inner_batch, self.hypergradient.steps))
        return TaskResult(
            result.outer_value, list(grads), result.nonfinite_step, y_pred, hyper_state,
            list(result.final_params), list(reference), final_opt_state, inner_value,
        )

    def output_signature(self, inputs: StepInputs, task: Task) -> TaskResult:
        """Static specs of a TaskResult, from a forward probe at w0 (its ops are unused, pruned)."""
        value, y_pred, hyper_state, w0 = forward_probe(self.problem, self.specs, inputs, task)
        flat_raw = [_spec(x) for x in tf.nest.flatten(inputs.raw)]
        return TaskResult(
            value, flat_raw, tf.TensorSpec([], tf.int32), y_pred, hyper_state, w0,
            flat_raw if self.reference is not None else [], [], value,
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


class TaskEvaluation:
    """f(w_T, λ), g(w_T, λ) and the outer predictions for one task: T inner steps, no tape (Keras `evaluate`)."""

    def __init__(self, problem: KerasBilevelProblem, specs: dict, hypergradient: Any):
        self.problem = problem
        self.specs = specs
        self.hypergradient = hypergradient

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


class TaskPrediction:
    """Outer predictions of the inner model after T steps on the task's inner batch (no tape)."""

    def __init__(self, problem: KerasBilevelProblem, specs: dict, hypergradient: Any):
        self.problem = problem
        self.specs = specs
        self.hypergradient = hypergradient

    def __call__(self, inputs: StepInputs, task: Task, seed: tf.Tensor) -> tf.Tensor:
        hp, _ = self.problem.hparams(inputs.raw, self.specs, inputs.hyper_state, task.inner, task.outer)
        w_T = adapted_weights(self.problem, self.hypergradient, inputs, task, seed, hp)
        return self.problem.predict(w_T, hp, self.problem.outer_batch(task.outer, inputs.inner_state, seed), "outer")


def adapted_weights(problem: KerasBilevelProblem, hypergradient: Any, inputs: StepInputs, task: Task, seed, hp) -> list:
    """The weights `evaluate`/`predict` use: w_T after T steps on the task's inner batch, or,
    online, the current weights of the model being trained (evaluating must not train it)."""
    if problem.online:
        return list(inputs.stored_inner)
    w0 = problem.initial_params(inputs.stored_inner, seed)
    return hypergradient.solve_uncompiled(w0, hp, problem.inner_batch(task.inner, inputs.inner_state, seed))


def map_tasks(fn: Callable, tasks: Task, seeds: tf.Tensor, signature: Any) -> Any:
    """fn(task, seed) for every task of a meta-batch, stacked: one `tf.while_loop` in the graph."""
    body = tf.autograph.experimental.do_not_convert(lambda args: fn(args[0], args[1]))
    return tf.map_fn(body, (tasks, seeds), fn_output_signature=signature)


def first_task(tasks: Task) -> Task:
    return tf.nest.map_structure(lambda x: x[0], tasks)


def earliest_marker(markers: tf.Tensor) -> tf.Tensor:
    """The earliest non-negative marker over tasks (-1 if none)."""
    big = tf.int32.max
    earliest = tf.reduce_min(tf.where(markers >= 0, markers, big))
    return tf.where(earliest == big, -1, earliest)
