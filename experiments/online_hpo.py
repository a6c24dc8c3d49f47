r"""Tune while you train: per-layer weight decay and the learning rate of a small CNN (with or
without BatchNorm) on Fashion-MNIST, learned online by tf_bilevel, against the default
hyperparameters and KerasTuner, over several seeds (issue #16 §5; first version issue #11 §5).

Every method is trained once per --networks entry and per --seeds entry (the seed sets the initial
weights and the minibatch order; the validation split is --split_seed's); the table reports the
test accuracy and the training wall clock as mean ± std over the seeds. A KerasTuner search runs
once per network (seeded with the first seed); its best configuration is retrained with every
seed. Writes results.json and figures to --output_dir. A killed run continues when the same
command is rerun: finished (network, method, seed) runs are read back, the interrupted one
continues from its last epoch (a KerasTuner trial too). Methods, settings and
the measured results: RESULTS.md, "Online hyperparameter optimization of a CNN vs KerasTuner".

  tfb-online-hpo                                                # every method, both networks, 3 seeds
  tfb-online-hpo --methods=default,random_search,hyperband     # the baselines only
  tfb-online-hpo --networks=cnn --seeds=0 --methods=bilevel    # one greedy T = K = 1 run
  tfb-online-hpo --preset=quick                                 # tiny budget (tests)
  (or python -m experiments.online_hpo ...)

Methods whose tf_bilevel features are not in the installed library (online forward mode with
`forget`; BatchNorm in an online inner model) are refused by name before anything trains.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import time
from typing import Any, Callable, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_bilevel as tfb  # noqa: E402
from experiments.common import keras_resume  # noqa: E402
from experiments.common import online_program as oc  # noqa: E402
from experiments.common import program  # noqa: E402
from experiments.common.config import option  # noqa: E402
from experiments.common.run_state import (  # noqa: E402
    RESTART_HINT, StateFileError, damaged, read_state_json, write_json_atomically,
)

NETWORKS = ("cnn", "cnn_bn")
TUNERS = ("hyperband", "random_search", "bayesian")  # run order: the cheaper search first
PLAIN = ("default", "default_cosine")
BILEVEL = ("bilevel", "krmd_wd", "forward", "forward_forget")
METHODS = PLAIN + TUNERS + BILEVEL
DEFAULT_METHODS = tuple(m for m in METHODS if m != "bayesian")  # Bayesian: behind --methods (budget)
NUM_LAYERS = 4  # kernels: conv1, conv2, dense, classifier

PRESETS: dict[str, dict[str, Any]] = {
    # The full comparison: every method but Bayesian, both networks, 3 seeds, 10 epochs.
    "full": {},
    # The baselines (what runs with today's library on both networks).
    "baselines": dict(methods=("default", "default_cosine", "random_search", "hyperband")),
    # One greedy run against the default only (minutes): a first look.
    "bilevel_only": dict(methods=("bilevel", "default"), networks=("cnn",), seeds=(0,)),
    # Tests: a slice of the data, 2 epochs, 2 trials, 2 seeds.
    "quick": dict(epochs=2, n_train=2048, n_val=512, n_test=1000, tuner_trials=2, bayesian_trials=2,
                  val_batch_size=128, hp_every=2, seeds=(0, 1), krmd="2:2"),
}


class NotAvailableError(program.UnavailableError):
    """A method needs a tf_bilevel feature the installed library does not have."""


@dataclasses.dataclass
class Config(oc.StateOptions):
    output_dir: str = option("out/online_hpo", "results.json, PNGs, resume state and KerasTuner's folder.",
                             result=False)
    methods: Sequence[str] = option(DEFAULT_METHODS, f"Any of {list(METHODS)}.", result=False)
    networks: Sequence[str] = option(NETWORKS, f"Any of {list(NETWORKS)} (cnn_bn: BatchNorm after each "
                                     "hidden layer).", result=False)
    seeds: Sequence[int] = option((0, 1, 2), "Run seeds (initial weights and minibatch order); one run "
                                  "per method, network and seed.", result=False)
    split_seed: int = option(0, "Seed of the validation split (the same for every run).")
    truncate: Sequence[str] = option(("1",), "Method bilevel (weight decays and a constant γ learned): "
                                     "one run per entry, T (inner steps per hyper-iteration, K = T) or T:K.",
                                     result=False)
    krmd: str = option("10:10", "Method krmd_wd (weight decays learned, γ on the fixed cosine schedule): "
                       "T:K.")
    forward_steps: int = option(1, "Methods forward, forward_forget: inner steps T per hyper-iteration.")
    forget: float = option(0.99, "Method forward_forget: μ in [0, 1) (forward is μ = 1).")
    epochs: int = option(10, "Passes over the training split (every method; Hyperband's max_epochs).")
    batch_size: int = option(128, "Training minibatch size.")
    val_batch_size: int = option(256, "Validation examples per hyper-iteration (outer loss).")
    n_val: int = option(6000, "Validation images carved from the training split.")
    n_train: Optional[int] = option(None, "Use only this many training images (default: all the others).")
    n_test: Optional[int] = option(None, "Use only this many test images (default: all 10 000).")
    init_weight_decay: float = option(5e-4, "Default / initial weight decay of every layer.")
    init_lr: float = option(0.05, "Default / initial learning rate γ (the cosine schedules' peak).")
    final_lr_fraction: float = option(0.01, "Cosine schedules: final γ as a fraction of the peak (Keras "
                                      "CosineDecay's alpha).")
    momentum: float = option(0.9, "Heavy-ball momentum β (fixed).")
    weight_decay_range: Sequence[float] = option((1e-6, 1e-2), "KerasTuner: log-uniform range.")
    lr_range: Sequence[float] = option((1e-3, 0.3), "KerasTuner: log-uniform range of the peak γ of the cosine "
                                       "schedule (the default_cosine / krmd_wd schedule, --final_lr_fraction).")
    outer_lr: float = option(0.01, "Adam step on the log-hyperparameters.")
    tuner_trials: int = option(20, "RandomSearch trials.")
    bayesian_trials: int = option(20, "BayesianOptimization trials.")
    hyperband_factor: int = option(3, "Hyperband's reduction factor.")
    hp_every: int = option(10, "Record the hyperparameters every N hyper-iterations.")
    seed: int = option(0, "The current run's seed (set from --seeds per run).", internal=True, result=False)
    bound_hyperparameters: bool = option(True, "tf_bilevel methods: keep every learned hyperparameter in the "
                                         "tuners' search space (--weight_decay_range, --lr_range; a learned "
                                         "schedule end in --final_lr_fraction × --lr_range) by clipping log λ "
                                         "after each outer step.")
    jit_compile: bool = option(False, "XLA-compile the train steps (all methods alike; off by default: slower "
                               "on CPU for this CNN, see RESULTS.md).")
    local_dir: Optional[str] = option(None, "Folder with the 4 Fashion-MNIST IDX .gz files (default: tfds "
                                      "data_dir, then /usr/share/datasets/fashion-mnist).", result=False)
    data_dir: Optional[str] = option(None, "tensorflow-datasets data_dir (default ~/tensorflow_datasets).",
                                     result=False)
    preset: str = "full"

    def validated(self) -> "Config":
        cfg = dataclasses.replace(self, methods=tuple(dict.fromkeys(self.methods)),
                                  networks=tuple(dict.fromkeys(self.networks)),
                                  seeds=tuple(dict.fromkeys(int(s) for s in self.seeds)),
                                  truncate=tuple(sorted({parse_truncation(t, "--truncate") for t in self.truncate})))
        bad = [m for m in cfg.methods if m not in METHODS]
        if bad or not cfg.methods:
            raise ValueError(f"--methods: choose from {list(METHODS)}, got {list(self.methods)}")
        bad = [n for n in cfg.networks if n not in NETWORKS]
        if bad or not cfg.networks:
            raise ValueError(f"--networks: choose from {list(NETWORKS)}, got {list(self.networks)}")
        if not cfg.seeds or min(cfg.seeds) < 0:
            raise ValueError(f"--seeds: give at least one seed, each >= 0, got {list(self.seeds)}")
        if "bilevel" in cfg.methods and not cfg.truncate:
            raise ValueError("--truncate: give at least one T (or T:K)")
        parse_truncation(cfg.krmd, "--krmd")
        if not 0 <= cfg.forget < 1:
            raise ValueError(f"--forget must be in [0, 1) (μ = 1 is method forward), got {cfg.forget}")
        if not 0 <= cfg.final_lr_fraction <= 1:
            raise ValueError(f"--final_lr_fraction must be in [0, 1], got {cfg.final_lr_fraction}")
        if cfg.hyperband_factor < 2:
            raise ValueError(f"--hyperband_factor must be >= 2, got {cfg.hyperband_factor}")
        for name in ("weight_decay_range", "lr_range"):
            low, high = (float(v) for v in getattr(cfg, name))
            if not 0 < low < high:
                raise ValueError(f"--{name} must be LOW,HIGH with 0 < LOW < HIGH, got {getattr(cfg, name)}")
            setattr(cfg, name, (low, high))
        if cfg.bound_hyperparameters:
            bounds = hyperparameter_bounds(cfg)
            for flag, value, (low, high) in (("init_weight_decay", cfg.init_weight_decay, bounds["weight_decay"]),
                                             ("init_lr", cfg.init_lr, bounds["learning_rate"])):
                if not low <= value <= high:
                    raise ValueError(f"--{flag}={value} is outside the search space [{low:g}, {high:g}] the learned "
                                     "hyperparameters are kept in: change one, or pass --nobound_hyperparameters")
        oc.check_ranges(cfg, ("epochs", "batch_size", "val_batch_size", "n_val", "tuner_trials", "bayesian_trials",
                              "hp_every", "forward_steps"), ("init_weight_decay", "init_lr", "outer_lr"))
        return cfg

    def for_seed(self, seed: int) -> "Config":
        return dataclasses.replace(self, seed=int(seed))


def end_fraction(cfg: Config) -> float:
    """The learned cosine schedule's initial end as a fraction of its peak (> 0: it is learned in log space)."""
    return max(cfg.final_lr_fraction, 1e-6)


