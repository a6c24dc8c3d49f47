"""End-to-end test of experiments/toy.py (§4.1, Figs. 1–4) in --quick mode.

The program is run once as `python -m experiments.toy --quick` (the real CLI, in a subprocess so
its absl flags cannot collide with other experiment modules). Its results.json is checked against
references computed here with numpy alone: ŵ by simulating the T inner gradient-descent steps,
h_{T−K} = (I − (I − γG)^K) ∇ŵ f(ŵ) (Eq. 8 with A = I − γG, B = γG), and Eq. 10.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The §4.1 problem, restated independently of the program.
T, GAMMA = 100, 0.1
G = np.array([1.0, 0.5])
W0 = np.array([2.0, 2.0])
ALPHA = 0.5
PENALTY, ANCHOR = 5.0, np.array([1.0, 0.0])
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def inner_solution_by_simulation(lam: np.ndarray) -> np.ndarray:
    w = W0.copy()
    for _ in range(T):
        w = w - GAMMA * G * (w - lam)
    return w


def grad_f(w: np.ndarray) -> np.ndarray:
    return 2.0 * w + 20.0 * np.sin(w) * np.cos(w)


def reference_hypergradient(lam: np.ndarray, k: int, tilde: bool = False) -> np.ndarray:
    h = (np.eye(2) - np.diag((1.0 - GAMMA * G) ** k)) @ grad_f(inner_solution_by_simulation(lam))
    return h + 2.0 * PENALTY * (lam - ANCHOR) if tilde else h


def reference_objective(lam: np.ndarray, tilde: bool) -> np.ndarray:
    """F on a batch of λ's via the closed form ŵ = C w0 + (I − C) λ."""
    C = (1.0 - GAMMA * G) ** T
    w = C * W0 + (1.0 - C) * lam
    value = np.sum(w**2 + 10.0 * np.sin(w) ** 2, axis=-1)
    return value + PENALTY * np.sum((lam - ANCHOR) ** 2, axis=-1) if tilde else value


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.toy", "--quick", f"--output_dir={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "results.json") as fh:
        return out, json.load(fh)


@pytest.mark.slow
def test_truncated_hypergradients_at_1_1_match_closed_form(quick_run):
    _, res = quick_run
    fig1 = res["fig1"]
    lam = np.array([1.0, 1.0])
    assert fig1["lambda"] == [1.0, 1.0]
    assert len(fig1["truncations"]) >= 3 and 1 in fig1["truncations"] and T in fig1["truncations"]
    for k in fig1["truncations"]:
        np.testing.assert_allclose(fig1["hypergradients"][str(k)], reference_hypergradient(lam, k), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fig1["exact_hypergradient"], reference_hypergradient(lam, T), rtol=1e-10)
    np.testing.assert_allclose(fig1["w_hat_engine"], inner_solution_by_simulation(lam), rtol=1e-12)


@pytest.mark.slow
def test_errors_within_prop_3_1_bound(quick_run):
    _, res = quick_run
    fig1 = res["fig1"]
    lam = np.array([1.0, 1.0])
    grad_norm = np.linalg.norm(grad_f(inner_solution_by_simulation(lam)))
    exact = reference_hypergradient(lam, T)
    for k, err, bound in zip(fig1["truncations"], fig1["errors"], fig1["bounds"]):
        expected_bound = (1 - GAMMA * ALPHA) ** k / (GAMMA * ALPHA) * grad_norm * GAMMA  # Eq. 10, M_B = ‖γG‖
        np.testing.assert_allclose(bound, expected_bound, rtol=1e-12)
        np.testing.assert_allclose(err, np.linalg.norm(reference_hypergradient(lam, k) - exact), atol=1e-10)
        assert err <= bound, f"K={k}: error {err} exceeds the bound {bound}"


@pytest.mark.slow
def test_figures_are_valid_pngs(quick_run):
    out, res = quick_run
    from matplotlib import image

    for name in ("fig1", "fig2", "fig3", "fig4"):
        path = out / f"{name}.png"
        assert res["figures"][name] == path.name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        pixels = image.imread(path)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400
        assert pixels.std() > 0.01  # not a blank canvas


