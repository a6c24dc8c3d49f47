"""The bilevel problem described with Keras objects, turned into the core's pure functions.

    w  = the trainable weights of `inner_model` (re-initialized or warm-started per task),
    λ  = the trainable weights of `hyper_model` (e.g. frozen feature layers, appendix G.3)
         + named `Hyperparameter`s (per-example weights, regularization strengths, …)
         + optionally the inner learning rate γ, proximal centers/strengths (§4.3) and a
           learned initialization w0 = Ξ0(λ) (the B0 term of Eq. 5),
    g(w, λ) = mean inner_loss(y, inner_model(x; w)) + Σ inner_model.losses(w)
              + inner_regularizer(w, λ) + Σ_j ρ_j‖w_j − c_j‖²
    f(w, λ) = mean outer_loss(y, inner_model(x; w))          (on the outer batch)

where inner_model.losses are the model's layer regularizers and `add_loss` terms at w (f
excludes them, as Keras' validation loss does); under mixed precision the predictions are cast
to float32 before the losses.

with x replaced by hyper_model(x; λ) when a hyper model is given. The hyper model is
applied once per task, outside the inner loop (λ is fixed while w is trained): its outputs
φ are handed to the core as hyperparameters and d_λ f = (∂φ/∂λ)ᵀ d_φ f by the chain rule.
Per task (episodic regimes) both models run with training=True (BatchNorm normalizes with the
statistics of each task's batch, as in the paper's Omniglot network); the inner model's
updated moving statistics are discarded per task. Online (`regime.Online`), f runs in
inference mode and the inner model's layer state (moving statistics) is the core's model
state: updated by every inner step, read by f (`stateful_inner_loss`/`stateful_outer_loss`).
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import tensorflow as tf

from tf_bilevel._autograph import leave_unparsable_unconverted
from tf_bilevel._signature import requires
from tf_bilevel.dynamics.optimizers import InnerOptimizer
from tf_bilevel.keras.data import Batch
from tf_bilevel.keras.estimator import EstimatorSettings, build_estimator
from tf_bilevel.keras.losses import SECOND_ORDER_HINT
from tf_bilevel.keras.regime import Regime
from tf_bilevel.keras.reparam import Hyperparameter
from tf_bilevel.keras.schedule import LearnedSchedule
from tf_bilevel.keras.spec import INNER_OPTIMIZERS, TrainerSpec


class CoreBatch(NamedTuple):
    """What the core passes to the losses: the data, the inner model's non-trainable state and
    the stateless seed of this task (of this inner step once `batch_at_step` has run)."""

    data: Batch
    inner_state: list
    seed: tf.Tensor


def fold_seed(seed: tf.Tensor, index: Any) -> tf.Tensor:
    """A new stateless seed from (seed, index), identical under TF and XLA (explicit philox)."""
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(index, tf.int64), alg="philox")


class KerasBilevelProblem:
    """Validates the Keras description and provides g, f, Ξ0 and γ for `tfb.hypergradient_fn`."""

    def __init__(self, calls: Any, spec: TrainerSpec, regime: Regime):
        """`spec`: the trainer's validated arguments (`tf_bilevel.keras.spec.TrainerSpec`);
        `regime`: its training regime (`tf_bilevel.keras.regime`)."""
        self.calls = calls
        self.regime = regime
        self._estimators: dict = {}  # EstimatorSettings -> core estimator (`hypergradient`)
        self._step_profiles: dict = {}  # stateful -> the step profiles its estimators share (one inner step)
        self.stacked_by_count: dict = {}  # number of tasks -> its `tasks.StackedTasks`, built once (`tasks.stacked_tasks`)
        self.seed_positions: list = []  # indices of RNG seed states among the inner model's non-trainable values
        self.inner_model = spec.inner_model
        self.hyper_model = spec.hyper_model
        # The user's functions are called from AutoGraph-converted code (Keras traces train_step
        # with AutoGraph): one it cannot parse (a lambda typed in a REPL) would log a warning.
        self.inner_loss_fn = leave_unparsable_unconverted(spec.inner_loss)
        self.outer_loss_fn = leave_unparsable_unconverted(spec.outer_loss)
        regularizer = spec.inner_regularizer
        self.inner_regularizer = None if regularizer is None else leave_unparsable_unconverted(regularizer)
        self.user_specs = spec.hyperparameters
        self.proximal_strength = spec.proximal_strength
        self.inner_learning_rate = leave_unparsable_unconverted(spec.inner_learning_rate)
        self.learned_schedule = spec.inner_learning_rate if isinstance(spec.inner_learning_rate, LearnedSchedule) else None
        inner_optimizer = spec.inner_optimizer
        if isinstance(inner_optimizer, str):
            inner_optimizer = INNER_OPTIMIZERS[inner_optimizer]
        self.inner_optimizer = inner_optimizer(self._core_learning_rate())
        if not isinstance(self.inner_optimizer, InnerOptimizer):
            raise TypeError(f"inner_optimizer must return a tf_bilevel.InnerOptimizer, got {self.inner_optimizer!r}")

    # -- structure of λ ---------------------------------------------------------------
    def check_models(self) -> None:
        """Called once the models are built: the errors that need their weights."""
        if not self.calls.trainable(self.inner_model):
            raise ValueError(
                f"inner_model {self.inner_model.name!r} has no trainable weights, so there is nothing to "
                "optimize in the inner problem (is it frozen with trainable=False?). The inner model's "
                "trainable weights are w; put frozen feature layers in hyper_model instead."
            )
        self.seed_positions = self.calls.seed_state_positions(self.inner_model)
        self.regime.check_models(self)
        if self.hyper_model is not None and not self.calls.trainable(self.hyper_model):
            raise ValueError(
                f"hyper_model {self.hyper_model.name!r} has no trainable weights: its weights are the "
                "hyperparameters λ, so they must be trainable (set hyper_model.trainable = True), or pass no "
                "hyper_model."
            )

    def build_models(self, x: Any) -> Any:
        """Builds both models on example inputs (inference mode: no side effects) and returns the
        inner model's output; a hyper model output that the inner model cannot take is named."""
        if self.hyper_model is None:
            return self.inner_model(x)
        features = self.hyper_model(x)
        try:
            return self.inner_model(features)
        except (ValueError, TypeError) as err:
            shapes = [list(f.shape) for f in tf.nest.flatten(features)]
            in_shapes = [list(v.shape) for v in tf.nest.flatten(x)]
            expected = _expected_input_shapes(self.inner_model)
            wants = f"expects inputs of shape {expected}" if expected else "cannot take them"
            raise ValueError(
                f"hyper_model {self.hyper_model.name!r} outputs shape {shapes[0] if len(shapes) == 1 else shapes} "
                f"(for inputs of shape {in_shapes[0] if len(in_shapes) == 1 else in_shapes}), but inner_model "
                f"{self.inner_model.name!r} {wants}: the hyper model's output is the inner model's input "
                f"(None = any size). Make the two agree. Keras said: {_first_line(err)}"
            ) from err

    def hyper_specs(self) -> dict:
        """The Hyperparameter specs of every λ leaf owned by the trainer (not the hyper model)."""
        specs: dict = {"user": self.user_specs}
        if isinstance(self.inner_learning_rate, Hyperparameter):
            specs["inner_learning_rate"] = self.inner_learning_rate
        if self.learned_schedule is not None:
            specs["inner_learning_rate"] = dict(self.learned_schedule.hyperparameters)
        inner_weights = _numpy(self.calls.trainable(self.inner_model))
        if self.proximal_strength is not None:
            specs["centers"] = [Hyperparameter(w, dtype=w.dtype.name) for w in inner_weights]
            specs["strengths"] = Hyperparameter(
                np.full([len(inner_weights)], float(self.proximal_strength)), transform="softplus",
                dtype=inner_weights[0].dtype.name,
            )
        specs.update(self.regime.hyper_specs(inner_weights))
        return specs

    def hparams(self, raw: dict, specs: dict, hyper_state: list, task_inner: Batch, task_outer: Batch,
                with_features: bool = True):
        """λ as the core sees it, from the raw values (differentiable); also the hyper model's
        updated non-trainable state (BatchNorm statistics) after its calls on this task.
        `with_features=False`: without the hyper model's features (the caller computes them)."""
        hp = tf.nest.map_structure(lambda spec, v: spec.value_from_raw(v), specs, {k: raw[k] for k in specs})
        if self.hyper_model is not None and with_features:
            features_inner, hyper_state = self.calls.call(self.hyper_model, raw["hyper_model"], hyper_state, task_inner.x, True)
            features_outer, hyper_state = self.calls.call(self.hyper_model, raw["hyper_model"], hyper_state, task_outer.x, True)
            hp["features"] = {"inner": features_inner, "outer": features_outer}
        return hp, list(hyper_state)

    # -- the core's g, f, Ξ0, γ -----------------------------------------------------------
    def batch_at_step(self, batch: CoreBatch, step: tf.Tensor) -> CoreBatch:
        """The core's per-step batch selector: the data of step `step` (the regime's choice:
        e.g. online, minibatch `step`) and a seed folded with the step, so that Dropout draws a
        fresh mask at every inner step, the same in the step's forward pass and its recomputation."""
        return CoreBatch(self.regime.data_at_step(batch.data, step), batch.inner_state, fold_seed(batch.seed, step))

    def inner_batch(self, data: Batch, inner_state: list, seed: tf.Tensor) -> CoreBatch:
        return CoreBatch(data, inner_state, seed)

    def last_step_batch(self, batch: CoreBatch, steps: int) -> CoreBatch:
        """The batch of the last inner step (e.g. online: its minibatch), for g(w_T) in the logs."""
        return self.batch_at_step(batch, tf.constant(steps - 1))

    def outer_batch(self, data: Batch, inner_state: list, seed: tf.Tensor) -> CoreBatch:
        """The outer batch's seed is folded with -1: no inner step draws the same randomness."""
        return CoreBatch(data, inner_state, fold_seed(seed, -1))

    def predict(self, params: list, hp: dict, batch: CoreBatch, which: str, with_losses: bool = False):
        """The inner model's outputs; with `with_losses`, also the list of its own losses and
        its updated non-trainable values (e.g. BatchNorm's moving statistics)."""
        x = hp["features"][which] if self.hyper_model is not None else batch.data.x
        # Per task (episodic), both run in training mode (per-task BatchNorm statistics); the
        # regime decides for f (online: inference mode, as Keras validates).
        training = which == "inner" or self.regime.outer_training
        state = self._seeded_state(batch)
        if with_losses:
            outputs, new_state, layer_losses = self.calls.call(
                self.inner_model, params, state, x, training, return_losses=True
            )
            return outputs, list(layer_losses), list(new_state)
        outputs, _ = self.calls.call(self.inner_model, params, state, x, training)
        return outputs

    def _seeded_state(self, batch: CoreBatch) -> list:
        """The inner model's non-trainable values with every RNG seed state (Dropout, noise
        layers) replaced by one derived from the batch's seed: stateless_call would otherwise
        reuse the stored seed, i.e. the same mask at every step and every hyper-iteration."""
        if not self.seed_positions:
            return batch.inner_state
        state = list(batch.inner_state)
        for j, i in enumerate(self.seed_positions):
            state[i] = tf.cast(fold_seed(batch.seed, j), state[i].dtype)
        return state

    def inner_loss(self, params: list, hp: dict, batch: CoreBatch) -> tf.Tensor:
        """g(w, λ), including the inner model's own losses (layer regularizers, `add_loss`)."""
        return self._inner_loss_and_state(params, hp, batch)[0]

    # A stateful regime (online with layer state): the core carries the layer state s_t (the
    # non-trainable values at `regime.layer_state_positions`) through the inner steps.
    def stateful_inner_loss(self, params: list, hp: dict, batch: CoreBatch, layer_state: list) -> tuple:
        """(g(w, λ) at layer state s, the layer state after this training-mode call)."""
        loss, new_state = self._inner_loss_and_state(params, hp, self.with_layer_state(batch, layer_state))
        return loss, [new_state[i] for i in self.regime.layer_state_positions]

    def stateful_outer_loss(self, params: list, hp: dict, batch: CoreBatch, layer_state: list) -> tf.Tensor:
        """f(w, λ) at layer state s (online: inference mode, e.g. BatchNorm's moving statistics s_T)."""
        return self.outer_loss(params, hp, self.with_layer_state(batch, layer_state))

    def with_layer_state(self, batch: CoreBatch, layer_state: Any) -> CoreBatch:
        """`batch` with the regime's layer state in place of the stored values ({} or (): unchanged)."""
        if not tf.nest.flatten(layer_state):
            return batch
        state = list(batch.inner_state)
        for i, value in zip(self.regime.layer_state_positions, layer_state):
            state[i] = value
        return CoreBatch(batch.data, state, batch.seed)

    def _inner_loss_and_state(self, params: list, hp: dict, batch: CoreBatch) -> tuple:
        y_pred, layer_losses, new_state = self.predict(params, hp, batch, "inner", with_losses=True)
        loss = self._user_loss(self.inner_loss_fn, "inner_loss", batch.data, y_pred, hp["user"])
        if layer_losses:
            loss = loss + sum_layer_losses(layer_losses, loss.dtype)
        if self.inner_regularizer is not None:
            penalty = tf.convert_to_tensor(self.inner_regularizer(list(params), hp["user"]))
            if penalty.shape.rank != 0:
                raise ValueError(f"inner_regularizer must return a scalar, got shape {penalty.shape}")
            loss = loss + tf.cast(penalty, loss.dtype)
        if self.proximal_strength is not None:
            terms = [
                tf.cast(hp["strengths"][j], loss.dtype) * tf.cast(tf.reduce_sum(tf.square(w - c)), loss.dtype)
                for j, (w, c) in enumerate(zip(params, hp["centers"]))
            ]
            loss = loss + tf.add_n(terms)
        return loss, new_state

    def outer_loss(self, params: list, hp: dict, batch: CoreBatch) -> tf.Tensor:
        """f(w, λ)."""
        y_pred = self.predict(params, hp, batch, "outer")
        return self._user_loss(self.outer_loss_fn, "outer_loss", batch.data, y_pred, hp["user"])

    def init_params(self) -> Optional[Callable]:
        """Ξ0 for the core: the learned initialization, if any (B0 term of Eq. 5)."""
        return self.regime.init_params()

    def initial_params(self, stored: list, seed: tf.Tensor) -> list:
        """w0 of one task (before Ξ0), as the regime draws it."""
        return self.regime.initial_params(stored, seed)

    def _core_learning_rate(self):
        """γ for the core. A schedule sees the regime's step: the global inner step of the run
        online (hyper-iteration × T + t), the task's inner step t otherwise."""
        lr = self.inner_learning_rate
        if isinstance(lr, Hyperparameter):
            return lambda step, hp: hp["inner_learning_rate"]
        if isinstance(self.learned_schedule, LearnedSchedule):
            schedule = self.learned_schedule
            return lambda step, hp: schedule(self.regime.global_step(step), hp["inner_learning_rate"])
        if callable(lr) and requires(lr, 2):
            return lambda step, hp: lr(self.regime.global_step(step), hp["user"])
        if callable(lr):
            return lambda step: lr(self.regime.global_step(step))
        return lr

    def hypergradient(self, settings: EstimatorSettings) -> Any:
        """The core estimator of one task with `settings` (`estimator.build_estimator`), built
        once per settings: fit, evaluate and predict share it."""
        stateful = self.regime.stateful  # known once the models are built (`check_models`)
        key = (settings, stateful)
        if key not in self._estimators:
            inner, outer = (self.stateful_inner_loss, self.stateful_outer_loss) if stateful else (self.inner_loss, self.outer_loss)
            self._estimators[key] = build_estimator(
                settings, inner, outer, inner_optimizer=self.inner_optimizer, init_params=self.init_params(),
                per_step_batches=self.batch_at_step, stateful=stateful,
            )
            # Every settings' transition is the same inner step (loss, optimizer, per-step batches).
            self._estimators[key].step_profiles = self._step_profiles.setdefault(stateful, {})
        return self._estimators[key]

    # -- helpers ------------------------------------------------------------------------
    def _user_loss(self, fn: Callable, role: str, data: Batch, y_pred: tf.Tensor, user_hp: dict) -> tf.Tensor:
        y_pred = full_precision(y_pred)
        values = fn(data.y, y_pred, user_hp) if requires(fn, 3) else fn(data.y, y_pred)
        values = tf.convert_to_tensor(values)
        if not values.dtype.is_floating:
            raise TypeError(f"{role} must return floating-point losses, got dtype {values.dtype.name}")
        if data.weights is not None:
            if values.shape.rank == 0:
                raise ValueError(
                    f"{role} returned a scalar but its batch has sample weights: return one loss per "
                    "example so that they can be weighted."
                )
            weights = tf.cast(data.weights, values.dtype)
            weights = tf.reshape(weights, [-1] + [1] * (values.shape.rank - 1))
            values = values * weights  # Keras' "sum_over_batch_size": mean of weighted losses
        return tf.reduce_mean(values) if values.shape.rank != 0 else values


