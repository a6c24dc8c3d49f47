"""Tests for experiments/omniglot.py and experiments/models/fewshot.py (offline, fast).

References are independent of the estimators: the meta-objective F(λ) = f(w_T(λ), λ)
re-computed by a plain unrolled loop (`experiments.models.fewshot.meta_loss`, hyper-representation
re-applied inside the loop, no chain-rule trick) and differentiated by central finite
differences in float64; the BilevelTrainer's hyper-step is compared with the core
estimator on the same problem, under XLA.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `experiments` is not an installed package.
import keras  # noqa: E402

import tf_bilevel as tfb  # noqa: E402
from experiments.data import episodes, sources  # noqa: E402
from experiments.models import fewshot as fsm  # noqa: E402
from experiments.common import program  # noqa: E402
from experiments import omniglot as om  # noqa: E402
from offline_data import MNIST_DIR, needs_mnist, fake_omniglot, write_mnist_subset  # noqa: E402
import program_runs  # noqa: E402



# --------------------------------------------------------------------------
# A tiny float64 instance of the Fig. 8 network (16x16 images, 3 channels).
# --------------------------------------------------------------------------


def tiny_problem(n_way: int = 2, dtype: str = "float64", like: fsm.FewShotProblem = None) -> fsm.FewShotProblem:
    """Fig. 8 at 16x16 with 3 channels; `like`: copy its weights (e.g. a float32 twin)."""
    hyper = fsm.build_hyper_model(channels=3, image_size=16, seed=3, dtype=dtype)
    inner = fsm.build_inner_model(n_way, channels=3, input_size=4, seed=7, dtype=dtype)
    # A non-zero classifier so that every layer matters at w_0.
    inner.layers[-1].kernel.assign(0.3 * np.random.default_rng(0).normal(size=inner.layers[-1].kernel.shape))
    if like is not None:
        for model, source in ((hyper, like.hyper_model), (inner, like.inner_model)):
            for var, value in zip(model.trainable_variables, source.trainable_variables):
                var.assign(tf.cast(value, var.dtype))
    return fsm.FewShotProblem(hyper, inner)


def tiny_tasks(num: int, n_way: int = 2, k_shot: int = 2, n_query: int = 3, dtype=tf.float64) -> fsm.Task:
    """Tasks whose classes differ by a class-specific pattern (learnable, not separable by BN alone)."""
    rng = np.random.default_rng(11)
    patterns = rng.normal(size=(n_way, 16, 16, 1))

    def images(n):
        labels = np.repeat(np.arange(n_way), n)
        x = patterns[labels] + 0.7 * rng.normal(size=(len(labels), 16, 16, 1))
        return x, labels

    parts = [images(k_shot) + images(n_query) for _ in range(num)]
    return fsm.Task(*[tf.constant(np.stack([p[i] for p in parts]), dtype if i % 2 == 0 else tf.int64)
                      for i in range(4)])


def first(tasks: fsm.Task, i: int = 0) -> fsm.Task:
    return fsm.Task(*[x[i] for x in tasks])


def test_network_matches_the_appendix_counts():
    """Fig. 8 with 64 channels: λ ≈ 110k (convs 1–2, centers, ρ, γ) and w ≈ 75k (appendix G.3)."""
    problem = fsm.FewShotProblem(fsm.build_hyper_model(), fsm.build_inner_model(5))
    raw = problem.initial_raw(init_rho=0.01, init_gamma=0.1)
    size = lambda tree: sum(int(np.prod(x.shape)) for x in tf.nest.flatten(tree))  # noqa: E731
    assert size(problem.w0) == 74309
    assert size(raw) == 112009
    assert problem.groups == [0, 0, 0, 1, 1, 1, 2, 2]  # conv3 + BN3, conv4 + BN4, classifier
    x = tf.zeros([3, 28, 28, 1])
    assert problem.represent(raw["hyper"], x).shape == (3, 7, 7, 64)
    assert problem.logits(problem.w0, problem.represent(raw["hyper"], x)).shape == (3, 5)


# (key, leaf, index) of the entries probed: ρ_1..3, γ, three center entries (conv3, BN3 offset,
# classifier) and a conv1 kernel entry.
PROBES = [("rho_raw", None, (i,)) for i in range(3)] + [("gamma_raw", None, ())]
PROBES += [("centers", 0, (1, 2, 0, 1)), ("centers", 2, (0,)), ("centers", 6, (1, 0)), ("hyper", 0, (0, 1, 0, 2))]


def at_probes(grads) -> np.ndarray:
    """The entries of `grads` (fsm's raw structure) at PROBES."""
    return np.array([float(np.asarray(grads[key] if leaf is None else grads[key][leaf])[index]) for key, leaf, index in PROBES])


def fd_probes(problem, raw, task, T) -> np.ndarray:
    """Central differences at PROBES of F(λ) from the plain unrolled loop."""

    def F(r):
        return float(fsm.meta_loss(problem, tf.nest.map_structure(tf.constant, r), task, T))

    fd = []
    eps = 1e-6
    for key, leaf, index in PROBES:
        def shifted(delta):
            r = tf.nest.map_structure(lambda x: np.array(x, np.float64), raw)
            target = r[key] if leaf is None else r[key][leaf]
            target[index] += delta
            return r

        fd.append((F(shifted(eps)) - F(shifted(-eps))) / (2 * eps))
    return np.array(fd)


def perturbed_raw(problem):
    raw = problem.initial_raw(init_rho=0.2, init_gamma=0.4)
    raw["centers"] = [c + 0.05 * np.random.default_rng(i).normal(size=c.shape) for i, c in enumerate(raw["centers"])]
    return raw


def element(tasks: fsm.Task) -> tuple:
    return (tasks.support_x, tasks.support_y), (tasks.query_x, tasks.query_y)


def trainer_at(problem, raw, tasks: fsm.Task, *, steps, truncate, jit_compile):
    """problem.build_trainer (the experiment's trainer) with λ set to `raw` (fsm structure)."""
    trainer = problem.build_trainer(steps=steps, truncate=truncate, init_rho=1.0, init_gamma=1.0)
    trainer.compile(optimizer=keras.optimizers.SGD(1.0), jit_compile=jit_compile)
    trainer.build_from_spec(tf.nest.map_structure(lambda x: tf.TensorSpec(x.shape, x.dtype), element(tasks)))
    named = trainer_variables(problem, trainer)
    for v, value in zip(named["centers"], raw["centers"]):
        v.assign(tf.cast(value, v.dtype))
    named["rho_raw"].assign(tf.cast(raw["rho_raw"], named["rho_raw"].dtype))
    named["gamma_raw"].assign(tf.cast(raw["gamma_raw"], named["gamma_raw"].dtype))
    for v, value in zip(problem.hyper_model.trainable_variables, raw["hyper"]):
        v.assign(tf.cast(value, v.dtype))
    return trainer


def trainer_variables(problem, trainer) -> dict:
    """The trainer's raw variables in fsm's raw structure (ν_ρ, ν_γ are the softplus raws)."""
    by_name = {v.name.split("/")[-1]: v for v in trainer.hyper_variables}
    return {
        "hyper": list(problem.hyper_model.trainable_variables),
        "centers": [by_name[f"user_c_{i}"] for i in range(len(problem.w0))],
        "rho_raw": by_name["user_rho"],
        "gamma_raw": by_name["inner_learning_rate"],
    }


def trainer_hypergradient(problem, trainer, tasks: fsm.Task) -> dict:
    """trainer.hypergradient_of on a meta-batch, in fsm's raw structure."""
    grads = trainer.hypergradient_of(element(tasks))
    by_id = {id(v): g for v, g in zip(trainer.hyper_variables, grads)}
    return tf.nest.map_structure(lambda v: by_id[id(v)].numpy(), trainer_variables(problem, trainer))


def core_meta_gradient(problem, raw, tasks: fsm.Task, steps, truncate) -> dict:
    """Mean over tasks of d f / d raw λ from the core estimator on FewShotProblem's own
    formulation (independent of the trainer): per task, hp = core_hparams(raw), the core's
    hypergradient, and the chain rule back to raw."""
    hg = problem.hypergradient_fn(steps=steps, truncate=truncate)

    def one(raw, task):
        flat = tf.nest.flatten(raw)
        with tf.GradientTape() as tape:
            tape.watch(flat)
            hp = problem.core_hparams(tf.nest.pack_sequence_as(raw, flat), task.support_x, task.query_x)
        result = hg.compute(problem.w0, hp, task.support_y, task.query_y)
        return tape.gradient(tf.nest.flatten(hp), flat, output_gradients=tf.nest.flatten(result.hypergrad))

    raw = tf.nest.map_structure(tf.constant, raw)
    one = tf.function(one, autograph=False)  # traced once, run per task
    per_task = [one(raw, first(tasks, i)) for i in range(tasks.support_x.shape[0])]
    assert one.experimental_get_tracing_count() == 1
    return tf.nest.pack_sequence_as(raw, [tf.add_n(list(g)) / len(per_task) for g in zip(*per_task)])


def stacked(task: fsm.Task) -> fsm.Task:
    return fsm.Task(*[x[None] for x in task])


def test_full_rmd_hypergradient_matches_finite_differences_float64():
    """The experiment's trainer (full RMD through the hyper-representation, per-task batch-statistics
    BN) equals central differences of the directly computed F(λ) = f(w_T(λ), λ) for ρ, γ, centers
    and a conv kernel entry; 2-RMD of the 3 steps is a different estimate that still points downhill."""
    problem = tiny_problem()
    T = 3
    raw = perturbed_raw(problem)
    task = first(tiny_tasks(1))
    results = {}
    for truncate in (None, 2):
        trainer = trainer_at(problem, raw, stacked(task), steps=T, truncate=truncate, jit_compile=False)
        results[truncate] = trainer_hypergradient(problem, trainer, stacked(task))
        assert trainer.meta_batch_path == "stacked"
    analytic, fd = at_probes(results[None]), fd_probes(problem, raw, task, T)
    assert np.all(np.abs(fd) > 1e-6), fd  # every probe is a non-trivial check
    np.testing.assert_allclose(analytic, fd, rtol=1e-5, atol=1e-9)
    truncated = at_probes(results[2])
    assert not np.allclose(truncated, fd, rtol=1e-3)
    assert float(np.dot(truncated, fd)) > 0


def test_xla_float32_trainer_hypergradient_with_per_task_batchnorm_matches_float64_reference():
    """The compiled path (jit_compile=True; XLA has a MaxPoolGradGrad kernel for float32 only) on
    a meta-batch of 2 tasks agrees with the float64 core estimator on experiments.models.fewshot's own
    formulation (the test above checks the float64 trainer against finite differences)."""
    p64 = tiny_problem(dtype="float64")
    p32 = tiny_problem(dtype="float32", like=p64)
    T, K = 3, 2
    raw64 = perturbed_raw(p64)
    tasks64 = tiny_tasks(2)
    tasks32 = fsm.Task(*[tf.cast(x, tf.float32) if x.dtype == tf.float64 else x for x in tasks64])
    reference = core_meta_gradient(p64, raw64, tasks64, T, K)
    trainer = trainer_at(p32, raw64, tasks32, steps=T, truncate=K, jit_compile=True)
    got = trainer_hypergradient(p32, trainer, tasks32)
    assert trainer.meta_batch_path == "stacked"
    for key in reference:
        assert float(tfb.diagnostics.relative_error(tf.nest.flatten(got[key]), tf.nest.flatten(reference[key]))) < 2e-4, key
    assert not p32.inner_model.non_trainable_variables  # per-task BN: no moving statistics


def test_trainer_hyper_step_applies_its_hypergradient():
    """One `fit` step with SGD(1) moves every raw hyperparameter by minus `hypergradient_of`."""
    problem = tiny_problem(dtype="float32")
    T, K = 2, 1
    tasks = fsm.Task(*[tf.cast(x, tf.float32) if x.dtype == tf.float64 else x for x in tiny_tasks(2)])
    trainer = trainer_at(problem, problem.initial_raw(init_rho=0.2, init_gamma=0.4), tasks, steps=T, truncate=K,
                         jit_compile=False)  # the test above covers XLA
    before = [v.numpy().copy() for v in trainer.hyper_variables]
    expected = trainer_hypergradient(problem, trainer, tasks)
    data = tf.data.Dataset.from_tensors(element(tasks))
    trainer.fit(data, epochs=1, verbose=0)
    moved = [b - v.numpy() for b, v in zip(before, trainer.hyper_variables)]
    by_id = {id(v): m for v, m in zip(trainer.hyper_variables, moved)}
    step = tf.nest.map_structure(lambda v: by_id[id(v)], trainer_variables(problem, trainer))
    for key in expected:
        np.testing.assert_allclose(np.concatenate([np.ravel(x) for x in tf.nest.flatten(step[key])]),
                                   np.concatenate([np.ravel(x) for x in tf.nest.flatten(expected[key])]),
                                   rtol=1e-4, atol=1e-6, err_msg=key)


def test_exported_representation_reproduces_embeddings_bit_identically(tmp_path):
    from tf_bilevel.keras import export_hyper_model

    problem = tiny_problem(dtype="float32")
    learned = [v * 1.3 + 0.01 for v in problem.initial_raw(init_rho=0.1, init_gamma=0.1)["hyper"]]
    for var, value in zip(problem.hyper_model.trainable_variables, learned):
        var.assign(value)
    path = str(tmp_path / "rep")
    export_hyper_model(problem.hyper_model, path)
    images = np.random.default_rng(0).random((7, 16, 16, 1)).astype(np.float32)
    per_task = tf.function(problem.represent, autograph=False)(learned, tf.constant(images)).numpy()
    check = fsm.check_export(problem.hyper_model, path, images, training_embeddings=per_task)
    assert check["saved_model_load_bit_identical"] and check["tfsmlayer_bit_identical"]
    assert check["bit_identical_to_meta_training_representation"]
    assert check["embedding_shape"] == [7, 4, 4, 3]


def test_batch_statistics_normalization_has_exact_second_derivatives():
    """Keras' BatchNormalization (tf.nn.moments: variance around stop_gradient(mean)) gets the
    second derivative wrong; ours matches central differences of the inner gradient."""
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 2, 2, 3)))
    ours = fsm.BatchStatisticsNormalization(dtype="float64")
    keras_bn = keras.layers.BatchNormalization(epsilon=1e-3, dtype="float64")
    for layer in (ours, keras_bn):
        layer.build(x.shape)

    def grad_functional(layer):
        def fn(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(tf.sin(layer(x, training=True)))
            return tf.reduce_sum(tf.cos(tape.gradient(loss, x)))
        return fn

    def second_order_error(layer):
        fn = grad_functional(layer)
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = fn(x)
        analytic = tape.gradient(value, x).numpy().ravel()[:4]
        eps, fd = 1e-6, []
        for i in range(4):
            d = np.zeros(x.shape)
            d.reshape(-1)[i] = eps
            fd.append((float(fn(x + d)) - float(fn(x - d))) / (2 * eps))
        return np.max(np.abs(analytic - np.array(fd)))

    assert second_order_error(ours) < 1e-7
    assert second_order_error(keras_bn) > 1e-3  # the reason for the custom layer


# --------------------------------------------------------------------------
# The program, end to end (--quick).
# --------------------------------------------------------------------------


def quick_config(tmp_path: Path, **overrides) -> om.Config:
    """The program's flag defaults in --quick mode, as run() receives them."""
    fv = flags.FlagValues()
    program.define_flags(om.PROGRAM, fv)
    fv(["omniglot", "--quick", f"--output_dir={tmp_path / 'out'}", f"--data_dir={tmp_path / 'tfds'}"]
       + [f"--{k}={v}" for k, v in overrides.items()])
    return program.config_from_flags(om.PROGRAM, fv)


def check_results(cfg: om.Config, methods: set) -> dict:
    out = Path(cfg.output_dir)
    results = json.loads((out / "results.json").read_text())
    assert (out / "fig7_one_shot.png").stat().st_size > 0
    assert set(results["runs"]) == methods
    for name, run in results["runs"].items():
        assert 0.0 <= run["test_accuracy"] <= 1.0 and run["test_tasks"] == cfg.eval_tasks
        rec = run["record"]
        assert rec["epoch_end_it"][-1] == cfg.hyper_iterations
        assert len(rec["curve_test_acc"]) == cfg.hyper_iterations // cfg.eval_every + 1
        assert run["final_gamma"] > 0 and min(run["final_rho"]) > 0
        if run["truncate"] != "full" and cfg.exact_every:
            assert rec["cosine"] and all(-1 - 1e-6 <= c <= 1 + 1e-6 for c in rec["cosine"])
    for curve in results.get("relative_error_vs_K", {}).get("curves", {}).values():
        assert all(np.isfinite(curve["relative_error"]))
    export = results["export"]
    assert export["saved_model_load_bit_identical"] and export["tfsmlayer_bit_identical"]
    assert export["bit_identical_to_meta_training_representation"]
    return results


@pytest.mark.slow
def test_quick_run_on_mock_omniglot(tmp_path, monkeypatch):
    """The paper's path: tfds omniglot (mocked: 20 characters) -> 1200/100/323-style split."""
    monkeypatch.setattr(sources, "network_reachable", lambda *a, **k: True)  # tfds mock: no download
    cfg = quick_config(tmp_path, dataset="omniglot", class_split="12,3,5", truncate="1",
                       short_horizon=False, exact_every=0, relerr_truncations="", timing_rounds=0)
    assert cfg.rotations is False and cfg.n_way == 5 and cfg.k_shot == 1
    with tfds.testing.mock_data(as_dataset_fn=fake_omniglot(per_class=6, num_classes=10)):
        results = program.run_program(om.PROGRAM, cfg)
    assert "omniglot" in results["data_description"]
    check_results(cfg, {"1"})


@pytest.mark.slow
@needs_mnist
def test_quick_run_on_real_mnist_episodes(tmp_path):
    """Offline real data: 5-way 1-shot episodes over rotated real MNIST digits (first 1500 +
    300 images), meta-train and meta-test on disjoint digits; 1-RMD with the cosine to full
    RMD, relative error vs K with and without ρ."""
    src = write_mnist_subset(MNIST_DIR, tmp_path / "mnist_subset", train=1500, test=300)
    cfg = quick_config(tmp_path, dataset="mnist", local_dir=src, truncate="1", short_horizon=False,
                       relerr_truncations="1,3")
    assert cfg.rotations is True and cfg.class_split == (5, 0, 5)
    results = program.run_program(om.PROGRAM, cfg)
    assert "20" in results["data_description"]  # 5 digits x 4 rotations per pool
    results = check_results(cfg, {"1"})
    assert set(results["relative_error_vs_K"]["curves"]) == {"learned ρ", "ρ = 0"}
    # The curve reaches K = T (whose "error" is full RMD against itself, so its value is not a check:
    # full RMD is checked against finite differences above); K = 1 < T is truncated: a real error.
    for curve in results["relative_error_vs_K"]["curves"].values():
        assert curve["K"][0] == 1 < cfg.inner_steps == curve["K"][-1]
        assert np.isfinite(curve["relative_error"][0]) and curve["relative_error"][0] > 0
    assert set(results["interleaved_sec_per_iter"]) == {"1"}


def test_data_pools_are_disjoint_after_rotations():
    x = np.zeros((40, 4, 4, 1), np.uint8)
    y = np.repeat(np.arange(10), 4)
    base = episodes.class_split(y, {"train": 5, "val": 0, "test": 5}, seed=0)
    data = fsm.MetaData(*episodes.add_rotations(x, y), {k: episodes.rotated_classes(v, 10) for k, v in base.items()}, "")
    assert not set(data.pools["train"]) & set(data.pools["test"])
    assert len(data.pools["train"]) == len(data.pools["test"]) == 20
    assert set(data.pools["train"] % 10) == set(base["train"])


def test_training_stream_started_at_k_is_the_episode_stream_from_meta_batch_k_on():
    """A resumed run jumps to its hyper-iteration (tfb.keras.episodes): the meta-batches it
    gets are exactly those the uninterrupted run gets there, i.e. make_episodes' stream."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(60, 4, 4, 1)).astype(np.uint8)
    y = np.repeat(np.arange(10), 6)
    data = fsm.MetaData(x, y, {"train": np.arange(6), "test": np.arange(6, 10)}, "")
    shape = dict(n_way=3, k_shot=1, n_query=2)
    stream = data.training_stream(**shape, meta_batch_size=2, seed=4)
    reference = list(data.episodes("train", **shape, seed=4, num_episodes=None, meta_batch_size=2)
                     .map(fsm.as_trainer_element).take(6))
    for k in (0, 3):
        for got, want in zip(stream(k).take(6 - k), reference[k:], strict=True):
            tf.nest.map_structure(lambda a, b: np.testing.assert_array_equal(a.numpy(), b.numpy()), got, want)


def test_parse_truncate_and_bad_split():
    assert om.parse_truncate(["1", "10", "full", "50"], 50) == [1, 10, None, None]
    with pytest.raises(ValueError, match="inner_steps"):
        om.parse_truncate(["60"], 50)


# --------------------------------------------------------------------------
# Resuming after SIGKILL (the program, as a subprocess).
# --------------------------------------------------------------------------


def _start_omniglot(args: list, log: Path):
    return program_runs.start(["-m", "experiments.omniglot", *args], log)


def _h5_leaves(path: Path) -> dict:
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


@pytest.mark.slow
@needs_mnist
def test_killed_run_rerun_with_the_same_command_ends_bit_identical(tmp_path):
    """SIGKILL in the middle of the second method (after hyper-iteration 3 of 4; the checkpoint
    holds 2), then the same command again: the first method is reloaded, not retrained, the
    second resumes from its checkpoint, and the learned λ (all trainer weights), test
    accuracies and Fig. 7 curves equal an uninterrupted run's, bit for bit (--deterministic).
    --exact_every=0: the killed and resumed method is full RMD, which has no cosine to itself; the
    1-RMD trainer's cosine diagnostics (a second full-RMD graph in its XLA step) would double its
    compile in two processes and are never resumed here (they run in the real-MNIST and kanji runs)."""
    src = write_mnist_subset(MNIST_DIR, tmp_path / "mnist_subset", train=1500, test=300)
    common = ["--quick", "--dataset=mnist", f"--local_dir={src}",
              "--truncate=1,full", "--noshort_horizon", "--relerr_truncations=", "--timing_rounds=0",
              "--exact_every=0", "--deterministic"]
    reference_dir, resumed_dir = tmp_path / "uninterrupted", tmp_path / "resumed"
    logs = tmp_path / "uninterrupted.log", tmp_path / "resumed.log"
    # Separate tfds folders: two processes preparing the same one race.
    resumed_args = common + [f"--output_dir={resumed_dir}", f"--data_dir={tmp_path / 'tfds_resumed'}",
                             "--pause_after=full,3"]
    reference = _start_omniglot(common + [f"--output_dir={reference_dir}", f"--data_dir={tmp_path / 'tfds'}"],
                               logs[0])
    try:
        first = _start_omniglot(resumed_args, logs[1])
        program_runs.kill_when_paused(first, resumed_dir / "resume" / "paused_full_3", logs[1])
        assert (resumed_dir / "resume" / "1.json").exists() and not (resumed_dir / "resume" / "full.json").exists()
        assert (resumed_dir / "resume" / "backup" / "full").is_dir()
        program_runs.finish(_start_omniglot(resumed_args, logs[1]), logs[1])
        program_runs.finish(reference, logs[0])
    finally:
        if reference.poll() is None:
            reference.kill()
    log = logs[1].read_text()
    assert "1-RMD: finished by an earlier run" in log and "[Full RMD] resumed at hyper-iteration 2/4" in log
    assert not (resumed_dir / "resume" / "backup" / "full").exists()

    expected = json.loads((reference_dir / "results.json").read_text())
    results = json.loads((resumed_dir / "results.json").read_text())
    assert set(results["runs"]) == set(expected["runs"]) == {"1", "full"}
    for name, run in expected["runs"].items():
        timings = ("sec_per_iter", "sec_per_iter_mean")
        strip = lambda row: {**row, "record": {k: v for k, v in row["record"].items() if k not in timings}}  # noqa: E731
        assert strip(results["runs"][name]) == strip(run), name
        assert len(run["record"]["curve_test_acc"]) == 3
        weights, reference_weights = (_h5_leaves(d / "resume" / f"{name}.weights.h5") for d in (resumed_dir, reference_dir))
        assert weights.keys() == reference_weights.keys() and len(weights) > 10
        for key, value in reference_weights.items():
            assert np.array_equal(weights[key], value), (name, key)
    assert results["export"]["saved_model_load_bit_identical"]


def test_resume_refuses_a_different_configuration(tmp_path):
    cfg = quick_config(tmp_path)
    program.guard_state(om.PROGRAM, cfg)
    program.guard_state(om.PROGRAM, cfg)  # the same settings: fine
    with pytest.raises(ValueError, match=r"outer_lr: .*another --output_dir.*delete"):
        program.guard_state(om.PROGRAM, dataclasses.replace(cfg, outer_lr=0.5))
    with pytest.raises(ValueError, match="--pause_after must be METHOD,ITER"):
        quick_config(tmp_path, pause_after="full")
