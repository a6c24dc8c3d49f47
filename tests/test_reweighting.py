"""Tests for experiments/reweighting.py and experiments/data/noisy_labels.py (issues #11 §5, #17): the
noise generators, the long-tailed sampler, the baselines' losses (fixed example weights, forward
correction with the estimated transition, class-balanced weights, mix's minibatches) against NumPy
and hand computation, the learned-weight inner losses (also the class-aware weighting network of
mwn_cls) against NumPy, the weight diagnostics, the report built from saved runs alone
(--report_dir: its cells against the row files), and `--quick` end to end on a slice of real
Fashion-MNIST (mwn_k_ft starting from mwn_k's model; the report on its output); each method and
seed is one resumable run (its kill/resume test is online_hpo's: both programs resume through
online_program.MethodStore; mix's own stream restarts at the checkpoint's step in process)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import keras
from absl import flags
import numpy as np
import pytest
import tensorflow as tf

import tf_bilevel as tfb

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `experiments` is not an installed package.
from experiments.data import noisy_labels as nl  # noqa: E402
from experiments.common import online_program as oc  # noqa: E402
from experiments.common import program  # noqa: E402
from experiments import reweighting as R  # noqa: E402
from offline_data import write_mnist_subset  # noqa: E402
import program_runs  # noqa: E402

LONG = 2400  # seconds: a --quick grid traces every method and seed anew (21 min for 19 methods at load 24)
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} is absent "
                                   "(apt-get install dataset-fashion-mnist)")


def softmax(z):
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


# ----------------------------------------------------------------------------------------
# Noise, split, long tail.
# ----------------------------------------------------------------------------------------
def test_symmetric_noise_changes_the_requested_fraction_to_other_classes():
    labels = np.repeat(np.arange(10), 2000)
    noisy = nl.symmetric_noise(labels, 0.4, 10, np.random.default_rng(0))
    wrong = noisy != labels
    assert abs(wrong.mean() - 0.4) < 0.015  # every flip lands on another class: no 1/C dilution
    counts = np.bincount((noisy[wrong] - labels[wrong]) % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.8 * counts[1:].mean()  # uniform over the 9 others


def test_flip_noise_sends_labels_to_their_partner_at_the_rate():
    labels = np.repeat(np.arange(10), 3000).astype(np.int32)
    mapping = nl.FASHION_FLIP
    assert np.array_equal(nl.flip_noise(labels, 1.0, mapping, np.random.default_rng(0)),
                          np.array([mapping[c] for c in labels]))
    assert np.array_equal(nl.flip_noise(labels, 0.0, mapping, np.random.default_rng(0)), labels)
    noisy = nl.flip_noise(labels, 0.4, mapping, np.random.default_rng(1))
    empirical = np.zeros((10, 10))
    np.add.at(empirical, (labels, noisy), 1.0)
    empirical /= empirical.sum(1, keepdims=True)
    # Hand-written: 0.6 on the diagonal, 0.4 at (c, partner(c)), 0 elsewhere.
    expected = 0.6 * np.eye(10)
    for c, partner in mapping.items():
        expected[c, partner] = 0.4
    np.testing.assert_allclose(empirical, expected, atol=0.03)
    np.testing.assert_allclose(nl.noise_transition("flip", 0.4, 10, mapping), expected)
    with pytest.raises(ValueError, match="to itself"):
        nl.flip_noise(labels[:3], 0.4, {0: 0, 1: 0}, np.random.default_rng(0))


def test_flip_maps_pair_confusable_classes_and_transitions_are_stochastic():
    for mapping in nl.FLIP_MAPS.values():
        assert sorted(mapping) == list(range(10)) and all(mapping[c] != c for c in mapping)
    t = nl.noise_transition("symmetric", 0.4, 4)
    np.testing.assert_allclose(t, [[0.6, 0.4 / 3, 0.4 / 3, 0.4 / 3], [0.4 / 3, 0.6, 0.4 / 3, 0.4 / 3],
                                   [0.4 / 3, 0.4 / 3, 0.6, 0.4 / 3], [0.4 / 3, 0.4 / 3, 0.4 / 3, 0.6]])
    assert nl.FASHION_FLIP[0] == 6 and nl.FASHION_FLIP[6] == 0  # T-shirt/top <-> shirt
    assert nl.FASHION_FLIP[2] == 4 and nl.FASHION_FLIP[4] == 2  # pullover <-> coat


def test_split_is_class_balanced_and_disjoint():
    labels = np.repeat(np.arange(10), 30)
    val, train = nl.split(labels, 100, 10, np.random.default_rng(1))
    assert np.all(np.bincount(labels[val], minlength=10) == 10)
    assert len(np.intersect1d(val, train)) == 0 and len(val) + len(train) == len(labels)


def test_long_tail_counts_and_subset_by_hand():
    counts = nl.long_tail_counts(5900, 100.0, 10)
    # By hand: ⌊5900 · 100^(−c/9)⌋; 100^(−1/3) = 0.215443…, 100^(−1/9) = 0.599484…
    assert counts[0] == 5900 and counts[9] == 59 and counts[3] == 1271 and counts[1] == 3536
    assert np.all(np.diff(counts) < 0)
    labels = np.repeat(np.arange(10), [120, 110, 100, 130, 140, 150, 160, 170, 180, 190]).astype(np.int32)
    keep = nl.long_tail_subset(labels, 10.0, 10, np.random.default_rng(0))
    assert len(np.unique(keep)) == len(keep)  # no duplicates
    np.testing.assert_array_equal(np.bincount(labels[keep], minlength=10), nl.long_tail_counts(100, 10.0, 10))
    assert nl.long_tail_counts(100, 10.0, 10).tolist() == [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]


# ----------------------------------------------------------------------------------------
# Baseline losses against NumPy.
# ----------------------------------------------------------------------------------------
def test_pack_unpack_round_trip_also_through_float32():
    labels = np.array([3, 0, 9, 9, 1], np.int32)
    packed = nl.pack(labels)
    for y in (tf.constant(packed), tf.constant(packed.astype(np.float32))):
        got_labels, got_index = nl.unpack(y)
        assert got_labels.numpy().tolist() == labels.tolist() and got_index.numpy().tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="too many"):
        nl.pack(np.zeros(2_000_000, np.int32))


def test_weighted_ce_matches_numpy():
    rng = np.random.default_rng(0)
    table = rng.uniform(0.1, 2.0, 7)
    z = rng.normal(size=(4, 10)).astype(np.float32)
    labels = np.array([1, 5, 5, 9], np.int32)
    index = np.array([6, 0, 3, 2])
    y = (index * 10 + labels).astype(np.float32)  # as Keras hands it over
    got = nl.weighted_ce(table)(tf.constant(y), tf.constant(z)).numpy()
    want = -table[index] * np.log(softmax(z.astype(np.float64))[np.arange(4), labels])
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_forward_corrected_ce_matches_numpy_and_is_ce_for_identity():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(5, 10)).astype(np.float32)
    labels = np.array([0, 6, 2, 4, 9], np.int32)
    y = tf.constant(nl.pack(labels))
    c = nl.noise_transition("flip", 0.4, 10, nl.FASHION_FLIP)
    got = nl.forward_corrected_ce(c)(y, tf.constant(z)).numpy()
    p = softmax(z.astype(np.float64))
    want = [-np.log(sum(p[n, j] * c[j, labels[n]] for j in range(10))) for n in range(5)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    plain = nl.forward_corrected_ce(np.eye(10))(y, tf.constant(z)).numpy()
    np.testing.assert_allclose(plain, -np.log(p[np.arange(5), labels]), rtol=1e-5)


def test_estimate_transition_averages_the_noisy_model_per_true_class():
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.1, 0.8, 0.1], [0.0, 0.0, 1.0], [0.2, 0.2, 0.6]])
    labels = np.array([0, 0, 1, 2, 2])
    np.testing.assert_allclose(nl.estimate_transition(probs, labels, 3),
                               [[0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])


def test_class_balanced_weights_by_hand():
    # β = 0.9, counts 1 and 10: raw (0.1/0.1, 0.1/(1 − 0.9^10)) = (1, 0.153534…), scaled to sum 2.
    w = nl.class_balanced_weights(np.array([1, 10]), 0.9)
    raw = np.array([1.0, 0.1 / (1 - 0.9 ** 10)])
    np.testing.assert_allclose(w, 2 * raw / raw.sum())
    np.testing.assert_allclose(w, [1.733802, 0.266198], rtol=1e-5)
    with pytest.raises(ValueError, match="at least one"):
        nl.class_balanced_weights(np.array([0, 5]), 0.9)


def test_forward_correction_with_the_estimated_transition_and_class_balanced_loss_against_numpy():
    # As run_baseline composes them: C from a (noisy) model's softmax on the clean examples, then
    # −log(softmax(z)·C)[ỹ]; class-balanced: weighted_ce with the label's class weight per example.
    rng = np.random.default_rng(6)
    clean_labels = np.repeat(np.arange(10), 5)
    probs = softmax(rng.normal(size=(50, 10)) + 3 * np.eye(10)[clean_labels])
    c = nl.estimate_transition(probs, clean_labels, 10)
    z = rng.normal(size=(6, 10)).astype(np.float32)
    noisy = np.array([0, 6, 6, 2, 8, 9])
    got = nl.forward_corrected_ce(c)(tf.constant(nl.pack(noisy)), tf.constant(z)).numpy()
    p = softmax(z.astype(np.float64))
    want = [-np.log(sum(p[n, i] * probs[clean_labels == i].mean(0)[noisy[n]] for i in range(10))) for n in range(6)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    counts = np.array([50, 20, 5, 1, 9, 9, 9, 9, 9, 9])
    w = nl.class_balanced_weights(counts, 0.9999)
    got = nl.weighted_ce(w[noisy])(tf.constant(nl.pack(noisy)), tf.constant(z)).numpy()
    raw = (1 - 0.9999) / (1 - 0.9999 ** counts.astype(np.float64))
    want = 10 * raw[noisy] / raw.sum() * -np.log(p[np.arange(6), noisy])
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_random_example_weights_are_fixed_positive_mean_one():
    w = nl.random_example_weights(1000, seed=3)
    assert np.all(w > 0) and abs(w.mean() - 1.0) < 1e-12
    np.testing.assert_array_equal(w, nl.random_example_weights(1000, seed=3))
    assert not np.array_equal(w, nl.random_example_weights(1000, seed=4))


def test_mix_batches_are_the_training_minibatch_then_clean_examples_and_its_loss_is_their_mean_ce():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(40, 6)).astype(np.float32), rng.integers(0, 10, 40).astype(np.int32)
    xc, yc = rng.normal(size=(20, 6)).astype(np.float32), rng.integers(0, 10, 20).astype(np.int32)
    packed = nl.pack(np.concatenate([y, yc]))
    train_only = list(oc.minibatch_stream(x, packed[:40], 8, 5, 0).take(7))  # plain's stream of seed 5
    clean_only = list(oc.minibatch_stream(xc, packed[40:], R.CLEAN_PER_BATCH, 7, 0).take(7))  # seed + 2
    mixed = list(R.mixed_stream(x, packed[:40], xc, packed[40:], 8, 5, 0).take(7))
    for (xm, ym), (xt, yt), (xcb, ycb) in zip(mixed, train_only, clean_only):
        np.testing.assert_array_equal(xm.numpy(), np.concatenate([xt, xcb]))
        np.testing.assert_array_equal(ym.numpy(), np.concatenate([yt, ycb]))
    resumed = list(R.mixed_stream(x, packed[:40], xc, packed[40:], 8, 5, 3).take(4))  # from SGD step 3
    for (xr, yr), (xm, ym) in zip(resumed, mixed[3:]):
        np.testing.assert_array_equal(yr.numpy(), ym.numpy())
    # mix's loss (weighted_ce with all ones, Keras's mean over the 8 + 16 examples) against NumPy.
    xm, ym = mixed[0]
    init = keras.initializers.RandomNormal(stddev=0.5, seed=1)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(10, kernel_initializer=init)])
    model.compile(loss=nl.weighted_ce(np.ones(60)))
    got = model.evaluate(xm, ym, batch_size=len(ym), verbose=0)
    labels = ym.numpy().astype(np.int64) % 10
    p = softmax(model.predict(xm, verbose=0).astype(np.float64))
    assert len(labels) == 8 + R.CLEAN_PER_BATCH
    np.testing.assert_allclose(got, np.mean(-np.log(p[np.arange(len(labels)), labels])), rtol=1e-5)


# ----------------------------------------------------------------------------------------
# Learned-weight inner losses.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalization", R.NORMALIZATIONS)
def test_weighted_inner_loss_matches_numpy_and_treats_weights_as_constants(normalization):
    rng = np.random.default_rng(0)
    theta = [t.astype(np.float32) for t in R.initial_weighting(7, seed=0)]
    logits = tf.constant(rng.normal(size=(6, 4)).astype(np.float32))
    y = tf.constant([0, 1, 2, 3, 0, 1])
    with tf.GradientTape() as tape:
        tape.watch(logits)
        values = R.make_inner_loss(normalization)(y, logits, {"weighting": [tf.constant(t) for t in theta]})
        mean = tf.reduce_mean(values)
    p = softmax(logits.numpy().astype(np.float64))
    losses = -np.log(p[np.arange(6), y.numpy()])
    v = R.weighting_net([t.astype(np.float64) for t in theta], losses)
    if normalization == "mean":
        v = v / v.mean()
    np.testing.assert_allclose(values.numpy(), v * losses, rtol=1e-5)
    expected_grad = v[:, None] * (p - np.eye(4)[y.numpy()]) / 6
    np.testing.assert_allclose(tape.gradient(mean, logits).numpy(), expected_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("normalization", R.NORMALIZATIONS)
def test_class_aware_weighting_loss_matches_a_hand_written_network_and_its_theta_gradient(normalization):
    rng = np.random.default_rng(5)
    theta = R.initial_weighting(7, seed=1, inputs=1 + 4)  # 4 classes: V(ℓ, onehot(y))
    assert theta[0].shape == (5, 7) and np.all(np.abs(theta[0]) <= 1 / np.sqrt(5))
    z = rng.normal(size=(6, 4))
    y = np.array([0, 3, 2, 3, 1, 0])
    variables = [tf.Variable(t) for t in theta]
    with tf.GradientTape() as tape:
        values = R.make_inner_loss(normalization, class_aware=True)(tf.constant(y), tf.constant(z),
                                                                    {"weighting": variables})
        mean = tf.reduce_mean(values)
    w1, b1, w2, b2 = theta
    ce = -np.log(softmax(z)[np.arange(6), y])

    def raw(w1, b1, w2, b2):  # written out: the label picks row 1 + y of the first matrix
        pre = np.stack([ce[i] * w1[0] + w1[1 + y[i]] + b1 for i in range(6)])
        return 1 / (1 + np.exp(-(np.maximum(pre, 0) @ w2 + b2)[:, 0]))

    def weights(*theta):
        v = raw(*theta)
        return v / v.mean() if normalization == "mean" else v

    np.testing.assert_allclose(values.numpy(), weights(*theta) * ce, rtol=1e-7)  # "mean" divides by mean + 1e-8
    np.testing.assert_allclose(R.weighting_net(theta, ce, y), raw(*theta), rtol=1e-12)
    # ∂ mean(v ℓ) / ∂b2 by central differences (the label enters V, the loss only as a constant input).
    eps = 1e-6
    fd = (np.mean(weights(w1, b1, w2, b2 + eps) * ce) - np.mean(weights(w1, b1, w2, b2 - eps) * ce)) / (2 * eps)
    np.testing.assert_allclose(tape.gradient(mean, variables)[3].numpy(), [fd], rtol=1e-5, atol=1e-10)
    with pytest.raises(ValueError, match="pass labels"):
        R.weighting_net(theta, ce)


def test_weighting_grid_per_class_and_the_loss_only_network_unchanged():
    theta = R.initial_weighting(5, seed=0)
    np.testing.assert_array_equal(theta[0], np.random.default_rng(1000).uniform(-1, 1, (1, 5)))  # issue-#11 θ0
    assert list(R.grid_weights(theta)) == ["grid_weights"]
    aware = R.initial_weighting(5, seed=0, inputs=11)
    g = R.grid_weights(aware)
    per_class = np.array(g["grid_weights_per_class"])
    assert per_class.shape == (10, len(R.LOSS_GRID))
    np.testing.assert_allclose(per_class[3], R.weighting_net(aware, R.LOSS_GRID, np.full(len(R.LOSS_GRID), 3)))
    np.testing.assert_allclose(g["grid_weights"], per_class.mean(0))


@pytest.mark.parametrize("normalization", R.NORMALIZATIONS)
def test_example_weight_inner_loss_matches_numpy_with_its_weight_gradient(normalization):
    rng = np.random.default_rng(2)
    table = rng.uniform(0.1, 1.0, 9)
    z = rng.normal(size=(4, 10))
    labels, index = np.array([2, 7, 7, 0]), np.array([8, 1, 4, 5])
    weights = tf.Variable(table.astype(np.float64))
    with tf.GradientTape() as tape:
        values = R.make_example_weight_loss(normalization)(tf.constant(index * 10 + labels), tf.constant(z),
                                                           {"example_weights": weights})
        mean = tf.reduce_mean(values)
    ce = -np.log(softmax(z)[np.arange(4), labels])
    v = table[index]
    m = v.mean() if normalization == "mean" else 1.0
    np.testing.assert_allclose(values.numpy(), v / m * ce, rtol=1e-6)
    # d/dv_k of (1/B) Σ_i v_i ℓ_i / m, with m = mean_i v_i (or 1): ℓ_k/(B m) − [mean] Σ_i v_i ℓ_i/(B² m²).
    grad = np.zeros(9)
    grad[index] = ce / (4 * m) - (np.sum(v * ce) / (16 * m ** 2) if normalization == "mean" else 0.0)
    np.testing.assert_allclose(tf.convert_to_tensor(tape.gradient(mean, weights)).numpy(), grad, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("normalization", R.NORMALIZATIONS)
def test_example_weight_loss_gives_the_clean_examples_in_the_stream_weight_one(normalization):
    rng = np.random.default_rng(3)
    table = rng.uniform(0.1, 1.0, 6)  # 6 learned weights; indices 6, 7 are clean examples (l2rw_mix)
    z = rng.normal(size=(5, 10))
    labels, index = np.array([1, 4, 4, 9, 0]), np.array([5, 6, 0, 7, 2])
    weights = tf.Variable(table.astype(np.float64))
    with tf.GradientTape() as tape:
        values = R.make_example_weight_loss(normalization, n_learned=6)(
            tf.constant(index * 10 + labels), tf.constant(z), {"example_weights": weights})
        mean = tf.reduce_mean(values)
    ce = -np.log(softmax(z)[np.arange(5), labels])
    v = np.where(index < 6, table[np.minimum(index, 5)], 1.0)
    m = v.mean() if normalization == "mean" else 1.0
    np.testing.assert_allclose(values.numpy(), v / m * ce, rtol=1e-6)
    grad = np.zeros(6)  # only the learned weights of the batch get a gradient; the clean ones are constants
    learned = index < 6
    grad[index[learned]] = ce[learned] / (5 * m) - (np.sum(v * ce) / (25 * m ** 2) if normalization == "mean" else 0.0)
    np.testing.assert_allclose(tf.convert_to_tensor(tape.gradient(mean, weights)).numpy(), grad, rtol=1e-6, atol=1e-12)


def test_weight_diagnostics_bins_reach_weights_above_one():
    v = np.array([0.0, 0.0, 2.0, 3.0, 1.0, 5.0] * 20)  # B·w̃ of the look-ahead weights: mean 1 per batch
    data = {"corrupted": np.array([True, True, False, False, False, False] * 20),
            "train": (None, np.zeros(120, np.int64))}
    d = R.weight_diagnostics(v, data)
    assert d["histogram_bins"][-1] >= 3.0 and sum(d["histogram_all"]) == 120  # bins span past 1; none dropped
    assert d["detector_precision"] == 1.0 and d["detector_recall"] == 1.0


def test_weight_diagnostics_by_hand():
    v = np.array([0.01, 0.02, 0.9, 0.03, 0.8, 0.5])
    wrong = np.array([True, True, True, False, False, False])
    data = {"corrupted": wrong, "train": (None, np.array([0, 0, 1, 1, 2, 2]))}
    d = R.weight_diagnostics(v, data)
    # Flagged (< 0.05): examples 0, 1, 3; of them 0, 1 wrong -> precision 2/3; recall 2/3 of the 3 wrong.
    assert d["flagged"] == 3 and d["detector_precision"] == pytest.approx(2 / 3)
    assert d["detector_recall"] == pytest.approx(2 / 3)
    assert d["mean_weight_wrong_labels"] == pytest.approx(0.31) and d["mean_weight_right_labels"] == pytest.approx(1.33 / 3)
    assert d["mean_weight_per_class"][:3] == pytest.approx([0.015, 0.465, 0.65])
    assert d["mean_weight_per_class"][3:] == [None] * 7  # classes without examples
    assert sum(d["histogram_wrong"]) == 3 and sum(d["histogram_right"]) == 3


def test_summary_and_target_over_seeds():
    def row(test, val, **extra):  # per-epoch curves, epoch 0 first
        return {"test_accuracy": test[-1], "train_seconds": 1.0, "record": {"test_accuracy": test, "val_accuracy": val},
                **extra}

    weights = {"mean_weight_per_class": [1.0] * 10, "mean_weight_wrong_labels": 0.1, "mean_weight_right_labels": 0.9,
               "detector_precision": 0.8, "detector_recall": 0.5}
    rows = {"plain.seed0": row([0.1, 0.80, 0.70], [0.1, 0.9, 0.8]),  # early-stopped: epoch 1
            "plain.seed1": row([0.1, 0.60, 0.84, 0.72], [0.99, 0.5, 0.9, 0.7]),  # epoch 0 is not a candidate
            "finetune.seed0": row([0.7, 0.83], [0.8, 0.95]),
            "mwn.seed0": row([0.1, 0.85], [0.1, 0.8], example_weights=weights),
            "mwn.seed1": row([0.1, 0.87], [0.1, 0.8], example_weights=weights)}
    s = R.summarize(rows)
    assert s["plain_es"]["test_accuracy"] == [0.80, 0.84] and s["plain"]["test_accuracy"] == [0.70, 0.72]
    assert s["plain_es"]["mean"] == pytest.approx(0.82) and s["plain_es"]["std"] == pytest.approx(np.std([0.8, 0.84], ddof=1))
    assert "finetune_es" not in s and s["finetune"]["std"] is None
    assert s["mwn"]["mean"] == pytest.approx(0.86) and s["mwn"]["detector_recall"] == 0.5
    t = R.target(rows)
    assert (t["best_bilevel"], t["best_baseline"]) == ("mwn", "finetune")
    assert t["gain_points"] == pytest.approx(3.0) and t["reached"]
    assert R.is_bilevel("l2rw_k_es") and R.is_bilevel("mwn_ft") and not R.is_bilevel("plain_es")


def saved_grid(tmp_path, methods=("plain", "finetune", "mwn", "mwn_k", "mwn_k_ft"), seeds=(0, 1, 2)):
    """A folder as a grid leaves it: the fingerprint and one row per (method, seed), the learned
    weights' diagnostics from `weight_diagnostics` on 50 examples of which 20 have wrong labels."""
    from experiments.common import config, run_state

    cfg = R.Config(output_dir=str(tmp_path / "runs"), setting="flip", epochs=3).validated()
    run_state.guard_settings(tmp_path / "runs" / "resume", config.result_settings(cfg))
    store = oc.MethodStore(cfg.output_dir)
    rng = np.random.default_rng(0)
    wrong = np.arange(50) < 20
    data = {"corrupted": wrong, "train": (None, np.arange(50) % 10)}
    for seed in seeds:
        for method in methods:
            test = rng.uniform(0.5, 0.9, 4).round(4).tolist()
            row = {"test_accuracy": test[-1], "val_accuracy": 0.8, "train_seconds": 10.0 * (seed + 1),
                   "record": {"epoch": [0, 1, 2, 3], "test_accuracy": test, "val_accuracy": [0.1, 0.7, 0.9, 0.8],
                              "hp": [{"grid_weights": [0.5] * len(R.LOSS_GRID)}] * 3}}
            if method in ("mwn", "mwn_k"):
                v = np.where(wrong, 0.02, 0.9) + rng.uniform(0, 0.02, 50)  # wrong labels < 0.05 < right ones
                row.update(example_weights=R.weight_diagnostics(v, data),
                           final_grid_weights=np.linspace(1, 0, len(R.LOSS_GRID)).tolist())
            store.save(R.key(method, seed), row)
    return cfg