def hyperparameter_bounds(cfg: Config) -> dict[str, tuple[float, float]]:
    """(low, high) of each learned hyperparameter: the tuners' search space; a learned schedule's
    end ranges over the ends of the tuners' schedules (--final_lr_fraction × their peak)."""
    low, high = cfg.lr_range
    return {"weight_decay": tuple(cfg.weight_decay_range), "learning_rate": (low, high),
            "lr_end": (low * end_fraction(cfg), high * end_fraction(cfg))}


def learned(cfg: Config, initial: Any, bounds: tuple[float, float]) -> tfb.Hyperparameter:
    """A positive hyperparameter learned in log space (λ = exp ν), kept in `bounds` if
    --bound_hyperparameters: ν = log λ is clipped to [log low, log high] after each outer step
    (projected descent on log λ, the tuners' log-uniform search space)."""
    return tfb.Hyperparameter(initial, transform="exp", bounds=bounds if cfg.bound_hyperparameters else None)


def parse_truncation(value: Any, flag: str = "--truncate") -> tuple[int, int]:
    """T (K = T), "T:K" or (T, K) -> (T, K) with 1 <= K <= T."""
    try:
        if isinstance(value, (tuple, list)):
            steps, truncate = (int(v) for v in value)
        elif isinstance(value, str) and ":" in value:
            steps, truncate = (int(v) for v in value.split(":"))
        else:
            steps = truncate = int(value)
    except ValueError:
        raise ValueError(f"{flag}: each entry is T or T:K (integers), got {value!r}") from None
    if not 1 <= truncate <= steps:
        raise ValueError(f"{flag}: each entry needs 1 <= K <= T, got {value!r}")
    return steps, truncate


def method_name(steps: int, truncate: int) -> str:
    return f"bilevel_T{steps}" if truncate == steps else f"bilevel_T{steps}_K{truncate}"


