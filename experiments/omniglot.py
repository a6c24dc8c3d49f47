r"""One-shot classification (paper §4.3, Table 4, Fig. 7; appendix G.3) with K-RMD.

Meta-learns a hyper-representation (two conv blocks) and per-task regularization for 5-way
1-shot tasks with tf_bilevel.BilevelTrainer, for several truncations K and a short-horizon
baseline; prints Table 4, writes results.json and the Fig. 7 PNG to --output_dir and exports the
hyper-representation as a SavedModel. A killed run continues when the same command is rerun.
Datasets, evaluation, resumption and the measured results: RESULTS.md, "One-shot classification".

  tfb-omniglot                            # the paper (needs tfds omniglot)
  tfb-omniglot --dataset=fashion_mnist    # offline, real data
  tfb-omniglot --preset=quick --dataset=mnist
  (or python -m experiments.omniglot ...)
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import time
from typing import Any, Callable, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags, logging

import tf_bilevel as tfb
from experiments import config, datasets, provenance
from experiments import fewshot_model as fsm
from experiments.config import option
from experiments.run_state import (
    RESTART_HINT, STATE_ERRORS, StateFileError, damaged, discard_state, exclusive_output_dir, exit_with_error,
    guard_settings, parse_pause_after, pause_to_be_killed, read_state_json, reading_state, write_atomically,
    write_json_atomically,
)

DATASETS = ("omniglot", "mnist", "fashion_mnist")
# Table 4 of the paper (Omniglot, 5-way 1-shot): accuracy %, hyper-iterations, s/iter.
PAPER_TABLE4 = [
    {"method": "1-RMD", "accuracy": 95.6, "iterations": 5000, "sec_per_iter": 0.4},
    {"method": "10-RMD", "accuracy": 96.3, "iterations": 5000, "sec_per_iter": 0.7},
    {"method": "25-RMD", "accuracy": 96.1, "iterations": 5000, "sec_per_iter": 1.3},
    {"method": "Full RMD", "accuracy": 95.8, "iterations": 5000, "sec_per_iter": 2.2},
    {"method": "1-RMD", "accuracy": 97.7, "iterations": 15000, "sec_per_iter": 0.4},
    {"method": "10-RMD", "accuracy": 97.8, "iterations": 15000, "sec_per_iter": 0.7},
    {"method": "Short horizon", "accuracy": 96.6, "iterations": 15000, "sec_per_iter": 0.1},
]


@dataclasses.dataclass(frozen=True)
class Config:
    """The run's settings; one flag per field (flag = field name)."""
    dataset: str = option("omniglot", "Meta-learning dataset (omniglot = the paper).", choices=DATASETS)
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
        "and 5,0,5 for (fashion_)mnist.")
    rotations: Optional[bool] = option(None, "Add 90/180/270° rotations as new classes (default: off for omniglot "
                                       "as in the paper, on for (fashion_)mnist).")
    eval_tasks: int = option(120, "Meta-test tasks for the final accuracy (paper: 120).")
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
    data_dir: Optional[str] = option(None, "tfds data_dir (default: datasets.default_data_dir()).", result=False)
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


# --------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------


class MetaData:
    """Images, labels and the disjoint class pools of meta-train / meta-val / meta-test."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, pools: dict, description: str):
        self.images, self.labels, self.pools, self.description = images, labels, pools, description

    def episodes(self, pool: str, cfg: Config, *, seed: int, num_episodes: Optional[int],
                 meta_batch_size: Optional[int]) -> tf.data.Dataset:
        n_query = cfg.n_query
        return datasets.make_episodes(
            self.images, self.labels, self.pools[pool], n_way=cfg.n_way, k_shot=cfg.k_shot,
            n_query=n_query, seed=seed, num_episodes=num_episodes, meta_batch_size=meta_batch_size,
        )

    def training_stream(self, cfg: Config, *, seed: int) -> Callable[[Any], tf.data.Dataset]:
        """`start -> dataset` of the trainer's meta-batches from hyper-iteration `start` on (the
        episodes of `episodes("train", ...)`, as trainer elements): `trainer.resumable` jumps
        to a resumed run's hyper-iteration instead of drawing and dropping the earlier ones."""
        sampler = datasets.episode_sampler(self.images, self.labels, self.pools["train"], n_way=cfg.n_way,
                                           k_shot=cfg.k_shot, n_query=cfg.n_query, seed=seed)
        return tfb.keras.episodes(lambda i: as_trainer_element(sampler(i)), batch=cfg.meta_batch_size)


