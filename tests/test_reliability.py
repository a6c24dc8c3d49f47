"""Issue #8 (library side): no silent wrong answers, NumPy scalars accepted, errors that name the
argument and the fix, and no AutoGraph noise for ordinary user lambdas."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tensorflow as tf

import keras

import tf_bilevel as tfb
from quadratic_problem import build, outer, start
from tf_bilevel.keras.losses import sparse_categorical_crossentropy as CE


# -- silent wrong answers: numbers validated at construction -------------------------------
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: build(learning_rate=-0.1), r"learning_rate must be > 0.*-0\.1"),
        (lambda: build(learning_rate=0.0), r"learning_rate must be > 0"),
        (lambda: build(learning_rate=float("nan")), r"learning_rate must be finite.*nan"),
        (lambda: build(learning_rate=float("inf")), r"learning_rate must be finite"),
        (lambda: build(learning_rate=np.float32(-0.5)), r"learning_rate must be > 0"),
        (lambda: build(learning_rate=tf.constant(-0.1)), r"learning_rate must be > 0"),
        (lambda: tfb.sgd(-0.1), r"sgd\(learning_rate=...\) must be > 0"),
        (lambda: tfb.sgd(float("nan")), r"sgd\(learning_rate=...\) must be finite"),
        (lambda: tfb.momentum(-0.1), r"momentum\(learning_rate=...\) must be > 0"),
        (lambda: tfb.momentum(0.1, beta=1.5), r"momentum\(beta=...\) must be in \[0, 1\).*1\.5"),
        (lambda: tfb.momentum(0.1, beta=1.0), r"momentum\(beta=...\) must be in \[0, 1\)"),
        (lambda: tfb.momentum(0.1, beta=-0.1), r"momentum\(beta=...\) must be in \[0, 1\)"),
        (lambda: tfb.adam(float("nan")), r"adam\(learning_rate=...\) must be finite"),
        (lambda: tfb.adam(0.1, b1=1.0), r"adam\(b1=...\) must be in \[0, 1\)"),
        (lambda: tfb.adam(0.1, b2=1.2), r"adam\(b2=...\) must be in \[0, 1\)"),
        (lambda: tfb.adam(0.1, b2=float("nan")), r"adam\(b2=...\) must be finite"),
        (lambda: tfb.adam(0.1, eps=-1e-8), r"adam\(eps=...\) must be >= 0"),
    ],
)
def test_meaningless_numbers_are_refused_at_construction(make, match):
    # ValueError, not tfb.NonFiniteError ("the inner loop diverged") at the first call.
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: build(learning_rate="0.1"), r"learning_rate must be a positive number, a schedule.*'0\.1'"),
        (lambda: build(learning_rate=True), r"learning_rate must be a positive number"),
        (lambda: tfb.sgd(None), r"sgd\(learning_rate=...\) must be a positive number.*None"),
        (lambda: tfb.adam([0.1]), r"adam\(learning_rate=...\) must be a positive number"),
        (lambda: tfb.momentum(0.1, beta="0.9"), r"momentum\(beta=...\) must be a real number"),
        (lambda: tfb.momentum(0.1, nesterov="yes"), r"momentum\(nesterov=...\) must be True or False"),
        (lambda: build(jit_compile="no"), r"jit_compile must be True or False, got 'no'"),
        (lambda: build(jit_compile=1), r"jit_compile must be True or False, got 1"),
        (lambda: build(check_numerics=None), r"check_numerics must be True or False"),
    ],
)
def test_arguments_of_the_wrong_type_are_type_errors_naming_them(make, match):
    with pytest.raises(TypeError, match=match):
        make()


def test_valid_edge_values_are_accepted():
    tfb.momentum(0.1, beta=0.0)
    tfb.adam(0.1, b1=0.0, b2=0.0, eps=0.0)
    build(jit_compile=np.bool_(False))


def test_variable_read_through_a_closure_is_an_error_on_a_later_call_too():
    """The loss reads `v` through a closure. A first call passes a constant (fine); a later call
    passes `v` itself as the hyperparameter: no retrace happens (same shapes), so a trace-time
    check alone would return a hypergradient missing the closure's path (exactly half here)."""
    v = tf.Variable([1.0, 2.0])

    def closure_inner(p, h):
        return tf.reduce_sum((p["w"] - h["target"]) ** 2) + tf.reduce_sum((p["w"] - v) ** 2)

    hg = build(inner_loss=closure_inner, outer_loss=outer)
    hg({"w": tf.constant([0.5, -0.5])}, {"target": tf.constant([1.0, 2.0])})
    with pytest.raises(ValueError, match=r"inner_loss reads the tf.Variable passed as hparams\['target'\] through a closure"):
        hg({"w": tf.constant([0.5, -0.5])}, {"target": v})
    assert hg.tracing_count == 1  # the check is not a retrace