def method_names(cfg: Config) -> list[str]:
    """The methods' result names in run order: the baselines first (they need nothing new from
    tf_bilevel), each bilevel --truncate entry as bilevel_T<T>[_K<K>]."""
    names = [m for m in METHODS if m in cfg.methods and m not in BILEVEL]
    for m in BILEVEL:
        if m in cfg.methods:
            names += [method_name(*t) for t in cfg.truncate] if m == "bilevel" else [m]
    return names


def run_key(network: str, method: str, seed: int) -> str:
    """The resume key (file name under <output_dir>/resume) of one run."""
    return f"{network}.{method}.seed{seed}"


def search_key(network: str, kind: str) -> str:
    return f"{network}.{kind}.search"


# ----------------------------------------------------------------------------------------
# Data and model.
# ----------------------------------------------------------------------------------------
def load_data(cfg: Config) -> tuple[dict, dict]:
    """{"train", "val", "test": (x float32 [N, 28, 28, 1], y int32 [N])} and a description.
    The validation split is a random subset of the training split drawn from --split_seed."""
    from experiments.data import tfds_offline

    data = tfds_offline.load_image_classification("fashion_mnist", data_dir=cfg.data_dir, local_dir=cfg.local_dir)
    (x, y), (x_test, y_test) = data["train"], data["test"]
    if cfg.n_val >= len(y):
        raise ValueError(f"--n_val={cfg.n_val} leaves no training images out of {len(y)}")
    order = np.random.default_rng(cfg.split_seed).permutation(len(y))
    val_idx, train_idx = order[: cfg.n_val], order[cfg.n_val:]
    if cfg.n_train is not None:
        train_idx = train_idx[: cfg.n_train]
    n_test = len(y_test) if cfg.n_test is None else min(cfg.n_test, len(y_test))
    arrays = {
        "train": (oc.scale_images(x[train_idx]), y[train_idx].astype(np.int32)),
        "val": (oc.scale_images(x[val_idx]), y[val_idx].astype(np.int32)),
        "test": (oc.scale_images(x_test[:n_test]), y_test[:n_test].astype(np.int32)),
    }
    longest = max([t for t, _ in cfg.truncate] + [parse_truncation(cfg.krmd)[0], cfg.forward_steps])
    if len(arrays["train"][1]) < cfg.batch_size * longest:
        raise ValueError(f"{len(arrays['train'][1])} training images do not fill one hyper-iteration of "
                         f"T={longest} minibatches of {cfg.batch_size}")
    info = {"dataset": "fashion_mnist", "n_train": len(train_idx), "n_val": cfg.n_val, "n_test": n_test,
            "source": tfds_offline.data_source("fashion_mnist")}
    return arrays, info


def build_cnn(weight_decays: Optional[Sequence[float]] = None, seed: int = 0, network: str = "cnn",
              batch_norm: Optional[type] = None) -> keras.Model:
    """The small CNN; `weight_decays` (one per kernel) become Keras L2 kernel regularizers (the
    baselines); the bilevel runs have none (their decay is the inner_regularizer). network
    "cnn_bn" puts a BatchNormalization (`batch_norm`, default Keras') between each hidden
    layer's linear part (then without bias) and its ReLU."""
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {list(NETWORKS)}, got {network!r}")
    bn = network == "cnn_bn"
    batch_norm = batch_norm or keras.layers.BatchNormalization
    layers = keras.layers

    def reg(layer: int):
        return None if weight_decays is None else keras.regularizers.L2(float(weight_decays[layer]))

    def hidden(layer: int, make: Callable[..., keras.layers.Layer]) -> list:
        kwargs = dict(kernel_initializer=keras.initializers.GlorotUniform(seed=seed + layer),
                      kernel_regularizer=reg(layer))
        if not bn:
            return [make(activation="relu", **kwargs)]
        return [make(use_bias=False, **kwargs), batch_norm(), layers.Activation("relu")]

    return keras.Sequential([
        keras.Input((28, 28, 1)),
        *hidden(0, lambda **k: layers.Conv2D(32, 3, **k)), layers.MaxPooling2D(),
        *hidden(1, lambda **k: layers.Conv2D(64, 3, **k)), layers.MaxPooling2D(),
        layers.Flatten(),
        *hidden(2, lambda **k: layers.Dense(128, **k)),
        layers.Dense(10, kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 3), kernel_regularizer=reg(3)),
    ], name=network)


def kernel_indices(model: keras.Model) -> list[int]:
    """Positions of the kernels (not biases or BatchNorm's γ, β) in `model.trainable_weights`."""
    indices = [i for i, v in enumerate(model.trainable_weights) if v.path.endswith("kernel")]
    if len(indices) != NUM_LAYERS:
        raise AssertionError(f"expected {NUM_LAYERS} kernels, found {len(indices)}")
    return indices


def weight_decay_regularizer(kernels: Sequence[int]):
    """inner_regularizer(w, hp) = Σ_l λ_l ‖W_l‖² (Keras' L2(λ_l) on kernel l)."""
    def regularizer(weights: list, hp: dict) -> tf.Tensor:
        decay = hp["weight_decay"]
        return tf.add_n([decay[l] * tf.reduce_sum(tf.square(weights[k])) for l, k in enumerate(kernels)])

    return regularizer


def total_steps(cfg: Config, n_train: int) -> int:
    """Minibatches of a whole run (every method draws n_train // batch_size per epoch)."""
    return cfg.epochs * (n_train // cfg.batch_size)


def cosine_lr(peak: Any, end: Any, position: Any, total: int) -> Any:
    """γ at minibatch `position` of a `total`-minibatch run: cosine from `peak` down to `end`
    (Keras' CosineDecay(peak, total, alpha=end / peak)); constant `end` after the run."""
    p = tf.minimum(tf.cast(position, tf.float32) / float(total), 1.0)
    return end + (peak - end) * 0.5 * (1.0 + tf.cos(math.pi * p))


def compile_plain(model: keras.Model, cfg: Config, lr: Any) -> keras.Model:
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=cfg.momentum), loss=oc.sparse_ce_logits(),
                  metrics=["accuracy"], jit_compile=cfg.jit_compile)
    return model