def load_meta_data(cfg: Config) -> MetaData:
    name = cfg.dataset
    if name == "omniglot":
        images, labels = datasets.load_omniglot(data_dir=cfg.data_dir, image_size=cfg.image_size)
        source = "tfds omniglot (train + test), grayscale"
    else:
        data = datasets.load_image_classification(
            name, data_dir=cfg.data_dir, local_dir=cfg.local_dir,
            image_size=None if cfg.image_size == 28 else cfg.image_size,
        )
        images = np.concatenate([data["train"][0], data["test"][0]])
        labels = np.concatenate([data["train"][1], data["test"][1]])
        source = f"tfds {name} (train + test)"
    sizes = dict(zip(("train", "val", "test"), (int(s) for s in cfg.class_split)))
    base = datasets.class_split(labels, sizes, seed=cfg.seed)
    num_base = int(labels.max()) + 1
    if cfg.rotations:
        images, labels = datasets.add_rotations(images, labels)
        pools = {k: datasets.rotated_classes(v, num_base) for k, v in base.items()}
    else:
        pools = base
    description = (
        f"{source}, {cfg.image_size}x{cfg.image_size}; base classes "
        f"{ {k: len(v) for k, v in base.items()} }"
        + (f", x4 by 90-degree rotations -> { {k: len(v) for k, v in pools.items()} } classes"
           if cfg.rotations else "")
    )
    return MetaData(images, labels, pools, description)


def as_task(batch: dict) -> fsm.Task:
    return fsm.Task(batch["support_x"], batch["support_y"], batch["query_x"], batch["query_y"])


def as_trainer_element(batch: dict) -> tuple:
    """make_episodes element -> the BilevelTrainer's ((x_inner, y_inner), (x_outer, y_outer))."""
    return (batch["support_x"], batch["support_y"]), (batch["query_x"], batch["query_y"])


def stack_tasks(tasks: Sequence[fsm.Task]) -> fsm.Task:
    return fsm.Task(*[tf.stack(list(x)) for x in zip(*tasks)])


# --------------------------------------------------------------------------
# Meta-training one method (T, K) with tf_bilevel.BilevelTrainer.
# --------------------------------------------------------------------------


def build_problem(cfg: Config) -> fsm.FewShotProblem:
    """Fresh Fig. 8 models; the same seeds give every method the same initial λ and w_0."""
    hyper = fsm.build_hyper_model(channels=cfg.channels, image_size=cfg.image_size, seed=cfg.seed)
    inner = fsm.build_inner_model(cfg.n_way, channels=cfg.channels, input_size=cfg.image_size // 4,
                                  seed=cfg.seed + 10)
    return fsm.FewShotProblem(hyper, inner)


def evaluate_tasks(trainer: Any, tasks: Sequence[fsm.Task], batch_size: int) -> np.ndarray:
    """Query accuracy of each task after T inner steps on its support set (trainer.predict)."""
    stacked = stack_tasks(tasks)
    # Full task elements (the query labels are not used by predict).
    ds = tf.data.Dataset.from_tensor_slices(
        ((stacked.support_x, stacked.support_y), (stacked.query_x, stacked.query_y))).batch(batch_size)
    logits = trainer.predict(ds, verbose=0)
    return (np.argmax(logits, axis=-1) == stacked.query_y.numpy()).mean(axis=1)


