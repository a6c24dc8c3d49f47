r"""Task interaction (paper §4.2.2, Table 3, Fig. 6; appendix G.2) with K-RMD.

Learns a task-similarity matrix and a regularizer coupling per-class linear models on few
examples, with early stopping, over several trials and truncations K; prints Table 3 and writes
results.json and the Fig. 6 PNG to --output_dir. A killed run continues when the same command is
rerun. The problem, our reading of it and the measured results: RESULTS.md, "Task interaction".

  tfb-task-interaction --dataset=cifar10 --features=pretrained    # the paper (needs tfds CIFAR)
  tfb-task-interaction --dataset=fashion_mnist --features=pixels  # offline, real data
  (or python -m experiments.task_interaction ...)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

import tf_bilevel as tfb
from experiments.data import tfds_offline
from experiments.models import features
from experiments.common import program
from experiments.common.config import option, parse_truncate
from experiments.models.features import BACKBONES
from experiments.common.methods import method_label, method_name, method_styles
from experiments.common.run_state import (
    RESTART_HINT, damaged, pause_to_be_killed, read_state_json, write_json_atomically,
)
from tf_bilevel.keras import inverse_softplus, losses


NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10, "fashion_mnist": 10}
PAPER_M = {"cifar10": 50, "cifar100": 300}  # appendix G.2
# Paper Table 3 (test accuracy %, mean ± std over 10 trials; avg. iterations; s/iter).
PAPER_TABLE3 = {
    "cifar10": {"1": (61.11, 1.23, 3300, 0.8), "5": (61.33, 1.08, 4950, 1.3),
                "25": (61.31, 1.24, 4825, 1.4), "full": (61.28, 1.21, 4500, 2.2)},
    "cifar100": {"1": (34.37, 0.63, 7440, 1.0), "5": (34.34, 0.68, 8805, 1.4),
                 "25": (34.51, 0.69, 8660, 1.6), "full": (34.70, 0.64, 5670, 2.8)},
}


@dataclasses.dataclass(frozen=True)
class Config:
    """The run's settings; one flag per field (flag = field name)."""
    dataset: str = option("cifar10", "tfds dataset.", choices=tuple(NUM_CLASSES))
    features: str = option("pretrained", "pretrained: pooled features of an ImageNet CNN (paper); pixels: raw "
                           "pixels.", choices=("pretrained", "pixels"))
    backbone: str = option("resnet50", "Keras CNN for --features=pretrained (paper: ResNet-18, absent from Keras).",
                           choices=BACKBONES)
    weights: str = option("imagenet", "Backbone weights: imagenet, random (untrained; tests only), or a weights "
                          "file path.")
    image_size: int = option(224, "Images are resized to this for the backbone.")
    feature_cache_dir: Optional[str] = option(None, "Cache extracted pretrained features here.", result=False)
    feature_scale: float = option(8.0, "Features are L2-normalized, then multiplied by this.")
    m: Optional[int] = option(None, "Training and validation set size each (balanced); default 50 for cifar10, "
                              "300 for cifar100, 50 for (fashion_)mnist.")
    # Every (trial, K) run is stored on its own: more trials or another K reuse the stored runs.
    trials: int = option(10, "Independent trials (data splits).", result=False)
    patience: int = option(500, "Stop after this many hyper-iterations without improvement.")
    max_hyper_iterations: int = option(20000, "Cap on hyper-iterations per run.")
    truncate: Sequence[str] = option(("1", "5", "25", "full"), "K values; 'full' = full RMD (K = T).", result=False)
    inner_steps: int = option(100, "T, inner gradient-descent steps.")
    inner_lr: float = option(0.1, "γ, inner learning rate.")
    outer_lr: float = option(0.01, "Adam learning rate on λ = {B, ν}.")
    init_coupling: float = option(1e-3, "Initial C_ij (i ≠ j): B_ij = softplus⁻¹(C_ij / 2).")
    init_rho: float = option(1e-3, "Initial ρ: ν = softplus⁻¹(ρ).")
    early_stopping_split: str = option("validation", "Split that drives early stopping (the paper literally uses "
                                       "test).", choices=("validation", "test"))
    early_stopping_metric: str = option("error", "error (ties broken by the loss; the paper: error) or loss.",
                                        choices=("error", "loss"))
    min_delta: float = option(1e-4, "A loss must drop by more than this to count as improved.")
    exact_every: int = option(10, "Compute the exact (full RMD) hypergradient every N hyper-iterations for Fig. 6 "
                              "(0: never).")
    diagnostic_trials: int = option(1, "Trials that record the Fig. 6 diagnostics.")
    data_dir: Optional[str] = option(None, "tfds data_dir (default: tfds_offline.default_data_dir()).", result=False)
    local_dir: Optional[str] = option(None, "Folder with (fashion_)mnist IDX .gz files.", result=False)
    seed: int = option(0, "Seed of the data splits (trial i uses seed + i).")
    output_dir: str = option("out/task_interaction", "Where results.json and PNGs go; also every finished "
                             "(trial, K) run (<output_dir>/resume): rerun the same command after an interruption "
                             "to continue.", result=False)
    pause_after: Optional[str] = option(
        None, "(tests) TRIAL,K: once the run of that trial and K is stored, write <output_dir>/resume/paused_TRIAL_K "
        "and sleep, once (not if that file exists), so a test can kill the program at a known point.",
        internal=True, result=False)
    restart: bool = option(False, "Delete the saved state (<output_dir>/resume) and start over.", result=False)
    jit_compile: bool = option(True, "XLA-compile the hyper-step.")
    preset: str = "full"


