r"""One-shot classification (paper §4.3, Table 4, Fig. 7; appendix G.3) with K-RMD.

Meta-learns a hyper-representation (two conv blocks) and per-task regularization for 5-way
1-shot tasks with tf_bilevel.BilevelTrainer, for several truncations K and a short-horizon
baseline; prints Table 4, writes results.json and the Fig. 7 PNG to --output_dir and exports the
hyper-representation as a SavedModel. A killed run continues when the same command is rerun.
Datasets, evaluation, resumption and the measured results: RESULTS.md, "One-shot classification".

  tfb-omniglot                            # the paper (needs tfds omniglot)
  tfb-omniglot --dataset=kanji_strokes    # offline, Omniglot-shaped: 1623 characters x 20 drawers
                                          # rendered from Debian python3-kanjidraw's strokes
  tfb-omniglot --dataset=fashion_mnist    # offline, real data
  tfb-omniglot --preset=quick --dataset=mnist
  (or python -m experiments.omniglot ...)
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from experiments.data import tfds_offline
from experiments.common import program
from experiments.models import fewshot as fsm
from experiments.common.config import option, parse_truncate
from experiments.common.keras_resume import MethodStore, PauseOnce, ResumableRecord
from experiments.common.methods import method_label, method_name, method_styles
from experiments.common.run_state import parse_pause_after
from experiments.common.timing import interleaved_median_seconds, phase

DATASETS = ("omniglot", "kanji_strokes", "mnist", "fashion_mnist")
# Omniglot-shaped sets (1623 characters, the paper's split, no rotations).
CHARACTER_SETS = ("omniglot", "kanji_strokes")
# Table 4 of the paper (Omniglot, 5-way 1-shot): accuracy %, hyper-iterations, s/iter.
PAPER_TABLE4 = [{"method": m, "accuracy": a, "iterations": i, "sec_per_iter": t} for m, a, i, t in (
    ("1-RMD", 95.6, 5000, 0.4), ("10-RMD", 96.3, 5000, 0.7), ("25-RMD", 96.1, 5000, 1.3), ("Full RMD", 95.8, 5000, 2.2),
    ("1-RMD", 97.7, 15000, 0.4), ("10-RMD", 97.8, 15000, 0.7), ("Short horizon", 96.6, 15000, 0.1))]


@dataclasses.dataclass(frozen=True)
class Config:
    """The run's settings; one flag per field (flag = field name)."""
    dataset: str = option("omniglot", "Meta-learning dataset (omniglot = the paper; kanji_strokes = an offline "
                          "Omniglot-shaped set rendered from Debian python3-kanjidraw, see "
                          "experiments/data/kanji_strokes.py).", choices=DATASETS)
    n_way: int = option(5, "Classes per task.")
    k_shot: int = option(1, "Training (support) examples per class.")
    n_query: int = option(15, "Validation (query) examples per class.")
    inner_steps: int = option(50, "T, inner gradient steps per task.")
    # Each method has its own state: another set of methods resumes the stored ones.
    truncate: Sequence[str] = option(("1", "10", "25", "full"), "K values; 'full' = full RMD (K = T).", result=False)
    short_horizon: bool = option(True, "Also run the short-horizon baseline (full RMD, T = 1).", result=False)
    meta_batch_size: int = option(4, "Tasks per hyper-iteration.")
    hyper_iterations: int = option(5000, "Hyper-iterations per run.")
    outer_lr: float = option(1e-3, "Adam learning rate on the raw hyperparameters.")
    init_inner_lr: float = option(0.1, "Initial γ.")
    init_rho: float = option(0.01, "Initial ρ_j.")
    channels: int = option(64, "Kernels per conv layer (Fig. 8: 64).")
    image_size: int = option(28, "Images are resized to this (Omniglot: 28).")
    class_split: Optional[Sequence[int]] = option(
        None, "Classes in meta-train, meta-val, meta-test (before rotations); default 1200,100,323 for omniglot "
        "and kanji_strokes, 5,0,5 for (fashion_)mnist.")
    rotations: Optional[bool] = option(None, "Add 90/180/270° rotations as new classes (default: off for omniglot "
                                       "and kanji_strokes as in the paper, on for (fashion_)mnist).")
    eval_tasks: Optional[int] = option(None, "Meta-test tasks for the final accuracy, with a 95% interval (default: "
                                       "120 as the paper; 600 for kanji_strokes).")
    curve_eval_tasks: int = option(40, "Meta-test tasks for the accuracy curve (Fig. 7, plot 1).")
    eval_every: int = option(250, "Evaluate the accuracy curve every N hyper-iterations (0: never); also the "
                             "checkpoint interval for resuming (0: no intermediate checkpoint).")
    exact_every: int = option(50, "Cosine with full RMD every N hyper-iterations (0: never).")
    # Fig. 7 plot 4, the export and the timing are recomputed from the stored methods by every run.
    relerr_truncations: Sequence[int] = option((1, 2, 5, 10, 20, 30, 40, 50),
                                               "K values of Fig. 7, plot 4 (relative error vs K).", result=False)
    relerr_tasks: int = option(4, "Meta-training tasks averaged for Fig. 7, plot 4.", result=False)
    rho_zero_ablation: bool = option(True, "Fig. 7, plot 4 also with ρ = 0 (no regularization).", result=False)
    relerr_rho_scales: Sequence[float] = option((), "Fig. 7, plot 4 also with ρ multiplied by these factors "
                                                "(e.g. 100: a strongly regularized inner problem).", result=False)
    timing_rounds: int = option(5, "After training: rounds of one hyper-step per method, interleaved, for s/iter "
                                "measured under the same machine load (0: skip).", result=False)
    data_dir: Optional[str] = option(None, "tfds data_dir (default: tfds_offline.default_data_dir()).", result=False)
    local_dir: Optional[str] = option(None, "Folder with (fashion_)mnist IDX .gz files.", result=False)
    export_dir: Optional[str] = option(None, "SavedModel path of the hyper-representation (default: "
                                       "<output_dir>/hyper_representation).", result=False)
    export_run: str = option("full", "Run whose λ is exported and used for Fig. 7 plot 4 (a --truncate value or "
                             "'short_horizon'; falls back to the first run).", result=False)
    seed: int = option(0, "Seed of the class split, the tasks and the initial λ.")
    output_dir: str = option("out/omniglot", "Where results.json and the PNGs go; also the resume state "
                             "(<output_dir>/resume): rerun the same command after an interruption to continue.",
                             result=False)
    jit_compile: bool = option(False, "XLA-compile the hyper-step and evaluation (slower on CPU here).")
    deterministic: bool = option(False, "tf.config.experimental.enable_op_determinism(): a killed and resumed run "
                                 "ends bit-identical to an uninterrupted one (Keras then compiles without XLA).")
    pause_after: Optional[str] = option(
        None, "(tests) METHOD,ITER: after hyper-iteration ITER of METHOD (a --truncate value or 'short_horizon') "
        "write <output_dir>/resume/paused_METHOD_ITER and sleep, once (not if that file exists), so a test can "
        "kill the run at a known point.", internal=True, result=False)
    restart: bool = option(False, "Delete the saved state (<output_dir>/resume) and start over.", result=False)
    preset: str = "full"


