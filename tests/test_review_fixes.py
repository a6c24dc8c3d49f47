"""Fixes from the review of the reports / XLA-convolution change (in-process, no training).

* omniglot and task_interaction record the run's environment under "environment", as every other
  program and benchmark suite does; a results.json written before that (key "machine", e.g. a
  long run started from an older checkout) still gives the same table, and its figure.
* `EstimatorSettings` declares the core estimator's arguments and their defaults once;
  `TrainerSpec` and the trainer's constructor take theirs from it.
* A grouped convolution keeps TF's Conv2D gradient inside XLA's loops (the canonical-layout
  replacement is written for ungrouped ones); forward mode refuses a grouped convolution by name.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from absl import flags

from experiments import omniglot as om
from experiments import task_interaction as ti
from experiments.common import program
from experiments.common.run_state import jsonable


def _config(prog: program.Program, tmp_path: Path, **overrides):
    """The program's --quick Config, prepared as run_program prepares it."""
    values = flags.FlagValues()
    program.define_flags(prog, values)
    values([prog.name, "--quick", f"--output_dir={tmp_path / 'out'}"] + [f"--{k}={v}" for k, v in overrides.items()])
    return prog.prepare(program.config_from_flags(prog, values))


def _run(prog: program.Program, cfg, tmp_path: Path) -> dict:
    """`prog.experiment` with a Run whose writes are kept; the results as results.json holds them."""
    written: list = []
    program.guard_state(prog, cfg)  # makes the resume folder, as run_program does
    ctx = program.Run(prog, cfg.output_dir, 0.0, {"date": "2026-12-07T16:00:00+00:00", "platform": "test",
                                                 "load_average": [1.0, 1.0, 1.0]})
    ctx.write_results = lambda results: written.append(json.loads(json.dumps(jsonable(results))))
    results = prog.experiment(cfg, None, ctx)
    assert written, "the program wrote no results.json"
    for each in written:  # every intermediate results.json too
        assert each["environment"] == ctx.environment and "machine" not in each
    return json.loads(json.dumps(jsonable(results)))


