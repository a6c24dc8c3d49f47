"""Tests for experiments/models/lookahead_weights.py (issue #17): Ren et al.'s per-step example weights.
The hypergradient of tfb.hypergradient_fn at ε = 0 (T = 1) against the closed form
−α ∇ℓ_i(w)·∇f(w), with the per-example gradients written out in NumPy for a softmax
regression; the clipping/normalization against NumPy; one train step against a hand SGD step;
experiments/weighting_diagnosis.py's alignments (the same closed form), AUC and greedy cells."""

from __future__ import annotations

import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `experiments` is not an installed package.
from experiments.models import lookahead_weights as lw  # noqa: E402


def softmax_regression(seed: int = 0) -> keras.Model:
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(
        10, kernel_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=seed), bias_initializer="zeros")])
    model.layers[0].bias.assign(np.random.default_rng(seed).normal(0, 0.3, 10).astype(np.float32))
    return model


def numpy_ce_grads(W: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-example ∇_(W, b) CE of logits x W + b, flattened: [(p − e_y) ⊗ x, p − e_y]."""
    z = x @ W + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d = p - np.eye(10)[y]
    return np.concatenate([(x[:, :, None] * d[:, None, :]).reshape(len(x), -1), d], axis=1)


def data(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 10, n).astype(np.int32)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_lookahead_hypergradient_is_minus_alpha_times_gradient_alignment(jit_compile):
    model = softmax_regression()
    (x, y), (xv, yv) = data(8, 1), data(5, 2)
    alpha = 0.3
    hg = lw.example_hypergradient(model, alpha, jit_compile)
    params = [v.value for v in model.trainable_variables]
    _, h = hg(params, tf.zeros(8), (x, y), (xv, yv))
    W, b = (v.numpy().astype(np.float64) for v in model.trainable_variables)
    g_train = numpy_ce_grads(W, b, x.astype(np.float64), y)
    g_val = numpy_ce_grads(W, b, xv.astype(np.float64), yv).mean(0)
    np.testing.assert_allclose(h.numpy(), -alpha * g_train @ g_val, rtol=1e-4, atol=1e-6)


def test_lookahead_weights_clip_at_zero_and_sum_to_one_like_numpy():
    h = np.array([0.3, -0.2, -0.6, 0.0, 1e-3], np.float32)
    w = lw.lookahead_weights(tf.constant(h)).numpy()
    np.testing.assert_allclose(w, [0, 0.25, 0.75, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(w, lw.lookahead_weights_numpy(h), rtol=1e-6)
    assert np.all(lw.lookahead_weights(tf.constant([0.1, 0.0])).numpy() == 0)  # nothing helps: no update
    assert np.all(lw.lookahead_weights_numpy(np.array([0.1, 0.0])) == 0)


@pytest.mark.parametrize("clean_per_batch", [0, 3])
def test_one_train_step_is_sgd_on_the_weighted_loss(clean_per_batch):
    model = softmax_regression()
    wrapper = lw.LookAheadReweighting(model, n_train=20, lookahead_lr=0.5, clean_per_batch=clean_per_batch)
    wrapper.compile(optimizer=keras.optimizers.SGD(0.1))
    (x, y), (xv, yv), (xc, yc) = data(8, 3), data(5, 4), data(3, 5)
    index = np.array([4, 0, 7, 19, 2, 11, 5, 13])
    W0, b0 = (v.numpy().astype(np.float64) for v in model.trainable_variables)
    inputs = (x, xv, yv) + ((xc, yc) if clean_per_batch else ())
    wrapper.train_on_batch(inputs, (index * 10 + y).astype(np.int32))
    g_train = numpy_ce_grads(W0, b0, x.astype(np.float64), y)
    w = lw.lookahead_weights_numpy(-0.5 * g_train @ numpy_ce_grads(W0, b0, xv.astype(np.float64), yv).mean(0))
    step = w @ g_train
    if clean_per_batch:
        step = step + numpy_ce_grads(W0, b0, xc.astype(np.float64), yc).sum(0) / 8
    expected = np.concatenate([W0.ravel(), b0]) - 0.1 * step
    got = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    last = np.ones(20)
    last[index] = 8 * w
    np.testing.assert_allclose(wrapper.last_weights.numpy(), last, rtol=1e-4, atol=1e-6)
    wrapper.train_on_batch(inputs, (index * 10 + y).astype(np.int32))  # the same examples again
    np.testing.assert_allclose(wrapper.mean_weights()[index], (last[index] + wrapper.last_weights.numpy()[index]) / 2,
                               rtol=1e-4, atol=1e-6)
    assert np.all(wrapper.mean_weights()[np.setdiff1d(np.arange(20), index)] == 1.0)  # never seen


def test_a_classifier_with_layer_state_is_refused_by_name():
    model = keras.Sequential([keras.Input((6,)), keras.layers.BatchNormalization(), keras.layers.Dense(10)])
    with pytest.raises(ValueError, match="non-trainable state"):
        lw.example_hypergradient(model, 0.1, False)


# ----------------------------------------------------------------------------------------
# experiments/weighting_diagnosis.py: what the greedy hypergradient asks of a weighting function.
# ----------------------------------------------------------------------------------------
def test_alignments_are_the_per_example_gradient_dot_the_validation_gradient_in_chunks():
    from experiments import weighting_diagnosis as wd

    model = softmax_regression(seed=3)
    (x, y), (xv, yv) = data(7, 4), data(5, 5)
    got = wd.alignments(model, x, y, xv, yv, chunk=3)  # chunks of 3, 3, 1
    W, b = (v.numpy().astype(np.float64) for v in model.trainable_variables)
    want = numpy_ce_grads(W, b, x.astype(np.float64), y) @ numpy_ce_grads(W, b, xv.astype(np.float64), yv).mean(0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_auc_against_counting_pairs():
    from experiments import weighting_diagnosis as wd

    rng = np.random.default_rng(0)
    score = rng.integers(0, 5, 60).astype(float)  # many ties
    positive = rng.random(60) < 0.3
    pos, neg = score[positive], score[~positive]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert wd.auc(score, positive) == pytest.approx(pairs)
    assert wd.auc(score, np.zeros(60, bool)) is None


def test_greedy_cell_weights_and_detector_by_hand():
    from experiments import weighting_diagnosis as wd

    losses = np.array([0.05, 0.05, 0.6, 0.6, 0.6, 4.0])  # bins [0, 0.1), [0.5, 0.75) x3, [3, 5)
    align = np.array([1.0, -0.5, 2.0, -3.0, 0.5, 6.0])  # Σ per bin: 0.5, -0.5, 6; mean over all 1.0
    np.testing.assert_array_equal(wd.cells(losses, None), [0, 0, 3, 3, 3, 8])
    np.testing.assert_array_equal(wd.cells(losses, np.array([0, 1, 0, 0, 2, 0])), [0, 10, 3, 3, 23, 8])
    np.testing.assert_array_equal(wd.greedy_cell_weights(align, wd.cells(losses, None), "none"), [1, 1, -1, -1, -1, 1])
    # "mean": Σ (a_i − 1) per bin: -1.5, -3.5, 5.
    by_loss = wd.cells(losses, None)
    np.testing.assert_array_equal(wd.greedy_cell_weights(align, by_loss, "mean"), [-1, -1, -1, -1, -1, 1])
    wrong = np.array([False, True, False, True, True, False])
    d = wd.detector(np.array([False, False, True, True, True, False]), wrong)
    assert d["precision"] == pytest.approx(2 / 3) and d["recall"] == pytest.approx(2 / 3)
    assert d["right_labels_down"] == pytest.approx(1 / 3)