def test_passed_variables_are_per_call_not_shared_across_calls_or_hypergradients():
    """Which variables a call passes is that call's own state. (It was once an attribute of the
    problem, reset by every eager call and read when tracing: `hg.compute` in a user's graph
    then checked against the variables of the last eager call, of any Hypergradient of the
    problem, and raised falsely or missed the error.) Two Hypergradients on one problem."""
    from tf_bilevel.api import Hypergradient
    from tf_bilevel.problem import BilevelProblem

    v = tf.Variable([1.0, 2.0])

    def closure_inner(p, h):
        return tf.reduce_sum((p["w"] - h["target"]) ** 2) + tf.reduce_sum((p["w"] - v) ** 2)

    problem = BilevelProblem(closure_inner, outer)
    settings = dict(steps=4, truncate=4, estimator="reverse", segment_length=None, jit_compile=False, check_numerics=True)
    eager_hg, graph_hg = Hypergradient(problem, tfb.sgd(0.1), **settings), Hypergradient(problem, tfb.sgd(0.1), **settings)
    params, constant = {"w": tf.constant([0.5, -0.5])}, {"target": tf.constant([1.0, 2.0])}
    message = r"inner_loss reads the tf.Variable passed as hparams\['target'\] through a closure"

    # An eager call passing v fails; a graph built afterwards that passes a constant does not.
    with pytest.raises(ValueError, match=message):
        eager_hg(params, {"target": v})
    in_graph = tf.function(lambda p, h: graph_hg.compute(p, h).hypergrad)(params, constant)
    np.testing.assert_allclose(in_graph["target"].numpy(), eager_hg(params, constant)[1]["target"].numpy(), rtol=1e-6)

    # An eager call passing a constant succeeds; a graph built afterwards that passes v fails.
    eager_hg(params, constant)
    with pytest.raises(ValueError, match=message):
        tf.function(lambda p, h: graph_hg.compute(p, h).hypergrad)(params, {"target": v})


def test_hyperparameter_that_does_not_survive_float32_is_refused():
    with pytest.raises(ValueError, match=r"does not survive float32.*becomes 1\.0.*in \(0, 1\).*dtype='float64'"):
        tfb.Hyperparameter(1 - 1e-9, transform="sigmoid")
    with pytest.raises(ValueError, match=r"does not survive float32.*becomes 2\.0"):
        tfb.Hyperparameter(2 - 1e-9, transform="sigmoid", bounds=(0.0, 2.0))
    with pytest.raises(ValueError, match=r"does not survive float32.*becomes 0\.0.*> 0"):
        tfb.Hyperparameter(1e-46, transform="softplus")
    hp = tfb.Hyperparameter(1 - 1e-9, transform="sigmoid", dtype="float64")  # representable there
    assert 0 < float(hp.value_from_raw(tf.constant(hp.raw_initial()))) < 1
    tfb.Hyperparameter(1 - 1e-6, transform="sigmoid")  # survives float32


# -- NumPy scalars ------------------------------------------------------------------------
def test_numpy_scalars_are_accepted_and_give_the_python_number_result():
    params, hparams = start()
    expected = build(steps=6, truncate=3, learning_rate=0.1)(params, hparams)
    for steps, truncate, lr in [(np.int64(6), np.int64(3), np.float64(0.1)), (np.int32(6), np.asarray(3), 0.1)]:
        value, grad = build(steps=steps, truncate=truncate, learning_rate=lr)(params, hparams)
        np.testing.assert_allclose(value.numpy(), expected[0].numpy(), rtol=1e-6)
        np.testing.assert_allclose(grad["target"].numpy(), expected[1]["target"].numpy(), rtol=1e-6)
    hg = build(steps=np.int64(6), estimator="checkpointed", segment_length=np.int64(2))
    assert isinstance(hg.steps, int) and isinstance(hg.segment_length, int)
    full = build(steps=6)(params, hparams)[1]
    np.testing.assert_allclose(hg(params, hparams)[1]["target"].numpy(), full["target"].numpy(), rtol=1e-6)
    value32, _ = build(learning_rate=np.float32(0.1))(params, hparams)
    np.testing.assert_allclose(value32.numpy(), build()(params, hparams)[0].numpy(), rtol=1e-6)