def _task_interaction_results(tmp_path: Path, monkeypatch) -> dict:
    """task_interaction's results from its own run_experiment, the features and each (trial, K)
    run replaced by stand-ins (the rows have the keys and curves the table and figure read)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 4)).astype("float32"), np.repeat(np.arange(10), 6)
    monkeypatch.setattr(ti.features, "load_features", lambda *a, **k: (x, y, "stand-in features"))

    def run_one(truncate, split, cfg, *, diagnostics):
        its = list(range(1, 6))
        curves = {"it": its, "val_loss": [1.0 / i for i in its], "exact_it": [1, 4], "exact_norm": [0.5, 0.2],
                  "cosine": [0.9, 0.8]}
        return {"test_acc": 0.5, "initial_test_acc": 0.3, "val_acc": 0.6, "val_loss": 0.7, "iterations": 5,
                "best_iteration": 4, "sec_per_iter": 0.01, **({"curves": curves} if diagnostics else {})}

    monkeypatch.setattr(ti, "run_one", run_one)
    cfg = _config(ti.PROGRAM, tmp_path, dataset="mnist", features="pixels", m=10)
    return _run(ti.PROGRAM, cfg, tmp_path)


def _omniglot_results(tmp_path: Path, monkeypatch) -> dict:
    """omniglot's results from its own run_experiment, the data, models, meta-training and export
    replaced by stand-ins (the rows have the keys and records the table and figure read)."""
    episodes = lambda *a, num_episodes=1, **k: [None] * num_episodes  # noqa: E731
    monkeypatch.setattr(om.fsm, "load_meta_data", lambda *a, **k: SimpleNamespace(
        description="stand-in episodes", episodes=episodes, training_stream=lambda *a, **k: None))
    monkeypatch.setattr(om.fsm, "as_task", lambda batch: batch)
    monkeypatch.setattr(om, "build_problem", lambda cfg: SimpleNamespace(
        initial_raw=lambda **k: {"rho_raw": np.zeros(3)}, w0=[np.zeros((2, 3))]))
    monkeypatch.setattr(om.fsm, "export_and_check", lambda *a: {"saved_model_load_bit_identical": True})

    def train_method(cfg, store, name, steps, truncate, train_stream, curve_tasks, test_tasks):
        record = {"curve_it": [0, 2, 4], "curve_test_acc": [0.2, 0.3, 0.4], "epoch_end_it": [2, 4],
                  "query_error": [0.7, 0.6], "cos_it": [2, 4] if truncate else [], "cosine": [0.9, 0.8] if truncate else [],
                  "sec_per_iter": 0.1}
        row = {"inner_steps": steps, "truncate": "full" if truncate is None else truncate, "iterations": 4,
               "test_accuracy": 0.4, "test_accuracy_ci95": 0.05, "test_tasks": 4, "final_gamma": 0.1,
               "final_rho": [1.0, 1.0, 1.0], "record": record}
        return None, None, row

    monkeypatch.setattr(om, "train_method", train_method)
    cfg = _config(om.PROGRAM, tmp_path, dataset="mnist", relerr_truncations="", timing_rounds=0)
    return _run(om.PROGRAM, cfg, tmp_path)


@pytest.mark.parametrize("make, prog, figure", [
    (_task_interaction_results, ti.PROGRAM, "fig6_task_interaction.png"),
    (_omniglot_results, om.PROGRAM, "fig7_one_shot.png"),
], ids=["task_interaction", "omniglot"])
def test_the_environment_key_is_written_and_old_results_still_render(tmp_path, monkeypatch, make, prog, figure):
    """The key every program writes, in every results.json the run writes; then the table and the
    figure regenerated from a results.json of the older form (the same record under "machine")
    equal those of the current form."""
    results = make(tmp_path, monkeypatch)
    old = {("machine" if key == "environment" else key): value for key, value in results.items()}
    assert "environment" not in old and old["machine"] == results["environment"]
    tables = []
    for name, form in (("current", results), ("old", old)):
        path = tmp_path / name / "results.json"
        path.parent.mkdir()
        path.write_text(json.dumps(form))
        read = json.loads(path.read_text())
        prog.figures(read, str(path.parent))
        assert (path.parent / figure).stat().st_size > 1000
        tables.append(prog.table(read))
    assert tables[0] == tables[1] and "RMD" in tables[0]


# -- The estimator's settings: declared once (tf_bilevel/keras/estimator.py) -------------------------

def test_the_trainer_spec_and_the_constructor_take_the_estimator_settings_fields_and_defaults():
    """`EstimatorSettings` declares the core estimator's arguments and their defaults; they are
    `tfb.hypergradient_fn`'s defaults, and `TrainerSpec` and the trainer's constructor have fields
    and parameters of the same names, types and defaults (a trainer built without them builds the
    core's default estimator)."""
    import inspect

    import tf_bilevel as tfb
    from tf_bilevel.keras.estimator import EstimatorSettings
    from tf_bilevel.keras.spec import TrainerSpec
    from tf_bilevel.keras.trainer_base import BilevelTrainerMixin

    settings = {f.name: f for f in dataclasses.fields(EstimatorSettings)}
    spec = {f.name: f for f in dataclasses.fields(TrainerSpec)}
    core = inspect.signature(tfb.hypergradient_fn).parameters
    constructor = inspect.signature(BilevelTrainerMixin.__init__).parameters
    assert set(settings) == {"steps", "truncate", "estimator", "iterations", "tolerance", "forget"}
    for name, field in settings.items():
        assert spec[name].type == field.type == constructor[name].annotation, name
        if name == "steps":  # required everywhere
            assert field.default is spec[name].default is dataclasses.MISSING
            assert constructor[name].default is core[name].default is inspect.Parameter.empty
        else:
            assert spec[name].default == field.default == constructor[name].default == core[name].default, name
    assert settings["tolerance"].default == 1e-10 and settings["estimator"].default == "reverse"


def test_the_estimator_settings_of_a_spec_are_its_fields_of_the_same_names():
    import keras

    from tf_bilevel.keras import compat
    from tf_bilevel.keras.estimator import EstimatorSettings
    from tf_bilevel.keras.spec import TrainerSpec

    loss = keras.losses.MeanSquaredError()
    chosen = dict(steps=4, truncate=2, estimator="neumann", iterations=7, tolerance=None, forget=0.5)
    spec = TrainerSpec(compat.KERAS3, keras.layers.Dense(1), inner_loss=loss, outer_loss=loss, **chosen)
    assert EstimatorSettings.of(spec) == EstimatorSettings(**chosen)
    default = TrainerSpec(compat.KERAS3, keras.layers.Dense(1), inner_loss=loss, outer_loss=loss, steps=3)
    assert EstimatorSettings.of(default) == EstimatorSettings(steps=3)


# -- Grouped convolutions keep TF's gradient under XLA (tf_bilevel/_tf_patches.py) ------------------

def _grouped_net(batch_shape: tuple):
    """A grouped-convolution net (4 input channels, 2 groups: the kernel has 2 input channels)
    with learned per-kernel decays: (params, inner loss, outer loss, x, y, log-decays)."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    params = [tf.constant(rng.normal(0, 0.4, s), tf.float32) for s in [(3, 3, 1, 4), (3, 3, 2, 6), (6, 3)]]
    x = tf.constant(rng.random(batch_shape + (8, 8, 1)), tf.float32)
    y = tf.constant(rng.integers(0, 3, batch_shape).astype("int32"))

    def loss(w, batch):
        h = tf.nn.relu(tf.nn.conv2d(batch[0], w[0], 1, "SAME"))
        h = tf.nn.softplus(tf.nn.conv2d(h, w[1], 2, "VALID"))  # grouped: 4 channels, kernel's 2
        logits = tf.reduce_mean(h, [1, 2]) @ w[2]
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(batch[1], logits))

    def inner(w, log_decay, batch):
        return loss(w, batch) + tf.add_n([tf.exp(log_decay[i]) * tf.reduce_sum(tf.square(v)) for i, v in enumerate(w)])

    outer = lambda w, hp, batch: loss(w, batch)  # noqa: E731
    return params, inner, outer, x, y, tf.constant(np.log([1e-2, 2e-2, 3e-2]), tf.float32)


def _grouped_krmd(jit_compile: bool):
    """K-RMD (T = 3, K = 2) of the grouped net, per-step batches."""
    import tf_bilevel as tfb

    params, inner, outer, x, y, log_decay = _grouped_net((3, 4))
    hg = tfb.hypergradient_fn(inner, outer, steps=3, truncate=2, learning_rate=0.3, per_step_batches=True,
                              jit_compile=jit_compile)
    return hg.detailed(params, log_decay, (x, y), (x[0], y[0]))


def test_krmd_of_a_grouped_convolution_under_xla_equals_the_graph_mode_result():
    """The canonical-layout Conv2D gradients are written for ungrouped convolutions: a grouped one
    keeps TF's gradient inside XLA's loops (the replacement's input gradient would have the
    kernel's 2 channels, not the input's 4: a shape error at trace)."""
    with_xla, without = _grouped_krmd(True), _grouped_krmd(False)
    assert np.abs(without.hypergrad.numpy()).min() > 0
    np.testing.assert_allclose(with_xla.hypergrad.numpy(), without.hypergrad.numpy(), rtol=2e-4, atol=1e-7)
    for got, want in zip(with_xla.final_params, without.final_params):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=2e-4, atol=1e-6)


def _grouped_forward(jit_compile: bool):
    """Forward mode (T = 2) of the grouped net."""
    import tf_bilevel as tfb

    params, inner, outer, x, y, log_decay = _grouped_net((4,))
    hg = tfb.hypergradient_fn(inner, outer, steps=2, estimator="forward", learning_rate=0.3, jit_compile=jit_compile)
    return hg.detailed(params, log_decay, (x, y), (x, y))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_forward_mode_refuses_a_grouped_convolution_by_name(jit_compile):
    # Forward mode's vectorized convolutions assume one group; TF's converter gave hypergradients
    # 1.5-1.9% off finite differences there: a clear error naming reverse mode, not a wrong number.
    with pytest.raises(ValueError, match=r"forward mode .* grouped convolutions .*groups=2.*estimator='reverse'"):
        _grouped_forward(jit_compile)


def test_forward_mode_refuses_by_name_where_its_pfor_converters_cannot_be_installed(monkeypatch):
    # TF's converters alone are wrong for a grouped convolution's filter gradient: where this TF's
    # pfor internals are not the expected ones, forward mode refuses at build; reverse mode runs.
    import tensorflow as tf
    from tensorflow.python.ops.parallel_for import pfor

    import tf_bilevel as tfb
    from tf_bilevel.estimators import _pfor, forward_hypergradient

    monkeypatch.delattr(pfor, "_pfor_converter_registry")
    monkeypatch.setattr(_pfor, "_installed", _pfor._installed.__wrapped__)  # uncached: tries again
    params, inner, outer, x, y, log_decay = _grouped_net((4,))
    fix = (rf"pfor\._pfor_converter_registry.*TensorFlow {re.escape(tf.__version__)}.*AttributeError.*"
           r"estimator='reverse', K-RMD.*TensorFlow version tf_bilevel supports")
    with pytest.raises(RuntimeError, match=fix):
        tfb.hypergradient_fn(inner, outer, steps=2, estimator="forward", learning_rate=0.3)
    with pytest.raises(RuntimeError, match=fix):  # the functional core's entry too
        forward_hypergradient(None, params, log_decay, (x, y), (x, y), steps=2)
    hg = tfb.hypergradient_fn(inner, outer, steps=2, estimator="reverse", learning_rate=0.3)
    assert np.all(np.isfinite(hg(params, log_decay, (x, y), (x, y))[1].numpy()))