def test_report_builds_tables_and_figures_from_the_saved_runs_without_training(tmp_path, monkeypatch):
    from experiments.common import run_state

    cfg = saved_grid(tmp_path, seeds=(0, 1))
    (Path(cfg.output_dir) / "resume" / "mwn_k_ft.seed1.json").unlink()  # not run yet
    before = sorted((p.name, p.stat().st_mtime_ns) for p in Path(cfg.output_dir).rglob("*"))
    monkeypatch.setattr(R, "run_one", lambda *a: pytest.fail("the report trained a method"))
    info = {"dataset": "fashion_mnist", "n_train": 50, "wrong_fraction": 0.4, "class_counts": [5] * 10}
    monkeypatch.setattr(R, "load_data", lambda c: (None, info))
    report_dir = tmp_path / "report"
    results = R.run_experiment(dataclasses.replace(cfg, methods=None, seeds=(0, 1), report_dir=str(report_dir)))
    assert sorted((p.name, p.stat().st_mtime_ns) for p in Path(cfg.output_dir).rglob("*")) == before  # read only
    assert results["figures"] == {k: f"reweighting_flip_{v}.png" for k, v in
                                  {"test_accuracy": "test_accuracy", "weighting": "weighting",
                                   "example_weights": "weights"}.items()}
    for name in results["figures"].values():
        assert (report_dir / name).stat().st_size > 1000
    text = (report_dir / "reweighting_flip_tables.md").read_text()
    rows = {line.split(" | ")[0]: line.split(" | ") for line in text.splitlines() if line.startswith("| ")}

    def acc(method, seeds, get=lambda r: r["test_accuracy"]):  # mean ± std (ddof 1) from the files themselves
        values = [100 * get(json.loads((Path(cfg.output_dir) / "resume" / f"{method}.seed{s}.json").read_text()))
                  for s in seeds]
        if len(values) == 1:
            return f"{values[0]:.2f} (seed 0)"
        return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"

    plain = rows["| plain (`plain`)"]
    assert plain[1] == "0,1" and acc("plain", (0, 1)) in plain[2] and acc("finetune", (0, 1)) in plain[4]
    assert acc("plain", (0, 1), lambda r: r["record"]["test_accuracy"][2]) in plain[3]  # best val: epoch 2
    assert plain[5].strip(" |") == "15 (10–20); 15 (10–20)"
    mwn_k = rows["| Meta-Weight-Net, K-RMD (K=3) (tf_bilevel) (`mwn_k`)"]
    assert acc("mwn_k", (0, 1)) in mwn_k[2] and acc("mwn_k_ft", (0,)) + " (seeds 0)" in mwn_k[4]
    for method in ("mwn", "mwn_k"):  # the detector columns: mean over the seeds of each seed's values
        diag = [json.loads((Path(cfg.output_dir) / "resume" / f"{method}.seed{s}.json").read_text())["example_weights"]
                for s in (0, 1)]
        cells = rows[f"| `{method}`" + (" (K=3)" if method == "mwn_k" else "")]
        assert cells[2:6] == [f"{np.mean([d[f] for d in diag]):.3f}" for f in (
            "mean_weight_wrong_labels", "mean_weight_right_labels", "detector_precision")] + [
            f"{np.mean([d['detector_recall'] for d in diag]):.3f} |"]
        assert float(cells[2]) < 0.05 < 0.9 < float(cells[3]) and float(cells[4]) == float(cells[5][:-2]) == 1.0
    present, absent = text.split("Runs present")[1].split("\n")[0], text.split("Not run")[1]
    assert "`plain` 0,1;" in present and "`mwn_k_ft` 0." in present
    assert "`mwn_k_ft` 1;" in absent and "`forward` 0,1;" in absent  # and the rest of the default list
    with pytest.raises(tfb.SettingsMismatchError, match="epochs"):
        R.run_experiment(dataclasses.replace(cfg, epochs=15, report_dir=str(report_dir)))
    with pytest.raises(run_state.OutputDirError, match="holds no runs"):
        R.run_experiment(dataclasses.replace(cfg, output_dir=str(tmp_path / "none"), report_dir=str(report_dir)))
    with pytest.raises(run_state.OutputDirError, match="no finished run of --methods=clean × --seeds=0,1"):
        R.run_experiment(dataclasses.replace(cfg, methods=("clean",), seeds=(0, 1), report_dir=str(report_dir)))
    with run_state.exclusive_output_dir(cfg.output_dir, "the grid"):  # a run holds the folder: the report still runs
        R.run_experiment(dataclasses.replace(cfg, seeds=(0,), report_dir=str(tmp_path / "again")))
    assert "`mwn_k_ft` 0." in (tmp_path / "again" / "reweighting_flip_tables.md").read_text()


