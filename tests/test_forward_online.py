"""Forward mode carried across calls (RTHO; MARTHE with forget=μ), all N tangent columns in one pass.

Closed form: g_t(w, λ) = ½‖w − λ⊙s_t − b_t − δ‖², f(w) = ½‖w − c‖², gradient descent with step γ,
hparams = {"lam": λ ∈ R^3, "shift": δ ∈ R} (N = 4; tf.nest order: lam's 3 coordinates, then δ):
    w_{t+1} = (1−γ) w_t + γ(λ⊙s_t + b_t + δ)
    Z_{t+1} = (1−γ) Z_t + γ [diag(s_t) | 1]          (row n of Z: dw/dλ_n, Eq. 7)
so from carried tangents Z (× μ), after the T steps of a call
    Z_T = (1−γ)^T μ Z + γ Σ_t (1−γ)^{T−1−t} [diag(s_t) | 1],   d_λ f = Z_T (w_T − c).
Momentum and Adam are checked against TF differentiating a Python-unrolled eager loop (no
library code): μ = 1 is full RMD through the concatenated run, and since Z_T is linear in the
carried Z, d_λf(μ) = μ·(full RMD) + (1−μ)·(RMD of the second call alone).
"""

import re
from collections import Counter

import numpy as np
import pytest
import tensorflow as tf

import tf_bilevel as tfb

T, GAMMA, MU = 5, 0.3, 0.6
RNG = np.random.default_rng(3)
S = RNG.normal(size=(2 * T, 3))
B = RNG.normal(size=(2 * T, 3))
C = RNG.normal(size=3)
LAM, SHIFT = RNG.normal(size=3), 0.4
W0 = RNG.normal(size=3)
N = 4
MODES = ["eager", "graph", "xla"]


def inner_loss(w, hp, batch):
    return 0.5 * tf.reduce_sum((w - hp["lam"] * batch["s"] - batch["b"] - hp["shift"]) ** 2)


def outer_loss(w, hp):
    return 0.5 * tf.reduce_sum((w - C) ** 2)


def hparams():
    return {"lam": tf.constant(LAM), "shift": tf.constant(SHIFT, tf.float64)}


def batches(part):
    """The per-step minibatches of call `part` (0: steps 0..T−1, 1: steps T..2T−1, None: all 2T)."""
    rows = slice(None) if part is None else slice(part * T, (part + 1) * T)
    return {"s": tf.constant(S[rows]), "b": tf.constant(B[rows])}


def build(steps=T, mode="xla", **kwargs):
    kwargs.setdefault("learning_rate", GAMMA)
    return tfb.hypergradient_fn(
        inner_loss, outer_loss, steps=steps, estimator="forward", per_step_batches=True,
        jit_compile=mode == "xla", **kwargs,
    )


def run(hg, mode, params, batch, **kwargs):
    """hg.detailed (a tf.function, with or without XLA), or hg.compute executed eagerly."""
    if mode == "eager":
        return hg.compute(params, hparams(), batch, **kwargs)
    return hg.detailed(params, hparams(), batch, **kwargs)


_FIRST_CALLS = {}


def first_call(mode):
    """`run` of a fresh call (tangents=None) of `build(mode=mode)` on batches(0), shared by the
    tests that start from it: from tangents=None `forget` multiplies nothing (forward.py applies
    it to given tangents only), so every μ's first call is this one, and each of its traces under
    XLA is a compilation."""
    if mode not in _FIRST_CALLS:
        _FIRST_CALLS[mode] = run(build(mode=mode), mode, tf.constant(W0), batches(0))
    return _FIRST_CALLS[mode]


def closed_form(calls):
    """(w, Z) after consecutive calls of T steps, `calls` = [(part, μ), ...], derived by hand."""
    w, z = W0.copy(), np.zeros((N, 3))
    for part, mu in calls:
        z = mu * z
        for t in range(part * T, (part + 1) * T):
            w = (1 - GAMMA) * w + GAMMA * (LAM * S[t] + B[t] + SHIFT)
            z = (1 - GAMMA) * z + GAMMA * np.vstack([np.diag(S[t]), np.ones((1, 3))])
    return w, z