@pytest.mark.parametrize("bad", [np.bool_(True), True, np.float64(2.0), 2.5, np.int64(0), "3"])
def test_bools_floats_and_non_positive_counts_are_still_refused(bad):
    with pytest.raises(ValueError, match=r"steps must be a positive integer"):
        build(steps=bad)
    with pytest.raises(ValueError, match=r"truncate must be a positive integer"):
        build(steps=4, truncate=bad)


# -- errors that name the argument ---------------------------------------------------------
def test_loss_returning_none():
    with pytest.raises(TypeError, match=r"inner_loss returned None.*return"):
        build(inner_loss=lambda p, h: None)(*start())

    def forgot_return(p, h):
        outer(p, h)

    with pytest.raises(TypeError, match=r"outer_loss returned None"):
        build(outer_loss=forgot_return)(*start())


def test_none_leaf_in_params_or_hparams_is_named():
    params, hparams = start()
    with pytest.raises(ValueError, match=r"params\['bias'\] is None: every leaf of params"):
        build()({**params, "bias": None}, hparams)
    with pytest.raises(ValueError, match=r"hparams\['log_l2'\] is None: every leaf of hparams"):
        build()(params, {**hparams, "log_l2": None})
    with pytest.raises(TypeError, match=r"hparams\['target'\] cannot be converted to a tensor"):
        build()(params, {**hparams, "target": object()})


def test_batch_argument_mismatch_is_explained():
    def outer_with_batch(p, h, batch):
        return outer(p, h) * batch

    with pytest.raises(TypeError, match=r"outer_loss takes a batch argument .* no outer_batch was given.*hg\(params, hparams, inner_batch, outer_batch\)"):
        build(outer_loss=outer_with_batch)(*start())
    with pytest.raises(TypeError, match=r"inner_batch was given but inner_loss takes only \(params, hparams\)"):
        build()(*start(), tf.constant(1.0))
    value, _ = build(outer_loss=outer_with_batch)(*start(), None, tf.constant(2.0))  # the fix works
    np.testing.assert_allclose(value.numpy(), 2.0 * build()(*start())[0].numpy(), rtol=1e-6)


def test_one_arity_sniffer_for_losses_and_learning_rates():
    """tf_bilevel._signature decides whether a user function gets its optional argument (a
    loss's batch or hparams, a schedule's hparams): only when it requires it."""
    import functools

    from tf_bilevel._signature import Arity, positional_arity, requires

    class Schedule:
        def __call__(self, step, hparams):
            return 0.1

    @tf.function
    def traced_loss(y_true, y_pred, hparams):
        return y_pred

    assert positional_arity(lambda p, h, batch=None: 0.0) == Arity(2, 3)
    assert positional_arity(lambda *args: 0.0) == Arity(0, None)
    assert positional_arity(functools.partial(lambda a, b, c: 0.0, 1)) == Arity(2, 2)
    assert positional_arity(Schedule()) == Arity(2, 2)
    assert positional_arity(traced_loss) == Arity(3, 3)  # through the wrapped function
    assert positional_arity(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9)) == Arity(1, 1)
    assert positional_arity(len) == Arity(1, 1) and positional_arity(print) == Arity(0, None)
    assert requires(Schedule(), 2) and requires(traced_loss, 3)
    assert not requires(lambda *args: 0.0, 2)  # a forwarding wrapper gets the required ones only
    # The learning rate of the core: a (step, hparams) schedule learns γ from hparams.
    hg = build(learning_rate=lambda step, h: 0.1 * tf.exp(h["log_l2"] - h["log_l2"]))
    np.testing.assert_allclose(hg(*start())[0].numpy(), build()(*start())[0].numpy(), rtol=1e-6)


def test_outer_loss_not_depending_on_params_is_blamed_not_the_hyperparameter():
    with pytest.raises(ValueError, match=r"outer_loss does not depend on params or hparams \(does it return a constant\?\).*hparams\['log_l2'\], hparams\['target'\]"):
        build(outer_loss=lambda p, h: tf.constant(1.0))(*start())
    # f reads λ but not w: the hyperparameters used only by inner_loss cannot reach it.
    with pytest.raises(ValueError, match=r"outer_loss does not depend on params, so hparams\['target'\]"):
        build(outer_loss=lambda p, h: tf.exp(h["log_l2"]))(*start())


