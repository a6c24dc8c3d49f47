r"""Data hypercleaning on MNIST with K-RMD (paper §4.2.1: Table 2, Fig. 5; appendix G.1).

Learns one weight per training example (5000 MNIST examples, half of the labels redrawn) so that
a linear classifier trained by T gradient steps on the weighted loss fits 5000 clean validation
examples; prints Table 2 (accuracies, validation loss, F1 of flagging the corrupted labels, time
and memory per K) and writes results.json and figures to --output_dir. A killed run continues
when the same command is rerun. Setup, choices and measured results: RESULTS.md, "Data hypercleaning".

  tfb-hypercleaning --preset=readme   # K in {1, 5, 100}, 100 hyper-iterations (a few minutes)
  tfb-hypercleaning                   # the paper: K in {1, 5, 25, 50, 100}, 1000 hyper-iterations
  tfb-hypercleaning --quick           # a tiny budget (tests); explicit flags override any preset
  (or python -m experiments.hypercleaning ...)
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402
import tf_bilevel as tfb  # noqa: E402
from tf_bilevel.keras.losses import categorical_crossentropy  # noqa: E402
from experiments.common import config, program, provenance, run_state  # noqa: E402
from experiments.common.memory import PROBE_METHOD, format_probes, mib, probe  # noqa: E402
from experiments.common.checkpoint_store import LoopClock, LoopStore, arrays_sha256, run_resumable  # noqa: E402
from experiments.common.config import option, result_settings  # noqa: E402
from experiments.common.subprocesses import load_arrays, run_each  # noqa: E402
from experiments.common.timing import round_robin_medians  # noqa: E402
from experiments.common.run_state import (  # noqa: E402, F401 (SettingsMismatchError: re-exported)
    RESTART_HINT, SettingsMismatchError, guard_settings, jsonable,
)

NORMALIZATIONS = ("mean", "mean_all", "sum")
SPLIT_KEYS = ("x_train", "y_train", "x_val", "y_val", "corrupted", "replaced")  # what a K's run depends on

# Table 2 (after 1000 hyper-iterations) and the appendix G.1 F1 table (150 hyper-iterations).
PAPER_TABLE2 = {
    1: dict(test_accuracy=87.50, val_accuracy=89.32, val_loss=0.413, f1=0.85),
    5: dict(test_accuracy=88.05, val_accuracy=89.90, val_loss=0.383, f1=0.89),
    25: dict(test_accuracy=88.12, val_accuracy=89.94, val_loss=0.382, f1=0.89),
    50: dict(test_accuracy=88.17, val_accuracy=90.18, val_loss=0.381, f1=0.89),
    100: dict(test_accuracy=88.33, val_accuracy=90.24, val_loss=0.380, f1=0.88),
}
PAPER_F1_THRESHOLDS = {  # K -> {threshold: F1}
    1: {-4.0: 0.84, -3.0: 0.84, -1.0: 0.84},
    5: {-4.0: 0.89, -3.0: 0.89, -1.0: 0.90},
    25: {-4.0: 0.89, -3.0: 0.89, -1.0: 0.89},
    50: {-4.0: 0.89, -3.0: 0.89, -1.0: 0.89},
    100: {-4.0: 0.89, -3.0: 0.89, -1.0: 0.89},
}

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's settings are the defaults of Config.
    "full": {},
    # The README's first command: a real result in a few minutes on 2 CPU cores.
    "readme": dict(truncate=(1, 5, 100), hyper_iterations=100, exact_every=10, eval_every=10),
    # Tests: a small problem, a handful of hyper-iterations.
    "quick": dict(truncate=(1, 5, 100), hyper_iterations=12, n_train=1000, n_val=1000, exact_every=4,
                  eval_every=4, measure_memory=False, timing_rounds=2),
}


# ---- Configuration.
@dataclasses.dataclass
class Config:
    output_dir: str = option("out/hypercleaning", "Where results.json and the PNG figures are written.", result=False)
    truncate: Sequence[int] = option((1, 5, 25, 50, 100), "K values of K-RMD (K = inner_steps is full RMD).",
                                     result=False)  # K names its own checkpoint folder
    hyper_iterations: int = option(1000, "Outer (Adam) iterations R per K.")
    inner_steps: int = option(100, "T, gradient-descent steps of the inner problem.")
    inner_lr: float = option(1.0, "γ, inner step size.")
    regularization: float = option(0.001, "ρ of ρ‖W‖²_F in g.")
    loss_normalization: str = option(
        "mean_all", "mean: (1/n)Σσ(λ_i)ℓ_i + ρ‖W‖²; mean_all: (1/n)(Σσ(λ_i)ℓ_i + ρ‖W‖²); sum: the paper's formula "
        "as printed (diverges with γ = 1).", choices=NORMALIZATIONS)
    first_update_norm: Optional[float] = option(
        None, "Target ‖first Adam update of λ‖ used to tune η0 per K (appendix G.1); default √n_train, i.e. η0 ≈ 1.")
    outer_lr: Optional[float] = option(None, "Fixed η0 for every K (disables the per-K tuning).")
    adam_epsilon: float = option(1e-8, "ε of the outer Adam.")
    init_lambda: float = option(0.0, "λ_0 for every example (0: σ = ½).")
    corruption: float = option(0.5, "Probability that a training label is redrawn uniformly.")
    n_train: int = option(5000, "Training examples (class-balanced, multiple of 10).")
    n_val: int = option(5000, "Validation examples (class-balanced, multiple of 10).")
    seed: int = option(0, "Seed of the split / corruption (and numpy/TF).")
    f1_thresholds: Sequence[float] = option((-4.0, -3.0, -1.0), "Thresholds τ: flag λ_i < τ (appendix G.1).")
    table_threshold: float = option(-3.0, "τ of the Table 2 F1 column and the F1 curves.")
    exact_every: int = option(25, "Exact (full-RMD) ‖d_λ f‖ every N hyper-iterations (Fig. 5); 0: only at the "
                              "start and the end.")
    eval_every: int = option(25, "Test accuracy every N hyper-iterations.")
    measure_memory: bool = option(True, "Peak memory per K, one fresh subprocess per K.", result=False)
    memory_probe_calls: int = option(3, "Steady-state calls per memory probe.", result=False)
    timing_rounds: int = option(5, "Extra hyper-iterations per K, timed round-robin over the K values after the "
                                "runs (s/it in the table; 0: use the runs' own median).", result=False)
    local_dir: Optional[str] = option(
        None, "Folder with the 4 MNIST IDX .gz files (default: tfds data_dir, then $TF_BILEVEL_MNIST_DIR or the "
        "project's shared data folder, then download).", result=False)  # the data's hash is fingerprinted
    data_dir: Optional[str] = option(None, "tensorflow-datasets data_dir (default ~/tensorflow_datasets).",
                                     result=False)
    jit_compile: bool = option(True, "XLA-compile the hyper-iteration.")
    save_every: int = option(
        50, "Save λ, the outer Adam's state and the curves of the running K every N hyper-iterations (and each "
        "finished K) under <output_dir>/checkpoints; rerunning the same command resumes from there (a finished K "
        "is not rerun; a run with another configuration in that folder is refused: delete it or pick another "
        "--output_dir). 0: no checkpoints.", result=False)
    restart: bool = option(False, "Delete the saved state (<output_dir>/checkpoints) and start over.", result=False)
    pause_after: Optional[str] = option(
        None, "(tests) K,ITER: after hyper-iteration ITER of K, write <output_dir>/paused_K<K>_at_<ITER> and wait to "
        "be killed (once: not if that file exists).", internal=True, result=False)
    memory_probe: Optional[str] = option(None, "JSON payload of one memory probe.", internal=True, result=False)
    preset: str = "full"

    def validated(self) -> "Config":
        cfg = dataclasses.replace(self)
        cfg.truncate = sorted({int(k) for k in cfg.truncate})
        T, first_update = cfg.inner_steps, cfg.first_update_norm
        cfg.first_update_norm = math.sqrt(max(cfg.n_train, 0)) if first_update is None else first_update
        config.require(
            cfg, inner_steps=(T >= 1, ">= 1"),
            truncate=(cfg.truncate and all(1 <= k <= T for k in cfg.truncate),
                      f"K values with 1 <= K <= inner_steps={T} (K = T is full RMD)"),
            hyper_iterations=(cfg.hyper_iterations >= 1, ">= 1"),
            loss_normalization=(cfg.loss_normalization in NORMALIZATIONS, f"one of {NORMALIZATIONS}"),
            n_train=(cfg.n_train >= 10 and cfg.n_train % 10 == 0, "a positive multiple of 10 (class-balanced)"),
            n_val=(cfg.n_val >= 10 and cfg.n_val % 10 == 0, "a positive multiple of 10 (class-balanced)"),
            corruption=(0.0 <= cfg.corruption <= 1.0, "a probability in [0, 1]"),
            inner_lr=(cfg.inner_lr > 0, "> 0"), first_update_norm=(cfg.first_update_norm > 0, "> 0"),
            outer_lr=(cfg.outer_lr is None or cfg.outer_lr > 0, "> 0 (or unset to tune η0 per K)"),
            exact_every=(cfg.exact_every >= 0, ">= 0 (0: only at the start and the end)"),
            eval_every=(cfg.eval_every >= 1, ">= 1"), save_every=(cfg.save_every >= 0, ">= 0 (0: no checkpoints)"))
        cfg.f1_thresholds = sorted({float(t) for t in cfg.f1_thresholds} | {float(cfg.table_threshold)})
        parse_pause_after(cfg.pause_after)
        return cfg


def parse_pause_after(value: Optional[str]) -> Optional[tuple[int, int]]:
    """--pause_after K,ITER as (K, ITER); None when unset."""
    pause = run_state.parse_pause_after(value, "K,ITER")
    if pause is not None and not pause[0].isdigit():
        raise ValueError(f"--pause_after must be K,ITER (two integers), got {value!r}")
    return None if pause is None else (int(pause[0]), pause[1])


# ---- The problem.
def cross_entropy(W: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """Per-example −log softmax(W x)[y]: the library's log_softmax cross-entropy of the one-hot
    labels. One-hot, not a gather, keeps the backward pass free of scatter ops, which XLA on CPU
    runs slowly. (TF 2.21 differentiates the fused tf.nn.sparse_softmax_cross_entropy_with_logits
    twice as well, eagerly and under XLA: its Hessian-vector products equal this form's.)"""
    logits = tf.matmul(x, W, transpose_b=True)
    return categorical_crossentropy(tf.one_hot(y, tf.shape(W)[0], dtype=logits.dtype), logits)


def make_losses(regularization: float, normalization: str, n_train: int) -> tuple[Callable, Callable]:
    """(inner g(W, λ, batch), outer f(W, λ, batch)) of §4.2.1, scaled as `normalization` says."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    data_scale = 1.0 if normalization == "sum" else 1.0 / n_train
    reg = regularization / n_train if normalization == "mean_all" else regularization

    def inner_loss(W, lam, batch):
        x, y = batch
        weighted = tf.reduce_sum(tf.sigmoid(lam) * cross_entropy(W, x, y))
        return data_scale * weighted + reg * tf.reduce_sum(tf.square(W))

    def outer_loss(W, lam, batch):
        x, y = batch
        return tf.reduce_mean(cross_entropy(W, x, y))

    return inner_loss, outer_loss


class Problem(NamedTuple):
    inner_loss: Callable
    outer_loss: Callable
    w0: tf.Tensor
    train: tuple  # (x [n, 785] float32, y [n] int32), noisy labels
    val: tuple
    corrupted: np.ndarray  # [n] bool: label changed
    replaced: np.ndarray  # [n] bool: label redrawn (may equal the true one)
    x_test: Optional[np.ndarray]
    y_test: Optional[np.ndarray]


def build_problem(cfg: Config, arrays: dict) -> Problem:
    """The tensors of the problem from hypercleaning-split arrays (x_train, y_train, ...)."""
    num_classes = int(max(arrays["y_train"].max(), arrays["y_val"].max())) + 1
    num_features = arrays["x_train"].shape[1]
    inner_loss, outer_loss = make_losses(cfg.regularization, cfg.loss_normalization, len(arrays["y_train"]))
    as_batch = lambda x, y: (tf.constant(x, tf.float32), tf.constant(y, tf.int32))  # noqa: E731
    return Problem(
        inner_loss, outer_loss,
        w0=tf.zeros((num_classes, num_features), tf.float32),
        train=as_batch(arrays["x_train"], arrays["y_train"]),
        val=as_batch(arrays["x_val"], arrays["y_val"]),
        corrupted=np.asarray(arrays["corrupted"], bool),
        replaced=np.asarray(arrays["replaced"], bool),
        x_test=arrays.get("x_test"),
        y_test=arrays.get("y_test"),
    )


def load_split(cfg: Config) -> tuple[dict, dict]:
    """The hypercleaning split (arrays) and a description of the data. Raises
    `DataUnavailableError` within seconds when there is no data and no network."""
    from experiments.data import tfds_offline
    from experiments.data.hypercleaning import hypercleaning_split

    data = tfds_offline.load_image_classification("mnist", data_dir=cfg.data_dir, local_dir=cfg.local_dir)
    split = hypercleaning_split(
        *data["train"], *data["test"], n_train=cfg.n_train, n_val=cfg.n_val, corruption=cfg.corruption,
        seed=cfg.seed, num_classes=10,
    )
    arrays = split._asdict()
    info = {
        "dataset": "mnist (tensorflow-datasets)",
        "source": tfds_offline.data_source("mnist"),
        "local_dir": cfg.local_dir,
        "data_dir": cfg.data_dir or tfds_offline.default_data_dir(),
        "n_train": int(len(split.y_train)),
        "n_val": int(len(split.y_val)),
        "n_test": int(len(split.y_test)),
        "n_replaced": int(split.replaced.sum()),
        "n_corrupted": int(split.corrupted.sum()),
        "num_features": int(split.x_train.shape[1]),
    }
    return arrays, info


def load_data(cfg: Config) -> tuple[dict, dict]:
    """`load_split`, after `check_flags_before_loading` (the load can take minutes on a busy machine)."""
    check_flags_before_loading(cfg)
    return load_split(cfg)


# ---- Metrics.
def flag_scores(lam: np.ndarray, corrupted: np.ndarray, threshold: float) -> dict:
    """Precision, recall and F1 of flagging example i as corrupted when λ_i < threshold
    (σ(λ_i) < σ(threshold)); F1 = 2·TP / (2·TP + FP + FN), 0 when nothing is flagged or corrupted."""
    flagged = np.asarray(lam) < threshold
    corrupted = np.asarray(corrupted, bool)
    tp = int(np.sum(flagged & corrupted))
    fp = int(np.sum(flagged & ~corrupted))
    fn = int(np.sum(~flagged & corrupted))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "flagged": tp + fp, "tp": tp, "fp": fp, "fn": fn}


def accuracy(W: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    return int(np.sum(np.argmax(x @ W.T, axis=1) == y)) / len(x)


# ---- Checkpoints: a killed run, rerun with the same command, resumes where it was.
CHECKPOINT_DIR = "checkpoints"
PAUSE_SECONDS = 120  # --pause_after: nobody killed the program, exit with an error rather than hang
DATA_SETTINGS = ("data_sha256", "n_test")  # the fingerprint's entries read from the data


def _checkpoint_settings(cfg: Config, **data: Any) -> dict:
    if data and set(data) != set(DATA_SETTINGS):  # else a resume would report a false settings mismatch
        raise AssertionError(f"_checkpoint_settings got the data entries {sorted(data)}, DATA_SETTINGS names "
                             f"{sorted(DATA_SETTINGS)}: keep the two the same")
    # checkpoint_format 2: tfb.HyperStepCheckpoint (λ saved as "hparams"); a folder of the
    # earlier layout is refused by name rather than reported as a damaged checkpoint.
    return result_settings(cfg, checkpoint_format=2, **data)


def check_flags_before_loading(cfg: Config) -> None:
    """The checkpoints' fingerprint against the flags alone (SettingsMismatchError), so that a rerun
    with other flags fails before the data is loaded; `prepare_checkpoints` checks the data's part."""
    if cfg.save_every > 0:
        run_state.check_stored_settings(Path(cfg.output_dir) / CHECKPOINT_DIR, _checkpoint_settings(cfg),
                                        what="the checkpoints", later=DATA_SETTINGS)


def prepare_checkpoints(cfg: Config, arrays: dict) -> Optional[Path]:
    """<output_dir>/checkpoints (None when --save_every=0), with the fingerprint of this
    configuration; raises SettingsMismatchError when it holds checkpoints of another one."""
    if cfg.save_every <= 0:
        return None
    root = Path(cfg.output_dir) / CHECKPOINT_DIR
    n_test = None if arrays.get("y_test") is None else int(len(arrays["y_test"]))
    settings = _checkpoint_settings(cfg, data_sha256=arrays_sha256(arrays, SPLIT_KEYS), n_test=n_test)
    guard_settings(root, settings, what="the checkpoints")
    return root


CURVES = ("val_loss", "val_accuracy", "hypergrad_norm", "f1", "precision", "recall", "lambda_mean_corrupted",
          "lambda_mean_clean", "wall_seconds", "cpu_seconds")


@dataclasses.dataclass
class TruncationRecord:
    """What a K's run records besides λ and Adam's state (those are in the tf.train.Checkpoint):
    η0, the curves over λ_0 … λ_R, the exact ‖d_λ f‖ and their time. The JSON sidecar of each
    checkpoint (with `LoopClock`'s keys), rebuilt from it on resumption (`from_state`)."""

    outer_lr: float
    unit_lr_first_update_norm: float
    initial_hypergrad_norm: float
    curves: dict = dataclasses.field(default_factory=lambda: {key: [] for key in CURVES})
    test_iterations: list = dataclasses.field(default_factory=list)
    test_accuracy: list = dataclasses.field(default_factory=list)
    exact_iterations: list = dataclasses.field(default_factory=list)
    exact_hypergrad_norm: list = dataclasses.field(default_factory=list)
    exact_hypergradient_seconds: float = 0.0

    @classmethod
    def from_state(cls, state: dict) -> "TruncationRecord":
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls)})

    def add_step(self, out: dict, wall_seconds: float, cpu_seconds: float) -> None:
        """The metrics of hyper-iteration k taken at λ_k (by the compiled step)."""
        self.curves["wall_seconds"].append(wall_seconds)
        self.curves["cpu_seconds"].append(cpu_seconds)
        self.curves["val_loss"].append(float(out["val_loss"]))
        self.curves["val_accuracy"].append(float(out["val_acc"]))
        self.curves["hypergrad_norm"].append(float(out["hypergrad_norm"]))

    def add_lambda(self, k: int, lam_k: np.ndarray, W: np.ndarray, problem: Problem, cfg: Config) -> None:
        """The flagging scores of λ_k, and the test accuracy of ŵ(λ_k) every --eval_every."""
        scores = flag_scores(lam_k, problem.corrupted, cfg.table_threshold)
        for key in ("f1", "precision", "recall"):
            self.curves[key].append(scores[key])
        self.curves["lambda_mean_corrupted"].append(float(lam_k[problem.corrupted].mean()))
        self.curves["lambda_mean_clean"].append(float(lam_k[~problem.corrupted].mean()))
        if (k % cfg.eval_every == 0 or k == cfg.hyper_iterations) and problem.x_test is not None:
            self.test_iterations.append(k)
            self.test_accuracy.append(accuracy(W, problem.x_test, problem.y_test))

    def add_exact(self, k: int, norm: float, seconds: float = 0.0) -> None:
        self.exact_iterations.append(k)
        self.exact_hypergrad_norm.append(norm)
        self.exact_hypergradient_seconds += seconds


