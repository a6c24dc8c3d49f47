r"""Tune while you train: per-layer weight decay and the learning rate of a small CNN on
Fashion-MNIST, learned online with K-RMD, against the defaults and KerasTuner (issue #11 §5).

Trains the CNN once per method (bilevel online for each --truncate, the default
hyperparameters, KerasTuner RandomSearch and Hyperband) and compares test accuracy against
training wall-clock; writes results.json and figures to --output_dir. A killed run continues
when the same command is rerun. Methods, settings and the measured results: RESULTS.md, "Online
hyperparameter optimization of a CNN vs KerasTuner".

  tfb-online-hpo                                     # the full comparison
  tfb-online-hpo --truncate=1,20:1 --methods=bilevel # T = 1, and T = 20 with K = 1
  tfb-online-hpo --preset=bilevel_only               # T = K = 1 against the default only
  tfb-online-hpo --preset=quick                      # tiny budget (tests)
  (or python -m experiments.online_hpo ...)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_bilevel as tfb  # noqa: E402
from experiments import online_common as oc  # noqa: E402
from experiments.config import define_flags, option  # noqa: E402

METHODS = ("bilevel", "default", "random_search", "hyperband")
TUNERS = ("random_search", "hyperband")
NUM_LAYERS = 4  # kernels: conv1, conv2, dense, classifier

PRESETS: dict[str, dict[str, Any]] = {
    # The full comparison: T = K ∈ {1, 5, 20}, 10 epochs, 20 random-search trials, Hyperband.
    "full": {},
    # One bilevel run against the default only (minutes): a first look.
    "bilevel_only": dict(truncate=("1",), methods=("bilevel", "default")),
    # Tests: a slice of the data, 2 epochs, 2 random-search trials.
    "quick": dict(truncate=("1", "4"), epochs=2, n_train=2048, n_val=512, n_test=1000, tuner_trials=2,
                  val_batch_size=128, hp_every=2),
}


@dataclasses.dataclass
class Config(oc.StateOptions):
    output_dir: str = option("out/online_hpo", "results.json, PNGs, resume state and KerasTuner's folder.",
                             result=False)
    methods: Sequence[str] = option(METHODS, f"Any of {list(METHODS)}.", result=False)
    truncate: Sequence[str] = option(("1", "5", "20"), "Each bilevel run: T (inner steps per hyper-iteration, "
                                     "back-propagated through all of them, K = T) or T:K (the last K only).",
                                     result=False)
    epochs: int = option(10, "Passes over the training split (every method; Hyperband's max_epochs).")
    batch_size: int = option(128, "Training minibatch size.")
    val_batch_size: int = option(256, "Validation examples per hyper-iteration (outer loss).")
    n_val: int = option(6000, "Validation images carved from the training split.")
    n_train: Optional[int] = option(None, "Use only this many training images (default: all the others).")
    n_test: Optional[int] = option(None, "Use only this many test images (default: all 10 000).")
    init_weight_decay: float = option(5e-4, "Default / initial weight decay of every layer.")
    init_lr: float = option(0.05, "Default / initial learning rate γ.")
    momentum: float = option(0.9, "Heavy-ball momentum β (fixed).")
    weight_decay_range: Sequence[float] = option((1e-6, 1e-2), "KerasTuner: log-uniform range.")
    lr_range: Sequence[float] = option((1e-3, 0.3), "KerasTuner: log-uniform range of γ.")
    outer_lr: float = option(0.01, "Adam step on the log-hyperparameters.")
    tuner_trials: int = option(20, "RandomSearch trials.")
    hyperband_factor: int = option(3, "Hyperband's reduction factor.")
    hp_every: int = option(10, "Record the hyperparameters every N hyper-iterations.")
    seed: int = option(0, "Seed of the split, the initial weights and the minibatch order.")
    jit_compile: bool = option(False, "XLA-compile the train steps (all methods alike; off by default: slower "
                               "on CPU for this CNN, see RESULTS.md).")
    local_dir: Optional[str] = option(None, "Folder with the 4 Fashion-MNIST IDX .gz files (default: tfds "
                                      "data_dir, then /usr/share/datasets/fashion-mnist).", result=False)
    data_dir: Optional[str] = option(None, "tensorflow-datasets data_dir (default ~/tensorflow_datasets).",
                                     result=False)
    preset: str = "full"

    def validated(self) -> "Config":
        cfg = dataclasses.replace(self, methods=tuple(dict.fromkeys(self.methods)),
                                  truncate=tuple(sorted({parse_truncation(t) for t in self.truncate})))
        bad = [m for m in cfg.methods if m not in METHODS]
        if bad or not cfg.methods:
            raise ValueError(f"--methods: choose from {list(METHODS)}, got {list(self.methods)}")
        if "bilevel" in cfg.methods and not cfg.truncate:
            raise ValueError("--truncate: give at least one T (or T:K)")
        if cfg.hyperband_factor < 2:
            raise ValueError(f"--hyperband_factor must be >= 2, got {cfg.hyperband_factor}")
        for name in ("weight_decay_range", "lr_range"):
            low, high = (float(v) for v in getattr(cfg, name))
            if not 0 < low < high:
                raise ValueError(f"--{name} must be LOW,HIGH with 0 < LOW < HIGH, got {getattr(cfg, name)}")
            setattr(cfg, name, (low, high))
        oc.check_ranges(cfg, ("epochs", "batch_size", "val_batch_size", "n_val", "tuner_trials", "hp_every"),
                        ("init_weight_decay", "init_lr", "outer_lr"))
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
    recorder = oc.fit_online(trainer, model, method_name(steps, truncate), data, cfg, store, hp_summary, steps)
    return oc.final_row(recorder, steps=steps, truncate=truncate,
                        hyper_iterations=recorder.epochs * recorder.steps_per_epoch,
                        hyperparameters=hp_summary(trainer.hyperparameter_values()))


def fit_plain(cfg: Config, data: dict, method: str, weight_decays: Sequence[float], lr: float,
              store: oc.MethodStore) -> oc.EpochRecorder:
    """Trains the CNN with fixed hyperparameters for --epochs epochs (resumable), as Keras does."""
    model = compile_plain(oc.build_on(build_cnn(weight_decays, cfg.seed), (28, 28, 1)), cfg, lr)
    return oc.fit_keras(model, method, data["train"], test=data["test"], val=data["val"], epochs=cfg.epochs,
                        steps_per_epoch=len(data["train"][1]) // cfg.batch_size, batch_size=cfg.batch_size,
                        seed=cfg.seed, store=store)


def run_default(cfg: Config, data: dict, store: oc.MethodStore) -> dict:
    hp = {"weight_decay": [cfg.init_weight_decay] * NUM_LAYERS, "learning_rate": cfg.init_lr}
    recorder = fit_plain(cfg, data, "default", hp["weight_decay"], hp["learning_rate"], store)
    return oc.final_row(recorder, hyperparameters=hp)


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
    log = oc.TrialLog(os.path.join(store.root, f"{kind}.trials.json"), data["test"])
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
    return oc.final_row(recorder, hyperparameters=hp, trials=trials, search_seconds=search_seconds,
                        retrain_seconds=recorder.rec["train_seconds"][-1],
                        total_seconds=search_seconds + recorder.rec["train_seconds"][-1], num_fits=len(trials))


# ----------------------------------------------------------------------------------------
# The experiment.
# ----------------------------------------------------------------------------------------
def wallclock(row: dict) -> float:
    return row.get("total_seconds", row["train_seconds"])


def target_check(methods: dict) -> dict:
    """Issue #11's goal per bilevel run: within 0.2 points of the best tuner's test accuracy,
    in at most a third of that tuner's wall-clock."""
    tuners = {k: v for k, v in methods.items() if k in TUNERS}
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

    plt, methods, cfg = plotting.plt, results["methods"], results["config"]
    budget = (f"{cfg['epochs']} epochs of {results['data']['n_train']} images, batch {cfg['batch_size']}; "
              f"RandomSearch {cfg['tuner_trials']} trials, Hyperband factor {cfg['hyperband_factor']}")
    fig, ax = plt.subplots(figsize=(10.5, 5))
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
            line, = ax.step(curve_x, curve_y, "x", where="post", ls="--", label=f"{name}: search (best trial so far)")
            ax.plot(row["search_seconds"] + xs[1:], ys[1:], "o-", color=line.get_color(), ms=4,
                    label=f"{name}: best config retrained")
        else:
            ax.plot(xs, ys, "o-", ms=4, label=f"{name} (T={row['steps']}, K={row['truncate']})" if "steps" in row else name)
    ax.set_xlim(left=0)
    ax.set_xlabel("training wall-clock (s; evaluation excluded)")
    ax.set_ylabel("test accuracy (fraction)")
    shown = [a for row in methods.values() for a in row["record"]["test_accuracy"][1:] if a is not None]
    if shown:  # the epoch-0 points (untrained, ~0.1) would squash the interesting range
        ax.set_ylim(max(0.0, min(shown) - 0.02), min(1.0, max(shown) + 0.01))
    ax.set_title(f"Fashion-MNIST CNN: test accuracy vs wall-clock\n{budget}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a curve
    figures = {"accuracy_vs_wallclock": plotting.save_figure(fig, os.path.join(output_dir, "accuracy_vs_wallclock.png"))}

    runs = {k: v for k, v in methods.items() if k.startswith("bilevel_T") and v["record"]["hp"]}
    if runs:
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for (name, row), color in zip(runs.items(), plt.get_cmap("viridis")(np.linspace(0, 0.85, len(runs)))):
            its = row["steps"] * np.asarray(row["record"]["hp_iteration"])  # minibatches seen
            decay = np.asarray([h["weight_decay"] for h in row["record"]["hp"]])
            marker = "." if len(its) <= 50 else None
            for l in range(decay.shape[1]):
                axes[0].semilogy(its, decay[:, l], color=color, ls=["-", "--", ":", "-."][l % 4], marker=marker,
                                 label=f"{name} layer {l + 1}")
            axes[1].semilogy(its, [h["learning_rate"] for h in row["record"]["hp"]], color=color, marker=marker,
                             label=name)
        for name in TUNERS:
            if name in methods:
                hp = methods[name]["hyperparameters"]
                axes[1].axhline(hp["learning_rate"], color="gray", ls="--" if name == "hyperband" else ":",
                                lw=1, label=f"{name} best")
        axes[0].set_ylabel(r"per-layer weight decay $\lambda_l$ (log scale)")
        axes[1].set_ylabel(r"learning rate $\gamma$ (log scale)")
        for ax, title in zip(axes, ("weight decay of each kernel", "inner learning rate")):
            ax.set_title(title)
            ax.set_xlabel("training minibatches (hyper-iteration × T)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, ncol=2 if ax is axes[0] else 1)
        fig.suptitle(f"Hyperparameters learned online (K-RMD), recorded every {cfg['hp_every']} hyper-iterations; "
                     f"{cfg['epochs']} epochs", fontsize=10)
        figures["hyperparameters"] = plotting.save_figure(fig, os.path.join(output_dir, "hyperparameters.png"))
    return {k: os.path.basename(v) for k, v in figures.items()}


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


def run_methods(cfg: Config, data: dict, store: oc.MethodStore) -> dict:
    methods: dict[str, dict] = {}
    if "bilevel" in cfg.methods:
        for steps, truncate in cfg.truncate:
            methods[method_name(steps, truncate)] = store.run_once(
                method_name(steps, truncate), lambda: run_bilevel(cfg, data, steps, store, truncate))
    if "default" in cfg.methods:
        methods["default"] = store.run_once("default", lambda: run_default(cfg, data, store))
    for kind in TUNERS:
        if kind in cfg.methods:
            methods[kind] = store.run_once(kind, lambda: run_tuner(cfg, data, kind, store))
    return methods


def run_experiment(cfg: Config, arrays: Optional[dict] = None, data_info: Optional[dict] = None) -> dict:
    """Runs the selected methods (skipping finished ones), writes results.json and the figures;
    holds an exclusive lock on cfg.output_dir; --restart discards the saved state first."""
    return oc.run_program("online_hpo", cfg.validated(), run_methods=run_methods, load_data=load_data,
                          target=target_check, plot_figures=plot_figures, format_table=format_table,
                          arrays=arrays, data_info=data_info, state_dirs=("resume", "tuner"))


if __name__ == "__main__":
    from absl import app

    define_flags(Config, PRESETS)
    app.run(lambda argv: oc.main(argv, "online_hpo", Config, PRESETS, run_experiment, lambda cfg: "Fashion-MNIST"))