class Recorder(keras.callbacks.Callback):
    """Per-step wall time, per-epoch metrics (query error, cosine with full RMD), the test
    accuracy curve, and a progress line. With `state_path`, the record is saved at every epoch
    end and, in a resumed fit, reloaded and cut back to the restored `meta_step`.

    Place it BEFORE `keras.callbacks.BackupAndRestore` in the callback list: its record is then
    written before the checkpoint, so a kill in between leaves a record ahead of the
    checkpoint (cut back on restart), never behind it."""

    _CURVES = (("epoch_end_it", ("query_error", "outer_loss")), ("cos_it", ("cosine",)),
               ("curve_it", ("curve_test_acc",)))

    def __init__(self, label: str, total: int, chunk: int, curve_tasks: list, batch_size: int,
                 diagnostics_every: Optional[int], state_path: Optional[str] = None,
                 backup_dir: Optional[str] = None):
        super().__init__()
        self.label, self.total, self.chunk = label, total, chunk
        self.backup_dir = backup_dir
        # Both go together: the record without the backup (or the reverse) cannot be resumed.
        self.remedy = (f"delete {backup_dir} and {state_path} to train this method from the start, {RESTART_HINT}")
        self.curve_tasks, self.batch_size, self.diagnostics_every = curve_tasks, batch_size, diagnostics_every
        self.state_path = state_path
        self.tty = sys.stdout.isatty()
        self.rec = {"epoch_end_it": [], "query_error": [], "outer_loss": [], "cos_it": [], "cosine": [],
                    "curve_it": [], "curve_test_acc": []}
        self.step_times: list[float] = []
        self._step_its: list[int] = []  # the hyper-iteration of each step time
        self.start = time.perf_counter()
        self._started = False

    def _curve(self, it: int) -> None:
        if self.curve_tasks:
            self.rec["curve_it"].append(it)
            acc = evaluate_tasks(self.model, self.curve_tasks, self.batch_size)
            self.rec["curve_test_acc"].append(float(acc.mean()))

    def begin(self, epoch: int) -> None:
        """First epoch of this fit (BackupAndRestore has restored by now): the initial curve
        point in a fresh fit, the saved record cut back to `meta_step` in a resumed one."""
        self._started, self._traced = True, False
        step = int(self.model.meta_step.numpy())
        if step != epoch * self.chunk:
            raise StateFileError(
                f"{self.label}: the backup {self.backup_dir} holds meta_step={step} but epoch {epoch} "
                f"(x {self.chunk} hyper-iterations): it is damaged (killed while it was written?). "
                f"To go on: {self.remedy}.")
        if step == 0:
            self._curve(0)
            return
        if not (self.state_path and os.path.exists(self.state_path)):
            raise StateFileError(f"{self.label}: resumed at hyper-iteration {step} but the record "
                                 f"{self.state_path} is missing. To go on: {self.remedy}.")
        saved = read_state_json(self.state_path, self.remedy, ("rec", "step_times"))
        try:
            self._restore_record(saved, step)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise damaged(self.state_path, f"not the record this program writes ({type(err).__name__}: {err})",
                          self.remedy) from None
        print(f"{self.label} resumed at hyper-iteration {step}/{self.total}", flush=True)

    def _restore_record(self, saved: dict, step: int) -> None:
        """The saved record cut back to hyper-iteration `step` (the checkpoint's)."""
        for its, values in self._CURVES:
            keep = [i for i, it in enumerate(saved["rec"][its]) if it <= step]
            self.rec[its] = [saved["rec"][its][i] for i in keep]
            for name in values:
                self.rec[name] = [saved["rec"][name][i] for i in keep]
        if self.rec["epoch_end_it"][-1:] != [step]:
            raise damaged(self.state_path, f"it stops before the checkpoint (hyper-iteration {step})", self.remedy)
        self.step_times = [t for it, t in saved["step_times"] if it < step]
        self._step_its = [it for it, _ in saved["step_times"] if it < step]

    def on_train_batch_begin(self, batch, logs=None):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        it = self._epoch * self.chunk + batch  # 0-based hyper-iteration
        diag = self.diagnostics_every is not None and it % self.diagnostics_every == 0
        if self._traced and not diag:  # skip tracing (first step of a fit) and steps that also ran full RMD
            self.step_times.append(time.perf_counter() - self._t0)
            self._step_its.append(it)
        self._traced = True
        if self.tty or (it + 1) % 50 == 0:
            line = (f"{self.label} {it + 1:5d}/{self.total} [{time.perf_counter() - self.start:6.0f}s] "
                    f"f={float(logs['loss']):.3f} query_acc(epoch)={float(logs['accuracy']):.3f}")
            print(f"\r{line}" if self.tty else line, end="" if self.tty else "\n", flush=True)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if not self._started:
            self.begin(epoch)

    def on_epoch_end(self, epoch, logs=None):
        it = (epoch + 1) * self.chunk
        self.rec["epoch_end_it"].append(it)
        self.rec["query_error"].append(1.0 - float(logs["accuracy"]))
        self.rec["outer_loss"].append(float(logs["loss"]))
        if "cosine_to_full_rmd" in logs:
            self.rec["cos_it"].append(it)
            self.rec["cosine"].append(float(logs["cosine_to_full_rmd"]))
        self._curve(it)
        if self.state_path:
            write_json_atomically(self.state_path, {"rec": self.rec,
                                                    "step_times": list(zip(self._step_its, self.step_times))}, indent=1)

    def on_train_end(self, logs=None):
        if self.tty:
            print(flush=True)