# ----------------------------------------------------------------------------------------
# What the installed tf_bilevel can do.
# ----------------------------------------------------------------------------------------
def has_online_forward() -> bool:
    """BilevelTrainer(online=True, estimator="forward", forget=μ) (issue #16 §3): feature-detected
    by the `forget` argument (estimator="forward" alone restarts the tangents every call)."""
    return "forget" in inspect.signature(tfb.BilevelTrainer.__init__).parameters


@functools.lru_cache(maxsize=1)  # the installed library's answer: asked once per process
def online_batch_norm_refusal() -> Optional[str]:
    """None if an online BilevelTrainer accepts an inner model with BatchNormalization, else the
    library's refusal."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), tfb.keras.BatchNormalization(),
                              keras.layers.Dense(2)])
    ce = tfb.keras.losses.sparse_categorical_crossentropy
    batches = tf.data.Dataset.from_tensors((tf.zeros([2, 4]), tf.zeros([2], tf.int32))).repeat()
    try:  # the library checks the inner model's state once the models are built
        trainer = tfb.BilevelTrainer(model, inner_loss=ce, outer_loss=ce, steps=1, online=True, inner_learning_rate=0.1,
                                     hyperparameters={"weight_decay": tfb.Hyperparameter(1e-4, transform="exp")})
        trainer.build_from_spec(tfb.keras.online_tasks(batches, batches, steps=1).element_spec)
    except ValueError as err:
        return str(err)
    return None


def check_available(cfg: Config) -> None:
    """NotAvailableError naming every selected (network, method) the installed tf_bilevel cannot
    run, before anything trains."""
    problems = []
    forward = [m for m in ("forward", "forward_forget") if m in cfg.methods]
    if forward and not has_online_forward():
        problems.append(f"method(s) {', '.join(forward)} need BilevelTrainer(online=True, estimator=\"forward\", "
                        "forget=μ) (issue #16 §3), which is not available in this tf_bilevel yet: leave them out of "
                        "--methods")
    bilevel = [m for m in BILEVEL if m in cfg.methods]
    if "cnn_bn" in cfg.networks and bilevel:
        refusal = online_batch_norm_refusal()
        if refusal is not None:
            problems.append(f"network cnn_bn with the tf_bilevel method(s) {', '.join(bilevel)} needs BatchNorm in an "
                            "online inner model (issue #16 §4), which is not available in this tf_bilevel yet "
                            f"(the library says: {refusal}): run them with --networks=cnn")
    if problems:
        raise NotAvailableError("; ".join(problems) + ".")


# ----------------------------------------------------------------------------------------
# Methods: one run (network, method, seed) each.
# ----------------------------------------------------------------------------------------
def hp_values(values: dict, gamma: Callable[[dict], float]) -> dict:
    """The recorded hyperparameters: weight decays, the γ in use now, the schedule's ends if learned."""
    out = {"weight_decay": np.asarray(values["weight_decay"]).tolist(), "learning_rate": float(gamma(values))}
    for name in ("lr_peak", "lr_end"):
        if name in values:
            out[name] = float(values[name])
    return out


def run_bilevel(cfg: Config, data: dict, network: str, method: str, store: oc.MethodStore, key: str) -> dict:
    """One online tf_bilevel run of `method` (bilevel_T<T>[_K<K>], krmd_wd, forward,
    forward_forget) with seed cfg.seed; the trained CNN is tested after --epochs passes."""
    total = total_steps(cfg, len(data["train"][1]))
    bounds = hyperparameter_bounds(cfg)
    decays = learned(cfg, np.full(NUM_LAYERS, cfg.init_weight_decay, np.float32), bounds["weight_decay"])
    hyperparameters = {"weight_decay": decays}
    extra: dict[str, Any] = {}
    position: dict[str, Any] = {}  # the trainer, once built: its outer step counts hyper-iterations

    def run_position(step: Any, steps: int) -> tf.Tensor:
        # Online, the trainer hands a schedule the global inner step of the run (hyper-iteration × T + t).
        del steps
        return tf.cast(step, tf.float32)

    if method.startswith("bilevel_T"):
        steps, truncate = parse_truncation(method[len("bilevel_T"):].replace("_K", ":"))
        lr: Any = learned(cfg, cfg.init_lr, bounds["learning_rate"])
        gamma = lambda v: v["inner_learning_rate"]  # noqa: E731
        extra = dict(truncate=truncate)
    elif method == "krmd_wd":
        steps, truncate = parse_truncation(cfg.krmd, "--krmd")
        peak, end = cfg.init_lr, cfg.init_lr * cfg.final_lr_fraction
        lr = lambda step: cosine_lr(peak, end, run_position(step, steps), total)  # noqa: E731
        gamma = lambda v: float(cosine_lr(peak, end, iterations() * steps, total))  # noqa: E731
        extra = dict(truncate=truncate)
    else:  # forward, forward_forget: weight decays and the cosine schedule's two ends learned
        steps = cfg.forward_steps
        hyperparameters["lr_peak"] = learned(cfg, cfg.init_lr, bounds["learning_rate"])
        hyperparameters["lr_end"] = learned(cfg, cfg.init_lr * end_fraction(cfg), bounds["lr_end"])
        lr = lambda step, hp: cosine_lr(hp["lr_peak"], hp["lr_end"], run_position(step, steps), total)  # noqa: E731
        gamma = lambda v: float(cosine_lr(v["lr_peak"], v["lr_end"], iterations() * steps, total))  # noqa: E731
        extra = dict(estimator="forward", forget=1.0 if method == "forward" else cfg.forget)

    def iterations() -> int:
        return int(position["trainer"].optimizer.iterations.numpy())

    batch_norm = tfb.keras.BatchNormalization  # exact second derivatives (tf_bilevel/keras/layers.py)
    model = oc.build_on(build_cnn(None, cfg.seed, network, batch_norm), (28, 28, 1))
    ce = tfb.keras.losses.sparse_categorical_crossentropy
    trainer = tfb.BilevelTrainer(
        model, inner_loss=ce, outer_loss=ce, steps=steps, hyperparameters=hyperparameters,
        inner_regularizer=weight_decay_regularizer(kernel_indices(model)), inner_learning_rate=lr,
        inner_optimizer=lambda rate: tfb.momentum(rate, beta=cfg.momentum), seed=cfg.seed, online=True, **extra)
    position["trainer"] = trainer
    trainer.compile(optimizer=keras.optimizers.Adam(cfg.outer_lr), metrics=["accuracy"], jit_compile=cfg.jit_compile)
    summary = lambda values: hp_values(values, gamma)  # noqa: E731
    recorder = oc.fit_online(trainer, model, key, data, cfg, store, summary, steps)
    return oc.final_row(recorder, steps=steps, **extra, hyper_iterations=recorder.epochs * recorder.steps_per_epoch,
                        hyperparameters=summary(trainer.hyperparameter_values()))


