"""Tests for the Keras 3 BilevelTrainer (tf_bilevel/keras/).

References are independent of the trainer: a NumPy implementation of the inner gradient
descent (hypergradients checked by central finite differences in float64), and the
trainer's own inner-loop predictions scored in NumPy. Every test builds its own trainer
(one trace each); the problems are tiny so that the file runs in about a minute and a half.
"""

from __future__ import annotations


import numpy as np
import pytest
import tensorflow as tf

import keras  # noqa: E402

import tf_bilevel as tfb
from tf_bilevel.keras import losses
from tf_bilevel.keras.reparam import Hyperparameter

CE = losses.sparse_categorical_crossentropy


# ------------------------------------------------------------------------------------
# NumPy reference: T steps of gradient descent on a (weighted, L2-regularized) softmax
# regression, and the validation cross-entropy at w_T.
# ------------------------------------------------------------------------------------
def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def numpy_inner_gd(W, b, x, y, weights, lr, steps, l2=0.0):
    W, b = W.copy(), b.copy()
    n = len(x)
    for _ in range(steps):
        p = _softmax(x @ W + b)
        p[np.arange(n), y] -= 1.0
        g = weights[:, None] * p / n
        W, b = W - lr * (x.T @ g + 2.0 * l2 * W), b - lr * g.sum(0)
    return W, b


def numpy_ce(W, b, x, y):
    p = _softmax(x @ W + b)
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _softplus(v):
    return np.log1p(np.exp(v))


def classification_data(seed, n, d, classes, dtype="float32"):
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(d, classes))
    x = rng.normal(size=(n, d)).astype(dtype)
    xv = rng.normal(size=(n, d)).astype(dtype)
    return x, (x @ teacher).argmax(-1), xv, (xv @ teacher).argmax(-1)


def one_step_gradient(trainer, dataset):
    """d f / d(raw λ) of one hyper-iteration, read off an SGD(learning_rate=1) update."""
    before = {v.name: np.array(v.numpy()) for v in trainer.hyper_variables} if trainer.built else None
    if before is None:
        trainer.build_from_spec(dataset.element_spec)
        before = {v.name: np.array(v.numpy()) for v in trainer.hyper_variables}
    trainer.fit(dataset.take(1), epochs=1, verbose=0)
    return {v.name: before[v.name] - v.numpy() for v in trainer.hyper_variables}, before


# ------------------------------------------------------------------------------------
# README example: data hypercleaning with XLA (deterministic regime).
# ------------------------------------------------------------------------------------
def test_readme_hypercleaning_example_learns_to_downweight_corrupted_labels_with_xla():
    rng = np.random.default_rng(0)
    x_train, x_val = rng.normal(size=(2, 500, 20)).astype("float32")
    teacher = rng.normal(size=(20, 5))
    y_train, y_val = (x_train @ teacher).argmax(-1), (x_val @ teacher).argmax(-1)
    corrupted = rng.random(500) < 0.5
    y_train = np.where(corrupted, rng.integers(0, 5, 500), y_train)

    trainer = tfb.BilevelTrainer(
        keras.Sequential([keras.layers.Dense(5)]),
        hyperparameters={"example_weights": tfb.Hyperparameter(np.full(500, 0.5), transform="sigmoid")},
        inner_loss=lambda y, logits, hp: hp["example_weights"] * CE(y, logits),
        outer_loss=CE, steps=50, truncate=10, inner_learning_rate=1.0)
    trainer.compile(optimizer=keras.optimizers.Adam(0.1), metrics=["accuracy"], jit_compile=True)
    tasks = tf.data.Dataset.from_tensors(((x_train, y_train), (x_val, y_val))).repeat()
    held_out = tf.data.Dataset.from_tensors(((x_train, y_train), (x_val, y_val)))
    history = trainer.fit(tasks, epochs=3, steps_per_epoch=20, validation_data=held_out,
                          callbacks=[keras.callbacks.EarlyStopping("val_loss", patience=1)], verbose=0)

    assert trainer.jit_compile is True
    h = history.history
    assert {"loss", "hypergradient_norm", "accuracy", "val_loss", "val_accuracy"} <= set(h)
    assert h["loss"][-1] < h["loss"][0] - 0.1
    weights = trainer.hyperparameter_values()["example_weights"].numpy()
    assert weights[corrupted].mean() < weights[~corrupted].mean() - 0.3

    # evaluate = T inner steps with the learned weights, then f on the outer batch: NumPy reference.
    W0, b0 = trainer.inner_model.get_weights()
    W, b = numpy_inner_gd(W0.astype(np.float64), b0.astype(np.float64), x_train.astype(np.float64), y_train,
                          weights.astype(np.float64), 1.0, 50)
    result = trainer.evaluate(held_out, verbose=0, return_dict=True)
    assert result["loss"] == pytest.approx(numpy_ce(W, b, x_val, y_val), rel=1e-4)
    assert result["accuracy"] == pytest.approx(np.mean((x_val @ W + b).argmax(-1) == y_val), abs=1e-6)
    assert set(result) == {"loss", "outer_loss", "inner_loss", "accuracy"}
    assert result["outer_loss"] == result["loss"]
    p_train = _softmax(x_train @ W + b)
    inner = float(np.mean(weights * -np.log(p_train[np.arange(500), y_train])))
    assert result["inner_loss"] == pytest.approx(inner, rel=1e-4)  # g(w_T, λ) on the inner batch
    assert history.history["val_loss"][-1] == pytest.approx(result["loss"], rel=1e-5)


