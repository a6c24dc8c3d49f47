"""Public API that no other test exercised, each against an independent reference: Nesterov
momentum against a NumPy loop and finite differences, the Keras-layer losses against Keras'
own, Hyperparameter bounds (sigmoid reparametrization; exp/softplus projection against NumPy, in a
fit under XLA, with a control) and constraint in a fit, HyperStepCheckpoint(max_to_keep=)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_bilevel as tfb
from tf_bilevel.keras import losses

# -- tfb.momentum(nesterov=True) ------------------------------------------------------------
# g(w, λ) = ½ Σ e^λ (w − c)²,  f(w) = ½ ‖w − 1‖²,  in float64.
C = np.array([0.5, -1.0, 2.0])
W0 = np.array([0.3, 0.1, -0.2])
STEPS, GAMMA, BETA = 8, 0.2, 0.7


def _inner(w, lam):
    return 0.5 * tf.reduce_sum(tf.exp(lam) * (w - C) ** 2)


def _outer(w, lam):
    return 0.5 * tf.reduce_sum((w - 1.0) ** 2)


def _nesterov_numpy(lam: np.ndarray) -> np.ndarray:
    """w_T of v ← βv + g, w ← w − γ(g + βv), written out in NumPy."""
    w, v = W0.copy(), np.zeros_like(W0)
    for _ in range(STEPS):
        g = np.exp(lam) * (w - C)
        v = BETA * v + g
        w = w - GAMMA * (g + BETA * v)
    return w


@pytest.mark.parametrize("jit_compile", [False, True], ids=["function", "xla"])
def test_nesterov_momentum_matches_numpy_and_finite_differences(jit_compile):
    lam = np.array([0.2, -0.4, 0.1])
    hg = tfb.hypergradient_fn(_inner, _outer, steps=STEPS, inner_optimizer=tfb.momentum(GAMMA, beta=BETA, nesterov=True),
                              jit_compile=jit_compile)
    w_T = _nesterov_numpy(lam)
    np.testing.assert_allclose(hg.solve(tf.constant(W0), tf.constant(lam)).numpy(), w_T, rtol=1e-12)
    value, hypergrad = hg(tf.constant(W0), tf.constant(lam))
    np.testing.assert_allclose(float(value), 0.5 * np.sum((w_T - 1.0) ** 2), rtol=1e-12)

    def f(l):
        return 0.5 * np.sum((_nesterov_numpy(l) - 1.0) ** 2)

    eps = 1e-6
    fd = np.array([(f(lam + eps * e) - f(lam - eps * e)) / (2 * eps) for e in np.eye(3)])
    np.testing.assert_allclose(hypergrad.numpy(), fd, rtol=1e-6, atol=1e-9)
    # and Nesterov is not heavy-ball: the option changes the result
    plain = tfb.hypergradient_fn(_inner, _outer, steps=STEPS, inner_optimizer=tfb.momentum(GAMMA, beta=BETA),
                                 jit_compile=jit_compile)
    assert np.max(np.abs(plain.solve(tf.constant(W0), tf.constant(lam)).numpy() - w_T)) > 1e-3


# -- tf_bilevel.keras.losses against Keras ------------------------------------------------------
def test_categorical_crossentropy_and_mean_squared_error_match_keras():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)).astype("float32") * 3
    soft = rng.dirichlet(np.ones(4), size=6).astype("float32")
    np.testing.assert_allclose(losses.categorical_crossentropy(soft, logits).numpy(),
                               keras.losses.categorical_crossentropy(soft, logits, from_logits=True).numpy(), rtol=1e-5)
    labels = rng.integers(0, 4, 6)
    np.testing.assert_allclose(losses.sparse_categorical_crossentropy(labels, logits).numpy(),
                               keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True).numpy(),
                               rtol=1e-5)
    y_true, y_pred = rng.normal(size=(2, 5, 3)).astype("float32")
    np.testing.assert_allclose(losses.mean_squared_error(y_true, y_pred).numpy(),
                               keras.losses.mean_squared_error(y_true, y_pred).numpy(), rtol=1e-6)
    # second derivatives exist (the reason these losses exist): d²/dlogits² of the mean CE
    x = tf.constant(logits)
    with tf.GradientTape() as outer_tape:
        outer_tape.watch(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(losses.categorical_crossentropy(soft, x))
        first_column = tf.reduce_sum(tape.gradient(loss, x)[:, 0])
    hessian_rows = outer_tape.gradient(first_column, x).numpy()
    p = tf.nn.softmax(logits).numpy()
    # ∂/∂z Σ_i (p_i0 − y_i0 Σ y): for each row i, ∂p_0/∂z_k = p_0 (δ_0k − p_k) (targets sum to 1)
    expected = p[:, :1] * ((np.arange(4) == 0) - p)
    np.testing.assert_allclose(hessian_rows, expected, rtol=1e-4, atol=1e-6)


# -- Hyperparameter(bounds=..., constraint=...) in a fit -------------------------------------------
def _weighted_problem(hyperparameter):
    rng = np.random.default_rng(1)
    x, x_val = rng.normal(size=(2, 32, 4)).astype("float32")
    teacher = rng.normal(size=(4, 3))
    y, y_val = (x @ teacher).argmax(-1), (x_val @ teacher).argmax(-1)
    ce = losses.sparse_categorical_crossentropy
    keras.utils.set_random_seed(0)
    trainer = tfb.BilevelTrainer(
        keras.Sequential([keras.layers.Dense(3)]), hyperparameters={"scale": hyperparameter},
        inner_loss=lambda y_true, logits, hp: hp["scale"] * ce(y_true, logits),
        outer_loss=ce, steps=4, inner_learning_rate=0.5)
    data = tf.data.Dataset.from_tensors(((x, y), (x_val, y_val))).repeat()
    trainer.build_from_spec(data.element_spec)
    return trainer, data


def test_hyperparameter_with_bounds_starts_at_its_value_and_stays_inside():
    trainer, data = _weighted_problem(tfb.Hyperparameter(0.5, "sigmoid", bounds=(0.25, 3.0)))
    (raw,) = trainer.hyper_variables
    low, high = 0.25, 3.0
    initial = raw.numpy().copy()
    np.testing.assert_allclose(low + (high - low) / (1 + np.exp(-initial)), 0.5, rtol=1e-6)
    trainer.compile(optimizer=keras.optimizers.SGD(50.0))  # large steps: the sigmoid keeps λ inside
    trainer.fit(data, epochs=1, steps_per_epoch=5, verbose=0)
    scale = low + (high - low) / (1 + np.exp(-raw.numpy()))
    assert abs(raw.numpy() - initial) > 0.1 and low < scale < high


def test_hyperparameter_constraint_is_applied_after_every_update():
    trainer, data = _weighted_problem(tfb.Hyperparameter(0.05, constraint=keras.constraints.NonNeg()))
    (raw,) = trainer.hyper_variables
    trainer.compile(optimizer=keras.optimizers.SGD(-100.0))  # ascent: drives the scale below 0
    trainer.fit(data, epochs=1, steps_per_epoch=1, verbose=0)
    unconstrained, data2 = _weighted_problem(tfb.Hyperparameter(0.05))
    unconstrained.compile(optimizer=keras.optimizers.SGD(-100.0))
    unconstrained.fit(data2, epochs=1, steps_per_epoch=1, verbose=0)
    (free,) = unconstrained.hyper_variables
    assert free.numpy() < 0.0  # the update alone leaves the domain ...
    assert raw.numpy() == 0.0  # ... and NonNeg projects it back


# -- Hyperparameter(transform="exp"|"softplus", bounds=...): a projection of ν ---------------------
def _raw_end(transform: str, value: float) -> float:
    """ν with transform(ν) = value, written independently of tf_bilevel (float64)."""
    if transform == "exp":
        return float(np.log(value))
    return float(np.log(np.expm1(value)) if value < 50 else value + np.log1p(-np.exp(-value)))  # no overflow


def _forward(transform: str, raw: np.ndarray) -> np.ndarray:
    raw = raw.astype(np.float64)
    return np.exp(raw) if transform == "exp" else np.logaddexp(0.0, raw)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("transform", ["exp", "softplus"])
def test_bounds_clip_the_raw_variable_like_numpy_and_keep_values_inside_bit_for_bit(transform, dtype):
    low, high = 0.02, 5.0
    hp = tfb.Hyperparameter(0.1, transform, bounds=(low, high), dtype=dtype)
    lo, hi = _raw_end(transform, low), _raw_end(transform, high)
    raw = np.array([lo - 30.0, lo - 1e-3, lo + 1e-3, 0.5 * (lo + hi), hi - 1e-3, hi + 1e-3, hi + 30.0], dtype)
    clipped = hp.raw_constraint(tf.constant(raw)).numpy()
    assert clipped.dtype == raw.dtype
    # the ends: inverse(low), inverse(high) in dtype, rounded inward by at most a few ulps
    ends = np.asarray(hp.raw_bounds, dtype)
    assert np.all(np.abs(ends - np.asarray([lo, hi], dtype)) <= 4 * np.spacing(np.abs(ends)))
    np.testing.assert_array_equal(clipped, np.clip(raw, *ends))
    inside = (raw > lo) & (raw < hi)
    assert inside.sum() == 3
    np.testing.assert_array_equal(clipped[inside], raw[inside])  # the identity inside, to the bit
    assert clipped[0] == clipped[1] and clipped[-1] == clipped[-2]  # outside: exactly on the end
    rounding = np.finfo(dtype).eps  # λ on an end is the end up to the rounding of inverse(end) in dtype
    values = _forward(transform, clipped)
    np.testing.assert_allclose(values[[0, -1]], [low, high], rtol=8 * rounding)
    # λ through the library's own forward map: the same
    np.testing.assert_allclose(hp.value_from_raw(tf.constant(clipped)).numpy(), values, rtol=8 * rounding)
    # bounds leave the initial value and the map itself unchanged
    free = tfb.Hyperparameter(0.1, transform, dtype=dtype)
    np.testing.assert_array_equal(hp.raw_initial(), free.raw_initial())
    assert free.raw_constraint is None


def test_bounds_compose_with_a_user_constraint_which_runs_first():
    low, high = 0.5, 2.0
    to_fifty = lambda v: tf.ones_like(v) * 50.0  # noqa: E731  (a constraint leaving the bounds)
    hp = tfb.Hyperparameter(1.0, "exp", bounds=(low, high), constraint=to_fifty)
    # user constraint first, then the clip: ν = 50 becomes log 2, rounded inward (the reverse order would give 50)
    clipped = hp.raw_constraint(tf.constant([0.0, -7.0])).numpy()
    np.testing.assert_array_equal(clipped, np.float32([hp.raw_bounds[1]] * 2))
    np.testing.assert_allclose(clipped, np.log(2.0), rtol=1e-6)
    floor = tfb.Hyperparameter(1.0, "softplus", bounds=(low, high), constraint=keras.constraints.NonNeg())
    raw = tf.constant([-1.0, 0.3, 9.0])
    expected = np.clip(np.maximum(raw.numpy(), 0.0), _raw_end("softplus", low), _raw_end("softplus", high))
    np.testing.assert_allclose(floor.raw_constraint(raw).numpy(), expected, rtol=1e-6)
    assert tfb.Hyperparameter(1.0, "exp", constraint=to_fifty).raw_constraint is to_fifty  # no bounds: as given


def _fit_scale(hyperparameter, learning_rate: float, jit_compile: bool) -> np.ndarray:
    """ν after 3 outer Adam steps of `learning_rate` (Adam moves ν by ~|learning_rate| a step)."""
    trainer, data = _weighted_problem(hyperparameter)
    trainer.compile(optimizer=keras.optimizers.Adam(learning_rate), jit_compile=jit_compile)
    trainer.fit(data, epochs=1, steps_per_epoch=3, verbose=0)
    (raw,) = trainer.hyper_variables
    return raw.numpy()


@pytest.mark.parametrize(
    "transform, learning_rate, jit_compile",
    [("exp", 3.0, False)] + [(t, lr, True) for t in ("exp", "softplus") for lr in (3.0, -3.0)],
    ids=["exp-descent-function", "exp-descent-xla", "exp-ascent-xla", "softplus-descent-xla", "softplus-ascent-xla"],
)
def test_a_huge_outer_step_keeps_lambda_in_bounds_and_leaves_them_without(transform, learning_rate, jit_compile):
    low, high = 0.25, 3.0
    bounded = _fit_scale(tfb.Hyperparameter(0.5, transform, bounds=(low, high)), learning_rate, jit_compile)
    # the control: unbounded, the same steps take λ out of [low, high] (without XLA in every case:
    # it only shows where the steps go, ~|learning_rate| a step; the bounded run is the one compiled
    # as parametrized, and an XLA compilation of the control only added time)
    free = _fit_scale(tfb.Hyperparameter(0.5, transform), learning_rate, jit_compile=False)
    free_value = float(_forward(transform, free))
    assert not low <= free_value <= high, free_value
    # bounded: λ is held on the end it was pushed towards (in float32: the end rounded once)
    end = low if free_value < low else high
    hp = tfb.Hyperparameter(0.5, transform, bounds=(low, high))
    assert bounded == np.float32(hp.raw_bounds[end == high])
    assert abs(bounded - np.float32(_raw_end(transform, end))) <= 4 * np.spacing(np.abs(bounded))
    assert float(_forward(transform, bounded)) == pytest.approx(end, rel=1e-6)


def test_bounds_hold_in_the_legacy_tf_keras_trainer_too():
    tf_keras = pytest.importorskip("tf_keras")
    from tf_bilevel.keras.legacy import LegacyBilevelTrainer

    rng = np.random.default_rng(1)
    x, x_val = rng.normal(size=(2, 32, 4)).astype("float32")
    teacher = rng.normal(size=(4, 3))
    data = tf.data.Dataset.from_tensors(((x, (x @ teacher).argmax(-1)), (x_val, (x_val @ teacher).argmax(-1)))).repeat()
    ce = losses.sparse_categorical_crossentropy
    scales = {}
    for bounds in ((0.25, 3.0), None):
        tf_keras.utils.set_random_seed(0)
        trainer = LegacyBilevelTrainer(
            tf_keras.Sequential([tf_keras.layers.Dense(3)]),
            hyperparameters={"scale": tfb.Hyperparameter(0.5, "exp", bounds=bounds)},
            inner_loss=lambda y_true, logits, hp: hp["scale"] * ce(y_true, logits), outer_loss=ce, steps=4,
            inner_learning_rate=0.5)
        trainer.build_from_spec(data.element_spec)
        trainer.compile(optimizer=tf_keras.optimizers.Adam(3.0))  # tf-keras' optimizer applies the constraint
        trainer.fit(data, epochs=1, steps_per_epoch=3, verbose=0)
        (raw,) = trainer.hyper_variables
        scales[bounds] = float(np.exp(raw.numpy()))
    assert scales[None] > 3.0  # the control: unbounded, λ leaves the range
    assert scales[(0.25, 3.0)] == pytest.approx(3.0, rel=1e-6)


def test_a_bounded_trainer_restores_from_save_weights_and_keeps_projecting(tmp_path):
    low, high = 0.25, 3.0
    trainer, data = _weighted_problem(tfb.Hyperparameter(0.5, "exp", bounds=(low, high)))
    trainer.compile(optimizer=keras.optimizers.Adam(0.3))
    trainer.fit(data, epochs=1, steps_per_epoch=2, verbose=0)
    trainer.save_weights(str(tmp_path / "trainer.weights.h5"))
    (saved,) = (v.numpy() for v in trainer.hyper_variables)
    restored, data2 = _weighted_problem(tfb.Hyperparameter(0.5, "exp", bounds=(low, high)))
    restored.load_weights(str(tmp_path / "trainer.weights.h5"))
    (raw,) = restored.hyper_variables
    assert raw.numpy() == saved and saved != np.float32(np.log(0.5))
    restored.compile(optimizer=keras.optimizers.Adam(3.0))
    restored.fit(data2, epochs=1, steps_per_epoch=3, verbose=0)
    assert np.float32(np.log(low)) <= raw.numpy() <= np.float32(np.log(high))


_OUTSIDE = r"Hyperparameter\(bounds=\(0\.5, 2\.0\)\): initial="


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(initial=1.0, bounds=(0.5, 2.0)), ValueError, r"bounds=\(0\.5, 2\.0\), transform='identity'\): bounds need"),
        (dict(initial=np.eye(2), transform="symmetric", bounds=(0.5, 2.0)), ValueError,
         r"transform='symmetric'\): bounds need"),
        (dict(initial=2 * np.eye(2) + 1, transform="symmetric_softplus", bounds=(0.5, 4.0)), ValueError,
         r"transform='symmetric_softplus'\): bounds need"),
        (dict(initial=1.0, transform="exp", bounds=(0.0, 2.0)), ValueError, r"transform='exp'\): needs 0 < low"),
        (dict(initial=1.0, transform="softplus", bounds=(-1.0, 2.0)), ValueError, r"transform='softplus'\): needs 0 < low"),
        (dict(initial=3.0, transform="exp", bounds=(0.5, 2.0)), ValueError, _OUTSIDE + r"3\.0 is outside \[0\.5, 2\.0\]"),
        (dict(initial=[1.0, 0.1], transform="softplus", bounds=(0.5, 2.0)), ValueError, _OUTSIDE + r"0\.1 is outside"),
        (dict(initial=0.5, transform="sigmoid", bounds=(0.5, 2.0)), ValueError,
         r"Hyperparameter\(bounds=\(0\.5, 2\.0\), transform='sigmoid'\): initial=\.\.\. must be in the open interval"),
        (dict(initial=1.0, transform="exp", bounds=(2.0, 0.5)), ValueError,
         r"bounds=\(2\.0, 0\.5\)\): needs finite \(low, high\) with low < high"),
        (dict(initial=1.0, transform="exp", bounds=(0.5, np.inf)), ValueError, r"needs finite"),
        (dict(initial=1.0, transform="exp", bounds=(0.5,)), ValueError, r"bounds=\(0\.5,\)\): needs two numbers"),
        (dict(initial=1.0, transform="exp", bounds=(0.5, 2.0), constraint="no_such_constraint"), ValueError,
         r"Hyperparameter\(constraint='no_such_constraint'\): not a Keras constraint"),
        (dict(initial=1.0, transform="exp", constraint="no_such_constraint"), ValueError,
         r"Hyperparameter\(constraint='no_such_constraint'\): not a Keras constraint"),
        # ends that do not fit float32: an infinite raw end (no upper bound), λ = 0 at the clip
        (dict(initial=1.0, transform="softplus", bounds=(1e-3, 1e39)), ValueError,
         r"Hyperparameter\(bounds=\(0\.001, 1e\+39\), transform='softplus', dtype='float32'\): the end 1e\+39 does not fit"),
        (dict(initial=0.5, transform="exp", bounds=(1e-45, 1.0)), ValueError,
         r"Hyperparameter\(bounds=\(1e-45, 1\.0\), transform='exp', dtype='float32'\): the end 1e-45 does not fit"),
        # no float32 λ (or not two raw values) between the ends
        (dict(initial=1.5, transform="exp", bounds=(1.5, 1.5000001)), ValueError,
         r"Hyperparameter\(bounds=\(1\.5, 1\.5000001\), transform='exp', dtype='float32'\): the bounds are too close"),
        (dict(initial=1.0, transform="softplus", bounds=(1.0, 1.00000001)), ValueError,
         r"transform='softplus', dtype='float32'\): no float32 raw value near softplus\^-1\(1\.0\)"),
    ],
)
def test_bad_bounds_are_refused_by_name(kwargs, error, message):
    with pytest.raises(error, match=message):
        tfb.Hyperparameter(**kwargs)


def test_an_initial_value_on_a_projection_end_is_accepted():
    x = 0.25372906466829104  # float64: math.log(x) and np.log(x) differ in the last bit
    for dtype, low, high in (("float32", 0.5, 2.0), ("float64", 0.5, 2.0), ("float64", x, 10 * x + 1)):
        for transform in ("exp", "softplus"):
            for end in (low, high):
                hp = tfb.Hyperparameter(end, transform, bounds=(low, high), dtype=dtype)
                assert hp.raw_constraint(tf.constant(hp.raw_initial())).numpy() == hp.raw_initial()
                assert abs(float(hp.value_from_raw(tf.constant(hp.raw_initial()))) - end) <= 8 * np.spacing(np.asarray(end, dtype))


def _ulps(a: np.ndarray, b: float, dtype: str) -> np.ndarray:
    return np.abs(np.asarray(a, np.longdouble) - b) / np.spacing(np.asarray(b, dtype)).astype(np.longdouble)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_projection_ends_are_rounded_inward_so_lambda_stays_in_bounds(dtype):
    rng = np.random.default_rng(0)
    for _ in range(150):
        low = 10 ** rng.uniform(-30, 30)
        high = low * 10 ** rng.uniform(1e-5, 5)
        transform = str(rng.choice(["exp", "softplus"]))
        hp = tfb.Hyperparameter(low, transform, bounds=(low, high), dtype=dtype)
        ends = np.asarray(hp.raw_bounds, dtype)
        assert hp.raw_bounds == tuple(float(end) for end in ends)  # values of dtype
        computed = hp.value_from_raw(tf.constant(ends)).numpy().astype(np.float64)  # λ on each end, in dtype
        assert low <= computed[0] and computed[1] <= high, (transform, low, high, computed)
        # independently, in long double: exp, resp. log(1 + e^ν) = max(ν, 0) + log1p(e^-|ν|)
        long_ends = ends.astype(np.longdouble)
        softplus = np.maximum(long_ends, 0) + np.log1p(np.exp(-np.abs(long_ends)))
        exact = np.exp(long_ends) if transform == "exp" else softplus
        assert low <= exact[0] and exact[1] <= high
        # ... and only just inward: within a few ulps of ν (coarse when |ν| is large) or of λ (when ν is near 0)
        nearest = np.asarray([_raw_end(transform, low), _raw_end(transform, high)], dtype)
        raw_ulps = np.abs(ends - nearest) / np.spacing(np.abs(nearest))
        lambda_ulps = np.array([_ulps(exact[0], low, dtype), _ulps(exact[1], high, dtype)])
        assert np.all(np.minimum(raw_ulps, lambda_ulps) <= 4), (transform, low, high, raw_ulps, lambda_ulps)


def _sweep_ends(dtype: str) -> np.ndarray:
    """λ ends over the dtype's range, near 1 and log 2 (ν ≈ 0, where one ulp of ν moves λ far less
    than λ's own rounding), and random ones."""
    smallest, largest = {"float16": (-6, 4), "bfloat16": (-30, 30)}.get(dtype, (-30, 30))
    rng = np.random.default_rng(1)
    near = [c + s * d for c in (1.0, np.log(2.0)) for s in (1, -1) for d in (1e-7, 3e-7, 1e-5, 1e-3, 0.1)]
    return np.concatenate([10 ** np.linspace(smallest, largest, 41), near, 10 ** rng.uniform(smallest, largest, 10)])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("transform", ["exp", "softplus"])