def fit_plain(cfg: Config, data: dict, network: str, key: str, weight_decays: Sequence[float], lr: Any,
              store: oc.MethodStore) -> oc.EpochRecorder:
    """Trains the CNN with fixed hyperparameters for --epochs epochs (resumable), as Keras does."""
    model = compile_plain(oc.build_on(build_cnn(weight_decays, cfg.seed, network), (28, 28, 1)), cfg, lr)
    return oc.fit_keras(model, key, data["train"], test=data["test"], val=data["val"], epochs=cfg.epochs,
                        steps_per_epoch=len(data["train"][1]) // cfg.batch_size, batch_size=cfg.batch_size,
                        seed=cfg.seed, store=store)


def cosine_schedule(cfg: Config, n_train: int, peak: Optional[float] = None) -> keras.optimizers.schedules.LearningRateSchedule:
    """Keras' CosineDecay from `peak` (default --init_lr) to --final_lr_fraction × peak over the run."""
    peak = cfg.init_lr if peak is None else peak
    return keras.optimizers.schedules.CosineDecay(peak, total_steps(cfg, n_train), alpha=cfg.final_lr_fraction)


def run_plain(cfg: Config, data: dict, network: str, method: str, store: oc.MethodStore, key: str) -> dict:
    """default: the initial hyperparameters, constant γ; default_cosine: the same on the fixed
    cosine schedule of krmd_wd (Keras' CosineDecay)."""
    hp = {"weight_decay": [cfg.init_weight_decay] * NUM_LAYERS, "learning_rate": cfg.init_lr}
    lr = cfg.init_lr if method == "default" else cosine_schedule(cfg, len(data["train"][1]))
    if method == "default_cosine":
        hp["schedule"] = f"cosine to {cfg.final_lr_fraction} x"
    recorder = fit_plain(cfg, data, network, key, hp["weight_decay"], lr, store)
    return oc.final_row(recorder, hyperparameters=hp)


class TrialRecord(keras.callbacks.Callback):
    """One KerasTuner trial's curve (cumulative fit seconds, validation accuracy per epoch) in
    `path`, written at every epoch end before the trial's checkpoint and, when the trial resumes
    from its checkpoint, cut back to the restored epoch; at the end of the trial its entry in the
    trials log `log_path` (fit seconds over every session, best validation accuracy: KerasTuner's
    score, and the test accuracy of the model it ends with, evaluated outside the timed span).
    KerasTuner deep-copies callbacks per trial: the state lives in the files."""

    def __init__(self, path: str, log_path: str, test: tuple, trial_id: str, initial_epoch: int, backup_dir: str):
        super().__init__()
        self.path, self.log_path, self.test, self.trial_id = path, log_path, test, trial_id
        self.initial_epoch, self.backup_dir = initial_epoch, backup_dir

    def on_train_begin(self, logs=None):
        restored = oc.restored_epoch(self.backup_dir)
        self.rec = {"epoch": [self.initial_epoch], "seconds": [0.0], "val_accuracy": [None]}
        if restored > self.initial_epoch:
            saved = read_state_json(self.path, f"delete {self.backup_dir} to rerun the trial, {RESTART_HINT}",
                                       ("epoch", "seconds", "val_accuracy"))
            keep = [i for i, e in enumerate(saved["epoch"]) if e <= restored]
            self.rec = {k: [saved[k][i] for i in keep] for k in self.rec}
            if self.rec["epoch"][-1] != restored:
                raise StateFileError(f"{self.path} stops before the trial's checkpoint (epoch {restored}): delete "
                                        f"{self.backup_dir} to rerun the trial, {RESTART_HINT}")
            print(f"[trial {self.trial_id}] resumed at epoch {restored}", flush=True)

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.rec["epoch"].append(epoch + 1)
        self.rec["seconds"].append(self.rec["seconds"][-1] + time.perf_counter() - self._t0)
        self.rec["val_accuracy"].append(float((logs or {}).get("val_accuracy", -1.0)))
        write_json_atomically(self.path, self.rec)

    def on_train_end(self, logs=None):
        entry = {"trial_id": self.trial_id, "fit_seconds": self.rec["seconds"][-1], "val_accuracy": self.best(),
                 "test_accuracy": oc.accuracy(self.model, *self.test)}
        entries = [e for e in trial_entries(self.log_path) if e.get("trial_id") != self.trial_id]
        write_json_atomically(self.log_path, entries + [entry])

    def best(self) -> float:
        return max([v for v in self.rec["val_accuracy"] if v is not None], default=-1.0)


def trial_entries(path: str) -> list:
    """The trials log (a JSON list; [] before the first trial ends)."""
    if not os.path.exists(path):
        return []
    remedy = f"delete it and the tuner's folder to redo the search, {RESTART_HINT}"
    try:
        with open(path) as f:
            entries = json.load(f)
    except ValueError as err:
        raise damaged(path, f"not valid JSON: {err}", remedy) from None
    if not isinstance(entries, list):
        raise damaged(path, f"a JSON {type(entries).__name__} where a list was written", remedy)
    return entries


