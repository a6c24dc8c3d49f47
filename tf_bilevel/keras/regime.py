"""The training regime of a `BilevelTrainer`, chosen once (`regime_for`) when it is built.

A regime answers what differs between episodic meta-learning, warm-started tasks and
online training, so that the trainer and its task functions ask it instead of branching:

* `check_element`: the structure a dataset element must have (and the spec of the data
  one inner step sees);
* `check_models`: layers the regime cannot train;
* `initial_params` / `init_params` / `hyper_specs`: w0 of a task (before and as Ξ0(λ));
* `data_at_step`: the data inner step t sees; `global_step`: the step a learning-rate
  schedule sees (online: of the whole run);
* `outer_training`: whether f calls the inner model in training mode;
* `create_state` / `read_carried` / `estimator_arguments` / `carried_after`: values carried
  from one hyper-iteration to the next (`CarriedState`, in trainer variables);
* `write_back`: what an applied update stores besides λ;
* `evaluation_weights`: the weights `evaluate`/`predict` score.

The regimes:

* `Episodic(inner_init)`: every task starts from w0 given by `inner_init` ("fixed": the
  stored weights, "random": a seeded redraw, "learned": Ξ0(λ), or a function); nothing but λ
  is written back.
* `WarmStart`: every task starts from the stored weights; the mean w_T of a meta-batch is
  stored for the next hyper-iteration.
* `Online`: one model trained on one stream: the element's inner part stacks T minibatches
  (inner step t uses minibatch t), f is a validation loss in inference mode, and w_T, the
  inner optimizer's state and the inner model's layer state (BatchNorm's moving statistics)
  carry over to the next hyper-iteration (written back to the inner model and to trainer
  variables, which checkpoints hold), as does the count of inner steps run (the step of a
  learning-rate schedule).
* `OnlineForward`: `Online` with estimator="forward": forward mode's tangents Z carry over
  too (real-time hypergradients through the whole run; `forget` = μ discounts them).

A carried value named X is passed to the core estimator as the keyword argument X and
continues from the field `final_X` of its result (`opt_state` / `final_opt_state`). A regime
that carries more (e.g. forward-mode tangents) lists one more `CarriedState` in
`create_state`; nothing else in the trainer changes.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np
import tensorflow as tf

from tf_bilevel._autograph import leave_unparsable_unconverted
from tf_bilevel.api import DEFAULT_MEMORY_BUDGET
from tf_bilevel.dynamics.transition import InnerState
from tf_bilevel.estimators.forward import check_tangent_memory, zero_tangents
from tf_bilevel.keras import data as data_lib
from tf_bilevel.keras.reparam import Hyperparameter

# (name, initial value) -> a new non-trainable trainer variable (checkpointed with the trainer).
AddVariable = Callable[[str, np.ndarray], Any]


def _read(variable: Any) -> tf.Tensor:
    return tf.convert_to_tensor(variable)


class CarriedState:
    """A structure of tensors held in variables between hyper-iterations: read at every step,
    written back only when the step's update is applied."""

    def __init__(self, structure: Any, variables: list):
        self.structure = structure  # tf.nest structure of the values (leaves: anything)
        self.variables = list(variables)

    @classmethod
    def create(cls, name: str, initial: Any, add_variable: AddVariable) -> "CarriedState":
        """New trainer variables `name_0`, `name_1`, … holding the leaves of `initial`."""
        leaves = tf.nest.flatten(initial)
        return cls(initial, [add_variable(f"{name}_{i}", np.asarray(x)) for i, x in enumerate(leaves)])

    def read(self) -> Any:
        return tf.nest.pack_sequence_as(self.structure, [_read(v) for v in self.variables])

    def write(self, apply: tf.Tensor, values: Any) -> None:
        for variable, value in zip(self.variables, tf.nest.flatten(values)):
            variable.assign(tf.where(apply, tf.cast(value, variable.dtype), _read(variable)))