# full: the paper's settings (the defaults); quick: a tiny budget for tests.
PRESETS = {"full": {}, "quick": dict(trials=2, max_hyper_iterations=12, patience=5, exact_every=3,
                                     truncate=("1", "full"))}


# --- The bilevel problem. ----------------------------------------------------


def coupling_matrix(b: tf.Tensor) -> tf.Tensor:
    """C = A + Aᵀ with A = softplus(B): symmetric and entrywise positive (appendix G.2)."""
    a = tf.nn.softplus(b)
    return a + tf.transpose(a)


def regularization(nu: tf.Tensor) -> tf.Tensor:
    """ρ = softplus(ν) > 0."""
    return tf.nn.softplus(nu)


def pairwise_coupling(w: tf.Tensor, c: tf.Tensor) -> tf.Tensor:
    """Σ_ij C_ij ‖w_i − w_j‖², via ‖w_i‖² + ‖w_j‖² − 2 w_i·w_j (no V×V×d tensor)."""
    sq = tf.reduce_sum(tf.square(w), axis=1)
    gram = tf.matmul(w, w, transpose_b=True)
    dist = sq[:, None] + sq[None, :] - 2.0 * gram
    return tf.reduce_sum(c * dist)


def cross_entropy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Mean cross-entropy over the examples (the library's log_softmax form: RMD differentiates
    ∇_w g once more, and it is twice differentiable on every TF version)."""
    return tf.reduce_mean(losses.sparse_categorical_crossentropy(labels, logits))


def logits_of(params: dict, x: tf.Tensor) -> tf.Tensor:
    return tf.matmul(x, params["w"], transpose_b=True) + params["b"]


def inner_loss(params: dict, hparams: dict, batch: tuple) -> tf.Tensor:
    """g(w, λ) = l(w) + Σ_ij C_ij ‖w_i − w_j‖² + ρ Σ_v ‖w_v‖² (§4.2.2)."""
    x, y = batch
    w = params["w"]
    return (cross_entropy(logits_of(params, x), y)
            + pairwise_coupling(w, coupling_matrix(hparams["B"]))
            + regularization(hparams["nu"]) * tf.reduce_sum(tf.square(w)))


def outer_loss(params: dict, hparams: dict, batch: tuple) -> tf.Tensor:
    """f(ŵ) = validation cross-entropy (does not depend on λ directly: ∇_λ f = 0)."""
    x, y = batch
    return cross_entropy(logits_of(params, x), y)


def error_rate(params: dict, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    pred = tf.argmax(logits_of(params, x), axis=1, output_type=y.dtype)
    return 1.0 - tf.reduce_mean(tf.cast(tf.equal(pred, y), tf.float32))


def split_metrics(params: dict, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(error rate, cross-entropy) of the linear models on (x, y)."""
    return error_rate(params, x, y), cross_entropy(logits_of(params, x), y)


