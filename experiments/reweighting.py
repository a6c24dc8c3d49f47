r"""Learning to reweight training examples online with K-RMD, against the baselines a careful
user would run (issue #11 §5, issue #17).

Three settings on Fashion-MNIST (MNIST by flag), each with 1000 clean class-balanced validation
examples carved from the training split and the 10 000 test images: class-dependent flip noise
between confusable classes (--setting=flip), symmetric noise (symmetric), a long-tailed training
set with clean labels (longtail). A small CNN is trained by momentum SGD for a fixed budget by
every method, over several seeds (initial weights and minibatch order): plain training (also
early-stopped on the clean set), plain training then fine-tuned on the clean examples, the clean
examples alone, fixed random example weights, forward loss correction with the transition
matrix estimated on the clean set (noise settings), class-balanced loss (longtail); and, with
tf_bilevel, Meta-Weight-Net weights and raw per-example weights (L2RW-style), each with 1-RMD
and K-RMD online, and their models fine-tuned like the plain one (mwn_ft, l2rw_ft, mwn_k_ft,
...); Ren et al.'s per-step look-ahead weights (ren, experiments/models/lookahead_weights.py);
ren_mix / l2rw_mix: the same with clean examples joining every training minibatch; mwn_cls:
Meta-Weight-Net whose weighting network also sees the label (experiments/weighting_diagnosis.py
measures why the loss alone is not enough). Writes results.json (rows per method and seed,
mean ± std per method) and figures to --output_dir; a killed run continues, per method and
seed, when the same command is rerun. --report_dir builds the tables (Markdown) and figures
from the finished runs alone, training nothing. Setup and results: RESULTS.md, "Learning to
reweight examples".

  tfb-reweighting --setting=flip --output_dir=out/reweighting/flip
  tfb-reweighting --setting=longtail --output_dir=out/reweighting/longtail
  tfb-reweighting --setting=flip --output_dir=out/reweighting/flip --report_dir=docs/figures
  tfb-reweighting --preset=quick           # tiny budget (tests)
  (or python -m experiments.reweighting ...)
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_bilevel as tfb  # noqa: E402
from experiments.data import noisy_labels as nl  # noqa: E402
from experiments.common import online_program as oc  # noqa: E402
from experiments.common import program  # noqa: E402
from experiments.common.config import option  # noqa: E402
from experiments.common.run_state import write_atomically  # noqa: E402

SETTINGS = ("flip", "symmetric", "longtail")
BASELINES = ("plain", "finetune", "clean", "random", "forward", "cb", "mix", "mix_ft")
BILEVEL = ("mwn", "l2rw", "mwn_k", "l2rw_k", "mwn_ft", "l2rw_ft", "ren", "ren_ft", "ren_mix", "ren_mix_ft", "l2rw_mix",
           "l2rw_mix_ft", "mwn_cls", "mwn_cls_ft", "mwn_k_ft")
LOOKAHEAD = ("ren", "ren_mix")  # Ren et al.'s per-step weights (experiments/models/lookahead_weights.py)
# Run order within a seed: a model before its fine-tuning (finetune, mwn_ft, l2rw_ft, mwn_k_ft, ...:
# the same fine-tuning on the clean set from plain's / mwn's / l2rw's / mwn_k's trained weights;
# forward also starts from plain's model).
METHODS = ("plain", "finetune", "forward", "cb", "l2rw", "l2rw_ft", "mwn", "mwn_ft", "l2rw_k", "mwn_k", "mwn_k_ft",
           "random", "clean", "mix", "mix_ft", "ren", "ren_ft", "ren_mix", "ren_mix_ft", "l2rw_mix", "l2rw_mix_ft",
           "mwn_cls", "mwn_cls_ft")
FINETUNED = {"finetune": "plain", "mwn_ft": "mwn", "l2rw_ft": "l2rw", "ren_ft": "ren",
             "ren_mix_ft": "ren_mix", "l2rw_mix_ft": "l2rw_mix", "mix_ft": "mix",
             "mwn_cls_ft": "mwn_cls", "mwn_k_ft": "mwn_k"}  # method: the run it starts from
K_METHODS = ("mwn_k", "l2rw_k", "mwn_k_ft")  # trained with K-RMD, K = --k
NOT_IN = {"flip": ("cb",), "symmetric": ("cb",), "longtail": ("forward",)}
DATASETS = ("mnist", "fashion_mnist")
MODELS = ("cnn", "mlp")
NORMALIZATIONS = ("none", "mean")
LOSS_GRID = np.linspace(0.0, 8.0, 33)  # where V(ℓ) is recorded during training
# mix, ren_mix, l2rw_mix: clean examples joining every training minibatch of 128 (a constant, not a
# flag: a new fingerprinted flag would orphan the saved state of runs started before it existed).
CLEAN_PER_BATCH = 16
# mwn_cls: Meta-Weight-Net whose V also sees the given label (one-hot), as CMW-Net (Shu et al. 2023); its
# weights are divided by their minibatch mean (Meta-Weight-Net's released code): unnormalized, V's
# scale is a step size the greedy hypergradient drives to 1 (RESULTS.md). Adam 1e-2 on θ: chosen on the
# clean validation set (4-epoch flip run, 19 200 images: 0.660 vs 0.650 with 1e-3, where V barely
# left θ0). Constants, not flags: see CLEAN_PER_BATCH.
MWN_CLS_NORMALIZATION = "mean"
MWN_CLS_OUTER_LR = 1e-2
DETECTOR_THRESHOLD = 0.05  # weight < this: "the method flags the label as wrong"

PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    # Tests: 3000 training examples, 1000 test images, 4 epochs, 2 seeds, K = 2.
    "quick": dict(epochs=4, n_train=3000, n_test=1000, hp_every=20, seeds=(0, 1), k=2, finetune_epochs=3),
}


@dataclasses.dataclass
class Config(oc.StateOptions):
    output_dir: str = option("out/reweighting", "results.json, PNGs and the resume state (one folder per setting).",
                             result=False)
    report_dir: Optional[str] = option(
        None, "Report only, nothing is trained: read the finished (method, seed) runs of --methods × --seeds in "
        "<output_dir>/resume (read only: safe while a run holds the folder; the flags must match its "
        "fingerprint) and write reweighting_<setting>_tables.md and reweighting_<setting>_{test_accuracy,"
        "weighting,weights}.png into this folder.", result=False)
    setting: str = option("flip", "flip: class-dependent noise between confusable classes; symmetric: uniform "
                          "noise; longtail: clean labels, exponentially imbalanced classes.", choices=SETTINGS)
    dataset: str = option("fashion_mnist", "tfds dataset (offline: local IDX files).", choices=DATASETS)
    methods: Optional[Sequence[str]] = option(None, f"Any of {list(METHODS)} (default: all that apply to the "
                                              "setting; forward is for noise, cb for longtail).", result=False)
    seeds: Sequence[int] = option((0, 1, 2), "Seeds of the initial weights and minibatch order (one run each).",
                                  result=False)
    data_seed: int = option(0, "Seed of the validation split, the noise and the long-tailed subset.")
    noise: float = option(0.4, "flip/symmetric: probability that a training label is replaced.")
    imbalance: float = option(100.0, "longtail: examples of the most / of the least frequent class.")
    n_val: int = option(1000, "Clean validation examples (class-balanced, from the training split).")
    n_train: Optional[int] = option(None, "Use only this many training examples (default: all the others).")
    n_test: Optional[int] = option(None, "Use only this many test images (default: all 10 000).")
    model: str = option("cnn", "cnn: conv16-pool-conv32-pool-dense64; mlp: two hidden layers of --hidden.",
                        choices=MODELS)
    hidden: int = option(256, "mlp: width of the two hidden layers.")
    epochs: int = option(15, "Passes over the training set (every method: the same SGD steps).")
    batch_size: int = option(128, "Training minibatch size.")
    val_batch_size: int = option(100, "Clean examples per hyper-iteration (outer loss).")
    lr: float = option(0.05, "Inner SGD learning rate γ (every method).")
    momentum: float = option(0.9, "Heavy-ball momentum β.")
    k: int = option(3, "mwn_k / l2rw_k: T = K inner steps per hyper-iteration (K-RMD, K > 1).")
    weighting_hidden: int = option(100, "Hidden units of the weighting network V.")
    weight_normalization: str = option(
        "none", "mwn: none: g = mean V(ℓ_i)ℓ_i (the paper); mean: weights divided by their minibatch mean "
        "(MWN's code; unstable on MNIST, see RESULTS.md); mwn_cls: always mean.", choices=NORMALIZATIONS)
    outer_lr: float = option(1e-3, "mwn, mwn_k: Adam step on θ (the weighting network; mwn_cls: fixed 1e-2).")
    l2rw_normalization: str = option("mean", "l2rw: weights divided by their minibatch mean (as L2RW) or not.",
                                     choices=NORMALIZATIONS)
    l2rw_outer_lr: float = option(0.2, "l2rw: Adam step on the raw per-example weights ν (weight = sigmoid(ν)).")
    finetune_epochs: int = option(20, "finetune: passes over the clean examples after plain training.")
    finetune_lr: float = option(0.01, "finetune: SGD learning rate (momentum as --momentum).")
    cb_beta: float = option(0.9999, "cb: β of the effective number (1 − β^n) / (1 − β).")
    hp_every: int = option(100, "Record V on a loss grid every N hyper-iterations.")
    jit_compile: bool = option(False, "XLA-compile the train steps (all methods alike).")
    local_dir: Optional[str] = option(None, "Folder with the dataset's 4 IDX .gz files (default: tfds data_dir, "
                                      "then the project's MNIST folder / /usr/share/datasets/fashion-mnist).",
                                      result=False)
    data_dir: Optional[str] = option(None, "tensorflow-datasets data_dir (default ~/tensorflow_datasets).",
                                     result=False)
    seed: int = option(0, "(set per run from --seeds)", internal=True, result=False)
    preset: str = "full"

    def validated(self) -> "Config":
        if self.setting not in SETTINGS:
            raise ValueError(f"--setting must be one of {SETTINGS}, got {self.setting!r}")
        applicable = tuple(m for m in METHODS if m not in NOT_IN[self.setting])
        methods = applicable if self.methods is None else tuple(dict.fromkeys(self.methods))
        if not methods or any(m not in applicable for m in methods):
            raise ValueError(f"--methods: with --setting={self.setting} choose from {list(applicable)}, "
                             f"got {list(self.methods)}")
        seeds = tuple(dict.fromkeys(int(s) for s in self.seeds))
        if not seeds or min(seeds) < 0:
            raise ValueError(f"--seeds: one or more seeds >= 0, got {list(self.seeds)}")
        cfg = dataclasses.replace(self, methods=methods, seeds=seeds)
        if cfg.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {DATASETS}, got {cfg.dataset!r}")
        if cfg.model not in MODELS:
            raise ValueError(f"--model must be one of {MODELS}, got {cfg.model!r}")
        if not 0 <= cfg.noise < 0.5 and cfg.setting == "flip":
            raise ValueError(f"--noise: flip noise must stay below 0.5 (else the partner class is the majority), "
                             f"got {cfg.noise}")
        if not 0 <= cfg.noise < 0.9:
            raise ValueError(f"--noise is the probability of a wrong label, in [0, 0.9), got {cfg.noise}")
        if cfg.imbalance < 1:
            raise ValueError(f"--imbalance is a ratio of class sizes, >= 1, got {cfg.imbalance}")
        if cfg.n_val < 10 or cfg.n_val % 10:
            raise ValueError(f"--n_val must be a positive multiple of 10 (class-balanced), got {cfg.n_val}")
        if not 0 < cfg.cb_beta < 1:
            raise ValueError(f"--cb_beta must be in (0, 1), got {cfg.cb_beta}")
        for name in ("weight_normalization", "l2rw_normalization"):
            if getattr(cfg, name) not in NORMALIZATIONS:
                raise ValueError(f"--{name} must be one of {NORMALIZATIONS}, got {getattr(cfg, name)!r}")
        oc.check_ranges(cfg, ("epochs", "batch_size", "val_batch_size", "hidden", "weighting_hidden", "hp_every",
                              "finetune_epochs"), ("lr", "outer_lr", "l2rw_outer_lr", "finetune_lr"))
        if cfg.k < 2:
            raise ValueError(f"--k is the K > 1 of mwn_k and l2rw_k, got {cfg.k}")
        return cfg


# ----------------------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------------------
def load_data(cfg: Config) -> tuple[dict, dict]:
    """{"train": (x, y noisy or imbalanced), "val": clean, "test"} as (x float32 [N, 28, 28, 1],
    y int32), plus "train_clean_labels" and "corrupted" (label wrong) for the training examples."""
    from experiments.data import tfds_offline

    data = tfds_offline.load_image_classification(cfg.dataset, data_dir=cfg.data_dir, local_dir=cfg.local_dir)
    (x, y), (x_test, y_test) = data["train"], data["test"]
    y = y.astype(np.int32)
    rng = np.random.default_rng(cfg.data_seed)
    val_idx, train_idx = nl.split(y, cfg.n_val, nl.NUM_CLASSES, rng)
    if cfg.setting == "longtail":
        train_idx = train_idx[nl.long_tail_subset(y[train_idx], cfg.imbalance, nl.NUM_CLASSES, rng)]
    if cfg.n_train is not None:
        train_idx = train_idx[: cfg.n_train]
    y_clean = y[train_idx]
    if cfg.setting == "flip":
        y_train = nl.flip_noise(y_clean, cfg.noise, nl.FLIP_MAPS[cfg.dataset], rng)
    elif cfg.setting == "symmetric":
        y_train = nl.symmetric_noise(y_clean, cfg.noise, nl.NUM_CLASSES, rng)
    else:
        y_train = y_clean.copy()
    n_test = len(y_test) if cfg.n_test is None else min(cfg.n_test, len(y_test))
    arrays = {
        "train": (oc.scale_images(x[train_idx]), y_train),
        "val": (oc.scale_images(x[val_idx]), y[val_idx]),
        "test": (oc.scale_images(x_test[:n_test]), y_test[:n_test].astype(np.int32)),
        "train_clean_labels": y_clean,
        "corrupted": y_train != y_clean,
    }
    info = {"dataset": cfg.dataset, "source": tfds_offline.data_source(cfg.dataset), "setting": cfg.setting,
            "n_train": len(train_idx), "n_val": cfg.n_val, "n_test": n_test,
            "class_counts": np.bincount(y_train, minlength=nl.NUM_CLASSES).tolist(),
            "wrong_labels": int(arrays["corrupted"].sum()), "wrong_fraction": float(arrays["corrupted"].mean())}
    if cfg.setting == "flip":
        info["flip_map"] = {str(k): v for k, v in nl.FLIP_MAPS[cfg.dataset].items()}
    if cfg.setting != "longtail":
        info["noise"] = cfg.noise
    return arrays, info


# ----------------------------------------------------------------------------------------
# Models and the weighting network.
# ----------------------------------------------------------------------------------------
def build_model(cfg: Config) -> keras.Model:
    """The classifier (logits), its initial weights a function of cfg.seed only."""
    init = lambda i: keras.initializers.GlorotUniform(seed=cfg.seed * 10 + i)  # noqa: E731
    if cfg.model == "mlp":
        layers = [keras.layers.Flatten(),
                  keras.layers.Dense(cfg.hidden, activation="relu", kernel_initializer=init(0)),
                  keras.layers.Dense(cfg.hidden, activation="relu", kernel_initializer=init(1)),
                  keras.layers.Dense(10, kernel_initializer=init(2))]
    else:
        layers = [keras.layers.Conv2D(16, 3, padding="same", activation="relu", kernel_initializer=init(0)),
                  keras.layers.MaxPooling2D(),
                  keras.layers.Conv2D(32, 3, padding="same", activation="relu", kernel_initializer=init(1)),
                  keras.layers.MaxPooling2D(),
                  keras.layers.Flatten(),
                  keras.layers.Dense(64, activation="relu", kernel_initializer=init(2)),
                  keras.layers.Dense(10, kernel_initializer=init(3))]
    return oc.build_on(keras.Sequential([keras.Input((28, 28, 1)), *layers], name=cfg.model), (28, 28, 1))


def initial_weighting(hidden: int, seed: int, inputs: int = 1) -> list[np.ndarray]:
    """θ0 of V: PyTorch's default Linear initialization (uniform ±1/√fan_in), as Meta-Weight-Net;
    `inputs`: 1 (the loss) or 1 + classes (mwn_cls: the loss and the one-hot label)."""
    rng = np.random.default_rng(seed + 1000)
    bound1, bound2 = 1.0 / np.sqrt(inputs), 1.0 / np.sqrt(hidden)
    return [rng.uniform(-bound1, bound1, (inputs, hidden)), rng.uniform(-bound1, bound1, hidden),
            rng.uniform(-bound2, bound2, (hidden, 1)), rng.uniform(-bound2, bound2, 1)]


def weighting_net(theta: Sequence[Any], losses: Any, labels: Any = None) -> Any:
    """V(ℓ; θ) ∈ (0, 1) per loss ([N] -> [N]), or V(ℓ, onehot(label); θ) when θ's first matrix
    has 1 + classes rows (mwn_cls); works on tensors and on NumPy arrays."""
    w1, b1, w2, b2 = theta
    classes = int(w1.shape[0]) - 1
    if classes and labels is None:
        raise ValueError(f"this weighting network also takes the label ({classes} classes): pass labels")
    if isinstance(losses, np.ndarray):
        features = losses[:, None] if not classes else np.concatenate(
            [losses[:, None], np.eye(classes)[np.asarray(labels, np.int64)]], axis=1)
        h = np.maximum(features @ w1 + b1, 0.0)
        return 1.0 / (1.0 + np.exp(-(h @ w2 + b2)[:, 0]))
    features = losses[:, None] if not classes else tf.concat(
        [losses[:, None], tf.one_hot(tf.cast(labels, tf.int32), classes, dtype=losses.dtype)], axis=1)
    h = tf.nn.relu(tf.matmul(features, w1) + b1)
    return tf.sigmoid(tf.matmul(h, w2) + b2)[:, 0]


def grid_weights(theta: Sequence[np.ndarray]) -> dict:
    """V on LOSS_GRID: {"grid_weights": [33]} (for mwn_cls the mean over the labels, and
    "grid_weights_per_class": [classes][33])."""
    theta = [np.asarray(t, np.float64) for t in theta]
    classes = theta[0].shape[0] - 1
    if not classes:
        return {"grid_weights": weighting_net(theta, LOSS_GRID).tolist()}
    per_class = np.stack([weighting_net(theta, LOSS_GRID, np.full(len(LOSS_GRID), c)) for c in range(classes)])
    return {"grid_weights": per_class.mean(0).tolist(), "grid_weights_per_class": per_class.tolist()}


def make_inner_loss(normalization: str, class_aware: bool = False):
    """Meta-Weight-Net: inner_loss(y, logits, hp) = v_i ℓ_i per example (the trainer averages
    them), with v = V(sg(ℓ); θ) ("none", the paper's formula) or V / mean_batch(V) ("mean");
    `class_aware`: V(sg(ℓ), onehot(y); θ) (mwn_cls)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")

    def inner_loss(y_true: tf.Tensor, logits: tf.Tensor, hp: dict) -> tf.Tensor:
        losses = tfb.keras.losses.sparse_categorical_crossentropy(y_true, logits)
        v = weighting_net(hp["weighting"], tf.stop_gradient(losses), y_true if class_aware else None)
        if normalization == "mean":
            v = v / (tf.reduce_mean(v) + 1e-8)
        return losses * v

    return inner_loss


def make_example_weight_loss(normalization: str, n_learned: Optional[int] = None):
    """L2RW-style: inner_loss(y_packed, logits, hp) = v_i ℓ_i with v_i = hp["example_weights"][i]
    (one hyperparameter per training example, in (0, 1)), divided by the minibatch mean ("mean",
    as L2RW normalizes its weights per batch) or not ("none"). With `n_learned`, examples of
    index >= n_learned (the clean ones in the stream, l2rw_mix) have the fixed weight 1."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")

    def inner_loss(y_true: tf.Tensor, logits: tf.Tensor, hp: dict) -> tf.Tensor:
        labels, index = nl.unpack(y_true)
        if n_learned is None:
            v = tf.gather(hp["example_weights"], index)
        else:
            learned = tf.gather(hp["example_weights"], tf.minimum(index, n_learned - 1))
            v = tf.where(index < n_learned, learned, tf.ones_like(learned))
        if normalization == "mean":
            v = v / (tf.reduce_mean(v) + 1e-8)
        return nl.log_softmax_ce(labels, logits) * v

    return inner_loss


def per_example_losses(model: keras.Model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    logits = model.predict(x, batch_size=1000, verbose=0).astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))
    return -log_p[np.arange(len(y)), y]


def weights_of(model: keras.Model, theta: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """V(ℓ_i; θ) (or V(ℓ_i, onehot(y_i); θ)) of each example under `model` (unnormalized)."""
    return weighting_net([np.asarray(t, np.float64) for t in theta], per_example_losses(model, x, y), y)


def weight_diagnostics(v: np.ndarray, data: dict) -> dict:
    """How the learned weights v ∈ (0, 1) of the training examples relate to their labels: mean
    weight of wrong / right labels, precision and recall of v < 0.05 as a wrong-label detector,
    histograms, the mean weight per (given) class."""
    wrong, labels = data["corrupted"], data["train"][1]
    flagged = v < DETECTOR_THRESHOLD
    bins = np.linspace(0, max(1.0, float(np.quantile(v, 0.99))), 21)  # lookahead weights B·w̃ exceed 1
    out = {"mean_weight": float(v.mean()), "flagged": int(flagged.sum()),
           "mean_weight_per_class": [float(v[labels == c].mean()) if np.any(labels == c) else None
                                     for c in range(nl.NUM_CLASSES)],
           "histogram_bins": bins.tolist(), "histogram_all": np.histogram(np.minimum(v, bins[-1]), bins)[0].tolist()}
    if wrong.any():
        hits = int((flagged & wrong).sum())
        out.update({"mean_weight_wrong_labels": float(v[wrong].mean()),
                    "mean_weight_right_labels": float(v[~wrong].mean()),
                    "detector_precision": hits / int(flagged.sum()) if flagged.any() else None,
                    "detector_recall": hits / int(wrong.sum()),
                    "histogram_wrong": np.histogram(np.minimum(v[wrong], bins[-1]), bins)[0].tolist(),
                    "histogram_right": np.histogram(np.minimum(v[~wrong], bins[-1]), bins)[0].tolist()})
    return out


# ----------------------------------------------------------------------------------------
# Methods.
# ----------------------------------------------------------------------------------------
def key(method: str, seed: int) -> str:
    """The store's name of one run: its result row is <output_dir>/resume/<key>.json."""
    return f"{method}.seed{seed}"


def bilevel_trainer(cfg: Config, model: keras.Model, inner_loss, hyperparameters: dict, steps: int,
                    outer_lr: float) -> tfb.BilevelTrainer:
    trainer = tfb.BilevelTrainer(
        model, inner_loss=inner_loss, outer_loss=tfb.keras.losses.sparse_categorical_crossentropy,
        steps=steps, truncate=steps, hyperparameters=hyperparameters, inner_learning_rate=cfg.lr,
        inner_optimizer=lambda lr: tfb.momentum(lr, beta=cfg.momentum), seed=cfg.seed, online=True)
    trainer.compile(optimizer=keras.optimizers.Adam(outer_lr), metrics=["accuracy"], jit_compile=cfg.jit_compile)
    return trainer


def run_mwn(cfg: Config, data: dict, store: oc.MethodStore, name: str, steps: int, class_aware: bool = False) -> dict:
    """Meta-Weight-Net: V(ℓ; θ)'s weights θ are the hyperparameters, learned online with K-RMD (T = K = steps).
    `class_aware` (mwn_cls): V(ℓ, onehot(ỹ); θ), normalized by MWN_CLS_NORMALIZATION, Adam MWN_CLS_OUTER_LR."""
    model = build_model(cfg)
    theta0 = initial_weighting(cfg.weighting_hidden, cfg.seed, 1 + nl.NUM_CLASSES if class_aware else 1)
    normalization = MWN_CLS_NORMALIZATION if class_aware else cfg.weight_normalization
    outer_lr = MWN_CLS_OUTER_LR if class_aware else cfg.outer_lr
    trainer = bilevel_trainer(cfg, model, make_inner_loss(normalization, class_aware),
                              {"weighting": [tfb.Hyperparameter(t, transform="identity") for t in theta0]},
                              steps, outer_lr)

    def on_grid(values: dict) -> dict:
        return grid_weights(values["weighting"])

    recorder = oc.fit_online(trainer, model, name, data, cfg, store, on_grid, steps=steps)
    write_atomically(store.path(name, ".weights.h5"), model.save_weights)  # mwn_ft / mwn_k_ft start from it
    theta = [np.asarray(t) for t in trainer.hyperparameter_values()["weighting"]]
    v = weights_of(model, theta, *data["train"])
    final = grid_weights(theta)
    extra = {"final_grid_weights_per_class": final["grid_weights_per_class"]} if class_aware else {}
    return oc.final_row(recorder, steps=steps, truncate=steps, loss_grid=LOSS_GRID.tolist(),
                        final_grid_weights=final["grid_weights"], example_weights=weight_diagnostics(v, data),
                        theta=[t.tolist() for t in theta], normalization=normalization, outer_lr=outer_lr,
                        **extra)


def run_l2rw(cfg: Config, data: dict, store: oc.MethodStore, name: str, steps: int, clean_per_batch: int = 0) -> dict:
    """One raw weight per training example (sigmoid(ν_i), ν_i a `Hyperparameter` vector entry),
    learned online with K-RMD (T = K = steps): the L2RW idea with persistent weights.
    `clean_per_batch` > 0 (l2rw_mix): that many clean examples join every minibatch at weight 1."""
    model = build_model(cfg)
    x, y = data["train"]
    n_learned = len(y) if clean_per_batch else None
    trainer = bilevel_trainer(cfg, model, make_example_weight_loss(cfg.l2rw_normalization, n_learned),
                              {"example_weights": tfb.Hyperparameter(np.full(len(y), 0.5, np.float32),
                                                                     transform="sigmoid")},
                              steps, cfg.l2rw_outer_lr)

    def summary(values: dict) -> dict:
        v = np.asarray(values["example_weights"])
        wrong = data["corrupted"]
        out = {"mean_weight": float(v.mean()), "flagged": int((v < DETECTOR_THRESHOLD).sum())}
        if wrong.any():
            out.update(mean_weight_wrong_labels=float(v[wrong].mean()), mean_weight_right_labels=float(v[~wrong].mean()))
        return out

    packed = {**data, "train": (x, nl.pack(y))}
    extra = None
    if clean_per_batch:  # the clean examples, packed with indices after the training examples'
        x_val, y_val = data["val"]
        extra = (x_val, nl.pack(np.concatenate([y, y_val]))[len(y):], clean_per_batch)
    recorder = oc.fit_online(trainer, model, name, packed, cfg, store, summary, steps=steps, extra=extra)
    write_atomically(store.path(name, ".weights.h5"), model.save_weights)  # l2rw_ft starts from it
    v = np.asarray(trainer.hyperparameter_values()["example_weights"], np.float64)
    return oc.final_row(recorder, steps=steps, truncate=steps, example_weights=weight_diagnostics(v, data))


def fit_plain(cfg: Config, model: keras.Model, name: str, train: tuple, loss, store: oc.MethodStore, data: dict, *,
              lr: float, epochs: int, steps_per_epoch: int) -> oc.EpochRecorder:
    """Momentum SGD on `train` (labels packed for `loss`), resumable per epoch."""
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=cfg.momentum), loss=loss, jit_compile=cfg.jit_compile)
    x, y = train
    return oc.fit_keras(model, name, (x, nl.pack(y)), test=data["test"], val=data["val"], epochs=epochs,
                        steps_per_epoch=steps_per_epoch, batch_size=min(cfg.batch_size, len(y)), seed=cfg.seed,
                        store=store)