@pytest.mark.slow
def test_estimators_compiled_once(quick_run):
    _, res = quick_run
    assert res["tracing_counts"] and set(res["tracing_counts"].values()) == {1}


@pytest.mark.slow
def test_one_rmd_converges_on_f(quick_run):
    """Theorem 3.4: with ∇λ f = 0, 1-RMD drives F down to a stationary point."""
    _, res = quick_run
    run = res["fig4"]["runs"]["1"]
    values, grad_norms = np.array(run["values"]), np.array(run["exact_grad_norms"])
    assert values[-1] < 1e-4 * values[0]
    assert grad_norms[-1] < 1e-3 * grad_norms[0]
    C = (1.0 - GAMMA * G) ** T
    lam_star = -C * W0 / (1.0 - C)  # ŵ = 0: the optimum is offset from the origin
    np.testing.assert_allclose(res["fig4"]["optimum"]["lambda"], lam_star, atol=1e-10)
    assert np.linalg.norm(np.array(run["lambdas"][-1]) - lam_star) < 1e-3
    # The first update has norm first_step_norm (footnote 4).
    first_step = np.array(run["lambdas"][1]) - np.array(run["lambdas"][0])
    np.testing.assert_allclose(np.linalg.norm(first_step), res["config"]["first_step_norm"], rtol=1e-12)


@pytest.mark.slow
def test_one_rmd_is_biased_on_f_tilde(quick_run):
    """Theorem 3.5 / Fig. 3: with ∇λ f̃ ≠ 0, the 1-RMD limit stays away from the optimum while
    full RMD reaches it."""
    _, res = quick_run
    fig3 = res["fig3"]
    opt = np.array(fig3["optimum"]["lambda"])
    # The reported optimum is stationary and no worse than any point of an independent grid.
    np.testing.assert_allclose(reference_hypergradient(opt, T, tilde=True), 0.0, atol=1e-9)
    axis = np.linspace(-3, 3, 241)
    grid = np.stack(np.meshgrid(axis, axis, indexing="ij"), axis=-1)
    assert fig3["optimum"]["value"] <= reference_objective(grid, tilde=True).min() + 1e-12
    ks = [int(k) for k in fig3["runs"]]
    dist = dict(zip(ks, fig3["final_distance_to_optimum"]))
    assert dist[1] > 0.3
    assert dist[T] < 1e-2
    assert dist[1] > 10 * dist[T]


@pytest.mark.slow
def test_descent_ratios(quick_run):
    """Fig. 2: along the 1-RMD trajectory the ratio stays positive on f (Lemma 3.2) and becomes
    negative on f̃; the recorded ratios match the closed form at the recorded iterates."""
    _, res = quick_run
    for objective, tilde in (("f", False), ("f_tilde", True)):
        data = res["fig2"][objective]
        lams = np.array(data["lambdas"])
        for k_str, ratios in data["ratios"].items():
            d = np.array([reference_hypergradient(lam, T, tilde) for lam in lams[:20]])
            h = np.array([reference_hypergradient(lam, int(k_str), tilde) for lam in lams[:20]])
            expected = np.sum(h * d, axis=1) / np.sum(d * d, axis=1)
            np.testing.assert_allclose(ratios[:20], expected, rtol=1e-8, atol=1e-10)
    assert res["fig2"]["f"]["min_ratio"]["1"] > 0.01
    assert res["fig2"]["f_tilde"]["min_ratio"]["1"] < 0.0


def test_bad_truncation_is_rejected_with_flag_name():
    from experiments import toy

    with pytest.raises(ValueError, match="--truncations"):
        toy.ToyConfig(output_dir="/tmp/unused", truncations=[0, 5]).validated(toy.ToyProblem())
    with pytest.raises(ValueError, match="--fig1_truncations"):
        toy.ToyConfig(output_dir="/tmp/unused", fig1_truncations=[101]).validated(toy.ToyProblem())
    with pytest.raises(ValueError, match="--init_lambda"):
        toy.ToyConfig(output_dir="/tmp/unused", init_lambda=[1.0]).validated(toy.ToyProblem())
