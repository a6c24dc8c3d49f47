"""Implicit-differentiation hypergradients at w_T (Sec. 3.3):

    d_λ f = ∇λ f − ∇λw g (∇ww g)^{-1} ∇w f                      (Eq. 11)

with the inverse-Hessian-vector product from at most K conjugate-gradient iterations, or K terms
of the Neumann series of Eq. 12 (both stop early at a relative tolerance), (∇ww g)^{-1} ≈ γ Σ_{k<K} (I − γ∇ww g)^k. Hessian-vector
products use nested tapes. These assume w_T is a stationary point of g; they give no
gradient for hyperparameters of the inner optimizer itself (e.g. a learned γ).
"""

from __future__ import annotations

from typing import Any, Optional

import tensorflow as tf

from tf_bilevel._tree import axpy, fill_none_with_zeros, vdot
from tf_bilevel.dynamics.loops import run
from tf_bilevel.dynamics.optimizers import cast_scalar, resolve_learning_rate
from tf_bilevel.dynamics.transition import Transition
from tf_bilevel.estimators.common import EstimatorOutput, internal_copy, outer_value_and_grads


def _inner_grad(problem, params, hparams, batch) -> list:
    flat_w = tf.nest.flatten(params)
    with tf.GradientTape() as tape:
        tape.watch(flat_w)
        loss = problem.inner(params, hparams, batch)
    return fill_none_with_zeros(tape.gradient(loss, flat_w), flat_w)


def hessian_vector_product(problem, params: Any, hparams: Any, batch: Any, vector: list) -> list:
    """∇ww g(w, λ) v, reverse-over-reverse."""
    params = internal_copy(params)
    flat_w = tf.nest.flatten(params)
    with tf.GradientTape() as tape:
        tape.watch(flat_w)
        grad_dot_v = vdot(_inner_grad(problem, params, hparams, batch), vector)
    return fill_none_with_zeros(tape.gradient(grad_dot_v, flat_w), flat_w)


def mixed_vector_product(problem, params: Any, hparams: Any, batch: Any, vector: list) -> list:
    """∇λw g(w, λ) v = ∇λ ⟨∇w g, v⟩."""
    hparams = internal_copy(hparams)
    flat_hp = tf.nest.flatten(hparams)
    with tf.GradientTape() as tape:
        tape.watch(flat_hp)
        grad_dot_v = vdot(_inner_grad(problem, params, hparams, batch), [tf.stop_gradient(v) for v in vector])
    return fill_none_with_zeros(tape.gradient(grad_dot_v, flat_hp), flat_hp)


def conjugate_gradient(matvec, b: list, iterations: int, tolerance: Optional[float] = None) -> tuple[list, tf.Tensor]:
    """CG on H x = b from x = 0 (H symmetric positive definite): at most `iterations` steps,
    stopping once ‖r‖ ≤ tolerance·‖b‖ (relative residual; None: all steps). Returns (x, steps run)."""
    x = [tf.zeros_like(v) for v in b]
    r = list(b)
    p = list(b)
    rs = vdot(r, r)
    threshold = _threshold(b, tolerance)

    def body(k, x, r, p, rs):
        hp = matvec(p)
        step = tf.math.divide_no_nan(rs, vdot(p, hp))
        x = axpy(step, p, x)
        r = axpy(-step, hp, r)
        rs_new = vdot(r, r)
        p = axpy(tf.math.divide_no_nan(rs_new, rs), p, r)
        return k + 1, x, r, p, rs_new

    def not_converged(k, x, r, p, rs):
        return rs > threshold

    used, x, _, _, _ = tf.while_loop(not_converged, body, (tf.constant(0), x, r, p, rs), maximum_iterations=iterations)
    return x, used


def _threshold(b: list, tolerance: Optional[float]) -> tf.Tensor:
    """(tolerance·‖b‖)², compared with squared residual norms; −1 (never met) without a tolerance."""
    bb = vdot(b, b)
    if tolerance is None:
        return -tf.ones_like(bb)
    return tf.cast(tolerance, bb.dtype) ** 2 * bb


def neumann_series(
    matvec, b: list, iterations: int, step_size: tf.Tensor, tolerance: Optional[float] = None
) -> tuple[list, tf.Tensor]:
    """γ Σ_{k<K} (I − γH)^k b (Eq. 12 with A∞ = I − γH), stopping early once a term's norm is
    ≤ tolerance·‖b‖ (None: all K terms). Returns (the sum, the number of terms)."""
    threshold = _threshold(b, tolerance)

    def body(k, term, total):
        term = axpy(-step_size, matvec(term), term)
        return k + 1, term, [a + t for a, t in zip(total, term)]

    def not_converged(k, term, total):
        return vdot(term, term) > threshold

    total, used = list(b), tf.constant(1)
    if iterations > 1:
        used, _, total = tf.while_loop(not_converged, body, (used, list(b), total), maximum_iterations=iterations - 1)
    return [cast_scalar(step_size, t.dtype) * t for t in total], used


def implicit_hypergradient(
    transition: Transition,
    params: Any,
    hparams: Any,
    inner_batch: Any,
    outer_batch: Any,
    *,
    steps: int,
    iterations: int,
    solver: str,
    opt_state: Any = None,
    tolerance: Optional[float] = None,
) -> EstimatorOutput:
    """Eq. 11 at w_T = the result of T inner steps, solved by 'cg' or 'neumann'.

    With per-step minibatches the linear system is that of the last step's objective
    g_{T−1}(w_T, λ): the batch the last inner step used, whose Hessian is also the one in the
    last VJP of K-RMD."""
    problem = transition.problem
    w0 = problem.initial_params(params, hparams)
    final, marker = run(
        transition, transition.init_state(w0, opt_state), hparams, inner_batch, start=0, num_steps=steps, max_steps=steps
    )
    w_T = final.params
    inner_batch = transition.batch_at(inner_batch, steps - 1)
    value, grad_w, grad_hp = outer_value_and_grads(problem, w_T, hparams, outer_batch)

    def matvec(v):
        return hessian_vector_product(problem, w_T, hparams, inner_batch, v)

    if solver == "cg":
        solution, used = conjugate_gradient(matvec, grad_w, iterations, tolerance)
    else:
        gamma = resolve_learning_rate(transition.optimizer.learning_rate, tf.constant(steps - 1), hparams)
        gamma = gamma if not tf.is_tensor(gamma) else tf.stop_gradient(gamma)
        solution, used = neumann_series(matvec, grad_w, iterations, gamma, tolerance)
    cross = mixed_vector_product(problem, w_T, hparams, inner_batch, solution)
    return EstimatorOutput(value, [g - c for g, c in zip(grad_hp, cross)], w_T, marker, final.opt_state, used)
