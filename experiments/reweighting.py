r"""Learning to reweight examples under label noise, online with 1-RMD (issue #11 §5).

Trains an MLP on MNIST with 40% symmetric label noise while a Meta-Weight-Net weighting network
(its weights are named hyperparameters of the inner loss) learns per-example weights from a small
clean validation set, against plain training on the noisy and on the clean examples; writes
results.json and figures to --output_dir. A killed run continues when the same command is rerun.
Model, method and the measured results: RESULTS.md, "Learning to reweight examples".

  tfb-reweighting                          # MNIST, 40% symmetric noise
  tfb-reweighting --dataset=fashion_mnist
  tfb-reweighting --preset=quick           # tiny budget (tests)
  (or python -m experiments.reweighting ...)
"""

from __future__ import annotations

import dataclasses
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

METHODS = ("mwn", "noisy", "clean")
DATASETS = ("mnist", "fashion_mnist")
LOSS_GRID = np.linspace(0.0, 8.0, 33)  # where V(ℓ) is recorded during training

PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    # Tests: a slice of MNIST (3000 noisy training examples), 10 epochs (230 hyper-iterations).
    "quick": dict(epochs=10, n_train=3000, n_test=1000, hp_every=20),
}


@dataclasses.dataclass
class Config:
    output_dir: str = "out/reweighting"
    dataset: str = "mnist"
    methods: Sequence[str] = METHODS
    noise: float = 0.4
    n_val: int = 1000
    n_train: Optional[int] = None  # None: every training image outside the validation set
    n_test: Optional[int] = None
    epochs: int = 30
    batch_size: int = 128
    val_batch_size: int = 100
    hidden: int = 256
    lr: float = 0.05
    momentum: float = 0.9
    weighting_hidden: int = 100
    weight_normalization: str = "none"
    outer_lr: float = 1e-3
    hp_every: int = 100
    seed: int = 0
    jit_compile: bool = False
    local_dir: Optional[str] = None
    data_dir: Optional[str] = None
    preset: str = ""

    def validated(self) -> "Config":
        cfg = dataclasses.replace(self)
        cfg.methods = tuple(dict.fromkeys(cfg.methods))
        if not cfg.methods or any(m not in METHODS for m in cfg.methods):
            raise ValueError(f"--methods: choose from {list(METHODS)}, got {list(self.methods)}")
        if cfg.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {DATASETS}, got {cfg.dataset!r}")
        if not 0 <= cfg.noise < 0.9:
            raise ValueError(f"--noise is the probability of a wrong label, in [0, 0.9), got {cfg.noise}")
        if cfg.n_val < 10 or cfg.n_val % 10:
            raise ValueError(f"--n_val must be a positive multiple of 10 (class-balanced), got {cfg.n_val}")
        for name in ("epochs", "batch_size", "val_batch_size", "hidden", "weighting_hidden", "hp_every"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
        for name in ("lr", "outer_lr"):
            if not getattr(cfg, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(cfg, name)}")
        if not 0 <= cfg.momentum < 1:
            raise ValueError(f"--momentum must be in [0, 1), got {cfg.momentum}")
        if cfg.weight_normalization not in NORMALIZATIONS:
            raise ValueError(f"--weight_normalization must be one of {NORMALIZATIONS}, got {cfg.weight_normalization!r}")
        return cfg


def apply_preset(cfg: Config, preset: str, explicit: Sequence[str] = ()) -> Config:
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return dataclasses.replace(cfg, preset=preset, **{k: v for k, v in PRESETS[preset].items() if k not in explicit})


# ----------------------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------------------
def symmetric_noise(labels: np.ndarray, rate: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Labels where each is, with probability `rate`, replaced by a uniformly drawn other class."""
    flip = rng.random(len(labels)) < rate
    shift = rng.integers(1, num_classes, len(labels))  # 1..C-1: never the true class
    return np.where(flip, (labels + shift) % num_classes, labels).astype(labels.dtype)


def split(labels: np.ndarray, n_val: int, num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(val_idx: n_val/C per class, train_idx: all the others), both shuffled."""
    per_class = n_val // num_classes
    val = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(num_classes)])
    rest = np.setdiff1d(np.arange(len(labels)), val)
    return rng.permutation(val), rng.permutation(rest)


