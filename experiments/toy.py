r"""The toy problem of §4.1 (Figs. 1–4): K-RMD on a 2-D bilevel problem with closed forms.

Runs K-RMD hyper-descent on the paper's 2-D quadratic inner problem for several K, checks every
hypergradient against the closed form, and writes Figs. 1–4 and results.json to --output_dir.
The problem, the choices the paper leaves open and the measured results: RESULTS.md, "Toy problem".

  tfb-toy                   # the paper's settings (or: python -m experiments.toy)
  tfb-toy --preset=quick    # 100 hyper-iterations, K in {1, 5, T} (tests)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

import tf_bilevel as tfb
from experiments.common import plotting, program
from experiments.common.config import option
from experiments.common.plotting import plt
from experiments.common.run_state import jsonable

OBJECTIVES = ("f", "f_tilde")
FIG1_LAMBDA = (1.0, 1.0)
_OPTIMUM_BOX = (-3.0, 3.0)
_OPTIMUM_STEP = 0.02  # < 2 / max curvature of F̃ on the box (≈ 32): plain GD converges.
_OPTIMUM_TOL = 1e-12
_RATIO_MIN_GRAD = 1e-9  # below this ‖d_λ f‖ is round-off level and the ratio is noise.


# -- The problem. ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ToyProblem:
    """The §4.1 problem; `penalty` weights the ‖λ − anchor‖² term of f̃ (f has weight 0)."""

    steps: int = 100
    learning_rate: float = 0.1
    curvature: tuple = (1.0, 0.5)  # diag(G)
    w0: tuple = (2.0, 2.0)
    sine_weight: float = 10.0
    penalty: float = 5.0
    anchor: tuple = (1.0, 0.0)

    @property
    def strong_convexity(self) -> float:
        """α of Prop. 3.1 (g is min(G)-strongly convex)."""
        return float(min(self.curvature))

    @property
    def max_b_norm(self) -> float:
        """M_B = max_t ‖B_t‖ = ‖γG‖ (B_0 = 0)."""
        return self.learning_rate * float(max(self.curvature))

    # -- TF losses for the engine ---------------------------------------------------------
    def inner_loss(self, w: tf.Tensor, lam: tf.Tensor) -> tf.Tensor:
        """g(w, λ) = ½ (w − λ)ᵀ G (w − λ)."""
        G = tf.constant(self.curvature, tf.float64)
        return 0.5 * tf.reduce_sum(G * tf.square(w - lam))

    def outer_loss(self, w: tf.Tensor, lam: tf.Tensor, outer_batch: dict) -> tf.Tensor:
        """f(w) + ρ‖λ − a‖²; (ρ, a) arrive as the outer batch so one compiled estimator serves f
        (ρ = 0) and f̃ (ρ = 5) without retracing."""
        f = tf.reduce_sum(tf.square(w)) + self.sine_weight * tf.reduce_sum(tf.square(tf.sin(w)))
        return f + outer_batch["penalty"] * tf.reduce_sum(tf.square(lam - outer_batch["anchor"]))

    def outer_batch(self, objective: str) -> dict:
        penalty = self.penalty if objective == "f_tilde" else 0.0
        return {"penalty": tf.constant(penalty, tf.float64), "anchor": tf.constant(self.anchor, tf.float64)}

    # -- closed forms (numpy; cross-checks, contours, the bound) --------------------------
    def contraction(self, k: int) -> np.ndarray:
        """diag((I − γG)^k); C = contraction(T)."""
        return (1.0 - self.learning_rate * np.asarray(self.curvature)) ** k

    def inner_solution(self, lam: np.ndarray) -> np.ndarray:
        """ŵ = C w0 + (I − C) λ (λ may carry leading batch axes)."""
        C = self.contraction(self.steps)
        return C * np.asarray(self.w0) + (1.0 - C) * np.asarray(lam)

    def outer_grad_w(self, w: np.ndarray) -> np.ndarray:
        """∇ŵ f = 2w + 10 sin(2w) (elementwise)."""
        return 2.0 * w + self.sine_weight * np.sin(2.0 * w)

    def objective(self, lam: np.ndarray, objective: str) -> np.ndarray:
        """F(λ) = f(ŵ(λ), λ) (or F̃), vectorized over leading axes of λ."""
        lam = np.asarray(lam, np.float64)
        w = self.inner_solution(lam)
        value = np.sum(w**2 + self.sine_weight * np.sin(w) ** 2, axis=-1)
        if objective == "f_tilde":
            value = value + self.penalty * np.sum((lam - np.asarray(self.anchor)) ** 2, axis=-1)
        return value

    def truncated_hypergradient(self, lam: np.ndarray, truncate: int, objective: str) -> np.ndarray:
        """h_{T−K} = ∇λ f + (I − (I − γG)^K) ∇ŵ f (Eq. 8); truncate=T gives d_λ f."""
        lam = np.asarray(lam, np.float64)
        h = (1.0 - self.contraction(truncate)) * self.outer_grad_w(self.inner_solution(lam))
        if objective == "f_tilde":
            h = h + 2.0 * self.penalty * (lam - np.asarray(self.anchor))
        return h

    def optimum_of_f(self) -> np.ndarray:
        """argmin F: ŵ = 0 is reachable, so λ* = −C w0 / (I − C) (offset from 0, §4.1)."""
        C = self.contraction(self.steps)
        return -C * np.asarray(self.w0) / (1.0 - C)


# -- Hypergradients from the engine. -----------------------------------------------------
class Estimators(dict):
    """K → compiled `tfb.Hypergradient`, built on first use; K = T is full RMD (exact)."""

    def __init__(self, problem: ToyProblem, jit_compile: bool):
        super().__init__()
        self.problem, self.jit_compile, self.w0 = problem, jit_compile, tf.constant(problem.w0, tf.float64)

    def __missing__(self, truncate: int) -> tfb.Hypergradient:
        T = self.problem.steps
        self[truncate] = tfb.hypergradient_fn(
            self.problem.inner_loss, self.problem.outer_loss, steps=T, learning_rate=self.problem.learning_rate,
            truncate=None if truncate == T else truncate, estimator="reverse", jit_compile=self.jit_compile)
        return self[truncate]

    def evaluate(self, truncate: int, lam: np.ndarray, batch: dict) -> tuple[float, np.ndarray]:
        """(F(λ), h_{T−K}(λ)) from the compiled K-RMD estimator."""
        value, grad = self[truncate](self.w0, tf.constant(lam, tf.float64), None, batch)
        return float(value), grad.numpy()

    def tracing_counts(self) -> dict[int, int]:
        return {k: hg.tracing_count for k, hg in sorted(self.items())}


# -- Experiments. ------------------------------------------------------------------------
def truncation_error_at(problem: ToyProblem, est: Estimators, truncations: Sequence[int], lam) -> dict:
    """Fig. 1 (right): ‖h_{T−K} − d_λ f‖ and the bound of Eq. 10 at λ, for each K."""
    T = problem.steps
    batch = problem.outer_batch("f")
    lam = np.asarray(lam, np.float64)
    detailed = est[T].detailed(est.w0, tf.constant(lam), None, batch)
    w_hat = detailed.final_params.numpy()
    exact = detailed.hypergrad.numpy()
    outer_grad_norm = float(np.linalg.norm(problem.outer_grad_w(problem.inner_solution(lam))))

    def bound(k):
        return float(tfb.diagnostics.truncation_bound(
            k, problem.learning_rate, problem.strong_convexity, outer_grad_norm, problem.max_b_norm))

    hypergrads, errors, bounds = {}, [], []
    for k in truncations:
        h = est.evaluate(k, lam, batch)[1]
        hypergrads[k] = h
        errors.append(float(np.linalg.norm(h - exact)))
        bounds.append(bound(k))
    return {"lambda": lam, "w_hat_engine": w_hat, "w_hat_closed_form": problem.inner_solution(lam),
            "outer_grad_norm": outer_grad_norm, "strong_convexity": problem.strong_convexity,
            "max_b_norm": problem.max_b_norm, "exact_hypergradient": exact,
            "exact_hypergradient_closed_form": problem.truncated_hypergradient(lam, T, "f"),
            "truncations": list(truncations), "hypergradients": {str(k): v for k, v in hypergrads.items()},
            "errors": errors, "bounds": bounds,
            "bound_curve": {"truncations": list(range(1, T + 1)), "bounds": [bound(k) for k in range(1, T + 1)]}}


def run_trajectory(problem: ToyProblem, est: Estimators, objective: str, truncate: int, lam1: Sequence[float],
                   iterations: int, first_step_norm: float, probe_truncations: Sequence[int] = (),
                   progress: Optional[Callable[[], None]] = None) -> dict:
    """λ_{τ+1} = λ_τ − η_τ h_{T−K}(λ_τ), η_τ = η0/√τ, η0 = first_step_norm / ‖h_{T−K}(λ_1)‖
    (footnote 4). Records λ_τ, F(λ_τ), h_{T−K}, the exact d_λ f (full RMD) and, for every K in
    `probe_truncations`, the descent ratio h_{T−K}ᵀ d_λf / ‖d_λf‖² at λ_τ (Fig. 2)."""
    T = problem.steps
    batch = problem.outer_batch(objective)
    lam = np.asarray(lam1, np.float64)
    lambdas, values, exact_grads, grads = [], [], [], []
    ratios = {k: [] for k in probe_truncations}
    eta0 = None
    for tau in range(1, iterations + 2):  # τ = R + 1: only λ_{R+1}, F and d_λ f there
        value, exact = est.evaluate(T, lam, batch)
        lambdas.append(lam)
        values.append(value)
        exact_grads.append(exact)
        if tau > iterations:
            break
        h = exact if truncate == T else est.evaluate(truncate, lam, batch)[1]
        if eta0 is None:
            norm = np.linalg.norm(h)
            if not norm > 0:
                raise ValueError(f"h_(T-K) is zero at the start λ_1={lam.tolist()}: choose another --init_lambda")
            eta0 = first_step_norm / norm
        for k in probe_truncations:
            hk = h if k == truncate else exact if k == T else est.evaluate(k, lam, batch)[1]
            ratios[k].append(float(tfb.diagnostics.descent_ratio(hk, exact)))
        grads.append(h)
        lam = lam - eta0 / math.sqrt(tau) * h
        if progress is not None:
            progress()
    # λ_1 … λ_{R+1}, F(λ_τ) for τ = 1 … R+1, h_{T−K}(λ_τ) for τ = 1 … R.
    return {"truncate": truncate, "eta0": eta0, "lambdas": np.array(lambdas), "values": np.array(values),
            "exact_grad_norms": np.linalg.norm(exact_grads, axis=1), "exact_grads": np.array(exact_grads),
            "hypergrads": np.array(grads), "ratios": {str(k): v for k, v in ratios.items()}}


def find_optimum(problem: ToyProblem, est: Estimators, objective: str, grid_size: int) -> dict:
    """Global minimizer of F (or F̃): argmin of the closed form on a grid over [−3, 3]², refined
    by gradient descent with the exact full-RMD hypergradient until ‖d_λ f‖ ≤ 1e-12."""
    axis = np.linspace(*_OPTIMUM_BOX, max(grid_size, 301))
    grid = np.stack(np.meshgrid(axis, axis, indexing="ij"), axis=-1)
    values = problem.objective(grid, objective)
    start = grid[np.unravel_index(np.argmin(values), values.shape)]
    batch = problem.outer_batch(objective)
    lam, iterations = start.copy(), 0
    for iterations in range(1, 5001):
        _, d = est.evaluate(problem.steps, lam, batch)
        if np.linalg.norm(d) <= _OPTIMUM_TOL:
            break
        lam = lam - _OPTIMUM_STEP * d
    value, d = est.evaluate(problem.steps, lam, batch)
    result = {"lambda": lam, "value": value, "exact_grad_norm": float(np.linalg.norm(d)), "grid_start": start,
              "refinement_iterations": iterations,
              "method": f"argmin of the closed-form objective on a {len(axis)}x{len(axis)} grid over "
                        f"[{_OPTIMUM_BOX[0]}, {_OPTIMUM_BOX[1]}]^2, refined by gradient descent (step "
                        f"{_OPTIMUM_STEP}) with the exact full-RMD hypergradient until ||d_lambda f|| <= {_OPTIMUM_TOL}"}
    if objective == "f":
        result["lambda_closed_form"] = problem.optimum_of_f()
        result["value_closed_form"] = 0.0
    return result


# -- Figures. ----------------------------------------------------------------------------
def _plot_box(points: np.ndarray, margin: float = 0.3, min_span: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box of `points` plus a margin, widened to at least `min_span` per axis."""
    lo, hi = points.min(axis=0) - margin, points.max(axis=0) + margin
    pad = np.maximum(min_span - (hi - lo), 0.0) / 2
    return lo - pad, hi + pad


