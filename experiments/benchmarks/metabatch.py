r"""Meta-batch sweep of BilevelTrainer(meta_batch=True) on the one-shot network (issue #9 §3).

One hyper-iteration of the Fig. 8 network of experiments/models/fewshot.py (5-way 1-shot, 15
query examples per class, 28×28, 64 channels; hyper model = blocks 1–2, inner model = blocks
3–4 + classifier, K-RMD with learned ρ, c, γ), for every meta-batch size B, with and without
XLA, for T inner steps. All configurations of one T are built in ONE process and timed
alternately (so that machine load hits all alike); medians of wall time. Reported:

    per-task time   = time(one hyper-iteration) / B
    batching ratio  = per-task time at B / per-task time at B = 1 (same path, same XLA setting)
    XLA ratio       = time with XLA / time without XLA (same path, same B)

Targets of the issue (reported, never asserted): under XLA the batching ratio at B = 16 is
≤ 0.5, and the XLA ratio is ≤ 1 at every B. `--metabatch_paths` picks the trainer's meta-batch
paths to time: "stacked" (the default: one inner loop over all tasks, the inner model batched
over tasks) and/or "map_fn" (the old tf.map_fn over tasks, for comparison; slow under XLA).

  python -m experiments.benchmark --suites=metabatch     # the same, from the benchmark program
  python -m experiments.benchmarks.metabatch              # T in {10, 50}, B in {1, 4, 16}
  python -m experiments.benchmarks.metabatch --preset=quick  # tiny sizes (used by the tests)
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from typing import Any, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from experiments.models import fewshot as fsm  # noqa: E402
from experiments.benchmarks.report import SuiteReport, verdict  # noqa: E402
from experiments.common import program  # noqa: E402
from experiments.common.memory import PeakMemory, mib  # noqa: E402
from experiments.common.config import option  # noqa: E402
from experiments.common.timing import block, wall_seconds  # noqa: E402

BATCHING_TARGET = 0.5  # per-task time at the largest B over B = 1, under XLA
XLA_TARGET = 1.0  # time with XLA over time without


def task_data(settings: dict, num_tasks: int) -> tf.data.Dataset:
    """A repeated meta-batch of random N-way K-shot tasks (timing does not need real images)."""
    n, k, q, size = settings["n_way"], settings["k_shot"], settings["n_query"], settings["image_size"]
    rng = np.random.default_rng(settings["seed"])
    support = rng.normal(size=(num_tasks, n * k, size, size, 1)).astype("float32")
    query = rng.normal(size=(num_tasks, n * q, size, size, 1)).astype("float32")
    labels = lambda per_class: np.tile(np.repeat(np.arange(n), per_class), (num_tasks, 1))  # noqa: E731
    return tf.data.Dataset.from_tensors(((support, labels(k)), (query, labels(q)))).repeat()


def build(settings: dict, steps: int, num_tasks: int, jit_compile: bool, path: str) -> dict:
    """A compiled trainer on a fresh Fig. 8 network (the same seeds in every configuration)."""
    size, channels = settings["image_size"], settings["channels"]
    hyper = fsm.build_hyper_model(channels=channels, image_size=size, seed=settings["seed"])
    inner = fsm.build_inner_model(settings["n_way"], channels=channels, input_size=size // 4, seed=settings["seed"] + 10)
    problem = fsm.FewShotProblem(hyper, inner)
    truncate = min(settings["truncate"], steps)
    trainer = problem.build_trainer(steps=steps, truncate=None if truncate == steps else truncate,
                                    init_rho=0.01, init_gamma=0.1, meta_batch_mode=path)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=jit_compile)
    data = task_data(settings, num_tasks)
    trainer.build_from_spec(data.element_spec)
    step = trainer.make_train_function()
    iterator = iter(data)
    return {"trainer": trainer, "call": lambda: block(step(iterator)),
            "num_params": int(sum(np.prod(v.shape) for v in inner.trainable_variables))}


def measure(steps: int, settings: dict) -> list[dict]:
    """Every (path, XLA, B) configuration of one T, built and timed alternately in this process."""
    configs = [(path, jit, b) for path in settings["paths"] for jit in (True, False) for b in settings["meta_batches"]]
    built = {c: build(settings, steps, c[2], c[1], c[0]) for c in configs}
    first = {c: wall_seconds(built[c]["call"]) for c in configs}  # trace + compile + first call
    memory = {}
    for c in configs:
        with PeakMemory() as peak:
            built[c]["call"]()
        memory[c] = peak.allocator_peak_growth
    times = {c: [] for c in configs}
    for _ in range(settings["repeats"]):
        for c in configs:
            times[c].append(wall_seconds(built[c]["call"]))
    median = {c: statistics.median(times[c]) for c in configs}
    smallest = min(settings["meta_batches"])
    rows = []
    for path, jit, b in configs:
        per_task = median[(path, jit, b)] / b
        rows.append({
            "T": steps, "K": min(settings["truncate"], steps), "meta_batch": b, "jit_compile": jit, "path": path,
            "path_used": built[(path, jit, b)]["trainer"].meta_batch_path,
            "median_seconds": median[(path, jit, b)], "per_task_seconds": per_task,
            "times_seconds": times[(path, jit, b)], "first_call_seconds": first[(path, jit, b)],
            "allocator_peak_growth_bytes": memory[(path, jit, b)],
            "per_task_over_smallest_batch": per_task / (median[(path, jit, smallest)] / smallest),
            "xla_over_no_xla": median[(path, True, b)] / median[(path, False, b)],
            "num_inner_params": built[(path, jit, b)]["num_params"],
        })
    return rows


def summary(rows: list[dict], settings: dict) -> list[dict]:
    """The issue's targets per (T, path): batching ratio at the largest B under XLA, XLA ratio at every B."""
    out = []
    largest = max(settings["meta_batches"])
    for steps in settings["steps"]:
        for path in settings["paths"]:
            mine = [r for r in rows if r["T"] == steps and r["path"] == path]
            batching = next(r["per_task_over_smallest_batch"] for r in mine if r["jit_compile"] and r["meta_batch"] == largest)
            xla = {r["meta_batch"]: r["xla_over_no_xla"] for r in mine if r["jit_compile"]}
            out.append({
                "T": steps, "path": path, "meta_batch": largest,
                "xla_batching_ratio": batching, "batching_met": batching <= BATCHING_TARGET,
                "xla_over_no_xla": xla, "xla_met": all(v <= XLA_TARGET for v in xla.values()),
            })
    return out