def load_data(cfg: Config) -> tuple[dict, dict]:
    """{"train": noisy, "val": clean, "test"} as (x float32 [N, 28, 28, 1], y int32), plus
    "train_clean_labels" and "corrupted" (label wrong) for the training examples."""
    from experiments import datasets

    data = datasets.load_image_classification(cfg.dataset, data_dir=cfg.data_dir, local_dir=cfg.local_dir)
    (x, y), (x_test, y_test) = data["train"], data["test"]
    rng = np.random.default_rng(cfg.seed)
    val_idx, train_idx = split(y, cfg.n_val, 10, rng)
    if cfg.n_train is not None:
        train_idx = train_idx[: cfg.n_train]
    y_clean = y[train_idx].astype(np.int32)
    y_noisy = symmetric_noise(y_clean, cfg.noise, 10, rng)
    n_test = len(y_test) if cfg.n_test is None else min(cfg.n_test, len(y_test))
    arrays = {
        "train": (oc.scale_images(x[train_idx]), y_noisy),
        "val": (oc.scale_images(x[val_idx]), y[val_idx].astype(np.int32)),
        "test": (oc.scale_images(x_test[:n_test]), y_test[:n_test].astype(np.int32)),
        "train_clean_labels": y_clean,
        "corrupted": y_noisy != y_clean,
    }
    info = {"dataset": cfg.dataset, "source": datasets.data_source(cfg.dataset), "n_train": len(train_idx), "n_val": cfg.n_val, "n_test": n_test,
            "noise": cfg.noise, "wrong_labels": int(arrays["corrupted"].sum()),
            "wrong_fraction": float(arrays["corrupted"].mean())}
    return arrays, info


# ----------------------------------------------------------------------------------------
# Models and the weighting network.
# ----------------------------------------------------------------------------------------
def build_mlp(cfg: Config) -> keras.Model:
    init = lambda i: keras.initializers.GlorotUniform(seed=cfg.seed + i)  # noqa: E731
    return oc.build_on(keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Flatten(),
        keras.layers.Dense(cfg.hidden, activation="relu", kernel_initializer=init(0)),
        keras.layers.Dense(cfg.hidden, activation="relu", kernel_initializer=init(1)),
        keras.layers.Dense(10, kernel_initializer=init(2)),
    ], name="mlp"), (28, 28, 1))


def initial_weighting(hidden: int, seed: int) -> list[np.ndarray]:
    """θ0 of V: PyTorch's default Linear initialization (uniform ±1/√fan_in), as Meta-Weight-Net."""
    rng = np.random.default_rng(seed + 1000)
    bound2 = 1.0 / np.sqrt(hidden)
    return [rng.uniform(-1, 1, (1, hidden)), rng.uniform(-1, 1, hidden),
            rng.uniform(-bound2, bound2, (hidden, 1)), rng.uniform(-bound2, bound2, 1)]


def weighting_net(theta: Sequence[Any], losses: Any) -> Any:
    """V(ℓ; θ) ∈ (0, 1) per loss ([N] -> [N]); works on tensors and on NumPy arrays."""
    w1, b1, w2, b2 = theta
    if isinstance(losses, np.ndarray):
        h = np.maximum(losses[:, None] @ w1 + b1, 0.0)
        return 1.0 / (1.0 + np.exp(-(h @ w2 + b2)[:, 0]))
    h = tf.nn.relu(tf.matmul(losses[:, None], w1) + b1)
    return tf.sigmoid(tf.matmul(h, w2) + b2)[:, 0]