def _budget(problem: ToyProblem, iterations: Optional[int] = None) -> str:
    """The budget for a figure's title: T, γ (and the R hyper-iterations of each K)."""
    text = f"T = {problem.steps} inner steps, γ = {problem.learning_rate:g}"
    return text + (f", R = {iterations} hyper-iterations per K" if iterations else "")


def _contour(ax, problem: ToyProblem, objective: str, lo, hi, grid_size: int, floor: float) -> None:
    """Filled contour of log(F − F* + 1e-2) so both the bowl and the ripples show."""
    X, Y = np.meshgrid(np.linspace(lo[0], hi[0], grid_size), np.linspace(lo[1], hi[1], grid_size))
    Z = np.log(problem.objective(np.stack([X, Y], axis=-1), objective) - floor + 1e-2)
    ax.contourf(X, Y, Z, levels=25, cmap="Greys_r", alpha=0.55)
    ax.contour(X, Y, Z, levels=25, colors="k", linewidths=0.3, alpha=0.4)
    ax.set_xlabel(r"$\lambda_1$")
    ax.set_ylabel(r"$\lambda_2$")
    ax.set_aspect("equal")


def plot_fig1(problem: ToyProblem, fig1: dict, path: str, grid_size: int) -> str:
    fig = plt.figure(figsize=(12, 5))
    ax = fig.add_subplot(1, 2, 1, projection="3d")
    X, Y = np.meshgrid(np.linspace(-4, 4, grid_size), np.linspace(-4, 4, grid_size))
    W = np.stack([X, Y], axis=-1)
    ax.plot_surface(X, Y, np.sum(W**2 + problem.sine_weight * np.sin(W) ** 2, axis=-1), cmap="viridis",
                    linewidth=0, antialiased=True, rcount=80, ccount=80)
    ax.set_xlabel(r"$w_1$")
    ax.set_ylabel(r"$w_2$")
    ax.set_zlabel(r"$f(w)$")
    ax.set_title(r"outer objective $f(w) = \|w\|^2 + 10\|\sin w\|^2$")

    ax = fig.add_subplot(1, 2, 2)
    curve = fig1["bound_curve"]
    ax.semilogy(curve["truncations"], curve["bounds"], "r-", label="bound (Eq. 10)")
    ks, errs = np.array(fig1["truncations"]), np.array(fig1["errors"])
    keep = errs > 0  # K = T is exact: error 0, not on a log axis
    ax.semilogy(ks[keep], errs[keep], "bo-", ms=4, label=r"$\|h_{T-K} - d_\lambda f\|$ (engine; 0 at K = T)")
    ax.set_xlabel("K (reverse steps back-propagated)")
    ax.set_ylabel("hypergradient error (log scale)")
    ax.set_title(r"Prop. 3.1 at $\lambda = (%g, %g)$" % tuple(fig1["lambda"]))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.suptitle(f"Fig. 1: truncation error of K-RMD ({_budget(problem)})")
    return plotting.save_figure(fig, path)


