r"""Tune while you train: per-layer weight decay and the learning rate of a small CNN on
Fashion-MNIST, learned online with K-RMD, against the defaults and KerasTuner (issue #11 §5).

Trains the CNN once per method (bilevel online for each --truncate, the default
hyperparameters, KerasTuner RandomSearch and Hyperband) and compares test accuracy against
training wall-clock; writes results.json and figures to --output_dir. A killed run continues
when the same command is rerun. Methods, settings and the measured results: RESULTS.md, "Online
hyperparameter optimization of a CNN vs KerasTuner".

  tfb-online-hpo                                     # the full comparison
  tfb-online-hpo --truncate=1,20:1 --methods=bilevel # T = 1, and T = 20 with K = 1
  tfb-online-hpo --preset=quick                      # tiny budget (tests)
  (or python -m experiments.online_hpo ...)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_bilevel as tfb  # noqa: E402
from experiments import online_common as oc  # noqa: E402
from experiments.run_state import (  # noqa: E402
    STATE_ERRORS, discard_state, exclusive_output_dir, exit_with_error, guard_settings, jsonable, write_json_atomically,
)

METHODS = ("bilevel", "default", "random_search", "hyperband")
NUM_LAYERS = 4  # kernels: conv1, conv2, dense, classifier

PRESETS: dict[str, dict[str, Any]] = {
    # The full comparison: T = K ∈ {1, 5, 20}, 10 epochs, 20 random-search trials, Hyperband.
    "full": {},
    # One bilevel run against the default only (minutes): a first look.
    "bilevel_only": dict(truncate=(1,), methods=("bilevel", "default")),
    # Tests: a slice of the data, 2 epochs, 2 random-search trials.
    "quick": dict(truncate=(1, 4), epochs=2, n_train=2048, n_val=512, n_test=1000, tuner_trials=2,
                  val_batch_size=128, hp_every=2),
}


@dataclasses.dataclass
class Config:
    output_dir: str = "out/online_hpo"
    methods: Sequence[str] = METHODS
    truncate: Sequence[Any] = (1, 5, 20)  # T (K = T) or "T:K"
    epochs: int = 10
    batch_size: int = 128
    val_batch_size: int = 256
    n_val: int = 6000
    n_train: Optional[int] = None  # None: all training images outside the validation split
    n_test: Optional[int] = None  # None: all 10 000
    init_weight_decay: float = 5e-4
    init_lr: float = 0.05
    momentum: float = 0.9
    weight_decay_range: Sequence[float] = (1e-6, 1e-2)
    lr_range: Sequence[float] = (1e-3, 0.3)
    outer_lr: float = 0.01
    tuner_trials: int = 20
    hyperband_factor: int = 3
    hp_every: int = 10
    seed: int = 0
    jit_compile: bool = False  # XLA on CPU: ~15x slower for the conv second derivatives (RESULTS.md)
    local_dir: Optional[str] = None  # folder of Fashion-MNIST IDX files (--local_dir)
    data_dir: Optional[str] = None
    preset: str = ""

    def validated(self) -> "Config":
        cfg = dataclasses.replace(self)
        cfg.methods = tuple(dict.fromkeys(cfg.methods))
        bad = [m for m in cfg.methods if m not in METHODS]
        if bad or not cfg.methods:
            raise ValueError(f"--methods: choose from {list(METHODS)}, got {list(self.methods)}")
        cfg.truncate = tuple(sorted({parse_truncation(t) for t in cfg.truncate}))
        if "bilevel" in cfg.methods and not cfg.truncate:
            raise ValueError("--truncate: give at least one T (or T:K)")
        for name in ("epochs", "batch_size", "val_batch_size", "n_val", "tuner_trials", "hp_every"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.hyperband_factor < 2:
            raise ValueError(f"--hyperband_factor must be >= 2, got {cfg.hyperband_factor}")
        for name in ("weight_decay_range", "lr_range"):
            low, high = (float(v) for v in getattr(cfg, name))
            if not 0 < low < high:
                raise ValueError(f"--{name} must be LOW,HIGH with 0 < LOW < HIGH, got {getattr(cfg, name)}")
            setattr(cfg, name, (low, high))
        for name in ("init_weight_decay", "init_lr", "outer_lr"):
            if not getattr(cfg, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(cfg, name)}")
        if not 0 <= cfg.momentum < 1:
            raise ValueError(f"--momentum must be in [0, 1), got {cfg.momentum}")
        return cfg


def parse_truncation(value: Any) -> tuple[int, int]:
    """T (K = T), "T:K" or (T, K) -> (T, K) with 1 <= K <= T."""
    try:
        if isinstance(value, (tuple, list)):
            steps, truncate = (int(v) for v in value)
        elif isinstance(value, str) and ":" in value:
            steps, truncate = (int(v) for v in value.split(":"))
        else:
            steps = truncate = int(value)
    except ValueError:
        raise ValueError(f"--truncate: each entry is T or T:K (integers), got {value!r}") from None
    if not 1 <= truncate <= steps:
        raise ValueError(f"--truncate: each entry needs 1 <= K <= T, got {value!r}")
    return steps, truncate


def method_name(steps: int, truncate: int) -> str:
    return f"bilevel_T{steps}" if truncate == steps else f"bilevel_T{steps}_K{truncate}"


def apply_preset(cfg: Config, preset: str, explicit: Sequence[str] = ()) -> Config:
    """`cfg` with the preset's values, except for the fields in `explicit` (set by the user)."""
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return dataclasses.replace(cfg, preset=preset, **{k: v for k, v in PRESETS[preset].items() if k not in explicit})