# ------------------------------------------------------------------------------------
# Hypergradients through reparametrizations, a regularizer, a learned γ and a learned
# initialization (B0 term) against central finite differences of a NumPy implementation.
# ------------------------------------------------------------------------------------
def test_hypergradient_through_reparametrizations_and_learned_init_matches_numpy_finite_differences():
    n, d, c, T = 8, 3, 2, 6
    x, y, xv, yv = classification_data(1, n, d, c, dtype="float64")
    keras.utils.set_random_seed(1)
    trainer = tfb.BilevelTrainer(
        keras.Sequential([keras.layers.Dense(c, dtype="float64")]),
        hyperparameters={
            "example_weights": Hyperparameter(np.linspace(0.2, 0.8, n), transform="sigmoid", dtype="float64"),
            "l2": Hyperparameter(0.1, transform="softplus", dtype="float64"),
        },
        inner_loss=lambda y, p, hp: hp["example_weights"] * CE(y, p),
        outer_loss=CE,
        inner_regularizer=lambda w, hp: hp["l2"] * tf.reduce_sum(tf.square(w[0])),
        inner_learning_rate=Hyperparameter(0.5, transform="softplus", dtype="float64"),
        inner_init="learned", steps=T)
    trainer.compile(optimizer=keras.optimizers.SGD(1.0))
    data = tf.data.Dataset.from_tensors(((x, y), (xv, yv)))
    grads, raw = one_step_gradient(trainer, data)
    assert set(raw) == {"user_example_weights", "user_l2", "inner_learning_rate", "init_0", "init_1"}

    def objective(r):
        W, b = numpy_inner_gd(r["init_0"], r["init_1"], x, y, _sigmoid(r["user_example_weights"]),
                              _softplus(r["inner_learning_rate"]), T, l2=_softplus(r["user_l2"]))
        return numpy_ce(W, b, xv, yv)

    eps = 1e-6
    for name, value in raw.items():
        fd = np.zeros(value.size)
        for i in range(value.size):
            plus = {k: v.copy() for k, v in raw.items()}
            minus = {k: v.copy() for k, v in raw.items()}
            plus[name].reshape(-1)[i] += eps
            minus[name].reshape(-1)[i] -= eps
            fd[i] = (objective(plus) - objective(minus)) / (2 * eps)
        np.testing.assert_allclose(grads[name].reshape(-1), fd, rtol=1e-5, atol=1e-9, err_msg=name)


# ------------------------------------------------------------------------------------
# Stochastic regime: meta-batch of tasks, hyper model with BatchNorm, proximal term,
# learned γ; hypergradient against finite differences of the trainer's own predictions.
# ------------------------------------------------------------------------------------
def _task(i, ways=3, shots=2, queries=3, d=5, dtype=tf.float32):
    centers = tf.random.stateless_normal([ways, d], seed=[i, 0], dtype=dtype)
    xs = centers[:, None, :] + 0.5 * tf.random.stateless_normal([ways, shots, d], seed=[i, 1], dtype=dtype)
    xq = centers[:, None, :] + 0.5 * tf.random.stateless_normal([ways, queries, d], seed=[i, 2], dtype=dtype)
    support = (tf.reshape(xs, [-1, d]), tf.repeat(tf.range(ways), shots))
    query = (tf.reshape(xq, [-1, d]), tf.repeat(tf.range(ways), queries))
    return support, query


