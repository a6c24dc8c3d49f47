"""Tests for experiments/task_interaction.py and experiments/models/features.py (offline, fast)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `experiments` is not an installed package.
from experiments.data import sources  # noqa: E402
from experiments.models import features as F  # noqa: E402
from experiments.common import program  # noqa: E402
from experiments import task_interaction as ti  # noqa: E402
from offline_data import MNIST_DIR, needs_mnist, write_mnist_subset  # noqa: E402
import program_runs  # noqa: E402



def quick_config(tmp_path: Path, **overrides) -> ti.Config:
    """The program's flag defaults in --quick mode, as run() receives them."""
    fv = flags.FlagValues()
    program.define_flags(ti.PROGRAM, fv)
    fv(["task_interaction", "--quick", f"--output_dir={tmp_path / 'out'}",
        f"--data_dir={tmp_path / 'tfds'}"] + [f"--{k}={v}" for k, v in overrides.items()])
    return program.config_from_flags(ti.PROGRAM, fv)


def check_results(cfg: ti.Config) -> dict:
    out = Path(cfg.output_dir)
    results = json.loads((out / "results.json").read_text())
    assert (out / "fig6_task_interaction.png").stat().st_size > 0
    assert set(results["runs"]) == {"1", "full"}
    for name, rows in results["runs"].items():
        assert len(rows) == cfg.trials
        for row in rows:
            assert 0.0 <= row["test_acc"] <= 1.0 and 0.0 <= row["initial_test_acc"] <= 1.0
            assert 1 <= row["iterations"] <= cfg.max_hyper_iterations
            assert row["rho"] > 0 and row["coupling_offdiag"]["min"] > 0
        curves = rows[0]["curves"]
        assert len(curves["val_loss"]) == rows[0]["iterations"]
        assert all(np.isfinite(curves["exact_norm"]))
        assert all(-1 - 1e-6 <= c <= 1 + 1e-6 for c in curves["cosine"])
    # (The full run's cosine is cos(h, h) by construction, so it is not checked here: full RMD
    # against finite differences and K-RMD against forward mode are the in-process tests below.)
    return results


# --------------------------------------------------------------------------
# The problem's pieces.
# --------------------------------------------------------------------------


def test_coupling_is_symmetric_and_positive_by_construction():
    b = tf.random.stateless_normal([6, 6], seed=[1, 2]) * 30.0  # includes very negative B_ij
    c = ti.coupling_matrix(b).numpy()
    np.testing.assert_array_equal(c, c.T)
    assert (c > 0).all()
    assert float(ti.regularization(tf.constant(-40.0))) > 0


def test_pairwise_coupling_matches_the_double_sum():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 7))
    c = ti.coupling_matrix(tf.constant(rng.normal(size=(5, 5)))).numpy()
    direct = sum(c[i, j] * np.sum((w[i] - w[j]) ** 2) for i in range(5) for j in range(5))
    np.testing.assert_allclose(float(ti.pairwise_coupling(tf.constant(w), tf.constant(c))),
                               direct, rtol=1e-10)


def test_initial_hparams_give_the_requested_coupling_and_rho():
    hp = ti.initial_hparams(4, init_coupling=0.02, init_rho=0.003)
    c = ti.coupling_matrix(hp["B"]).numpy()
    np.testing.assert_allclose(c, 0.02, rtol=1e-5)
    np.testing.assert_allclose(float(ti.regularization(hp["nu"])), 0.003, rtol=1e-5)


def tiny_problem(seed: int = 0):
    """V=3 tasks, d=4 features, 9 training / 6 validation examples, float64."""
    rng = np.random.default_rng(seed)
    x_tr, x_va = rng.normal(size=(9, 4)), rng.normal(size=(6, 4))
    y_tr, y_va = np.arange(9) % 3, rng.integers(0, 3, 6)
    train = (tf.constant(x_tr), tf.constant(y_tr))
    val = (tf.constant(x_va), tf.constant(y_va))
    hp = {"B": tf.constant(rng.normal(size=(3, 3)) - 2.0), "nu": tf.constant(-1.5, tf.float64)}
    return ti.initial_params(3, 4, tf.float64), hp, train, val


STEPS = 20


@pytest.fixture(scope="module")
def tiny():
    """The tiny problem and its exact hypergradient (full RMD, XLA-compiled), built once."""
    w0, hp, train, val = tiny_problem()
    hg = ti.make_hypergradient(None, steps=STEPS, inner_lr=0.1, jit_compile=True)
    return (w0, hp, train, val), hg, hg(w0, hp, train, val)[1]