# ----------------------------------------------------------------------------------------
# Data and model.
# ----------------------------------------------------------------------------------------
def load_data(cfg: Config) -> tuple[dict, dict]:
    """{"train", "val", "test": (x float32 [N, 28, 28, 1], y int32 [N])} and a description.
    The validation split is a seeded random subset of the training split."""
    from experiments import datasets

    data = datasets.load_image_classification("fashion_mnist", data_dir=cfg.data_dir, local_dir=cfg.local_dir)
    (x, y), (x_test, y_test) = data["train"], data["test"]
    if cfg.n_val >= len(y):
        raise ValueError(f"--n_val={cfg.n_val} leaves no training images out of {len(y)}")
    order = np.random.default_rng(cfg.seed).permutation(len(y))
    val_idx, train_idx = order[: cfg.n_val], order[cfg.n_val:]
    if cfg.n_train is not None:
        train_idx = train_idx[: cfg.n_train]
    n_test = len(y_test) if cfg.n_test is None else min(cfg.n_test, len(y_test))
    arrays = {
        "train": (oc.scale_images(x[train_idx]), y[train_idx].astype(np.int32)),
        "val": (oc.scale_images(x[val_idx]), y[val_idx].astype(np.int32)),
        "test": (oc.scale_images(x_test[:n_test]), y_test[:n_test].astype(np.int32)),
    }
    longest = max((t for t, _ in cfg.truncate), default=1)
    if len(arrays["train"][1]) < cfg.batch_size * longest:
        raise ValueError(f"{len(arrays['train'][1])} training images do not fill one hyper-iteration of "
                         f"T={longest} minibatches of {cfg.batch_size}")
    info = {"dataset": "fashion_mnist", "n_train": len(train_idx), "n_val": cfg.n_val, "n_test": n_test,
            "source": datasets.data_source("fashion_mnist")}
    return arrays, info


def build_cnn(weight_decays: Optional[Sequence[float]] = None, seed: int = 0) -> keras.Model:
    """The small CNN; `weight_decays` (one per kernel) become Keras L2 kernel regularizers
    (the baselines); the bilevel run has none (its decay is the inner_regularizer)."""
    def reg(layer: int):
        return None if weight_decays is None else keras.regularizers.L2(float(weight_decays[layer]))

    def init(layer: int):
        return keras.initializers.GlorotUniform(seed=seed + layer)

    layers = keras.layers
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Conv2D(32, 3, activation="relu", kernel_initializer=init(0), kernel_regularizer=reg(0)),
        layers.MaxPooling2D(),
        layers.Conv2D(64, 3, activation="relu", kernel_initializer=init(1), kernel_regularizer=reg(1)),
        layers.MaxPooling2D(),
        layers.Flatten(),
        layers.Dense(128, activation="relu", kernel_initializer=init(2), kernel_regularizer=reg(2)),
        layers.Dense(10, kernel_initializer=init(3), kernel_regularizer=reg(3)),
    ], name="cnn")