def fit_mixed(cfg: Config, model: keras.Model, name: str, data: dict, store: oc.MethodStore) -> oc.EpochRecorder:
    """mix: plain training on minibatches of the training set, each joined by CLEAN_PER_BATCH
    clean examples (a seeded stream of their own, as ren_mix's and l2rw_mix's); resumable per epoch."""
    x, y = data["train"]
    x_val, y_val = data["val"]
    packed = nl.pack(np.concatenate([y, y_val]))
    model.compile(optimizer=keras.optimizers.SGD(cfg.lr, momentum=cfg.momentum),
                  loss=nl.weighted_ce(np.ones(len(packed))), jit_compile=cfg.jit_compile)
    return oc.fit_recorded(model, name, lambda start: mixed_stream(x, packed[: len(y)], x_val, packed[len(y):],
                                                                   cfg.batch_size, cfg.seed, start),
                           epochs=cfg.epochs, steps_per_epoch=len(y) // cfg.batch_size, test=data["test"],
                           val=data["val"], store=store)


def mixed_stream(x: np.ndarray, y: np.ndarray, x_clean: np.ndarray, y_clean: np.ndarray, batch_size: int, seed: int,
                 start: int) -> tf.data.Dataset:
    """mix's minibatches from SGD step `start` on: `batch_size` training examples (the stream of
    plain's seed) followed by CLEAN_PER_BATCH clean ones (a seeded stream of their own)."""
    stream = tf.data.Dataset.zip((oc.minibatch_stream(x, y, batch_size, seed, start),
                                  oc.minibatch_stream(x_clean, y_clean, CLEAN_PER_BATCH, seed + 2, start)))
    return stream.map(lambda t, c: (tf.concat([t[0], c[0]], 0), tf.concat([t[1], c[1]], 0)))