def flat_hypergrad(result):
    return np.concatenate([np.ravel(result.hypergrad["lam"]), np.ravel(result.hypergrad["shift"])])


# μ's arithmetic is the same traced code in every mode: μ = 0.6 in every mode, the ends 1 and 0
# under XLA (the eager and graph runs of μ = 1 and 0 added no code path).
@pytest.mark.parametrize("mode, mu", [(mode, MU) for mode in MODES] + [("xla", 1.0), ("xla", 0.0)])
def test_continued_calls_match_the_closed_form(mode, mu):
    """Call 1 from Z = None, call 2 from its final_tangents with forget=μ: the tangents (layout:
    row n is hyperparameter coordinate n) and d_λf = Z_T (w_T − c) of the hand derivation."""
    hg = build(mode=mode, forget=mu)
    first = first_call(mode)  # the same for every μ (the fresh call does not read forget)
    w1, z1 = closed_form([(0, 1.0)])
    np.testing.assert_allclose(first.final_params.numpy(), w1, rtol=1e-12)
    assert first.final_tangents.params.shape == (N, 3) and first.final_tangents.opt_state == ()
    np.testing.assert_allclose(first.final_tangents.params.numpy(), z1, rtol=1e-12)
    np.testing.assert_allclose(flat_hypergrad(first), z1 @ (w1 - C), rtol=1e-10)

    second = run(hg, mode, first.final_params, batches(1), opt_state=first.final_opt_state, tangents=first.final_tangents)
    w2, z2 = closed_form([(0, 1.0), (1, mu)])
    np.testing.assert_allclose(second.final_tangents.params.numpy(), z2, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(flat_hypergrad(second), z2 @ (w2 - C), rtol=1e-10)
    if mu == 1.0:  # RTHO is the exact hypergradient through all 2T steps: d w_2T/dλ by hand
        z_full = sum(
            GAMMA * (1 - GAMMA) ** (2 * T - 1 - t) * np.vstack([np.diag(S[t]), np.ones((1, 3))]) for t in range(2 * T)
        )
        np.testing.assert_allclose(flat_hypergrad(second), z_full @ (w2 - C), rtol=1e-10)
    else:  # and forgetting changes it (the check above is not vacuous)
        full = closed_form([(0, 1.0), (1, 1.0)])[1]
        assert not np.allclose(z2, full, rtol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_two_continued_calls_equal_one_call_of_twice_the_steps(mode):
    long = run(build(steps=2 * T, mode=mode, inner_optimizer=tfb.momentum(GAMMA, 0.7), learning_rate=None),
               mode, tf.constant(W0), batches(None))
    hg = build(mode=mode, inner_optimizer=tfb.momentum(GAMMA, 0.7), learning_rate=None)
    first = run(hg, mode, tf.constant(W0), batches(0))
    second = run(hg, mode, first.final_params, batches(1), opt_state=first.final_opt_state, tangents=first.final_tangents)
    assert second.final_tangents.opt_state.shape == (N, 3)  # the velocity's tangents are carried too
    for a, b in zip(tf.nest.flatten((second.final_params, second.final_opt_state, second.final_tangents, second.hypergrad)),
                    tf.nest.flatten((long.final_params, long.final_opt_state, long.final_tangents, long.hypergrad))):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-11, atol=1e-14)
    assert np.abs(second.final_tangents.opt_state.numpy()).max() > 1e-3


# -- momentum and Adam against TF differentiating an unrolled eager loop -----------------------------

def _momentum_step(w, state, lam, shift, t, lr):
    g = w - lam * S[t] - B[t] - shift
    v = 0.7 * state + g
    return w - lr * v, v


def _adam_step(w, state, lam, shift, t, lr, b1=0.9, b2=0.999, eps=1e-8, eps_root=1e-12):
    mu, nu, count = state
    g = w - lam * S[t] - B[t] - shift
    mu, nu, count = b1 * mu + (1 - b1) * g, b2 * nu + (1 - b2) * g * g, count + 1
    m_hat, v_hat = mu / (1 - b1**count), nu / (1 - b2**count)
    return w - lr * m_hat / (tf.sqrt(v_hat + eps_root) + eps), (mu, nu, count)


UNROLLED = {"momentum": (_momentum_step, lambda: tf.zeros(3, tf.float64)),
            "adam": (_adam_step, lambda: (tf.zeros(3, tf.float64), tf.zeros(3, tf.float64), tf.constant(0.0, tf.float64)))}


def unrolled_rmd(name, lr_of_step, *, forget_first_call):
    """d f(w_2T)/d(λ, δ, lr) by tf.GradientTape over a Python loop of 2T steps; with
    forget_first_call the first call's result enters the second as a constant (stop_gradient)."""
    step, init = UNROLLED[name]
    lam, shift, lr = tf.constant(LAM), tf.constant(SHIFT, tf.float64), tf.constant(GAMMA, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch([lam, shift, lr])
        w, state = tf.constant(W0), init()
        for call in range(2):
            if call == 1 and forget_first_call:
                w, state = tf.stop_gradient(w), tf.nest.map_structure(tf.stop_gradient, state)
            for t in range(T):  # the schedule sees the step index within the call
                w, state = step(w, state, lam, shift, call * T + t, lr_of_step(lr, t))
        f = outer_loss(w, None)
    return w.numpy(), [g.numpy() for g in tape.gradient(f, [lam, shift, lr])]


def learned_lr_problem(name, mode, mu):
    """hparams = {lam, shift, lr}; γ_t = lr · 0.8^t (a schedule `(step, hparams) -> γ`)."""
    def schedule(step, hp):
        return hp["lr"] * tf.pow(tf.constant(0.8, tf.float64), tf.cast(step, tf.float64))

    optimizer = tfb.momentum(schedule, 0.7) if name == "momentum" else tfb.adam(schedule)
    return build(mode=mode, inner_optimizer=optimizer, learning_rate=None, forget=mu)


# Every execution mode with momentum; Adam's update is the same traced code in every mode, so
# under XLA only (the eager and graph runs of Adam added no code path: 10 s of the fast tier).
@pytest.mark.parametrize("name, mode", [("momentum", mode) for mode in MODES] + [("adam", "xla")])
def test_momentum_and_adam_with_a_learned_learning_rate_match_unrolled_autodiff(name, mode):
    """λ, δ and the learning rate (through the schedule) as hyperparameters; μ = 1 is full RMD
    through both calls, μ < 1 the mix of full RMD and the second call's own RMD."""
    lr_of_step = lambda lr, t: lr * 0.8**t  # noqa: E731
    w_ref, full = unrolled_rmd(name, lr_of_step, forget_first_call=False)
    _, fresh = unrolled_rmd(name, lr_of_step, forget_first_call=True)
    hp = {**hparams(), "lr": tf.constant(GAMMA, tf.float64)}
    first = None
    for mu in (1.0, MU):
        hg = learned_lr_problem(name, mode, mu)
        call = (lambda *a, **k: hg.compute(*a, **k)) if mode == "eager" else hg.detailed
        # The first call starts from tangents=None, where μ multiplies nothing (forward.py uses
        # `forget` only on given tangents): μ = 1's first call is μ = 0.6's too (one trace less).
        if first is None:
            first = call(tf.constant(W0), hp, batches(0))
        second = call(first.final_params, hp, batches(1), opt_state=first.final_opt_state, tangents=first.final_tangents)
        np.testing.assert_allclose(second.final_params.numpy(), w_ref, rtol=1e-12)
        got = [second.hypergrad[k].numpy() for k in ("lam", "shift", "lr")]
        expected = [mu * a + (1 - mu) * b for a, b in zip(full, fresh)]
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=1e-8, atol=1e-12)
    assert abs(full[2] - fresh[2]) > 1e-3 * abs(full[2])  # the carried part matters for the learning rate


def test_forget_zero_equals_a_fresh_forward_call():
    hg = build(mode="graph", inner_optimizer=tfb.adam(0.1), learning_rate=None)
    greedy = build(mode="graph", inner_optimizer=tfb.adam(0.1), learning_rate=None, forget=0.0)
    first = hg.detailed(tf.constant(W0), hparams(), batches(0))
    continued = greedy.detailed(first.final_params, hparams(), batches(1), opt_state=first.final_opt_state,
                                tangents=first.final_tangents)
    fresh = hg.detailed(first.final_params, hparams(), batches(1), opt_state=first.final_opt_state)
    for a, b in zip(tf.nest.flatten((continued.hypergrad, continued.final_tangents)),
                    tf.nest.flatten((fresh.hypergrad, fresh.final_tangents))):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-15)
    carried = hg.detailed(first.final_params, hparams(), batches(1), opt_state=first.final_opt_state,
                          tangents=first.final_tangents)
    assert not np.allclose(carried.hypergrad["lam"].numpy(), fresh.hypergrad["lam"].numpy(), rtol=1e-3)