def resumable_tuner(tuner_class: type) -> type:
    """`tuner_class` whose trials resume per epoch: each trial fits with a BackupAndRestore of its
    own under <project>/backup/<trial id>, on the minibatch stream from where the checkpoint was
    taken, with a TrialRecord. KerasTuner itself reruns a trial interrupted by a kill (its
    retry queue); with the checkpoint that rerun continues from the last finished epoch. The
    objective reported is the best validation accuracy over all the trial's epochs (the
    resumed part's History alone would miss the epochs before the kill). Set `trial_setup`
    (stream(start) -> dataset, steps_per_epoch, test, log_path, pause_epoch) before `search`."""

    class Resumable(tuner_class):
        def run_trial(self, trial, *args, **kwargs):
            setup = self.trial_setup
            backup = os.path.join(self.project_dir, "backup", trial.trial_id)
            os.makedirs(os.path.dirname(backup), exist_ok=True)
            initial = int(trial.hyperparameters.values.get("tuner/initial_epoch", 0))
            restored = oc.restored_epoch(backup)
            start = max(0, restored - initial) * setup["steps_per_epoch"]
            record = TrialRecord(os.path.join(self.project_dir, "backup", f"{trial.trial_id}.record.json"),
                                 setup["log_path"], setup["test"], trial.trial_id, initial, backup)
            callbacks = [record, keras_resume.CheckedBackupAndRestore(
                backup, f"delete {backup} to rerun the trial, {RESTART_HINT}", delete_checkpoint=True)]
            if setup.get("pause_epoch"):
                callbacks.append(keras_resume.PauseOnce(setup["pause_marker"], epoch=setup["pause_epoch"]))
            kwargs["callbacks"] = callbacks + list(kwargs.get("callbacks", []))
            super().run_trial(trial, setup["stream"](start), *args[1:], **kwargs)
            curve = read_state_json(record.path, f"delete {backup} to rerun the trial, {RESTART_HINT}", ("val_accuracy",))
            return {"val_accuracy": max([v for v in curve["val_accuracy"] if v is not None], default=-1.0)}

    Resumable.__name__ = Resumable.__qualname__ = f"Resumable{tuner_class.__name__}"
    return Resumable


def make_tuner(cfg: Config, network: str, kind: str, build: Callable) -> Any:
    try:
        import keras_tuner as kt
    except ImportError:
        raise SystemExit(
            "online_hpo: the KerasTuner baselines need keras-tuner: pip install \"tf_bilevel[baselines]\" "
            "(or run --methods=bilevel,default)"
        ) from None
    common = dict(objective="val_accuracy", seed=cfg.seeds[0], directory=os.path.join(cfg.output_dir, "tuner", network),
                  project_name=kind, overwrite=False)
    if kind == "random_search":
        return resumable_tuner(kt.RandomSearch)(build, max_trials=cfg.tuner_trials, **common)
    if kind == "bayesian":
        try:
            import scipy  # noqa: F401  (KerasTuner's Bayesian oracle needs both)
            import sklearn  # noqa: F401
        except ImportError:
            raise SystemExit("online_hpo: method bayesian needs scipy and scikit-learn: pip install "
                             "\"keras-tuner[bayesian]\" "
                             "(or leave bayesian out of --methods)") from None
        return resumable_tuner(kt.BayesianOptimization)(build, max_trials=cfg.bayesian_trials, **common)
    return resumable_tuner(kt.Hyperband)(build, max_epochs=cfg.epochs, factor=cfg.hyperband_factor,
                                         hyperband_iterations=1, **common)


def run_search(cfg: Config, data: dict, network: str, kind: str, store: oc.MethodStore) -> dict:
    """A KerasTuner search (resumable from its last finished trial through its own directory) with
    the first seed's initial weights and minibatch order; its best configuration and trials."""
    seed = cfg.seeds[0]

    def build(hp) -> keras.Model:
        decays = [hp.Float(f"weight_decay_{l}", *cfg.weight_decay_range, sampling="log") for l in range(NUM_LAYERS)]
        # The tuner searches the peak of the cosine schedule: the strongest schedule of the baselines.
        peak = hp.Float("learning_rate", *cfg.lr_range, sampling="log")
        return compile_plain(build_cnn(decays, seed, network), cfg, cosine_schedule(cfg, len(data["train"][1]), peak))

    tuner = make_tuner(cfg, network, kind, build)
    key = search_key(network, kind)
    log_path = store.path(key, ".trials.json")
    steps_per_epoch = len(data["train"][1]) // cfg.batch_size
    pause = store.pause if store.pause and store.pause[0] == key else None
    tuner.trial_setup = dict(
        stream=lambda start: oc.minibatch_stream(*data["train"], cfg.batch_size, seed, start).prefetch(2),
        steps_per_epoch=steps_per_epoch, test=data["test"], log_path=log_path,
        pause_epoch=pause[1] if pause else None, pause_marker=os.path.join(store.root, f"paused_{key}_{pause[1]}")
        if pause else None)
    load_start, t0 = os.getloadavg(), time.time()
    print(f"[{key}] search", flush=True)
    tuner.search(None, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs, validation_data=data["val"],
                 validation_batch_size=1000, shuffle=False, verbose=0)
    failed = [t.trial_id for t in tuner.oracle.trials.values() if t.status == "FAILED"]
    if failed:  # KerasTuner logs a failing trial and goes on: its "best" would be a silent wrong answer
        raise RuntimeError(f"[{key}] KerasTuner trial(s) {failed} failed (their errors are above); fix the cause and "
                           f"rerun (the finished trials are kept), or delete {tuner.project_dir} to redo the search.")
    trials = trial_entries(log_path)
    best = tuner.get_best_hyperparameters(1)[0].values
    hp = {"weight_decay": [best[f"weight_decay_{l}"] for l in range(NUM_LAYERS)],
          "learning_rate": best["learning_rate"], "schedule": "cosine, peak learning_rate"}
    search_seconds = float(sum(t["fit_seconds"] for t in trials))
    print(f"[{network}.{kind}] {len(trials)} fits in {search_seconds:.0f} s; best {hp}", flush=True)
    return {"hyperparameters": hp, "trials": trials, "search_seconds": search_seconds, "num_fits": len(trials),
            "search_seed": seed, "session_wall_seconds": time.time() - t0,
            "load_average_start": list(load_start), "load_average_end": list(os.getloadavg())}


