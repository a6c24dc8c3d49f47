"""Bad input gets a clear error that names the argument (and NaN/Inf names the inner step)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import tf_bilevel as tfb
from quadratic_problem import build, inner, outer, start


# -- arguments of hypergradient_fn (checked before anything is traced) ---------------------
def _case_id(kwargs: dict) -> str:
    # Stable across processes (pytest-xdist compares ids): no object addresses.
    def show(value):
        return f"<{value.update.__qualname__.split('.')[0]}>" if isinstance(value, tfb.InnerOptimizer) else repr(value)

    return ",".join(f"{key}={show(value)}" for key, value in kwargs.items())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"truncate": 0}, ValueError, r"truncate must be a positive integer"),
        ({"truncate": -2}, ValueError, r"truncate must be a positive integer"),
        ({"truncate": 5, "steps": 4}, ValueError, r"truncate=5 is larger than steps=4"),
        ({"truncate": 2.0}, ValueError, r"truncate must be a positive integer"),
        ({"steps": 0}, ValueError, r"steps must be a positive integer"),
        ({"steps": 1.5}, ValueError, r"steps must be a positive integer.*1\.5"),
        ({"steps": True}, ValueError, r"steps must be a positive integer"),
        ({"estimator": "bogus"}, ValueError, r"estimator must be one of .*'bogus'"),
        ({"learning_rate": 0.1, "inner_optimizer": tfb.sgd(0.1)}, ValueError, r"exactly one of learning_rate=.*inner_optimizer="),
        ({"learning_rate": None}, ValueError, r"exactly one of learning_rate=.*inner_optimizer="),
        ({"inner_optimizer": "adam"}, TypeError, r"inner_optimizer must be a tf_bilevel.InnerOptimizer"),
        ({"estimator": "neumann", "inner_optimizer": tfb.adam(0.1)}, ValueError, r"estimator='neumann'.*learning_rate="),
        ({"estimator": "neumann", "inner_optimizer": tfb.momentum(0.1)}, ValueError, r"estimator='neumann'"),
        ({"estimator": "forward", "truncate": 2}, ValueError, r"estimator='forward'.*truncate=None"),
        ({"segment_length": 2}, ValueError, r"segment_length only applies to estimator='checkpointed'"),
        ({"estimator": "checkpointed", "segment_length": 0}, ValueError, r"segment_length must be a positive"),
        # The old name of segment_length: an error naming the new one, not a silent alias.
        ({"estimator": "checkpointed", "checkpoint_every": 2}, TypeError, r"'checkpoint_every', which was renamed 'segment_length'.*segment_length=2"),
        ({"segment_lenght": 2}, TypeError, r"unexpected keyword argument 'segment_lenght'"),
        ({"init_params": 3.0}, TypeError, r"init_params must be a callable"),
        ({"memory_budget": -1}, ValueError, r"memory_budget must be an integer >= 0 \(bytes"),
        ({"memory_budget": True}, ValueError, r"memory_budget must be an integer >= 0"),
        ({"estimator": "implicit_cg", "tolerance": 1.0}, ValueError, r"tolerance must be in \[0, 1\) \(a relative residual"),
        ({"estimator": "implicit_cg", "tolerance": float("nan")}, ValueError, r"tolerance must be finite"),
        ({"estimator": "implicit_cg", "tolerance": "1e-6"}, TypeError, r"tolerance must be a real number"),
    ],
    ids=lambda x: _case_id(x) if isinstance(x, dict) else "",
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        build(**kwargs)


def test_adam_rejects_eps_root_zero():
    with pytest.raises(ValueError, match=r"eps_root"):
        tfb.adam(0.1, eps_root=0.0)


def test_losses_must_be_callable():
    with pytest.raises(TypeError, match=r"inner_loss must be a callable"):
        build(inner_loss="g")
    with pytest.raises(TypeError, match=r"outer_loss must be a callable"):
        build(outer_loss=None)


# -- mistakes found when the losses are traced ----------------------------------------------
def test_inner_loss_returning_a_vector():
    hg = build(inner_loss=lambda p, h: (p["w"] - h["target"]) ** 2 + h["log_l2"])
    with pytest.raises(ValueError, match=r"inner_loss must return a scalar, got shape \(2,\)"):
        hg(*start())


def test_outer_loss_returning_a_non_scalar():
    hg = build(outer_loss=lambda p, h: tf.reshape(p["w"], [1, 2]))
    with pytest.raises(ValueError, match=r"outer_loss must return a scalar, got shape \(1, 2\)"):
        hg(*start())


def test_int_dtype_hparam():
    params, hparams = start()
    hparams["steps_hint"] = tf.constant(3)
    hg = build(outer_loss=lambda p, h: outer(p, h) + tf.cast(h["steps_hint"], tf.float32))
    with pytest.raises(TypeError, match=r"hparams\['steps_hint'\] has dtype int32"):
        hg(params, hparams)


def test_non_trainable_variable_hparam():
    params, hparams = start()
    hparams["log_l2"] = tf.Variable(-1.0, trainable=False)
    with pytest.raises(ValueError, match=r"hparams\['log_l2'\] is a non-trainable tf.Variable"):
        build()(params, hparams)


def test_hparam_not_reached_by_any_loss():
    params, hparams = start()
    hparams["unused"] = tf.constant([0.3])
    with pytest.raises(ValueError, match=r"hparams\['unused'\] not reached by the losses"):
        build()(params, hparams)


def test_the_reachability_probe_is_skipped_only_when_asked():
    """`compute(check_reached=False)` (a second estimator of an already probed problem, e.g. the
    trainer's full-RMD reference) does not probe: the unreached leaf's hypergradient is then zero."""
    params, hparams = start()
    hparams["unused"] = tf.constant([0.3])
    hg = build()
    probed = tf.function(lambda: hg.compute(params, hparams), autograph=False)
    unprobed = tf.function(lambda: hg.compute(params, hparams, check_reached=False), autograph=False)
    with pytest.raises(ValueError, match=r"hparams\[.unused.\] not reached by the losses"):
        probed()
    hypergrad = unprobed().hypergrad
    np.testing.assert_array_equal(hypergrad["unused"], [0.0])
    assert np.abs(hypergrad["target"]).max() > 0


@pytest.mark.parametrize("role", ["inner_loss", "outer_loss"])
def test_loss_reading_a_passed_variable_through_a_closure(role):
    params, hparams = start()
    log_l2 = tf.Variable(-1.0)
    hparams["log_l2"] = log_l2

    def closure_loss(p, h):  # uses the variable, not h["log_l2"]
        base = inner(p, {"target": h["target"], "log_l2": h["log_l2"]}) if role == "inner_loss" else outer(p, h)
        return base + 0.1 * log_l2

    hg = build(**{role: closure_loss})
    with pytest.raises(ValueError, match=rf"{role} reads the tf.Variable passed as hparams\['log_l2'\] through a closure"):
        hg(params, hparams)


@pytest.mark.parametrize("role", ["inner_loss", "outer_loss"])
def test_passed_variable_read_only_through_a_closure_is_named_as_such(role):
    """Read only through the closure, the leaf gets no gradient through `hparams`: the error
    says where it is read (not "not reached ... use it"), and how to read it instead."""
    params, hparams = start()
    t = tf.Variable(0.5)
    hparams["t"] = t

    def closure_loss(p, h):  # never reads h["t"]
        return (inner(p, h) if role == "inner_loss" else outer(p, h)) + 0.1 * t

    with pytest.raises(ValueError) as caught:
        build(**{role: closure_loss})(params, hparams)
    message = str(caught.value)
    assert message.startswith(f"{role} reads the tf.Variable passed as hparams['t'] through a closure"), message
    assert "Read it from the `hparams` argument instead of the closure" in message
    assert "not reached" not in message
    # A leaf that no function reads at all keeps the other message.
    params, hparams = start()
    hparams["t"] = tf.Variable(0.5)
    with pytest.raises(ValueError, match=r"hparams\['t'\] not reached by the losses.*Use it in one of them") as caught:
        build()(params, hparams)
    assert "closure" not in str(caught.value)


def test_loss_assigning_a_variable_inside_the_inner_loop():
    weights = tf.Variable([0.0, 0.0])

    def stateful_inner(p, h):
        weights.assign(p["w"])
        return inner(p, h)

    with pytest.raises(ValueError, match=r"inner_loss assigns to a tf.Variable"):
        build(inner_loss=stateful_inner)(*start())


def test_init_params_returning_a_wrong_shape():
    hg = build(init_params=lambda p, h: {"w": tf.zeros([3])})
    with pytest.raises(ValueError, match=r"init_params returned shape \(3,\) for params\['w'\], which has shape \(2,\)"):
        hg(*start())


def test_init_params_returning_a_wrong_structure():
    hg = build(init_params=lambda p, h: [p["w"]])
    with pytest.raises(ValueError, match=r"init_params must return the structure of params"):
        hg(*start())


def test_inner_loss_not_depending_on_params():
    hg = build(inner_loss=lambda p, h: tf.reduce_sum(h["target"] ** 2) + h["log_l2"])
    with pytest.raises(ValueError, match=r"inner_loss does not depend on params"):
        hg(*start())


def test_empty_hparams():
    with pytest.raises(ValueError, match=r"hparams is empty"):
        build()(start()[0], {})


# -- NaN / Inf --------------------------------------------------------------------------
OVERFLOW_RATIO = -999.0  # w_{t+1} = (1 − 2γc) w_t with γ = 500, c = 1


def _first_overflow_step(steps: int) -> int:
    """The first t with g(w_t) = c w_t² > float32 max, for w_t = r^t, c = 1 (in logs)."""
    for t in range(steps):
        if 2 * t * np.log(abs(OVERFLOW_RATIO)) > np.log(np.finfo(np.float32).max):
            return t
    raise AssertionError("no overflow")


def _overflow_problem():
    def quadratic(p, h):
        return h["c"] * tf.reduce_sum(p["w"] ** 2)

    params = {"w": tf.constant([1.0])}
    hparams = {"c": tf.constant(1.0)}
    return quadratic, params, hparams


@pytest.mark.parametrize("estimator", ["reverse", "checkpointed", "forward", "implicit_cg"])
def test_inner_overflow_names_the_exact_step(estimator):
    expected = _first_overflow_step(20)
    assert expected == 7  # 999^12 ≈ 1e36 is finite in float32, 999^14 ≈ 1e42 is not
    g, params, hparams = _overflow_problem()
    hg = build(inner_loss=g, outer_loss=g, steps=20, learning_rate=500.0, estimator=estimator)
    with pytest.raises(tfb.NonFiniteError, match=rf"inner_loss became non-finite \(NaN/Inf\) at inner step {expected} of steps=20"):
        hg(params, hparams)


@pytest.mark.parametrize(
    "nan_step, truncate, estimator",
    [(2, None, "reverse"), (2, 3, "reverse"), (8, 3, "reverse"), (5, None, "checkpointed"), (5, None, "forward"), (5, None, "neumann")],
)
def test_nan_learning_rate_names_the_exact_step(nan_step, truncate, estimator):
    """γ_t = NaN at step s makes w_{s+1}, hence g(w_{s+1}), NaN: the error must say step s + 1
    (both in the untaped first T − K steps and in the taped last K)."""
    steps = 10

    def schedule(step):
        return tf.where(tf.equal(step, nan_step), tf.constant(np.nan, tf.float32), tf.constant(0.1, tf.float32))

    hg = build(steps=steps, learning_rate=schedule, truncate=truncate, estimator=estimator)
    with pytest.raises(tfb.NonFiniteError, match=rf"at inner step {nan_step + 1} of steps={steps}"):
        hg(*start())


def test_outer_loss_nan():
    hg = build(outer_loss=lambda p, h: tf.math.log(tf.reduce_sum(p["w"]) - 100.0))
    with pytest.raises(tfb.NonFiniteError, match=r"outer_loss is non-finite \(NaN/Inf\) at w_T \(after steps=4\)"):
        hg(*start())


def test_check_numerics_false_returns_nan_without_raising():
    g, params, hparams = _overflow_problem()
    hg = build(inner_loss=g, outer_loss=g, steps=20, learning_rate=500.0, check_numerics=False)
    value, hypergrad = hg(params, hparams)
    assert not np.isfinite(float(value))
    assert np.all(np.isnan(hypergrad["c"].numpy()))
    result = hg.detailed(params, hparams)
    assert int(result.nonfinite_step) == _first_overflow_step(20)


def test_nonfinite_check_inside_a_user_graph():
    """Called from a user's tf.function, the check becomes a graph assertion."""
    g, params, hparams = _overflow_problem()
    hg = build(inner_loss=g, outer_loss=g, steps=20, learning_rate=500.0)

    @tf.function
    def user_step(params, hparams):
        return hg.detailed(params, hparams).hypergrad

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"non-finite value in the bilevel computation"):
        user_step(params, hparams)


@pytest.mark.parametrize("kwargs, match", [
    ({"target": 0}, r"Progress\(target=\.\.\.\) must be a positive integer \(the steps at the end"),
    ({"target": True}, r"Progress\(target=\.\.\.\) must be a positive integer"),
    ({"target": 10, "initial": 11}, r"Progress\(initial=\.\.\.\) must be an integer in \[0, 11\)"),
    ({"target": 10, "initial": -1}, r"Progress\(initial=\.\.\.\) must be an integer in \[0, 11\)"),
])
def test_bad_progress_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tfb.Progress(**kwargs)