def test_meta_batch_with_batchnorm_hyper_model_matches_finite_differences_and_keeps_bn_per_task():
    keras.utils.set_random_seed(2)
    f64 = "float64"
    hyper = keras.Sequential([keras.layers.Dense(6, activation="tanh", dtype=f64), keras.layers.BatchNormalization(dtype=f64)])
    inner = keras.Sequential([keras.layers.Dense(6, dtype=f64), tfb.keras.BatchNormalization(dtype=f64),
                              keras.layers.Activation("tanh", dtype=f64), keras.layers.Dense(3, dtype=f64)])
    trainer = tfb.BilevelTrainer(
        inner, hyper_model=hyper, inner_loss=CE, outer_loss=CE, steps=4, meta_batch=True,
        proximal_strength=0.05, inner_learning_rate=Hyperparameter(0.3, transform="softplus", dtype=f64))
    trainer.compile(optimizer=keras.optimizers.SGD(1.0))
    tasks = tf.data.Dataset.range(2).map(lambda i: _task(i, dtype=tf.float64)).batch(2)
    trainer.build_from_spec(tasks.element_spec)
    assert len(inner.non_trainable_variables) == len(hyper.non_trainable_variables) == 2
    inner_stats = [v.numpy().copy() for v in inner.non_trainable_variables]
    hyper_stats = [v.numpy().copy() for v in hyper.non_trainable_variables]
    grads, raw = one_step_gradient(trainer, tasks)

    # BatchNorm: inner statistics are discarded per task; the hyper model's are updated.
    for before, v in zip(inner_stats, inner.non_trainable_variables):
        np.testing.assert_array_equal(before, v.numpy())
    assert any(not np.allclose(b, v.numpy()) for b, v in zip(hyper_stats, hyper.non_trainable_variables))

    # F(ν) = mean over tasks of the query cross-entropy after T inner steps, from predict().
    (_, _), (_, y_query) = next(iter(tasks))
    y_query = y_query.numpy()

    def objective():
        logits = trainer.predict(tasks, verbose=0)
        p = _softmax(logits.astype(np.float64))
        return float(-np.mean(np.log(np.take_along_axis(p, y_query[..., None], -1))))

    variables = {v.name: v for v in trainer.hyper_variables}
    assert {"kernel", "bias", "gamma", "beta", "inner_learning_rate", "strengths"} <= set(variables)
    for v in trainer.hyper_variables:
        v.assign(raw[v.name])
    rng = np.random.default_rng(0)
    eps = 1e-5
    for _ in range(2):
        direction = {k: rng.normal(size=r.shape) for k, r in raw.items()}
        values = []
        for sign in (1.0, -1.0):
            for k, v in variables.items():
                v.assign(raw[k] + sign * eps * direction[k])
            values.append(objective())
        fd = (values[0] - values[1]) / (2 * eps)
        analytic = sum(float(np.sum(grads[k] * direction[k])) for k in raw)
        assert analytic == pytest.approx(fd, rel=1e-5)