def truncation_store(root: Path, truncate: int) -> LoopStore:
    """The state of one K in <root>/K<k> (see `LoopStore`): the HyperStep's checkpoint ckpt-<i>
    (λ and the outer Adam's variables, i = hyper-iterations done) with a `TruncationRecord` as
    its sidecar state-<i>.json, result.json once the K is finished. Deleting the K's folder
    reruns that K."""
    directory = root / f"K{truncate}"
    return LoopStore(directory, f"delete {directory} to rerun K={truncate} from the start, {RESTART_HINT}",
                     state_keys=[*(f.name for f in dataclasses.fields(TruncationRecord)), *LoopClock.KEYS],
                     result_keys=("outer_lr", "final", "timing", "curves"), identity={"truncate": truncate})


# ---- One K: the compiled hyper-iteration (tfb.HyperStep) and its loop.
def make_hypergradient(problem: Problem, cfg: Config, truncate: Optional[int]) -> tfb.Hypergradient:
    return tfb.hypergradient_fn(
        problem.inner_loss, problem.outer_loss, steps=cfg.inner_steps, learning_rate=cfg.inner_lr,
        truncate=truncate, jit_compile=cfg.jit_compile,
    )


def unit_lr_first_update_norm(hypergrad: tf.Tensor, epsilon: float) -> float:
    """‖first Adam update‖ with learning rate 1 for gradient `hypergrad` (applied to a scratch
    variable with the same optimizer class, so ε and bias correction are exactly Adam's)."""
    scratch = tf.Variable(tf.zeros_like(hypergrad))
    optimizer = keras.optimizers.Adam(1.0, epsilon=epsilon)
    optimizer.apply([hypergrad], [scratch])
    return float(tfb.diagnostics.global_norm(scratch))


