"""The toy problem of Sec. 4.1 against its closed form, computed in numpy.

    g(w, λ) = ½ (w − λ)ᵀ G (w − λ),  G = diag(1, ½),  T = 100 steps of GD, γ = 0.1, w0 = (2, 2)
    f(w)    = ‖w‖² + 10 ‖sin w‖²

GD on g is linear: w_T = C w0 + (I − C) λ with C = (I − γG)^T; A_t = I − γG, B_t = γG, B_0 = 0,
so full RMD (Eq. 5) is d_λ f = (I − C)ᵀ ∇f(w_T) and K-RMD (Eq. 8) is
h_{T−K} = Σ_{j<K} γG (I − γG)^j ∇f(w_T) = (I − (I − γG)^K) ∇f(w_T).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import tf_bilevel as tfb

from conftest import flat_numpy  # noqa: E402  (tests/ is on sys.path: pytest's default rootdir import)

T = 100
GAMMA = 0.1
G_DIAG = np.array([1.0, 0.5])
W0 = np.array([2.0, 2.0])
ALPHA = 0.5  # strong convexity of g: the smallest eigenvalue of G
M_B = GAMMA  # ‖B_t‖ = ‖γG‖ = γ for t ≥ 1, B_0 = 0
LAMBDAS = (np.array([1.0, 1.0]), np.array([-0.7, 1.3]))  # (1, 1) is the point of Fig. 1
XLA_TRUNCATIONS = (1, 2, 17, 50, 99, 100)


def inner_loss(w, lam):
    return 0.5 * tf.reduce_sum(tf.constant(G_DIAG) * (w - lam) ** 2)


def outer_loss(w, lam):
    return tf.reduce_sum(w**2) + 10.0 * tf.reduce_sum(tf.sin(w) ** 2)


# -- numpy reference ------------------------------------------------------------------------
def w_T_closed_form(lam: np.ndarray) -> np.ndarray:
    C = (1.0 - GAMMA * G_DIAG) ** T
    return C * W0 + (1.0 - C) * lam


def grad_f(w: np.ndarray) -> np.ndarray:
    return 2.0 * w + 20.0 * np.sin(w) * np.cos(w)


def exact_hypergradient(lam: np.ndarray) -> np.ndarray:
    """(I − C)ᵀ ∇f(w_T): full RMD, Eq. 5 (C is diagonal)."""
    C = (1.0 - GAMMA * G_DIAG) ** T
    return (1.0 - C) * grad_f(w_T_closed_form(lam))


def truncated_hypergradient(lam: np.ndarray, K: int) -> np.ndarray:
    """(I − (I − γG)^K) ∇f(w_T): K-RMD, Eq. 8."""
    return (1.0 - (1.0 - GAMMA * G_DIAG) ** K) * grad_f(w_T_closed_form(lam))


def test_numpy_reference_is_gradient_descent():
    """The closed form w_T agrees with 100 explicit GD steps and d_λf with finite differences of it."""
    lam = LAMBDAS[1]
    w = W0.copy()
    for _ in range(T):
        w = w - GAMMA * G_DIAG * (w - lam)
    np.testing.assert_allclose(w, w_T_closed_form(lam), rtol=0, atol=1e-13)

    def objective(l):
        v = w_T_closed_form(l)
        return np.sum(v**2) + 10.0 * np.sum(np.sin(v) ** 2)

    eps = 1e-6
    fd = np.array([(objective(lam + eps * e) - objective(lam - eps * e)) / (2 * eps) for e in np.eye(2)])
    np.testing.assert_allclose(exact_hypergradient(lam), fd, rtol=1e-7)


# -- full RMD, every execution mode ---------------------------------------------------------
def test_full_rmd_equals_closed_form(make_hg):
    hg = make_hg(inner_loss, outer_loss, steps=T, learning_rate=GAMMA)
    for lam in LAMBDAS:
        result = hg.detailed(tf.constant(W0), tf.constant(lam))
        w_T = w_T_closed_form(lam)
        np.testing.assert_allclose(result.final_params.numpy(), w_T, rtol=0, atol=1e-12)
        np.testing.assert_allclose(
            float(result.outer_value), np.sum(w_T**2) + 10 * np.sum(np.sin(w_T) ** 2), rtol=1e-12
        )
        assert result.hypergrad.dtype == tf.float64
        np.testing.assert_allclose(result.hypergrad.numpy(), exact_hypergradient(lam), rtol=0, atol=1e-10)
        assert int(result.nonfinite_step) == -1


@pytest.mark.parametrize("jit_compile", [False, True], ids=["function", "xla"])
def test_solve_equals_closed_form(jit_compile):
    hg = tfb.hypergradient_fn(inner_loss, outer_loss, steps=T, learning_rate=GAMMA, jit_compile=jit_compile)
    for lam in LAMBDAS:
        w_T = hg.solve(tf.constant(W0), tf.constant(lam))
        np.testing.assert_allclose(w_T.numpy(), w_T_closed_form(lam), rtol=0, atol=1e-12)


# -- K-RMD for every K, and the bound of Prop. 3.1 -------------------------------------------
def _check_truncated(hg: tfb.Hypergradient, K: int) -> None:
    for lam in LAMBDAS:
        _, h = hg(tf.constant(W0), tf.constant(lam))
        h = h.numpy()
        np.testing.assert_allclose(h, truncated_hypergradient(lam, K), rtol=0, atol=1e-10)

        # Prop. 3.1, Eq. 10: ‖h_{T−K} − d_λf‖ ≤ (1 − γα)^K / (γα) ‖∇_ŵ f‖ M_B.
        error = np.linalg.norm(h - exact_hypergradient(lam))
        outer_grad_norm = np.linalg.norm(grad_f(w_T_closed_form(lam)))
        bound = float(tfb.diagnostics.truncation_bound(K, GAMMA, ALPHA, outer_grad_norm, M_B))
        np.testing.assert_allclose(bound, (1 - GAMMA * ALPHA) ** K / (GAMMA * ALPHA) * outer_grad_norm * M_B, rtol=1e-12)
        assert error <= bound + 1e-12, (K, lam, error, bound)


# One hg per K (truncate is static): 100 traces, ~0.2 s each. The fast tier checks a sample of K
# (both ends, where the loop bounds T − K and K are at their limits, and every ~decade between);
# the slow tier the other K, so the suite still checks every K. Under XLA a sample of K.
FAST_TRUNCATIONS = (1, 2, 3, 4, 5, 7, 10, 17, 25, 33, 50, 66, 75, 90, 96, 97, 98, 99, 100)


@pytest.mark.parametrize("K", [K if K in FAST_TRUNCATIONS else pytest.param(K, marks=pytest.mark.slow)
                               for K in range(1, T + 1)])
def test_truncated_rmd_equals_closed_form_for_every_K(K):
    hg = tfb.hypergradient_fn(inner_loss, outer_loss, steps=T, learning_rate=GAMMA, truncate=K, jit_compile=False)
    _check_truncated(hg, K)


@pytest.mark.parametrize("K", XLA_TRUNCATIONS)
def test_truncated_rmd_equals_closed_form_under_xla(K):
    hg = tfb.hypergradient_fn(inner_loss, outer_loss, steps=T, learning_rate=GAMMA, truncate=K, jit_compile=True)
    _check_truncated(hg, K)


def test_truncate_equal_to_steps_is_full_rmd():
    hg = tfb.hypergradient_fn(inner_loss, outer_loss, steps=T, learning_rate=GAMMA, truncate=T, jit_compile=False)
    _, h = hg(tf.constant(W0), tf.constant(LAMBDAS[0]))
    np.testing.assert_allclose(h.numpy(), exact_hypergradient(LAMBDAS[0]), rtol=0, atol=1e-10)


# The engine's K-RMD error against the closed-form d_λf, for a sample of K (one trace per K).
BIAS_TRUNCATIONS = (1, 2, 5, 10, 25, 50, 75, 90, 99, 100)


@pytest.fixture(scope="module")
def engine_errors() -> dict:
    """K -> (‖h_K − d_λf‖ with h_K from tf_bilevel, ‖∇f(w_T)‖ with w_T from tf_bilevel), at λ = (1, 1)."""
    lam = LAMBDAS[0]
    errors = {}
    for K in BIAS_TRUNCATIONS:
        hg = tfb.hypergradient_fn(inner_loss, outer_loss, steps=T, learning_rate=GAMMA, truncate=K, jit_compile=False)
        result = hg.detailed(tf.constant(W0), tf.constant(lam))
        errors[K] = (np.linalg.norm(result.hypergrad.numpy() - exact_hypergradient(lam)),
                     np.linalg.norm(grad_f(result.final_params.numpy())))
    return errors


def test_bias_decreases_with_K_on_the_toy(engine_errors):
    """The K-RMD error is exactly ((I − γG)^K − C) ∇f(w_T): monotone in K, zero at K = T."""
    errors = [engine_errors[K][0] for K in BIAS_TRUNCATIONS]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-10
    lam = LAMBDAS[0]
    for K, error in zip(BIAS_TRUNCATIONS, errors):  # and it is the closed form's error
        expected = np.linalg.norm(truncated_hypergradient(lam, K) - exact_hypergradient(lam))
        np.testing.assert_allclose(error, expected, rtol=1e-8, atol=1e-10)


# -- tfb.diagnostics against numpy formulas ----------------------------------------------
def _random_tree(rng):
    return {"a": rng.normal(size=(3, 2)), "b": [rng.normal(size=()), rng.normal(size=(4,)).astype(np.float32)]}


def test_diagnostics_match_numpy():
    rng = np.random.default_rng(3)
    a, b = _random_tree(rng), _random_tree(rng)
    ta, tb = tf.nest.map_structure(tf.constant, a), tf.nest.map_structure(tf.constant, b)
    va, vb = flat_numpy(a), flat_numpy(b)
    d = tfb.diagnostics
    assert d.global_norm(ta).dtype == tf.float64
    np.testing.assert_allclose(float(d.global_norm(ta)), np.sqrt(np.sum(va**2)), rtol=1e-12)
    np.testing.assert_allclose(float(d.relative_error(ta, tb)), np.linalg.norm(va - vb) / np.linalg.norm(vb), rtol=1e-12)
    np.testing.assert_allclose(
        float(d.cosine_similarity(ta, tb)), va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)), rtol=1e-12
    )
    np.testing.assert_allclose(float(d.descent_ratio(ta, tb)), va @ vb / (vb @ vb), rtol=1e-12)
    np.testing.assert_allclose(float(d.cosine_similarity(ta, ta)), 1.0, rtol=1e-12)
    np.testing.assert_allclose(float(d.relative_error(ta, ta)), 0.0, atol=0)

    zeros = tf.nest.map_structure(tf.zeros_like, tb)
    assert float(d.relative_error(ta, zeros)) == 0.0
    assert float(d.cosine_similarity(ta, zeros)) == 0.0
    assert float(d.descent_ratio(ta, zeros)) == 0.0


@pytest.mark.parametrize("K", [1, 7, 60, 100])
def test_truncation_bounds_match_numpy(K):
    gamma, alpha, steps, grad_norm, m_b = 0.05, 0.3, 100, 2.5, 0.7
    d = tfb.diagnostics
    eq10 = (1 - gamma * alpha) ** K / (gamma * alpha) * grad_norm * m_b
    eq9 = 2.0 ** (steps - K + 1) * (1 - gamma * alpha) ** K * grad_norm * m_b
    np.testing.assert_allclose(float(d.truncation_bound(K, gamma, alpha, grad_norm, m_b)), eq10, rtol=1e-12)
    np.testing.assert_allclose(float(d.local_truncation_bound(K, steps, gamma, alpha, grad_norm, m_b)), eq9, rtol=1e-12)
    # Tensor arguments (e.g. a norm computed in float32) are accepted too.
    np.testing.assert_allclose(
        float(d.truncation_bound(tf.constant(K), gamma, alpha, tf.constant(grad_norm, tf.float32), m_b)),
        eq10,
        rtol=1e-6,
    )


def test_local_bound_holds_on_the_toy(engine_errors):
    """Eq. 9 (local strong convexity) holds as well, for the engine's h_K (Eq. 10: every K above)."""
    Ks = np.array(BIAS_TRUNCATIONS)
    grad_norm = engine_errors[1][1]
    eq9 = tfb.diagnostics.local_truncation_bound(tf.constant(Ks), T, GAMMA, ALPHA, grad_norm, M_B).numpy()
    eq10 = tfb.diagnostics.truncation_bound(tf.constant(Ks), GAMMA, ALPHA, grad_norm, M_B).numpy()
    errors = np.array([engine_errors[K][0] for K in BIAS_TRUNCATIONS])
    assert np.all(errors <= eq10 + 1e-12)
    assert np.all(errors <= eq9 + 1e-12)