# ------------------------------------------------------------------------------------
# Diagnostics (Figs. 6–7), random per-task init, TensorBoard, XLA.
# ------------------------------------------------------------------------------------
def test_diagnostics_random_init_and_tensorboard_with_xla(tmp_path):
    keras.utils.set_random_seed(3)
    trainer = tfb.BilevelTrainer(
        keras.Sequential([keras.layers.Dense(3)]),
        hyper_model=keras.Sequential([keras.layers.Dense(4, activation="tanh")]),
        inner_loss=CE, outer_loss=CE, steps=5, truncate=1, meta_batch=True, inner_init="random",
        inner_learning_rate=0.5, diagnostics_every=2)
    trainer.compile(optimizer=keras.optimizers.Adam(0.01), metrics=["accuracy"], jit_compile=True)
    tasks = tf.data.Dataset.range(100).map(_task).batch(2, drop_remainder=True)
    # The metrics are plain Keras metrics, so TensorBoard (in the `test` extra) logs them as-is.
    history = trainer.fit(tasks, epochs=2, steps_per_epoch=3, verbose=0,
                          callbacks=[keras.callbacks.TensorBoard(str(tmp_path / "tb"))])
    h = history.history
    assert all(0.0 < c <= 1.0 for c in h["cosine_to_full_rmd"])  # 1-RMD is a descent direction here
    assert all(0.0 < e < 2.0 for e in h["relative_error_to_full_rmd"])
    assert trainer.meta_step.numpy() == 6
    events = list((tmp_path / "tb" / "train").glob("events.out.tfevents.*"))
    assert events
    tags = {v.tag for e in tf.compat.v1.train.summary_iterator(str(events[0])) for v in e.summary.value}
    assert {"epoch_cosine_to_full_rmd", "epoch_relative_error_to_full_rmd"} <= tags, tags


def test_diagnostics_are_tfb_diagnostics_of_a_truncated_and_a_full_rmd_trainer(monkeypatch):
    """cosine_to_full_rmd / relative_error_to_full_rmd of `fit` (under XLA) equal tfb.diagnostics
    of the hypergradients of a truncate=1 and a separately built truncate=None trainer (same weights).
    `fit` traces the full-RMD reference without its reachability probe (the truncated estimator's,
    on the same problem and λ, covers it); `hypergradient_of` does not trace the reference at all."""
    from tf_bilevel.api import Hypergradient

    traced = []  # (K, check_reached) of every core estimator traced
    compute = Hypergradient.compute
    monkeypatch.setattr(Hypergradient, "compute", lambda self, *args, check_reached=True, **kwargs: (
        traced.append((self.truncate, check_reached)) or compute(self, *args, check_reached=check_reached, **kwargs)))

    def build(truncate):
        keras.utils.set_random_seed(3)
        trainer = tfb.BilevelTrainer(
            keras.Sequential([keras.layers.Dense(3)]),
            hyper_model=keras.Sequential([keras.layers.Dense(4, activation="tanh")]),
            inner_loss=CE, outer_loss=CE, steps=5, truncate=truncate, meta_batch=True,
            inner_learning_rate=0.5, diagnostics_every=1)
        trainer.compile(optimizer=keras.optimizers.SGD(0.0), jit_compile=True)  # λ stays put
        return trainer

    tasks = tf.data.Dataset.range(2).map(_task).batch(2)
    element = next(iter(tasks))
    truncated, full = build(1), build(None)
    history = truncated.fit(tasks, epochs=1, verbose=0).history
    assert set(traced) == {(1, True), (5, False)}, traced  # K = T = 5: the reference, not probed again
    traced.clear()
    h_truncated, h_full = truncated.hypergradient_of(element), full.hypergradient_of(element)
    assert set(traced) == {(1, True), (5, True)}, traced  # each trainer's own estimator only
    for a, b in zip(truncated.hyper_variables, full.hyper_variables):  # the same λ in both
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    cosine = float(tfb.diagnostics.cosine_similarity(h_truncated, h_full))
    error = float(tfb.diagnostics.relative_error(h_truncated, h_full))
    assert 1e-3 < error and cosine < 1 - 1e-6  # 1-RMD differs from full RMD here: a real check
    np.testing.assert_allclose(history["cosine_to_full_rmd"], [cosine], rtol=1e-5)
    np.testing.assert_allclose(history["relative_error_to_full_rmd"], [error], rtol=1e-4)


def test_random_inner_init_is_deterministic_in_the_seed():
    stored = [tf.ones([4, 3]), tf.zeros([3])]
    trainer = tfb.BilevelTrainer(keras.Sequential([keras.layers.Dense(3)]), inner_loss=CE, outer_loss=CE,
                                 steps=1, hyperparameters={"a": 1.0}, inner_init="random")
    draw = trainer.problem.initial_params
    first, again = draw(stored, tf.constant([1, 2], tf.int64)), draw(stored, tf.constant([1, 2], tf.int64))
    other = draw(stored, tf.constant([1, 3], tf.int64))
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.allclose(first[0], other[0])
    np.testing.assert_array_equal(first[1], stored[1])  # vectors keep their stored values
    assert np.abs(first[0]).max() <= np.sqrt(6.0 / 7.0)  # Glorot-uniform limit for fan_in + fan_out = 7