def validation_metrics(result: tfb.HypergradientResult, inner_batch: tuple, outer_batch: tuple) -> dict:
    """Inside the compiled hyper-step: the validation accuracy of w_T(λ_k) and ‖h(λ_k)‖."""
    x_val, y_val = outer_batch
    W = result.final_params
    predictions = tf.argmax(tf.matmul(x_val, W, transpose_b=True), axis=1, output_type=y_val.dtype)
    return {"val_acc": tf.reduce_mean(tf.cast(tf.equal(predictions, y_val), tf.float32)),
            "hypergrad_norm": tf.norm(result.hypergrad)}


def build_step(problem: Problem, cfg: Config, hg: tfb.Hypergradient, eta0: float, name: str) -> tfb.HyperStep:
    """The compiled hyper-iteration (w_T, h_{T−K}(λ_k) of Eq. 8, then λ ← Adam(λ, h)) at λ_0,
    with a fresh Adam of learning rate η0."""
    n = int(problem.train[1].shape[0])
    lam = tf.Variable(tf.fill([n], tf.constant(cfg.init_lambda, tf.float32)), name=name)
    return tfb.HyperStep(hg, lam, keras.optimizers.Adam(eta0, epsilon=cfg.adam_epsilon),
                         jit_compile=cfg.jit_compile, metrics=validation_metrics)