def make_improvement_rule(metric: str, min_delta: float) -> Callable:
    """improved((error, loss), best) for early stopping: "error": a lower error, or the same error and
    a loss lower by more than min_delta (the loss breaks the frequent ties); "loss": the loss alone."""
    def improved(score: Sequence[float], best: Sequence[float] | None) -> bool:
        if best is None:
            return True
        (err, loss), (best_err, best_loss) = score, best
        if metric == "loss":
            return loss < best_loss - min_delta
        return err < best_err - 1e-9 or (err <= best_err + 1e-9 and loss < best_loss - min_delta)

    return improved


def initial_params(num_tasks: int, dim: int, dtype=tf.float32) -> dict:
    """w_0 = 0 (and b_0 = 0)."""
    return {"w": tf.zeros([num_tasks, dim], dtype), "b": tf.zeros([num_tasks], dtype)}


def initial_hparams(num_tasks: int, init_coupling: float, init_rho: float, dtype=tf.float32) -> dict:
    """λ_0 = {B, ν} giving C_ij = init_coupling (i ≠ j) and ρ = init_rho."""
    b = tf.fill([num_tasks, num_tasks], float(inverse_softplus(init_coupling / 2.0)))
    return {"B": tf.cast(b, dtype), "nu": tf.constant(float(inverse_softplus(init_rho)), dtype)}


def make_hypergradient(truncate: Optional[int], *, steps: int, inner_lr: float,
                       jit_compile: bool = True) -> tfb.Hypergradient:
    """K-RMD (truncate=K) or full RMD (None) estimator of d_λ f for this problem."""
    return tfb.hypergradient_fn(inner_loss, outer_loss, steps=steps, learning_rate=inner_lr,
                                truncate=truncate, jit_compile=jit_compile)


# --- Outer loop: Adam on λ (appendix G). ------------------------------------


def outer_adam(outer_lr: float) -> tfb.InnerOptimizer:
    """Adam on λ (appendix G), `tfb.adam`: the hypergradient and the λ update compile into one
    program. Its state is `.init(λ)`; λ_{t+1} = λ_t + `.update(h_t, ...)[0]`."""
    return tfb.adam(outer_lr)


# --- Data. -------------------------------------------------------------------