class CheckedBackupAndRestore(keras.callbacks.BackupAndRestore):
    """keras.callbacks.BackupAndRestore whose restore of a damaged backup (truncated weights,
    garbage metadata) is a StateFileError naming the folder and what to do, not a traceback
    from h5py or json."""

    def on_train_begin(self, logs=None):
        remedy = (f"delete {self.backup_dir} and the method's .record.json next to it to train it from the "
                  f"start, {RESTART_HINT}")
        with reading_state(self.backup_dir, remedy, (OSError, ValueError, KeyError, TypeError)):
            super().on_train_begin(logs)


class PauseOnce(keras.callbacks.Callback):
    """--pause_after (tests): after hyper-iteration `step` writes `marker` and sleeps until
    killed, unless the marker exists (so the rerun goes past that step)."""

    def __init__(self, marker: str, step: int, seconds: float = 300.0):
        super().__init__()
        self.marker, self.step, self.seconds = marker, step, seconds

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.meta_step.numpy()) == self.step:
            pause_to_be_killed(self.marker, self.seconds)


def build_trainer(cfg: Config, steps: int, truncate: Optional[int],
                  element_spec: Any) -> tuple[fsm.FewShotProblem, Any, Optional[int]]:
    """A fresh, compiled and built trainer at the common initial λ: (problem, trainer, diagnostics_every)."""
    problem = build_problem(cfg)
    diagnostics_every = cfg.exact_every if (cfg.exact_every and truncate is not None) else None
    trainer = problem.build_trainer(steps=steps, truncate=truncate, init_rho=cfg.init_rho,
                                    init_gamma=cfg.init_inner_lr, diagnostics_every=diagnostics_every,
                                    seed=cfg.seed)
    trainer.compile(optimizer=keras.optimizers.Adam(cfg.outer_lr), metrics=["accuracy"],
                    jit_compile=cfg.jit_compile)
    trainer.build_from_spec(element_spec)  # BackupAndRestore / load_weights need the variables
    return problem, trainer, diagnostics_every


def resume_dir(cfg: Config) -> str:
    return os.path.join(cfg.output_dir, "resume")


def load_finished_method(cfg: Config, steps: int, truncate: Optional[int], name: str,
                         element_spec: Any) -> Optional[tuple[fsm.FewShotProblem, Any, dict]]:
    """(problem, trainer, row) of a method finished by an earlier run of this --output_dir, or None."""
    row_path = os.path.join(resume_dir(cfg), f"{name}.json")
    if not os.path.exists(row_path):
        return None
    weights = os.path.join(resume_dir(cfg), f"{name}.weights.h5")
    remedy = f"delete {row_path} (and {os.path.basename(weights)}) to train method {name} again, {RESTART_HINT}"
    row = read_state_json(row_path, remedy, ROW_KEYS)
    problem, trainer, _ = build_trainer(cfg, steps, truncate, element_spec)
    with reading_state(weights, remedy):  # h5py: OSError when truncated or garbage; Keras: ValueError
        trainer.load_weights(weights)
    return problem, trainer, row