def test_reverse_truncate_larger_than_steps_is_still_an_error():
    with pytest.raises(ValueError, match=r"truncate=5 is larger than steps=4: K-RMD"):
        build(truncate=5)
    with pytest.raises(ValueError, match=r"truncate=5 is larger than steps=4"):
        build(truncate=5, estimator="checkpointed")


@pytest.mark.parametrize("estimator, iterations", [("implicit_cg", 20), ("neumann", 300)])
def test_implicit_iterations_are_not_bounded_by_steps(estimator, iterations):
    """g = ½wᵀAw − λᵀw, f = ½‖w − c‖²: Eq. 11 at w_T gives d_λ f = A⁻¹(w_T − c) exactly. With
    steps=3 and more CG iterations / Neumann terms than steps, the solve converges to it."""
    A = np.array([[2.0, 0.5, 0.0], [0.5, 1.5, 0.2], [0.0, 0.2, 1.0]])
    c = np.array([1.0, -1.0, 0.5])
    lam = np.array([0.3, 0.1, -0.2])
    gamma, steps = 0.3, 3
    w = np.zeros(3)
    for _ in range(steps):
        w = w - gamma * (A @ w - lam)
    expected = np.linalg.solve(A, w - c)

    A_t, c_t = tf.constant(A), tf.constant(c)
    hg = tfb.hypergradient_fn(
        lambda p, h: 0.5 * tf.tensordot(p, tf.linalg.matvec(A_t, p), 1) - tf.tensordot(h, p, 1),
        lambda p, h: 0.5 * tf.reduce_sum((p - c_t) ** 2),
        steps=steps, learning_rate=gamma, estimator=estimator, iterations=iterations, jit_compile=True,
    )
    _, grad = hg(tf.zeros(3, tf.float64), tf.constant(lam))
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-8, atol=1e-10)
    # One iteration is not enough: the iteration count is really what was asked for.
    short = tfb.hypergradient_fn(hg.problem.inner_loss, hg.problem.outer_loss, steps=steps, learning_rate=gamma,
                                 estimator=estimator, iterations=1, jit_compile=False)
    assert np.max(np.abs(short(tf.zeros(3, tf.float64), tf.constant(lam))[1].numpy() - expected)) > 1e-3


# -- AutoGraph noise -------------------------------------------------------------------------
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def tf_warnings():
    handler = _Records()
    logger = tf.get_logger()
    level = logger.level  # conftest sets ERROR: AutoGraph warns at WARNING
    logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(level)


def _unparsable_lambda(source: str):
    """A lambda whose source AutoGraph cannot read: defined in `python - <<EOF` (or a REPL), its
    file is "<stdin>", where AutoGraph finds no matching source."""
    namespace = {"__name__": "__main__", "tf": tf, "CE": CE}
    exec(compile(f"fn = {source}", "<stdin>", "exec"), namespace)  # noqa: S102 - a fixed test string
    return namespace["fn"]


def test_no_autograph_warning_for_a_lambda_in_hypergradient_fn(tf_warnings):
    g = _unparsable_lambda("lambda p, h: tf.reduce_sum((p - h) ** 2)")
    f = _unparsable_lambda("lambda p, h: tf.reduce_sum(p ** 2)")
    lr = _unparsable_lambda("lambda step: 0.1")
    value, grad = tfb.hypergradient_fn(g, f, steps=2, learning_rate=lr, jit_compile=False)(tf.ones([2]), tf.ones([2]))
    # w_2 = h + 0.8² (w0 − h) = h at w0 = h = 1: f = 2, d f / d h = 2 w_2 (1 − 0.64) = 0.72.
    np.testing.assert_allclose(grad.numpy(), [0.72, 0.72], rtol=1e-6)
    assert not [m for m in tf_warnings if "AutoGraph" in m], tf_warnings


def test_no_autograph_warning_for_a_lambda_loss_in_the_trainer(tf_warnings):
    keras.utils.set_random_seed(0)
    x = tf.random.stateless_normal([8, 3], seed=[1, 2])
    y = tf.constant([0, 1] * 4)
    tasks = tf.data.Dataset.from_tensors(((x, y), (x, y))).repeat()
    trainer = tfb.BilevelTrainer(
        keras.Sequential([keras.layers.Dense(2)]),
        inner_loss=_unparsable_lambda('lambda y, p, hp: hp["a"] * CE(y, p)'),
        outer_loss=_unparsable_lambda("lambda y, p: CE(y, p)"),
        inner_regularizer=_unparsable_lambda('lambda w, hp: 0.01 * hp["a"] * tf.reduce_sum(w[0] ** 2)'),
        steps=2, hyperparameters={"a": 1.0},
    )
    trainer.compile(optimizer=keras.optimizers.SGD(0.1))
    trainer.fit(tasks, epochs=1, steps_per_epoch=1, verbose=0)
    assert not [m for m in tf_warnings if "AutoGraph" in m], tf_warnings