def balanced_split(labels: np.ndarray, m: int, num_classes: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint balanced train / val index sets of m each; the rest is the test set."""
    if m % num_classes:
        raise ValueError(f"--m={m} must be a multiple of the number of classes ({num_classes}) so that the "
                         "training and validation sets are balanced")
    per = m // num_classes
    train, val = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2 * per:
            raise ValueError(f"class {c} has {len(idx)} examples; --m={m} needs {2 * per}")
        chosen = rng.choice(idx, 2 * per, replace=False)
        train.append(chosen[:per])
        val.append(chosen[per:])
    train, val = rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(val))
    test = np.setdiff1d(np.arange(len(labels)), np.concatenate([train, val]))
    return train, val, test


# --- One run: one trial, one K. ---------------------------------------------


@functools.lru_cache(maxsize=None)
def compiled_hyper_step(truncate: Optional[int], num_tasks: int, steps: int, inner_lr: float, outer_lr: float,
                        jit_compile: bool) -> tfb.HyperStep:
    """K-RMD hypergradient + Adam step on λ, compiled as one program (`tfb.HyperStep`, with the
    validation error of ŵ(λ) as a metric); one per K, reused across trials (`run_one` resets its
    state: no retrace)."""
    hg = make_hypergradient(truncate, steps=steps, inner_lr=inner_lr, jit_compile=jit_compile)
    return tfb.HyperStep(hg, initial_hparams(num_tasks, 1.0, 1.0), outer_adam(outer_lr), jit_compile=jit_compile,
                         metrics=lambda result, _, val: {"val_err": error_rate(result.final_params, *val)},
                         check_numerics=False)  # checked below, with what to change


@functools.lru_cache(maxsize=None)
def compiled_exact(steps: int, inner_lr: float, jit_compile: bool) -> tfb.Hypergradient:
    return make_hypergradient(None, steps=steps, inner_lr=inner_lr, jit_compile=jit_compile)


compiled_metrics = tf.function(split_metrics)


def run_one(truncate: Optional[int], split: dict, cfg: Config, *, diagnostics: bool) -> dict:
    """Hyper-optimize λ with K-RMD from λ_0 until early stopping; return the row's metrics."""
    v, T = split["num_tasks"], cfg.inner_steps
    hyper_step = compiled_hyper_step(truncate, v, T, cfg.inner_lr, cfg.outer_lr, cfg.jit_compile)
    w0, lam0 = initial_params(v, split["dim"]), initial_hparams(v, cfg.init_coupling, cfg.init_rho)
    hyper_step.assign(tfb.HyperStepState(lam0, outer_adam(cfg.outer_lr).init(lam0), tf.constant(0, tf.int64)))
    train, val, test = split["train"], split["val"], split["test"]
    improved = make_improvement_rule(cfg.early_stopping_metric, cfg.min_delta)
    label = f"[trial {split['trial']} K={method_name(truncate)}]"
    bar = tfb.Progress(cfg.max_hyper_iterations, label=label)
    best = {"score": None, "it": -1}
    curve = {"it": [], "val_loss": [], "exact_it": [], "exact_norm": [], "cosine": [], "h_norm": []}
    step_times, initial_test_acc, it = [], None, 0
    while it < cfg.max_hyper_iterations and it - best["it"] <= cfg.patience:
        start = time.perf_counter()
        res = hyper_step(w0, train, val)  # at λ_it, then λ ← λ_it + Adam's update
        hparams, h, w_t = res.hparams, res.hypergrad, res.final_params
        f_val, val_err, marker = float(res.outer_value), float(res.metrics["val_err"]), int(res.nonfinite_step)
        if it > 0:  # the first call includes tracing + XLA compilation
            step_times.append(time.perf_counter() - start)
        if marker >= 0:
            raise tfb.NonFiniteError(f"{label} non-finite value at hyper-iteration {it}: "
                                     f"{tfb.nonfinite.describe(marker, T)} Lower --outer_lr, "
                                     "--init_coupling or --feature_scale")
        if it == 0:
            initial_test_acc = 1.0 - float(compiled_metrics(w_t, *test)[0])
        by_test = cfg.early_stopping_split == "test"
        score = [float(t) for t in compiled_metrics(w_t, *test)] if by_test else [val_err, f_val]
        if improved(score, best["score"]):
            best = {"score": score, "it": it, "val_loss": f_val, "val_acc": 1.0 - val_err, "params": w_t,
                    "hparams": hparams}
        if diagnostics:
            curve["it"].append(it)
            curve["val_loss"].append(f_val)
            if cfg.exact_every and it % cfg.exact_every == 0:
                exact = h if truncate is None else compiled_exact(T, cfg.inner_lr, cfg.jit_compile)(
                    w0, hparams, train, val)[1]
                curve["exact_it"].append(it)
                curve["exact_norm"].append(float(tfb.diagnostics.global_norm(exact)))
                curve["cosine"].append(float(tfb.diagnostics.cosine_similarity(h, exact)))
                curve["h_norm"].append(float(tfb.diagnostics.global_norm(h)))
        it += 1
        bar.update(it, f=f_val, val_acc=1 - val_err)
    print(f"{label} stopped at hyper-iteration {it}; best {best['it']}", flush=True)
    off = coupling_matrix(best["hparams"]["B"]).numpy()[~np.eye(v, dtype=bool)]
    row = {
        "truncate": "full" if truncate is None else truncate,
        "test_acc": 1.0 - float(compiled_metrics(best["params"], *test)[0]), "initial_test_acc": initial_test_acc,
        "val_acc": best["val_acc"], "val_loss": best["val_loss"], "best_iteration": best["it"], "iterations": it,
        "sec_per_iter": float(np.mean(step_times)) if step_times else float("nan"),
        "rho": float(regularization(best["hparams"]["nu"])),
        "coupling_offdiag": {"mean": float(off.mean()), "min": float(off.min()), "max": float(off.max())},
    }
    return {**row, "curves": curve} if diagnostics else row


# --- Tables, figure. ---------------------------------------------------------


def summarize(rows: list[dict]) -> dict:
    mean = lambda key: float(np.nanmean([r[key] for r in rows]))  # noqa: E731
    acc = np.array([r["test_acc"] for r in rows])
    return {"test_acc_mean": float(acc.mean()), "test_acc_std": float(acc.std()),
            **{f"{key}_mean": mean(key) for key in ("initial_test_acc", "val_acc", "val_loss", "iterations",
                                                     "best_iteration", "sec_per_iter")},
            "trials": len(rows)}


def plot_fig6(results: dict, path: str) -> None:
    """Fig. 6 for the first trial: validation loss, ‖d_λ f‖ of the exact hypergradient and its cosine
    with each method's h vs hyper-iteration (markers where the sparse exact one was computed)."""
    from experiments.common.plotting import plt, save_figure

    cfg, T = results["config"], results["config"]["inner_steps"]
    styles = method_styles(list(results["runs"]), T)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for name, rows in results["runs"].items():
        curves = next((r["curves"] for r in rows if "curves" in r), None)
        if curves is None:
            continue
        style = styles[name]
        axes[0].plot(curves["it"], curves["val_loss"], **{**style, "marker": "." if len(curves["it"]) <= 50 else None})
        if curves["exact_it"]:
            axes[1].semilogy(curves["exact_it"], curves["exact_norm"], **style)
            axes[2].plot(curves["exact_it"], curves["cosine"], **style)
    axes[0].set(xlabel="hyper-iteration", ylabel="validation cross-entropy f(ŵ(λ)) (nats)",
                title="outer objective")
    axes[1].set(xlabel="hyper-iteration", ylabel="‖d_λ f‖ (exact, full RMD)", title="norm of the exact hypergradient")
    axes[2].set(xlabel="hyper-iteration", ylabel="cos(h_K, d_λ f)", title="cosine of K-RMD with the exact one")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best", fontsize=9)
    fig.suptitle(f"Task interaction (Fig. 6), {cfg['dataset']} ({results['features_description']}), trial 0: "
                 f"T = {T} inner steps, m = {cfg['m']}, K ∈ {{{', '.join(results['runs'])}}}, ≤ "
                 f"{cfg['max_hyper_iterations']} hyper-iterations (patience {cfg['patience']}), exact d_λ f every "
                 f"{cfg['exact_every']}", fontsize=10)
    save_figure(fig, path, dpi=110)


def format_table(results: dict) -> str:
    cfg = results["config"]
    lines = [f"\nTask interaction on {cfg['dataset']} ({results['features_description']}), m={cfg['m']}",
             f"{'method':>10} {'test acc %':>16} {'init acc %':>10} {'iters':>8} {'best it':>8} {'s/iter':>8}"]
    for name, s in results["summary"].items():
        lines.append(f"{method_label(name):>10} {100 * s['test_acc_mean']:8.2f} ± {100 * s['test_acc_std']:5.2f} "
                     f"{100 * s['initial_test_acc_mean']:10.2f} {s['iterations_mean']:8.0f} "
                     f"{s['best_iteration_mean']:8.0f} {s['sec_per_iter_mean']:8.4f}")
    return "\n".join(lines)


# --- Driver. -----------------------------------------------------------------


def prepared(cfg: Config) -> Config:
    """The Config with the dataset's default m filled in, checked (ValueError names the flag)."""
    if cfg.m is None:
        cfg = dataclasses.replace(cfg, m=PAPER_M.get(cfg.dataset, 50))
    pause = parse_pause_after(cfg.pause_after)
    names = [method_name(k) for k in parse_truncate(cfg.truncate, cfg.inner_steps)]
    if pause and (pause[1] not in names or not 0 <= pause[0] < cfg.trials):
        raise ValueError(f"--pause_after={cfg.pause_after}: expected TRIAL in [0, {cfg.trials}) and K in {names}")
    return cfg


def parse_pause_after(value: Optional[str]) -> Optional[tuple[int, str]]:
    """--pause_after TRIAL,K as (TRIAL, K); None when unset."""
    parts = [p.strip() for p in value.split(",")] if value else None
    if parts is not None and (len(parts) != 2 or not parts[0].isdigit()):
        raise ValueError(f"--pause_after must be TRIAL,K (e.g. 0,1 or 1,full), got {value!r}")
    return parts and (int(parts[0]), parts[1])


# The keys of a stored (trial, K) run that this program reads back.
ROW_KEYS = ("trial", "test_acc", "initial_test_acc", "val_acc", "val_loss", "iterations", "best_iteration",
            "sec_per_iter")


def load_stored_run(path: str, trial: int) -> dict:
    """A (trial, K) run stored by an earlier run of this --output_dir."""
    remedy = f"delete it to redo that run, {RESTART_HINT}"
    row = read_state_json(path, remedy, ROW_KEYS)
    if row["trial"] != trial:
        raise damaged(path, f"it holds trial {row['trial']!r}", remedy)
    return row


def run_experiment(cfg: Config, data: Any, ctx: program.Run) -> dict:
    """The whole experiment; writes results.json after every trial."""
    state = os.path.join(cfg.output_dir, "resume")
    pause = parse_pause_after(cfg.pause_after)
    truncations = parse_truncate(cfg.truncate, cfg.inner_steps)
    names = [method_name(k) for k in truncations]
    x_all, y_all, desc = features.load_features(
        cfg.dataset, cfg.features, scale=cfg.feature_scale, data_dir=cfg.data_dir, local_dir=cfg.local_dir,
        backbone=cfg.backbone, weights=cfg.weights, image_size=cfg.image_size, cache_dir=cfg.feature_cache_dir)
    print(f"Data: {cfg.dataset} from {tfds_offline.data_source(cfg.dataset)}", flush=True)
    results = {
        "experiment": "task_interaction (paper §4.2.2, Table 3, Fig. 6)",
        "config": dataclasses.asdict(cfg), "data_source": tfds_offline.data_source(cfg.dataset),
        "features_description": desc, "num_examples": int(len(y_all)), "feature_dim": int(x_all.shape[1]),
        "environment": ctx.environment, "paper_table3": PAPER_TABLE3.get(cfg.dataset),
        "runs": {name: [] for name in names},
    }
    x_all_t, num_classes = tf.constant(x_all), NUM_CLASSES[cfg.dataset]
    for trial in range(cfg.trials):
        indices = balanced_split(y_all, cfg.m, num_classes, np.random.default_rng(cfg.seed + trial))
        split = {"trial": trial, "num_tasks": num_classes, "dim": x_all.shape[1],
                 **{part: (tf.gather(x_all_t, idx), tf.constant(y_all[idx]))
                    for part, idx in zip(("train", "val", "test"), indices)}}
        for k, name in zip(truncations, names):
            stored = os.path.join(state, f"trial{trial}_{name}.json")
            if os.path.exists(stored):  # finished by an earlier run of this --output_dir
                row = load_stored_run(stored, trial)
                print(f"[trial {trial} K={name}] finished by an earlier run, reloaded from {stored}")
            else:
                row = {**run_one(k, split, cfg, diagnostics=trial < cfg.diagnostic_trials), "trial": trial}
                write_json_atomically(stored, row, indent=1)
            results["runs"][name].append(row)
            if pause == (trial, name):
                pause_to_be_killed(os.path.join(state, f"paused_{trial}_{name}"))
        results["summary"] = {name: summarize(rows) for name, rows in results["runs"].items()}
        ctx.write_results(results)
    return results


def figures(results: dict, output_dir: str) -> None:
    if results["config"]["diagnostic_trials"] > 0:
        plot_fig6(results, os.path.join(output_dir, "fig6_task_interaction.png"))


PROGRAM = program.Program(
    "task_interaction", Config, PRESETS, experiment=run_experiment, figures=figures, table=format_table,
    prepare=prepared, state_dirs=("resume",), fingerprint="resume", fingerprint_what="the runs",
    data_name=lambda cfg: cfg.dataset)


if __name__ == "__main__":
    program.start(PROGRAM)
