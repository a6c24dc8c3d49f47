"""Full-RMD hypergradients against central finite differences (float64).

The reference objective F(λ) = f(w_T(λ), λ) is computed by a plain TensorFlow loop written here
(eager, first-order tapes only, with its own SGD / momentum / Adam update rules), not by the
engine. The problem is a small weighted logistic regression (non-quadratic) with
  * a learned inner learning rate γ = softplus(λ_lr) (the B_t of γ, Prop. 3.1 setting),
  * a learned initialization w0 = λ_init (the B0 term of Eq. 5),
  * an outer loss that depends on λ directly (∇_λ f ≠ 0),
  * per-example weights σ(λ_i) and an L2 strength exp(λ_l2) in the inner loss.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tensorflow as tf

import tf_bilevel as tfb

RNG = np.random.default_rng(11)
N_TRAIN, N_VAL, DIM = 5, 7, 3
X_TRAIN = RNG.normal(size=(N_TRAIN, DIM))
Y_TRAIN = (RNG.uniform(size=N_TRAIN) < 0.5).astype(np.float64)
X_VAL = RNG.normal(size=(N_VAL, DIM))
Y_VAL = (X_VAL @ np.array([1.0, -1.0, 0.5]) > 0).astype(np.float64)
# For Adam: feature 2 is identically zero and w_2 starts at 0, so ∂g/∂w_2 = e^λ w_2 is exactly 0
# at every step and Adam's second moment stays 0 there: √(ν + eps_root) keeps d√ν/dν finite
# (without eps_root the forward-mode hypergradient is NaN; checked in test_forward_mode_...).
X_TRAIN_ZERO_COL = X_TRAIN * np.array([1.0, 1.0, 0.0])
X_VAL_ZERO_COL = X_VAL * np.array([1.0, 1.0, 0.0])

STEPS = 15
FD_STEP = 1e-5
BETA = 0.8
ADAM_B1, ADAM_B2, ADAM_EPS, ADAM_EPS_ROOT = 0.9, 0.999, 1e-8, 1e-12


def _bce(params, X, y):
    logits = tf.linalg.matvec(X, params["w"]) + params["b"]
    return tf.nn.softplus(logits) - y * logits


class Case:
    """One FD problem: an inner optimizer, data, and whether w0 is learned."""

    def __init__(self, optimizer: str, learned_init: bool, X: np.ndarray, Xv: np.ndarray):
        self.optimizer, self.learned_init, self.X, self.Xv = optimizer, learned_init, X, Xv

    # -- the problem, as given to the engine -------------------------------------------
    def inner_loss(self, params, hp):
        weights = tf.sigmoid(hp["example_logits"])
        data = tf.reduce_sum(weights * _bce(params, self.X, Y_TRAIN)) / N_TRAIN
        return data + 0.5 * tf.exp(hp["log_l2"]) * tf.reduce_sum(params["w"] ** 2)

    def outer_loss(self, params, hp):
        direct = 0.3 * (hp["log_l2"] - 0.5) ** 2 + 0.2 * hp["lr"] ** 2  # ∇_λ f ≠ 0
        return tf.reduce_mean(_bce(params, self.Xv, Y_VAL)) + direct

    @staticmethod
    def learning_rate(step, hp):
        return tf.nn.softplus(hp["lr"])

    def init_params(self, params, hp):
        return {"w": hp["init"], "b": params["b"]}

    def engine_optimizer(self):
        if self.optimizer == "sgd":
            return tfb.sgd(self.learning_rate)
        if self.optimizer == "momentum":
            return tfb.momentum(self.learning_rate, beta=BETA)
        return tfb.adam(self.learning_rate, b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS, eps_root=ADAM_EPS_ROOT)

    def start(self):
        params = {"w": tf.constant([0.2, -0.1, 0.0], tf.float64), "b": tf.constant(0.1, tf.float64)}
        hparams = {
            "example_logits": tf.constant(np.linspace(-1.0, 1.5, N_TRAIN)),
            "log_l2": tf.constant(-0.5, tf.float64),
            "lr": tf.constant(-0.3 if self.optimizer != "adam" else -2.5, tf.float64),
        }
        if self.learned_init:
            hparams["init"] = tf.constant([0.4, 0.3, -0.2], tf.float64)
        return params, hparams

    # -- independent reference: a plain eager loop --------------------------------------
    def reference_objective(self, params, hp) -> float:
        w = {"w": hp["init"] if self.learned_init else params["w"], "b": params["b"]}
        lr = np.log1p(np.exp(float(hp["lr"])))  # softplus, in numpy
        velocity = {k: tf.zeros_like(v) for k, v in w.items()}
        mu = {k: tf.zeros_like(v) for k, v in w.items()}
        nu = {k: tf.zeros_like(v) for k, v in w.items()}
        for t in range(STEPS):
            with tf.GradientTape() as tape:
                tape.watch(w)
                weights = 1.0 / (1.0 + tf.exp(-hp["example_logits"]))
                logits = tf.linalg.matvec(self.X, w["w"]) + w["b"]
                loss = tf.reduce_sum(weights * (tf.math.log1p(tf.exp(logits)) - Y_TRAIN * logits)) / N_TRAIN
                loss += 0.5 * tf.exp(hp["log_l2"]) * tf.reduce_sum(w["w"] ** 2)
            grads = tape.gradient(loss, w)
            if self.optimizer == "sgd":
                w = {k: w[k] - lr * grads[k] for k in w}
            elif self.optimizer == "momentum":
                velocity = {k: BETA * velocity[k] + grads[k] for k in w}
                w = {k: w[k] - lr * velocity[k] for k in w}
            else:
                if not self.learned_init:  # the premise of the eps_root check
                    assert float(grads["w"][2]) == 0.0
                mu = {k: ADAM_B1 * mu[k] + (1 - ADAM_B1) * grads[k] for k in w}
                nu = {k: ADAM_B2 * nu[k] + (1 - ADAM_B2) * grads[k] ** 2 for k in w}
                m_hat = {k: mu[k] / (1 - ADAM_B1 ** (t + 1)) for k in w}
                v_hat = {k: nu[k] / (1 - ADAM_B2 ** (t + 1)) for k in w}
                w = {k: w[k] - lr * m_hat[k] / (tf.sqrt(v_hat[k] + ADAM_EPS_ROOT) + ADAM_EPS) for k in w}
        logits = tf.linalg.matvec(self.Xv, w["w"]) + w["b"]
        value = tf.reduce_mean(tf.math.log1p(tf.exp(logits)) - Y_VAL * logits)
        value += 0.3 * (hp["log_l2"] - 0.5) ** 2 + 0.2 * hp["lr"] ** 2
        return float(value)

    def finite_difference_gradient(self, params, hparams) -> dict:
        grads = {}
        for name, value in hparams.items():
            base = value.numpy()
            g = np.zeros_like(base)
            for index in np.ndindex(base.shape):
                bump = np.zeros_like(base)
                bump[index] = FD_STEP
                plus = dict(hparams, **{name: tf.constant(base + bump)})
                minus = dict(hparams, **{name: tf.constant(base - bump)})
                g[index] = (self.reference_objective(params, plus) - self.reference_objective(params, minus)) / (2 * FD_STEP)
            grads[name] = g
        return grads

    def hypergradient(self, estimator: str = "reverse", **options):
        hg = tfb.hypergradient_fn(
            self.inner_loss,
            self.outer_loss,
            steps=STEPS,
            inner_optimizer=self.engine_optimizer(),
            init_params=self.init_params if self.learned_init else None,
            estimator=estimator,
            jit_compile=False,
            **options,
        )
        params, hparams = self.start()
        return hg(params, hparams)


CASES = {
    "sgd": Case("sgd", learned_init=True, X=X_TRAIN, Xv=X_VAL),
    "momentum": Case("momentum", learned_init=True, X=X_TRAIN, Xv=X_VAL),
    "adam": Case("adam", learned_init=False, X=X_TRAIN_ZERO_COL, Xv=X_VAL_ZERO_COL),
    # Adam with the B0 term of Eq. 5 (w0 = λ_init): moments and count are back-propagated too.
    "adam_learned_init": Case("adam", learned_init=True, X=X_TRAIN, Xv=X_VAL),
}


def _assert_matches_fd(hypergrad: dict, fd: dict, atol: float) -> None:
    assert set(hypergrad) == set(fd)
    for name in fd:
        h = hypergrad[name].numpy()
        assert np.all(np.isfinite(h)), name
        np.testing.assert_allclose(h, fd[name], rtol=1e-7, atol=atol, err_msg=name)


@functools.lru_cache(maxsize=None)
def _finite_differences(case_name: str) -> dict:
    case = CASES[case_name]
    return case.finite_difference_gradient(*case.start())


@pytest.mark.parametrize("case_name", list(CASES))
def test_full_rmd_matches_finite_differences(case_name):
    case = CASES[case_name]
    params, hparams = case.start()
    value, hypergrad = case.hypergradient("reverse")
    # the engine's inner loop and the reference loop produce the same F(λ)
    np.testing.assert_allclose(float(value), case.reference_objective(params, hparams), rtol=1e-12)
    fd = _finite_differences(case_name)
    for name in ("lr", "log_l2", "example_logits") + (("init",) if case.learned_init else ()):
        assert np.max(np.abs(fd[name])) > 1e-4, f"{name}: the test would not see a wrong hypergradient"
    _assert_matches_fd(hypergrad, fd, atol=1e-9)


@pytest.mark.parametrize("case_name", ["sgd", "adam"])
def test_forward_mode_matches_finite_differences(case_name):
    """FMD (Eq. 7). For Adam this is where eps_root matters: the JVP of √ν at ν = 0 is
    0.5/√ν · 0 = NaN without it (reverse mode in TF happens to give 0 there)."""
    _, hypergrad = CASES[case_name].hypergradient("forward")
    _assert_matches_fd(hypergrad, _finite_differences(case_name), atol=1e-9)


@pytest.mark.parametrize("segment_length", [None, 2, 7], ids=["default", "c2", "c7"])
@pytest.mark.parametrize("case_name", ["adam", "adam_learned_init", "momentum"])
def test_checkpointed_matches_finite_differences(case_name, segment_length):
    """Checkpointed recomputation (segments of c steps, the last one ragged for c = 2, 7 with
    T = 15) gives the full-RMD hypergradient: Adam's moments and count are recomputed from the
    stored segment states, and the learned initialization's B0 term is kept."""
    case = CASES[case_name]
    options = {} if segment_length is None else {"segment_length": segment_length}
    value, hypergrad = case.hypergradient("checkpointed", **options)
    np.testing.assert_allclose(float(value), case.reference_objective(*case.start()), rtol=1e-12)
    fd = _finite_differences(case_name)
    if case.learned_init:
        assert np.max(np.abs(fd["init"])) > 1e-4  # a dropped B0 term would be seen
    _assert_matches_fd(hypergrad, fd, atol=1e-9)


@pytest.mark.parametrize("case_name", ["adam", "adam_learned_init"])
def test_checkpointed_that_drops_one_step_misses_the_finite_differences(case_name):
    """Negative control: back-propagating through 14 of the 15 steps (which also drops B0)
    misses the reference by ≥ 3e-3 (init: 0.3), far beyond the 1e-9 tolerance above."""
    _, hypergrad = CASES[case_name].hypergradient("checkpointed", truncate=STEPS - 1)
    fd = _finite_differences(case_name)
    assert max(np.max(np.abs(hypergrad[name].numpy() - fd[name])) for name in fd) > 1e-3