def train_method(cfg: Config, steps: int, truncate: Optional[int], name: str,
                 train_stream: Callable[[Any], tf.data.Dataset], curve_tasks: list,
                 test_tasks: list) -> tuple[fsm.FewShotProblem, Any, dict]:
    """Meta-trains one method from the common initial λ (or from its checkpoint in
    <output_dir>/resume/backup/<name>) on `train_stream` (start -> meta-batches from there);
    saves and returns (problem, trainer, row)."""
    problem, trainer, diagnostics_every = build_trainer(cfg, steps, truncate, train_stream(0).element_spec)
    total = cfg.hyper_iterations
    chunk = cfg.eval_every if cfg.eval_every and cfg.eval_every < total else total
    if total % chunk:
        raise ValueError(f"--hyper_iterations={total} must be a multiple of --eval_every={chunk}")
    state = resume_dir(cfg)
    backup = os.path.join(state, "backup", name)
    recorder = Recorder(f"[{method_label(name)}]", total, chunk, curve_tasks if cfg.eval_every else [],
                        cfg.meta_batch_size, diagnostics_every, os.path.join(state, f"{name}.record.json"),
                        backup)
    # The backup is deleted below, once the row is saved (a kill right after fit loses nothing).
    callbacks = [recorder, CheckedBackupAndRestore(backup, delete_checkpoint=False)]
    pause = parse_pause_after(cfg.pause_after, "METHOD,ITER")
    if pause and pause[0] == name:
        callbacks.append(PauseOnce(os.path.join(state, f"paused_{name}_{pause[1]}"), pause[1]))
    trainer.fit(trainer.resumable(train_stream), epochs=total // chunk, steps_per_epoch=chunk,
                callbacks=callbacks, verbose=0)
    if not recorder._started:  # killed after the last checkpoint: fit had no epoch left to run
        recorder.set_model(trainer)
        recorder.begin(total // chunk)
    acc = evaluate_tasks(trainer, test_tasks, cfg.meta_batch_size)
    values = trainer.hyperparameter_values()
    rec = recorder.rec
    rec["sec_per_iter"] = float(np.median(recorder.step_times)) if recorder.step_times else float("nan")
    rec["sec_per_iter_mean"] = float(np.mean(recorder.step_times)) if recorder.step_times else float("nan")
    row = {
        "inner_steps": steps, "truncate": "full" if truncate is None else truncate, "iterations": total,
        "test_accuracy": float(acc.mean()), "test_accuracy_ci95": confidence95(acc), "test_tasks": len(acc),
        "final_gamma": float(values["inner_learning_rate"]),
        "final_rho": [float(x) for x in values.get("user", values)["rho"]],
        "record": rec,
    }
    # Weights first, the row last: the row's existence marks the method as finished.
    write_atomically(os.path.join(state, f"{name}.weights.h5"), trainer.save_weights)
    write_json_atomically(os.path.join(state, f"{name}.json"), row, indent=1)
    shutil.rmtree(backup, ignore_errors=True)
    if os.path.exists(recorder.state_path):
        os.remove(recorder.state_path)
    return problem, trainer, row


# The keys of a finished method's row that this program reads back.
ROW_KEYS = ("inner_steps", "truncate", "iterations", "test_accuracy", "test_accuracy_ci95", "test_tasks",
            "final_gamma", "final_rho", "record")


def check_fingerprint(cfg: Config) -> None:
    """Stores the result-affecting settings in <output_dir>/resume/fingerprint.json, or checks them
    against the stored ones: a resumed run must not mix two configurations."""
    guard_settings(resume_dir(cfg), config.result_settings(cfg))


def method_name(steps: int, truncate: Optional[int], short: bool) -> str:
    if short:
        return "short_horizon"
    return "full" if truncate is None else str(truncate)


def method_label(name: str) -> str:
    return {"full": "Full RMD", "short_horizon": "Short horizon (T=1)"}.get(name, f"{name}-RMD")


def confidence95(acc: np.ndarray) -> float:
    return float(1.96 * acc.std(ddof=1) / math.sqrt(len(acc))) if len(acc) > 1 else float("nan")


def relative_error_vs_k(problem: fsm.FewShotProblem, trainer: Any, tasks: fsm.Task, steps: int,
                        truncations: Sequence[int], rho_scales: dict, jit_compile: bool) -> dict:
    """Fig. 7, plot 4: ‖h_K − d_λ f‖ / ‖d_λ f‖ at the trainer's λ on a fixed meta-batch, per K:
    `hypergradient_of` of one BilevelTrainer per K on the same models, sharing that λ (the
    gradient with respect to the raw variables ν, as the optimizer receives it)."""
    element = ((tasks.support_x, tasks.support_y), (tasks.query_x, tasks.query_y))
    lam = [tf.identity(v) for v in trainer.hyper_variables]
    trainers = {}
    for k in sorted(set(truncations) | {steps}):
        t = problem.build_trainer(steps=steps, truncate=None if k == steps else k, init_rho=1.0, init_gamma=1.0)
        t.compile(jit_compile=jit_compile)
        t.build_from_spec(tf.nest.map_structure(lambda x: tf.TensorSpec(x.shape, x.dtype), element))
        for variable, value in zip(t.hyper_variables, lam):
            variable.assign(value)
        trainers[k] = t
    out = {}
    for label, scale in rho_scales.items():
        hypergradients = {}
        for k, t in trainers.items():
            with fsm.scaled_rho(t, scale):
                hypergradients[k] = t.hypergradient_of(element)
        exact = hypergradients[steps]
        out[label] = {
            "K": [int(k) for k in truncations],
            "relative_error": [float(tfb.diagnostics.relative_error(hypergradients[k], exact)) for k in truncations],
            "cosine": [float(tfb.diagnostics.cosine_similarity(hypergradients[k], exact)) for k in truncations],
            "exact_norm": float(tfb.diagnostics.global_norm(exact)),
        }
    return out


# --------------------------------------------------------------------------
# Figures and table.
# --------------------------------------------------------------------------


def plot_fig7(results: dict, path: str) -> None:
    from experiments.plotting import plt, save_figure

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for name, run in results["runs"].items():
        rec, label = run["record"], method_label(name)
        if rec["curve_it"]:
            axes[0].plot(rec["curve_it"], 100 * np.array(rec["curve_test_acc"]), marker="o", ms=3, label=label)
        axes[1].plot(rec["epoch_end_it"], rec["query_error"], marker=".", label=label)
        if rec["cosine"]:
            axes[2].plot(rec["cos_it"], rec["cosine"], marker=".", label=label)
    relerr = results.get("relative_error_vs_K", {})
    for label, curve in relerr.get("curves", {}).items():
        # K = T is full RMD itself (error 0): only K < T is informative.
        keep = [i for i, k in enumerate(curve["K"]) if k < relerr["inner_steps"]]
        axes[3].semilogy([curve["K"][i] for i in keep], [curve["relative_error"][i] for i in keep],
                         marker="o", label=label)
    axes[0].set(xlabel="hyper-iteration", ylabel="test accuracy (%)",
                title=f"meta-test tasks ({results['config']['curve_eval_tasks']})")
    axes[1].set(xlabel="hyper-iteration", ylabel="query (validation) error",
                title="meta-training tasks (mean over each logging interval)")
    axes[2].set(xlabel="hyper-iteration", ylabel="cos(h_K, d_λ f)", title="cosine with full RMD")
    axes[3].set(xlabel="K (reverse depth, K < T)", ylabel="‖h_K − d_λ f‖ / ‖d_λ f‖",
                title="relative error vs K at the final λ")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"One-shot classification, {results['data_description']}", fontsize=9)
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