def _expected_input_shapes(model: Any) -> Optional[list]:
    """The input shapes a built functional/Sequential model declares (batch axis None), if any."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    if not inputs:
        return None
    shapes = [[None] + list(i.shape)[1:] for i in tf.nest.flatten(inputs)]
    return shapes[0] if len(shapes) == 1 else shapes


def _first_line(err: Exception) -> str:
    """The informative part of a Keras error (its own message, without ANSI codes or call args)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("Exception encountered")]
    return next((line for line in lines if "incompatible" in line or "expected" in line), lines[0] if lines else repr(err))


LOW_PRECISION = (tf.float16, tf.bfloat16)


def full_precision(x: Any) -> Any:
    """float16/bfloat16 tensors cast to float32 (others unchanged): under a mixed-precision policy
    the inner model computes in its compute dtype, but the losses, and so g, f and the
    hypergradient, are float32, as in Keras' own losses."""
    return tf.nest.map_structure(lambda t: tf.cast(t, tf.float32) if t.dtype in LOW_PRECISION else t, x)


def sum_layer_losses(losses: list, dtype: tf.DType) -> tf.Tensor:
    """Σ of a model's losses (`model.losses`: regularizers, `add_loss`) in `dtype`. They are part
    of g only: f is the plain outer loss, as Keras' validation loss is (regularizers excluded)."""
    return tf.add_n([tf.cast(tf.reduce_sum(tf.convert_to_tensor(x)), dtype) for x in losses])


def _numpy(variables: list) -> list:
    return [np.asarray(tf.convert_to_tensor(v)) for v in variables]


def explain_second_order(err: LookupError, role: str = "inner_loss") -> ValueError:
    return ValueError(f"{role}: {err}. {SECOND_ORDER_HINT}")
