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
from experiments._memory import PeakMemory  # noqa: E402

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


@pytest.mark.parametrize("truncate", [2, 5])  # K-RMD and full RMD (K = T = 5)
def test_autodiff_prototype_matches_engine(truncate):
    """The prototype (TF autodiff of the last K steps) is a second, independent K-RMD estimator."""
    p = B.hypercleaning_problem(**TINY)
    hparams = tf.constant(np.random.default_rng(1).standard_normal(24).astype(np.float32))
    hg = tfb.hypergradient_fn(p.inner_loss, p.outer_loss, steps=5, learning_rate=1.0, truncate=truncate)
    value, grad = hg(p.params, hparams, p.inner_batch, p.outer_batch)
    value_ad, grad_ad = B.autodiff_hypergradient_fn(hg)(p.params, hparams, p.inner_batch, p.outer_batch)
    np.testing.assert_allclose(value_ad.numpy(), value.numpy(), rtol=1e-6)
    assert np.linalg.norm(grad.numpy()) > 0
    np.testing.assert_allclose(grad_ad.numpy(), grad.numpy(), rtol=1e-4, atol=1e-7)


def test_peak_memory_sees_a_large_allocation():
    size = 64 * 2**20
    with PeakMemory() as process_probe:
        block = np.ones(size // 8)  # touched pages: resident
        block[::512] += 1.0
    del block
    assert process_probe.process_peak_growth is None or process_probe.process_peak_growth >= 0.9 * size
    with PeakMemory() as tf_probe:
        tensor = tf.fill([size // 4], 1.0)
        tf.reduce_sum(tensor).numpy()
    del tensor
    assert tf_probe.allocator_peak_growth is None or tf_probe.allocator_peak_growth >= size


@pytest.mark.parametrize(
    "estimator,truncate",
    [("floor", None), ("checkpointed", 6), ("forward", None), ("implicit_cg", 3), ("reverse_autodiff", 2)],
)
def test_measure_each_estimator_in_process(estimator, truncate):
    r = B.measure(_config(estimator, 6, truncate))
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
    assert (4, "reverse full K=T=4") in labels and (4, "checkpointed full K=T=4") in labels
    assert (8, "reverse full K=T=8") not in labels and (8, "forward N=2") not in labels  # skipped by flags
    assert not any("K=100" in label for _, label in labels)  # K >= T is not a truncation
    assert (8, "implicit_cg K=3") in labels and (8, "floor (hg.solve)") in labels


def test_program_end_to_end(tmp_path):
    """`python -m experiments.benchmark --quick`: one fresh process per configuration, table and JSON."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", "--quick", "--steps=2,4", "--truncate=1",
         "--estimators=reverse", f"--output_dir={tmp_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| T | configuration |" in done.stdout and "Time / floor vs targets" in done.stdout
    report = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "benchmark.png").stat().st_size > 0
    assert report["date"] and report["machine"]["cpu_count"] >= 1
    assert report["machine"]["tensorflow"] == tf.__version__ and report["machine"]["platform"]
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
            assert r[key] is None or r[key] >= 0
        assert math.isfinite(r["outer_value"]) and r["hypergrad_norm"] > 0
        assert r["stored_state_bytes"] == r["truncate"] * r["num_params"] * 4
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
    assert [(r["T"], r["K"]) for r in online["results"]] == [(2, 1), (1, 1)]
    for r in online["results"]:
        assert set(r["median_seconds"]) == {"bilevel", "plain_per_step", "plain_fused"}
        assert all(v > 0 for v in r["median_seconds"].values())
        assert r["ratio_to_plain_per_step"] == r["median_seconds"]["bilevel"] / r["median_seconds"]["plain_per_step"]
        assert r["num_params"] > 0
    assert "ratio per-step" in done.stdout


def test_metabatch_suite_quick(tmp_path):
    """`python -m experiments.benchmark --suites=metabatch --quick`: the meta-batch sweep (B, XLA
    on/off) of the one-shot network in one process, table and JSON with the ratios."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", "--quick", "--suites=metabatch", f"--output_dir={tmp_path}"],
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
        assert r["path_used"] == "stacked" and r["median_seconds"] > 0 and r["num_inner_params"] > 0
        assert r["per_task_seconds"] == r["median_seconds"] / r["meta_batch"]
        assert r["xla_over_no_xla"] == by_config[(True, r["meta_batch"])]["median_seconds"] / by_config[(False, r["meta_batch"])]["median_seconds"]
        assert r["per_task_over_smallest_batch"] == r["per_task_seconds"] / by_config[(r["jit_compile"], 1)]["per_task_seconds"]
    [check] = report["summary"]
    assert check["meta_batch"] == 2 and isinstance(check["batching_met"], bool) and isinstance(check["xla_met"], bool)
    assert not (tmp_path / "results.json").exists()  # the estimators suite was not asked for