def test_warm_start_stores_the_inner_solution_of_the_previous_step():
    x, y, xv, yv = classification_data(4, 16, 3, 2)
    trainer = tfb.BilevelTrainer(
        keras.Sequential([keras.layers.Dense(2)]), hyperparameters={"w": np.full(16, 0.5)},
        inner_loss=lambda y, p, hp: hp["w"] * CE(y, p), outer_loss=CE, steps=3, inner_learning_rate=0.5,
        inner_init="warm_start")
    trainer.compile(optimizer=keras.optimizers.SGD(0.0))  # λ fixed: only w moves
    data = tf.data.Dataset.from_tensors(((x, y), (xv, yv)))
    trainer.build_from_spec(data.element_spec)
    W0, b0 = [w.astype(np.float64) for w in trainer.inner_model.get_weights()]
    trainer.fit(data.repeat(2), epochs=1, verbose=0)
    W, b = numpy_inner_gd(W0, b0, x.astype(np.float64), y, np.full(16, 0.5), 0.5, 6)  # 2 steps × T=3
    np.testing.assert_allclose(trainer.inner_model.get_weights()[0], W, rtol=1e-5, atol=1e-6)


def test_calling_the_trainer_adapts_the_inner_model_to_the_inner_set():
    x, y, xv, _ = classification_data(7, 8, 3, 2)
    trainer = tfb.BilevelTrainer(
        keras.Sequential([keras.layers.Dense(2)]), hyperparameters={"l2": 0.2}, inner_loss=CE, outer_loss=CE,
        inner_regularizer=lambda w, hp: hp["l2"] * tf.reduce_sum(tf.square(w[0])), steps=4, inner_learning_rate=0.5)
    with pytest.raises(ValueError, match="build_from_spec"):
        trainer(((x, y), xv))  # not built: a clear error (and the trainer stays buildable)
    trainer.build_from_spec(tf.data.Dataset.from_tensors(((x, y), (xv, y))).element_spec)
    W0, b0 = [w.astype(np.float64) for w in trainer.inner_model.get_weights()]
    W, b = numpy_inner_gd(W0, b0, x.astype(np.float64), y, np.ones(8), 0.5, 4, l2=0.2)
    np.testing.assert_allclose(trainer(((x, y), xv)).numpy(), xv @ W + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("meta_batch", [False, True])
def test_predict_without_outer_labels_matches_predict_on_full_tasks_and_numpy(meta_batch):
    # ((x_inner, y_inner), x_outer) elements: the outer labels are absent, so nothing may need them
    # (the meta-batch path once probed the outer loss with x_outer standing in for y_outer).
    tasks = [classification_data(seed, 8, 3, 2) for seed in (11, 12)]
    trainer = tfb.BilevelTrainer(
        keras.Sequential([keras.layers.Dense(2)]), hyperparameters={"l2": 0.2}, inner_loss=CE, outer_loss=CE,
        inner_regularizer=lambda w, hp: hp["l2"] * tf.reduce_sum(tf.square(w[0])), steps=4,
        inner_learning_rate=0.5, meta_batch=meta_batch)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=True)
    if meta_batch:
        x, y, xv, yv = (np.stack(parts) for parts in zip(*tasks))
    else:
        x, y, xv, yv = tasks[0]
    without_labels = trainer.predict(tf.data.Dataset.from_tensors(((x, y), xv)), verbose=0)
    with_labels = trainer.predict(tf.data.Dataset.from_tensors(((x, y), (xv, yv))), verbose=0)
    np.testing.assert_array_equal(without_labels, with_labels)
    W0, b0 = [w.astype(np.float64) for w in trainer.inner_model.get_weights()]
    for i, (xi, yi, xvi, _) in enumerate(tasks if meta_batch else tasks[:1]):
        W, b = numpy_inner_gd(W0, b0, xi.astype(np.float64), yi, np.ones(8), 0.5, 4, l2=0.2)
        got = without_labels[i] if meta_batch else without_labels
        np.testing.assert_allclose(got, xvi @ W + b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------
# Non-finite values: a clear error (default) or a skipped update (opt-in).
# ------------------------------------------------------------------------------------
def _dataset_with_nan(where):
    x, y, xv, yv = classification_data(5, 8, 3, 2)
    elements = []
    for i in range(3):
        xi, xvi = x.copy(), xv.copy()
        if i == 1:
            (xi if where == "inner" else xvi)[0, 0] = np.nan
        elements.append(((xi, y), (xvi, yv)))
    stack = lambda *parts: np.stack(parts)  # noqa: E731
    return tf.data.Dataset.from_tensor_slices(tf.nest.map_structure(stack, *elements))


def _small_trainer(on_nonfinite):
    return tfb.BilevelTrainer(
        keras.Sequential([keras.layers.Dense(2)]), hyperparameters={"w": np.full(8, 0.5)},
        inner_loss=lambda y, p, hp: hp["w"] * CE(y, p), outer_loss=CE, steps=3, on_nonfinite=on_nonfinite)


def test_nonfinite_inner_loss_raises_naming_the_step_and_leaves_hyperparameters_finite():
    trainer = _small_trainer("raise")
    trainer.compile(optimizer=keras.optimizers.Adam(0.1))
    with pytest.raises(tfb.NonFiniteError, match=r"hyper-iteration 1 .*inner step 0 of steps=3"):
        trainer.fit(_dataset_with_nan("inner"), epochs=1, verbose=0)
    for v in trainer.hyper_variables:
        assert np.all(np.isfinite(v.numpy()))
    assert trainer.optimizer.iterations.numpy() == 1  # step 0 applied, step 1 not


def test_nonfinite_outer_loss_is_skipped_when_asked():
    trainer = _small_trainer("skip")
    trainer.compile(optimizer=keras.optimizers.Adam(0.1))
    history = trainer.fit(_dataset_with_nan("outer"), epochs=1, verbose=0)
    assert history.history["skipped_updates"] == [1.0]
    assert np.isfinite(history.history["loss"][0])
    assert trainer.optimizer.iterations.numpy() == 2 and trainer.meta_step.numpy() == 3
    for v in trainer.hyper_variables:
        assert np.all(np.isfinite(v.numpy()))


# ------------------------------------------------------------------------------------
# No lost work: BackupAndRestore round-trips λ, the optimizer slots and meta_step.
# ------------------------------------------------------------------------------------
def test_backup_and_restore_resumes_to_the_same_state_as_an_uninterrupted_run(tmp_path):
    x, y, xv, yv = classification_data(6, 8, 3, 2)
    tasks = tf.data.Dataset.from_tensor_slices(
        ((np.stack([x, x + 0.1, x - 0.1]), np.stack([y] * 3)), (np.stack([xv] * 3), np.stack([yv] * 3))))

    def make():
        keras.utils.set_random_seed(0)
        trainer = tfb.BilevelTrainer(
            keras.Sequential([keras.layers.Dense(2)]), hyperparameters={"w": np.full(8, 0.5)},
            inner_loss=lambda y, p, hp: hp["w"] * CE(y, p), outer_loss=CE, steps=3, inner_init="random", seed=7)
        trainer.compile(optimizer=keras.optimizers.Adam(0.05))
        return trainer

    def state(trainer):
        return [v.numpy() for v in trainer.hyper_variables + list(trainer.optimizer.variables)] + [
            trainer.meta_step.numpy()]

    backup = lambda: keras.callbacks.BackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False)  # noqa: E731
    interrupted = make()
    interrupted.fit(tasks, epochs=1, verbose=0, callbacks=[backup()])  # "killed" after epoch 1
    resumed = make()
    resumed_history = resumed.fit(tasks, epochs=2, verbose=0, callbacks=[backup()])
    assert len(resumed_history.history["loss"]) == 1  # only epoch 2 ran
    uninterrupted = make()
    uninterrupted.fit(tasks, epochs=2, verbose=0)
    for a, b in zip(state(resumed), state(uninterrupted)):
        np.testing.assert_array_equal(a, b)
    assert resumed.meta_step.numpy() == 6