# full: the paper's settings (the defaults); quick: a tiny budget for tests.
PRESETS = {"full": {}, "quick": dict(
    channels=8, inner_steps=3, hyper_iterations=4, meta_batch_size=2, n_query=3, eval_tasks=4, curve_eval_tasks=2,
    eval_every=2, exact_every=2, relerr_tasks=1, truncate=("1", "full"), relerr_truncations=(1, 2),
    timing_rounds=1)}


def prepared(cfg: Config) -> Config:
    """The Config with its dataset-dependent defaults filled in, checked (ValueError names the flag)."""
    characters = cfg.dataset in CHARACTER_SETS
    cfg = dataclasses.replace(
        cfg, class_split=cfg.class_split or ((1200, 100, 323) if characters else (5, 0, 5)),
        rotations=(not characters) if cfg.rotations is None else cfg.rotations,
        eval_tasks=(600 if cfg.dataset == "kanji_strokes" else 120) if cfg.eval_tasks is None else cfg.eval_tasks,
        export_dir=cfg.export_dir or os.path.join(cfg.output_dir, "hyper_representation"))
    if len(cfg.class_split) != 3:
        raise ValueError(f"--class_split needs 3 numbers (train,val,test), got {cfg.class_split}")
    pause = parse_pause_after(cfg.pause_after, "METHOD,ITER")
    names = [name for name, _, _ in methods_of(cfg)]
    if pause and pause[0] not in names:
        raise ValueError(f"--pause_after: unknown method {pause[0]!r}, expected one of {names}")
    return cfg