def kernel_indices(model: keras.Model) -> list[int]:
    """Positions of the kernels (not biases) in `model.trainable_weights`, layer order."""
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


def compile_plain(model: keras.Model, cfg: Config, lr: float) -> keras.Model:
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=cfg.momentum), loss=oc.sparse_ce_logits(),
                  metrics=["accuracy"], jit_compile=cfg.jit_compile)
    return model


# ----------------------------------------------------------------------------------------
# Methods.
# ----------------------------------------------------------------------------------------
def hp_summary(values: dict) -> dict:
    return {"weight_decay": np.asarray(values["weight_decay"]).tolist(),
            "learning_rate": float(values["inner_learning_rate"])}


def run_bilevel(cfg: Config, data: dict, steps: int, store: oc.MethodStore, truncate: Optional[int] = None) -> dict:
    """One online run with T = `steps` and K = `truncate` (default T); the trained CNN is tested
    after --epochs passes."""
    truncate = steps if truncate is None else truncate
    method = method_name(steps, truncate)
    if (row := store.row(method)) is not None:
        print(f"[{method}] finished earlier", flush=True)
        return row
    model = oc.build_on(build_cnn(None, cfg.seed), (28, 28, 1))
    ce = tfb.keras.losses.sparse_categorical_crossentropy
    trainer = tfb.BilevelTrainer(
        model, inner_loss=ce, outer_loss=ce, steps=steps, truncate=truncate,
        hyperparameters={"weight_decay": tfb.Hyperparameter(np.full(NUM_LAYERS, cfg.init_weight_decay),
                                                            transform="exp")},
        inner_regularizer=weight_decay_regularizer(kernel_indices(model)),
        inner_learning_rate=tfb.Hyperparameter(cfg.init_lr, transform="exp"),
        inner_optimizer=lambda lr: tfb.momentum(lr, beta=cfg.momentum),
        seed=cfg.seed, online=True)
    trainer.compile(optimizer=keras.optimizers.Adam(cfg.outer_lr), metrics=["accuracy"], jit_compile=cfg.jit_compile)
    steps_per_epoch = len(data["train"][1]) // (cfg.batch_size * steps)
    tasks = trainer.resumable(lambda start: oc.online_task_stream(
        data["train"], data["val"], steps=steps, batch_size=cfg.batch_size, val_batch_size=cfg.val_batch_size,
        seed=cfg.seed, start=start))
    trainer.build_from_spec(tasks.element_spec)
    recorder = oc.EpochRecorder(f"[{method}]", cfg.epochs, steps_per_epoch, model, data["test"], data["val"],
                                store.record_path(method), hp_every=cfg.hp_every, hyperparameters=hp_summary)
    trainer.fit(tasks, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                callbacks=store.callbacks(method, recorder), verbose=0)
    recorder.finish()
    return store.save(method, oc.final_row(
        recorder, steps=steps, truncate=truncate, hyper_iterations=cfg.epochs * steps_per_epoch,
        hyperparameters=hp_summary(trainer.hyperparameter_values())))


def fit_plain(cfg: Config, data: dict, method: str, weight_decays: Sequence[float], lr: float,
              store: oc.MethodStore) -> oc.EpochRecorder:
    """Trains the CNN with fixed hyperparameters for --epochs epochs (resumable), as Keras does."""
    model = compile_plain(oc.build_on(build_cnn(weight_decays, cfg.seed), (28, 28, 1)), cfg, lr)
    return oc.fit_keras(model, method, data["train"], test=data["test"], val=data["val"], epochs=cfg.epochs,
                        steps_per_epoch=len(data["train"][1]) // cfg.batch_size, batch_size=cfg.batch_size,
                        seed=cfg.seed, store=store)


def run_default(cfg: Config, data: dict, store: oc.MethodStore) -> dict:
    if (row := store.row("default")) is not None:
        print("[default] finished earlier", flush=True)
        return row
    hp = {"weight_decay": [cfg.init_weight_decay] * NUM_LAYERS, "learning_rate": cfg.init_lr}
    recorder = fit_plain(cfg, data, "default", hp["weight_decay"], hp["learning_rate"], store)
    return store.save("default", oc.final_row(recorder, hyperparameters=hp))