# -- the Keras trainer -------------------------------------------------------------------------
def _tasks(n_inner=8, n_outer=8):
    x = tf.random.stateless_normal([max(n_inner, n_outer), 3], seed=[3, 4])
    y = tf.constant([0, 1] * (max(n_inner, n_outer) // 2))
    return tf.data.Dataset.from_tensors(((x[:n_inner], y[:n_inner]), (x[:n_outer], y[:n_outer]))).repeat()


def _fit_one_step(**kwargs):
    keras.utils.set_random_seed(0)
    kwargs.setdefault("inner_loss", lambda y, p, hp: hp["a"] * CE(y, p))
    trainer = tfb.BilevelTrainer(kwargs.pop("inner_model", keras.Sequential([keras.layers.Dense(2)])),
                                 outer_loss=CE, hyperparameters={"a": 1.0}, **kwargs)
    trainer.compile(optimizer=keras.optimizers.SGD(0.5))
    trainer.fit(_tasks(), epochs=1, steps_per_epoch=1, verbose=0)
    return trainer


def test_trainer_accepts_numpy_steps_truncate_and_learning_rate():
    reference = _fit_one_step(steps=3, truncate=2, inner_learning_rate=0.25)
    trainer = _fit_one_step(steps=np.int64(3), truncate=np.int64(2), inner_learning_rate=np.float32(0.25))
    np.testing.assert_allclose(
        trainer.hyperparameter_values()["a"].numpy(), reference.hyperparameter_values()["a"].numpy(), rtol=1e-6
    )
    assert trainer.hyperparameter_values()["a"].numpy() != 1.0  # it did learn


@pytest.mark.parametrize("bad, error, match", [
    (float("nan"), ValueError, r"inner_learning_rate must be finite"),
    (np.float32(-0.1), ValueError, r"inner_learning_rate must be > 0"),
    ("0.1", TypeError, r"inner_learning_rate must be a positive number"),
])
def test_trainer_refuses_a_meaningless_inner_learning_rate(bad, error, match):
    with pytest.raises(error, match=match):
        tfb.BilevelTrainer(keras.Sequential([keras.layers.Dense(2)]), inner_loss=CE, outer_loss=CE, steps=2,
                           hyperparameters={"a": 1.0}, inner_learning_rate=bad)


def test_trainer_proximal_strength_accepts_numpy_and_refuses_nan():
    kwargs = dict(inner_loss=CE, outer_loss=CE, steps=2)
    tfb.BilevelTrainer(keras.Sequential([keras.layers.Dense(2)]), proximal_strength=np.float32(0.5), **kwargs)
    with pytest.raises(ValueError, match=r"proximal_strength must be a positive number"):
        tfb.BilevelTrainer(keras.Sequential([keras.layers.Dense(2)]), proximal_strength=float("nan"), **kwargs)


def test_meta_batch_on_unbatched_tasks_suggests_batching():
    trainer = tfb.BilevelTrainer(keras.Sequential([keras.layers.Dense(2)]), inner_loss=CE, outer_loss=CE, steps=2,
                                 hyperparameters={"a": 1.0}, meta_batch=True)
    trainer.compile(optimizer="sgd")
    for data in (_tasks(), _tasks(n_inner=4, n_outer=8)):  # same and different set sizes
        with pytest.raises(ValueError, match=r"meta_batch=True but y_inner has shape \[\d\].*\.batch\(4"):
            trainer.fit(data, epochs=1, steps_per_epoch=1, verbose=0)


def test_hyper_model_output_not_fitting_the_inner_model_names_both_shapes():
    inner_model = keras.Sequential([keras.Input([5]), keras.layers.Dense(2)], name="head")
    hyper = keras.Sequential([keras.layers.Dense(4)], name="features")
    trainer = tfb.BilevelTrainer(inner_model, hyper_model=hyper, inner_loss=CE, outer_loss=CE, steps=2)
    trainer.compile(optimizer="sgd")
    with pytest.raises(ValueError, match=r"hyper_model 'features' outputs shape \[8, 4\].*inner_model 'head' expects inputs of shape \[None, 5\]"):
        trainer.fit(_tasks(), epochs=1, steps_per_epoch=1, verbose=0)
