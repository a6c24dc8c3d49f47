"""`TrainerSpec`: the arguments of a bilevel trainer, validated once.

`BilevelTrainer` (Keras 3) and `LegacyBilevelTrainer` (tf-keras) forward their keyword
arguments here; the trainer and its `KerasBilevelProblem` read the spec instead of
re-listing them. The arguments are documented once, in `tf_bilevel.BilevelTrainer`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import numpy as np
import tensorflow as tf

from tf_bilevel import _validate
from tf_bilevel.dynamics.optimizers import adam, momentum, sgd
from tf_bilevel.keras.compat import require_layer
from tf_bilevel.keras.estimator import EstimatorSettings
from tf_bilevel.keras.reparam import Hyperparameter, as_hyperparameter

ON_NONFINITE = ("raise", "skip")
META_BATCH_MODES = ("auto", "stacked", "map_fn")
INNER_INITS = ("fixed", "random", "warm_start", "learned")
RESERVED_NAMES = ("inner_learning_rate", "centers", "strengths", "init", "features")
INNER_OPTIMIZERS = {"sgd": sgd, "momentum": momentum, "adam": adam}


@dataclasses.dataclass(frozen=True, eq=False)
class TrainerSpec:
    """The validated arguments of `tf_bilevel.BilevelTrainer` (documented there).

    `flavor` is the Keras the models must belong to (`compat.KERAS3` or `compat.TF_KERAS`).
    Every argument is checked when the spec is created, in the order of the signature; only
    `steps`, `truncate`, `estimator`, `iterations`, `tolerance` and `forget` are left to the core
    (`tfb.hypergradient_fn`, with its messages), which checks them when the trainer builds its
    estimator, still in the constructor. Normalized on the way: `hyperparameters` holds `Hyperparameter` specs
    (numbers and arrays converted; {} for None), a constant `inner_learning_rate` is a
    checked positive number, `meta_batch` a bool.
    """

    flavor: str
    inner_model: Any
    inner_loss: Callable
    outer_loss: Callable
    # The core estimator's arguments: `EstimatorSettings` declares their defaults (and is built
    # from these fields by name, `EstimatorSettings.of`).
    steps: int
    truncate: Optional[int] = EstimatorSettings.truncate
    estimator: str = EstimatorSettings.estimator
    iterations: Optional[int] = EstimatorSettings.iterations
    tolerance: Optional[float] = EstimatorSettings.tolerance
    forget: Optional[float] = EstimatorSettings.forget
    hyper_model: Any = None
    hyperparameters: Optional[dict] = None
    inner_regularizer: Optional[Callable] = None
    proximal_strength: Optional[float] = None
    inner_learning_rate: Union[float, Hyperparameter, Callable] = 0.1
    inner_optimizer: Union[str, Callable] = "sgd"
    inner_init: Union[str, Callable] = "fixed"
    meta_batch: bool = False
    meta_batch_mode: str = "auto"
    online: bool = False
    diagnostics_every: Optional[int] = None
    on_nonfinite: str = "raise"
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_models()
        self._check_step_options()
        self._check_functions()
        set_field = object.__setattr__  # frozen: normalized values are set once, here
        set_field(self, "hyperparameters", self._checked_hyperparameters())
        self._check_proximal_strength()
        set_field(self, "inner_learning_rate", self._checked_inner_learning_rate())
        self._check_inner_optimizer()
        self._check_inner_init()
        set_field(self, "meta_batch", bool(self.meta_batch))

    @property
    def builtin_inner_optimizer(self) -> bool:
        """A built-in (elementwise) inner optimizer: meta-batch tasks stay independent under it."""
        return isinstance(self.inner_optimizer, str) and self.inner_optimizer in INNER_OPTIMIZERS

    # -- the checks, in argument order -------------------------------------------------------
    def _check_models(self) -> None:
        require_layer(self.inner_model, "inner_model", self.flavor)
        if self.hyper_model is not None:
            require_layer(self.hyper_model, "hyper_model", self.flavor)
            if self.hyper_model is self.inner_model:
                raise ValueError("hyper_model and inner_model must be different layers (λ and w are disjoint)")

    def _check_step_options(self) -> None:
        on_nonfinite, diagnostics_every, seed = self.on_nonfinite, self.diagnostics_every, self.seed
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(
                f"on_nonfinite must be 'raise' (stop with an error naming the step) or 'skip' (skip the "
                f"hyperparameter update of that step), got {on_nonfinite!r}"
            )
        set_field = object.__setattr__  # frozen: the checked ints (a NumPy int becomes a Python int)
        set_field(self, "diagnostics_every", _validate.integer(
            diagnostics_every, "diagnostics_every", "compare with full RMD every N steps", optional=True))
        set_field(self, "seed", _validate.integer(seed, "seed", "of the per-task stateless RNG", minimum=None))
        self._check_online()
        if self.meta_batch_mode not in META_BATCH_MODES:
            raise ValueError(
                f"meta_batch_mode must be one of {META_BATCH_MODES} ('auto': one stacked inner loop for all "
                f"tasks where that computes the same mean, else tf.map_fn), got {self.meta_batch_mode!r}"
            )

    def _check_online(self) -> None:
        online, inner_init = self.online, self.inner_init
        if not isinstance(online, bool):
            raise TypeError(f"online must be True or False, got {online!r}")
        if not online:
            return
        if self.meta_batch:
            raise ValueError(
                "online=True trains one model on one stream of minibatches: meta_batch=True (a stack of "
                "independent tasks per element) does not apply. Use meta_batch=False."
            )
        if inner_init != "fixed":
            raise ValueError(
                f"online=True continues from the inner model's current weights, so inner_init={inner_init!r} "
                "does not apply: leave inner_init at its default ('fixed')."
            )
        if self.hyper_model is not None:
            raise ValueError(
                "online=True does not support a hyper_model yet (it would be applied to every inner "
                "minibatch); learn named hyperparameters=..., or use online=False for a meta-learned representation."
            )

    def _check_functions(self) -> None:
        _require_callable(self.inner_loss, "inner_loss", "(y_true, y_pred[, hparams]) -> per-example losses or scalar")
        _require_callable(self.outer_loss, "outer_loss", "(y_true, y_pred[, hparams]) -> per-example losses or scalar")
        if self.inner_regularizer is not None:
            _require_callable(self.inner_regularizer, "inner_regularizer", "(inner_weights, hparams) -> scalar")

    def _checked_hyperparameters(self) -> dict:
        hyperparameters = {} if self.hyperparameters is None else self.hyperparameters
        if not isinstance(hyperparameters, dict) or not all(isinstance(k, str) for k in hyperparameters):
            raise TypeError(
                "hyperparameters must be a dict {name: tf_bilevel.Hyperparameter(...) (or a nested list of them)}, "
                f"got {hyperparameters!r}"
            )
        clashes = sorted(set(hyperparameters) & set(RESERVED_NAMES))
        if clashes:
            raise ValueError(
                f"hyperparameters: the names {clashes} are reserved ({', '.join(RESERVED_NAMES)}); rename them."
            )
        return {
            name: tf.nest.map_structure(lambda v, n=name: as_hyperparameter(v, f"hyperparameters[{n!r}]"), value)
            for name, value in hyperparameters.items()
        }

    def _check_proximal_strength(self) -> None:
        strength = self.proximal_strength
        if strength is not None and not (_validate.is_real_number(strength) and np.isfinite(strength) and strength > 0):
            raise ValueError(
                f"proximal_strength must be a positive number (the initial ρ of Σ_j ρ_j‖w_j − c_j‖²), "
                f"got {strength!r}; use None for no proximal term."
            )

    def _checked_inner_learning_rate(self) -> Any:
        rate = self.inner_learning_rate
        if not (_validate.is_real_number(rate) or isinstance(rate, Hyperparameter) or callable(rate)):
            raise TypeError(
                "inner_learning_rate must be a positive number, a tf_bilevel.Hyperparameter (learned γ, e.g. "
                f"Hyperparameter(0.1, transform='softplus')) or a schedule step -> γ, got {rate!r}"
            )
        if _validate.is_real_number(rate):
            return _validate.learning_rate(rate, "inner_learning_rate")
        return rate

    def _check_inner_optimizer(self) -> None:
        # Whether a user-defined factory returns a tf_bilevel.InnerOptimizer is checked when the
        # problem calls it (KerasBilevelProblem).
        optimizer = self.inner_optimizer
        if isinstance(optimizer, str):
            if optimizer not in INNER_OPTIMIZERS:
                raise ValueError(
                    f"inner_optimizer must be one of {sorted(INNER_OPTIMIZERS)} or a function "
                    f"learning_rate -> tf_bilevel.InnerOptimizer, got {optimizer!r}"
                )
            return
        _require_callable(optimizer, "inner_optimizer", "learning_rate -> tf_bilevel.InnerOptimizer")

    def _check_inner_init(self) -> None:
        if not (self.inner_init in INNER_INITS or callable(self.inner_init)):
            raise ValueError(
                f"inner_init must be one of {INNER_INITS} or a callable (seed, stored_weights) -> weights, "
                f"got {self.inner_init!r}"
            )


def _require_callable(fn: Any, argument: str, signature: str) -> None:
    if not callable(fn):
        raise TypeError(f"{argument} must be a callable {signature}, got {fn!r}")