# ------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument and the fix.
# ------------------------------------------------------------------------------------
def _trainer(**overrides):
    kwargs = dict(inner_loss=CE, outer_loss=CE, steps=3, hyperparameters={"a": 1.0})
    kwargs.update(overrides)
    model = kwargs.pop("inner_model", None) or keras.Sequential([keras.layers.Dense(2)])
    return tfb.BilevelTrainer(model, **kwargs)


@pytest.mark.parametrize(
    "overrides, error, pattern",
    [
        (dict(steps=0), ValueError, "steps must be a positive integer"),
        (dict(truncate=5), ValueError, "truncate=5 is larger than steps=3"),
        (dict(estimator="implicit_cg", truncate=2), ValueError, "truncate does not apply.*iterations=2"),
        (dict(iterations=2), ValueError, "iterations applies to estimator='implicit_cg'/'neumann' only"),
        (dict(estimator="neumann", iterations=0), ValueError, "iterations must be a positive integer"),
        (dict(estimator="implicit_cg", tolerance=2.0), ValueError, r"tolerance must be in \[0, 1\) \(a relative residual"),
        (dict(estimator="magic"), ValueError, "estimator must be one of"),
        (dict(on_nonfinite="ignore"), ValueError, "on_nonfinite must be 'raise'"),
        (dict(diagnostics_every=0), ValueError, "diagnostics_every must be None or a positive int"),
        (dict(inner_init="zeros"), ValueError, "inner_init must be one of"),
        (dict(hyperparameters={"centers": 1.0}), ValueError, "reserved"),
        (dict(hyperparameters={"a": keras.Variable(1.0, trainable=False)}), TypeError, "is a variable"),
        (dict(inner_learning_rate=-1.0), ValueError, "inner_learning_rate must be > 0"),
        (dict(inner_loss="ce"), TypeError, "inner_loss must be a callable"),
        (dict(inner_model="dense"), TypeError, "inner_model must be a Keras layer"),
    ],
)
def test_invalid_arguments_are_rejected_at_construction(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        _trainer(**overrides)


def test_both_trainers_take_one_signature_and_keep_the_validated_arguments_as_a_frozen_spec():
    import dataclasses
    import inspect

    from tf_bilevel.keras import legacy

    assert inspect.signature(legacy.LegacyBilevelTrainer) == inspect.signature(tfb.BilevelTrainer)
    assert not hasattr(legacy, "BilevelTrainer")  # one name, one class
    trainer = _trainer(hyperparameters={"a": 1.0}, inner_learning_rate=np.float32(0.5), meta_batch=1)
    spec = trainer.spec
    assert isinstance(spec, tfb.keras.TrainerSpec)
    assert (spec.steps, spec.truncate, spec.on_nonfinite, spec.meta_batch) == (3, None, "raise", True)
    assert isinstance(spec.hyperparameters["a"], Hyperparameter)  # numbers converted once, here
    assert spec.inner_learning_rate == pytest.approx(0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.steps = 4


def test_implicit_estimators_take_the_solver_settings_as_iterations_and_tolerance():
    """`iterations`/`tolerance` reach the core estimator unchanged (truncate is K-RMD's K only)."""
    trainer = _trainer(estimator="implicit_cg", iterations=2, tolerance=None)
    assert (trainer.spec.iterations, trainer.spec.tolerance) == (2, None)
    assert (trainer.hypergradient.iterations, trainer.hypergradient.tolerance) == (2, None)
    default = _trainer(estimator="neumann")
    assert (default.hypergradient.iterations, default.hypergradient.tolerance) == (3, 1e-10)  # steps, core default
    assert _trainer(truncate=2).hypergradient.iterations is None


def test_hyperparameter_outside_its_domain_is_rejected():
    with pytest.raises(ValueError, match=r"must be in \(0, 1\) for transform='sigmoid'"):
        Hyperparameter(1.5, transform="sigmoid")
    with pytest.raises(ValueError, match="symmetric"):
        Hyperparameter(np.array([[1.0, 2.0], [0.0, 1.0]]), transform="symmetric")
    c = np.array([[1.0, 0.5], [0.5, 2.0]])
    spec = Hyperparameter(c, transform="symmetric_softplus")
    np.testing.assert_allclose(spec.value_from_raw(tf.constant(spec.raw_initial())), c, rtol=1e-6)


def test_tf_keras_layer_is_rejected_by_the_keras3_trainer():
    import tf_keras

    with pytest.raises(TypeError, match="tf-keras.*use tf_bilevel.LegacyBilevelTrainer"):
        _trainer(inner_model=tf_keras.layers.Dense(2))


SMALL = tf.data.Dataset.from_tensors(((tf.zeros([4, 3]), tf.zeros([4], tf.int32)), (tf.zeros([4, 3]), tf.zeros([4], tf.int32))))


def test_frozen_inner_or_hyper_model_is_rejected():
    frozen = keras.Sequential([keras.layers.Dense(2)])
    frozen.trainable = False
    trainer = _trainer(inner_model=frozen)
    trainer.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="inner_model .* has no trainable weights"):
        trainer.fit(SMALL, verbose=0)
    frozen_hyper = keras.Sequential([keras.layers.Dense(3)])
    frozen_hyper.trainable = False
    trainer = _trainer(hyper_model=frozen_hyper)
    trainer.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="hyper_model .* has no trainable weights"):
        trainer.fit(SMALL, verbose=0)