def timed_run(train: Callable[[], dict]) -> Callable[[], dict]:
    """`train` with the wall clock of this session's part of it (evaluation included) and the
    load averages around it (2 shared cores here: other processes inflate the wall clocks)."""
    def run() -> dict:
        load_start, t0 = os.getloadavg(), time.time()
        row = train()
        return {**row, "session_wall_seconds": time.time() - t0, "load_average_start": list(load_start),
                "load_average_end": list(os.getloadavg())}
    return run


def run_methods(cfg: Config, data: dict, store: oc.MethodStore) -> dict:
    """Every (network, method, seed) run, the baselines first; {"<network>/<method>": group}
    with the per-seed rows, the tuner's search, and the mean ± std summary."""
    groups: dict[str, dict] = {}
    for method in method_names(cfg):
        for network in cfg.networks:
            group = {"network": network, "method": method, "seeds": list(cfg.seeds), "runs": {}}
            hp = None
            if method in TUNERS:
                search = store.run_once(search_key(network, method), timed_run(
                    lambda: run_search(cfg, data, network, method, store)),
                    required=("hyperparameters", "trials", "search_seconds"))
                group["search"] = search
                hp = search["hyperparameters"]
            for seed in cfg.seeds:
                key, run_cfg = run_key(network, method, seed), cfg.for_seed(seed)
                if method in TUNERS:
                    train = lambda: oc.final_row(fit_plain(run_cfg, data, network, key, hp["weight_decay"],  # noqa: E731
                                                           cosine_schedule(run_cfg, len(data["train"][1]),
                                                                           hp["learning_rate"]), store),
                                                 hyperparameters=hp)
                elif method in PLAIN:
                    train = lambda: run_plain(run_cfg, data, network, method, store, key)  # noqa: E731
                else:
                    train = lambda: run_bilevel(run_cfg, data, network, method, store, key)  # noqa: E731
                keras.utils.set_random_seed(seed)
                group["runs"][str(seed)] = store.run_once(key, timed_run(train))
            group["summary"] = summarize(group)
            groups[f"{network}/{method}"] = group
    return groups


# ----------------------------------------------------------------------------------------
# Aggregation.
# ----------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> dict:
    """{"mean", "std" (sample standard deviation, ddof = 1; None for one value), "n"}."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_std: no values")
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else None, "n": int(x.size)}


def summarize(group: dict) -> dict:
    """Mean ± std over the seeds of the test / validation accuracy and the training seconds; for a
    tuner also the search seconds and the wall clock a user pays: search + one retraining."""
    runs = list(group["runs"].values())
    out = {key: mean_std([r[key] for r in runs]) for key in ("test_accuracy", "val_accuracy", "train_seconds")}
    wall = out["train_seconds"]["mean"]
    if "search" in group:
        out["search_seconds"] = group["search"]["search_seconds"]
        wall += group["search"]["search_seconds"]
    out["wall_seconds"] = wall
    return out


def format_pm(stats: dict, scale: float = 1.0, digits: int = 2) -> str:
    """"mean ± std" (std omitted for one seed)."""
    text = f"{scale * stats['mean']:.{digits}f}"
    return text if stats["std"] is None else f"{text} ± {scale * stats['std']:.{digits}f}"


def target_check(groups: dict) -> dict:
    """Issue #16's goal per network and tf_bilevel method: mean test accuracy ≥ the best tuner's
    mean − 0.1 points, in at most a third of that tuner's wall clock (search + retraining)."""
    out = {}
    for network in dict.fromkeys(g["network"] for g in groups.values()):
        mine = {g["method"]: g for g in groups.values() if g["network"] == network}
        tuners = {k: g for k, g in mine.items() if k in TUNERS}
        if not tuners:
            continue
        best_name = max(tuners, key=lambda k: tuners[k]["summary"]["test_accuracy"]["mean"])
        best = tuners[best_name]["summary"]
        entry = {"best_tuner": best_name, "best_tuner_test_accuracy": best["test_accuracy"]["mean"],
                 "best_tuner_seconds": best["wall_seconds"], "runs": {}}
        for name, g in mine.items():
            if name in TUNERS or name in PLAIN:
                continue
            gap = g["summary"]["test_accuracy"]["mean"] - best["test_accuracy"]["mean"]
            ratio = g["summary"]["wall_seconds"] / best["wall_seconds"]
            entry["runs"][name] = {"accuracy_gap_points": 100 * gap, "time_ratio": ratio,
                                   "reached": bool(gap >= -0.001 and ratio <= 1 / 3)}
        out[network] = entry
    return out


