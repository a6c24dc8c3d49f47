r"""Learning to reweight examples under label noise, online with 1-RMD (issue #11 §5).

Trains an MLP on MNIST whose labels are 40 percent symmetric noise while a Meta-Weight-Net
weighting network (its weights are named hyperparameters of the inner loss) learns per-example
weights from a small clean validation set, against plain training on the noisy and on the clean
examples; writes results.json and figures to --output_dir. A killed run continues when the same command is rerun.
Model, method and the measured results: RESULTS.md, "Learning to reweight examples".

  tfb-reweighting                          # MNIST, 40 percent symmetric noise
  tfb-reweighting --dataset=fashion_mnist
  tfb-reweighting --preset=quick           # tiny budget (tests)
  (or python -m experiments.reweighting ...)
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

METHODS = ("mwn", "noisy", "clean")
DATASETS = ("mnist", "fashion_mnist")
NORMALIZATIONS = ("none", "mean")
LOSS_GRID = np.linspace(0.0, 8.0, 33)  # where V(ℓ) is recorded during training

PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    # Tests: a slice of MNIST (3000 noisy training examples), 10 epochs (230 hyper-iterations).
    "quick": dict(epochs=10, n_train=3000, n_test=1000, hp_every=20),
}


@dataclasses.dataclass
class Config(oc.StateOptions):
    output_dir: str = option("out/reweighting", "results.json, PNGs and the resume state.", result=False)
    dataset: str = option("mnist", "tfds dataset (offline: local IDX files).", choices=DATASETS)
    methods: Sequence[str] = option(METHODS, f"Any of {list(METHODS)}.", result=False)
    noise: float = option(0.4, "Probability that a training label is replaced by another class.")
    n_val: int = option(1000, "Clean validation examples (class-balanced, from the training split).")
    n_train: Optional[int] = option(None, "Use only this many noisy training examples (default: all the others).")
    n_test: Optional[int] = option(None, "Use only this many test images (default: all 10 000).")
    epochs: int = option(30, "Passes over the noisy training set (every method: same SGD steps).")
    batch_size: int = option(128, "Training minibatch size.")
    val_batch_size: int = option(100, "Clean examples per hyper-iteration (outer loss).")
    hidden: int = option(256, "Width of the MLP's two hidden layers.")
    lr: float = option(0.05, "Inner SGD learning rate γ (every method).")
    momentum: float = option(0.9, "Heavy-ball momentum β.")
    weighting_hidden: int = option(100, "Hidden units of the weighting network V.")
    weight_normalization: str = option(
        "none", "none: g = mean V(ℓ_i)ℓ_i (the paper); mean: weights divided by their minibatch mean "
        "(MWN's code; unstable here, see RESULTS.md).", choices=NORMALIZATIONS)
    outer_lr: float = option(1e-3, "Adam step on θ (the weighting network).")
    hp_every: int = option(100, "Record V on a loss grid every N hyper-iterations.")
    seed: int = option(0, "Seed of the split, the noise, the initial weights and the batch order.")
    jit_compile: bool = option(False, "XLA-compile the train steps (all methods alike).")
    local_dir: Optional[str] = option(None, "Folder with the dataset's 4 IDX .gz files (default: tfds data_dir, "
                                      "then the project's MNIST folder / /usr/share/datasets/fashion-mnist).",
                                      result=False)
    data_dir: Optional[str] = option(None, "tensorflow-datasets data_dir (default ~/tensorflow_datasets).",
                                     result=False)
    preset: str = "full"

    def validated(self) -> "Config":
        cfg = dataclasses.replace(self, methods=tuple(dict.fromkeys(self.methods)))
        if not cfg.methods or any(m not in METHODS for m in cfg.methods):
            raise ValueError(f"--methods: choose from {list(METHODS)}, got {list(self.methods)}")
        if cfg.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {DATASETS}, got {cfg.dataset!r}")
        if not 0 <= cfg.noise < 0.9:
            raise ValueError(f"--noise is the probability of a wrong label, in [0, 0.9), got {cfg.noise}")
        if cfg.n_val < 10 or cfg.n_val % 10:
            raise ValueError(f"--n_val must be a positive multiple of 10 (class-balanced), got {cfg.n_val}")
        if cfg.weight_normalization not in NORMALIZATIONS:
            raise ValueError(f"--weight_normalization must be one of {NORMALIZATIONS}, got {cfg.weight_normalization!r}")
        oc.check_ranges(cfg, ("epochs", "batch_size", "val_batch_size", "hidden", "weighting_hidden", "hp_every"),
                        ("lr", "outer_lr"))
        return cfg


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
    model = build_mlp(cfg)
    theta0 = initial_weighting(cfg.weighting_hidden, cfg.seed)
    trainer = tfb.BilevelTrainer(
        model, inner_loss=make_inner_loss(cfg.weight_normalization),
        outer_loss=tfb.keras.losses.sparse_categorical_crossentropy, steps=1, truncate=1,
        hyperparameters={"weighting": [tfb.Hyperparameter(t, transform="identity") for t in theta0]},
        inner_learning_rate=cfg.lr, inner_optimizer=lambda lr: tfb.momentum(lr, beta=cfg.momentum),
        seed=cfg.seed, online=True)
    trainer.compile(optimizer=keras.optimizers.Adam(cfg.outer_lr), metrics=["accuracy"], jit_compile=cfg.jit_compile)

    def on_grid(values: dict) -> dict:
        theta = [np.asarray(t, np.float64) for t in values["weighting"]]
        return {"grid_weights": weighting_net(theta, LOSS_GRID).tolist()}

    recorder = oc.fit_online(trainer, model, "mwn", data, cfg, store, on_grid)
    theta = [np.asarray(t) for t in trainer.hyperparameter_values()["weighting"]]
    v = weights_of(model, theta, *data["train"])
    wrong = data["corrupted"]
    normalized = v / v.mean()
    bins = np.linspace(0, 1, 21)
    weights = {"mean_weight_wrong_labels": float(v[wrong].mean()), "mean_weight_right_labels": float(v[~wrong].mean()),
               "mean_normalized_weight_wrong_labels": float(normalized[wrong].mean()),
               "mean_normalized_weight_right_labels": float(normalized[~wrong].mean()),
               "histogram_bins": bins.tolist(), "histogram_wrong": np.histogram(v[wrong], bins)[0].tolist(),
               "histogram_right": np.histogram(v[~wrong], bins)[0].tolist()}
    return oc.final_row(recorder, hyper_iterations=recorder.epochs * recorder.steps_per_epoch,
                        loss_grid=LOSS_GRID.tolist(), example_weights=weights, theta=[t.tolist() for t in theta])


def run_plain(cfg: Config, data: dict, method: str, store: oc.MethodStore) -> dict:
    """Plain SGD with momentum on the noisy labels ("noisy") or on the clean validation set
    alone ("clean", for the same number of steps)."""
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
    return row


# ----------------------------------------------------------------------------------------
# The experiment.
# ----------------------------------------------------------------------------------------
def plot_figures(results: dict, output_dir: str) -> dict:
    from experiments import plotting

    plt, methods, cfg, data = plotting.plt, results["methods"], results["config"], results["data"]
    budget = (f"{data['dataset']}, {data['n_train']} training labels ({100 * data['wrong_fraction']:.0f}% wrong), "
              f"{cfg['epochs']} epochs of batch {cfg['batch_size']}, T = K = 1")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, row in methods.items():
        rec = row["record"]
        ax.plot(rec["epoch"][1:], rec["test_accuracy"][1:], "o-", ms=4, label=name)
    ax.set_xlabel("epoch (passes over the noisy training set; 'clean': as many SGD steps)")
    ax.set_ylabel("test accuracy (fraction)")
    ax.set_title(f"Learning to reweight: test accuracy\n{budget}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")  # the noisy curve falls through the lower right
    figures = {"test_accuracy": plotting.save_figure(fig, os.path.join(output_dir, "test_accuracy.png"))}
    if "mwn" in methods:
        row = methods["mwn"]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        hp, its = row["record"]["hp"], row["record"]["hp_iteration"]
        chosen = sorted(set(np.linspace(0, len(hp) - 1, min(6, len(hp))).astype(int)))
        for c, i in zip(plt.get_cmap("viridis")(np.linspace(0, 0.9, len(chosen))), chosen):
            axes[0].plot(row["loss_grid"], hp[i]["grid_weights"], ".-", color=c, label=f"hyper-iteration {its[i]}")
        axes[0].set_xlabel("per-example training loss ℓ (cross-entropy, nats)")
        axes[0].set_ylabel("weight V(ℓ; θ)")
        axes[0].set_title("learned weighting function during training")
        axes[0].legend(fontsize=8)
        w = row["example_weights"]
        bins = np.asarray(w["histogram_bins"])
        centers, width = (bins[1:] + bins[:-1]) / 2, bins[1] - bins[0]
        axes[1].bar(centers - width / 4, w["histogram_right"], width / 2, label="right label")
        axes[1].bar(centers + width / 4, w["histogram_wrong"], width / 2, label="wrong label")
        axes[1].set_yscale("log")
        axes[1].set_xlabel("weight V(ℓ_i) under the final model")
        axes[1].set_ylabel("training examples (log scale)")
        axes[1].set_title("weights of the training examples after training")
        axes[1].legend()
        for ax in axes:
            ax.grid(True, alpha=0.3)
        fig.suptitle(f"Meta-Weight-Net weighting V: {budget}", fontsize=10)
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


def run_methods(cfg: Config, data: dict, store: oc.MethodStore) -> dict:
    methods = {}
    if "mwn" in cfg.methods:
        methods["mwn"] = store.run_once("mwn", lambda: run_mwn(cfg, data, store))
    for method in ("noisy", "clean"):
        if method in cfg.methods:
            methods[method] = store.run_once(method, lambda: run_plain(cfg, data, method, store))
    return methods


def target(methods: dict) -> dict:
    """Issue #11's goal: Meta-Weight-Net at least 5 points of test accuracy over noisy training."""
    if "mwn" not in methods or "noisy" not in methods:
        return {}
    gain = 100 * (methods["mwn"]["test_accuracy"] - methods["noisy"]["test_accuracy"])
    return {"gain_points": gain, "reached": bool(gain >= 5.0)}


def run_experiment(cfg: Config, arrays: Optional[dict] = None, data_info: Optional[dict] = None) -> dict:
    """Runs the methods (skipping finished ones), writes results.json and the figures, under an
    exclusive lock on cfg.output_dir; --restart discards the saved state first."""
    return oc.run_program("reweighting", cfg.validated(), run_methods=run_methods, load_data=load_data,
                          target=target, plot_figures=plot_figures, format_table=format_table,
                          arrays=arrays, data_info=data_info)


if __name__ == "__main__":
    from absl import app

    define_flags(Config, PRESETS)
    app.run(lambda argv: oc.main(argv, "reweighting", Config, PRESETS, run_experiment, lambda cfg: cfg.dataset))