def test_config_validation_names_the_flag():
    with pytest.raises(ValueError, match="--noise"):
        R.Config(noise=0.6).validated()  # flip: the partner would be the majority
    with pytest.raises(ValueError, match="--n_val"):
        R.Config(n_val=1005).validated()
    with pytest.raises(ValueError, match="--methods"):
        R.Config(methods=("mwn", "coteaching")).validated()
    with pytest.raises(ValueError, match="--methods.*longtail"):
        R.Config(setting="longtail", methods=("forward",)).validated()
    with pytest.raises(ValueError, match="--k"):
        R.Config(k=1).validated()
    with pytest.raises(ValueError, match="--weight_normalization"):
        R.Config(weight_normalization="sum").validated()
    assert "cb" not in R.Config().validated().methods and "forward" not in R.Config(setting="longtail").validated().methods


# ----------------------------------------------------------------------------------------
# End to end.
# ----------------------------------------------------------------------------------------
def fashion_subset(tmp_path):
    return write_mnist_subset(FASHION_DIR, tmp_path / "fashion", train=6000, test=1000)


def _config(*argv: str) -> R.Config:
    """The Config `python -m experiments.reweighting <argv>` runs with."""
    fv = flags.FlagValues()
    program.define_flags(R.PROGRAM, fv)
    fv(["reweighting", *argv])
    return program.config_from_flags(R.PROGRAM, fv)