def hyper_iteration(step: tfb.HyperStep, problem: Problem) -> dict:
    """One hyper-iteration as NumPy values (which also waits for it to finish): λ_k, f(w_T),
    the validation accuracy, w_T and ‖h‖."""
    result = step(problem.w0, problem.train, problem.val)
    return {"lam": result.hparams.numpy(), "val_loss": result.outer_value.numpy(),
            "val_acc": result.metrics["val_acc"].numpy(), "W": result.final_params.numpy(),
            "hypergrad_norm": result.metrics["hypergrad_norm"].numpy()}


def exact_norm(exact_hg: tfb.Hypergradient, problem: Problem, lam: np.ndarray) -> tuple[float, float]:
    """(‖d_λ f(λ)‖ of full RMD, the seconds it took): Fig. 5."""
    start = time.perf_counter()
    _, exact = exact_hg(problem.w0, tf.constant(lam), problem.train, problem.val)
    return float(tfb.diagnostics.global_norm(exact)), time.perf_counter() - start


class TruncationRun:
    """The R hyper-iterations of K-RMD for one K from λ_0 = init_lambda, a `ResumableLoop`: the
    compiled step (`step`) and the `TruncationRecord` of the metrics at every λ_k, k = 0..R.
    `run` runs it, resumably with `checkpoints` (the folder from `prepare_checkpoints`)."""

    def __init__(self, problem: Problem, cfg: Config, truncate: int, exact_hg: tfb.Hypergradient,
                 checkpoints: Optional[Path] = None):
        self.problem, self.cfg, self.truncate, self.exact_hg = problem, cfg, truncate, exact_hg
        self.store = truncation_store(checkpoints, truncate) if checkpoints is not None else None
        self.full_rmd = truncate == cfg.inner_steps
        self.hg = exact_hg if self.full_rmd else make_hypergradient(problem, cfg, truncate)
        self.title = f"K={truncate}{' (full RMD)' if self.full_rmd else ''}"
        self.step: Optional[tfb.HyperStep] = None
        self.record: Optional[TruncationRecord] = None

    def run(self, pause_after: Optional[tuple[int, int]] = None) -> dict:
        """The K's result (see `run_resumable`: a checkpoint every --save_every; `self.step` is at
        λ_R after, also for a K finished earlier). `pause_after=(K, i)`: after hyper-iteration i
        of this K, write a marker in output_dir and wait to be killed (tests)."""
        pause = None
        if pause_after is not None and pause_after[0] == self.truncate:
            pause = (pause_after[1], Path(self.cfg.output_dir) / f"paused_K{self.truncate}_at_{pause_after[1]}")
        return run_resumable(self, self.store, self.cfg.hyper_iterations, self.cfg.save_every, pause=pause,
                             pause_seconds=PAUSE_SECONDS)

    def _build_step(self, eta0: float) -> tfb.HyperStep:
        self.step = build_step(self.problem, self.cfg, self.hg, eta0, f"lambda_K{self.truncate}")
        return self.step

    def build(self, state: Optional[dict]) -> tfb.HyperStep:
        self.record = self._fresh_record() if state is None else TruncationRecord.from_state(state)
        return self._build_step(self.record.outer_lr)

    def build_finished(self, result: dict) -> tfb.HyperStep:
        # The timing phase needs a step: rebuilt at λ_R (it may run further hyper-iterations: the
        # result is recorded already).
        print(f"[hypercleaning] K={self.truncate}: finished earlier ({self.store.result_path})", flush=True)
        return self._build_step(result["outer_lr"])

    def _fresh_record(self) -> TruncationRecord:
        """η0 for this K (appendix G.1): the first Adam update has norm --first_update_norm
        (unless --outer_lr fixes it)."""
        problem, cfg = self.problem, self.cfg
        lam0 = tf.fill([int(problem.train[1].shape[0])], tf.constant(cfg.init_lambda, tf.float32))
        _, h0 = self.hg(problem.w0, lam0, problem.train, problem.val)
        unit_norm = unit_lr_first_update_norm(h0, cfg.adam_epsilon)
        eta0 = cfg.outer_lr if cfg.outer_lr is not None else cfg.first_update_norm / unit_norm
        return TruncationRecord(outer_lr=eta0, unit_lr_first_update_norm=unit_norm,
                                initial_hypergrad_norm=float(tfb.diagnostics.global_norm(h0)))

    def describe(self, done: int) -> str:
        R, eta0 = self.cfg.hyper_iterations, self.record.outer_lr
        if done:
            return (f"[hypercleaning] resuming {self.title} at hyper-iteration {done}/{R}, eta0={eta0:.4g} "
                    f"({self.store.directory})")
        return f"[hypercleaning] {self.title}: {R} hyper-iterations, eta0={eta0:.4g}"

    def iteration(self, k: int) -> dict:
        record, problem, cfg = self.record, self.problem, self.cfg
        wall, cpu = time.perf_counter(), time.process_time()
        out = hyper_iteration(self.step, problem)
        record.add_step(out, time.perf_counter() - wall, time.process_time() - cpu)
        record.add_lambda(k, out["lam"], out["W"], problem, cfg)
        if self.full_rmd:  # the step's own hypergradient is the exact one
            record.add_exact(k, float(out["hypergrad_norm"]))
        elif k % max(cfg.exact_every, 1) == 0 and (cfg.exact_every or k == 0):
            record.add_exact(k, *exact_norm(self.exact_hg, problem, out["lam"]))
        curves = record.curves
        return {"val_loss": curves["val_loss"][-1], "val_acc": curves["val_accuracy"][-1], "f1": curves["f1"][-1]}

    def state(self) -> dict:
        return dataclasses.asdict(self.record)

    def result(self, clock: LoopClock) -> dict:
        """The final point λ_R (ŵ(λ_R) with the compiled inner loop alone, its metrics and exact
        ‖d_λ f‖, added to the record) and the K's result."""
        problem, cfg, record, curves = self.problem, self.cfg, self.record, self.record.curves
        R, lam_R = cfg.hyper_iterations, self.step.hparams.numpy()
        W_R = self.hg.solve(problem.w0, tf.constant(lam_R), problem.train).numpy()
        x_val, y_val = problem.val
        val_loss_R = float(problem.outer_loss(tf.constant(W_R), None, problem.val))
        curves["val_loss"].append(val_loss_R)
        curves["val_accuracy"].append(accuracy(W_R, x_val.numpy(), y_val.numpy()))
        record.add_lambda(R, lam_R, W_R, problem, cfg)
        record.add_exact(R, *exact_norm(self.exact_hg, problem, lam_R))
        final = {
            "hyper_iteration": R,
            "test_accuracy": record.test_accuracy[-1] if record.test_accuracy else None,
            "val_accuracy": curves["val_accuracy"][-1],
            "val_loss": val_loss_R,
            "flagging": {str(t): flag_scores(lam_R, problem.corrupted, t) for t in cfg.f1_thresholds},
            "flagging_vs_replaced": {str(t): flag_scores(lam_R, problem.replaced, t) for t in cfg.f1_thresholds},
            "exact_hypergrad_norm": record.exact_hypergrad_norm[-1],
            "lambda_mean_corrupted": curves["lambda_mean_corrupted"][-1],
            "lambda_mean_clean": curves["lambda_mean_clean"][-1],
        }
        # Bins over the whole range of λ_R (whole units): no value is clipped into an edge bin.
        low = math.floor(lam_R.min())
        edges = np.linspace(low, max(math.ceil(lam_R.max()), low + 1), 61)
        result = {
            "truncate": self.truncate,
            "full_rmd": self.full_rmd,
            "outer_lr": record.outer_lr,
            "unit_lr_first_update_norm": record.unit_lr_first_update_norm,
            "first_update_norm": record.outer_lr * record.unit_lr_first_update_norm,
            "initial_hypergrad_norm": record.initial_hypergrad_norm,
            "final": final,
            "timing": {**clock.timing(curves["wall_seconds"], curves["cpu_seconds"]),
                       "exact_hypergradient_seconds": record.exact_hypergradient_seconds},
            "tracing_count": self.step.tracing_count,
            "curves": {**curves, "test_iterations": record.test_iterations, "test_accuracy": record.test_accuracy,
                       "exact_iterations": record.exact_iterations,
                       "exact_hypergrad_norm": record.exact_hypergrad_norm},
            "lambda_histogram": {"edges": edges.tolist(),
                                 "corrupted": np.histogram(lam_R[problem.corrupted], edges)[0].tolist(),
                                 "clean": np.histogram(lam_R[~problem.corrupted], edges)[0].tolist()},
        }
        return jsonable(result)  # the same values whether this K ran here or is read back from result.json