def test_carried_tangents_go_through_a_learned_initialization():
    """With init_params, each call starts from w0 = Ξ0(params, λ): Z_0 = J_w Ξ0 · μZ + B_0."""
    def init(w, hp):
        return 0.5 * w + hp["shift"]

    hg = build(init_params=init)
    first = hg.detailed(tf.constant(W0), hparams(), batches(0))
    second = hg.detailed(first.final_params, hparams(), batches(1), tangents=first.final_tangents)
    lam, shift = tf.constant(LAM), tf.constant(SHIFT, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch([lam, shift])
        w = tf.constant(W0)
        for t in range(2 * T):
            if t % T == 0:
                w = 0.5 * w + shift
            w = (1 - GAMMA) * w + GAMMA * (lam * S[t] + B[t] + shift)
        f = outer_loss(w, None)
    d_lam, d_shift = tape.gradient(f, [lam, shift])
    np.testing.assert_allclose(second.hypergrad["lam"].numpy(), d_lam.numpy(), rtol=1e-10)
    np.testing.assert_allclose(second.hypergrad["shift"].numpy(), d_shift.numpy(), rtol=1e-10)


def test_continued_calls_do_not_retrace_and_compute_works_in_a_user_function():
    hg = build(inner_optimizer=tfb.momentum(GAMMA, 0.7), learning_rate=None)
    result = hg.detailed(tf.constant(W0), hparams(), batches(0))
    for part in (1, 0, 1):
        result = hg.detailed(result.final_params, hparams(), batches(part), opt_state=result.final_opt_state,
                             tangents=result.final_tangents)
    assert hg.tracing_count == 2  # one trace starting fresh, one continuing

    @tf.function(jit_compile=True)
    def user_step(w, velocity, tangents):
        r = hg.compute(w, hparams(), batches(1), opt_state=velocity, tangents=tangents)
        return r.hypergrad, r.final_tangents

    first = hg.detailed(tf.constant(W0), hparams(), batches(0))
    h, z = user_step(first.final_params, first.final_opt_state, first.final_tangents)
    expected = hg.detailed(first.final_params, hparams(), batches(1), opt_state=first.final_opt_state,
                           tangents=first.final_tangents)
    np.testing.assert_allclose(h["lam"].numpy(), expected.hypergrad["lam"].numpy(), rtol=1e-12)
    np.testing.assert_allclose(z.opt_state.numpy(), expected.final_tangents.opt_state.numpy(), rtol=1e-12)


def test_the_nonfinite_marker_names_the_step_of_a_continued_call():
    hg = build(check_numerics=False)
    first = hg.detailed(tf.constant(W0), hparams(), batches(0))
    bad = {"s": batches(1)["s"], "b": tf.tensor_scatter_nd_update(batches(1)["b"], [[3, 0]], tf.constant([np.nan], tf.float64))}
    second = hg.detailed(first.final_params, hparams(), bad, tangents=first.final_tangents)
    assert int(second.nonfinite_step) == 3


# -- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("forget", [1.5, -0.1, float("nan"), "0.5", True])
def test_forget_outside_zero_one_is_an_error_naming_it(forget):
    with pytest.raises((ValueError, TypeError), match="forget"):
        build(forget=forget)


@pytest.mark.parametrize("estimator", ["reverse", "checkpointed", "implicit_cg"])
def test_forget_and_tangents_apply_to_forward_mode_only(estimator):
    with pytest.raises(ValueError, match=r"forget applies to estimator='forward' only"):
        tfb.hypergradient_fn(inner_loss, outer_loss, steps=T, learning_rate=GAMMA, estimator=estimator, forget=0.5)
    hg = tfb.hypergradient_fn(inner_loss, outer_loss, steps=T, learning_rate=GAMMA, estimator=estimator, per_step_batches=True)
    tangents = first_call("xla").final_tangents  # build().detailed's from tangents=None
    with pytest.raises(ValueError, match=r"tangents= applies to estimator='forward' only"):
        hg.detailed(tf.constant(W0), hparams(), batches(0), tangents=tangents)
    with pytest.raises(ValueError, match=r"tangents= applies to estimator='forward' only"):
        hg.compute(tf.constant(W0), hparams(), batches(0), tangents=tangents)


def test_tangents_of_the_wrong_shape_or_structure_are_errors_naming_them():
    hg = build(inner_optimizer=tfb.momentum(GAMMA, 0.7), learning_rate=None)
    first = hg.detailed(tf.constant(W0), hparams(), batches(0))
    z = first.final_tangents
    with pytest.raises(ValueError, match=r"tangents\.params has shape \(3, 3\), expected \(4, 3\)"):
        hg.detailed(first.final_params, hparams(), batches(1), opt_state=first.final_opt_state,
                    tangents=(z.params[:3], z.opt_state))
    with pytest.raises(ValueError, match=r"tangents\.opt_state does not have the structure"):
        hg.detailed(first.final_params, hparams(), batches(1), opt_state=first.final_opt_state, tangents=(z.params, ()))
    with pytest.raises(ValueError, match=r"tangents must be the final_tangents"):
        hg.detailed(first.final_params, hparams(), batches(1), opt_state=first.final_opt_state, tangents=z.params)
    with pytest.raises(ValueError, match=r"tangents= was given without opt_state="):
        hg.detailed(first.final_params, hparams(), batches(1), tangents=z)


def test_too_many_hyperparameters_for_forward_mode_is_an_error_naming_k_rmd():
    """N × (params + optimizer state) = 4 × (3 + 3) float64 = 192 bytes."""
    hg = build(inner_optimizer=tfb.momentum(GAMMA, 0.7), learning_rate=None, memory_budget=191)
    with pytest.raises(ValueError, match=r"N=4 tangent columns.*192 bytes.*memory_budget=191.*estimator='reverse' with truncate=K"):
        hg.detailed(tf.constant(W0), hparams(), batches(0))
    build(inner_optimizer=tfb.momentum(GAMMA, 0.7), learning_rate=None, memory_budget=192).detailed(
        tf.constant(W0), hparams(), batches(0))


# -- the vectorized step has no loop over the columns ----------------------------------------------

def op_nodes(concrete_function) -> list:
    """(type, name) of the ops of a traced function and of every function it calls (XLA wraps pfor
    in one); the name of a called function's op is prefixed by the function's name and ':'."""
    graph_def = concrete_function.graph.as_graph_def()
    return [(node.op, node.name) for node in graph_def.node] + [
        (node.op, f"{function.signature.name}:{node.name}")
        for function in graph_def.library.function for node in function.node_def
    ]


def op_types(concrete_function) -> list:
    """The op types of a traced function and of every function it calls."""
    return [t for t, _ in op_nodes(concrete_function)]


def test_a_cnn_step_with_all_columns_has_no_loop_and_matches_column_by_column_jvps():
    """One forward step (T = 1) of a conv–pool–conv–pool–dense network with N = 6 (per-kernel
    decays, learning rate, momentum): the same tangents as N separate JVPs, and the compiled
    step holds no While op (the columns are vectorized, not looped over). Both calls continue given
    tangents (the first from Z_0 = 0, which is tangents=None's start here: no init_params, B_0 = 0),
    so they share one trace and one XLA compilation."""
    from experiments.benchmarks import forward as bench
    from tf_bilevel.dynamics.transition import InnerState
    from tf_bilevel.estimators.forward import num_hparams, zero_tangents

    settings = {**bench.make_settings(1, quick=True), "batch_size": 4}
    rng = np.random.default_rng(0)
    size = settings["image_size"]
    x = tf.constant(rng.random((1, 4, size, size, 1), dtype=np.float32))
    y = tf.constant(rng.integers(0, 10, (1, 4)).astype("int32"))
    hg = tfb.hypergradient_fn(bench.inner_loss, bench.outer_loss, steps=1, inner_optimizer=bench.learned_momentum(),
                              estimator="forward", per_step_batches=True)
    params, hp = bench.init_params(settings), bench.initial_hparams()
    velocity = [tf.zeros_like(w) for w in params]
    first = hg.detailed(params, hp, (x, y), (x[0], y[0]), opt_state=velocity,
                        tangents=zero_tangents(InnerState(params, velocity), num_hparams(hp)))
    second = hg.detailed(first.final_params, hp, (x, y), (x[0], y[0]), opt_state=first.final_opt_state,
                         tangents=first.final_tangents)
    assert hg.tracing_count == 1  # a continued call does not retrace
    reference = bench.column_by_column(hg, jit_compile=False)(
        first.final_params, first.final_opt_state, hp, first.final_tangents, (x, y), (x[0], y[0]))
    for got, want in zip(tf.nest.flatten(second.final_tangents), tf.nest.flatten(reference[3])):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=2e-4, atol=1e-6)
    flat = np.concatenate([np.ravel(v) for v in tf.nest.flatten(second.hypergrad)])
    np.testing.assert_allclose(flat, reference[1].numpy(), rtol=2e-4, atol=1e-7)
    assert np.abs(flat).max() > 0
    types = op_types(hg._compiled.get_concrete_function(
        first.final_params, hp, (x, y), (x[0], y[0]), opt_state=first.final_opt_state, tangents=first.final_tangents,
    ))
    # No loop here: TF's own gradient ops, which XLA:CPU puts in its canonical layout itself (in a
    # loop they are Conv2D ops: tf_bilevel/_conv_layout.py, the test below).
    assert "Conv2DBackpropFilter" in types and not [t for t in types if "While" in t]