def test_wrong_dataset_structure_is_explained():
    trainer = _trainer()
    trainer.compile(optimizer="sgd")
    with pytest.raises(ValueError, match=r"wrong structure.*\(\(x_inner, y_inner\), \(x_outer, y_outer\)\)"):
        trainer.fit(tf.data.Dataset.from_tensors((tf.zeros([4, 3]), tf.zeros([4]))).map(lambda a, b: (a, b, a)), verbose=0)
    with pytest.raises(TypeError, match=r"fit\(x=...\) must be a tf.data.Dataset"):
        trainer.fit(np.zeros([4, 3]), verbose=0)
    meta = _trainer(meta_batch=True)
    meta.compile(optimizer="sgd")
    ragged = tf.data.Dataset.from_tensors(
        ((tf.zeros([2, 4, 3]), tf.zeros([2, 4], tf.int32)), (tf.zeros([3, 4, 3]), tf.zeros([3, 4], tf.int32))))
    with pytest.raises(ValueError, match="different leading sizes"):
        meta.fit(ragged, verbose=0)


@tf.custom_gradient
def _square_without_second_derivative(x):
    def grad(dy):
        return dy * 2.0 * tf.raw_ops.PreventGradient(input=x, message="no second derivative")

    return tf.square(x), grad


def test_unreached_hyperparameter_and_disabled_second_derivative_are_explained():
    trainer = _trainer(hyperparameters={"used": 1.0, "unused": 1.0},
                       inner_loss=lambda y, p, hp: hp["used"] * CE(y, p))
    trainer.compile(optimizer="sgd")
    with pytest.raises(ValueError, match=r"\['unused'\].* not reached"):
        trainer.fit(SMALL, verbose=0)
    no_hessian = _trainer(inner_loss=lambda y, p, hp: hp["a"] * tf.reduce_mean(_square_without_second_derivative(p)))
    no_hessian.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="inner_loss: .*Gradient explicitly disabled.*tf_bilevel.keras.losses"):
        no_hessian.fit(SMALL, verbose=0)


def test_both_flavors_clone_a_model_with_its_weights_or_name_it_when_they_cannot():
    import tf_keras

    from tf_bilevel.keras.compat import Keras3Calls
    from tf_bilevel.keras.legacy import LegacyCalls

    for calls, module in ((Keras3Calls, keras), (LegacyCalls, tf_keras)):
        model = module.Sequential([module.Input((2,)), module.layers.Dense(3), module.layers.BatchNormalization()])
        copy = calls.clone(model)
        assert copy is not model and isinstance(copy, module.Model)
        for a, b in zip(model.get_weights(), copy.get_weights()):
            np.testing.assert_array_equal(a, b)
        assert len(calls.trainable(copy)) == 4 and len(calls.non_trainable(copy)) == 2

        class NoConfig(module.Model):
            def __init__(self):
                super().__init__(name="no_config")
                self.dense = module.layers.Dense(1)

            def call(self, x):
                return self.dense(x)

        subclassed = NoConfig()
        subclassed(np.zeros((1, 2), "float32"))
        with pytest.raises(ValueError, match="(?s)cannot copy inner_model 'no_config'.*Sequential/functional"):
            calls.clone(subclassed)
