r"""Time and memory of reverse-mode hypergradients on a CNN big enough that O(MK) memory matters.

The cnn suite of the benchmark: K-RMD, full and checkpointed RMD (backward "recompute" and
"store") on a 6.4M-parameter CNN over random CIFAR-sized images, each configuration in a fresh
process; writes cnn_results.json to --output_dir. What it measures: RESULTS.md, "Benchmarks:
what is measured"; the numbers: README, "Benchmark".

  python -m experiments.benchmark --suites=cnn            # the full suite
  python -m experiments.benchmarks.cnn --preset=quick      # tiny CNN (tests)
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, NamedTuple, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_bilevel as tfb  # noqa: E402
from experiments.benchmarks.report import SuiteReport, error_row, mb, ratio_of, verdict  # noqa: E402
from experiments.common import program  # noqa: E402
from experiments.common.config import option  # noqa: E402
from experiments.common.memory import stored_states  # noqa: E402
from experiments.common.subprocesses import run_each  # noqa: E402
from experiments.common.timing import against_floor  # noqa: E402
from tf_bilevel.keras import losses  # noqa: E402
MEMORY_GOAL, GOAL_TRUNCATE = 10.0, 5  # full RMD ≥ 10× the allocator peak of 5-RMD at the same T (issue #9): reported only
MEMORY_TOLERANCE = 0.10  # K-RMD peak at the largest T within 10% of the smallest T: "flat"

FULL_SIZE = dict(image_size=32, batch_size=128, filters=[16, 32, 128, 512, 1024], dense=[1024], num_classes=10)
QUICK_SIZE = dict(image_size=8, batch_size=8, filters=[2, 4], dense=[8], num_classes=3)


# ----------------------------------------------------------------------------------------
# The problem.
# ----------------------------------------------------------------------------------------


def patch_conv(x: tf.Tensor, kernel: tf.Tensor, stride: int) -> tf.Tensor:
    """SAME convolution (= tf.nn.conv2d(x, kernel, stride, "SAME")) as one matmul over the
    k×k patches, gathered by strided slices: no convolution op, so that neither it nor its
    first and second derivatives hit XLA:CPU's slow convolutions inside while loops."""
    k, size = kernel.shape[0], x.shape[1]
    out = -(-size // stride)
    pad = max((out - 1) * stride + k - size, 0)
    x = tf.pad(x, [[0, 0], [pad // 2, pad - pad // 2], [pad // 2, pad - pad // 2], [0, 0]])
    end = stride * (out - 1) + 1
    patches = tf.concat([x[:, i:i + end:stride, j:j + end:stride, :] for i in range(k) for j in range(k)], axis=-1)
    y = tf.reshape(patches, [-1, patches.shape[-1]]) @ tf.reshape(kernel, [-1, kernel.shape[-1]])
    return tf.reshape(y, [x.shape[0], out, out, kernel.shape[-1]])


def _conv2d(x: tf.Tensor, kernel: tf.Tensor, stride: int) -> tf.Tensor:
    return tf.nn.conv2d(x, kernel, stride, "SAME")


CONVOLUTIONS = {"patches": patch_conv, "conv2d": _conv2d}


class Problem(NamedTuple):
    inner_loss: Callable[..., tf.Tensor]
    outer_loss: Callable[..., tf.Tensor]
    params: dict  # layer name -> weight tensor
    hparams: tf.Tensor  # log weight decay of each kernel
    inner_batch: dict
    outer_batch: dict


def cnn_params(image_size: int, filters: list, dense: list, num_classes: int, seed: int) -> dict:
    """He-initialized weights of the CNN: 3×3 stride-2 convolutions, then dense layers."""
    rng = np.random.default_rng(seed)
    params, channels, size = {}, 3, image_size

    def add(name, shape, fan_in):
        params[f"{name}/kernel"] = tf.constant(rng.normal(0, math.sqrt(2 / fan_in), shape).astype(np.float32))
        params[f"{name}/bias"] = tf.zeros(shape[-1:], tf.float32)

    for i, width in enumerate(filters):
        add(f"conv{i}", (3, 3, channels, width), 9 * channels)
        channels, size = width, -(-size // 2)
    units = [size * size * channels, *dense, num_classes]
    for j in range(len(units) - 1):
        add(f"dense{j}", (units[j], units[j + 1]), units[j])
    return params


def cnn_problem(
    image_size: int, batch_size: int, filters: list, dense: list, num_classes: int, seed: int,
    conv: str = "patches", weight_decay: float = 5e-4,
) -> Problem:
    """The benchmark's bilevel problem (module docstring) on random data, λ_l = log(weight_decay)."""
    convolve = CONVOLUTIONS[conv]
    num_convs, num_dense = len(filters), len(dense) + 1
    params = cnn_params(image_size, filters, dense, num_classes, seed)
    kernels = [name for name in params if name.endswith("/kernel")]
    rng = np.random.default_rng(seed + 1)

    def batch():
        return {
            "x": tf.constant(rng.standard_normal((batch_size, image_size, image_size, 3)).astype(np.float32)),
            "y": tf.constant(rng.integers(0, num_classes, batch_size).astype(np.int32)),
        }

    def logits(w, x):
        h = x
        for i in range(num_convs):
            h = tf.nn.relu(tf.nn.bias_add(convolve(h, w[f"conv{i}/kernel"], 2), w[f"conv{i}/bias"]))
        h = tf.reshape(h, [h.shape[0], -1])
        for j in range(num_dense):
            h = tf.nn.bias_add(h @ w[f"dense{j}/kernel"], w[f"dense{j}/bias"])
            h = tf.nn.relu(h) if j < num_dense - 1 else h
        return h

    def cross_entropy(w, data):  # the library's log_softmax form, one-hot targets (no scatter in the backward pass)
        return tf.reduce_mean(losses.categorical_crossentropy(tf.one_hot(data["y"], num_classes), logits(w, data["x"])))

    def inner_loss(w, log_decays, data):
        penalty = tf.add_n([tf.exp(log_decays[i]) * tf.reduce_sum(tf.square(w[name])) for i, name in enumerate(kernels)])
        return cross_entropy(w, data) + penalty

    def outer_loss(w, log_decays, data):
        return cross_entropy(w, data)

    hparams = tf.fill([len(kernels)], float(np.log(weight_decay)))
    return Problem(inner_loss, outer_loss, params, hparams, batch(), batch())


def num_params(params: dict) -> int:
    return int(sum(v.shape.num_elements() for v in params.values()))


# ----------------------------------------------------------------------------------------
# One configuration, measured in the current (fresh) process.
# ----------------------------------------------------------------------------------------


def build(config: dict, problem: Problem) -> tuple[tfb.api.Hypergradient, Callable, Callable]:
    """(hg, hypergradient call, floor call), compiled with XLA."""
    kind, T, K = config["estimator"], config["steps"], config["truncate"]
    hg = tfb.hypergradient_fn(
        problem.inner_loss, problem.outer_loss, steps=T, learning_rate=config["learning_rate"],
        truncate=None if K in (None, T) else K, estimator="reverse" if kind == "floor" else kind,
        backward=config["backward"] or "auto", jit_compile=True,
    )
    floor = lambda: hg.solve(problem.params, problem.hparams, problem.inner_batch)  # noqa: E731
    if kind == "floor":
        return hg, floor, floor
    return hg, (lambda: hg(problem.params, problem.hparams, problem.inner_batch, problem.outer_batch)), floor


def auto_choice(problem: Problem, config: dict) -> dict:
    """What backward="auto" picks for this K: a trace of the estimator (nothing is compiled or run)."""
    T, K = config["steps"], config["truncate"]
    hg = tfb.hypergradient_fn(
        problem.inner_loss, problem.outer_loss, steps=T, learning_rate=config["learning_rate"],
        truncate=None if K == T else K, backward="auto",
    )
    args = (problem.params, problem.hparams, problem.inner_batch, problem.outer_batch)
    tf.function(hg.compute, autograph=False).get_concrete_function(*args)
    return {"auto_backward": hg.backward_used, "step_residual_bytes": hg.step_residual_bytes,
            "step_storable": hg.step_storable, "memory_budget_bytes": hg.memory_budget}


def measure(config: dict) -> dict:
    """Times and memory of one configuration (call in a fresh process)."""
    problem = cnn_problem(**{k: config[k] for k in FULL_SIZE}, seed=config["seed"], conv=config["conv"])
    np.asarray(tf.reduce_sum(problem.inner_batch["x"]))  # start the TF runtime before measuring
    is_floor = config["estimator"] == "floor"
    run = against_floor(lambda: build(config, problem), is_floor, lambda warm, floor: config["repeats"])
    hg, first_out = run.built, run.first_out
    K = config["steps"] if config["truncate"] is None else config["truncate"]  # None: full, as build() reads it
    M, states = num_params(problem.params), stored_states(config["estimator"], K)
    result = {
        **config,
        **run.row(),
        "backward_used": None if is_floor else hg.backward_used,
        "num_params": M,
        "num_hparams": int(problem.hparams.shape.num_elements()),
        "stored_states": states,
        "stored_state_bytes": None if states is None else states * M * 4,  # None (e.g. neumann): "-" in the table
        "outer_value": None if is_floor else float(first_out[0]),
        "hypergrad_norm": None if is_floor else float(tfb.diagnostics.global_norm(first_out[1:])),
    }
    if config["estimator"] == "reverse":
        result.update(auto_choice(problem, config))
    return result


# ----------------------------------------------------------------------------------------
# The driver: one subprocess per configuration, then the table, summary and JSON.
# ----------------------------------------------------------------------------------------


def configurations(settings: dict) -> list[dict]:
    base = {key: settings[key] for key in (*FULL_SIZE, "learning_rate", "repeats", "seed", "conv")}
    configs = []

    def add(estimator, T, K, backward, label):
        configs.append({**base, "estimator": estimator, "steps": T, "truncate": K, "backward": backward, "label": label})

    for T in settings["steps"]:
        add("floor", T, None, None, "floor (hg.solve)")
        for K in sorted(k for k in settings["truncate"] if k < T):
            for backward in settings["backward"]:
                add("reverse", T, K, backward, f"{K}-RMD [{backward}]")
        if T <= settings["max_full_steps"]:
            for backward in settings["backward"]:
                if backward != "store" or T <= settings["max_store_full_steps"]:
                    add("reverse", T, T, backward, f"full RMD [{backward}]")
            add("checkpointed", T, T, "recompute", "checkpointed full RMD")
    return configs


def format_table(results: list[dict]) -> str:
    lines = ["| T | configuration | backward used (auto) | median s | × floor | compile s | alloc peak MB "
             "| RSS peak MB | stored states MB |", "|" + "---|" * 9]
    for r in results:
        if "error" in r:
            lines.append(error_row(r, r["steps"], r["label"], 9))
            continue
        used = r["backward_used"] or "-"
        if r.get("auto_backward"):
            used += f" ({r['auto_backward']})"
        lines.append(
            f"| {r['steps']} | {r['label']} | {used} | {r['median_seconds']:.2f} | {r['time_over_floor']:.2f} | "
            f"{r['compile_seconds']:.1f} | {mb(r['allocator_peak_growth_bytes'])} | "
            f"{mb(r['process_peak_growth_bytes'])} | {mb(r['stored_state_bytes'])} |"
        )
    return "\n".join(lines)


def _find(results: list, estimator: str, T: int, K: int, backward: str) -> Optional[dict]:
    for r in results:
        if (r["estimator"], r["steps"], r["truncate"], r["backward"]) == (estimator, T, K, backward) and "error" not in r:
            return r
    return None


def summarize(results: list[dict], settings: dict) -> dict:
    """K-RMD peak memory at the largest vs the smallest T (flat: Table 1), full RMD's growth in T
    and full RMD / 5-RMD at each T (goal ≥ 10; the smallest K when 5 is not run), per backward mode."""
    steps = sorted(settings["steps"])
    small, large = steps[0], steps[-1]
    key = "allocator_peak_growth_bytes"
    goal_K = GOAL_TRUNCATE if GOAL_TRUNCATE in settings["truncate"] else min(settings["truncate"])
    flat, growth, goal = [], [], []
    for backward in settings["backward"]:
        for K in sorted(k for k in settings["truncate"] if k < small):
            a, b = _find(results, "reverse", small, K, backward), _find(results, "reverse", large, K, backward)
            if a and b and large > small:
                ratio = ratio_of(b[key], a[key])
                flat.append({"backward": backward, "truncate": K, f"T={small}": a[key], f"T={large}": b[key],
                             "ratio": ratio, "flat": None if ratio is None else abs(ratio - 1) <= MEMORY_TOLERANCE})
        full = [r for T in steps if (r := _find(results, "reverse", T, T, backward))]
        if len(full) >= 2:
            growth.append({"backward": backward, "steps": [r["steps"] for r in full], "peaks": [r[key] for r in full],
                           "ratio": ratio_of(full[-1][key], full[0][key])})
        for T in steps:
            a, b = _find(results, "reverse", T, T, backward), _find(results, "reverse", T, goal_K, backward)
            if a and b:
                ratio = ratio_of(a[key], b[key])
                goal.append({"backward": backward, "steps": T, "truncate": goal_K, "full_rmd": a[key], "krmd": b[key], "ratio": ratio,
                             "goal": MEMORY_GOAL, "met": None if ratio is None else ratio >= MEMORY_GOAL})
    return {"krmd_flat_in_T": flat, "full_rmd_growth": growth, "full_over_5rmd": goal}


def format_summary(summary: dict) -> str:
    lines = ["", "Allocator peak of K-RMD at the largest T / the smallest T (flat: within 10%):"]
    for e in summary["krmd_flat_in_T"]:
        flat = "n/a" if e["flat"] is None else "flat" if e["flat"] else "NOT flat"
        lines.append(f"  K={e['truncate']:<3} [{e['backward']}] {e['ratio'] or float('nan'):.3f} ({flat})")
    for e in summary["full_rmd_growth"]:
        peaks = ", ".join(f"T={T}: {mb(p)} MB" for T, p in zip(e["steps"], e["peaks"]))
        lines.append(f"Full RMD [{e['backward']}] allocator peak {peaks} (×{e['ratio'] or float('nan'):.2f})")
    for e in summary["full_over_5rmd"]:
        lines.append(f"Full RMD / {e['truncate']}-RMD allocator peak at T={e['steps']} [{e['backward']}]: "
                     f"{e['ratio'] or float('nan'):.1f}× (goal >= {e['goal']:.0f}×: {verdict(e['met'])})")
    return "\n".join(lines)


def run(settings: dict, output_dir: str, timeout: float = 7200.0) -> dict:
    """Measures every configuration (one fresh process each) and writes cnn_results.json."""
    report = SuiteReport("cnn", output_dir, "cnn_results.json")
    configs = configurations(settings)
    M = num_params(cnn_params(settings["image_size"], settings["filters"], settings["dense"], settings["num_classes"], 0))
    print(f"cnn suite: M = {M} inner parameters, {len(configs)} configurations, one fresh process each", flush=True)
    results = run_each(
        configs, "experiments.benchmarks.cnn", "cnn_worker", timeout, describe=lambda c: f"T={c['steps']} {c['label']}",
        report=lambda r: (f"{r['median_seconds']:.2f} s = {r['time_over_floor']:.2f}× floor, "
                          f"alloc peak {mb(r['allocator_peak_growth_bytes'])} MB, "
                          f"RSS peak {mb(r['process_peak_growth_bytes'])} MB"))
    summary = summarize(results, settings)
    return report.write(
        settings, results, format_table(results), summary=summary, summary_text=format_summary(summary),
        problem={"description": __doc__.split("\n\n")[1], "num_params": M, "dtype": "float32", "jit_compile": True})


@dataclasses.dataclass
class CnnConfig:
    """The flags this suite adds to `python -m experiments.benchmark` too."""

    cnn_steps: Sequence[int] = option((100, 500), "cnn suite: numbers T of inner steps.")
    cnn_truncate: Sequence[int] = option((1, 5, 25), "cnn suite: K of K-RMD (K < T; full RMD K = T is added).")
    cnn_backward: Sequence[str] = option(("recompute", "store"),
                                         "cnn suite: backward passes of the reverse configurations.")
    cnn_max_full_steps: int = option(500, "cnn suite: full and checkpointed RMD only for T <= this.")
    cnn_max_store_full_steps: int = option(100, "cnn suite: full RMD with backward='store' only for T <= this (it "
                                           "keeps every step's intermediates: ~100 MB per step on the full CNN).")
    cnn_learning_rate: float = option(0.02, "cnn suite: inner step size.")
    cnn_repeats: int = option(3, "cnn suite: timed calls per configuration after warm-up (median).")
    cnn_conv: str = option("patches", "cnn suite: 'patches' (matmul over patches) or 'conv2d' (tf.nn.conv2d).")
    cnn_worker: Optional[str] = option(None, "JSON configuration to measure in this process.", internal=True)


# --quick: a tiny CNN (QUICK_SIZE, at most 2 repeats) with these flags, unless given explicitly.
QUICK_FLAGS = {"cnn_steps": (4, 8), "cnn_truncate": (1, 2)}


def make_settings(cfg: Any, quick: bool) -> dict:
    """The suite's settings from a Config with the --cnn_* flags (ValueError names a bad flag)."""
    settings = {
        **(QUICK_SIZE if quick else FULL_SIZE),
        "steps": list(cfg.cnn_steps),
        "truncate": list(cfg.cnn_truncate),
        "backward": list(cfg.cnn_backward),
        "max_full_steps": cfg.cnn_max_full_steps,
        "max_store_full_steps": cfg.cnn_max_store_full_steps,
        "learning_rate": cfg.cnn_learning_rate,
        "repeats": min(cfg.cnn_repeats, 2) if quick else cfg.cnn_repeats,
        "conv": cfg.cnn_conv,
        "seed": 0,
        "quick": quick,
    }
    unknown = sorted(set(settings["backward"]) - {"recompute", "store", "auto"})
    if unknown:
        raise ValueError(f"--cnn_backward: unknown {unknown}; choose from recompute, store, auto")
    if settings["conv"] not in CONVOLUTIONS:
        raise ValueError(f"--cnn_conv must be one of {sorted(CONVOLUTIONS)}, got {settings['conv']!r}")
    for name in ("steps", "truncate"):
        if not settings[name] or any(v < 1 for v in settings[name]):
            raise ValueError(f"--cnn_{name} must be positive integers, got {settings[name]}")
    return settings


@dataclasses.dataclass
class Config(CnnConfig):
    output_dir: str = option("out/benchmark", "Where cnn_results.json is written.")
    preset: str = "full"


def settings_of(cfg: Any) -> dict:
    return make_settings(cfg, cfg.preset == "quick")


# --preset=quick: a tiny CNN and budgets, to test the program.
PROGRAM = program.suite("benchmarks.cnn", Config, settings_of, run, quick_flags=QUICK_FLAGS,
                        worker=("cnn_worker", measure))


if __name__ == "__main__":
    program.start(PROGRAM)