@needs_fashion
@pytest.mark.slow
def test_quick_end_to_end_on_real_fashion_mnist(tmp_path):
    subset = fashion_subset(tmp_path)
    out, log = tmp_path / "out", tmp_path / "log.txt"
    # One seed: every method runs on real data. The seed loop (one resumable run per method and
    # seed, trained with its seed's Config) is test_each_method_and_seed_is_one_resumable_run_and_a_
    # finished_one_is_read_back (killed mid-fit and resumed: online_hpo's subprocess test, the same
    # MethodStore), the mean ± std over seeds is test_summary_and_target_over_seeds.
    command = ["-m", "experiments.reweighting", "--quick", "--setting=flip", "--seeds=0", f"--output_dir={out}",
               f"--local_dir={subset}", f"--data_dir={tmp_path / 'tfds'}"]
    program_runs.finish(program_runs.start(command, log), log, timeout=LONG)
    results = json.loads((out / "results.json").read_text())
    data, rows = results["data"], results["methods"]
    assert (data["n_train"], data["n_val"], data["n_test"]) == (3000, 1000, 1000)
    assert 0.35 < data["wrong_fraction"] < 0.45
    methods = ("plain", "finetune", "forward", "mwn", "l2rw", "mwn_ft", "l2rw_ft", "mwn_k", "mwn_k_ft", "l2rw_k",
               "random", "clean",
               "mix", "mix_ft", "ren", "ren_ft", "ren_mix", "ren_mix_ft", "l2rw_mix", "l2rw_mix_ft",
               "mwn_cls", "mwn_cls_ft")
    assert set(rows) == {f"{m}.seed0" for m in methods}
    for name, row in rows.items():
        epochs = 3 if name.split(".")[0] in R.FINETUNED else 4
        assert len(row["record"]["test_accuracy"]) == epochs + 1, name
        assert row["test_accuracy"] > 0.3, name  # 10 classes: chance is 0.1
    assert rows["mwn_k.seed0"]["steps"] == 2 and rows["mwn.seed0"]["steps"] == 1
    tuned = rows["mwn_k_ft.seed0"]  # fine-tunes mwn_k's final model: its epoch 0 is mwn_k's last evaluation
    assert tuned["start"] == "mwn_k's final weights"
    assert tuned["record"]["test_accuracy"][0] == rows["mwn_k.seed0"]["test_accuracy"]
    assert tuned["record"]["val_accuracy"][0] == rows["mwn_k.seed0"]["val_accuracy"]
    # Forward correction's C is a row-stochastic estimate of the flip noise's transition.
    c = np.array(rows["forward.seed0"]["estimated_transition"])
    np.testing.assert_allclose(c.sum(1), 1.0, rtol=1e-4)
    assert len(rows["mwn_cls.seed0"]["final_grid_weights_per_class"]) == 10
    assert rows["mwn_cls.seed0"]["normalization"] == "mean" and rows["mwn.seed0"]["normalization"] == "none"
    for name in ("mwn.seed0", "l2rw.seed0", "ren.seed0", "l2rw_mix.seed0", "mwn_cls.seed0"):
        w = rows[name]["example_weights"]
        assert sum(w["histogram_wrong"]) == data["wrong_labels"] and 0 <= w["detector_recall"] <= 1
    summary = results["target"]["summary"]
    assert set(summary) == {*methods, *(f"{m}_es" for m in methods if m not in R.FINETUNED)}
    for method in methods:  # the table is the rows'
        assert summary[method]["test_accuracy"] == [rows[f"{method}.seed0"]["test_accuracy"]], method
        assert summary[method]["seeds"] == [0] and summary[method]["std"] is None, method
    assert set(results["target"]) >= {"best_bilevel", "best_baseline", "gain_points", "reached"}
    for name in results["figures"].values():
        assert (out / name).stat().st_size > 1000
    assert set(results["figures"]) == {"test_accuracy", "weighting", "example_weights"}

    # The report from the saved runs (--report_dir): nothing trained, the run's folder untouched.
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    report_dir = tmp_path / "report"
    program.run_program(R.PROGRAM, _config(*command[2:], f"--report_dir={report_dir}"))  # in process: the
    # command line's config, the report's own code path (run_program hands over before the lock)
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    text = (report_dir / "reweighting_flip_tables.md").read_text()
    assert "Not run" not in text
    present = text.split("Runs present (method: seeds): ")[1].split("\n")[0]
    assert present == "; ".join(f"`{m}` 0" for m in R.METHODS if m in methods) + "."
    cells = {line.split(" | ")[0]: line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    for method, tuned in (("plain", "finetune"), ("mwn_k", "mwn_k_ft")):
        row = next(c for name, c in cells.items() if name.endswith(f"(`{method}`)"))
        for cell, s in zip(row[2:5], (summary[method], summary[f"{method}_es"], summary[tuned])):
            assert cell.strip("*") == f"{100 * s['mean']:.2f} (seed 0)", (method, cell)
    mwn_k = cells["| `mwn_k` (K=2)"]
    w = [rows["mwn_k.seed0"]["example_weights"]]
    assert mwn_k[2] == f"{np.mean([x['mean_weight_wrong_labels'] for x in w]):.3f}"
    assert mwn_k[5] == f"{np.mean([x['detector_recall'] for x in w]):.3f} |"
    for kind in ("test_accuracy", "weighting", "weights"):
        assert (report_dir / f"reweighting_flip_{kind}.png").stat().st_size > 1000


@needs_fashion
@pytest.mark.slow
def test_quick_longtail_runs_the_class_balanced_baseline(tmp_path):
    subset = fashion_subset(tmp_path)
    out = tmp_path / "out"
    # In process (the subprocess path of the program is the flip run's above).
    program.run_program(R.PROGRAM, _config("--quick", "--setting=longtail", "--seeds=0", "--methods=plain,cb,mwn,l2rw",
                                           f"--output_dir={out}", f"--local_dir={subset}",
                                           f"--data_dir={tmp_path / 'tfds'}"))
    results = json.loads((out / "results.json").read_text())
    counts = results["data"]["class_counts"]
    assert counts == nl.long_tail_counts(counts[0], 100.0, 10).tolist()  # the head class keeps n_max
    assert results["data"]["wrong_labels"] == 0
    rows = results["methods"]
    np.testing.assert_allclose(rows["cb.seed0"]["class_weights"], nl.class_balanced_weights(np.array(counts), 0.9999))
    assert "histogram_wrong" not in rows["mwn.seed0"]["example_weights"]
    assert len(rows["l2rw.seed0"]["example_weights"]["mean_weight_per_class"]) == 10


def test_each_method_and_seed_is_one_resumable_run_and_a_finished_one_is_read_back(tmp_path, monkeypatch):
    """The program's resume wiring, in-process: one run per (seed, method), named method.seedN in
    <output_dir>/resume and trained with its seed's Config; a finished run is read back, not
    trained again. (The mechanism under it, killed mid-fit and resumed per method and seed, is
    online_hpo's subprocess test: both programs resume through online_program.MethodStore; the
    online trainer's own resume is tests/test_resume.py's.)"""
    from experiments.common import online_program as oc

    cfg = R.Config(output_dir=str(tmp_path), methods=("plain", "mwn"), seeds=(0, 1))
    store = oc.MethodStore(str(tmp_path))
    store.save("plain.seed0", {"test_accuracy": 0.5, "record": {"epoch": [1]}})  # finished by an earlier run
    trained = []

    def run_one(run_cfg, data, method, store_):
        assert store_ is store
        trained.append((method, run_cfg.seed))
        return {"test_accuracy": 0.25 + run_cfg.seed, "record": {"epoch": [1]}}

    monkeypatch.setattr(R, "run_one", run_one)
    rows = R.run_methods(cfg, {}, store)
    assert trained == [("mwn", 0), ("plain", 1), ("mwn", 1)]
    assert list(rows) == ["plain.seed0", "mwn.seed0", "plain.seed1", "mwn.seed1"]
    assert rows["plain.seed0"]["test_accuracy"] == 0.5 and rows["mwn.seed1"]["test_accuracy"] == 1.25
    assert sorted(p.name for p in (tmp_path / "resume").glob("*.json")) == [f"{k}.json" for k in sorted(rows)]
    trained.clear()
    assert R.run_methods(cfg, {}, store) == rows and trained == []  # the same command again: nothing retrained


def test_a_fine_tuning_run_without_its_source_model_is_a_clear_error(tmp_path):
    from experiments.common import online_program as oc

    cfg = R.Config(output_dir=str(tmp_path)).validated()
    x = np.zeros((256, 28, 28, 1), np.float32)
    data = {"train": (x, np.zeros(256, np.int32)), "val": (x[:100], np.zeros(100, np.int32))}
    with pytest.raises(RuntimeError, match=r"l2rw_ft needs the trained l2rw model .*l2rw\.seed0\.weights\.h5"):
        R.run_baseline(cfg, data, "l2rw_ft", oc.MethodStore(str(tmp_path)))


def test_damaged_state_and_a_busy_output_dir_are_clear_errors(tmp_path):
    from experiments.common import run_state

    cfg = R.Config(output_dir=str(tmp_path), methods=("plain",), seeds=(0,))
    (tmp_path / "resume").mkdir()
    (tmp_path / "resume" / "plain.seed0.json").write_text('{"test_accuracy": 0.9, "rec')  # killed mid-write by hand
    with pytest.raises(run_state.StateFileError, match=r"plain\.seed0\.json is damaged.*--restart"):
        R.run_experiment(cfg, arrays={}, data_info={})
    with run_state.exclusive_output_dir(tmp_path, "another run"):
        with pytest.raises(run_state.OutputDirError, match="in use by another run"):
            R.run_experiment(cfg, arrays={}, data_info={})