def format_table(results: dict) -> str:
    lines = [f"{'network':>7} {'method':>16} {'seeds':>5} {'test acc % (mean ± std)':>23} {'train s':>15} "
             f"{'search s':>8} {'wall s':>7}  load avg  hyperparameters (seed {results['config']['seeds'][0]})"]
    for name, g in results["methods"].items():
        s, first = g["summary"], next(iter(g["runs"].values()))
        hp = first["hyperparameters"]
        decay = " ".join(f"{d:.1e}" for d in hp["weight_decay"])
        loads = [r["load_average_start"][0] for r in g["runs"].values() if "load_average_start" in r]
        search = f"{s['search_seconds']:.0f}" if "search_seconds" in s else "-"
        lines.append(f"{g['network']:>7} {g['method']:>16} {s['test_accuracy']['n']:>5} "
                     f"{format_pm(s['test_accuracy'], 100):>23} {format_pm(s['train_seconds'], 1, 0):>15} "
                     f"{search:>8} {s['wall_seconds']:>7.0f}  {np.mean(loads) if loads else float('nan'):>8.1f}  "
                     f"wd=[{decay}] lr={hp['learning_rate']:.3g}")
    for network, t in (results.get("target") or {}).items():
        for name, r in t["runs"].items():
            lines.append(f"target {network}/{name}: {r['accuracy_gap_points']:+.2f} points vs {t['best_tuner']}, "
                         f"{r['time_ratio']:.2f}x its wall clock -> {'reached' if r['reached'] else 'NOT reached'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Figures.
# ----------------------------------------------------------------------------------------
def seed_curves(group: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per epoch: mean training seconds, and mean and std of the test accuracy over the seeds
    (the epochs every seed has evaluated)."""
    recs = [r["record"] for r in group["runs"].values()]
    n = min(len(r["epoch"]) for r in recs)
    secs = np.mean([r["train_seconds"][:n] for r in recs], axis=0)
    acc = np.asarray([[np.nan if a is None else a for a in r["test_accuracy"][:n]] for r in recs], float)
    return secs, np.nanmean(acc, axis=0), (np.nanstd(acc, axis=0, ddof=1) if len(recs) > 1 else np.zeros(n))


def plot_figures(results: dict, output_dir: str) -> dict:
    from experiments.common import plotting

    plt, groups, cfg = plotting.plt, results["methods"], results["config"]
    networks = list(dict.fromkeys(g["network"] for g in groups.values()))
    budget = (f"{cfg['epochs']} epochs of {results['data']['n_train']} images, batch {cfg['batch_size']}, "
              f"seeds {cfg['seeds']}; RandomSearch {cfg['tuner_trials']} trials, Hyperband factor "
              f"{cfg['hyperband_factor']}")
    fig, axes = plt.subplots(1, len(networks), figsize=(8 * len(networks), 5.5), squeeze=False)
    for ax, network in zip(axes[0], networks):
        shown = []
        for name, g in groups.items():
            if g["network"] != network:
                continue
            secs, mean, std = seed_curves(g)
            offset = g.get("search", {}).get("search_seconds", 0.0)
            x = offset + secs[1:]
            line, = ax.plot(np.maximum(x, 1.0), mean[1:], "o-", ms=3,
                            label=f"{g['method']}" + (" (after the search)" if offset else ""))
            ax.fill_between(np.maximum(x, 1.0), (mean - std)[1:], (mean + std)[1:], color=line.get_color(), alpha=0.2)
            shown += list((mean - std)[1:]) + list((mean + std)[1:])
            if offset:  # the search: cumulative trial time, best-so-far trial's test accuracy
                t, best_val, best_test, cx, cy = 0.0, -1.0, np.nan, [], []
                for trial in g["search"]["trials"]:
                    t += trial["fit_seconds"]
                    if trial["val_accuracy"] > best_val:
                        best_val, best_test = trial["val_accuracy"], trial["test_accuracy"]
                    cx.append(t)
                    cy.append(best_test)
                ax.step(np.maximum(cx, 1.0), cy, "x", where="post", ls="--", color=line.get_color(), lw=0.8)
        ax.set_xscale("log")
        shown = [v for v in shown if np.isfinite(v)]
        if shown:
            ax.set_ylim(max(0.0, min(shown) - 0.01), min(1.0, max(shown) + 0.005))
        ax.set_title(f"{network}: test accuracy (mean ± std over seeds) vs wall clock", fontsize=10)
        ax.set_xlabel("training wall clock (s, log; tuners: search, dashed = best trial so far, then retraining)")
        ax.set_ylabel("test accuracy (fraction)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Fashion-MNIST: {budget}", fontsize=9)
    figures = {"accuracy_vs_wallclock": plotting.save_figure(fig, os.path.join(output_dir, "accuracy_vs_wallclock.png"))}

    learned = {k: g for k, g in groups.items() if any(r["record"]["hp"] for r in g["runs"].values())}
    if learned:
        fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
        colors = plt.get_cmap("tab10")
        for i, (name, g) in enumerate(learned.items()):
            for j, row in enumerate(g["runs"].values()):
                rec = row["record"]
                its = row["steps"] * np.asarray(rec["hp_iteration"])  # minibatches seen
                decay = np.asarray([h["weight_decay"] for h in rec["hp"]])
                label = name if j == 0 else None
                for l in range(decay.shape[1]):
                    axes[0].semilogy(its, decay[:, l], color=colors(i % 10), ls=["-", "--", ":", "-."][l % 4], lw=0.8,
                                     label=f"{label} layer {l + 1}" if label else None)
                axes[1].semilogy(its, [h["learning_rate"] for h in rec["hp"]], color=colors(i % 10), lw=0.8, label=label)
        for name, g in groups.items():
            if g["method"] in TUNERS:
                axes[1].axhline(g["search"]["hyperparameters"]["learning_rate"], color="gray", lw=0.8, ls=":")
        axes[0].set_ylabel(r"per-layer weight decay $\lambda_l$ (log)")
        axes[1].set_ylabel(r"learning rate $\gamma$ in use (log; tuners' choices dotted)")
        for ax in axes:
            ax.set_xlabel("training minibatches")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
        fig.suptitle(f"Hyperparameters learned online, every seed, recorded every {cfg['hp_every']} hyper-iterations",
                     fontsize=10)
        figures["hyperparameters"] = plotting.save_figure(fig, os.path.join(output_dir, "hyperparameters.png"))
    return {k: os.path.basename(v) for k, v in figures.items()}


# ----------------------------------------------------------------------------------------
# The experiment.
# ----------------------------------------------------------------------------------------
def prepared(cfg: Config) -> Config:
    """The Config checked (ValueError names the flag) and the selected methods checked against
    the installed tf_bilevel (NotAvailableError), before anything trains."""
    cfg = cfg.validated()
    check_available(cfg)
    return cfg


PROGRAM = program.Program(
    "online_hpo", Config, PRESETS, experiment=oc.methods_experiment("online_hpo", run_methods, target_check),
    load_data=load_data, figures=plot_figures, table=format_table, prepare=prepared, state_dirs=("resume", "tuner"),
    fingerprint="resume", fingerprint_what="the runs", data_name=lambda cfg: "Fashion-MNIST")


def run_experiment(cfg: Config, arrays: Optional[dict] = None, data_info: Optional[dict] = None) -> dict:
    """Runs the selected runs (skipping finished ones), writes results.json and the figures;
    holds an exclusive lock on cfg.output_dir; --restart discards the saved state first."""
    return program.run_program(PROGRAM, cfg, None if arrays is None else (arrays, data_info))


if __name__ == "__main__":
    program.start(PROGRAM)