def plot_fig2(problem: ToyProblem, fig2: dict, colors: dict, path: str) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, objective, name in zip(axes, OBJECTIVES, ("f", r"\tilde f")):
        data = fig2[objective]
        reliable = np.array(data["reliable"])
        for k_str, ratio in data["ratios"].items():
            tau = np.arange(1, len(ratio) + 1)
            ax.plot(tau[reliable], np.array(ratio)[reliable], color=colors[int(k_str)],
                    label=plotting.truncation_label(int(k_str), problem.steps))
        ax.axhline(0.0, color="r", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel(r"hyper-iteration $\tau$ (1-RMD trajectory)")
        ax.set_ylabel(r"descent ratio $h_{T-K}^\top d_\lambda f / \|d_\lambda f\|^2$")
        note = "" if reliable.all() else rf" (shown while $\|d_\lambda f\|$ > {_RATIO_MIN_GRAD:g}; below: round-off)"
        ax.set_title(f"${name}$" + note, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Fig. 2: is $h_{{T-K}}$ a descent direction? ({_budget(problem, len(tau))})")
    return plotting.save_figure(fig, path)


def _trajectories(ax, runs: dict, colors: dict, steps: int) -> None:
    for k_str, run in runs.items():
        lam, k = np.asarray(run["lambdas"]), int(k_str)
        ax.plot(lam[:, 0], lam[:, 1], ".-", ms=2.5, lw=1.0, color=colors[k], label=plotting.truncation_label(k, steps))
        ax.plot(lam[-1, 0], lam[-1, 1], "o", ms=5, mfc="none", color=colors[k])
    first = np.asarray(next(iter(runs.values()))["lambdas"])[0]
    ax.plot(first[0], first[1], "ks", ms=6, label=r"$\lambda_1$")


def _curves(ax, runs: dict, colors: dict, steps: int, values: Callable[[dict], np.ndarray], ylabel: str,
            title: str) -> None:
    """One log-scale curve per K against the hyper-iteration, with a legend."""
    labels = {k: plotting.truncation_label(int(k), steps) for k in runs}
    plotting.semilogy_curves(ax, {labels[k]: values(r) for k, r in runs.items()},
                             colors={labels[k]: colors[int(k)] for k in runs},
                             xlabel=r"hyper-iteration $\tau$", ylabel=ylabel, title=title)
    ax.legend(fontsize=8)


def plot_fig3(problem: ToyProblem, fig3: dict, colors: dict, path: str, grid_size: int) -> str:
    runs, opt, T = fig3["runs"], fig3["optimum"], problem.steps
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    points = np.concatenate([np.asarray(r["lambdas"]) for r in runs.values()] + [np.asarray(opt["lambda"])[None]])
    lo, hi = _plot_box(points)
    _contour(axes[0], problem, "f_tilde", lo, hi, grid_size, opt["value"])
    _trajectories(axes[0], runs, colors, T)
    axes[0].plot(*opt["lambda"], "rx", ms=13, mew=3, label=r"optimal $\lambda$")
    axes[0].set_title(r"K-RMD on $\tilde F(\lambda)$ (contours: log scale)")
    axes[0].legend(fontsize=7, loc="best")
    _curves(axes[1], runs, colors, T, lambda r: np.asarray(r["values"]) - fig3["f_star"],
            r"$\tilde F(\lambda_\tau) - \tilde F^*$", "biased convergence")
    axes[1].set_xscale("log")
    ks = [int(k) for k in runs]
    axes[2].semilogy(ks, fig3["final_distance_to_optimum"], "bo-", label=r"$\|\lambda_{R+1} - \lambda^*\|$")
    axes[2].semilogy(ks, fig3["final_exact_grad_norm"], "gs--", label=r"$\|d_\lambda \tilde f(\lambda_{R+1})\|$")
    axes[2].set_xlabel("K (reverse steps back-propagated)")
    axes[2].set_ylabel("at the last iterate (log scale)")
    axes[2].set_title("bias of the K-RMD limit")
    axes[2].grid(True, which="both", alpha=0.3)
    axes[2].legend()
    fig.suptitle(rf"Fig. 3: K-RMD on $\tilde F$ ($\nabla_\lambda \tilde f \neq 0$): {_budget(problem, len(runs[str(ks[0])]['values']) - 1)}")
    return plotting.save_figure(fig, path)


def plot_fig4(problem: ToyProblem, fig4: dict, colors: dict, path: str, grid_size: int, arrows: int = 5) -> str:
    runs, opt, T = fig4["runs"], fig4["optimum"], problem.steps
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    lo, hi = _plot_box(np.concatenate([np.asarray(r["lambdas"]) for r in runs.values()]), min_span=3.5)
    _contour(axes[0], problem, "f", lo, hi, grid_size, opt["value"])  # wide enough to show ripples and saddles
    _trajectories(axes[0], runs, colors, T)
    axes[0].plot(*opt["lambda"], "rx", ms=11, mew=2.5, label=r"optimal $\lambda$")
    # −h_{T−1} (blue) vs −d_λ f (red) at the first 1-RMD iterates: h_{T−1} is a descent direction.
    lam, h, d = (np.asarray(runs["1"][key])[:arrows] for key in ("lambdas", "hypergrads", "exact_grads"))
    scale = 0.12 * np.linalg.norm(hi - lo)
    for vec, color, label in ((h, "b", r"$-h_{T-1}$"), (d, "r", r"$-d_\lambda f$")):
        unit = -vec / np.linalg.norm(vec, axis=1, keepdims=True) * scale
        axes[0].quiver(lam[:, 0], lam[:, 1], unit[:, 0], unit[:, 1], color=color, angles="xy",
                       scale_units="xy", scale=1, width=0.004, alpha=0.8, label=label)
    axes[0].set_title(r"K-RMD on $F(\lambda)$ (contours: log scale)")
    axes[0].legend(fontsize=7, loc="best")
    _curves(axes[1], runs, colors, T, lambda r: r["exact_grad_norms"], r"$\|d_\lambda f(\lambda_\tau)\|$",
            "exact gradient norm")
    _curves(axes[2], runs, colors, T, lambda r: np.asarray(r["values"]) - fig4["f_star"],
            r"$F(\lambda_\tau) - F^*$", "objective gap")
    fig.suptitle(rf"Fig. 4: K-RMD on $F$ ($\nabla_\lambda f = 0$): {_budget(problem, len(runs['1']['values']) - 1)}")
    return plotting.save_figure(fig, path)


# -- The program. ------------------------------------------------------------------------
PRESETS = {"full": {},  # the paper's settings (the defaults)
           "quick": dict(hyper_iters=100, truncations=(1, 5, 100), fig1_truncations=(1, 5, 100), grid_size=81)}


@dataclasses.dataclass
class ToyConfig:
    output_dir: str = option("out/toy", "Where results.json and fig1..fig4.png are written.", result=False)
    hyper_iters: int = option(1000, "Hyper-iterations R per trajectory (Figs. 2–4).")
    truncations: Sequence[int] = option((1, 2, 5, 10, 25, 50, 100), "K values for Figs. 2–4 (K = T = 100 is "
                                        "full RMD; K = 1 is always added).")
    fig1_truncations: Sequence[int] = option(
        (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 25, 30, 40, 50, 60, 70, 80, 90, 95, 99, 100),
        "K values for Fig. 1 (each K compiles its own estimator).")
    init_lambda: Sequence[float] = option((-1.0, 1.0), "Start λ_1 of every trajectory.")
    first_step_norm: float = option(0.6, "‖η_1 h_{T−K}(λ_1)‖: η0 is tuned per K to give this first step "
                                    "(footnote 4).")
    grid_size: int = option(201, "Contour grid resolution per axis.")
    seed: int = option(0, "Recorded and used to seed numpy/TF (the problem is deterministic).")
    jit_compile: bool = option(True, "XLA-compile the hypergradient estimators.")
    preset: str = "full"

    def validated(self, problem: ToyProblem) -> "ToyConfig":
        cfg = dataclasses.replace(self)
        T = problem.steps
        for name in ("truncations", "fig1_truncations"):
            ks = sorted({int(k) for k in getattr(cfg, name)})
            bad = [k for k in ks if not 1 <= k <= T]
            if not ks or bad:
                raise ValueError(f"--{name}: every K must satisfy 1 <= K <= T={T} (K=T is full RMD); got {bad or 'nothing'}")
            setattr(cfg, name, ks)
        cfg.truncations = sorted(set(cfg.truncations) | {1})  # Fig. 2 lives on the 1-RMD trajectory
        if len(cfg.init_lambda) != 2 or not all(math.isfinite(float(x)) for x in cfg.init_lambda):
            raise ValueError(f"--init_lambda must be two finite numbers, e.g. -1,1; got {cfg.init_lambda}")
        cfg.init_lambda = [float(x) for x in cfg.init_lambda]
        if cfg.hyper_iters < 1:
            raise ValueError(f"--hyper_iters must be >= 1, got {cfg.hyper_iters}")
        if not cfg.first_step_norm > 0:
            raise ValueError(f"--first_step_norm must be > 0 (footnote 4 uses 0.6), got {cfg.first_step_norm}")
        if cfg.grid_size < 11:
            raise ValueError(f"--grid_size must be >= 11 (contour resolution), got {cfg.grid_size}")
        return cfg


def run_experiment(cfg: ToyConfig, problem: ToyProblem, ctx: program.Run) -> dict:
    """Runs everything behind Figs. 1–4, draws fig1..fig4.png; returns the results."""
    np.random.seed(cfg.seed)
    tf.random.set_seed(cfg.seed)
    T = problem.steps
    est = Estimators(problem, cfg.jit_compile)

    print(f"[toy] Fig. 1: K-RMD at lambda={FIG1_LAMBDA} for K in {cfg.fig1_truncations}", flush=True)
    fig1 = truncation_error_at(problem, est, cfg.fig1_truncations, FIG1_LAMBDA)

    runs, optima, fig2 = {}, {}, {}
    for objective in OBJECTIVES:
        bar = tfb.Progress(cfg.hyper_iters * len(cfg.truncations), unit_name="hyper-iteration",
                           label=f"[toy] {objective}: {cfg.hyper_iters} hyper-iterations for K in {cfg.truncations}")
        done = itertools.count(1)
        runs[objective] = {str(k): run_trajectory(problem, est, objective, k, cfg.init_lambda, cfg.hyper_iters,
                                                  cfg.first_step_norm, cfg.truncations if k == 1 else (),
                                                  lambda: bar.update(next(done)))
                           for k in cfg.truncations}
        optima[objective] = find_optimum(problem, est, objective, cfg.grid_size)
        one = runs[objective]["1"]
        reliable = one["exact_grad_norms"][:-1] > _RATIO_MIN_GRAD
        fig2[objective] = {"lambdas": one["lambdas"][:-1], "exact_grad_norms": one["exact_grad_norms"][:-1],
                           "ratios": one["ratios"], "reliable": reliable,
                           "min_ratio": {k: float(np.min(np.asarray(r)[reliable])) for k, r in one["ratios"].items()}}

    def summary(objective):
        opt = optima[objective]
        # F* for the gaps: exact for f (ŵ = 0 is reachable, F* = 0); the refined optimum for f̃.
        f_star = opt.get("value_closed_form", opt["value"])
        mine = runs[objective]
        return {"optimum": opt, "f_star": f_star, "runs": mine,
                "final_lambda": {k: r["lambdas"][-1] for k, r in mine.items()},
                "final_distance_to_optimum": [float(np.linalg.norm(r["lambdas"][-1] - opt["lambda"])) for r in mine.values()],
                "final_exact_grad_norm": [float(r["exact_grad_norms"][-1]) for r in mine.values()],
                "final_value_gap": [float(r["values"][-1] - f_star) for r in mine.values()]}

    fig3, fig4 = summary("f_tilde"), summary("f")

    # Cross-check every engine hypergradient of the trajectories against the closed form.
    def max_diff(key: str, k_of: Callable[[str], int], until: Optional[int]) -> float:
        return max(float(np.max(np.abs(run[key] - problem.truncated_hypergradient(run["lambdas"][:until], k_of(k), o))))
                   for o in OBJECTIVES for k, run in runs[o].items())

    crosscheck = {"max_abs_diff_exact_vs_closed_form": max_diff("exact_grads", lambda k: T, None),
                  "max_abs_diff_truncated_vs_closed_form": max_diff("hypergrads", int, -1),
                  "fig1_exact_vs_closed_form": float(np.max(np.abs(fig1["exact_hypergradient"]
                                                                   - fig1["exact_hypergradient_closed_form"]))),
                  "fig1_w_hat_vs_closed_form": float(np.max(np.abs(fig1["w_hat_engine"] - fig1["w_hat_closed_form"])))}
    if max(crosscheck.values()) > 1e-8:
        print(f"[toy] WARNING: engine and closed form disagree: {crosscheck}", flush=True)

    colors = plotting.truncation_colors(sorted(set(cfg.truncations) | {T}), T)
    path = lambda name: os.path.join(cfg.output_dir, f"{name}.png")  # noqa: E731
    figures = {"fig1": plot_fig1(problem, fig1, path("fig1"), min(cfg.grid_size, 121)),
               "fig2": plot_fig2(problem, fig2, colors, path("fig2")),
               "fig3": plot_fig3(problem, fig3, colors, path("fig3"), cfg.grid_size),
               "fig4": plot_fig4(problem, fig4, colors, path("fig4"), cfg.grid_size)}
    results = jsonable({"config": dataclasses.asdict(cfg), "problem": dataclasses.asdict(problem), "fig1": fig1,
                        "fig2": fig2, "fig3": fig3, "fig4": fig4, "closed_form_crosscheck": crosscheck,
                        "tracing_counts": {str(k): v for k, v in est.tracing_counts().items()},
                        "figures": {k: os.path.basename(v) for k, v in figures.items()},
                        "runtime_seconds": ctx.seconds()})
    return results


def format_summary(results: dict) -> str:
    fig1 = results["fig1"]
    lines = ["\n[toy] K-RMD hypergradients at lambda=(1,1) (f):",
             f"  {'K':>5} {'h_(T-K)':>30} {'error':>11} {'bound':>11}"]
    for k, err, bnd in zip(fig1["truncations"], fig1["errors"], fig1["bounds"]):
        h = fig1["hypergradients"][str(k)]
        lines.append(f"  {k:>5} {h[0]:>14.8f} {h[1]:>14.8f} {err:>11.3e} {bnd:>11.3e}")
    lines.append(f"  exact (full RMD) {fig1['exact_hypergradient']}")
    for name, fig in (("f_tilde (Fig. 3)", results["fig3"]), ("f (Fig. 4)", results["fig4"])):
        opt = fig["optimum"]
        lines.append(f"[toy] {name}: optimum lambda*={np.round(opt['lambda'], 6).tolist()} F*={opt['value']:.6g}")
        for k, dist, gn in zip(fig["runs"], fig["final_distance_to_optimum"], fig["final_exact_grad_norm"]):
            lines.append(f"  K={k:>4}: final lambda={np.round(fig['final_lambda'][k], 5).tolist()} "
                         f"|lambda-lambda*|={dist:.3e} |d_lambda F|={gn:.3e}")
    for objective in OBJECTIVES:
        lines.append(f"[toy] Fig. 2 min descent ratio on {objective}: {results['fig2'][objective]['min_ratio']}")
    lines.append(f"[toy] closed-form cross-check: {results['closed_form_crosscheck']}")
    lines.append(f"[toy] tracing counts per K: {results['tracing_counts']}; runtime {results['runtime_seconds']:.1f} s")
    return "\n".join(lines)


PROGRAM = program.Program("toy", ToyConfig, PRESETS, experiment=run_experiment, load_data=lambda cfg: ToyProblem(),
                          table=format_summary, prepare=lambda cfg: cfg.validated(ToyProblem()))


if __name__ == "__main__":
    program.start(PROGRAM)