def methods_of(cfg: Config) -> list[tuple[str, int, Optional[int]]]:
    """(name, inner steps T, K) of every method the Config asks for."""
    T = cfg.inner_steps
    methods = [(method_name(k), T, k) for k in parse_truncate(cfg.truncate, T)]
    if cfg.short_horizon:
        methods.append((method_name(None, short_horizon=True), 1, None))
    return methods


def task_shape(cfg: Config) -> dict:
    return dict(n_way=cfg.n_way, k_shot=cfg.k_shot, n_query=cfg.n_query)


# --- Meta-training one method (T, K) with tf_bilevel.BilevelTrainer. ---------


def build_problem(cfg: Config) -> fsm.FewShotProblem:
    """Fresh Fig. 8 models; the same seeds give every method the same initial λ and w_0."""
    hyper = fsm.build_hyper_model(channels=cfg.channels, image_size=cfg.image_size, seed=cfg.seed)
    inner = fsm.build_inner_model(cfg.n_way, channels=cfg.channels, input_size=cfg.image_size // 4,
                                  seed=cfg.seed + 10)
    return fsm.FewShotProblem(hyper, inner)


def build_trainer(cfg: Config, steps: int, truncate: Optional[int],
                  element_spec: Any) -> tuple[fsm.FewShotProblem, Any, Optional[int]]:
    """A fresh, compiled and built trainer at the common initial λ: (problem, trainer, diagnostics_every)."""
    problem = build_problem(cfg)
    diagnostics_every = cfg.exact_every if (cfg.exact_every and truncate is not None) else None
    trainer = problem.build_trainer(steps=steps, truncate=truncate, init_rho=cfg.init_rho,
                                    init_gamma=cfg.init_inner_lr, diagnostics_every=diagnostics_every, seed=cfg.seed)
    trainer.compile(optimizer=keras.optimizers.Adam(cfg.outer_lr), metrics=["accuracy"], jit_compile=cfg.jit_compile)
    trainer.build_from_spec(element_spec)  # BackupAndRestore / load_weights need the variables
    return problem, trainer, diagnostics_every


class Recorder(ResumableRecord):
    """Fig. 7's curves of one method: per epoch the query error and loss of the meta-training
    tasks, the cosine with full RMD (the trainer's diagnostics), the accuracy on `curve_tasks`."""

    SERIES = {"epoch_end_it": ("query_error", "outer_loss"), "cos_it": ("cosine",), "curve_it": ("curve_test_acc",)}

    def __init__(self, name: str, store: MethodStore, epochs: int, chunk: int, curve_tasks: list, batch_size: int,
                 diagnostics_every: Optional[int]):
        super().__init__(f"[{method_label(name)}]", epochs, chunk, self.SERIES, store.record_path(name),
                         store.unfinished_remedy(name), position=lambda trainer: int(trainer.meta_step.numpy()),
                         progress={"f": "loss", "query_acc": "accuracy"})
        self.curve_tasks, self.batch_size, self.diagnostics_every = curve_tasks, batch_size, diagnostics_every

    def on_fresh_start(self) -> None:
        self._curve(0)

    def _curve(self, it: int) -> None:
        if self.curve_tasks:
            self.rec["curve_it"].append(it)
            accuracy = fsm.evaluate_tasks(self.model, self.curve_tasks, self.batch_size)
            self.rec["curve_test_acc"].append(float(accuracy.mean()))

    def timed(self, it: int) -> bool:  # steps that also ran full RMD are not the method's cost
        return not (self.diagnostics_every and it % self.diagnostics_every == 0)

    def on_epoch_end(self, epoch, logs=None):
        it = (epoch + 1) * self.steps_per_epoch
        self.rec["epoch_end_it"].append(it)
        self.rec["query_error"].append(1.0 - float(logs["accuracy"]))
        self.rec["outer_loss"].append(float(logs["loss"]))
        if "cosine_to_full_rmd" in logs:
            self.rec["cos_it"].append(it)
            self.rec["cosine"].append(float(logs["cosine_to_full_rmd"]))
        self._curve(it)
        super().on_epoch_end(epoch, logs)


