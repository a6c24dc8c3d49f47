"""tfb.HyperStep (one compiled hypergradient + outer update), HyperStepCheckpoint (resume),
guard_settings (refuse other settings) and tfb.Progress (Keras' Progbar for functional loops)."""

from __future__ import annotations

import json
import multiprocessing
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_bilevel as tfb

N, D = 24, 3


def _problem(seed: int = 0):
    """Per-example weights σ(λ_i) of a weighted ridge regression (the shape of hypercleaning)."""
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=(N, D)), tf.float32)
    y = tf.constant(rng.normal(size=(N, 1)), tf.float32)
    x_val = tf.constant(rng.normal(size=(N, D)), tf.float32)
    y_val = tf.constant(rng.normal(size=(N, 1)), tf.float32)

    def inner(w, lam, batch):
        xb, yb = batch
        return tf.reduce_mean(tf.sigmoid(lam) * tf.squeeze((xb @ w - yb) ** 2, 1)) + 0.01 * tf.reduce_sum(w * w)

    def outer(w, lam, batch):
        xb, yb = batch
        return tf.reduce_mean((xb @ w - yb) ** 2)

    return inner, outer, (x, y), (x_val, y_val), tf.zeros([D, 1])


def _hypergradient(jit_compile: bool, truncate=3, inner=None, outer=None):
    return tfb.hypergradient_fn(inner, outer, steps=5, learning_rate=0.3, truncate=truncate, jit_compile=jit_compile)


OPTIMIZERS = {
    "keras_adam": lambda: keras.optimizers.Adam(0.05),
    "tfb_adam": lambda: tfb.adam(0.05),
    "tfb_momentum": lambda: tfb.momentum(0.1, beta=0.5),
}


def _by_hand(optimizer_name, lam, grads_per_step):
    """λ after applying `grads_per_step` with the optimizer by hand (outside any HyperStep)."""
    if optimizer_name == "keras_adam":
        var = tf.Variable(lam)
        opt = OPTIMIZERS[optimizer_name]()
        for g in grads_per_step:
            opt.apply([g], [var])
        return var.numpy()
    opt = OPTIMIZERS[optimizer_name]()
    state = opt.init(lam)
    for k, g in enumerate(grads_per_step):
        updates, state = opt.update(g, state, lam, (), tf.constant(k))
        lam = lam + updates
    return lam.numpy()