def test_each_projection_end_is_the_rounded_inverse_or_the_outermost_raw_value_inside(transform, dtype):
    from tf_bilevel.keras.reparam import TRANSFORMS, _raw_ends

    forward = {"exp": tf.exp, "softplus": tf.nn.softplus}[transform]
    compiled = tf.function(forward, jit_compile=True)
    far_inside = 0  # ends many ulps from the rounded inverse: where stepping one ulp would not do

    def inside(raw: np.ndarray, low: float, high: float) -> np.ndarray:
        """transform(raw) in [low, high] as computed in dtype (eager on a scalar, on a vector of 40
        copies (vectorized kernels and the remainder; other lengths than the library's), and
        under XLA) and, independently, in long double."""
        spread = tf.repeat(tf.constant(raw)[:, None], 40, axis=1)
        computed = np.stack([forward(tf.constant(raw)).numpy(), tf.reduce_min(forward(spread), 1).numpy(),
                             tf.reduce_max(forward(spread), 1).numpy(), tf.reduce_min(compiled(spread), 1).numpy(),
                             tf.reduce_max(compiled(spread), 1).numpy()]).astype(np.float64)
        long_raw = raw.astype(np.float64).astype(np.longdouble)
        softplus = np.maximum(long_raw, 0) + np.log1p(np.exp(-np.abs(long_raw)))
        exact = np.exp(long_raw) if transform == "exp" else softplus
        return np.all((low <= computed) & (computed <= high), 0) & (low <= exact) & (exact <= high)

    for end in _sweep_ends(dtype):
        for low, high in ((end, 4 * end), (end / 4, end)):
            ends = np.asarray(_raw_ends(transform, (low, high), dtype), dtype)
            outward = np.nextafter(ends, np.asarray([-np.inf, np.inf], dtype))
            rounded = np.asarray(TRANSFORMS[transform].inverse(np.float64([low, high])), dtype)  # no step taken
            assert np.all(inside(ends, low, high)), (low, high, ends)
            assert np.all((ends == rounded) | ~inside(outward, low, high)), (low, high, ends)  # not a step too far
            far = np.abs(ends.astype(np.float64) - rounded) > 1000 * np.spacing(np.abs(rounded)).astype(np.float64)
            far_inside += int(np.any(far))
    assert far_inside > 0 or (transform, dtype) == ("exp", "float64")


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_first_inside_finds_the_boundary_even_past_the_largest_finite_value(dtype):
    """Doubling steps from -60000 pass ±inf before reaching the boundary: the last interval is
    still bisected (the boundary: r inside, its outward neighbour not); None only where the
    largest finite value is outside too."""
    from tf_bilevel.keras.reparam import _first_inside

    largest = np.finfo(dtype).max
    for start, inward, threshold in ((-60000, 1, 100), (-60000, 1, largest), (60000, -1, -largest), (3, -1, -7.5)):
        at_least = (lambda r: float(r) >= threshold) if inward > 0 else (lambda r: float(r) <= threshold)
        found = _first_inside(np.asarray(start, dtype), inward, at_least)
        expected = np.asarray(threshold, dtype)  # representable: the boundary itself
        assert found is not None and found.dtype == dtype and found == expected, (start, threshold, found)
        assert not at_least(np.nextafter(found, dtype(start)))
    assert _first_inside(np.asarray(-60000, dtype), 1, lambda r: False) is None
    assert _first_inside(np.asarray(5, dtype), 1, lambda r: float(r) == 5) == 5  # start inside: start