class Regime:
    """The defaults: a fresh inner problem per task, on the whole inner batch at every step,
    with nothing carried over (see the module docstring for the methods' roles)."""

    name = "regime"
    trains_inner_model = False  # True: the inner model itself is trained (no per-task copy)

    def __init__(self, calls: Any, inner_model: Any):
        self.calls = calls
        self.inner_model = inner_model
        self.carried: dict = {}  # estimator argument name -> CarriedState
        # Stateful regimes: the core carries the inner model's layer state (its non-trainable
        # values at these positions) through the inner steps (`tfb.hypergradient_fn(stateful=True)`).
        self.stateful = False
        self.layer_state_positions: list = []

    # -- the element and the models ------------------------------------------------------
    def check_element(self, task: data_lib.Task, steps: int, num_replicas: int) -> data_lib.Task:
        """Checks one task's spec; returns the spec of the data one inner step sees."""
        return task

    def check_models(self, problem: Any) -> None:
        """Called once the models are built."""

    # -- w0 ------------------------------------------------------------------------------
    def hyper_specs(self, inner_weights: list) -> dict:
        """Hyperparameter specs the regime adds to λ (a learned initialization)."""
        return {}

    def init_params(self) -> Optional[Callable]:
        """Ξ0 for the core (B0 term of Eq. 5), or None."""
        return None

    def initial_params(self, stored: list, seed: tf.Tensor) -> list:
        """w0 of one task before Ξ0: the stored weights."""
        return list(stored)

    # -- one inner problem --------------------------------------------------------------
    outer_training = True  # f calls the inner model in training mode (per-task statistics)

    def data_at_step(self, data: Any, step: tf.Tensor) -> Any:
        return data

    def global_step(self, step: tf.Tensor) -> tf.Tensor:
        """The step a learning-rate schedule sees for inner step `step` of this call: the
        task's own step (every task starts at 0)."""
        return step

    # -- state carried across hyper-iterations ---------------------------------------------
    def create_state(self, problem: Any, add_variable: AddVariable) -> None:
        """Creates `self.carried` (once, when the trainer builds its hyperparameters)."""

    @property
    def variables(self) -> list:
        return [v for state in self.carried.values() for v in state.variables]

    def read_carried(self) -> dict:
        return {name: state.read() for name, state in self.carried.items()}

    def estimator_arguments(self, carried: dict, estimator: Any) -> dict:
        """Keyword arguments of the core `estimator`'s `compute` (the carried values)."""
        return dict(carried)

    def carried_after(self, result: Any, carried: dict) -> dict:
        """The values to carry on, from the estimator's result (`final_<name>`)."""
        return {name: getattr(result, f"final_{name}") for name in carried}

    # -- after an update --------------------------------------------------------------------
    def write_back(self, apply: tf.Tensor, final_params: list, carried: dict, replica: Any) -> None:
        """Stores what the hyper-iteration leaves behind, when `apply`; λ is the trainer's."""
        for name, values in carried.items():
            self.carried[name].write(apply, values)

    def store_inner_weights(self, apply: tf.Tensor, final_params: list, replica: Any) -> None:
        """The inner model's variables ← w_T (the mean over tasks and replicas)."""
        for variable, value in zip(self.calls.trainable(self.inner_model), final_params):
            value = replica.all_reduce(tf.distribute.ReduceOp.MEAN, value)
            variable.assign(tf.where(apply, value, _read(variable)))

    # -- evaluate / predict ---------------------------------------------------------------------
    def evaluation_weights(self, solve: Callable[[], list], stored: list) -> list:
        """The weights scored by evaluate/predict: w_T of T inner steps on the task (`solve()`)."""
        return solve()


class Episodic(Regime):
    """Meta-learning / per-task HPO: every task starts from w0 given by `inner_init`."""

    name = "episodic"

    def __init__(self, calls: Any, inner_model: Any, inner_init: Any):
        super().__init__(calls, inner_model)
        self.inner_init = inner_init  # "fixed" | "random" | "learned" | (seed, stored) -> weights

    def hyper_specs(self, inner_weights: list) -> dict:
        if self.inner_init != "learned":
            return {}
        return {"init": [Hyperparameter(w, dtype=w.dtype.name) for w in inner_weights]}

    def init_params(self) -> Optional[Callable]:
        if self.inner_init == "learned":
            return lambda params, hp: list(hp["init"])
        return None

    def initial_params(self, stored: list, seed: tf.Tensor) -> list:
        """w0 of one task (before Ξ0): the stored weights, or a deterministic redraw."""
        if self.inner_init == "random":
            return glorot_redraw(stored, seed)
        if callable(self.inner_init):
            w0 = list(self.inner_init(seed, list(stored)))
            if len(w0) != len(stored):
                raise ValueError(f"inner_init returned {len(w0)} tensors for {len(stored)} inner weights")
            return [tf.cast(tf.reshape(a, b.shape), b.dtype) for a, b in zip(w0, stored)]
        return list(stored)