class TrialLog(keras.callbacks.Callback):
    """Appends one line per KerasTuner fit to a JSON file: its fit seconds, best validation
    accuracy (KerasTuner's score) and the test accuracy of the model it ends with (evaluated
    outside the timed span). KerasTuner deep-copies callbacks per trial; this one is shared."""

    def __init__(self, path: str, test: tuple):
        super().__init__()
        self.path, self.test = path, test

    def __deepcopy__(self, memo):
        return self

    def entries(self) -> list:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return json.load(f)

    def on_train_begin(self, logs=None):
        self._t0, self._best = time.perf_counter(), -1.0

    def on_epoch_end(self, epoch, logs=None):
        self._best = max(self._best, float((logs or {}).get("val_accuracy", -1.0)))

    def on_train_end(self, logs=None):
        seconds = time.perf_counter() - self._t0
        entry = {"fit_seconds": seconds, "val_accuracy": self._best, "test_accuracy": oc.accuracy(self.model, *self.test)}
        write_json_atomically(self.path, self.entries() + [entry])


def run_tuner(cfg: Config, data: dict, kind: str, store: oc.MethodStore) -> dict:
    """KerasTuner search (resumable through its own directory), then the best configuration
    retrained like the default method."""
    try:
        import keras_tuner as kt
    except ImportError:
        raise SystemExit(
            "online_hpo: the KerasTuner baselines need keras-tuner: pip install \"tf_bilevel[baselines]\" "
            "(or run --methods=bilevel,default)"
        ) from None

    if (row := store.row(kind)) is not None:
        print(f"[{kind}] finished earlier", flush=True)
        return row

    def build(hp) -> keras.Model:
        decays = [hp.Float(f"weight_decay_{l}", *cfg.weight_decay_range, sampling="log") for l in range(NUM_LAYERS)]
        lr = hp.Float("learning_rate", *cfg.lr_range, sampling="log")
        return compile_plain(build_cnn(decays, cfg.seed), cfg, lr)

    common = dict(objective="val_accuracy", seed=cfg.seed, directory=os.path.join(cfg.output_dir, "tuner"),
                  project_name=kind, overwrite=False)
    if kind == "random_search":
        tuner = kt.RandomSearch(build, max_trials=cfg.tuner_trials, **common)
    else:
        tuner = kt.Hyperband(build, max_epochs=cfg.epochs, factor=cfg.hyperband_factor, hyperband_iterations=1,
                             **common)
    log = TrialLog(os.path.join(store.root, f"{kind}.trials.json"), data["test"])
    steps_per_epoch = len(data["train"][1]) // cfg.batch_size
    print(f"[{kind}] search", flush=True)
    tuner.search(oc.minibatch_stream(*data["train"], cfg.batch_size, cfg.seed).prefetch(2),
                 steps_per_epoch=steps_per_epoch, epochs=cfg.epochs, validation_data=data["val"],
                 validation_batch_size=1000, callbacks=[log], shuffle=False, verbose=0)
    trials = log.entries()
    best = tuner.get_best_hyperparameters(1)[0].values
    hp = {"weight_decay": [best[f"weight_decay_{l}"] for l in range(NUM_LAYERS)],
          "learning_rate": best["learning_rate"]}
    search_seconds = float(sum(t["fit_seconds"] for t in trials))
    print(f"[{kind}] {len(trials)} fits in {search_seconds:.0f} s; best {hp}; retraining", flush=True)
    recorder = fit_plain(cfg, data, f"{kind}_retrain", hp["weight_decay"], hp["learning_rate"], store)
    row = oc.final_row(recorder, hyperparameters=hp, trials=trials, search_seconds=search_seconds,
                       retrain_seconds=recorder.rec["train_seconds"][-1],
                       total_seconds=search_seconds + recorder.rec["train_seconds"][-1], num_fits=len(trials))
    return store.save(kind, row)


# ----------------------------------------------------------------------------------------
# The experiment.
# ----------------------------------------------------------------------------------------
def wallclock(row: dict) -> float:
    return row.get("total_seconds", row["train_seconds"])