def print_table(results: dict) -> None:
    print(f"\nOne-shot classification: {results['data_description']}")
    print(f"{'method':>22} {'accuracy %':>16} {'iter.':>7} {'s/iter':>8} {'interleaved':>12}")
    for r in results["table4"]:
        print(f"{r['method']:>22} {r['accuracy']:8.2f} ± {r['ci95']:5.2f} {r['iterations']:7d} "
              f"{r['sec_per_iter']:8.3f} {r['sec_per_iter_interleaved']:12.3f}")
    print("Paper (Omniglot):")
    for r in PAPER_TABLE4:
        print(f"{r['method']:>22} {r['accuracy']:8.1f} {r['iterations']:15d} {r['sec_per_iter']:8.1f}")


# --------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------


def parse_truncate(values: Sequence[str], steps: int) -> list[Optional[int]]:
    out = []
    for v in values:
        if v.strip().lower() in ("full", "none"):
            out.append(None)
            continue
        k = int(v)
        if not 1 <= k <= steps:
            raise ValueError(f"--truncate values must be in [1, --inner_steps={steps}] or 'full', got {v}")
        out.append(None if k == steps else k)
    return out


def define_flags(flag_values: Optional[flags.FlagValues] = None) -> None:
    """Registers the program's flags (in `flag_values`, e.g. a test's own FlagValues)."""
    config.define_flags(Config, PRESETS, flag_values=flag_values)