class WarmStart(Regime):
    """inner_init="warm_start": every task starts from the stored weights, and the mean w_T of
    the meta-batch is stored for the next hyper-iteration."""

    name = "warm_start"

    def write_back(self, apply: tf.Tensor, final_params: list, carried: dict, replica: Any) -> None:
        self.store_inner_weights(apply, final_params, replica)
        super().write_back(apply, final_params, carried, replica)


class Online(Regime):
    """online=True: tune while you train. The inner model is trained in place on a stream of
    minibatches; w_T, the inner optimizer's state and the inner model's layer state carry over.

    Layer state (BatchNorm's moving statistics; not the RNG seeds of Dropout, which are drawn
    per step from the trainer's seed) is updated by every inner step as Keras training updates
    it (training-mode call, the layer's momentum), read by f in inference mode, and held
    between hyper-iterations by the inner model's own variables."""

    name = "online"
    trains_inner_model = True
    outer_training = False  # f is a validation loss of the model being trained: inference mode, as Keras validates
    STATEFUL_ESTIMATORS = ("reverse", "checkpointed", "forward")

    def __init__(self, calls: Any, inner_model: Any, estimator: str, steps: int):
        super().__init__(calls, inner_model)
        self.estimator = estimator
        self.steps = steps
        self.steps_done: Any = None  # trainer variable: inner steps applied so far (created with the state)

    def check_element(self, task: data_lib.Task, steps: int, num_replicas: int) -> data_lib.Task:
        if num_replicas > 1:
            raise ValueError(
                "online=True runs under a single replica for now: the per-replica split of an element "
                "would cut its step axis. Create the trainer outside the multi-device strategy."
            )
        data_lib.check_online_spec(task, steps)
        return data_lib.Task(data_lib.unstack_spec(task.inner), task.outer)

    def check_models(self, problem: Any) -> None:
        positions = [
            i for i in range(len(self.calls.non_trainable(self.inner_model))) if i not in problem.seed_positions
        ]
        if positions and self.estimator not in self.STATEFUL_ESTIMATORS:
            owners = self.calls.variable_owners(self.inner_model, positions)
            raise ValueError(
                f"online=True: inner_model layer(s) {owners} keep non-trainable state (e.g. "
                "BatchNormalization's moving statistics), which online training carries through the "
                f"inner steps with estimator='reverse', 'checkpointed' or 'forward' only, not estimator={self.estimator!r}. "
                "Use one of those (truncate=K for K-RMD), or a layer without such state "
                "(LayerNormalization, GroupNormalization)."
            )
        self.layer_state_positions = positions
        self.stateful = bool(positions)

    def data_at_step(self, data: Any, step: tf.Tensor) -> Any:
        """Minibatch `step` of the element's stacked minibatches (a gather in the compiled loop)."""
        return tf.nest.map_structure(lambda x: tf.gather(x, step), data)

    def global_step(self, step: tf.Tensor) -> tf.Tensor:
        """hyper-iteration × T + t: the inner step of the whole run (resumed with the trainer)."""
        if self.steps_done is None:  # traced before the state exists (shape inference only)
            return step
        return tf.cast(_read(self.steps_done), tf.int32) + tf.cast(step, tf.int32)  # the core's step dtype

    def create_state(self, problem: Any, add_variable: AddVariable) -> None:
        """The inner optimizer's state (momentum, Adam moments) in trainer variables, so that a
        resumed run continues the same momentum."""
        weights = [_read(v) for v in self.calls.trainable(self.inner_model)]
        fresh = problem.inner_optimizer.init(weights)
        self.carried = {"opt_state": CarriedState.create("inner_optimizer_state", fresh, add_variable)}
        if self.stateful:  # held by the inner model's own variables (a checkpoint holds them)
            non_trainable = self.calls.non_trainable(self.inner_model)
            layer_state = [non_trainable[i] for i in self.layer_state_positions]
            self.carried["model_state"] = CarriedState([_read(v) for v in layer_state], layer_state)
        self.steps_done = add_variable("inner_steps_done", np.asarray(0, np.int64))

    @property
    def variables(self) -> list:
        return super().variables + ([] if self.steps_done is None else [self.steps_done])

    def write_back(self, apply: tf.Tensor, final_params: list, carried: dict, replica: Any) -> None:
        self.store_inner_weights(apply, final_params, replica)
        super().write_back(apply, final_params, carried, replica)
        done = _read(self.steps_done)
        self.steps_done.assign(tf.where(apply, done + self.steps, done))

    def evaluation_weights(self, solve: Callable[[], list], stored: list) -> list:
        """The current weights of the model being trained (evaluating must not train it)."""
        return list(stored)


