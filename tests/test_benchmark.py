"""Smoke tests of experiments/benchmark.py on tiny sizes: fields and sane values, no timing asserts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `experiments` is not an installed package.
import tf_bilevel as tfb  # noqa: E402
from experiments import benchmark as B  # noqa: E402
from experiments.common.memory import PeakMemory  # noqa: E402

LINUX = sys.platform.startswith("linux")  # where the memory probes must give a value

TINY = dict(num_examples=24, num_features=5, num_classes=3, seed=0)


def _config(estimator, steps, truncate, **overrides):
    config = dict(TINY, estimator=estimator, steps=steps, truncate=truncate, learning_rate=1.0, repeats=2,
                  max_seconds=60.0, forward_hparams=2, label=f"{estimator} {truncate}")
    config.update(overrides)
    return config


def test_problem_has_hypercleaning_structure():
    p = B.hypercleaning_problem(**TINY)
    assert p.params.shape == (3, 5) and p.hparams.shape == (24,)
    np.testing.assert_array_equal(p.inner_batch["x"].numpy()[:, -1], 1.0)  # constant feature
    # W = 0: every class equally likely, so g = mean σ(0) log 3 and f = log 3.
    g = p.inner_loss(p.params, p.hparams, p.inner_batch)
    f = p.outer_loss(p.params, p.hparams, p.outer_batch)
    np.testing.assert_allclose([g.numpy(), f.numpy()], [0.5 * math.log(3), math.log(3)], rtol=1e-6)
    small = B.hypercleaning_problem(**TINY, num_hparams=2)
    assert small.hparams.shape == (2,) and small.inner_batch["frozen_lambda"].shape == (22,)
    np.testing.assert_allclose(small.inner_loss(small.params, small.hparams, small.inner_batch), g, rtol=1e-6)


def test_peak_memory_sees_a_large_allocation():
    size = 64 * 2**20
    with PeakMemory() as process_probe:
        block = np.ones(size // 8)  # touched pages: resident
        block[::512] += 1.0
    del block
    if LINUX:  # VmHWM, reset through /proc/self/clear_refs
        assert process_probe.peak_was_reset and process_probe.process_peak_growth is not None
    assert process_probe.process_peak_growth is None or process_probe.process_peak_growth >= 0.9 * size
    with PeakMemory() as tf_probe:
        tensor = tf.fill([size // 4], 1.0)
        tf.reduce_sum(tensor).numpy()
    del tensor
    assert tf_probe.allocator_peak_growth is not None and tf_probe.allocator_peak_growth >= size


@pytest.mark.parametrize(
    "estimator,truncate",
    [("floor", None), ("checkpointed", 6), ("forward", None), ("implicit_cg", 3), ("reverse", 2)],
)
def test_measure_each_estimator_in_process(estimator, truncate):
    # "reverse" with backward="store": the engine's store-everything backward pass (what the
    # removed reverse_autodiff prototype measured).
    r = B.measure(_config(estimator, 6, truncate, backward="store" if estimator == "reverse" else None))
    assert r["backward_used"] == ("store" if estimator == "reverse" else None)
    assert r["repeats"] == 2 and len(r["times_seconds"]) == 2 and len(r["floor_times_seconds"]) == 2
    assert r["median_seconds"] > 0 and r["floor_median_seconds"] > 0
    assert math.isfinite(r["time_over_floor"]) and r["time_over_floor"] > 0
    assert r["compile_seconds"] >= 0 and r["first_call_seconds"] > r["median_seconds"] * 0.5
    assert r["num_hparams"] == (2 if estimator == "forward" else 24) and r["num_params"] == 15
    if estimator == "floor":
        assert r["time_over_floor"] == 1.0 and r["outer_value"] is None
    else:
        assert math.isfinite(r["outer_value"]) and r["hypergrad_norm"] > 0


def test_configurations_cover_the_spec():
    settings = dict(TINY, steps=[4, 8], truncate=[1, 4, 100], estimators=list(B.ESTIMATORS), learning_rate=1.0,
                    repeats=2, max_seconds_per_config=10.0, forward_hparams=2, cg_iterations=3,
                    max_full_steps=4, max_forward_steps=4)
    labels = {(c["steps"], c["label"]) for c in B.configurations(settings)}
    assert (4, "reverse K=1") in labels and (8, "reverse K=4") in labels
    both = [c["label"] for c in B.configurations({**settings, "backward": ["recompute", "store"]}) if c["steps"] == 4]
    assert "reverse K=1 [recompute]" in both and "reverse K=1 [store]" in both and "checkpointed full K=T=4" in both
    assert (4, "reverse full K=T=4") in labels and (4, "checkpointed full K=T=4") in labels
    assert (8, "reverse full K=T=8") not in labels and (8, "forward N=2") not in labels  # skipped by flags
    assert not any("K=100" in label for _, label in labels)  # K >= T is not a truncation
    assert (8, "implicit_cg K=3") in labels and (8, "floor (hg.solve)") in labels


@pytest.mark.slow
def test_fresh_process_runner_reports_failures_as_errors():
    """experiments.common.subprocesses.run_fresh: a worker that fails or takes too long is an entry with
    the reason, never an exception that would lose the other configurations' results."""
    from experiments.common import subprocesses

    failed = subprocesses.run_fresh("experiments.no_such_module", "worker", {"a": 1}, timeout=120)
    assert set(failed) == {"error"} and "worker exited with 1 (no result)" in failed["error"]
    assert "No module named experiments.no_such_module" in failed["error"]
    assert subprocesses.run_fresh("experiments.benchmark", "worker", {}, timeout=0.01) == {
        "error": "timed out after 0 s"}