def format_table(rows: list[dict], checks: list[dict]) -> str:
    lines = [
        "  T   K | path    | XLA |  B | step ms  | per-task ms | per-task / B=1 | XLA / no-XLA | peak MB",
        "-" * 96,
    ]
    for r in rows:
        lines.append(
            f"{r['T']:3d} {r['K']:3d} | {r['path_used'] or r['path']:7s} | {'on ' if r['jit_compile'] else 'off'} | "
            f"{r['meta_batch']:2d} | {1e3 * r['median_seconds']:8.1f} | {1e3 * r['per_task_seconds']:11.1f} | "
            f"{r['per_task_over_smallest_batch']:14.2f} | {r['xla_over_no_xla']:12.2f} | {mib(r['allocator_peak_growth_bytes'])}"
        )
    lines.append("Targets (XLA): per-task at the largest B <= 0.5 x per-task at B=1; XLA <= no-XLA at every B")
    for c in checks:
        xla = ", ".join(f"B={b}: {v:.2f}" for b, v in c["xla_over_no_xla"].items())
        lines.append(
            f"  T={c['T']} {c['path']}: batching {c['xla_batching_ratio']:.2f} {verdict(c['batching_met'])}; "
            f"XLA/no-XLA {xla} {verdict(c['xla_met'])}"
        )
    return "\n".join(lines)


def make_settings(steps: list, meta_batches: list, paths: list, truncate: int, repeats: int, quick: bool) -> dict:
    """--quick: a tiny network and budgets (the program's test)."""
    unknown = sorted(set(paths) - {"stacked", "map_fn"})
    if unknown:
        raise ValueError(f"--metabatch_paths: unknown {unknown}; choose from stacked, map_fn")
    settings = {
        "steps": [int(t) for t in steps], "meta_batches": [int(b) for b in meta_batches], "paths": list(paths),
        "truncate": int(truncate), "repeats": repeats, "seed": 0,
        "n_way": 5, "k_shot": 1, "n_query": 15, "image_size": 28, "channels": 64,
    }
    if quick:
        settings.update(steps=[2], meta_batches=[1, 2], truncate=1, repeats=2, n_query=2, image_size=16, channels=4)
    return settings


def run(settings: dict, output_dir: str) -> dict:
    report = SuiteReport("metabatch", output_dir, "metabatch_results.json")
    rows = [row for steps in settings["steps"] for row in measure(steps, settings)]
    checks = summary(rows, settings)
    return report.write(settings, rows, format_table(rows, checks), summary=checks)


@dataclasses.dataclass
class MetabatchOptions:
    """The flags this suite adds to `python -m experiments.benchmark` too."""

    metabatch_steps: Sequence[int] = option((10, 50), "T values of the meta-batch sweep.")
    metabatch_sizes: Sequence[int] = option((1, 4, 16), "Meta-batch sizes B of the sweep.")
    metabatch_paths: Sequence[str] = option(("stacked",), "Trainer meta-batch paths to time: stacked, map_fn.")
    metabatch_truncate: int = option(10, "K of the sweep's K-RMD (min(K, T); K = T is full RMD).")


@dataclasses.dataclass
class Config(MetabatchOptions):
    repeats: int = option(5, "Timed calls per configuration after warm-up (median reported).")
    output_dir: str = option("out/benchmark", "Where metabatch_results.json is written.")
    preset: str = "full"


def settings_of(cfg: Any) -> dict:
    """The suite's settings from a Config with its flags and --repeats (ValueError names a bad flag)."""
    return make_settings(cfg.metabatch_steps, cfg.metabatch_sizes, cfg.metabatch_paths, cfg.metabatch_truncate,
                         cfg.repeats, cfg.preset == "quick")


# --preset=quick: tiny sizes and budgets, to test the program.
PROGRAM = program.suite("benchmarks.metabatch", Config, settings_of, run)


if __name__ == "__main__":
    program.start(PROGRAM)