class OnlineForward(Online):
    """online=True, estimator="forward": forward mode's tangents Z = d(w, optimizer state,
    layer state)/dλ carry over too, so each hypergradient is that of the current validation
    loss through the whole run so far (RTHO; `forget` = μ < 1 discounts the past: MARTHE).
    They are held in trainer variables ([N, ...] per leaf), which checkpoints hold."""

    name = "online_forward"

    def __init__(self, calls: Any, inner_model: Any, estimator: str, steps: int, memory_budget: int):
        super().__init__(calls, inner_model, estimator, steps)
        self.memory_budget = memory_budget

    def create_state(self, problem: Any, add_variable: AddVariable) -> None:
        """Also Z_0 = 0 (a fresh start), after checking forward mode's memory bound (naming
        K-RMD when N is too large) here, when the trainer is built."""
        super().create_state(problem, add_variable)
        columns = sum(int(np.prod(spec.shape)) for spec in tf.nest.flatten(problem.hyper_specs()))
        state = InnerState(
            [_read(v) for v in self.calls.trainable(self.inner_model)],
            self.carried["opt_state"].read(),
            self.carried["model_state"].read() if "model_state" in self.carried else (),
        )
        check_tangent_memory(state, columns, self.memory_budget)
        self.carried["tangents"] = CarriedState.create("forward_tangents", zero_tangents(state, columns), add_variable)

    def estimator_arguments(self, carried: dict, estimator: Any) -> dict:
        """The tangents go to forward mode only (not to the diagnostics' full-RMD reference)."""
        arguments = super().estimator_arguments(carried, estimator)
        if estimator.estimator != "forward":
            del arguments["tangents"]
        return arguments


def regime_for(spec: Any, calls: Any) -> Regime:
    """The regime of a validated `TrainerSpec` (its arguments `online`, `estimator` and `inner_init`)."""
    if spec.online and spec.estimator == "forward":
        return OnlineForward(calls, spec.inner_model, spec.estimator, spec.steps, DEFAULT_MEMORY_BUDGET)
    if spec.online:
        return Online(calls, spec.inner_model, spec.estimator, spec.steps)
    if spec.inner_init == "warm_start":
        return WarmStart(calls, spec.inner_model)
    inner_init = spec.inner_init
    # A user's function is called from AutoGraph-converted code (see problem.py).
    return Episodic(calls, spec.inner_model, inner_init if isinstance(inner_init, str) else leave_unparsable_unconverted(inner_init))


def glorot_redraw(values: list, seed: tf.Tensor) -> list:
    """Fresh Glorot-uniform kernels (rank ≥ 2) from a stateless seed; vectors (biases, BatchNorm
    γ/β) keep their stored values. Deterministic given `seed` (no RNG state to checkpoint) for a
    given compilation mode: XLA's stateless RNG kernels draw different numbers than TF's."""
    out = []
    for j, value in enumerate(values):
        shape = value.shape.as_list()
        if len(shape) < 2:
            out.append(value)
            continue
        receptive = math.prod(shape[:-2]) if len(shape) > 2 else 1
        fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        leaf_seed = tf.random.experimental.stateless_fold_in(seed, j, alg="philox")
        # An explicit algorithm: "auto_select" differs between XLA and TF kernels.
        out.append(tf.random.stateless_uniform(shape, leaf_seed, -limit, limit, dtype=value.dtype, alg="philox"))
    return out