NORMALIZATIONS = ("none", "mean")


def make_inner_loss(normalization: str):
    """inner_loss(y, logits, hp) = v_i ℓ_i per example (the trainer averages them), with
    v = V(sg(ℓ); θ) ("none", the paper's formula) or V / mean_batch(V) ("mean", MWN's code)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")

    def inner_loss(y_true: tf.Tensor, logits: tf.Tensor, hp: dict) -> tf.Tensor:
        losses = tfb.keras.losses.sparse_categorical_crossentropy(y_true, logits)
        v = weighting_net(hp["weighting"], tf.stop_gradient(losses))
        if normalization == "mean":
            v = v / (tf.reduce_mean(v) + 1e-8)
        return losses * v

    return inner_loss


def weights_of(model: keras.Model, theta: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """V(ℓ_i; θ) of each example under `model` (unnormalized)."""
    logits = model.predict(x, batch_size=1000, verbose=0)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))
    losses = -log_p[np.arange(len(y)), y]
    return weighting_net([np.asarray(t, np.float64) for t in theta], losses.astype(np.float64))


# ----------------------------------------------------------------------------------------
# Methods.
# ----------------------------------------------------------------------------------------
def run_mwn(cfg: Config, data: dict, store: oc.MethodStore) -> dict:
    if (row := store.row("mwn")) is not None:
        print("[mwn] finished earlier", flush=True)
        return row
    model = build_mlp(cfg)
    theta0 = initial_weighting(cfg.weighting_hidden, cfg.seed)
    trainer = tfb.BilevelTrainer(
        model, inner_loss=make_inner_loss(cfg.weight_normalization), outer_loss=tfb.keras.losses.sparse_categorical_crossentropy,
        steps=1, truncate=1,
        hyperparameters={"weighting": [tfb.Hyperparameter(t, transform="identity") for t in theta0]},
        inner_learning_rate=cfg.lr, inner_optimizer=lambda lr: tfb.momentum(lr, beta=cfg.momentum),
        seed=cfg.seed, online=True)
    trainer.compile(optimizer=keras.optimizers.Adam(cfg.outer_lr), metrics=["accuracy"], jit_compile=cfg.jit_compile)
    steps_per_epoch = len(data["train"][1]) // cfg.batch_size
    tasks = trainer.resumable(lambda start: oc.online_task_stream(
        data["train"], data["val"], steps=1, batch_size=cfg.batch_size, val_batch_size=cfg.val_batch_size,
        seed=cfg.seed, start=start))
    trainer.build_from_spec(tasks.element_spec)

    def on_grid(values: dict) -> dict:
        theta = [np.asarray(t, np.float64) for t in values["weighting"]]
        return {"grid_weights": weighting_net(theta, LOSS_GRID).tolist()}

    recorder = oc.EpochRecorder("[mwn]", cfg.epochs, steps_per_epoch, model, data["test"], data["val"],
                                store.record_path("mwn"), hp_every=cfg.hp_every, hyperparameters=on_grid)
    trainer.fit(tasks, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                callbacks=store.callbacks("mwn", recorder), verbose=0)
    recorder.finish()
    theta = [np.asarray(t) for t in trainer.hyperparameter_values()["weighting"]]
    v = weights_of(model, theta, *data["train"])
    wrong = data["corrupted"]
    normalized = v / v.mean()
    weights = {"mean_weight_wrong_labels": float(v[wrong].mean()), "mean_weight_right_labels": float(v[~wrong].mean()),
               "mean_normalized_weight_wrong_labels": float(normalized[wrong].mean()),
               "mean_normalized_weight_right_labels": float(normalized[~wrong].mean()),
               "histogram_bins": np.linspace(0, 1, 21).tolist(),
               "histogram_wrong": np.histogram(v[wrong], np.linspace(0, 1, 21))[0].tolist(),
               "histogram_right": np.histogram(v[~wrong], np.linspace(0, 1, 21))[0].tolist()}
    return store.save("mwn", oc.final_row(recorder, hyper_iterations=cfg.epochs * steps_per_epoch,
                                          loss_grid=LOSS_GRID.tolist(), example_weights=weights,
                                          theta=[t.tolist() for t in theta]))


def run_plain(cfg: Config, data: dict, method: str, store: oc.MethodStore) -> dict:
    """Plain SGD with momentum on the noisy labels ("noisy") or on the clean validation set
    alone ("clean", for the same number of steps)."""
    if (row := store.row(method)) is not None:
        print(f"[{method}] finished earlier", flush=True)
        return row
    model = build_mlp(cfg)
    model.compile(optimizer=keras.optimizers.SGD(cfg.lr, momentum=cfg.momentum), loss=oc.sparse_ce_logits(),
                  metrics=["accuracy"], jit_compile=cfg.jit_compile)
    train = data["train"] if method == "noisy" else data["val"]
    recorder = oc.fit_keras(model, method, train, test=data["test"], val=data["val"], epochs=cfg.epochs,
                            steps_per_epoch=len(data["train"][1]) // cfg.batch_size,
                            batch_size=min(cfg.batch_size, len(train[1])), seed=cfg.seed, store=store)
    row = oc.final_row(recorder)
    if method == "noisy":  # early stopping on the clean validation set: the best epoch's test accuracy
        val = recorder.rec["val_accuracy"][1:]
        best = int(np.argmax(val))
        row["early_stopped"] = {"epoch": best + 1, "val_accuracy": val[best],
                                "test_accuracy": recorder.rec["test_accuracy"][1 + best]}
    return store.save(method, row)


# ----------------------------------------------------------------------------------------
# The experiment.
# ----------------------------------------------------------------------------------------
def plot_figures(results: dict, output_dir: str) -> dict:
    from experiments import plotting

    plt = plotting.plt
    methods = results["methods"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in methods.items():
        rec = row["record"]
        ax.plot(rec["epoch"][1:], rec["test_accuracy"][1:], "o-", ms=3, label=name)
    ax.set_xlabel("epoch (passes over the noisy training set; 'clean': same SGD steps)")
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend()
    figures = {"test_accuracy": plotting.save_figure(fig, os.path.join(output_dir, "test_accuracy.png"))}
    if "mwn" in methods:
        row = methods["mwn"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        hp, its = row["record"]["hp"], row["record"]["hp_iteration"]
        chosen = sorted(set(np.linspace(0, len(hp) - 1, min(6, len(hp))).astype(int)))
        for c, i in zip(plt.get_cmap("viridis")(np.linspace(0, 0.9, len(chosen))), chosen):
            axes[0].plot(row["loss_grid"], hp[i]["grid_weights"], color=c, label=f"hyper-iteration {its[i]}")
        axes[0].set_xlabel("per-example loss ℓ")
        axes[0].set_ylabel("V(ℓ; θ)")
        axes[0].set_title("learned weighting function")
        axes[0].legend(fontsize=7)
        w = row["example_weights"]
        bins = np.asarray(w["histogram_bins"])
        centers, width = (bins[1:] + bins[:-1]) / 2, bins[1] - bins[0]
        axes[1].bar(centers - width / 4, w["histogram_right"], width / 2, label="right label")
        axes[1].bar(centers + width / 4, w["histogram_wrong"], width / 2, label="wrong label")
        axes[1].set_yscale("log")
        axes[1].set_xlabel("weight V(ℓ_i) under the final model")
        axes[1].set_title("training examples")
        axes[1].legend()
        figures["weighting"] = plotting.save_figure(fig, os.path.join(output_dir, "weighting.png"))
    return {k: os.path.basename(v) for k, v in figures.items()}


def format_table(results: dict) -> str:
    lines = [f"{'method':>8} {'test acc %':>10} {'seconds':>8}"]
    for name, row in results["methods"].items():
        lines.append(f"{name:>8} {100 * row['test_accuracy']:>10.2f} {row['train_seconds']:>8.0f}")
        if "early_stopped" in row:
            e = row["early_stopped"]
            lines.append(f"{'':>8} early-stopped on the clean val (epoch {e['epoch']}): {100 * e['test_accuracy']:.2f}")
    if "mwn" in results["methods"]:
        w = results["methods"]["mwn"]["example_weights"]
        lines.append(f"mwn: mean weight of wrong labels {w['mean_weight_wrong_labels']:.3f}, "
                     f"right labels {w['mean_weight_right_labels']:.3f}")
    if results.get("target"):
        t = results["target"]
        lines.append(f"target: mwn {t['gain_points']:+.2f} points over noisy training (goal >= 5) -> "
                     f"{'reached' if t['reached'] else 'NOT reached'}")
    return "\n".join(lines)


def run_experiment(cfg: Config, arrays: Optional[dict] = None, data_info: Optional[dict] = None,
                   pause_after: Optional[str] = None, restart: bool = False) -> dict:
    """Runs the methods (skipping finished ones), writes results.json and the figures, under an exclusive lock on cfg.output_dir; `restart` discards the saved state first."""
    cfg = cfg.validated()
    with exclusive_output_dir(cfg.output_dir, "experiments.reweighting"):
        if restart:
            discard_state(os.path.join(cfg.output_dir, "resume"))
        return _run(cfg, arrays, data_info, pause_after)


def _run(cfg: Config, arrays: Optional[dict], data_info: Optional[dict], pause_after: Optional[str]) -> dict:
    start = time.time()
    env = oc.environment()
    keras.utils.set_random_seed(cfg.seed)
    os.makedirs(cfg.output_dir, exist_ok=True)
    store = oc.MethodStore(cfg.output_dir, pause_after)
    skip = {"output_dir", "methods", "local_dir", "data_dir", "preset"}
    guard_settings(store.root, {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}, "the runs")
    if arrays is None:
        arrays, data_info = load_data(cfg)
    print(f"[reweighting] {data_info}", flush=True)
    methods = {}
    if "mwn" in cfg.methods:
        methods["mwn"] = run_mwn(cfg, arrays, store)
    for method in ("noisy", "clean"):
        if method in cfg.methods:
            methods[method] = run_plain(cfg, arrays, method, store)
    target = {}
    if "mwn" in methods and "noisy" in methods:
        gain = 100 * (methods["mwn"]["test_accuracy"] - methods["noisy"]["test_accuracy"])
        target = {"gain_points": gain, "reached": bool(gain >= 5.0)}
    env["load_average_end"] = os.getloadavg()
    results = jsonable({"config": dataclasses.asdict(cfg), "data": data_info, "environment": env,
                        "methods": methods, "target": target, "runtime_seconds": time.time() - start})
    results["figures"] = plot_figures(results, cfg.output_dir)
    write_json_atomically(os.path.join(cfg.output_dir, "results.json"), results, indent=1)
    print(format_table(results), flush=True)
    print(f"[reweighting] results.json and figures in {cfg.output_dir} ({results['runtime_seconds']:.0f} s)", flush=True)
    return results


# ----------------------------------------------------------------------------------------
# absl entry point.
# ----------------------------------------------------------------------------------------
_FLAG_FIELDS = ("output_dir", "dataset", "methods", "noise", "n_val", "n_train", "n_test", "epochs", "batch_size",
                "val_batch_size", "hidden", "lr", "momentum", "weighting_hidden", "weight_normalization", "outer_lr", "hp_every", "seed",
                "jit_compile", "local_dir", "data_dir")


def define_flags() -> None:
    from absl import flags

    from experiments._cli import define_internal

    d = Config()
    flags.DEFINE_enum("preset", "full", sorted(PRESETS), "full: the defaults; quick: tiny budget (tests). "
                      "Explicit flags override the preset.")
    flags.DEFINE_bool("quick", False, "Same as --preset=quick.")
    flags.DEFINE_string("output_dir", d.output_dir, "results.json, PNGs and the resume state.")
    flags.DEFINE_enum("dataset", d.dataset, list(DATASETS), "tfds dataset (offline: local IDX files).")
    flags.DEFINE_list("methods", list(d.methods), f"Any of {list(METHODS)}.")
    flags.DEFINE_float("noise", d.noise, "Probability that a training label is replaced by another class.")
    flags.DEFINE_integer("n_val", d.n_val, "Clean validation examples (class-balanced, from the training split).")
    flags.DEFINE_integer("n_train", None, "Use only this many noisy training examples (default: all the others).")
    flags.DEFINE_integer("n_test", None, "Use only this many test images (default: all 10 000).")
    flags.DEFINE_integer("epochs", d.epochs, "Passes over the noisy training set (every method: same SGD steps).")
    flags.DEFINE_integer("batch_size", d.batch_size, "Training minibatch size.")
    flags.DEFINE_integer("val_batch_size", d.val_batch_size, "Clean examples per hyper-iteration (outer loss).")
    flags.DEFINE_integer("hidden", d.hidden, "Width of the MLP's two hidden layers.")
    flags.DEFINE_float("lr", d.lr, "Inner SGD learning rate γ (every method).")
    flags.DEFINE_float("momentum", d.momentum, "Heavy-ball momentum β.")
    flags.DEFINE_integer("weighting_hidden", d.weighting_hidden, "Hidden units of the weighting network V.")
    flags.DEFINE_enum("weight_normalization", d.weight_normalization, list(NORMALIZATIONS),
                      "none: g = mean V(ℓ_i)ℓ_i (the paper); mean: weights divided by their minibatch mean "
                      "(MWN's code; unstable here, see RESULTS.md).")
    flags.DEFINE_float("outer_lr", d.outer_lr, "Adam step on θ (the weighting network).")
    flags.DEFINE_integer("hp_every", d.hp_every, "Record V on a loss grid every N hyper-iterations.")
    flags.DEFINE_integer("seed", d.seed, "Seed of the split, the noise, the initial weights and the batch order.")
    flags.DEFINE_bool("jit_compile", d.jit_compile, "XLA-compile the train steps (all methods alike).")
    flags.DEFINE_string("local_dir", None, "Folder with the dataset's 4 IDX .gz files (default: tfds data_dir, "
                        "then the project's MNIST folder / /usr/share/datasets/fashion-mnist).")
    flags.DEFINE_string("data_dir", None, "tensorflow-datasets data_dir (default ~/tensorflow_datasets).")
    flags.DEFINE_bool("restart", False, "Delete the saved state (<output_dir>/resume) and start over.")
    define_internal(flags.DEFINE_string, "pause_after", None, "(tests) METHOD,EPOCH: after that epoch's checkpoint, "
                    "write <output_dir>/resume/paused_METHOD_EPOCH and wait to be killed (once).")


def config_from_flags() -> Config:
    from absl import flags

    F = flags.FLAGS
    values = {name: getattr(F, name) for name in _FLAG_FIELDS}
    values["methods"] = tuple(F.methods)
    explicit = [name for name in _FLAG_FIELDS if F[name].present]
    return apply_preset(Config(**values), "quick" if F.quick else F.preset, explicit)


def main(argv: Sequence[str]) -> int:
    from absl import app, flags, logging

    from experiments.datasets import DataUnavailableError

    logging.set_verbosity(logging.WARNING)
    tf.get_logger().setLevel("ERROR")
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
        print(f"reweighting: error: no {flags.FLAGS.dataset} data: {err}", file=sys.stderr, flush=True)
        return 2
    except STATE_ERRORS as err:
        return exit_with_error("reweighting", err)
    return 0


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