# The keys of a finished method's row that this program reads back.
ROW_KEYS = ("inner_steps", "truncate", "iterations", "test_accuracy", "test_accuracy_ci95", "test_tasks",
            "final_gamma", "final_rho", "record")


def train_method(cfg: Config, store: MethodStore, name: str, steps: int, truncate: Optional[int],
                 train_stream: Callable[[Any], tf.data.Dataset], curve_tasks: list,
                 test_tasks: list) -> tuple[fsm.FewShotProblem, Any, dict]:
    """(problem, trainer, row) of one method: reloaded if an earlier run finished it, else meta-trained
    from the common initial λ (or its checkpoint) on `train_stream` (start -> meta-batches from there)."""
    problem, trainer, diagnostics_every = build_trainer(cfg, steps, truncate, train_stream(0).element_spec)
    if store.finished(name):
        print(f"{method_label(name)}: finished by an earlier run, reloaded from {store.root}")
        return problem, trainer, store.load(name, trainer, ROW_KEYS)
    total = cfg.hyper_iterations
    chunk = cfg.eval_every if cfg.eval_every and cfg.eval_every < total else total
    if total % chunk:
        raise ValueError(f"--hyper_iterations={total} must be a multiple of --eval_every={chunk}")
    recorder = Recorder(name, store, total // chunk, chunk, curve_tasks if cfg.eval_every else [],
                        cfg.meta_batch_size, diagnostics_every)
    callbacks = [recorder, store.backup(name)]  # the record first: it is never behind the checkpoint
    pause = parse_pause_after(cfg.pause_after, "METHOD,ITER")
    if pause and pause[0] == name:
        callbacks.append(PauseOnce(os.path.join(store.root, f"paused_{name}_{pause[1]}"), step=pause[1]))
    trainer.fit(trainer.resumable(train_stream), epochs=total // chunk, steps_per_epoch=chunk,
                callbacks=callbacks, verbose=0)
    recorder.finish(trainer)
    acc = fsm.evaluate_tasks(trainer, test_tasks, cfg.meta_batch_size)
    values = trainer.hyperparameter_values()
    times = recorder.seconds_per_step() or [float("nan")]
    row = {
        "inner_steps": steps, "truncate": "full" if truncate is None else truncate, "iterations": total,
        "test_accuracy": float(acc.mean()), "test_accuracy_ci95": confidence95(acc), "test_tasks": len(acc),
        "final_gamma": float(values["inner_learning_rate"]),
        "final_rho": [float(x) for x in values.get("user", values)["rho"]],
        "record": {**recorder.rec, "sec_per_iter": float(np.median(times)), "sec_per_iter_mean": float(np.mean(times))},
    }
    store.save(name, trainer, row)
    return problem, trainer, row


def confidence95(acc: np.ndarray) -> float:
    return float(1.96 * acc.std(ddof=1) / math.sqrt(len(acc))) if len(acc) > 1 else float("nan")


def resume_dir(cfg: Config) -> str:
    return os.path.join(cfg.output_dir, "resume")


# --- Figures and table. ------------------------------------------------------


