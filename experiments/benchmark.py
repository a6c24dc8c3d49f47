r"""Time and memory of the hypergradient estimators on the hypercleaning-sized problem (Table 1).

Measures each estimator configuration (floor, K-RMD, full and checkpointed RMD,
forward mode, implicit CG) in a fresh process: time per hypergradient over the floor of T plain
inner steps, compile time and peak memory; writes results.json and benchmark.png to
--output_dir. --suites adds the online, CNN and meta-batch suites. What each measures: RESULTS.md,
"Benchmarks: what is measured"; the numbers: README, "Benchmark".

  tfb-benchmark                                  # T = 100 and 1000 (or: python -m experiments.benchmark)
  tfb-benchmark --steps=100 --estimators=floor,reverse
  tfb-benchmark --preset=quick                   # tiny sizes (tests)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_bilevel as tfb  # noqa: E402
from experiments.benchmarks import cnn as benchmark_cnn  # noqa: E402
from experiments.benchmarks import forward as benchmark_forward  # noqa: E402
from experiments.benchmarks import metabatch as benchmark_metabatch  # noqa: E402
from experiments.benchmarks import online as benchmark_online  # noqa: E402
from experiments.benchmarks.report import SuiteReport, error_row, mb, ratio_of, verdict  # noqa: E402
from experiments.common import program  # noqa: E402
from experiments.common.config import option  # noqa: E402
from experiments.common.memory import stored_states  # noqa: E402
from experiments.common.subprocesses import run_each  # noqa: E402
from experiments.common.timing import against_floor, timed  # noqa: E402
from tf_bilevel.keras import losses  # noqa: E402  (imported here, not inside a measured call)

ESTIMATORS = ("floor", "reverse", "checkpointed", "forward", "implicit_cg")


# Targets of the project (issue #2): reported, never asserted.
MEMORY_TOLERANCE = 0.10
COMPILE_TARGET_SECONDS = 5.0

# ----------------------------------------------------------------------------------------
# The problem.
# ----------------------------------------------------------------------------------------


class Problem(NamedTuple):
    inner_loss: Callable[..., tf.Tensor]
    outer_loss: Callable[..., tf.Tensor]
    params: tf.Tensor  # W
    hparams: tf.Tensor  # λ, or its first num_hparams entries
    inner_batch: dict
    outer_batch: dict


def _cross_entropy(W: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """Per-example CE of the logits W x (the library's log_softmax form, one-hot targets)."""
    logits = tf.matmul(x, W, transpose_b=True)
    return losses.categorical_crossentropy(tf.one_hot(y, W.shape[0], dtype=logits.dtype), logits)


def hypercleaning_problem(
    num_examples: int, num_features: int, num_classes: int, seed: int, num_hparams: Optional[int] = None
) -> Problem:
    """Random data of the hypercleaning sizes; λ = 0 (every weight σ(0) = 1/2), W = 0.

    With `num_hparams = n`, only λ_1..λ_n are hyperparameters; the other λ_i are frozen data
    (same inner cost, small N, for forward mode).
    """
    rng = np.random.default_rng(seed)

    def examples():
        x = rng.standard_normal((num_examples, num_features)).astype(np.float32)
        x[:, -1] = 1.0  # the constant feature (bias), as in the 785 = 784 + 1 of the paper
        y = rng.integers(0, num_classes, num_examples).astype(np.int32)
        return tf.constant(x), tf.constant(y)

    x_train, y_train = examples()
    x_val, y_val = examples()
    num_hparams = num_examples if num_hparams is None else num_hparams
    lam = np.zeros(num_examples, np.float32)

    def inner_loss(W, hparams, batch):
        weights = tf.sigmoid(tf.concat([hparams, batch["frozen_lambda"]], axis=0))
        ce = _cross_entropy(W, batch["x"], batch["y"])
        return tf.reduce_mean(weights * ce) + 0.001 * tf.reduce_sum(tf.square(W))

    def outer_loss(W, hparams, batch):
        return tf.reduce_mean(_cross_entropy(W, batch["x"], batch["y"]))

    return Problem(
        inner_loss,
        outer_loss,
        params=tf.zeros((num_classes, num_features), tf.float32),
        hparams=tf.constant(lam[:num_hparams]),
        inner_batch={"x": x_train, "y": y_train, "frozen_lambda": tf.constant(lam[num_hparams:])},
        outer_batch={"x": x_val, "y": y_val},
    )


# ----------------------------------------------------------------------------------------
# One configuration, measured in the current (fresh) process.
# ----------------------------------------------------------------------------------------


def build(config: dict, problem: Problem) -> tuple[tfb.Hypergradient, Callable[[], Any], Callable[[], Any]]:
    """(hg, hypergradient call, floor call) for `config`, both calls compiled with XLA."""
    kind = config["estimator"]
    engine_estimator = "reverse" if kind == "floor" else kind
    truncate = config["truncate"]
    full_rmd = kind in ("reverse", "checkpointed") and truncate == config["steps"]
    solver = {}
    if kind == "implicit_cg":  # at most K CG iterations, stopping at the default tolerance
        solver, truncate = {"iterations": truncate}, None
    if kind == "forward" or full_rmd:
        truncate = None
    hg = tfb.hypergradient_fn(
        problem.inner_loss, problem.outer_loss, steps=config["steps"], learning_rate=config["learning_rate"],
        truncate=truncate, estimator=engine_estimator, jit_compile=True, backward=config.get("backward") or "auto",
        **solver,
    )
    args = (problem.params, problem.hparams, problem.inner_batch, problem.outer_batch)
    floor = lambda: hg.solve(*args[:3])  # noqa: E731
    if kind == "floor":
        return hg, floor, floor
    return hg, (lambda: hg(*args)), floor


def measure(config: dict) -> dict:
    """Times and memory of one configuration (call in a fresh process)."""
    problem = hypercleaning_problem(
        config["num_examples"], config["num_features"], config["num_classes"], config["seed"],
        num_hparams=config["forward_hparams"] if config["estimator"] == "forward" else None,
    )
    timed(lambda: tf.reduce_sum(problem.inner_batch["x"]))  # start the TF runtime before measuring
    is_floor = config["estimator"] == "floor"

    def repeats_for(warm, floor):  # fewer (at least 3) for slow configurations
        estimate = warm.wall + (0.0 if is_floor else timed(floor)[0].wall)
        return max(min(config["repeats"], int(config["max_seconds"] // max(estimate, 1e-9))), min(3, config["repeats"]))

    run = against_floor(lambda: build(config, problem), is_floor, repeats_for)
    hg, first_out = run.built, run.first_out
    num_params = int(problem.params.shape.num_elements())
    states = stored_states(config["estimator"], config["truncate"])
    return {
        **config,
        **run.row(),
        "stored_states": states,
        "backward_used": hg.backward_used if config["estimator"] == "reverse" else None,
        "stored_state_bytes": None if states is None else states * num_params * 4,
        "num_params": num_params,
        "num_hparams": int(problem.hparams.shape.num_elements()),
        "outer_value": None if is_floor else float(first_out[0]),
        "hypergrad_norm": None if is_floor else float(tfb.diagnostics.global_norm(first_out[1:])),
    }


# ----------------------------------------------------------------------------------------
# The driver: one subprocess per configuration, then the table, JSON and figure.
# ----------------------------------------------------------------------------------------


def configurations(settings: dict) -> list[dict]:
    base = {key: settings[key] for key in (
        "num_examples", "num_features", "num_classes", "learning_rate", "repeats", "seed", "forward_hparams",
    )}
    base["max_seconds"] = settings["max_seconds_per_config"]
    wanted = settings["estimators"]
    configs = []

    def add(estimator: str, T: int, K: Optional[int], label: str) -> None:
        if estimator not in wanted:
            return
        # "reverse": once per backward pass of --backward (issue #9 §1: memory of both modes).
        for backward in settings.get("backward", ["auto"]) if estimator == "reverse" else [None]:
            suffix = "" if backward in (None, "auto") else f" [{backward}]"
            configs.append({**base, "estimator": estimator, "steps": T, "truncate": K, "label": label + suffix,
                            "backward": backward})

    for T in settings["steps"]:
        full_ok = T <= settings["max_full_steps"]
        truncations = sorted(k for k in settings["truncate"] if k < T)
        add("floor", T, None, "floor (hg.solve)")
        for K in truncations:
            add("reverse", T, K, f"reverse K={K}")
        if full_ok:
            add("reverse", T, T, f"reverse full K=T={T}")
            add("checkpointed", T, T, f"checkpointed full K=T={T}")
        if T <= settings["max_forward_steps"]:
            add("forward", T, None, f"forward N={settings['forward_hparams']}")
        add("implicit_cg", T, settings["cg_iterations"], f"implicit_cg K={settings['cg_iterations']}")
    return configs


def format_table(results: list[dict]) -> str:
    header = ("| T | configuration | median s | × floor | × floor (min) | × floor (CPU) | compile s (CPU s) "
              "| RSS peak MB | alloc peak MB | stored MB |")
    lines = [header, "|" + "---|" * 10]
    for r in results:
        if "error" in r:
            lines.append(error_row(r, r["steps"], r["label"], 10))
            continue
        lines.append(
            f"| {r['steps']} | {r['label']} | {r['median_seconds']:.3f} | {r['time_over_floor']:.2f} | "
            f"{r['min_time_over_floor']:.2f} | {r['cpu_over_floor']:.2f} | "
            f"{r['compile_seconds']:.1f} ({r['compile_cpu_seconds']:.1f}) | {mb(r['process_peak_growth_bytes'])} | "
            f"{mb(r['allocator_peak_growth_bytes'])} | {mb(r['stored_state_bytes'])} |"
        )
    return "\n".join(lines)


def _find(results, estimator, T, K=None):
    for r in results:
        if r["estimator"] == estimator and r["steps"] == T and (K is None or r["truncate"] == K) and "error" not in r:
            return r
    return None


def summarize(results: list[dict], settings: dict) -> dict:
    """Ratios vs the targets, memory at the largest vs the smallest T, compile time."""
    steps = sorted(settings["steps"])
    time_checks = []
    for T in steps:
        for r in results:
            if r["steps"] != T or "error" in r or r["estimator"] != "reverse":
                continue
            K = r["truncate"]
            target = 2.0 if K == T else 1.10 if K <= 5 else 1.35 if K <= 25 else None
            if target is not None:
                time_checks.append({
                    "label": r["label"], "steps": T, "truncate": K, "target": target,
                    "time_over_floor": r["time_over_floor"], "met": r["time_over_floor"] <= target,
                    "cpu_over_floor": r["cpu_over_floor"], "met_cpu": r["cpu_over_floor"] <= target,
                })

    memory = {}
    if len(steps) >= 2:
        small, large = steps[0], steps[-1]
        krmd = []
        for K in sorted(settings["truncate"]):
            # K = small is full RMD at T = small: the same K stored states as K-RMD at T = large.
            a, b = _find(results, "reverse", small, K), _find(results, "reverse", large, K)
            if a is None or b is None or K > small:
                continue
            entry = {"truncate": K, f"T={small}": {}, f"T={large}": {}}
            for key in ("allocator_peak_growth_bytes", "process_peak_growth_bytes"):
                entry[f"T={small}"][key], entry[f"T={large}"][key] = a[key], b[key]
                ratio = ratio_of(b[key], a[key])
                entry[key.replace("_bytes", "_ratio")] = ratio
                entry[key.replace("_bytes", "_within_10pct")] = (
                    None if ratio is None else abs(ratio - 1) <= MEMORY_TOLERANCE
                )
            krmd.append(entry)
        full = {}
        a, b = _find(results, "reverse", small, small), _find(results, "reverse", large, large)
        if a and b:
            for key in ("allocator_peak_growth_bytes", "process_peak_growth_bytes"):
                full[key.replace("_bytes", "_ratio")] = ratio_of(b[key], a[key])
                full[key.replace("_bytes", "_increase_bytes")] = (
                    None if a[key] is None or b[key] is None else b[key] - a[key]
                )
            full["expected_increase_bytes"] = (large - small) * a["num_params"] * 4
        memory = {"krmd_large_vs_small_T": krmd, "full_rmd_growth": full, "small_T": small, "large_T": large}

    compile_checks = []
    T0 = steps[0]
    for estimator in ("reverse",):
        full = _find(results, estimator, T0, T0)
        if full is not None:
            compile_checks.append({
                "label": full["label"], "steps": T0, "target": COMPILE_TARGET_SECONDS,
                "compile_seconds": full["compile_seconds"], "met": full["compile_seconds"] <= COMPILE_TARGET_SECONDS,
                "compile_cpu_seconds": full["compile_cpu_seconds"],
                "met_cpu": full["compile_cpu_seconds"] <= COMPILE_TARGET_SECONDS,
            })
    return {"time_vs_targets": time_checks, "memory": memory, "compile_full_rmd": compile_checks}


def format_summary(summary: dict) -> str:
    lines = ["", "Time / floor vs targets (K<=5: 1.10, K=25: 1.35, full: 2.0), median wall time [median CPU time]:"]
    for c in summary["time_vs_targets"]:
        lines.append(
            f"  T={c['steps']:<5} {c['label']:<32} {c['time_over_floor']:.2f} <= {c['target']}: "
            f"{verdict(c['met'])}   [{c['cpu_over_floor']:.2f}: {verdict(c['met_cpu'])}]"
        )
    memory = summary["memory"]
    if memory:
        small, large = memory["small_T"], memory["large_T"]
        lines.append(f"K-RMD peak memory, T={large} / T={small} (target within 10%: Table 1, O(MK)):")
        for e in memory["krmd_large_vs_small_T"]:
            alloc = e["allocator_peak_growth_ratio"]
            proc = e["process_peak_growth_ratio"]
            lines.append(
                f"  K={e['truncate']:<4} allocator {_fmt(alloc)} ({verdict(e['allocator_peak_growth_within_10pct'])}), "
                f"process RSS {_fmt(proc)} ({verdict(e['process_peak_growth_within_10pct'])})"
            )
        full = memory["full_rmd_growth"]
        if full:
            lines.append(
                f"Full RMD T={small} -> T={large}: allocator ×{_fmt(full['allocator_peak_growth_ratio'])} "
                f"(+{mb(full['allocator_peak_growth_increase_bytes'])} MB, "
                f"expected +{mb(full['expected_increase_bytes'])} MB "
                f"of stored states), process RSS ×{_fmt(full['process_peak_growth_ratio'])}"
            )
    for c in summary["compile_full_rmd"]:
        lines.append(
            f"Compile time, {c['label']}: {c['compile_seconds']:.2f} s wall ({verdict(c['met'])}), "
            f"{c['compile_cpu_seconds']:.2f} s CPU ({verdict(c['met_cpu'])}); target <= {c['target']} s"
        )
    return "\n".join(lines)


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


def plot(results: list[dict], settings: dict, path: Path) -> str:
    """Time over the floor and allocator peak of reverse mode vs K, one line per (backward, T);
    returns the file's name."""
    from experiments.common import plotting
    from experiments.common.plotting import plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 5))
    steps = sorted({r["steps"] for r in results})
    Ks, drew_memory = set(), False
    for backward, marker, style in (("recompute", "o", "-"), ("store", "^", "--"), ("auto", "s", "-")):
        for i, T in enumerate(steps):
            rows = sorted((r for r in results if r["estimator"] == "reverse" and r["steps"] == T and "error" not in r
                           and (r.get("backward") or "auto") == backward), key=lambda r: r["truncate"])
            if not rows:
                continue
            line = dict(marker=marker, ls=style, color=f"C{i}",
                        label=f"reverse{'' if backward == 'auto' else f' [{backward}]'} T={T}")
            Ks.update(r["truncate"] for r in rows)
            # CPU time: the wall-time ratio is distorted by other processes on a shared machine.
            plotting.plot_curve(ax_time, [r["truncate"] for r in rows], [r["cpu_over_floor"] for r in rows], **line)
            mem = [(r["truncate"], r["allocator_peak_growth_bytes"] / 2**20) for r in rows
                   if r["allocator_peak_growth_bytes"]]
            if mem:
                plotting.plot_curve(ax_mem, *zip(*mem), log=True, **line)
                drew_memory = True
    for ax, drew, what in ((ax_time, bool(Ks), "no reverse-mode configuration ran"),
                           (ax_mem, drew_memory, "no allocator growth measured\n(0 or unavailable at these sizes)")):
        if not drew:
            ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes)
            ax.set_yticks([])
    for ax, ylabel in ((ax_time, "time / floor (median CPU time, floor = T plain steps)"),
                       (ax_mem, "TF allocator peak growth (MB)")):
        ax.set_xscale("log")
        ax.set_xticks(sorted(Ks), [str(k) for k in sorted(Ks)])
        ax.minorticks_off()
        plotting.label_axes(ax, "K (back-propagated steps; K = T is full RMD)", ylabel)
    size = f"W {settings['num_classes']}×{settings['num_features']}, λ ∈ R^{settings['num_examples']}"
    fig.suptitle(f"K-RMD cost vs K on the hypercleaning-sized problem\n({size}; T = "
                 f"{', '.join(map(str, settings['steps']))}; median of up to {settings['repeats']} calls)")
    plotting.save_figure(fig, str(path), dpi=110)
    return path.name


SUITES = ("estimators", "online", "cnn", "metabatch", "forward")


@dataclasses.dataclass
class Config(benchmark_online.OnlineOptions, benchmark_cnn.CnnConfig, benchmark_metabatch.MetabatchOptions):
    """The estimators suite's flags, the program's, and those of the online, cnn and metabatch suites."""

    steps: Sequence[int] = option((100, 1000), "Numbers T of inner steps.")
    truncate: Sequence[int] = option((1, 5, 25, 100), "K of K-RMD (K < T; full RMD K = T is always added).")
    estimators: Sequence[str] = option(ESTIMATORS, f"Configurations to run, from {ESTIMATORS}.")
    num_examples: int = option(5000, "Training (= validation) examples; N = num_examples.")
    num_features: int = option(785, "Input features, including the constant 1.")
    num_classes: int = option(10, "Classes (rows of W).")
    learning_rate: float = option(1.0, "Inner step size γ.")
    repeats: int = option(5, "Timed calls per configuration after warm-up (median reported).")
    max_seconds_per_config: float = option(900.0, "Fewer repeats (at least 3) for slower configurations.")
    forward_hparams: int = option(8, "N for forward mode: λ restricted to the first N example weights.")
    cg_iterations: int = option(25, "CG iterations of implicit_cg.")
    max_full_steps: int = option(1000, "Run full RMD (reverse, checkpointed) only for T <= this.")
    max_forward_steps: int = option(1000, "Run forward mode only for T <= this.")
    backward: Sequence[str] = option(("recompute", "store"), "Backward passes of the 'reverse' configurations "
                                     "(hypergradient_fn's backward=; each is run and labelled [recompute] / [store]).")
    worker_timeout: int = option(7200, "Seconds before a configuration's process is killed.")
    output_dir: str = option("out/benchmark", "Where results.json and benchmark.png are written.")
    seed: int = option(0, "Seed of the random data.")
    suites: Sequence[str] = option(("estimators", "online"), "estimators: the Table 1 problem above; online: one "
                                   "online hyper-iteration of a CNN over T plain Keras train steps "
                                   "(experiments/benchmarks/online.py); cnn: K-RMD vs full RMD time and memory on a "
                                   "6.4M-parameter CNN (experiments/benchmarks/cnn.py); metabatch: the meta-batch "
                                   "sweep of the one-shot network (experiments/benchmarks/metabatch.py); forward: one "
                                   "forward-mode step with N = 6 carried tangents over one plain step of a CNN "
                                   "(experiments/benchmarks/forward.py).")
    worker: Optional[str] = option(None, "JSON configuration to measure in this process.", internal=True)
    preset: str = "full"


# full: the sizes and budgets above; quick: tiny sizes and budgets, to test the program (explicit flags win).
PRESETS = {"full": {}, "quick": dict(num_examples=48, num_features=9, num_classes=3, repeats=2, forward_hparams=2,
                                     cg_iterations=3, steps=(4, 8), truncate=(1, 2, 4),
                                     **benchmark_cnn.QUICK_FLAGS)}


def estimator_settings(cfg: Config) -> dict:
    """The estimators suite's settings (results.json's "settings"); ValueError names a bad flag."""
    settings = {name: list(getattr(cfg, name)) if name in ("steps", "truncate", "estimators", "backward")
                else getattr(cfg, name) for name in (
                    "steps", "truncate", "estimators", "num_examples", "num_features", "num_classes", "learning_rate",
                    "repeats", "max_seconds_per_config", "forward_hparams", "cg_iterations", "max_full_steps",
                    "max_forward_steps", "backward", "seed")}
    settings["quick"] = cfg.preset == "quick"
    unknown = sorted(set(settings["estimators"]) - set(ESTIMATORS))
    if unknown:
        raise ValueError(f"--estimators: unknown {unknown}; choose from {ESTIMATORS}")
    for name in ("steps", "truncate"):
        if any(v < 1 for v in settings[name]):
            raise ValueError(f"--{name} must be positive integers, got {settings[name]}")
    if set(settings["backward"]) - {"auto", "store", "recompute"}:
        raise ValueError(f"--backward: choose from auto, store, recompute, got {settings['backward']}")
    if settings["forward_hparams"] > settings["num_examples"]:
        raise ValueError("--forward_hparams cannot exceed --num_examples")
    return settings


def suite_settings(cfg: Config) -> dict:
    """The settings of every suite --suites asks for, in the order of SUITES (ValueError names a bad flag)."""
    unknown = sorted(set(cfg.suites) - set(SUITES))
    if unknown:
        raise ValueError(f"--suites: unknown {unknown}; choose from {', '.join(SUITES)}")
    quick = cfg.preset == "quick"
    make = {"estimators": estimator_settings, "online": benchmark_online.settings_of,
            "cnn": lambda cfg: benchmark_cnn.make_settings(cfg, quick), "metabatch": benchmark_metabatch.settings_of,
            "forward": lambda cfg: benchmark_forward.make_settings(cfg.repeats, quick)}
    return {suite: make[suite](cfg) for suite in SUITES if suite in cfg.suites}


def run_suites(cfg: Config, data: Any, ctx: program.Run) -> dict:
    """Runs every suite --suites asks for; each writes its report to cfg.output_dir."""
    out = cfg.output_dir
    run = {"estimators": lambda s: run_benchmark(s, configurations(s), out, cfg.worker_timeout),
           "online": lambda s: benchmark_online.run(s, out),
           "cnn": lambda s: benchmark_cnn.run(s, out, cfg.worker_timeout),
           "metabatch": lambda s: benchmark_metabatch.run(s, out),
           "forward": lambda s: benchmark_forward.run(s, out)}
    return {suite: run[suite](settings) for suite, settings in suite_settings(cfg).items()}


def run_benchmark(settings: dict, configs: list, output_dir: str, timeout: float = 7200) -> dict:
    """Measures every configuration (one fresh process each), writes results.json and the figure."""
    report = SuiteReport("estimators", output_dir, "results.json")
    machine = report.environment
    print(f"{len(configs)} configurations, one fresh process each; machine: {machine['platform']}, "
          f"{machine['cpu_count']} CPUs, TF {machine['tensorflow']}", flush=True)
    results = run_each(
        configs, "experiments.benchmark", "worker", timeout,
        describe=lambda c: f"T={c['steps']} {c['label']}",
        report=lambda r: (f"{r['median_seconds']:.3f} s = {r['time_over_floor']:.2f}× floor "
                          f"(CPU {r['cpu_over_floor']:.2f}×), compile {r['compile_seconds']:.1f} s, "
                          f"alloc peak {mb(r['allocator_peak_growth_bytes'])} MB"))
    summary = summarize(results, settings)
    problem = {
        "description": "hypercleaning-sized random problem (paper §4.2.1): g = mean σ(λ_i) CE + 0.001‖W‖², "
                       "f = mean validation CE, gradient descent",
        "num_params": settings["num_classes"] * settings["num_features"],
        "num_hparams": settings["num_examples"],
        "forward_mode": f"λ restricted to the first {settings['forward_hparams']} example weights, "
                        "the others frozen (same M and inner cost)",
        "dtype": "float32",
        "jit_compile": True,
    }
    return report.write(settings, results, format_table(results), summary=summary,
                        summary_text=format_summary(summary), problem=problem,
                        figures=lambda out: [plot(results, settings, Path(out) / "benchmark.png")])


PROGRAM = program.Program("benchmark", Config, PRESETS, experiment=run_suites, prepare=program.checked(suite_settings),
                          results_file=None, worker=("worker", measure))


if __name__ == "__main__":
    program.start(PROGRAM)