def test_cnn_steps_in_a_loop_under_xla_use_canonical_filter_gradients():
    """T = 2 forward steps (a while loop) of the conv network under XLA: the hypergradient and
    tangents of the graph-mode run, and every convolution in the optimized HLO has XLA:CPU's fast
    NHWC layout (`b01f_01io->b01f`). TF's filter- and input-gradient lowerings (`f01b_i01o->01bf`,
    `b01f_01oi->b01f`) are only made fast by XLA:CPU outside loops; inside the inner-step loop the
    filter gradient ran ~150-450x slower."""
    from experiments.benchmarks import forward as bench

    settings = {**bench.make_settings(1, quick=True), "batch_size": 4}
    rng = np.random.default_rng(1)
    size = settings["image_size"]
    x = tf.constant(rng.random((2, 4, size, size, 1), dtype=np.float32))
    y = tf.constant(rng.integers(0, 10, (2, 4)).astype("int32"))
    args = (bench.init_params(settings), bench.initial_hparams(), (x, y), (x[0], y[0]))
    results = {}
    for jit in (False, True):
        hg = tfb.hypergradient_fn(bench.inner_loss, bench.outer_loss, steps=2, inner_optimizer=bench.learned_momentum(),
                                  estimator="forward", per_step_batches=True, jit_compile=jit)
        results[jit] = hg.detailed(*args)
    for got, want in zip(tf.nest.flatten((results[True].hypergrad, results[True].final_tangents)),
                         tf.nest.flatten((results[False].hypergrad, results[False].final_tangents))):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=2e-4, atol=1e-6)
    hlo = hg._compiled.experimental_get_compiler_ir(*args, opt_state=None, model_state=None, tangents=None,
                                              check_reached=True)(
        stage="optimized_hlo")
    labels = re.findall(r"dim_labels=([^,\s]+)", hlo)
    assert labels and all(label == "b01f_01io->b01f" for label in labels), labels