def time_interleaved(steps: dict[int, tfb.HyperStep], problem: Problem, rounds: int) -> dict[int, dict]:
    """Seconds per hyper-iteration of every K, timed round-robin so that a change of machine load
    (shared CPUs) hits every K alike; the ratios are the point."""
    for step in steps.values():
        if step.tracing_count == 0:  # rebuilt for a K finished in an earlier process: compile first
            hyper_iteration(step, problem)
    return round_robin_medians({k: (lambda step=step: hyper_iteration(step, problem)) for k, step in steps.items()},
                               rounds)


# ---- Peak memory per K, each in a fresh process.
def memory_probe(cfg: Config, arrays: dict, truncate: int) -> dict:
    """Memory of one configuration in THIS process (call it in a fresh one): truncate = 0 runs
    `hg.solve` (T inner steps, no tape: the floor), otherwise the compiled hyper-iteration."""
    problem = build_problem(cfg, arrays)
    tf.reduce_sum(problem.train[0]).numpy()  # start the TF runtime before measuring
    lam = tf.fill([len(arrays["y_train"])], tf.constant(cfg.init_lambda, tf.float32))

    def build():
        if truncate == 0:
            hg = make_hypergradient(problem, cfg, None)
            return lambda: hg.solve(problem.w0, lam, problem.train).numpy()
        step = build_step(problem, cfg, make_hypergradient(problem, cfg, truncate), 0.1, "lambda")
        return lambda: hyper_iteration(step, problem)

    return {"truncate": truncate, **probe(build, cfg.memory_probe_calls),
            "stored_state_bytes": truncate * int(problem.w0.shape.num_elements()) * 4}