def config_from_flags(flag_values: Optional[flags.FlagValues] = None) -> Config:
    """The Config of the command line (preset, then explicit flags), dataset-dependent defaults filled in."""
    cfg = config.config_from_flags(Config, PRESETS, flag_values)
    omniglot = cfg.dataset == "omniglot"
    cfg = dataclasses.replace(
        cfg, class_split=cfg.class_split or ((1200, 100, 323) if omniglot else (5, 0, 5)),
        rotations=(not omniglot) if cfg.rotations is None else cfg.rotations,
        export_dir=cfg.export_dir or os.path.join(cfg.output_dir, "hyper_representation"))
    if len(cfg.class_split) != 3:
        raise ValueError(f"--class_split needs 3 numbers (train,val,test), got {cfg.class_split}")
    parse_pause_after(cfg.pause_after, "METHOD,ITER")  # a bad value fails at start-up
    return cfg


def run(cfg: Config) -> dict:
    """The whole experiment; writes results.json (after every method), the figure and the export.
    Holds an exclusive lock on cfg.output_dir meanwhile (OutputDirError if another run does);
    cfg.restart: deletes the saved state first."""
    with exclusive_output_dir(cfg.output_dir, "experiments.omniglot"):
        if cfg.restart:
            discard_state(resume_dir(cfg))
        return _run(cfg)


def _run(cfg: Config) -> dict:
    check_fingerprint(cfg)
    T = cfg.inner_steps
    pause = parse_pause_after(cfg.pause_after, "METHOD,ITER")
    methods = [(T, k, False) for k in parse_truncate(cfg.truncate, T)]
    if cfg.short_horizon:
        methods.append((1, None, True))
    names = [method_name(*m) for m in methods]
    if pause and pause[0] not in names:
        raise ValueError(f"--pause_after: unknown method {pause[0]!r}, expected one of {names}")
    relerr_ks = sorted({min(int(k), T) for k in cfg.relerr_truncations})

    phases: dict = {}  # wall seconds per phase (tracing included), for budgeting runs
    clock = time.perf_counter()
    data = load_meta_data(cfg)
    print(f"Data: {data.description}; from {datasets.data_source(cfg.dataset)}")
    # Fixed task sets (stateless sampling: the same in every method and every process).
    test_tasks = [as_task(b) for b in data.episodes("test", cfg, seed=cfg.seed + 1,
                                                     num_episodes=cfg.eval_tasks, meta_batch_size=None)]
    curve_tasks = test_tasks[:cfg.curve_eval_tasks]
    train_stream = data.training_stream(cfg, seed=cfg.seed)
    train_ds = train_stream(0)
    relerr_batch = as_task(next(iter(data.episodes(
        "train", cfg, seed=cfg.seed + 2, num_episodes=cfg.relerr_tasks,
        meta_batch_size=cfg.relerr_tasks))))

    probe = build_problem(cfg)
    raw0 = probe.initial_raw(init_rho=cfg.init_rho, init_gamma=cfg.init_inner_lr)
    count = lambda tree: int(sum(np.prod(x.shape) for x in tf.nest.flatten(tree)))  # noqa: E731
    results = {
        "experiment": "one-shot classification (paper §4.3, Table 4, Fig. 7; appendix G.3)",
        "engine": "tf_bilevel.BilevelTrainer (meta-training, evaluation and Fig. 7 plot 4: "
                  "hypergradient_of)",
        "config": dataclasses.asdict(cfg),
        "data_description": data.description,
        "data_source": datasets.data_source(cfg.dataset),
        "num_hyperparameters": count(raw0),
        "num_parameters": count(probe.w0),
        "machine": provenance.environment(),
        "paper_table4_omniglot": PAPER_TABLE4,
        "phase_seconds": phases,
        "runs": {},
    }
    phases["data"] = time.perf_counter() - clock
    print(f"λ: {results['num_hyperparameters']} hyperparameters, w: {results['num_parameters']} parameters")
    trained = {}
    for steps, k, short in methods:
        name = method_name(steps, k, short)
        clock = time.perf_counter()
        finished = load_finished_method(cfg, steps, k, name, train_ds.element_spec)
        if finished:
            print(f"{method_label(name)}: finished by an earlier run, reloaded from {resume_dir(cfg)}")
            problem, trainer, row = finished
        else:
            problem, trainer, row = train_method(cfg, steps, k, name, train_stream, curve_tasks, test_tasks)
        phases[f"method {name}"] = time.perf_counter() - clock
        trained[name] = (problem, trainer)
        results["runs"][name] = row
        print(f"{method_label(name)}: test accuracy {100 * row['test_accuracy']:.2f} ± "
              f"{100 * row['test_accuracy_ci95']:.2f}% on {row['test_tasks']} tasks, "
              f"{row['record']['sec_per_iter']:.3f} s/iter")
        results["table4"] = table_rows(results)
        _write(results, cfg)

    chosen = cfg.export_run if cfg.export_run in trained else next(iter(trained))
    problem, trainer = trained[chosen]
    scales = {"learned ρ": 1.0}
    if cfg.rho_zero_ablation:
        scales["ρ = 0"] = 0.0
    for factor in cfg.relerr_rho_scales:
        scales[f"ρ × {factor:g}"] = factor
    if relerr_ks:
        # The K-RMD error is measured for the T-step problem even if the chosen run used T = 1.
        clock = time.perf_counter()
        results["relative_error_vs_K"] = {
            "run": chosen, "inner_steps": T, "tasks": cfg.relerr_tasks,
            "curves": relative_error_vs_k(problem, trainer, relerr_batch, T,
                                          relerr_ks, scales, cfg.jit_compile),
        }
        phases["relative error vs K"] = time.perf_counter() - clock
        _write(results, cfg)

    clock = time.perf_counter()
    results["export"] = {"run": chosen, **export_and_check(problem, trainer, test_tasks[0], cfg.export_dir)}
    phases["export"] = time.perf_counter() - clock
    print(f"Export: {results['export']}")
    _write(results, cfg)
    if cfg.timing_rounds:
        clock = time.perf_counter()
        results["interleaved_sec_per_iter"] = interleaved_timing(trained, train_ds, cfg.timing_rounds)
        phases["interleaved timing"] = time.perf_counter() - clock
        results["table4"] = table_rows(results)
        _write(results, cfg)
    print_table(results)
    plot_fig7(results, os.path.join(cfg.output_dir, "fig7_one_shot.png"))
    return results