def test_full_rmd_hypergradient_matches_finite_differences(tiny):
    """d_λ f of the program's own losses (full RMD) vs. central differences of f(w_T(λ))."""
    (w0, hp, train, val), hg, grad = tiny

    def f(hparams):
        w_t = hg.solve(w0, hparams, train)
        return float(ti.outer_loss(w_t, hparams, val))

    eps = 1e-5
    b = hp["B"].numpy()
    fd_b = np.zeros_like(b)
    for i in range(3):
        for j in range(3):
            e = np.zeros_like(b)
            e[i, j] = eps
            fd_b[i, j] = (f({**hp, "B": tf.constant(b + e)}) - f({**hp, "B": tf.constant(b - e)})) / (2 * eps)
    nu = float(hp["nu"])
    fd_nu = (f({**hp, "nu": tf.constant(nu + eps, tf.float64)})
             - f({**hp, "nu": tf.constant(nu - eps, tf.float64)})) / (2 * eps)
    np.testing.assert_allclose(grad["B"].numpy(), fd_b, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(float(grad["nu"]), fd_nu, rtol=1e-5, atol=1e-9)
    assert np.abs(fd_b).max() > 1e-4 and abs(fd_nu) > 1e-4  # the check is not vacuous
    np.testing.assert_allclose(np.diag(grad["B"].numpy()), 0.0, atol=1e-12)  # C_ii is inert


def test_truncated_hypergradient_approaches_full_rmd_and_matches_forward_mode(tiny):
    """Full RMD == FMD (Eq. 7), and the K-RMD bias shrinks as K grows (Prop. 3.1)."""
    (w0, hp, train, val), _, exact = tiny

    def estimate(truncate, estimator="reverse"):
        hg = ti.tfb.hypergradient_fn(ti.inner_loss, ti.outer_loss, steps=STEPS, learning_rate=0.1,
                                     truncate=truncate, estimator=estimator)
        return hg(w0, hp, train, val)[1]

    forward = estimate(None, "forward")
    np.testing.assert_allclose(forward["B"], exact["B"], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(forward["nu"], exact["nu"], rtol=1e-8)
    err_1, err_15 = (float(ti.tfb.diagnostics.relative_error(estimate(k), exact)) for k in (1, 15))
    assert err_1 > err_15 > 0


def test_outer_adam_matches_keras_adam():
    """λ's update is the library's Adam (tfb.adam, as the outer optimizer): Keras' Adam steps,
    up to where ε enters (ε·sqrt(1 − β₂ᵗ) vs ε, and ε_root = 1e-12 under the square root)."""
    import keras

    rng = np.random.default_rng(0)
    init = rng.normal(size=(3, 2)).astype(np.float32)
    grads = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(4)]
    var = keras.Variable(init)
    opt = keras.optimizers.Adam(learning_rate=0.05, epsilon=1e-8)
    adam = ti.outer_adam(0.05)
    hp = {"x": tf.constant(init)}
    state = adam.init(hp)
    for g in grads:
        opt.apply_gradients([(tf.constant(g), var)])
        updates, state = adam.update({"x": tf.constant(g)}, state, hp, None, state.count)
        hp = {"x": hp["x"] + updates["x"]}
    np.testing.assert_allclose(hp["x"].numpy(), var.numpy(), rtol=1e-5, atol=1e-6)


def test_balanced_split_is_disjoint_balanced_and_covers_the_rest():
    labels = np.repeat(np.arange(10), 20)
    tr, va, te = ti.balanced_split(labels, 50, 10, np.random.default_rng(0))
    assert len(tr) == len(va) == 50 and len(te) == 100
    assert np.bincount(labels[tr]).tolist() == [5] * 10 == np.bincount(labels[va]).tolist()
    assert len(set(tr) | set(va) | set(te)) == 200
    with pytest.raises(ValueError, match="multiple of the number of classes"):
        ti.balanced_split(labels, 55, 10, np.random.default_rng(0))


def test_improvement_rule_breaks_error_ties_with_the_loss():
    improved = ti.make_improvement_rule("error", min_delta=1e-3)
    assert improved([0.3, 1.0], None)
    assert improved([0.28, 2.0], [0.3, 1.0])       # lower error wins whatever the loss
    assert improved([0.3, 0.9], [0.3, 1.0])        # tie on error, clearly lower loss
    assert not improved([0.3, 0.9995], [0.3, 1.0])  # below min_delta
    assert not improved([0.32, 0.1], [0.3, 1.0])
    assert ti.make_improvement_rule("loss", 0.0)([0.9, 0.5], [0.1, 0.6])


def test_parse_truncate():
    assert ti.parse_truncate(["1", "5", "full"], 100) == [1, 5, None]
    with pytest.raises(ValueError, match="truncate"):
        ti.parse_truncate(["101"], 100)


def test_pixel_features_and_normalization():
    images = np.full((2, 2, 2, 1), 255, np.uint8)
    np.testing.assert_array_equal(F.pixel_features(images), np.ones((2, 4), np.float32))
    x = F.normalize_features(np.array([[3.0, 4.0], [0.0, 0.0]]), scale=2.0)
    np.testing.assert_allclose(x, [[1.2, 1.6], [0.0, 0.0]])


def test_missing_imagenet_weights_fail_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # empty ~/.keras/models
    monkeypatch.setattr(sources, "network_reachable", lambda *a, **k: False)
    with pytest.raises(F.FeaturesUnavailableError, match="--features=pixels"):
        F.ensure_weights_available("resnet50", "imagenet")


# --------------------------------------------------------------------------
# End to end.
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_quick_run_on_mock_cifar10_with_random_resnet50(tmp_path, monkeypatch):
    """The paper's path: tfds cifar10 (mocked) -> ResNet50 pooled features -> K-RMD."""
    monkeypatch.setattr(sources, "network_reachable", lambda *a, **k: True)  # tfds mock: no download
    cfg = quick_config(tmp_path, dataset="cifar10", features="pretrained", weights="random",
                       image_size=32, m=10)
    with tfds.testing.mock_data(num_examples=60):
        results = program.run_program(ti.PROGRAM, cfg)
    assert results["feature_dim"] == 2048 and results["num_examples"] == 120
    assert "resnet50" in results["features_description"]
    check_results(cfg)


def _start_task_interaction(args: list, log: Path):
    return program_runs.start(["-m", "experiments.task_interaction", *args], log)


def _mnist_args(src: Path) -> list:
    return ["--quick", "--dataset=mnist", "--features=pixels", f"--local_dir={src}"]


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory) -> tuple:
    """`--quick --dataset=mnist --features=pixels` on the first 1500 + 300 real MNIST images, run
    once per module as a subprocess, never interrupted: (the image folder, the run's Config). The
    real-MNIST test checks its results; the kill test compares its resumed run with it.
    (The program in process: the mock-CIFAR-10 run above.)"""
    root = tmp_path_factory.mktemp("task_interaction_mnist")
    src = write_mnist_subset(MNIST_DIR, root / "mnist_subset", train=1500, test=300)
    cfg = quick_config(root, dataset="mnist", features="pixels", local_dir=src)
    log = root / "uninterrupted.log"
    program_runs.finish(_start_task_interaction(
        [*_mnist_args(src), f"--output_dir={cfg.output_dir}", f"--data_dir={cfg.data_dir}"], log), log)
    return src, cfg