def trained_weights_path(store: oc.MethodStore, method: str, seed: int) -> str:
    """The final weights of a finished run (plain, mwn, l2rw), which later runs start from."""
    return store.path(key(method, seed), ".weights.h5")


def run_baseline(cfg: Config, data: dict, method: str, store: oc.MethodStore) -> dict:
    """One baseline run (same network, initial weights, optimizer and budget as the others)."""
    train = data["train"]
    steps_per_epoch = len(train[1]) // cfg.batch_size
    model = build_model(cfg)
    name = key(method, cfg.seed)
    extra: dict[str, Any] = {}
    if method in FINETUNED or method == "forward":
        source = FINETUNED.get(method, "plain")
        path = trained_weights_path(store, source, cfg.seed)
        if not os.path.exists(path):
            raise RuntimeError(f"{method} needs the trained {source} model {path}: run --methods={source} first "
                               "(it comes earlier in the default order)")
    if method == "mix":
        recorder = fit_mixed(cfg, model, name, data, store)
        loss, extra["clean_per_batch"] = None, CLEAN_PER_BATCH
    elif method == "plain":
        loss = nl.weighted_ce(np.ones(len(train[1])))
    elif method == "random":
        loss = nl.weighted_ce(nl.random_example_weights(len(train[1]), cfg.seed))
    elif method == "cb":
        counts = np.bincount(train[1], minlength=nl.NUM_CLASSES)
        class_weights = nl.class_balanced_weights(counts, cfg.cb_beta)
        loss = nl.weighted_ce(class_weights[train[1]])
        extra["class_weights"] = class_weights.tolist()
    elif method == "forward":
        noisy = build_model(cfg)
        noisy.load_weights(path)
        probs = tf.nn.softmax(noisy.predict(data["val"][0], batch_size=1000, verbose=0)).numpy()
        transition = nl.estimate_transition(probs, data["val"][1], nl.NUM_CLASSES)
        loss = nl.forward_corrected_ce(transition)
        extra["estimated_transition"] = transition.tolist()
    elif method == "clean":  # the clean examples alone, as many SGD steps
        loss, train = nl.weighted_ce(np.ones(len(data["val"][1]))), data["val"]
    elif method in FINETUNED:  # a trained model, then SGD on the clean examples
        model.load_weights(path)
        recorder = fit_plain(cfg, model, name, data["val"], nl.weighted_ce(np.ones(len(data["val"][1]))), store,
                             data, lr=cfg.finetune_lr, epochs=cfg.finetune_epochs,
                             steps_per_epoch=max(1, len(data["val"][1]) // cfg.batch_size))
        return oc.final_row(recorder, start=f"{source}'s final weights")
    else:
        raise ValueError(f"unknown baseline {method!r}")
    if method != "mix":
        recorder = fit_plain(cfg, model, name, train, loss, store, data, lr=cfg.lr, epochs=cfg.epochs,
                             steps_per_epoch=steps_per_epoch)
    row = oc.final_row(recorder, **extra)
    val = recorder.rec["val_accuracy"][1:]
    best = int(np.argmax(val))  # early stopping on the clean validation set: the best epoch's test accuracy
    row["early_stopped"] = {"epoch": best + 1, "val_accuracy": val[best],
                            "test_accuracy": recorder.rec["test_accuracy"][1 + best]}
    if method in ("plain", "mix"):  # finetune and forward start from plain, mix_ft from mix
        write_atomically(trained_weights_path(store, method, cfg.seed), model.save_weights)
    return row


def run_lookahead(cfg: Config, data: dict, store: oc.MethodStore, name: str, clean_per_batch: int) -> dict:
    """Ren et al.'s learning to reweight: fresh weights every SGD step from a one-step look-ahead's
    hypergradient at ε = 0 (tf_bilevel, T = K = 1), clipped at 0 and normalized over the
    minibatch; `clean_per_batch` clean examples join each minibatch at weight 1/B (ren_mix)."""
    from experiments.models import lookahead_weights as lw

    classifier = build_model(cfg)
    x, y = data["train"]
    model = lw.LookAheadReweighting(classifier, len(y), cfg.lr, jit_compile=cfg.jit_compile,
                                    clean_per_batch=clean_per_batch)
    model.compile(optimizer=keras.optimizers.SGD(cfg.lr, momentum=cfg.momentum), jit_compile=False)
    val_batch = min(cfg.val_batch_size, len(data["val"][1]))

    def make_stream(start: int) -> tf.data.Dataset:
        streams = [oc.minibatch_stream(x, nl.pack(y), cfg.batch_size, cfg.seed, start),
                   oc.minibatch_stream(*data["val"], val_batch, cfg.seed + 1, start)]
        if clean_per_batch:
            streams.append(oc.minibatch_stream(*data["val"], clean_per_batch, cfg.seed + 2, start))
        return tf.data.Dataset.zip(tuple(streams)).map(
            lambda t, v, *c: ((t[0], v[0], v[1], *(c[0] if c else ())), t[1]))

    model((x[:1], data["val"][0][:1], data["val"][1][:1]))  # build (BackupAndRestore needs the variables)
    recorder = oc.fit_recorded(model, name, make_stream, epochs=cfg.epochs, steps_per_epoch=len(y) // cfg.batch_size,
                               test=data["test"], val=data["val"], store=store, recorded=classifier)
    write_atomically(store.path(name, ".weights.h5"), classifier.save_weights)  # <name>_ft starts from it
    v = np.asarray(model.mean_weights(), np.float64)  # B·w̃_i averaged over the steps that saw example i
    return oc.final_row(recorder, clean_per_batch=clean_per_batch, example_weights=weight_diagnostics(v, data),
                        last_step_weights=weight_diagnostics(np.asarray(model.last_weights.numpy(), np.float64), data))


def run_one(cfg: Config, data: dict, method: str, store: oc.MethodStore) -> dict:
    name = key(method, cfg.seed)
    if method in LOOKAHEAD:
        return run_lookahead(cfg, data, store, name, CLEAN_PER_BATCH if method == "ren_mix" else 0)
    if method in ("mwn", "mwn_k", "mwn_cls"):
        return run_mwn(cfg, data, store, name, cfg.k if method == "mwn_k" else 1, class_aware=method == "mwn_cls")
    if method in ("l2rw", "l2rw_k", "l2rw_mix"):
        return run_l2rw(cfg, data, store, name, cfg.k if method == "l2rw_k" else 1,
                        CLEAN_PER_BATCH if method == "l2rw_mix" else 0)
    return run_baseline(cfg, data, method, store)


def run_methods(cfg: Config, data: dict, store: oc.MethodStore) -> dict:
    """Every (seed, method) run in order, seed by seed; finished ones are read back."""
    rows = {}
    for seed in cfg.seeds:
        run_cfg = dataclasses.replace(cfg, seed=seed)
        for method in cfg.methods:
            name = key(method, seed)
            rows[name] = store.run_once(name, lambda: run_one(run_cfg, data, method, store))
    return rows


# ----------------------------------------------------------------------------------------
# Summaries, target, figures.
# ----------------------------------------------------------------------------------------
LABELS = {"plain": "plain", "finetune": "plain, then fine-tuned "
          "on the clean set", "clean": "clean set alone", "random": "random fixed weights",
          "forward": "forward correction (C from the clean set)", "cb": "class-balanced loss",
          "mwn": "Meta-Weight-Net, 1-RMD", "mwn_k": "Meta-Weight-Net, K-RMD", "l2rw": "per-example weights, 1-RMD",
          "l2rw_k": "per-example weights, K-RMD", "mwn_ft": "Meta-Weight-Net 1-RMD, then fine-tuned",
          "l2rw_ft": "per-example weights 1-RMD, then fine-tuned",
          "ren": "look-ahead weights per step (Ren et al.)", "ren_ft": "look-ahead weights, then fine-tuned",
          "ren_mix": "look-ahead weights + clean examples in each batch",
          "ren_mix_ft": "look-ahead weights + clean in batch, then fine-tuned",
          "l2rw_mix": "per-example weights 1-RMD + clean examples in each batch",
          "l2rw_mix_ft": "per-example weights 1-RMD + clean in batch, then fine-tuned",
          "mix": "plain + clean examples in each batch", "mix_ft": "plain + clean in batch, then fine-tuned",
          "mwn_cls": "Meta-Weight-Net on (loss, label), normalized, 1-RMD",
          "mwn_cls_ft": "Meta-Weight-Net on (loss, label) 1-RMD, then fine-tuned",
          "mwn_k_ft": "Meta-Weight-Net K-RMD, then fine-tuned"}


def early_stopped_accuracy(row: dict) -> float:
    """Test accuracy at the epoch (≥ 1) of best clean-validation accuracy (ties: the first)."""
    val = row["record"]["val_accuracy"][1:]
    return float(row["record"]["test_accuracy"][1 + int(np.argmax(val))])


def is_bilevel(name: str) -> bool:
    """mwn, l2rw, ... and their early-stopped (_es) variants."""
    return name in BILEVEL or (name.endswith("_es") and name[:-3] in BILEVEL)


def summarize(rows: dict) -> dict:
    """{method: {"test_accuracy": [per seed], "mean", "std", "seeds"}}, plus "<method>_es"
    (early-stopped on the clean set; plain's is "plain_es") for every method that trains from
    scratch, and the mean weight diagnostics of the learned weights."""
    groups: dict[str, dict[int, dict]] = {}
    for name, row in rows.items():
        method, seed = name.rsplit(".seed", 1)
        groups.setdefault(method, {})[int(seed)] = row
    out = {}
    for method in [m for m in METHODS if m in groups]:
        seeds = sorted(groups[method])
        variants = [(method, lambda r: r["test_accuracy"])]
        if method not in FINETUNED:
            variants.append((f"{method}_es", early_stopped_accuracy))
        for name, get in variants:
            acc = [float(get(groups[method][s])) for s in seeds]
            out[name] = {"seeds": seeds, "test_accuracy": acc, "mean": float(np.mean(acc)),
                         "std": float(np.std(acc, ddof=1)) if len(acc) > 1 else None,
                         "train_seconds": [float(groups[method][s]["train_seconds"]) for s in seeds]}
        diag = [groups[method][s]["example_weights"] for s in seeds if "example_weights" in groups[method][s]]
        if diag:
            for field in ("mean_weight_wrong_labels", "mean_weight_right_labels", "detector_precision",
                          "detector_recall"):
                values = [d[field] for d in diag if d.get(field) is not None]
                if values:
                    out[method][field] = float(np.mean(values))
            out[method]["mean_weight_per_class"] = np.mean(
                [[w if w is not None else np.nan for w in d["mean_weight_per_class"]] for d in diag], axis=0).tolist()
    return out


def target(rows: dict) -> dict:
    """Issue #17's goal: the best tf_bilevel method's mean test accuracy ≥ 2 points above the
    best baseline's (settings flip and longtail)."""
    summary = summarize(rows)
    bilevel = {m: s["mean"] for m, s in summary.items() if is_bilevel(m)}
    baselines = {m: s["mean"] for m, s in summary.items() if not is_bilevel(m)}
    if not bilevel or not baselines:
        return {"summary": summary}
    best_b, best_base = max(bilevel, key=bilevel.get), max(baselines, key=baselines.get)
    gain = 100 * (bilevel[best_b] - baselines[best_base])
    return {"summary": summary, "best_bilevel": best_b, "best_baseline": best_base, "gain_points": gain, "goal_points": 2.0,
            "reached": bool(gain >= 2.0)}


def format_table(results: dict) -> str:
    summary = summarize(results["methods"])

    def label(method: str) -> str:
        base = method[:-3] if method.endswith("_es") else method
        return (LABELS[base] + (f" (K={results['config']['k']})" if base in K_METHODS else "")
                + (", early-stopped" if base != method else ""))

    width = max([len("method"), *(len(label(m)) for m in summary)])
    lines = [f"{'method':<{width}} {'test acc % (mean ± std)':>24} {'seeds':>5} {'s/run':>6}"]
    for method, s in summary.items():
        std = f"{100 * s['std']:.2f}" if s["std"] is not None else "-"
        lines.append(f"{label(method):<{width}} {100 * s['mean']:>15.2f} ± {std:<6} {len(s['seeds']):>5} "
                     f"{np.mean(s['train_seconds']):>6.0f}")
    for method in BILEVEL:
        s = summary.get(method)
        if s and "mean_weight_per_class" not in s:
            continue
        if s and "mean_weight_wrong_labels" in s:
            p = s.get("detector_precision")
            lines.append(f"{method}: mean weight wrong {s['mean_weight_wrong_labels']:.3f} / right "
                         f"{s['mean_weight_right_labels']:.3f}; weight < {DETECTOR_THRESHOLD} as a wrong-label "
                         f"detector: precision {'-' if p is None else f'{p:.3f}'}, recall {s['detector_recall']:.3f}")
        elif s:
            lines.append(f"{method}: mean weight per class " + " ".join(f"{w:.2f}" for w in s["mean_weight_per_class"]))
    if "gain_points" in results.get("target", {}):
        t = results["target"]
        lines.append(f"target: best tf_bilevel ({t['best_bilevel']}) {t['gain_points']:+.2f} points over the best "
                     f"baseline ({t['best_baseline']}) (goal >= 2) -> {'reached' if t['reached'] else 'NOT reached'}")
    return "\n".join(lines)


FIGURES = ("test_accuracy", "weighting", "example_weights")  # plot_figures' kinds, <kind>.png in --output_dir


def group_rows(rows: dict) -> dict[str, list]:
    """{method: [its rows, by seed]} from {"<method>.seed<N>": row}."""
    groups: dict[str, dict[int, dict]] = {}
    for name, row in rows.items():
        method, seed = name.rsplit(".seed", 1)
        groups.setdefault(method, {})[int(seed)] = row
    return {m: [g[s] for s in sorted(g)] for m, g in groups.items()}


def seeds_text(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def plotted_methods(summary: dict, target_check: dict) -> tuple[list[str], list[str]]:
    """(curves, fine-tuned end points) of the accuracy figure: the best baseline (or the run it
    fine-tunes), plain, and every tf_bilevel method."""
    best = target_check.get("best_baseline", "plain")
    best = best[:-3] if best.endswith("_es") else best
    baselines = {"plain", FINETUNED.get(best, best)}
    curves = [m for m in METHODS if m in summary and m not in FINETUNED and (m in BILEVEL or m in baselines)]
    tuned = [m for m in FINETUNED if m in summary and (m in BILEVEL or m == best)]
    return curves, tuned


def plot_figures(results: dict, output_dir: str, names: Optional[dict] = None) -> dict:
    """The figures (FIGURES) as PNGs in `output_dir`, named <kind>.png or names[kind]: test
    accuracy per epoch (mean over seeds, min–max band) of the best baseline, plain and the
    tf_bilevel methods, with the fine-tuned ones' final accuracy; Meta-Weight-Net's learned V(ℓ);
    histograms of the learned weights of wrong and right labels (summed over the seeds)."""
    from experiments.common import plotting

    plt, rows, cfg, data = plotting.plt, results["methods"], results["config"], results["data"]
    names = {kind: f"{kind}.png" for kind in FIGURES} | (names or {})
    what = (f"{data['wrong_fraction'] * 100:.0f}% wrong labels ({cfg['setting']})" if cfg["setting"] != "longtail"
            else f"long-tailed, ratio {cfg['imbalance']:g}")
    budget = (f"{data['dataset']}, {data['n_train']} training examples, {what}; {cfg['model']}, "
              f"{cfg['epochs']} epochs of batch {cfg['batch_size']}")
    groups = group_rows(rows)
    target_check = results.get("target") or target(rows)
    summary = target_check["summary"]
    figures = {}
    fig, ax = plt.subplots(figsize=(11, 5.5))
    colors = plt.get_cmap("tab10")
    curves, tuned = plotted_methods(summary, target_check)
    for i, method in enumerate(curves):
        acc = np.array([r["record"]["test_accuracy"] for r in groups[method]], np.float64)
        epochs = groups[method][0]["record"]["epoch"]
        style = "-" if method in BILEVEL else "--"
        ax.plot(epochs, acc.mean(0), style, color=colors(i % 10), label=f"{method} ({seeds_text(len(acc))})")
        if len(acc) > 1:
            ax.fill_between(epochs, acc.min(0), acc.max(0), color=colors(i % 10), alpha=0.2)
    markers = "*PsXDvph^<>"
    for i, method in enumerate(tuned):
        acc = [r["test_accuracy"] for r in groups[method]]
        ax.errorbar([cfg["epochs"] + 0.25 * (i + 1)], [np.mean(acc)],
                    yerr=[[np.mean(acc) - min(acc)], [max(acc) - np.mean(acc)]], fmt=markers[i % len(markers)],
                    color="k" if method not in BILEVEL else colors((curves.index(FINETUNED[method]) % 10)
                                                                    if FINETUNED[method] in curves else 9),
                    ms=9, label=f"{method}: {FINETUNED[method]}, then fine-tuned ({seeds_text(len(acc))})")
    if "best_baseline" in target_check:
        best = summary[target_check["best_baseline"]]["mean"]
        ax.axhline(best, color="k", lw=0.8, ls=":", label=f"best baseline {target_check['best_baseline']} "
                   f"({100 * best:.2f}%)")
        ax.axhline(best + 0.02, color="r", lw=0.8, ls=":", label="target: best baseline + 2 points")
        ax.set_ylim(max(0.0, best - 0.25), min(1.0, best + 0.05))
    ax.set_xlabel("epoch (passes over the training set); markers: final test accuracy after fine-tuning")
    ax.set_ylabel("test accuracy (mean over seeds, band and bars: min–max)")
    ax.set_title(f"Learning to reweight: test accuracy\n{budget}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figures["test_accuracy"] = plotting.save_figure(fig, os.path.join(output_dir, names["test_accuracy"]))

    mwn = [m for m in ("mwn", "mwn_k", "mwn_cls") if m in groups]  # mwn_cls: V averaged over the labels
    if mwn:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, method in enumerate(mwn):
            for j, row in enumerate(groups[method]):
                ax.plot(LOSS_GRID, row["final_grid_weights"], ("-", "--", "-.")[i % 3], color=colors(i),
                        label=f"{method} ({seeds_text(len(groups[method]))})" if j == 0 else None)
            first = groups[method][0]["record"]
            for h in first["hp"][1: len(first["hp"]) // 2]:  # the first half of training, faded: how V formed
                ax.plot(LOSS_GRID, h["grid_weights"], "-", color=colors(i), alpha=0.05)
        ax.set_xlabel("per-example training loss ℓ (cross-entropy, nats)")
        ax.set_ylabel("weight V(ℓ; θ)")
        ax.set_title(f"learned weighting function (final θ of every seed; faded: first seed's first half)\n{budget}",
                     fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend()
        figures["weighting"] = plotting.save_figure(fig, os.path.join(output_dir, names["weighting"]))

    learned = [m for m in BILEVEL if m in groups and "example_weights" in groups[m][0]]
    if learned:
        cols = min(3, len(learned))
        rows_ = -(-len(learned) // cols)
        fig, axes = plt.subplots(rows_, cols, figsize=(max(4.6 * cols, 8.0), 3.8 * rows_), squeeze=False)
        for ax in axes.flat[len(learned):]:
            ax.set_visible(False)
        for ax, method in zip(axes.flat, learned):
            ws = [r["example_weights"] for r in groups[method]]
            bins = np.asarray(ws[0]["histogram_bins"])
            pooled = [w for w in ws if np.array_equal(w["histogram_bins"], bins)]  # lookahead bins vary by seed
            centers, width = (bins[1:] + bins[:-1]) / 2, bins[1] - bins[0]
            if "histogram_wrong" in ws[0]:
                ax.bar(centers - width / 4, np.sum([w["histogram_right"] for w in pooled], 0), width / 2,
                       label="right label")
                ax.bar(centers + width / 4, np.sum([w["histogram_wrong"] for w in pooled], 0), width / 2,
                       label="wrong label")
                ax.set_yscale("log")
                ax.set_ylim(bottom=0.5)
                what_w = "B·w̃ averaged over the example's steps" if method in LOOKAHEAD else "learned weight"
                ax.set_xlabel(f"{what_w} ({seeds_text(len(pooled))} summed)")
                ax.set_ylabel("training examples (log scale)")
                ax.legend(fontsize=8)
            else:
                per_class = [w["mean_weight_per_class"] for w in ws]
                ax.bar(np.arange(nl.NUM_CLASSES), np.mean(per_class, axis=0))
                ax.set_xlabel(f"class (training examples {data['class_counts'][0]} … {data['class_counts'][-1]})")
                ax.set_ylabel(f"mean learned weight (mean of {seeds_text(len(ws))})")
            ax.set_title(method, fontsize=9)
            ax.grid(True, alpha=0.3)
        fig.suptitle(f"weights of the training examples after training\n{budget}", fontsize=9)
        figures["example_weights"] = plotting.save_figure(fig, os.path.join(output_dir, names["example_weights"]))
    return {k: os.path.basename(v) for k, v in figures.items()}


# ----------------------------------------------------------------------------------------
# The report from the saved runs (--report_dir): nothing is trained.
# ----------------------------------------------------------------------------------------
REPORT_FIGURES = {"test_accuracy": "test_accuracy", "weighting": "weighting", "example_weights": "weights"}


def saved_rows(cfg: Config) -> tuple[dict, list[str]]:
    """({"<method>.seed<N>": row} of the finished runs among cfg.methods × cfg.seeds in
    <output_dir>/resume, [the names of the others]), read only. SettingsMismatchError when the
    folder's fingerprint is not cfg's (the report would mislabel the runs), OutputDirError when
    there is nothing to report."""
    from tf_bilevel.resume import check_settings

    from experiments.common import config
    from experiments.common.keras_resume import MethodStore
    from experiments.common.run_state import FINGERPRINT, RESTART_HINT, OutputDirError, read_state_json

    store = MethodStore(os.path.join(cfg.output_dir, "resume"))  # oc.MethodStore would create the folder
    fingerprint = os.path.join(store.root, FINGERPRINT)
    if not os.path.exists(fingerprint):
        raise OutputDirError(f"--output_dir={cfg.output_dir} holds no runs to report ({fingerprint} is absent): point "
                             "it at a folder a run of this program wrote")
    check_settings(read_state_json(fingerprint, "the folder is damaged"), config.result_settings(cfg),
                   where=store.root, what="the runs",
                   remedy="pass the flags that run used (e.g. --setting), or another --output_dir")
    rows, missing = {}, []
    for seed in cfg.seeds:
        for method in cfg.methods:
            name = key(method, seed)
            if store.finished(name):
                rows[name] = read_state_json(store.path(name, ".json"), f"delete it to rerun {name}, {RESTART_HINT}",
                                             ("test_accuracy", "record", "train_seconds"))
            else:
                missing.append(name)
    if not rows:
        raise OutputDirError(f"--output_dir: no finished run of --methods={','.join(cfg.methods)} × --seeds="
                             f"{','.join(map(str, cfg.seeds))} in {store.root} to report")
    return rows, missing


def _seeds(names: Sequence[str], method: str) -> str:
    """The seeds of `method` among run names "<method>.seed<N>", as "0,1,2"."""
    parts = (n.rsplit(".seed", 1) for n in names)
    return ",".join(str(s) for s in sorted(int(seed) for m, seed in parts if m == method))


def _cell(s: Optional[dict], bold: bool = False) -> str:
    if s is None:
        return ""
    if s["std"] is None:
        text = f"{100 * s['mean']:.2f} (seed {s['seeds'][0]})"
    else:
        text = f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"
    return f"**{text}**" if bold else text


def _seconds(s: Optional[dict]) -> str:
    if s is None:
        return ""
    t = s["train_seconds"]
    return f"{np.mean(t):.0f}" if len(t) == 1 else f"{np.mean(t):.0f} ({min(t):.0f}–{max(t):.0f})"


def format_markdown(results: dict, missing: Sequence[str] = ()) -> str:
    """The setting's tables as Markdown (RESULTS.md): test accuracy of every method trained from
    scratch (final, early-stopped, then fine-tuned) with seeds and training seconds per run; the
    learned weights' separation of wrong and right labels (or their mean per class, long tail);
    the target check; which runs are present and which are missing."""
    cfg, rows = results["config"], results["methods"]
    t = target(rows)
    summary, best = t["summary"], {t.get("best_baseline"), t.get("best_bilevel")}
    groups = group_rows(rows)

    def k(method: str) -> str:
        return f" (K={cfg['k']})" if method in K_METHODS else ""

    def label(method: str) -> str:
        return f"{LABELS[method]}{k(method)}{' (tf_bilevel)' if method in BILEVEL else ''} (`{method}`)"

    tuned_of = {source: tuned for tuned, source in FINETUNED.items()}
    lines = [f"#### {cfg['setting']}: test accuracy % (mean ± std over the seeds, std with ddof = 1)", "",
             "| method | seeds | final | early-stopped | then fine-tuned on the clean set | train s per run "
             "(mean (min–max); fine-tuning) |", "|---|---|---|---|---|---|"]
    order = [m for m in METHODS if m in summary and m not in FINETUNED]
    order = [m for m in order if m not in BILEVEL] + [m for m in order if m in BILEVEL]
    for method in order:
        ft = tuned_of.get(method)
        s, es, sft = summary[method], summary.get(f"{method}_es"), summary.get(ft)
        seeds = ",".join(map(str, s["seeds"]))
        ft_cell = _cell(sft, ft in best)
        if sft is not None and sft["seeds"] != s["seeds"]:
            ft_cell += f" (seeds {','.join(map(str, sft['seeds']))})"
        seconds = _seconds(s) + (f"; {_seconds(sft)}" if sft is not None else "")
        lines.append(f"| {label(method)} | {seeds} | {_cell(s, method in best)} | {_cell(es, f'{method}_es' in best)} "
                     f"| {ft_cell} | {seconds} |")
    orphans = [m for m in FINETUNED if m in summary and FINETUNED[m] not in summary]
    for method in orphans:  # a fine-tuning whose source row is not in the report
        lines.append(f"| {label(method)} | {','.join(map(str, summary[method]['seeds']))} | | | "
                     f"{_cell(summary[method], method in best)} | {_seconds(summary[method])} |")
    hours = sum(float(r["train_seconds"]) for r in rows.values()) / 3600
    lines += ["", f"Bold: the best baseline and the best tf_bilevel mean (any column). Summed training time of "
              f"these {len(rows)} runs: {hours:.1f} h (`train_seconds` of each run)."]
    learned = [m for m in BILEVEL if m in groups and "example_weights" in groups[m][0]]
    noisy = any("mean_weight_wrong_labels" in groups[m][0]["example_weights"] for m in learned)
    if learned and noisy:
        lines += ["", f"Learned weights of the training examples after training (mean over the seeds of each seed's "
                  f"value; detector: weight < {DETECTOR_THRESHOLD} flags a label as wrong):", "",
                  "| method | seeds | mean weight, wrong labels | mean weight, right labels | detector precision "
                  "| detector recall |", "|---|---|---|---|---|---|"]
        for method in learned:
            s = summary[method]
            p = s.get("detector_precision")
            lines.append(f"| `{method}`{k(method)} | "
                         f"{','.join(map(str, s['seeds']))} | {s['mean_weight_wrong_labels']:.3f} | "
                         f"{s['mean_weight_right_labels']:.3f} | {'–' if p is None else f'{p:.3f}'} | "
                         f"{s['detector_recall']:.3f} |")
    elif learned:
        counts = results["data"]["class_counts"]
        lines += ["", "Mean learned weight per class (mean over the seeds; no wrong labels here), classes from the "
                  f"most to the least frequent ({counts[0]} … {counts[-1]} training examples):", "",
                  "| method | seeds | " + " | ".join(str(c) for c in range(len(counts))) + " |",
                  "|---|---|" + "---|" * len(counts)]
        for method in learned:
            s = summary[method]
            lines.append(f"| `{method}` | {','.join(map(str, s['seeds']))} | "
                         + " | ".join("–" if np.isnan(w) else f"{w:.2f}" for w in s["mean_weight_per_class"]) + " |")
    if "gain_points" in t:
        lines += ["", f"Target (best tf_bilevel mean ≥ best baseline mean + 2 points): best tf_bilevel "
                  f"`{t['best_bilevel']}` {100 * summary[t['best_bilevel']]['mean']:.2f}, best baseline "
                  f"`{t['best_baseline']}` {100 * summary[t['best_baseline']]['mean']:.2f}: "
                  f"{t['gain_points']:+.2f} points, **{'reached' if t['reached'] else 'not reached'}**."]
    lines += ["", "Runs present (method: seeds): "
              + "; ".join(f"`{m}` {_seeds(list(rows), m)}" for m in METHODS if m in groups) + "."]
    if missing:
        absent = group_rows(dict.fromkeys(missing))
        lines.append("Not run (of the methods × seeds asked for): "
                     + "; ".join(f"`{m}` {_seeds(missing, m)}" for m in METHODS if m in absent) + ".")
    return "\n".join(lines) + "\n"


def report(cfg: Config) -> dict:
    """--report_dir: the tables (reweighting_<setting>_tables.md) and figures
    (reweighting_<setting>_{test_accuracy,weighting,weights}.png) of the finished runs in
    <output_dir>/resume, into cfg.report_dir; reads the runs only, trains nothing (safe while a
    run holds the folder). Returns the results as results.json would hold them."""
    rows, missing = saved_rows(cfg)
    _, data_info = load_data(cfg)  # the same split and noise as the runs (fingerprinted): for the titles
    results = {"config": dataclasses.asdict(cfg), "data": data_info, "methods": rows, "target": target(rows),
               "missing": missing}
    prefix = f"reweighting_{cfg.setting}_"
    results["figures"] = plot_figures(results, cfg.report_dir,
                                      {k: f"{prefix}{v}.png" for k, v in REPORT_FIGURES.items()})
    tables = os.path.join(cfg.report_dir, f"{prefix}tables.md")
    text = (f"<!-- generated by experiments/reweighting.py --report_dir from {cfg.output_dir} "
            f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): regenerate, do not edit -->\n"
            + format_markdown(results, missing))

    def write(path: str) -> None:
        with open(path, "w") as f:
            f.write(text)

    write_atomically(tables, write)
    results["tables"] = os.path.basename(tables)
    print(format_table(results), flush=True)
    print(f"[reweighting] {len(rows)} runs of {cfg.output_dir} reported in {cfg.report_dir}: {results['tables']}, "
          f"{', '.join(results['figures'].values())}", flush=True)
    return results


PROGRAM = program.Program(
    "reweighting", Config, PRESETS, experiment=oc.methods_experiment("reweighting", run_methods, target),
    load_data=load_data, figures=plot_figures, table=format_table, state_dirs=("resume",), fingerprint="resume",
    fingerprint_what="the runs", data_name=lambda cfg: cfg.dataset, report=("report_dir", report))


def run_experiment(cfg: Config, arrays: Optional[dict] = None, data_info: Optional[dict] = None) -> dict:
    """Runs the methods (skipping finished runs), writes results.json and the figures, under an
    exclusive lock on cfg.output_dir; --restart discards the saved state first."""
    return program.run_program(PROGRAM, cfg, None if arrays is None else (arrays, data_info))


if __name__ == "__main__":
    program.start(PROGRAM)