def plot_fig7(results: dict, path: str) -> None:
    """Fig. 7: (1) meta-test accuracy, (2) meta-training query error, (3) cosine of K-RMD with full
    RMD vs hyper-iteration, (4) relative error of K-RMD vs K at the final λ."""
    from matplotlib.ticker import MaxNLocator

    from experiments.common.plotting import plt, save_figure

    cfg, T = results["config"], results["config"]["inner_steps"]
    styles = method_styles(list(results["runs"]), T)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (acc, err), (cos, rel) = axes
    for name, run in results["runs"].items():
        rec, style = run["record"], styles[name]
        if rec["curve_it"]:
            acc.plot(rec["curve_it"], 100 * np.array(rec["curve_test_acc"]), **style)
        err.plot(rec["epoch_end_it"], rec["query_error"], **style)
        if rec["cosine"]:
            cos.plot(rec["cos_it"], rec["cosine"], **style)
    relerr = results.get("relative_error_vs_K", {})
    for (label, curve), ls, marker in zip(relerr.get("curves", {}).items(), ("-", "--", ":", "-."), "os^v"):
        # K = T is full RMD itself (error 0): only K < T is informative. Curves may coincide: styles differ.
        keep = [i for i, k in enumerate(curve["K"]) if k < relerr["inner_steps"]]
        rel.semilogy([curve["K"][i] for i in keep], [curve["relative_error"][i] for i in keep], ls=ls,
                     marker=marker, ms=6, mfc="none", label=label)
    acc.set(xlabel="hyper-iteration", ylabel="query accuracy (%)",
            title=f"(1) accuracy on {cfg['curve_eval_tasks']} meta-test tasks")
    err.set(xlabel="hyper-iteration", ylabel="query error (fraction)",
            title="(2) meta-training tasks (mean over each logging interval)")
    cos.set(xlabel="hyper-iteration", ylabel="cos(h_K, d_λ f)",
            title=f"(3) cosine with full RMD, same meta-batch (every {cfg['exact_every']} it., mean per interval)")
    rel.set(xlabel="K (reverse steps, K < T)", ylabel="‖h_K − d_λ f‖ / ‖d_λ f‖",
            title=f"(4) relative error, T = {T}, final λ of {method_label(relerr['run'])}, {relerr['tasks']} task(s)"
            if relerr else "(4) relative error vs K (--relerr_truncations)")
    for ax in (acc, err, cos, rel):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=9)
        else:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"One-shot classification (Fig. 7), {cfg['dataset']}: {cfg['n_way']}-way {cfg['k_shot']}-shot, "
                 f"T = {T} inner steps, {', '.join(method_label(n) for n in results['runs'])}, "
                 f"{cfg['hyper_iterations']} hyper-iterations x {cfg['meta_batch_size']} tasks\n"
                 f"{results['data_description']}", fontsize=11)
    save_figure(fig, path)


def table_rows(results: dict) -> list[dict]:
    rows = []
    interleaved = results.get("interleaved_sec_per_iter", {})
    for name, run in results["runs"].items():
        rows.append({"method": method_label(name), "accuracy": 100 * run["test_accuracy"],
                     "ci95": 100 * run["test_accuracy_ci95"], "iterations": run["iterations"],
                     "sec_per_iter": run["record"]["sec_per_iter"],
                     "sec_per_iter_interleaved": interleaved.get(name, float("nan")),
                     "inner_steps": run["inner_steps"]})
    return rows


def format_table(results: dict) -> str:
    lines = [f"\nOne-shot classification: {results['data_description']}",
             f"{'method':>22} {'accuracy %':>16} {'iter.':>7} {'s/iter':>8} {'interleaved':>12}"]
    for r in results["table4"]:
        lines.append(f"{r['method']:>22} {r['accuracy']:8.2f} ± {r['ci95']:5.2f} {r['iterations']:7d} "
                     f"{r['sec_per_iter']:8.3f} {r['sec_per_iter_interleaved']:12.3f}")
    lines.append("Paper (Omniglot):")
    for r in PAPER_TABLE4:
        lines.append(f"{r['method']:>22} {r['accuracy']:8.1f} {r['iterations']:15d} {r['sec_per_iter']:8.1f}")
    return "\n".join(lines)


# --- Driver. -----------------------------------------------------------------


