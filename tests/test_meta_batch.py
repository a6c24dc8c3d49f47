"""The two meta-batch paths of BilevelTrainer agree: "stacked" (the meta-batch as one bilevel
problem over the B tasks' weights, one inner loop) and "map_fn" (tf.map_fn over tasks, the
reference: each task is the single-task computation), under XLA.

Compared: the hypergradient (read off an SGD(1) step), the full-RMD diagnostics, the logged
losses and compiled metrics, the hyper model's BatchNorm statistics, evaluate and predict,
with per-task randomness (inner_init="random", Dropout) drawn from the same per-task seeds.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import keras

import tf_bilevel as tfb
from tf_bilevel.keras import losses
from tf_bilevel.keras.reparam import Hyperparameter
from tf_bilevel.keras.tasks import MAX_STACKED_TASKS, StackedTasks, choose_meta_batch_path

CE = losses.sparse_categorical_crossentropy
F64 = "float64"


def _task(i, ways=3, shots=2, queries=3, d=5):
    centers = tf.random.stateless_normal([ways, d], seed=[i, 0], dtype=tf.float64)
    xs = centers[:, None, :] + 0.5 * tf.random.stateless_normal([ways, shots, d], seed=[i, 1], dtype=tf.float64)
    xq = centers[:, None, :] + 0.5 * tf.random.stateless_normal([ways, queries, d], seed=[i, 2], dtype=tf.float64)
    support = (tf.reshape(xs, [-1, d]), tf.repeat(tf.range(ways), shots))
    query = (tf.reshape(xq, [-1, d]), tf.repeat(tf.range(ways), queries))
    return support, query


def _tasks(num_tasks=2):
    return tf.data.Dataset.range(4 * num_tasks).map(_task).batch(num_tasks, drop_remainder=True)


def _trainer(mode, *, estimator="reverse", truncate=1, diagnostics_every=1, inner_init="random", **kwargs):
    keras.utils.set_random_seed(5)  # the same initial weights in both trainers
    hyper = keras.Sequential([keras.layers.Dense(6, activation="tanh", dtype=F64), keras.layers.BatchNormalization(dtype=F64)])
    inner = keras.Sequential([
        keras.layers.Dense(6, dtype=F64), tfb.keras.BatchNormalization(dtype=F64),
        keras.layers.Activation("tanh", dtype=F64), keras.layers.Dropout(0.3, dtype=F64), keras.layers.Dense(3, dtype=F64),
    ])
    trainer = tfb.BilevelTrainer(
        inner, hyper_model=hyper, inner_loss=CE, outer_loss=CE, steps=2, truncate=truncate, estimator=estimator,
        meta_batch=True, meta_batch_mode=mode, proximal_strength=0.05, inner_init=inner_init,
        inner_learning_rate=Hyperparameter(0.3, transform="softplus", dtype=F64),
        diagnostics_every=diagnostics_every, **kwargs)
    trainer.compile(optimizer=keras.optimizers.SGD(1.0), metrics=["accuracy"], jit_compile=True)
    return trainer


def _one_step(trainer, tasks):
    trainer.build_from_spec(tasks.element_spec)
    before = [v.numpy().copy() for v in trainer.hyper_variables]
    logs = trainer.fit(tasks.take(1), epochs=1, verbose=0).history
    grads = [b - v.numpy() for b, v in zip(before, trainer.hyper_variables)]
    return grads, {k: v[0] for k, v in logs.items()}


@pytest.fixture(scope="module")
def stepped_pair():
    """The stacked and the map_fn trainer (XLA, full-RMD diagnostics every step) after one fit
    step on the same element: (tasks, stacked, mapped, (grads, logs) of each). Built once: the
    trainers' traces are most of this module's time."""
    tasks = _tasks()
    stacked, mapped = _trainer("stacked"), _trainer("map_fn")
    return tasks, stacked, mapped, _one_step(stacked, tasks), _one_step(mapped, tasks)


def test_stacked_meta_batch_matches_map_fn_under_xla(stepped_pair):
    tasks, stacked, mapped, (g_stacked, logs_stacked), (g_mapped, logs_mapped) = stepped_pair
    assert (stacked.meta_batch_path, mapped.meta_batch_path) == ("stacked", "map_fn")
    assert len(g_stacked) == len(g_mapped) > 5
    for a, b, v in zip(g_stacked, g_mapped, mapped.hyper_variables):
        assert np.abs(b).max() > 0, v.name
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9, err_msg=v.name)
    # Losses, the norm, the full-RMD diagnostics (every step here) and the compiled metric.
    assert set(logs_stacked) == set(logs_mapped)
    assert {"loss", "inner_loss", "accuracy", "hypergradient_norm", "cosine_to_full_rmd"} <= set(logs_stacked)
    for name in logs_mapped:
        assert logs_stacked[name] == pytest.approx(logs_mapped[name], rel=1e-6, abs=1e-9), name
    # The hyper model's BatchNorm statistics: the mean over tasks of their training-mode updates.
    moved = 0
    for a, b in zip(stacked.hyper_model.non_trainable_variables, mapped.hyper_model.non_trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-12)
        moved += not np.allclose(b.numpy(), np.zeros_like(b.numpy())) and not np.allclose(b.numpy(), 1.0)
    assert moved
    # predict at the updated λ: the inner loop alone (no tape), as evaluate runs it.
    np.testing.assert_allclose(stacked.predict(tasks.take(1), verbose=0), mapped.predict(tasks.take(1), verbose=0),
                               rtol=1e-6, atol=1e-9)


def test_per_task_randomness_differs_between_tasks_on_the_stacked_path(stepped_pair):
    """Dropout and the random w0 are per task: the same task twice in a meta-batch gets
    different draws, so its two outer losses differ (a seed shared by all tasks would not)."""
    trainer = stepped_pair[1]  # the stacked trainer (its predict function is traced once for both tests)
    (xs, ys), (xq, yq) = _task(0)
    twice = tf.data.Dataset.from_tensors(((tf.stack([xs, xs]), tf.stack([ys, ys])), (tf.stack([xq, xq]), tf.stack([yq, yq]))))
    trainer.build_from_spec(twice.element_spec)
    logits = trainer.predict(twice, verbose=0)
    assert trainer.meta_batch_path == "stacked"
    assert not np.allclose(logits[0], logits[1])


def test_a_new_evaluate_trace_reuses_the_stacked_problem_fit_built(stepped_pair, monkeypatch):
    """One `StackedTasks` per number of tasks, kept on the problem: a later trace (here evaluate's,
    after the fixture's fit) builds no other, so its estimators and step profiles are built once."""
    tasks, trainer = stepped_pair[0], stepped_pair[1]
    built = []
    original = StackedTasks.__init__

    def counting_init(self, problem, num_tasks):
        built.append(num_tasks)
        original(self, problem, num_tasks)

    monkeypatch.setattr(StackedTasks, "__init__", counting_init)
    kept = dict(trainer.problem.stacked_by_count)
    assert list(kept) == [2]
    # A new trace, not compiled: the StackedTasks is looked up while tracing (in Python), the same
    # with or without XLA, and evaluate under XLA is the batched-model test's (an XLA compilation
    # here only added time).
    trainer.jit_compile = False
    try:
        trainer.evaluate(tasks.take(1), verbose=0)
    finally:
        trainer.jit_compile = True
    assert built == [] and trainer.problem.stacked_by_count == kept


def _dense_trainer(mode, jit_compile=True, **kwargs):
    keras.utils.set_random_seed(9)
    inner = keras.Sequential([keras.Input((5,), dtype=F64), keras.layers.Dense(4, activation="tanh", dtype=F64),
                              keras.layers.Dense(3, dtype=F64)])
    trainer = tfb.BilevelTrainer(
        inner, inner_loss=CE, outer_loss=CE, steps=4, meta_batch=True, meta_batch_mode=mode, inner_init="learned",
        inner_learning_rate=Hyperparameter(0.3, transform="softplus", dtype=F64), **kwargs)
    trainer.compile(optimizer=keras.optimizers.SGD(1.0), jit_compile=jit_compile)
    return trainer


@pytest.mark.parametrize("estimator, truncate", [("forward", None), ("checkpointed", 3)])
def test_stacked_matches_map_fn_for_forward_and_checkpointed_with_a_learned_init(estimator, truncate):
    tasks = _tasks(2)
    g_stacked, _ = _one_step(_dense_trainer("stacked", estimator=estimator, truncate=truncate), tasks)
    # The reference without XLA (the same per-task computation; map_fn under XLA: the test above).
    g_mapped, _ = _one_step(_dense_trainer("map_fn", jit_compile=False, estimator=estimator, truncate=truncate), tasks)
    # (K-RMD with K < T does not reach w0: the learned init's entries are 0 for "checkpointed".)
    assert sum(np.abs(b).max() > 0 for b in g_mapped) >= (5 if estimator == "forward" else 1)
    for a, b in zip(g_stacked, g_mapped):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_auto_chooses_the_path_and_a_forced_stacked_path_that_does_not_apply_is_refused():
    assert choose_meta_batch_path("auto", 4, "reverse", True) == "stacked"
    assert choose_meta_batch_path("auto", 4, "forward", True) == "stacked"
    assert choose_meta_batch_path("auto", 4, "implicit_cg", True) == "map_fn"
    assert choose_meta_batch_path("auto", 4, "neumann", True) == "map_fn"
    assert choose_meta_batch_path("auto", None, "reverse", True) == "map_fn"  # dynamic number of tasks
    assert choose_meta_batch_path("auto", 4, "reverse", False) == "map_fn"  # a user-defined inner optimizer
    assert choose_meta_batch_path("auto", MAX_STACKED_TASKS + 1, "reverse", True) == "map_fn"
    assert choose_meta_batch_path("stacked", 4, "reverse", False) == "stacked"  # the user vouches for it
    assert choose_meta_batch_path("map_fn", 4, "reverse", True) == "map_fn"
    with pytest.raises(ValueError, match=r"meta_batch_mode='stacked' does not apply: estimator='implicit_cg'"):
        choose_meta_batch_path("stacked", 4, "implicit_cg", True)
    with pytest.raises(ValueError, match=r"not static.*drop_remainder"):
        choose_meta_batch_path("stacked", None, "reverse", True)
    with pytest.raises(ValueError, match=r"meta_batch_mode must be one of"):
        tfb.BilevelTrainer(keras.Sequential([keras.layers.Dense(3)]), inner_loss=CE, outer_loss=CE, steps=2,
                           hyperparameters={"a": 1.0}, meta_batch=True, meta_batch_mode="vmap")


def test_auto_path_of_a_trainer_falls_back_to_map_fn_for_a_custom_inner_optimizer_and_implicit_cg():
    tasks = _tasks(2)
    for kwargs, path in (({"inner_optimizer": lambda lr: tfb.sgd(lr)}, "map_fn"),
                         ({"estimator": "implicit_cg", "iterations": 3}, "map_fn"), ({}, "stacked")):
        trainer = _dense_trainer("auto", jit_compile=False, **kwargs)  # the choice does not depend on XLA
        _one_step(trainer, tasks)
        assert trainer.meta_batch_path == path, kwargs


def _conv_trainer(mode):
    """Conv2D (same and valid padding, bias), pooling, Dense: batched over tasks (one
    batched product per layer) on the stacked path."""
    keras.utils.set_random_seed(7)
    inner = keras.Sequential([
        keras.Input((6, 6, 2), dtype=F64),
        keras.layers.Conv2D(3, 3, padding="same", activation="tanh", dtype=F64),
        keras.layers.AveragePooling2D(2, dtype=F64),  # XLA has MaxPoolGradGrad for float32 only
        keras.layers.Conv2D(4, 2, padding="valid", dtype=F64),
        keras.layers.ReLU(dtype=F64), keras.layers.Flatten(dtype=F64),
        keras.layers.Dense(3, dtype=F64),
    ])
    trainer = tfb.BilevelTrainer(
        inner, inner_loss=CE, outer_loss=CE, steps=3, truncate=2, meta_batch=True, meta_batch_mode=mode,
        proximal_strength=0.05, inner_init="random", inner_regularizer=lambda w, hp: 0.01 * tf.reduce_sum(w[0] ** 2),
        inner_learning_rate=Hyperparameter(0.3, transform="softplus", dtype=F64))
    trainer.compile(optimizer=keras.optimizers.SGD(1.0), metrics=["accuracy"], jit_compile=True)
    return trainer


def _image_task(i):
    x = tf.random.stateless_normal([2, 6, 6, 6, 2], seed=[i, 3], dtype=tf.float64)
    y = tf.random.stateless_uniform([2, 6], seed=[i, 4], maxval=3, dtype=tf.int64)
    return (x[0], y[0]), (x[1], y[1])


def test_batched_inner_model_on_the_stacked_path_matches_map_fn_under_xla():

    tasks = tf.data.Dataset.range(6).map(_image_task).batch(3, drop_remainder=True)
    stacked, mapped = _conv_trainer("stacked"), _conv_trainer("map_fn")
    g_stacked, logs_stacked = _one_step(stacked, tasks)
    g_mapped, logs_mapped = _one_step(mapped, tasks)
    assert StackedTasks(stacked.problem, 3).batched  # every layer of this model runs batched
    for a, b, v in zip(g_stacked, g_mapped, mapped.hyper_variables):
        assert np.abs(b).max() > 0, v.name
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9, err_msg=v.name)
    for name in logs_mapped:
        assert logs_stacked[name] == pytest.approx(logs_mapped[name], rel=1e-6, abs=1e-9), name
    # evaluate's losses and accuracy come from the batched inner loop's w_T and outer predictions
    # (stacked_adapted, StackedTasks.predictions: what predict returns, compared in
    # test_stacked_meta_batch_matches_map_fn_under_xla); predict here only compiled two more functions.
    for name, a, b in zip(("loss", "outer_loss", "inner_loss", "accuracy"),
                          stacked.evaluate(tasks.take(1), verbose=0), mapped.evaluate(tasks.take(1), verbose=0)):
        assert a == pytest.approx(b, rel=1e-6), name