def interleaved_timing(trained: dict, train_ds: tf.data.Dataset, rounds: int) -> dict:
    """Median wall time of one hyper-step (one `fit` call on one meta-batch, so it includes
    Keras' per-call overhead) per method, the methods interleaved round by round so that
    they see the same machine load. Runs after evaluation and export (it moves λ)."""
    times: dict = {name: [] for name in trained}
    batches = list(train_ds.take(rounds))
    for r in range(rounds):
        one = tf.data.Dataset.from_tensors(batches[r])
        for name, (_, trainer) in trained.items():
            start = time.perf_counter()
            trainer.fit(one, epochs=1, verbose=0)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def export_and_check(problem: fsm.FewShotProblem, trainer: Any, task: fsm.Task, path: str) -> dict:
    """trainer.export, reloaded and compared bit for bit with the in-memory hyper model and with
    the per-task representation used in meta-training, on one task's images."""
    images = np.concatenate([task.support_x.numpy(), task.query_x.numpy()])
    trainer.export(path, verbose=False)
    hyper = problem.hyper_model
    per_task = tf.function(problem.represent, autograph=False)([v.value for v in hyper.trainable_variables],
                                              tf.constant(images)).numpy()
    return {"endpoint": "serve (BatchNorm with the statistics of the served batch)",
            **fsm.check_export(hyper, path, images, training_embeddings=per_task)}


def _write(results: dict, cfg: Config) -> None:
    write_json_atomically(os.path.join(cfg.output_dir, "results.json"), results, indent=1)


def main(argv: Sequence[str]) -> int:
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        cfg = config_from_flags()
        if cfg.deterministic:
            tf.config.experimental.enable_op_determinism()
        run(cfg)
    except datasets.DataUnavailableError as err:
        raise app.UsageError(str(err)) from None
    except STATE_ERRORS as err:  # damaged state, settings mismatch, output folder busy or not writable
        return exit_with_error("omniglot", err)
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