def measure_memory(cfg: Config, arrays: dict, timeout: float = 900.0) -> dict:
    """`memory_probe` for the floor (truncate 0) and every K, each in a fresh subprocess."""
    configs = [{"config": dataclasses.asdict(cfg), "truncate": k} for k in (0, *cfg.truncate)]
    records = run_each(configs, "experiments.hypercleaning", "memory_probe", timeout,
                       describe=lambda c: f"[hypercleaning] memory probe {_probe_name(c['truncate'])}",
                       report=lambda r: f"TF allocator peak {mib(r['steady_allocator_peak_growth_bytes'])} MiB",
                       arrays={k: arrays[k] for k in SPLIT_KEYS}, arrays_dir=cfg.output_dir)
    return {str(c["truncate"]): record for c, record in zip(configs, records)}


def _probe_name(truncate: int) -> str:
    return "floor (hg.solve)" if truncate == 0 else f"K={truncate}"


# ---- Figures.
def plot_figures(results: dict, output_dir: str) -> dict:
    """Fig. 5, the learning curves and the histograms of λ_R, as PNGs in `output_dir`."""
    from experiments.common import plotting
    from experiments.common.plotting import plt

    cfg, runs = results["config"], results["runs"]
    T, R = cfg["inner_steps"], cfg["hyper_iterations"]
    ks = sorted(int(k) for k in runs)
    colors = plotting.truncation_colors(ks, T)
    label = lambda k: plotting.truncation_label(k, T)  # noqa: E731
    budget = f"T={T} inner steps, R={R} hyper-iterations, n={results['data']['n_train']}"
    figures = {}

    fig, ax = plt.subplots(figsize=(7, 5))
    for k in ks:
        c = runs[str(k)]["curves"]
        plotting.plot_curve(ax, c["exact_iterations"], c["exact_hypergrad_norm"], color=colors[k], label=label(k),
                            log=True)
    plotting.label_axes(ax, "hyper-iteration k", r"$\|d_\lambda f(\lambda_k)\|$ (exact, full RMD)",
                        f"Fig. 5: exact hypergradient norm at the K-RMD iterates\n{budget}")
    figures["fig5"] = plotting.save_figure(fig, os.path.join(output_dir, "fig5_exact_hypergradient_norm.png"))

    thr = cfg["table_threshold"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for k in ks:
        c = runs[str(k)]["curves"]
        x = np.arange(len(c["val_loss"]))
        plotting.plot_curve(axes[0], x, c["val_loss"], color=colors[k], label=label(k), log=True)
        plotting.plot_curve(axes[1], c["test_iterations"], 100 * np.asarray(c["test_accuracy"]), color=colors[k],
                            label=label(k))
        plotting.plot_curve(axes[2], x, c["f1"], color=colors[k], label=label(k))
    for ax, ylabel in zip(axes, ("validation loss f(w_T(λ_k))", "test accuracy of ŵ(λ_k) (%)",
                                 f"F1 of flagging λ_i < {thr:g} as corrupted")):
        plotting.label_axes(ax, "hyper-iteration k", ylabel)
    fig.suptitle(f"Hypercleaning learning curves ({budget})")
    figures["curves"] = plotting.save_figure(fig, os.path.join(output_dir, "hypercleaning_curves.png"))

    fig, axes = plt.subplots(1, len(ks), figsize=(4.6 * len(ks), 4.6), squeeze=False)
    styles = dict(zip(cfg["f1_thresholds"], ("--", ":", "-.", (0, (5, 1, 1, 1)))))
    for ax, k in zip(axes[0], ks):
        run = runs[str(k)]
        hist, edges = run["lambda_histogram"], np.asarray(run["lambda_histogram"]["edges"])
        ax.stairs(hist["clean"], edges, label="clean label", color="tab:blue", lw=1.5)
        ax.stairs(hist["corrupted"], edges, label="corrupted label", color="tab:red", lw=1.5)
        for t, style in styles.items():
            f1 = run["final"]["flagging"][str(float(t))]["f1"]
            ax.axvline(t, color="black" if t == thr else "gray", lw=1.2 if t == thr else 0.9, ls=style,
                       label=f"τ = {t:g} ({'Table 2, ' if t == thr else ''}F1 {f1:.2f})")
        plotting.label_axes(ax, rf"$\lambda_i$ after R={R} hyper-iterations (weight $\sigma(\lambda_i)$)",
                            "training examples", label(k), legend=False)
        ax.set_ylim(0, 1.5 * max(max(hist["clean"]), max(hist["corrupted"]), 1))  # room for the legend
        ax.legend(fontsize=8, loc="upper center", ncol=2, framealpha=0.9)
    fig.suptitle(f"Learned example weights: flag λ_i < τ as corrupted ({budget})")
    figures["lambda_histograms"] = plotting.save_figure(fig, os.path.join(output_dir, "lambda_histograms.png"))
    return {k: os.path.basename(v) for k, v in figures.items()}


# ---- The experiment.
def run_experiment(cfg: Config, data: tuple[dict, dict], ctx: program.Run) -> dict:
    """Runs every K on data = (split arrays, their description); returns the results. Resumes
    from the checkpoints in cfg.output_dir (see `TruncationRun.run`); raises SettingsMismatchError
    if they belong to another configuration, StateFileError if one is damaged."""
    arrays, data_info = data
    np.random.seed(cfg.seed)
    tf.random.set_seed(cfg.seed)
    checkpoints = prepare_checkpoints(cfg, arrays)  # before any work: a mismatch fails at once
    problem = build_problem(cfg, arrays)
    print(f"[hypercleaning] {data_info}", flush=True)

    exact_hg = make_hypergradient(problem, cfg, None)  # full RMD: Fig. 5, and K = T itself
    runs, steps = {}, {}
    pause_after = parse_pause_after(cfg.pause_after)
    for truncate in cfg.truncate:
        run = TruncationRun(problem, cfg, truncate, exact_hg, checkpoints)
        runs[str(truncate)], steps[truncate] = run.run(pause_after), run.step
    if cfg.timing_rounds > 0:
        print(f"[hypercleaning] interleaved timing: {cfg.timing_rounds} rounds over K = {cfg.truncate}", flush=True)
        for truncate, timing in time_interleaved(steps, problem, cfg.timing_rounds).items():
            runs[str(truncate)]["timing"]["interleaved"] = timing
    memory = measure_memory(cfg, arrays) if cfg.measure_memory else {}
    provenance.mark_end(ctx.environment)
    return {
        "config": dataclasses.asdict(cfg),
        "data": data_info,
        "environment": ctx.environment,
        "paper": {"table2": PAPER_TABLE2, "f1_thresholds": PAPER_F1_THRESHOLDS,
                  "note": "Table 2 after 1000 hyper-iterations; F1-threshold table after 150 (appendix G.1)"},
        "runs": runs,
        "memory": memory,
        "memory_method": f"{PROBE_METHOD}; truncate 0 = hg.solve alone (the floor); stored_state_bytes = K * |W| * 4",
        "runtime_seconds": ctx.seconds(),
    }


def format_table(results: dict) -> str:
    """Table 2 (measured | paper), F1 at the thresholds, time and memory per K, as text."""
    runs, memory = results["runs"], results.get("memory", {})
    R = results["config"]["hyper_iterations"]
    thresholds = results["config"]["f1_thresholds"]
    table_thr = str(results["config"]["table_threshold"])
    lines = [f"Table 2 after {R} hyper-iterations (paper: 1000) — measured | paper",
             f"{'K':>4} {'test acc %':>15} {'val acc %':>15} {'val loss':>15} {'F1':>11} "
             f"{'s/it':>6} {'cpu s/it':>8} {'work MiB':>8}"]
    for k, run in sorted(runs.items(), key=lambda kv: int(kv[0])):
        fin, paper = run["final"], PAPER_TABLE2.get(int(k), {})
        pget = lambda key, fmt: format(paper[key], fmt) if key in paper else "-"  # noqa: E731
        test = "n/a" if fin["test_accuracy"] is None else f"{100 * fin['test_accuracy']:.2f}"
        mem = memory.get(k, {})
        timing = run["timing"].get("interleaved", run["timing"])
        lines.append(
            f"{k:>4} {test:>7} | {pget('test_accuracy', '.2f'):>5} "
            f"{100 * fin['val_accuracy']:>7.2f} | {pget('val_accuracy', '.2f'):>5} "
            f"{fin['val_loss']:>7.3f} | {pget('val_loss', '.3f'):>5} "
            f"{fin['flagging'][table_thr]['f1']:>4.2f} | {pget('f1', '.2f'):>4} "
            f"{timing['seconds_per_iteration_median']:>6.3f} {timing['cpu_seconds_per_iteration_median']:>8.3f} "
            f"{mib(mem.get('steady_allocator_peak_growth_bytes')):>8}")
    lines.append("F1 of flagging λ_i < τ (measured | paper, appendix G.1 after 150 hyper-iterations)")
    lines.append(f"{'K':>4} " + " ".join(f"{'τ=' + format(t, 'g'):>12}" for t in thresholds))
    for k, run in sorted(runs.items(), key=lambda kv: int(kv[0])):
        paper = PAPER_F1_THRESHOLDS.get(int(k), {})
        cells = [f"{run['final']['flagging'][str(t)]['f1']:.2f} | {paper[t]:.2f}" if t in paper
                 else f"{run['final']['flagging'][str(t)]['f1']:.2f} |   -" for t in thresholds]
        lines.append(f"{k:>4} " + " ".join(f"{c:>12}" for c in cells))
    if memory:
        lines += format_probes(memory, {k: "floor" if k == "0" else f"K={k}" for k in memory})
    return "\n".join(lines)


# ---- The program.
def _memory_probe(spec: dict) -> dict:
    return memory_probe(Config(**spec["config"]), load_arrays(spec), int(spec["truncate"]))


def _nonfinite_hint(err: BaseException, cfg: Config) -> str:
    if cfg.loss_normalization == "sum":
        return (" GD with --inner_lr=%g on the summed loss (--loss_normalization=sum) diverges: use the default "
                "--loss_normalization=mean_all or --inner_lr of about 1/n_train." % cfg.inner_lr)
    return " Lower --inner_lr."


PROGRAM = program.Program(
    "hypercleaning", Config, PRESETS, experiment=run_experiment, load_data=load_data, figures=plot_figures,
    table=format_table, state_dirs=(CHECKPOINT_DIR,), worker=("memory_probe", _memory_probe),
    data_name=lambda cfg: "MNIST", failure_hint=_nonfinite_hint)


if __name__ == "__main__":
    program.start(PROGRAM)