def test_models_that_cannot_run_batched_are_named():
    from tf_bilevel.keras.batched import NotBatchable, check_batchable

    with pytest.raises(NotBatchable, match="dropout"):
        check_batchable(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dropout(0.5, name="dropout")]))
    with pytest.raises(NotBatchable, match="strides 1"):
        check_batchable(keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3, strides=2)]))
    with pytest.raises(NotBatchable, match="regularizers"):
        check_batchable(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, kernel_regularizer="l2")]))
    check_batchable(keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3), keras.layers.Flatten(),
                                      keras.layers.Dense(2)]))


def test_the_stacked_problem_builds_its_estimator_from_the_trainers_settings():
    """One settings record builds the core estimator of both paths: every setting reaches the
    stacked problem's estimator, iterations and tolerance included (once dropped there)."""
    import dataclasses

    from tf_bilevel.keras.estimator import EstimatorSettings

    trainer = _trainer("map_fn", estimator="neumann", truncate=None, diagnostics_every=None, iterations=5, tolerance=None)
    trainer.build_from_spec(_tasks().element_spec)
    settings = trainer.estimator_settings
    assert settings == EstimatorSettings(steps=2, estimator="neumann", iterations=5, tolerance=None)
    stacked = StackedTasks(trainer.problem, 2).hypergradient(settings)
    assert stacked is not trainer.hypergradient
    for field in dataclasses.fields(EstimatorSettings):
        assert getattr(stacked, field.name) == getattr(trainer.hypergradient, field.name), field.name
    assert (stacked.iterations, stacked.tolerance) == (5, None)  # not the core's defaults (steps, 1e-10)
