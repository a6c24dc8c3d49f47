"""`BilevelTrainer`: bilevel optimization (hyperparameter optimization, meta-learning) as a
Keras 3 model whose `fit` runs hyper-iterations."""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_bilevel.keras.compat import Keras3Calls
from tf_bilevel.keras.layers import warn_inexact_batch_normalization
from tf_bilevel.keras.trainer_base import BilevelTrainerMixin


class BilevelTrainer(BilevelTrainerMixin, keras.Model):
    """A `keras.Model` whose `train_step` is one hyper-iteration of K-RMD (paper §3, Eq. 8).

    Each step takes a dataset element `((x_inner, y_inner), (x_outer, y_outer))` (one task,
    or a stack of tasks with `meta_batch=True`), runs `steps` inner gradient steps on the
    weights w of `inner_model` from w0, back-propagates through the last `truncate` of them,
    and applies the (task-averaged) hypergradient to the hyperparameters λ with the
    optimizer given to `compile`. `fit`, callbacks, `History`, `evaluate` (inner loop on
    held-out tasks, outer loss and compiled metrics) and `predict` work as usual.

    Args:
      inner_model: Keras 3 layer/model; its trainable weights are w, trained per task.
      inner_loss: `(y_true, y_pred[, hparams]) -> per-example losses (or scalar)`; averaged
        (weighted by the batch's sample weights). Must be twice differentiable: use
        `tf_bilevel.keras.losses.sparse_categorical_crossentropy` rather than Keras' fused
        crossentropy. `hparams` is the dict of named hyperparameter values.
      outer_loss: same signature, evaluated on the outer batch at w_T (the objective f).
      steps: T, inner steps per task.
      truncate: K (K-RMD); None = full RMD. "reverse"/"checkpointed" only.
      estimator: "reverse" | "checkpointed" | "forward" | "implicit_cg" | "neumann".
      iterations, tolerance: "implicit_cg"/"neumann" only: the most CG iterations / Neumann
        terms (default `steps`) and the relative residual to stop at (None: run them all), as
        in `tfb.hypergradient_fn`.
      forget: estimator="forward" with online=True only: μ in [0, 1] (default 1). The
        forward-mode tangents Z = dw/dλ (and of the inner optimizer's and layers' state) are
        carried across hyper-iterations in trainer variables and multiplied by μ at the start
        of each: μ = 1 gives the hypergradient through the whole run so far (RTHO), μ = 0 the
        greedy one, in between MARTHE. Memory O(MN): a large N is an error naming K-RMD.
      hyper_model: optional Keras layer mapping inputs to the inner model's inputs; its
        trainable weights are hyperparameters (e.g. the hyper-representation convs, G.3).
      hyperparameters: `{name: Hyperparameter(initial, transform=...)}` (or numbers/arrays,
        or nested lists of them), passed by value to 3-argument losses and the regularizer.
      inner_regularizer: `(inner_weights: list, hparams: dict) -> scalar` added to g.
      proximal_strength: if set, adds Σ_j ρ_j‖w_j − c_j‖² to g with learned centers c_j
        (initialized at the inner model's weights) and ρ_j = softplus(·) > 0 (§4.3).
      inner_learning_rate: γ: a number, a schedule `step -> γ`, a `Hyperparameter` to learn
        it (e.g. `Hyperparameter(0.1, transform="softplus")`), or a `LearnedSchedule`
        (`tfb.keras.LearnedSchedule.cosine(peak, total_steps)` / `.piecewise(values,
        total_steps)`) to learn a schedule's few parameters (λ["inner_learning_rate"]). With
        online=True a schedule sees the global inner step of the run (hyper-iteration × T + t,
        resumed with the trainer).
      inner_optimizer: "sgd" | "momentum" | "adam" or `lr -> tf_bilevel.InnerOptimizer`.
      inner_init: w0 per task: "fixed" (the inner model's stored weights, the default),
        "random" (Glorot-uniform kernels redrawn per task with a stateless seed
        (seed, meta_step, task)), "warm_start" (the mean w_T of the previous step) or
        "learned" (w0 is a hyperparameter, MAML-style), or `(seed, stored) -> weights`.
      meta_batch: every element holds a stack of tasks on axis 0; the hypergradient is their
        mean, computed in one compiled step.
      meta_batch_mode: "auto" | "stacked" | "map_fn": how. "stacked" runs the meta-batch as one
        bilevel problem over the tasks' stacked weights (one inner loop; the inner/hyper model
        batched over tasks when its layers allow, see tf_bilevel/keras/batched.py); "map_fn"
        maps the single-task step over tasks. "auto" stacks unless the estimator is
        "implicit_cg"/"neumann", the inner optimizer is user-defined or the task count is not
        static. `trainer.meta_batch_path` records the path taken.
      online: tune while you train. Each element holds `steps` training minibatches stacked
        on axis 0 and one validation batch (`tf_bilevel.keras.online_tasks(train, val,
        steps=T)`); inner step t uses minibatch t, and the inner model's weights, its layer
        state (BatchNorm's moving statistics, updated at every inner step as Keras training
        does) and the inner optimizer's state (momentum, Adam moments) continue from one
        hyper-iteration to the next. The inner model's variables hold the current w, so after `fit` it is
        trained (`inner_model.evaluate/predict/save` work directly). With online=False
        (the default, episodic), the inner model is each task's starting point w0 and is
        not trained by `fit`: `adapted_inner_model(task)` returns a trained copy.
      diagnostics_every: every N steps also compute the full-RMD hypergradient and report
        `cosine_to_full_rmd` / `relative_error_to_full_rmd` (Figs. 6–7). Costly.
      on_nonfinite: "raise" (default: `tfb.NonFiniteError` naming the step, λ not updated)
        or "skip" (skip that update, count it in the `skipped_updates` metric).
      seed: seed of the per-task stateless RNG.

    Reported metrics: `loss` = `outer_loss` (outer loss f at w_T; monitor `val_loss` with
    `EarlyStopping` when there is validation data), `inner_loss` (g at w_T on the inner batch),
    `hypergradient_norm` (‖d_ν f‖ of the raw variables), `hp/<name>` (scalar hyperparameter
    values; vector ones via `tf_bilevel.keras.HyperparameterHistograms`), the compiled metrics on
    the outer predictions, and the optional diagnostics (see `tf_bilevel.keras.conventions`).

    The inner model's own losses (`kernel_regularizer`, activity regularizers, `add_loss`) are
    part of g (and of its second derivatives), not of f. Under a mixed-precision policy the models
    compute in float16/bfloat16 and the losses, λ and the hypergradient are float32 (no loss
    scaling: pass a plain outer optimizer). `save`/`get_config` are not supported (a clear
    error): use `save_weights`, `BackupAndRestore` or `export`.
    Pass `compile(..., jit_compile=True)` for XLA: Keras' default "auto" turns XLA off on
    CPU-only machines.

    BatchNorm: both models run in training mode (per-task batch statistics). The inner
    model's moving statistics are discarded per task; the hyper model's moving statistics are
    updated with the mean over tasks of their training-mode updates, so that exported hyper
    layers serve in inference mode. In the inner model use `tf_bilevel.keras.BatchNormalization`
    (a drop-in): `keras.layers.BatchNormalization`'s second derivatives are inexact, which
    biases hypergradients (the trainer warns when it builds). The hyper model is differentiated
    only once, so Keras' layer is exact there.

    Resuming an interrupted `fit`: every piece of state is a variable that
    `keras.callbacks.BackupAndRestore` saves (λ, the outer optimizer's slots, `meta_step`,
    which also seeds the per-task RNG, the hyper model's statistics). A restarted run
    resumes at the start of the epoch after the last saved one (Keras 3 restores the epoch,
    not the batch: keep the default `save_freq="epoch"` and choose `steps_per_epoch` as the
    checkpoint interval). A stream of tasks must also resume where it stopped: pass
    `trainer.resumable(tasks)`, which starts the stream at element `meta_step`. With op
    determinism (`tf.config.experimental.enable_op_determinism()`) the resumed run ends with
    the same λ, bit for bit, as an uninterrupted one (tests/test_resume.py).

    Distribution: create and compile the trainer under `strategy.scope()`
    (`tf.distribute.MirroredStrategy`, `MultiWorkerMirroredStrategy`); each replica gets a
    slice of the meta-batch (the element's task axis is the global batch) and λ gets the
    mean hypergradient over all tasks. TF 2.21 on CPU cannot XLA-compile the replicated step
    (no XLA:CPU kernels for collectives): use `jit_compile=False` there.
    """

    _calls = Keras3Calls  # the constructor (BilevelTrainerMixin.__init__) forwards into a TrainerSpec

    def train_step(self, data):
        return _for_multi_worker_reduction(super().train_step(data))

    def test_step(self, data):
        return _for_multi_worker_reduction(super().test_step(data))

    def _warn_inexact_second_order(self) -> None:
        warn_inexact_batch_normalization(self.inner_model, stacklevel=5)  # at the user's fit/evaluate/predict

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # fit/evaluate/predict build the trainer from the dataset's element_spec first. Keras'
        # symbolic build would pull (and drop) an element, and under MultiWorkerMirroredStrategy
        # fails reducing it across workers (keras-team/keras#20585).
        if not self.built:
            super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def export(self, filepath: str, format: str = "tf_saved_model", verbose: bool = True, input_signature=None, **kwargs):
        """Exports the meta-learned hyper model as a SavedModel (see `tf_bilevel.keras.export_hyper_model`)."""
        from tf_bilevel.keras.export import export_hyper_model

        if format != "tf_saved_model":
            raise ValueError(f"BilevelTrainer.export supports format='tf_saved_model' only, got {format!r}")
        return export_hyper_model(self, filepath, input_signature=input_signature, verbose=verbose)


def _for_multi_worker_reduction(logs: dict) -> dict:
    """Keras 3 reduces a step's logs across workers with `strategy.reduce("MEAN", v, axis=0)`
    under a multi-worker `MultiWorkerMirroredStrategy`, which fails on scalars
    (keras-team/keras#20585): give them a leading axis of length 1 there."""
    strategy = tf.distribute.get_strategy()
    if not (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and strategy.extended._in_multi_worker_mode()):
        return logs
    return {name: tf.reshape(value, [1]) if value.shape.rank == 0 else value for name, value in logs.items()}