def test_a_constraint_name_or_class_is_resolved_by_keras_with_or_without_bounds():
    raw = tf.constant([-1.0, 0.3, 9.0])
    expected = {None: [0.0, 0.3, 9.0], (0.5, 2.0): np.clip([0.0, 0.3, 9.0], *tfb.Hyperparameter(1.0, "softplus", bounds=(0.5, 2.0)).raw_bounds)}
    for bounds in (None, (0.5, 2.0)):
        for constraint in ("non_neg", keras.constraints.NonNeg, keras.constraints.NonNeg()):
            hp = tfb.Hyperparameter(1.0, "softplus", bounds=bounds, constraint=constraint)
            assert isinstance(hp.constraint, keras.constraints.NonNeg)
            np.testing.assert_array_equal(hp.raw_constraint(raw).numpy(), np.float32(expected[bounds]))


def test_the_projection_constraints_are_keras_constraints_with_configs():
    from tf_bilevel.keras.reparam import RawRange

    clip = tfb.Hyperparameter(1.0, "exp", bounds=(0.5, 2.0)).raw_constraint
    assert isinstance(clip, keras.constraints.Constraint)
    again = RawRange.from_config(clip.get_config())
    assert (again.low, again.high) == (clip.low, clip.high) and repr(again) == repr(clip)
    composed = tfb.Hyperparameter(1.0, "exp", bounds=(0.5, 2.0), constraint="non_neg").raw_constraint
    assert isinstance(composed, keras.constraints.Constraint)
    assert repr(composed).startswith("_Then(first=<") and repr(composed).endswith(f"second={clip!r})")
    assert composed.get_config()["second"].get_config() == clip.get_config()