@pytest.mark.parametrize("jit_compile", [False, True], ids=["eager_graph", "xla"])
@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
def test_update_is_the_hypergradient_and_the_optimizer_applied_by_hand(optimizer_name, jit_compile):
    inner, outer, train, val, w0 = _problem()
    hg = _hypergradient(jit_compile, inner=inner, outer=outer)
    lam0 = tf.fill([N], 0.5)
    step = tfb.HyperStep(hg, lam0, OPTIMIZERS[optimizer_name]())
    lam, grads = lam0, []
    for k in range(3):
        result = step(w0, train, val)
        value, h = hg(w0, lam, train, val)  # the same hypergradient, computed on its own
        np.testing.assert_allclose(result.hparams.numpy(), lam.numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(result.hypergrad.numpy(), h.numpy(), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(float(result.outer_value), float(value), rtol=1e-6)
        assert int(result.step) == k and int(result.nonfinite_step) == -1
        grads.append(h)
        lam = tf.constant(_by_hand(optimizer_name, lam0, grads))
        np.testing.assert_allclose(step.hparams.numpy(), lam.numpy(), rtol=1e-5, atol=1e-7)
    assert int(step.iterations) == 3
    assert step.tracing_count == 1  # data are arguments: traced once
    assert not np.allclose(step.hparams.numpy(), lam0.numpy())  # it did move


def test_metrics_are_computed_inside_the_step_and_nested_hparams_work():
    inner, outer, train, val, w0 = _problem()
    hg = tfb.hypergradient_fn(lambda w, hp, b: inner(w, hp["lam"], b) + tf.exp(hp["log_l2"]) * tf.reduce_sum(w * w),
                              outer, steps=4, learning_rate=0.3)
    metrics = lambda result, inner_batch, outer_batch: {  # noqa: E731
        "w_norm": tf.norm(result.final_params), "val_size": tf.shape(outer_batch[0])[0]}
    step = tfb.HyperStep(hg, {"lam": tf.zeros([N]), "log_l2": tf.constant(-3.0)}, tfb.sgd(0.1), metrics=metrics)
    result = step(w0, train, val)
    assert set(result.metrics) == {"w_norm", "val_size"} and int(result.metrics["val_size"]) == N
    np.testing.assert_allclose(float(result.metrics["w_norm"]), float(tf.norm(result.final_params)), rtol=1e-6)
    # Plain gradient descent on λ: λ_1 = λ_0 − η h(λ_0), leaf by leaf.
    np.testing.assert_allclose(step.hparams["log_l2"].numpy(), -3.0 - 0.1 * result.hypergrad["log_l2"].numpy(),
                               rtol=1e-6)
    np.testing.assert_allclose(step.hparams["lam"].numpy(), -0.1 * result.hypergrad["lam"].numpy(), rtol=1e-6)


def test_a_given_variable_is_updated_in_place():
    inner, outer, train, val, w0 = _problem()
    lam = tf.Variable(tf.zeros([N]))
    step = tfb.HyperStep(_hypergradient(False, inner=inner, outer=outer), lam, keras.optimizers.Adam(0.1))
    snapshot = step.state
    step(w0, train, val)
    assert step.hparams is lam and not np.all(lam.numpy() == 0)
    assert int(step.iterations) == 1 and int(step.optimizer.iterations) == 1
    step.assign(snapshot)  # back to λ_0 and a fresh Adam
    assert np.all(lam.numpy() == 0) and int(step.iterations) == 0 and int(step.optimizer.iterations) == 0
    with pytest.raises(ValueError, match=r"HyperStep\(optimizer=\.\.\.\).*already built on other variables"):
        tfb.HyperStep(step.hypergradient, tf.zeros([N]), step.optimizer)


def _run(directory, optimizer_name, steps, *, settings=None, jit_compile=True):
    """A fresh HyperStep (as in a new process), resumed from `directory`, run to `steps` hyper-steps."""
    inner, outer, train, val, w0 = _problem()
    step = tfb.HyperStep(_hypergradient(jit_compile, inner=inner, outer=outer), tf.zeros([N]),
                         OPTIMIZERS[optimizer_name]())
    checkpoint = tfb.HyperStepCheckpoint(directory, step, settings=settings)
    done = checkpoint.restore()
    for _ in range(done, steps):
        step(w0, train, val)
        checkpoint.save()
    return step, done


@pytest.mark.parametrize("optimizer_name", ["keras_adam", "tfb_adam"])
def test_interrupted_and_resumed_loop_ends_bit_identical(tmp_path, optimizer_name):
    uninterrupted, _ = _run(tmp_path / "a", optimizer_name, 6)
    _, done = _run(tmp_path / "b", optimizer_name, 3)  # "killed" after 3 hyper-steps
    resumed, done = _run(tmp_path / "b", optimizer_name, 6)
    assert done == 3
    assert int(resumed.iterations) == int(uninterrupted.iterations) == 6
    got, want = resumed.variables, uninterrupted.variables
    assert len(got) == len(want) > 2  # λ, the optimizer's state, k
    for a, b in zip(got, want):
        assert np.array_equal(a.numpy(), b.numpy()), a.name
    # A finished run restores its end state and runs nothing more.
    again, done = _run(tmp_path / "b", optimizer_name, 6)
    assert done == 6 and np.array_equal(again.hparams.numpy(), uninterrupted.hparams.numpy())


def test_settings_guard_refuses_a_mismatch_naming_it(tmp_path):
    settings = {"outer_lr": 0.05, "steps": 5, "truncate": [3]}
    _run(tmp_path, "tfb_adam", 2, settings=settings, jit_compile=False)
    assert json.loads((tmp_path / "settings.json").read_text()) == settings
    _, done = _run(tmp_path, "tfb_adam", 2, settings=dict(settings, truncate=(3,)), jit_compile=False)  # same as JSON
    assert done == 2
    with pytest.raises(tfb.SettingsMismatchError) as err:
        _run(tmp_path, "tfb_adam", 4, settings=dict(settings, outer_lr=0.1, seed=1), jit_compile=False)
    message = str(err.value)
    assert str(tmp_path) in message
    assert "outer_lr: 0.05 then, 0.1 now" in message and "seed: None then, 1 now" in message
    assert "steps" not in message  # only what differs
    assert "delete" in message
    with pytest.raises(TypeError, match="settings must be a dict"):
        tfb.guard_settings(tmp_path / "x", [("lr", 0.1)])


def _guard_at_barrier(barrier, directory: str, who: int, rounds: int, results) -> None:
    """Worker: in each round, waits for the other process at `barrier`, then calls
    guard_settings({"who": who}) on that round's folder and reports whether it was accepted."""
    from tf_bilevel.resume import SettingsMismatchError, guard_settings

    for r in range(rounds):
        barrier.wait()
        try:
            guard_settings(os.path.join(directory, str(r)), {"who": who})
            results.put((r, who, "accepted"))
        except SettingsMismatchError:
            results.put((r, who, "refused"))


@pytest.mark.slow
def test_settings_guard_first_writer_wins_when_two_processes_start_together(tmp_path):
    """Two processes with different settings released at one barrier onto one fresh folder, 10
    times: exactly one is accepted and its settings are the stored ones; the other gets
    SettingsMismatchError (before the atomic create, both were accepted in 10 of 10 tries)."""
    rounds = 10
    context = multiprocessing.get_context("spawn")  # no fork of a process running TensorFlow
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_guard_at_barrier, args=(barrier, str(tmp_path), who, rounds, results))
               for who in (0, 1)]
    for worker in workers:
        worker.start()
    try:
        outcomes = [results.get(timeout=300) for _ in range(2 * rounds)]
    finally:
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.kill()
    assert all(worker.exitcode == 0 for worker in workers)
    for r in range(rounds):
        got = {who: outcome for rr, who, outcome in outcomes if rr == r}
        assert sorted(got.values()) == ["accepted", "refused"], (r, got)
        winner = next(who for who, outcome in got.items() if outcome == "accepted")
        assert json.loads((tmp_path / str(r) / "settings.json").read_text()) == {"who": winner}
        assert os.listdir(tmp_path / str(r)) == ["settings.json"]  # no temporary file left behind


