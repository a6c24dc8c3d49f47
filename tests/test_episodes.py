"""Task streams and small library helpers of tf_bilevel.keras that experiments share:
`episodes` (a stream that can start at any hyper-iteration, for `trainer.resumable`),
`inverse_softplus` and `layers.batch_moments`."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_bilevel as tfb
from tf_bilevel.keras import losses
from tf_bilevel.keras.layers import batch_moments


def _episode(i):
    """A few-shot-like episode that is a pure function of i (stateless seeds from i)."""
    support = tf.random.stateless_normal([3, 2], seed=tf.stack([i, tf.constant(0, tf.int64)]))
    query = tf.random.stateless_uniform([4], seed=tf.stack([i, tf.constant(1, tf.int64)]), maxval=3, dtype=tf.int64)
    return (support, tf.fill([3], i)), (query, tf.fill([4], -i))


def _elements(dataset, n):
    return [tf.nest.map_structure(lambda x: x.numpy(), e) for e in dataset.take(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        tf.nest.map_structure(np.testing.assert_array_equal, x, y)


@pytest.mark.parametrize("batch", [None, 3])
def test_a_stream_started_at_k_is_the_stream_from_0_from_element_k_on(batch):
    stream = tfb.keras.episodes(_episode, batch=batch)
    from_zero = _elements(stream(0), 9)
    for k in (0, 1, 5):
        _assert_same(_elements(stream(k), 9 - k), from_zero[k:])
        _assert_same(_elements(stream(tf.constant(k, tf.int64)), 2), from_zero[k:k + 2])  # as resumable passes it
    first = from_zero[0]
    if batch:  # meta-batch s stacks episodes s·B … s·B + B − 1 on a new axis 0
        assert first[0][0].shape == (3, 3, 2)
        np.testing.assert_array_equal(from_zero[2][0][1][:, 0], [6, 7, 8])
        _assert_same([tf.nest.map_structure(lambda x: x[1], first)], _elements(tfb.keras.episodes(_episode)(1), 1))
    else:
        np.testing.assert_array_equal(from_zero[4][0][1], [4, 4, 4])


def test_the_stream_jumps_to_its_start_instead_of_building_the_skipped_episodes():
    def only_from_30(i):
        with tf.control_dependencies([tf.debugging.assert_greater_equal(i, tf.constant(30, tf.int64))]):
            return tf.identity(i)

    stream = tfb.keras.episodes(only_from_30, batch=3)
    np.testing.assert_array_equal(next(iter(stream(10))).numpy(), [30, 31, 32])
    with pytest.raises(tf.errors.InvalidArgumentError):
        next(iter(stream(9)))  # episodes 27–29 would be built: an error, so 10 did not build them


def test_count_ends_the_stream_and_bad_arguments_name_themselves():
    stream = tfb.keras.episodes(lambda i: i, batch=2, count=4)
    assert [list(x.numpy()) for x in stream(0)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [list(x.numpy()) for x in stream(3)] == [[6, 7]]
    for kwargs, name in (({"batch": 0}, "batch"), ({"count": -1}, "count"), ({"batch": True}, "batch")):
        with pytest.raises(ValueError, match=f"episodes\\({name}="):
            tfb.keras.episodes(_episode, **kwargs)
    with pytest.raises(TypeError, match="make_episode"):
        tfb.keras.episodes([1, 2])


def test_trainer_resumable_starts_an_episode_stream_at_meta_step():
    ce = losses.sparse_categorical_crossentropy
    trainer = tfb.BilevelTrainer(
        keras.Sequential([keras.layers.Dense(2)]), inner_loss=ce, outer_loss=ce, steps=2,
        hyperparameters={"a": 1.0}, inner_regularizer=lambda w, hp: 0.01 * hp["a"] * tf.reduce_sum(tf.square(w[0])))
    stream = tfb.keras.episodes(_episode, batch=2)
    resumed = trainer.resumable(stream)
    trainer.meta_step.assign(4)  # e.g. restored by BackupAndRestore after the dataset was built
    _assert_same(_elements(resumed, 3), _elements(stream(0), 7)[4:])


def test_inverse_softplus_inverts_softplus_over_a_wide_range():
    x = np.array([1e-30, 1e-8, 1e-3, 0.5, 1.0, 20.0, 700.0])
    raw = tfb.keras.inverse_softplus(x)
    assert raw.dtype == np.float64 and np.all(np.isfinite(raw))
    np.testing.assert_allclose(tf.nn.softplus(tf.constant(raw)).numpy(), x, rtol=1e-12)
    assert float(tfb.keras.inverse_softplus(1e-3)) == pytest.approx(np.log(np.expm1(1e-3)), rel=1e-14)
    # The Hyperparameter's softplus transform starts from exactly this raw value.
    hp = tfb.Hyperparameter(0.01, transform="softplus", dtype="float64")
    assert hp.raw_initial() == tfb.keras.inverse_softplus(0.01)


def test_batch_moments_have_exact_second_derivatives():
    """Unlike tf.nn.moments (variance around stop_gradient(mean)): the Hessian-vector product of
    a function of the variance matches central differences of its gradient."""
    x = tf.constant(np.random.default_rng(0).normal(size=(5, 3)))
    v = tf.constant(np.random.default_rng(1).normal(size=(5, 3)))

    def grad(x, moments):
        with tf.GradientTape() as tape:
            tape.watch(x)
            mean, variance = moments(x)
            value = tf.reduce_sum(tf.sin(mean) + tf.square(variance))
        return tape.gradient(value, x)

    ours = lambda x: batch_moments(x, [0])  # noqa: E731
    with tf.GradientTape() as tape:
        tape.watch(x)
        g = grad(x, ours)
    hvp = tape.gradient(g, x, output_gradients=v)
    eps = 1e-5
    fd = (grad(x + eps * v, ours) - grad(x - eps * v, ours)) / (2 * eps)
    np.testing.assert_allclose(hvp.numpy(), fd.numpy(), rtol=1e-6, atol=1e-8)
    mean, variance = tf.nn.moments(x, [0])
    ours_mean, ours_variance = ours(x)
    np.testing.assert_allclose(ours_mean.numpy(), mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(ours_variance.numpy(), variance.numpy(), rtol=1e-12)
    kept = batch_moments(x, [0], keepdims=True)
    assert kept[0].shape == kept[1].shape == (1, 3)