# -- HyperStepCheckpoint(max_to_keep=) ------------------------------------------------------------
def test_hyper_step_checkpoint_keeps_the_latest_max_to_keep(tmp_path):
    def inner(w, lam):
        return 0.5 * tf.reduce_sum(tf.exp(lam) * (w - 1.0) ** 2)

    def outer(w, lam):
        return tf.reduce_sum(w**2)

    hg = tfb.hypergradient_fn(inner, outer, steps=3, learning_rate=0.3, jit_compile=False)
    step = tfb.HyperStep(hg, tf.zeros([2], tf.float64), keras.optimizers.SGD(0.1))
    checkpoint = tfb.HyperStepCheckpoint(tmp_path, step, max_to_keep=2)
    w0 = tf.zeros([2], tf.float64)
    saved = []
    for _ in range(4):
        step(w0)
        checkpoint.save()
        saved.append(step.hparams.numpy().copy())
    kept = checkpoint.manager.checkpoints
    assert len(kept) == 2 and kept[-1].endswith("-4") and kept[0].endswith("-3")
    assert len(list(tmp_path.glob("*.index"))) == 2
    step.hparams.assign(tf.zeros([2], tf.float64))
    assert checkpoint.restore() == 4
    np.testing.assert_array_equal(step.hparams.numpy(), saved[-1])