def test_settings_guard_without_hard_links_still_creates_once(tmp_path, monkeypatch):
    """Where the filesystem refuses hard links, the exclusive create of settings.json decides."""
    def no_links(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    tfb.guard_settings(tmp_path, {"lr": 0.1})
    tfb.guard_settings(tmp_path, {"lr": 0.1})
    with pytest.raises(tfb.SettingsMismatchError, match="lr: 0.1 then, 0.2 now"):
        tfb.guard_settings(tmp_path, {"lr": 0.2})
    assert os.listdir(tmp_path) == ["settings.json"]
    assert json.loads((tmp_path / "settings.json").read_text()) == {"lr": 0.1}


def test_nonfinite_step_leaves_the_state_unchanged_and_names_the_step():
    _, outer, train, val, w0 = _problem()

    def inner(w, lam, batch):  # diverges for large weights σ(λ)·1e6
        xb, yb = batch
        return tf.reduce_mean(1e6 * tf.sigmoid(lam) * tf.squeeze((xb @ w - yb) ** 2, 1))

    hg = tfb.hypergradient_fn(inner, outer, steps=30, learning_rate=1.0)
    step = tfb.HyperStep(hg, tf.zeros([N]), keras.optimizers.Adam(0.1))
    before = [v.numpy() for v in step.variables]
    with pytest.raises(tfb.NonFiniteError, match="hyper-step 0: inner_loss became non-finite.*left unchanged"):
        step(w0, train, val)
    for v, b in zip(step.variables, before):
        assert np.array_equal(v.numpy(), b), v.name


def test_bad_arguments_are_named():
    inner, outer, *_ = _problem()
    hg = _hypergradient(False, inner=inner, outer=outer)
    with pytest.raises(TypeError, match=r"HyperStep\(optimizer=\.\.\.\).*Keras optimizer"):
        tfb.HyperStep(hg, tf.zeros([N]), "adam")
    with pytest.raises(TypeError, match=r"HyperStep\(hypergradient=\.\.\.\).*hypergradient_fn"):
        tfb.HyperStep(inner, tf.zeros([N]), tfb.sgd(0.1))
    with pytest.raises(TypeError, match=r"hparams.*int32"):
        tfb.HyperStep(hg, tf.zeros([N], tf.int32), tfb.sgd(0.1))
    with pytest.raises(ValueError, match=r"hparams=\.\.\.\) is empty"):
        tfb.HyperStep(hg, {}, tfb.sgd(0.1))
    with pytest.raises(TypeError, match=r"jit_compile"):
        tfb.HyperStep(hg, tf.zeros([N]), tfb.sgd(0.1), jit_compile="yes")


def test_progress_resumed_in_a_log_file(capsys):
    bar = tfb.Progress(10, initial=4, label="resuming at 4/10", log_seconds=3600.0)
    for done in range(5, 11):
        bar.update(done, val_loss=1.0 / done)
    out = capsys.readouterr().out
    assert out.startswith("resuming at 4/10\n")
    assert "\r" not in out and "\b" not in out and "\x1b" not in out  # not a terminal: plain lines
    lines = [line for line in out.splitlines()[1:] if line.strip()]
    assert len(lines) == 2  # the first update, then (log_seconds later) only the last
    assert " 5/10" in lines[0] and "10/10" in lines[1]
    assert "val_loss: 0.1000" in lines[1]  # the latest value, not a running mean
    with pytest.raises(ValueError, match=r"Progress\(initial=\.\.\.\)"):
        tfb.Progress(10, initial=11)