@pytest.mark.slow
def test_benchmark_program_runs_quick(tmp_path):
    """`python -m experiments.benchmarks.forward --quick`: table and JSON (sizes tiny; not timed here)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run(
        [sys.executable, "-m", "experiments.benchmarks.forward", "--quick", f"--output_dir={tmp_path}"],
        cwd=Path(__file__).resolve().parents[1], env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ratio one pass" in done.stdout and "uses a while_loop" not in done.stderr
    report = json.loads((tmp_path / "forward_results.json").read_text())
    assert [r["jit_compile"] for r in report["results"]] == [True, False]
    for r in report["results"]:
        assert r["num_hparams"] == 6 and r["target"] == 7 and r["num_params"] > 0
        assert set(r["median_seconds"]) == {"plain", "one_pass", "n_reruns"} and min(r["median_seconds"].values()) > 0
        assert r["ratio_one_pass"] == r["median_seconds"]["one_pass"] / r["median_seconds"]["plain"]
        assert r["relative_difference_one_pass_vs_reruns"] < 1e-4  # the two ways agree
        assert r["tracing_count"] == 2  # fresh + continued, no retracing while timed


def test_cnn_under_xla_with_an_unknown_batch_matches_a_static_batch_and_reverse_mode():
    """The data's batch size unknown at trace time (dataset.batch(b) without drop_remainder): under
    XLA forward mode puts the batch on the channel axis of the convolutions that _conv_layout builds
    for the step's gradient, so their channel counts read as unknown; they are one group by
    construction (`one_group_scope`), so forward mode takes their gradients and vectorizes them
    instead of refusing (the refusal of unknown channels; tests/test_conv_layout.py checks the
    mark), and the hypergradient equals the static-batch one and reverse mode's (K-RMD, T = K)."""
    from experiments.benchmarks import forward as bench

    settings = {**bench.make_settings(1, quick=True), "batch_size": 4}
    rng = np.random.default_rng(2)
    size = settings["image_size"]
    x = tf.constant(rng.random((2, 4, size, size, 1), dtype=np.float32))
    y = tf.constant(rng.integers(0, 10, (2, 4)).astype("int32"))
    params, hp = bench.init_params(settings), bench.initial_hparams()

    def build(estimator, jit_compile=True):
        return tfb.hypergradient_fn(bench.inner_loss, bench.outer_loss, steps=2, inner_optimizer=bench.learned_momentum(),
                                    estimator=estimator, per_step_batches=True, jit_compile=jit_compile)

    def traced(hg, batch):
        spec = [tf.TensorSpec([2, batch, size, size, 1]), tf.TensorSpec([2, batch], tf.int32)]
        return tf.function(lambda x, y: hg(params, hp, (x, y), (x[0], y[0])), input_signature=spec)

    # Two functions: one would trace once, for the unknown batch, and reuse that trace for batch 4.
    unknown, static = traced(build("forward"), None), traced(build("forward"), 4)
    got = unknown(x, y)
    want = static(x, y)
    # The independent reference, reverse mode, without XLA: what is under test is forward mode
    # under XLA (both batches above); compiling the reference too only added an XLA compilation.
    reverse = build("reverse", jit_compile=False)(params, hp, (x, y), (x[0], y[0]))
    flat = lambda tree: np.concatenate([np.ravel(v) for v in tf.nest.flatten(tree)])  # noqa: E731
    np.testing.assert_allclose(flat(got), flat(want), rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(flat(got), flat(reverse), rtol=2e-4, atol=1e-6)
    assert np.abs(flat(got)).max() > 0
    # The loops that the batch unknown adds are only pfor's over the columns for Conv2D ops that TF's
    # ForwardAccumulator builds (scope gradient_tape/gradient_tape: its two tapes) in the JVP function
    # of one of those convolutions, a function of placeholders traced once per op type, attributes
    # and shapes, which no mark reaches: exact values, slower.
    loops = [Counter(name.split(":")[-1] for t, name in op_nodes(fn.get_concrete_function()) if "While" in t)
             for fn in (unknown, static)]
    added = loops[0] - loops[1]
    # Two after this file's earlier tests, none when this test runs alone (both measured): the JVP
    # functions are TF's, cached per process, so what earlier tests traced decides.
    assert added in (Counter(), Counter({"gradient_tape/gradient_tape/Conv2D/pfor/while": 2})), added