def run_experiment(cfg: Config, data: Any, ctx: program.Run) -> dict:
    """The whole experiment; writes results.json after every method (and the export)."""
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    T = cfg.inner_steps
    methods = methods_of(cfg)
    phases: dict = {}  # wall seconds per phase (tracing included), for budgeting runs
    with phase(phases, "data"):
        data = fsm.load_meta_data(cfg.dataset, data_dir=cfg.data_dir, local_dir=cfg.local_dir,
                                  image_size=cfg.image_size, class_split=cfg.class_split, rotations=cfg.rotations,
                                  seed=cfg.seed)
        print(f"Data: {data.description}; from {tfds_offline.data_source(cfg.dataset)}")
        # Fixed task sets (stateless sampling: the same in every method and every process).
        test_tasks = [fsm.as_task(b) for b in data.episodes("test", **task_shape(cfg), seed=cfg.seed + 1,
                                                              num_episodes=cfg.eval_tasks, meta_batch_size=None)]
        train_stream = data.training_stream(**task_shape(cfg), meta_batch_size=cfg.meta_batch_size, seed=cfg.seed)
        relerr_batch = fsm.as_task(next(iter(data.episodes("train", **task_shape(cfg), seed=cfg.seed + 2,
                                                           num_episodes=cfg.relerr_tasks,
                                                           meta_batch_size=cfg.relerr_tasks))))
        probe = build_problem(cfg)
    count = lambda tree: int(sum(np.prod(x.shape) for x in tf.nest.flatten(tree)))  # noqa: E731
    results = {
        "experiment": "one-shot classification (paper §4.3, Table 4, Fig. 7; appendix G.3)",
        "engine": "tf_bilevel.BilevelTrainer (meta-training, evaluation and Fig. 7 plot 4: hypergradient_of)",
        "config": dataclasses.asdict(cfg), "data_description": data.description,
        "data_source": tfds_offline.data_source(cfg.dataset),
        "num_hyperparameters": count(probe.initial_raw(init_rho=cfg.init_rho, init_gamma=cfg.init_inner_lr)),
        "num_parameters": count(probe.w0), "environment": ctx.environment,
        "paper_table4_omniglot": PAPER_TABLE4, "phase_seconds": phases, "runs": {},
    }
    print(f"λ: {results['num_hyperparameters']} hyperparameters, w: {results['num_parameters']} parameters")
    store, trained = MethodStore(resume_dir(cfg)), {}
    for name, steps, k in methods:
        with phase(phases, f"method {name}"):
            problem, trainer, row = train_method(cfg, store, name, steps, k, train_stream,
                                                 test_tasks[:cfg.curve_eval_tasks], test_tasks)
        trained[name] = (problem, trainer)
        results["runs"][name] = row
        print(f"{method_label(name)}: test accuracy {100 * row['test_accuracy']:.2f} ± "
              f"{100 * row['test_accuracy_ci95']:.2f}% on {row['test_tasks']} tasks, "
              f"{row['record']['sec_per_iter']:.3f} s/iter")
        results["table4"] = table_rows(results)
        ctx.write_results(results)

    chosen = cfg.export_run if cfg.export_run in trained else next(iter(trained))
    problem, trainer = trained[chosen]
    scales = {"learned ρ": 1.0, **({"ρ = 0": 0.0} if cfg.rho_zero_ablation else {}),
              **{f"ρ × {factor:g}": factor for factor in cfg.relerr_rho_scales}}
    relerr_ks = sorted({min(k, T) for k in cfg.relerr_truncations})
    if relerr_ks:  # the K-RMD error of the T-step problem, even if the chosen run used T = 1
        with phase(phases, "relative error vs K"):
            curves = fsm.relative_error_vs_k(problem, trainer, relerr_batch, T, relerr_ks, scales, cfg.jit_compile)
        results["relative_error_vs_K"] = {"run": chosen, "inner_steps": T, "tasks": cfg.relerr_tasks, "curves": curves}
        ctx.write_results(results)
    with phase(phases, "export"):
        results["export"] = {"run": chosen, **fsm.export_and_check(problem, trainer, test_tasks[0], cfg.export_dir)}
    print(f"Export: {results['export']}")
    ctx.write_results(results)
    if cfg.timing_rounds:  # after evaluation and export: these steps move λ
        with phase(phases, "interleaved timing"):
            batches = [tf.data.Dataset.from_tensors(b) for b in train_stream(0).take(cfg.timing_rounds)]
            steps = {name: (lambda r, t=t: t.fit(batches[r], epochs=1, verbose=0)) for name, (_, t) in trained.items()}
            results["interleaved_sec_per_iter"] = interleaved_median_seconds(steps, cfg.timing_rounds)
        results["table4"] = table_rows(results)
        ctx.write_results(results)
    return results


PROGRAM = program.Program(
    "omniglot", Config, PRESETS, experiment=run_experiment, figures=lambda results, output_dir: plot_fig7(
        results, os.path.join(output_dir, "fig7_one_shot.png")), table=format_table, prepare=prepared,
    state_dirs=("resume",), fingerprint="resume", data_name=lambda cfg: cfg.dataset)


if __name__ == "__main__":
    program.start(PROGRAM)