@pytest.mark.slow
def test_program_end_to_end(tmp_path):
    """`python -m experiments.benchmark --quick`: one fresh process per configuration, table and JSON."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", "--quick", "--steps=2,4", "--truncate=1",
         "--estimators=reverse", "--backward=store", f"--output_dir={tmp_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| T | configuration |" in done.stdout and "Time / floor vs targets" in done.stdout
    report = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "benchmark.png").stat().st_size > 0
    assert f"[estimators suite] results.json and benchmark.png in {tmp_path} (" in done.stdout
    assert report["date"] and report["environment"]["cpu_count"] >= 1 and len(report["environment"]["load_average_end"]) == 3
    assert report["environment"]["tensorflow"] == tf.__version__ and report["environment"]["platform"]
    results = report["results"]
    assert [(r["steps"], r["estimator"], r["truncate"]) for r in results] == [
        (2, "reverse", 1), (2, "reverse", 2), (4, "reverse", 1), (4, "reverse", 4),
    ]
    for r in results:
        assert "error" not in r, r.get("error")
        assert r["median_seconds"] > 0 and math.isfinite(r["time_over_floor"]) and r["compile_seconds"] >= 0
        assert r["min_time_over_floor"] > 0 and r["cpu_over_floor"] > 0 and r["compile_cpu_seconds"] >= 0
        assert r["rss_before_bytes"] > 0
        for key in ("process_peak_growth_bytes", "allocator_peak_growth_bytes"):
            assert r[key] is not None or not LINUX, key
            assert r[key] is None or r[key] >= 0
        assert math.isfinite(r["outer_value"]) and r["hypergrad_norm"] > 0
        assert r["stored_state_bytes"] == r["truncate"] * r["num_params"] * 4
        assert r["backward"] == r["backward_used"] == "store" and r["label"].endswith(" [store]")
    summary = report["summary"]
    assert {(c["steps"], c["truncate"]) for c in summary["time_vs_targets"]} == {(2, 1), (2, 2), (4, 1), (4, 4)}
    assert all(isinstance(c["met"], bool) for c in summary["time_vs_targets"])
    memory = summary["memory"]
    assert memory["small_T"] == 2 and memory["large_T"] == 4
    assert [e["truncate"] for e in memory["krmd_large_vs_small_T"]] == [1]
    assert memory["full_rmd_growth"]["expected_increase_bytes"] == 2 * results[0]["num_params"] * 4
    [compile_check] = summary["compile_full_rmd"]
    assert compile_check["steps"] == 2 and isinstance(compile_check["met"], bool)
    # The online suite (run by default): one hyper-iteration over T plain Keras steps, in one process.
    online = json.loads((tmp_path / "online_results.json").read_text())
    assert [(r["jit_compile"], r["T"], r["K"], r["estimator"]) for r in online["results"]] == [
        (jit, T, K, estimator) for jit in (True, False)
        for T, K, estimator in ((2, 1, "reverse"), (1, 1, "reverse"), (2, None, "forward"))
    ]
    for r in online["results"]:
        assert set(r["median_seconds"]) == {"bilevel", "plain_per_step", "plain_fused"}
        assert all(v > 0 for v in r["median_seconds"].values())
        assert r["ratio_to_plain_per_step"] == r["median_seconds"]["bilevel"] / r["median_seconds"]["plain_per_step"]
        assert r["num_params"] > 0
        assert r["train_step_traces"] == 1, r  # traced once, never retraced per hyper-iteration
        assert 1 <= r["rounds"] == len(r["times_seconds"]["bilevel"]) <= online["settings"]["repeats"]
        assert r["target"] == (1 + r["num_hyperparameters"] if r["estimator"] == "forward" else {(1, 1): 5.0}.get((r["T"], r["K"])))
    assert "ratio per-step" in done.stdout


# ----------------------------------------------------------------------------------------
# The cnn suite (experiments/benchmarks/cnn.py).
# ----------------------------------------------------------------------------------------
from experiments.benchmarks import cnn as C  # noqa: E402


@pytest.mark.parametrize("size,stride", [(8, 2), (7, 2), (6, 1)])
def test_patch_conv_is_conv2d(size, stride):
    """The benchmark's convolution (a matmul over patches) against tf.nn.conv2d, value and gradients."""
    rng = np.random.default_rng(size)
    x = tf.constant(rng.standard_normal((2, size, size, 3)).astype(np.float32))
    kernel = tf.constant(rng.standard_normal((3, 3, 3, 4)).astype(np.float32))
    results = []
    for conv in (C.patch_conv, lambda x, k, s: tf.nn.conv2d(x, k, s, "SAME")):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = conv(x, kernel, stride)
            loss = tf.reduce_sum(tf.sin(y))
        results.append([y, *tape.gradient(loss, [x, kernel])])
    assert results[0][0].shape == (2, -(-size // stride), -(-size // stride), 4)
    for a, b in zip(*results):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)


def test_cnn_hypergradient_store_recompute_and_forward_agree():
    """On the tiny CNN: both backward passes of full RMD and forward mode (Eq. 7) give one
    hypergradient of the per-kernel log weight decays; the conv2d form gives the same f."""
    p = C.cnn_problem(**C.QUICK_SIZE, seed=0)
    assert p.hparams.shape == (4,) and C.num_params(p.params) == 295  # 2 conv + 2 dense kernels
    args = (p.params, p.hparams, p.inner_batch, p.outer_batch)
    grads = {}
    # Forward mode without XLA: under XLA, TF lowers the strided slices' gradient to
    # XlaDynamicUpdateSlice, which has no gradient for forward mode's second differentiation.
    for name, kwargs in (("store", dict(backward="store", jit_compile=True)),
                         ("recompute", dict(backward="recompute", jit_compile=True)),
                         ("forward", dict(estimator="forward", jit_compile=False))):
        hg = tfb.hypergradient_fn(p.inner_loss, p.outer_loss, steps=4, learning_rate=0.5, **kwargs)
        value, grads[name] = hg(*args)
        assert name == "forward" or hg.backward_used == name
    assert np.abs(grads["forward"].numpy()).max() > 1e-7
    for name in ("store", "recompute"):
        np.testing.assert_allclose(grads[name].numpy(), grads["forward"].numpy(), rtol=2e-3, atol=1e-9)
    q = C.cnn_problem(**C.QUICK_SIZE, seed=0, conv="conv2d")
    np.testing.assert_allclose(q.outer_loss(q.params, q.hparams, q.outer_batch).numpy(),
                               p.outer_loss(p.params, p.hparams, p.outer_batch).numpy(), rtol=1e-5)


def test_cnn_configurations():
    settings = dict(C.QUICK_SIZE, steps=[4, 8], truncate=[1, 5, 25], backward=["recompute", "store"],
                    max_full_steps=8, max_store_full_steps=4, learning_rate=0.1, repeats=2, seed=0, conv="patches")
    labels = [(c["steps"], c["label"]) for c in C.configurations(settings)]
    assert labels[:8] == [(4, "floor (hg.solve)"), (4, "1-RMD [recompute]"), (4, "1-RMD [store]"),
                          (4, "full RMD [recompute]"), (4, "full RMD [store]"), (4, "checkpointed full RMD"),
                          (8, "floor (hg.solve)"), (8, "1-RMD [recompute]")]
    assert (8, "5-RMD [store]") in labels and (8, "full RMD [recompute]") in labels
    assert (8, "full RMD [store]") not in labels and not any("25-RMD" in label for _, label in labels)


def test_cnn_row_of_an_estimator_without_a_stored_state_count():
    """Stored states are known per estimator (experiments/common/memory.py), None for another one
    (neumann): its row holds None bytes, shown as "-", not a TypeError; truncate=None is full RMD (T)."""
    config = dict(C.QUICK_SIZE, estimator="neumann", steps=2, truncate=None, backward=None, learning_rate=0.1,
                  repeats=1, seed=0, conv="patches", label="neumann")
    row = C.measure(config)
    assert row["stored_states"] is None and row["stored_state_bytes"] is None
    assert np.isfinite(row["hypergrad_norm"])
    assert C.format_table([row]).splitlines()[-1].endswith("| - |")
    full = C.measure({**config, "estimator": "reverse", "label": "full RMD"})
    assert full["stored_states"] == 2 and full["stored_state_bytes"] == 2 * C.num_params(C.cnn_problem(**C.QUICK_SIZE, seed=0).params) * 4


@pytest.mark.slow
def test_cnn_suite_end_to_end(tmp_path):
    """`python -m experiments.benchmark --suites=cnn --quick`: fresh processes, table, summary, JSON."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", "--suites=cnn", "--quick", "--cnn_steps=2,3",
         "--cnn_truncate=1", "--cnn_max_full_steps=2", "--cnn_backward=store", f"--output_dir={tmp_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| T | configuration |" in done.stdout and "Allocator peak of K-RMD" in done.stdout
    report = json.loads((tmp_path / "cnn_results.json").read_text())
    assert not (tmp_path / "results.json").exists()  # only the cnn suite ran
    results = report["results"]
    assert [(r["steps"], r["estimator"], r["truncate"], r["backward"]) for r in results] == [
        (2, "floor", None, None), (2, "reverse", 1, "store"), (2, "reverse", 2, "store"),
        (2, "checkpointed", 2, "recompute"), (3, "floor", None, None), (3, "reverse", 1, "store"),
    ]  # (recompute is run in test_cnn_hypergradient_store_recompute_and_forward_agree)
    for r in results:
        assert "error" not in r, r.get("error")
        assert r["median_seconds"] > 0 and math.isfinite(r["time_over_floor"]) and r["compile_seconds"] >= 0
        assert r["num_params"] == 295 and r["stored_state_bytes"] == r["stored_states"] * 295 * 4
        for key in ("process_peak_growth_bytes", "allocator_peak_growth_bytes"):
            assert r[key] is not None or not LINUX, key
            assert r[key] is None or r[key] >= 0
        if r["estimator"] == "floor":
            assert r["backward_used"] is None and r["outer_value"] is None
        else:
            assert r["backward_used"] == r["backward"] and r["hypergrad_norm"] > 0
        if r["estimator"] == "reverse":  # the patches' concat: ConcatOffset in the gradient
            assert r["auto_backward"] == "recompute" and r["step_storable"] is False
    summary = report["summary"]
    assert [(e["backward"], e["truncate"]) for e in summary["krmd_flat_in_T"]] == [("store", 1)]
    assert [(e["backward"], e["steps"], e["truncate"]) for e in summary["full_over_5rmd"]] == [("store", 2, 1)]
    assert summary["full_rmd_growth"] == []  # full RMD at one T only


@pytest.mark.slow
def test_metabatch_suite_quick(tmp_path):
    """`python -m experiments.benchmarks.metabatch --quick` (the suite's standalone entry point; the
    benchmark program's `--suites=` selection is run with the cnn suite): the meta-batch sweep (B,
    XLA on/off) of the one-shot network in one process, table and JSON with the ratios. The suite's
    one end-to-end run: its trainers' XLA compiles make it the costliest suite to run twice."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, "-m", "experiments.benchmarks.metabatch", "--quick", f"--output_dir={tmp_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "per-task / B=1" in done.stdout and "Targets (XLA)" in done.stdout
    report = json.loads((tmp_path / "metabatch_results.json").read_text())
    rows = report["results"]
    assert [(r["T"], r["path"], r["jit_compile"], r["meta_batch"]) for r in rows] == [
        (2, "stacked", True, 1), (2, "stacked", True, 2), (2, "stacked", False, 1), (2, "stacked", False, 2),
    ]
    by_config = {(r["jit_compile"], r["meta_batch"]): r for r in rows}
    for r in rows:
        assert "error" not in r, r
        assert r["path_used"] == "stacked" and r["median_seconds"] > 0 and r["num_inner_params"] > 0
        assert r["per_task_seconds"] == r["median_seconds"] / r["meta_batch"]
        assert r["xla_over_no_xla"] == by_config[(True, r["meta_batch"])]["median_seconds"] / by_config[(False, r["meta_batch"])]["median_seconds"]
        assert r["per_task_over_smallest_batch"] == r["per_task_seconds"] / by_config[(r["jit_compile"], 1)]["per_task_seconds"]
    [check] = report["summary"]
    assert check["meta_batch"] == 2 and isinstance(check["batching_met"], bool) and isinstance(check["xla_met"], bool)
    assert not (tmp_path / "results.json").exists()  # only the meta-batch suite ran


def _config_from(program_, *flags_):
    from absl import flags

    from experiments.common import program

    values = flags.FlagValues()
    program.define_flags(program_, values)
    values([program_.name, "--quick", "--output_dir=unused", *flags_])
    return program.config_from_flags(program_, values)


SUITE_FLAGS = [
    ("cnn", ["--cnn_steps=2", "--cnn_truncate=1", "--cnn_max_full_steps=2", "--cnn_backward=store", "--cnn_repeats=1"]),
    ("online", ["--online_configs=1x1", "--repeats=1"]),
]


@pytest.mark.parametrize("suite, flags_", SUITE_FLAGS)
def test_a_standalone_suite_measures_what_the_benchmark_program_measures(suite, flags_):
    """`python -m experiments.benchmarks.<suite>` and `python -m experiments.benchmark --suites=<suite>`
    give the suite the same settings from the same flags (--quick included); both then call the
    suite's run (test_program_end_to_end runs the online suite, test_cnn_suite_end_to_end the cnn
    one, test_metabatch_suite_quick a standalone entry point end to end)."""
    import importlib

    module = importlib.import_module(f"experiments.benchmarks.{suite}")
    standalone = module.PROGRAM.prepare(_config_from(module.PROGRAM, *flags_))
    assert module.PROGRAM.name == f"benchmarks.{suite}" and isinstance(standalone, module.Config)
    assert B.suite_settings(_config_from(B.PROGRAM, *flags_, f"--suites={suite}")) == {
        suite: module.settings_of(standalone)}


@pytest.mark.slow
@pytest.mark.parametrize("suite, flag, message", [
    ("cnn", "--cnn_backward=sideways", "--cnn_backward: unknown ['sideways']"),
    ("online", "--online_configs=3y1", "--online_configs: each entry is TxK or Txf"),
])
def test_a_standalone_suite_starts_and_checks_its_flags_before_measuring(tmp_path, suite, flag, message):
    """`python -m experiments.benchmarks.<suite> --quick` (the README's standalone entry points)
    parse the suite's flags and build its settings in a fresh process: a bad value is refused with
    the usage status and the flag's name, before anything is measured or written. (Their
    measurements: test_a_standalone_suite_measures_what_the_benchmark_program_measures.)"""
    import program_runs

    out = tmp_path / "out"
    returncode, output = program_runs.run(["-m", f"experiments.benchmarks.{suite}", "--quick", flag,
                                           f"--output_dir={out}"], tmp_path / "log.txt")
    assert returncode == 2 and message in output and "Traceback" not in output, output[-3000:]
    assert not out.exists()
