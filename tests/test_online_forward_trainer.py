"""BilevelTrainer(online=True, estimator="forward", forget=μ) and tfb.keras.LearnedSchedule.

The trainer's carried tangents are checked against TF differentiating the whole run unrolled
(λ frozen by an outer learning rate of 0, so the exact dw/dλ through every inner step so far);
the schedule's values against NumPy formulas and its hypergradient against central finite
differences of an unrolled NumPy loop; the global step (hyper-iteration × T + t) across `fit`
calls here, and across a SIGKILL in tests/test_resume.py.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_bilevel as tfb

T, ITERATIONS, DIM, OUT, BATCH = 3, 4, 4, 2, 8
TOTAL = T * ITERATIONS
SEGMENTS = [0.2, 0.05]


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(TOTAL * BATCH, DIM)).astype("float32")
    y = (x @ rng.normal(size=(DIM, OUT))).astype("float32")
    x_val = rng.normal(size=(BATCH, DIM)).astype("float32")
    return x, y, x_val, (x_val @ rng.normal(size=(DIM, OUT))).astype("float32")


def _mse(y_true, y_pred):
    return tf.reduce_mean(tf.square(y_true - y_pred), axis=-1)


def _decay(w, hp):
    return hp["decay"] * tf.add_n([tf.reduce_sum(tf.square(v)) for v in w])


def _trainer(jit_compile=False, **options):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(OUT)])
    arguments = dict(
        inner_loss=_mse, outer_loss=_mse, steps=T, online=True, estimator="forward",
        hyperparameters={"decay": tfb.Hyperparameter(0.05, transform="exp")}, inner_regularizer=_decay,
        inner_learning_rate=tfb.keras.LearnedSchedule.piecewise(SEGMENTS, total_steps=TOTAL),
    )
    trainer = tfb.BilevelTrainer(model, **{**arguments, **options})
    trainer.compile(optimizer=keras.optimizers.SGD(0.0), jit_compile=jit_compile)  # λ frozen
    return trainer, model


def _tasks(x, y, x_val, y_val):
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH, drop_remainder=True)
    val = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(BATCH, drop_remainder=True)
    return tfb.keras.online_tasks(train, val, steps=T)


def _unrolled_run(w0, x, y, lam, steps):
    """w after `steps` plain SGD steps with the piecewise schedule over the global step."""
    segments, decay = lam[:2], lam[2]
    w = list(w0)
    for s in range(steps):
        xb, yb = x[s * BATCH:(s + 1) * BATCH], y[s * BATCH:(s + 1) * BATCH]
        with tf.GradientTape() as tape:
            tape.watch(w)
            loss = tf.reduce_mean(_mse(yb, xb @ w[0] + w[1])) + decay * sum(tf.reduce_sum(tf.square(v)) for v in w)
        grads = tape.gradient(loss, w)
        rate = segments[min(len(SEGMENTS) - 1, s * len(SEGMENTS) // TOTAL)]
        w = [v - rate * g for v, g in zip(w, grads)]
    return w


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_carried_tangents_are_dw_dlambda_through_the_whole_run_across_fit_calls(jit_compile):
    x, y, x_val, y_val = _data()
    trainer, model = _trainer(jit_compile)
    w0 = [tf.constant(v.numpy()) for v in model.trainable_variables]
    tasks = trainer.resumable(_tasks(x, y, x_val, y_val))
    trainer.fit(tasks, epochs=1, steps_per_epoch=ITERATIONS // 2, verbose=0)
    assert int(trainer.inner_steps_done.numpy()) == TOTAL // 2
    trainer.fit(trainer.resumable(_tasks(x, y, x_val, y_val)), epochs=1, steps_per_epoch=ITERATIONS // 2, verbose=0)
    assert int(trainer.inner_steps_done.numpy()) == TOTAL  # the global step continued across fit calls

    # λ in the core's order: inner_learning_rate/segments (2), then user/decay (1).
    lam = tf.constant(SEGMENTS + [0.05], tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(lam)
        w = _unrolled_run(w0, x, y, lam, TOTAL)
    for variable, expected in zip(model.trainable_variables, w):
        np.testing.assert_allclose(variable.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    carried = trainer.regime.carried["tangents"].read()
    for z, expected in zip(carried.params, w):
        jacobian = tape.jacobian(expected, lam)  # [*shape, N]
        reference = np.moveaxis(jacobian.numpy(), -1, 0)
        np.testing.assert_allclose(z.numpy(), reference, rtol=2e-4, atol=1e-6)
    # The second segment's γ was used (global step ≥ TOTAL / 2): its column is not zero.
    assert np.abs(carried.params[0].numpy()[1]).max() > 1e-3


def test_forget_zero_keeps_only_the_last_hyper_iteration():
    """μ = 0: the tangents after a hyper-iteration are those of its T steps alone."""
    x, y, x_val, y_val = _data()
    trainer, model = _trainer(forget=0.0)
    trainer.fit(trainer.resumable(_tasks(x, y, x_val, y_val)), epochs=1, steps_per_epoch=ITERATIONS - 1, verbose=0)
    w_start = [tf.constant(v.numpy()) for v in model.trainable_variables]
    trainer.fit(trainer.resumable(_tasks(x, y, x_val, y_val)), epochs=1, steps_per_epoch=1, verbose=0)
    lam = tf.constant(SEGMENTS + [0.05], tf.float32)
    last = slice((TOTAL - T) * BATCH, TOTAL * BATCH)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(lam)
        # The last T steps, from the weights they started at (all in the second segment).
        shifted = tf.concat([lam[1:2], lam[1:2], lam[2:]], 0)
        w = _unrolled_run(w_start, x[last], y[last], shifted, T)
    for z, expected in zip(trainer.regime.carried["tangents"].read().params, w):
        reference = np.moveaxis(tape.jacobian(expected, lam).numpy(), -1, 0)
        np.testing.assert_allclose(z.numpy(), reference, rtol=2e-4, atol=1e-6)


def test_too_many_hyperparameters_for_forward_mode_is_refused_at_build_naming_k_rmd():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1024,)), keras.layers.Dense(1024)])
    trainer = tfb.BilevelTrainer(
        model, inner_loss=_mse, outer_loss=_mse, steps=2, online=True, estimator="forward",
        hyperparameters={"decays": tfb.Hyperparameter(np.full(80, 0.01), transform="exp")},
        inner_regularizer=lambda w, hp: tf.reduce_sum(hp["decays"]) * tf.reduce_sum(tf.square(w[0])),
    )
    trainer.compile(optimizer=keras.optimizers.SGD(0.0))
    spec = (tf.TensorSpec([2, 4, 1024]), tf.TensorSpec([2, 4, 1024])), (tf.TensorSpec([4, 1024]), tf.TensorSpec([4, 1024]))
    with pytest.raises(ValueError, match=r"N=80 tangent columns.*K-RMD, estimator='reverse' with truncate=K"):
        trainer.build_from_spec(spec)


def test_diagnostics_compare_with_full_rmd_of_the_hyper_iteration():
    """diagnostics_every: the full-RMD reference of one hyper-iteration gets no tangents; at the
    first hyper-iteration (Z_0 = 0) forward mode and full RMD are the same hypergradient."""
    x, y, x_val, y_val = _data()
    trainer, _ = _trainer(diagnostics_every=1)
    history = trainer.fit(trainer.resumable(_tasks(x, y, x_val, y_val)), epochs=1, steps_per_epoch=1, verbose=0)
    np.testing.assert_allclose(history.history["cosine_to_full_rmd"][-1], 1.0, rtol=1e-5)


def test_forget_needs_the_forward_estimator():
    with pytest.raises(ValueError, match="forget applies to estimator='forward' only"):
        _trainer(estimator="reverse", forget=0.5)


# ------------------------------------------------------------------------------------
# LearnedSchedule
# ------------------------------------------------------------------------------------
def _cosine_numpy(s, peak, final, total, warmup):
    ramp = min(1.0, (s + 1) / warmup) if warmup else 1.0
    progress = min(1.0, max(0.0, (s - warmup) / (total - warmup)))
    return peak * ramp * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_schedule_values_match_the_formulas():
    cosine = tfb.keras.LearnedSchedule.cosine(0.3, total_steps=20, warmup_steps=4, final=0.2)
    theta = {"peak": 0.3, "final": 0.2}
    for s in [0, 1, 3, 4, 5, 12, 19, 20, 31]:
        np.testing.assert_allclose(cosine(s, theta), _cosine_numpy(s, 0.3, 0.2, 20, 4), rtol=1e-6)
    piecewise = tfb.keras.LearnedSchedule.piecewise([0.3, 0.2, 0.1], total_steps=10)
    segments = {"segments": tf.constant([0.3, 0.2, 0.1])}
    for s in range(14):
        np.testing.assert_allclose(piecewise(s, segments), [0.3, 0.2, 0.1][min(2, s * 3 // 10)], rtol=1e-7)
    # The initial θ as the trainer learns it: λ = transform(ν).
    specs = cosine.hyperparameters
    assert specs["peak"].transform == "exp" and specs["final"].transform == "sigmoid"


@pytest.mark.parametrize("kind", ["cosine", "piecewise"])
def test_schedule_hypergradient_matches_finite_differences(kind):
    """d f(w_T)/dθ through every step's γ_s(θ) (core forward mode, float64) against central
    differences of an unrolled NumPy loop on g_s = ½‖w − b_s‖², f = ½‖w − c‖²."""
    steps, dim = 8, 3
    rng = np.random.default_rng(1)
    b, c, w0 = rng.normal(size=(steps, dim)), rng.normal(size=dim), rng.normal(size=dim)
    if kind == "cosine":
        schedule = tfb.keras.LearnedSchedule.cosine(0.3, total_steps=steps, warmup_steps=2, final=0.2, dtype="float64")
        theta = {"final": 0.2, "peak": 0.3}
    else:
        schedule = tfb.keras.LearnedSchedule.piecewise([0.3, 0.1], total_steps=steps, dtype="float64")
        theta = {"segments": np.array([0.3, 0.1])}
    hg = tfb.hypergradient_fn(
        lambda w, th, batch: 0.5 * tf.reduce_sum(tf.square(w - batch)),
        lambda w, th, batch: 0.5 * tf.reduce_sum(tf.square(w - batch)),
        steps=steps, learning_rate=schedule, per_step_batches=True, estimator="forward",
    )
    _, grad = hg(tf.constant(w0), tf.nest.map_structure(tf.constant, theta), tf.constant(b), tf.constant(c))

    def f(th):
        w = w0.copy()
        for s in range(steps):
            w = w - float(schedule(s, th)) * (w - b[s])
        return 0.5 * np.sum((w - c) ** 2)

    flat = np.concatenate([np.ravel(v) for v in tf.nest.flatten(theta)]).astype(np.float64)
    numeric = []
    for i in range(flat.size):
        e = np.zeros_like(flat)
        e[i] = 1e-6
        plus, minus = (tf.nest.pack_sequence_as(theta, _split(flat + d * e, theta)) for d in (1, -1))
        numeric.append((f(plus) - f(minus)) / 2e-6)
    analytic = np.concatenate([np.ravel(g) for g in tf.nest.flatten(grad)])
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)
    assert np.all(np.abs(numeric) > 1e-4)  # every parameter of the schedule matters here


def _split(flat, structure):
    out, offset = [], 0
    for leaf in tf.nest.flatten(structure):
        size = int(np.size(leaf))
        out.append(flat[offset:offset + size].reshape(np.shape(leaf)))
        offset += size
    return out


def test_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match=r"warmup_steps must be an integer in \[0, 10\)"):
        tfb.keras.LearnedSchedule.cosine(0.1, total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="final must be in"):
        tfb.keras.LearnedSchedule.cosine(0.1, total_steps=10, final=1.0)
    with pytest.raises(ValueError, match="values must be a non-empty list of positive"):
        tfb.keras.LearnedSchedule.piecewise([0.1, -1.0], total_steps=10)
    with pytest.raises(ValueError, match="total_steps must be a positive int"):
        tfb.keras.LearnedSchedule.piecewise([0.1], total_steps=0)