@pytest.mark.slow
@needs_mnist
def test_quick_run_on_real_mnist(mnist_run):
    """Offline real data: the first 1500 + 300 real MNIST images, pixel features."""
    _, cfg = mnist_run
    results = check_results(cfg)
    assert results["num_examples"] == 1800 and results["feature_dim"] == 784
    # Real digits with 5 labelled examples per class: far above chance (10%).
    assert results["summary"]["full"]["test_acc_mean"] > 0.4


# --------------------------------------------------------------------------
# Resuming after SIGKILL (the program, as a subprocess).
# --------------------------------------------------------------------------


@pytest.mark.slow
@needs_mnist
def test_killed_run_rerun_with_the_same_command_ends_with_the_same_results(tmp_path, mnist_run):
    """SIGKILL after the first (trial, K) run is stored, then the same command again: that run is
    reloaded, not redone, and results.json equals an uninterrupted run's (the module's real-MNIST
    run: the same command but for the folders; timings aside)."""
    src, reference_cfg = mnist_run
    reference_dir, resumed_dir = Path(reference_cfg.output_dir), tmp_path / "resumed"
    log_path = tmp_path / "resumed.log"
    resumed_args = _mnist_args(src) + [f"--output_dir={resumed_dir}", f"--data_dir={tmp_path / 'tfds_resumed'}",
                                       "--pause_after=0,1"]
    first = _start_task_interaction(resumed_args, log_path)
    program_runs.kill_when_paused(first, resumed_dir / "resume" / "paused_0_1", log_path)
    assert sorted(p.name for p in (resumed_dir / "resume").glob("trial*.json")) == ["trial0_1.json"]
    program_runs.finish(_start_task_interaction(resumed_args, log_path), log_path)
    log = log_path.read_text()
    assert log.count("[trial 0 K=1] finished by an earlier run") == 1
    assert "[trial 0 K=full] finished by an earlier run" not in log

    expected = json.loads((reference_dir / "results.json").read_text())
    results = json.loads((resumed_dir / "results.json").read_text())
    without_timing = lambda d: {k: v for k, v in d.items() if k not in ("sec_per_iter", "sec_per_iter_mean")}  # noqa: E731
    assert set(results["runs"]) == set(expected["runs"]) == {"1", "full"}
    for name, rows in expected["runs"].items():
        assert len(rows) == 2
        assert [without_timing(r) for r in results["runs"][name]] == [without_timing(r) for r in rows], name
        assert without_timing(results["summary"][name]) == without_timing(expected["summary"][name])


def test_resume_refuses_a_different_configuration(tmp_path):
    cfg = quick_config(tmp_path)
    program.guard_state(ti.PROGRAM, cfg)
    program.guard_state(ti.PROGRAM, dataclasses.replace(cfg, trials=5))  # more trials reuse the stored runs
    with pytest.raises(ValueError, match=r"outer_lr: .*another --output_dir.*delete"):
        program.guard_state(ti.PROGRAM, dataclasses.replace(cfg, outer_lr=0.5))
    with pytest.raises(ValueError, match="--pause_after must be TRIAL,K"):
        ti.parse_pause_after("full")