def target_check(methods: dict) -> dict:
    """Issue #11's goal per bilevel run: within 0.2 points of the best tuner's test accuracy,
    in at most a third of that tuner's wall-clock."""
    tuners = {k: v for k, v in methods.items() if k in ("random_search", "hyperband")}
    if not tuners:
        return {}
    best_name = max(tuners, key=lambda k: tuners[k]["test_accuracy"])
    best = tuners[best_name]
    out = {"best_tuner": best_name, "best_tuner_test_accuracy": best["test_accuracy"],
           "best_tuner_seconds": wallclock(best), "runs": {}}
    for name, row in methods.items():
        if name.startswith("bilevel_T"):
            gap = row["test_accuracy"] - best["test_accuracy"]
            ratio = wallclock(row) / wallclock(best)
            out["runs"][name] = {"accuracy_gap_points": 100 * gap, "time_ratio": ratio,
                                 "reached": bool(gap >= -0.002 and ratio <= 1 / 3)}
    return out


def plot_figures(results: dict, output_dir: str) -> dict:
    from experiments import plotting

    plt = plotting.plt
    methods = results["methods"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, row in methods.items():
        rec = row["record"]
        xs = np.asarray(rec["train_seconds"], float)
        ys = np.asarray([np.nan if a is None else a for a in rec["test_accuracy"]], float)
        if "trials" in row:  # tuner: best-so-far trial (by validation accuracy), then the retraining
            t, best_val, best_test, curve_x, curve_y = 0.0, -1.0, np.nan, [], []
            for trial in row["trials"]:
                t += trial["fit_seconds"]
                if trial["val_accuracy"] > best_val:
                    best_val, best_test = trial["val_accuracy"], trial["test_accuracy"]
                curve_x.append(t)
                curve_y.append(best_test)
            line, = ax.step(curve_x, curve_y, where="post", label=f"{name}: search (best trial so far)")
            ax.plot(row["search_seconds"] + xs[1:], ys[1:], "o-", color=line.get_color(), ms=3,
                    label=f"{name}: best config retrained")
        else:
            ax.plot(xs, ys, "o-", ms=3, label=name)
    ax.set_xlim(left=0)
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel("test accuracy")
    shown = [a for row in methods.values() for a in row["record"]["test_accuracy"][1:] if a is not None]
    if shown:  # the epoch-0 points (untrained, ~0.1) would squash the interesting range
        ax.set_ylim(max(0.0, min(shown) - 0.02), min(1.0, max(shown) + 0.01))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    figures = {"accuracy_vs_wallclock": plotting.save_figure(fig, os.path.join(output_dir, "accuracy_vs_wallclock.png"))}

    runs = {k: v for k, v in methods.items() if k.startswith("bilevel_T") and v["record"]["hp"]}
    if runs:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for (name, row), color in zip(runs.items(), plt.get_cmap("viridis")(np.linspace(0, 0.85, len(runs)))):
            its = row["steps"] * np.asarray(row["record"]["hp_iteration"])  # minibatches seen
            decay = np.asarray([h["weight_decay"] for h in row["record"]["hp"]])
            for l in range(decay.shape[1]):
                axes[0].semilogy(its, decay[:, l], color=color, ls=["-", "--", ":", "-."][l % 4],
                                 label=f"{name} layer {l + 1}")
            axes[1].semilogy(its, [h["learning_rate"] for h in row["record"]["hp"]], color=color, label=name)
        for name in ("random_search", "hyperband"):
            if name in methods:
                hp = methods[name]["hyperparameters"]
                axes[1].axhline(hp["learning_rate"], color="gray", ls="--" if name == "hyperband" else ":",
                                lw=1, label=f"{name} best")
        axes[0].set_title("per-layer weight decay λ_l (log scale)")
        axes[1].set_title("learning rate γ")
        for ax in axes:
            ax.set_xlabel("training minibatches (hyper-iteration x T)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6)
        figures["hyperparameters"] = plotting.save_figure(fig, os.path.join(output_dir, "hyperparameters.png"))
    return {k: os.path.basename(v) for k, v in figures.items()}


def settings_fingerprint(cfg: Config) -> dict:
    """The settings that change a method's numbers (not output_dir, methods, truncate, data location)."""
    skip = {"output_dir", "methods", "truncate", "local_dir", "data_dir", "preset"}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}


def format_table(results: dict) -> str:
    lines = [f"{'method':>16} {'test acc %':>10} {'val acc %':>9} {'wall-clock s':>12}  hyperparameters"]
    for name, row in results["methods"].items():
        hp = row["hyperparameters"]
        decay = " ".join(f"{d:.1e}" for d in hp["weight_decay"])
        lines.append(f"{name:>16} {100 * row['test_accuracy']:>10.2f} {100 * row['val_accuracy']:>9.2f} "
                     f"{wallclock(row):>12.0f}  wd=[{decay}] lr={hp['learning_rate']:.3g}")
    target = results.get("target") or {}
    for name, t in target.get("runs", {}).items():
        lines.append(f"target {name}: {t['accuracy_gap_points']:+.2f} points vs {target['best_tuner']}, "
                     f"{t['time_ratio']:.2f}x its wall-clock -> {'reached' if t['reached'] else 'NOT reached'}")
    return "\n".join(lines)


def run_experiment(cfg: Config, arrays: Optional[dict] = None, data_info: Optional[dict] = None,
                   pause_after: Optional[str] = None, restart: bool = False) -> dict:
    """Runs the selected methods (skipping finished ones), writes results.json and the figures;
    holds an exclusive lock on cfg.output_dir; `restart` discards the saved state first."""
    cfg = cfg.validated()
    with exclusive_output_dir(cfg.output_dir, "experiments.online_hpo"):
        if restart:
            discard_state(os.path.join(cfg.output_dir, "resume"))
            discard_state(os.path.join(cfg.output_dir, "tuner"))
        return _run(cfg, arrays, data_info, pause_after)


def _run(cfg: Config, arrays: Optional[dict], data_info: Optional[dict], pause_after: Optional[str]) -> dict:
    start = time.time()
    env = oc.environment()
    keras.utils.set_random_seed(cfg.seed)
    os.makedirs(cfg.output_dir, exist_ok=True)
    store = oc.MethodStore(cfg.output_dir, pause_after)
    guard_settings(store.root, settings_fingerprint(cfg), "the runs")
    if arrays is None:
        arrays, data_info = load_data(cfg)
    print(f"[online_hpo] {data_info}", flush=True)
    methods: dict[str, dict] = {}
    if "bilevel" in cfg.methods:
        for steps, truncate in cfg.truncate:
            methods[method_name(steps, truncate)] = run_bilevel(cfg, arrays, steps, store, truncate)
    if "default" in cfg.methods:
        methods["default"] = run_default(cfg, arrays, store)
    for kind in ("random_search", "hyperband"):
        if kind in cfg.methods:
            methods[kind] = run_tuner(cfg, arrays, kind, store)
    env["load_average_end"] = os.getloadavg()
    results = jsonable({"config": dataclasses.asdict(cfg), "data": data_info, "environment": env,
                        "methods": methods, "target": target_check(methods),
                        "runtime_seconds": time.time() - start})
    results["figures"] = plot_figures(results, cfg.output_dir)
    write_json_atomically(os.path.join(cfg.output_dir, "results.json"), results, indent=1)
    print(format_table(results), flush=True)
    print(f"[online_hpo] results.json and figures in {cfg.output_dir} ({results['runtime_seconds']:.0f} s)", flush=True)
    return results


# ----------------------------------------------------------------------------------------
# absl entry point (flags defined only when run as a program).
# ----------------------------------------------------------------------------------------
_FLAG_FIELDS = ("output_dir", "methods", "truncate", "epochs", "batch_size", "val_batch_size", "n_val", "n_train",
                "n_test", "init_weight_decay", "init_lr", "momentum", "weight_decay_range", "lr_range", "outer_lr",
                "tuner_trials", "hyperband_factor", "hp_every", "seed", "jit_compile", "local_dir", "data_dir")


def define_flags() -> None:
    from absl import flags

    from experiments._cli import define_internal

    d = Config()
    flags.DEFINE_enum("preset", "full", sorted(PRESETS), "full: T=K in {1,5,20}, 10 epochs, all methods; "
                      "bilevel_only: T=1 and the default; quick: tiny budget (tests). Explicit flags override it.")
    flags.DEFINE_bool("quick", False, "Same as --preset=quick.")
    flags.DEFINE_string("output_dir", d.output_dir, "results.json, PNGs, resume state and KerasTuner's folder.")
    flags.DEFINE_list("methods", list(d.methods), f"Any of {list(METHODS)}.")
    flags.DEFINE_list("truncate", [str(t) for t in d.truncate], "Each bilevel run: T (inner steps per "
                      "hyper-iteration, back-propagated through all of them, K = T) or T:K (the last K only).")
    flags.DEFINE_integer("epochs", d.epochs, "Passes over the training split (every method; Hyperband's max_epochs).")
    flags.DEFINE_integer("batch_size", d.batch_size, "Training minibatch size.")
    flags.DEFINE_integer("val_batch_size", d.val_batch_size, "Validation examples per hyper-iteration (outer loss).")
    flags.DEFINE_integer("n_val", d.n_val, "Validation images carved from the training split.")
    flags.DEFINE_integer("n_train", None, "Use only this many training images (default: all the others).")
    flags.DEFINE_integer("n_test", None, "Use only this many test images (default: all 10 000).")
    flags.DEFINE_float("init_weight_decay", d.init_weight_decay, "Default / initial weight decay of every layer.")
    flags.DEFINE_float("init_lr", d.init_lr, "Default / initial learning rate γ.")
    flags.DEFINE_float("momentum", d.momentum, "Heavy-ball momentum β (fixed).")
    flags.DEFINE_list("weight_decay_range", [str(v) for v in d.weight_decay_range], "KerasTuner: log-uniform range.")
    flags.DEFINE_list("lr_range", [str(v) for v in d.lr_range], "KerasTuner: log-uniform range of γ.")
    flags.DEFINE_float("outer_lr", d.outer_lr, "Adam step on the log-hyperparameters.")
    flags.DEFINE_integer("tuner_trials", d.tuner_trials, "RandomSearch trials.")
    flags.DEFINE_integer("hyperband_factor", d.hyperband_factor, "Hyperband's reduction factor.")
    flags.DEFINE_integer("hp_every", d.hp_every, "Record the hyperparameters every N hyper-iterations.")
    flags.DEFINE_integer("seed", d.seed, "Seed of the split, the initial weights and the minibatch order.")
    flags.DEFINE_bool("jit_compile", d.jit_compile, "XLA-compile the train steps (all methods alike; off by "
                      "default: slower on CPU for this CNN, see RESULTS.md).")
    flags.DEFINE_string("local_dir", None, "Folder with the 4 Fashion-MNIST IDX .gz files "
                        "(default: tfds data_dir, then /usr/share/datasets/fashion-mnist).")
    flags.DEFINE_string("data_dir", None, "tensorflow-datasets data_dir (default ~/tensorflow_datasets).")
    flags.DEFINE_bool("restart", False, "Delete the saved state (<output_dir>/resume and /tuner) and start over.")
    define_internal(flags.DEFINE_string, "pause_after", None, "(tests) METHOD,EPOCH: after that epoch's checkpoint, "
                    "write <output_dir>/resume/paused_METHOD_EPOCH and wait to be killed (once).")


def config_from_flags() -> Config:
    from absl import flags

    F = flags.FLAGS
    values = {name: getattr(F, name) for name in _FLAG_FIELDS}
    values["truncate"] = list(F.truncate)
    values["methods"] = tuple(F.methods)
    for name in ("weight_decay_range", "lr_range"):
        values[name] = tuple(float(v) for v in getattr(F, name))
    explicit = [name for name in _FLAG_FIELDS if F[name].present]
    return apply_preset(Config(**values), "quick" if F.quick else F.preset, explicit)


def main(argv: Sequence[str]) -> int:
    from absl import app, flags, logging

    from experiments.datasets import DataUnavailableError

    logging.set_verbosity(logging.WARNING)
    tf.get_logger().setLevel("ERROR")  # Keras' retracing notes on the evaluation batches are noise here
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        cfg = config_from_flags().validated()
        oc.parse_pause_after(flags.FLAGS.pause_after)
    except ValueError as err:
        raise app.UsageError(str(err))
    try:
        run_experiment(cfg, pause_after=flags.FLAGS.pause_after, restart=flags.FLAGS.restart)
    except DataUnavailableError as err:
        print(f"online_hpo: error: no Fashion-MNIST data: {err}", file=sys.stderr, flush=True)
        return 2
    except STATE_ERRORS as err:
        return exit_with_error("online_hpo", err)
    return 0


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
