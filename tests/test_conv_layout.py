"""Conv2D's gradients as Conv2D ops in XLA:CPU's canonical layout (tf_bilevel/_conv_layout.py),
as K-RMD uses them under XLA (tf_bilevel/_tf_patches.py, `canonical_conv_gradients`).

The replacements are checked against TF's own gradient ops on CPU without XLA, their second
derivatives too (K-RMD differentiates the inner gradient); a K-RMD hypergradient under XLA
against the non-XLA path, its optimized HLO for the layout, and full RMD against central
finite differences of the outer loss (float64)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tensorflow as tf

import tf_bilevel as tfb
from tf_bilevel import _conv_layout

CASES = [  # (H, W, kh, kw, stride, padding)
    (9, 8, 3, 3, 1, "VALID"),
    (9, 8, 3, 2, 2, "SAME"),
    (10, 7, 3, 3, 2, "VALID"),
    (7, 7, 5, 5, 3, "SAME"),
    (6, 6, 3, 3, 1, [[0, 0], [1, 2], [0, 1], [0, 0]]),
    (3, 4, 3, 3, 1, "VALID"),  # dy smaller than the kernel: the input gradient's swapped form
    (5, 5, 4, 4, 2, "SAME"),
]


@pytest.mark.parametrize("h, w, kh, kw, stride, padding", CASES)
def test_gradients_and_their_gradients_equal_tfs_own(h, w, kh, kw, stride, padding):
    rng = np.random.default_rng(h * kh + stride)
    x = tf.constant(rng.normal(size=(2, h, w, 3)))
    k = tf.constant(rng.normal(size=(kh, kw, 3, 4)))
    dy = tf.constant(rng.normal(size=tf.nn.conv2d(x, k, stride, padding).shape))
    u, v = tf.constant(rng.normal(size=x.shape)), tf.constant(rng.normal(size=k.shape))

    @tf.function(autograph=False)
    def both(x, k, dy):
        """(dx, dk) and the gradient of <dx, u> + <dk, v> with respect to (x, k, dy), once
        with the replacements and once with TF's Conv2DBackpropInput/Filter."""
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([x, k, dy])
            y = tf.nn.conv2d(x, k, stride, padding)
            ours = (_conv_layout.input_gradient_as_conv2d(x, k, dy, y.op),
                    _conv_layout.filter_gradient_as_conv2d(x, dy, k.shape[:2], y.op))
            theirs = tape.gradient(y, [x, k], output_gradients=dy)
            pair = [tf.reduce_sum(dx * u) + tf.reduce_sum(dk * v) for dx, dk in (ours, theirs)]
        return ours, theirs, [tape.gradient(p, [x, k, dy]) for p in pair]

    ours, theirs, (second_ours, second_theirs) = both(x, k, dy)
    for got, want in zip(list(ours) + second_ours, list(theirs) + second_theirs):
        assert want is not None and got is not None
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-10)


def test_unsupported_convolutions_are_left_to_tf():
    x, k = tf.zeros([1, 8, 8, 2]), tf.zeros([3, 3, 2, 2])

    @tf.function(autograph=False)
    def replaced():
        y = tf.nn.conv2d(x, k, 1, "VALID", dilations=2)
        return (_conv_layout.input_gradient_as_conv2d(x, k, y, y.op),
                _conv_layout.filter_gradient_as_conv2d(x, y, k.shape[:2], y.op))

    assert replaced() == (None, None)


# -- K-RMD under XLA -------------------------------------------------------------------------------
SIZE, BATCH, T = 9, 3, 3


def _params(dtype) -> list:
    rng = np.random.default_rng(0)
    shapes = [(3, 3, 1, 4), (3, 3, 4, 6), (6, 5)]  # conv VALID; conv stride 2 SAME; dense
    return [tf.constant(rng.normal(0, 0.4, s), dtype) for s in shapes]


def _logits(params, x):
    k1, k2, k3 = params
    h = tf.nn.relu(tf.nn.conv2d(x, k1, 1, "VALID"))  # [B, 7, 7, 4]
    h = tf.nn.softplus(tf.nn.conv2d(h, k2, 2, "SAME"))  # [B, 4, 4, 6]
    return tf.reduce_mean(h, [1, 2]) @ k3


def _loss(params, batch):
    x, y = batch
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, _logits(params, x)))


def _inner(params, hp, batch):
    decays = tf.exp(hp["log_decay"])
    return _loss(params, batch) + tf.add_n([decays[i] * tf.reduce_sum(tf.square(w)) for i, w in enumerate(params)])


def _problem(dtype, **kwargs):
    rng = np.random.default_rng(1)
    x = tf.constant(rng.random((T, BATCH, SIZE, SIZE, 1)), dtype)
    y = tf.constant(rng.integers(0, 5, (T, BATCH)).astype("int32"))
    hp = {"log_decay": tf.constant(np.log([1e-2, 2e-2, 3e-2]), dtype), "log_lr": tf.constant(np.log(0.3), dtype)}
    make = lambda jit: tfb.hypergradient_fn(  # noqa: E731
        _inner, lambda w, hp, batch: _loss(w, batch), steps=T, inner_optimizer=tfb.momentum(
            lambda step, hp: tf.exp(hp["log_lr"]), 0.5),
        per_step_batches=True, jit_compile=jit, **kwargs)
    return make, (_params(dtype), hp, (x, y), (x[0], y[0]))


def _conv_labels(hg, args) -> list:
    hlo = hg._compiled.experimental_get_compiler_ir(*args, opt_state=None, model_state=None, tangents=None,
                                              check_reached=True)(
        stage="optimized_hlo")
    return re.findall(r"dim_labels=([^,\s]+)", hlo)


@pytest.mark.parametrize("backward", ["recompute", "store"])
def test_krmd_under_xla_matches_graph_mode_with_every_convolution_in_the_canonical_layout(backward):
    """T = 3, K = 2 (a while loop of inner steps and K-RMD's backward loop): hypergradient and
    w_T of the non-XLA run, and every convolution in the optimized HLO in XLA:CPU's fast NHWC
    form (`b01f_01io->b01f`). TF's own gradient ops are lowered to `f01b_i01o->01bf` (filter)
    and `b01f_01oi->b01f` (input), which XLA:CPU makes fast only outside loops."""
    make, args = _problem(tf.float32, truncate=2, backward=backward)
    results = {jit: make(jit).detailed(*args) for jit in (False, True)}
    for got, want in zip(tf.nest.flatten((results[True].hypergrad, results[True].final_params)),
                         tf.nest.flatten((results[False].hypergrad, results[False].final_params))):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=2e-4, atol=1e-6)
    hg = make(True)
    hg.detailed(*args)
    assert hg.backward_used == backward
    labels = _conv_labels(hg, args)
    assert len(labels) >= 3 * 4 and all(label == "b01f_01io->b01f" for label in labels), labels


def test_full_rmd_under_xla_matches_central_finite_differences():
    """d f(w_T(λ)) / dλ by full RMD under XLA (float64) against central differences of f."""
    make, (params, hp, inner, outer) = _problem(tf.float64)
    hg = make(True)
    value, grad = hg(params, hp, inner, outer)
    flat_hp = tf.concat([tf.reshape(v, [-1]) for v in tf.nest.flatten(hp)], 0).numpy()
    flat_grad = np.concatenate([np.ravel(g) for g in tf.nest.flatten(grad)])
    solve = make(False)

    def f(flat):
        point = tf.nest.pack_sequence_as(hp, [tf.constant(flat[:3]), tf.constant(flat[3])])
        return float(solve(params, point, inner, outer)[0])

    eps = 1e-5
    numeric = [(f(flat_hp + eps * e) - f(flat_hp - eps * e)) / (2 * eps) for e in np.eye(flat_hp.size)]
    assert np.abs(flat_grad).min() > 1e-6
    np.testing.assert_allclose(flat_grad, numeric, rtol=1e-6, atol=1e-10)
    assert all(label == "b01f_01io->b01f" for label in _conv_labels(hg, (params, hp, inner, outer)))


def test_the_convolutions_built_here_are_one_group_with_an_unknown_batch():
    """With the batch unknown the Conv2D ops built here (batch on a channel axis) read channels
    (None, None) but are marked one group; a user's convolution with unknown channels is not."""
    seen = {}

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3]), tf.TensorSpec([3, 3, 3, 4]),
                                  tf.TensorSpec([None, 8, 8, None]), tf.TensorSpec([3, 3, 2, 4])])
    def build(x, k, unknown_channels, grouped_k):
        y = tf.nn.conv2d(x, k, 1, "SAME")
        dy = tf.ones_like(y)
        dk = _conv_layout.filter_gradient_as_conv2d(x, dy, [3, 3], y.op)
        dx = _conv_layout.input_gradient_as_conv2d(x, k, dy, y.op)
        convs = lambda t: [op for op in t.graph.get_operations() if op.type == "Conv2D" and op is not y.op]  # noqa: E731
        seen["built"] = convs(y)
        seen["user"] = tf.nn.conv2d(unknown_channels, grouped_k, 1, "SAME").op
        return dk, dx

    build.get_concrete_function()
    built = seen["built"]
    assert len(built) == 2 and all(_conv_layout.one_group(op) for op in built)
    assert (None, None) in [_conv_layout.channels(op) for op in built]  # the filter gradient's: batch as channels
    assert _conv_layout.channels(seen["user"]) == (None, 2) and not _conv_layout.one_group(seen["user"])


def test_tfs_gradient_ops_of_the_convolutions_built_here_are_one_group_too(monkeypatch):
    """GradientTape passes Conv2D's gradient function a mock op holding only the inputs: the mark
    (the second operand built in `one_group_scope()`) still reaches it, so TF's gradient ops of the
    filter gradient's Conv2D (channels (None, None) with the batch unknown) are one group; those of
    a user's convolution with unknown channels are not."""
    from tf_bilevel import _tf_patches

    passed = []
    monkeypatch.setattr(_tf_patches, "one_group",
                        lambda op: passed.append(type(op).__name__) or _conv_layout.one_group(op))
    seen = {}

    def gradient_ops(graph, compute):
        first = len(graph.get_operations())
        compute()
        return [op for op in graph.get_operations()[first:] if op.type.startswith("Conv2DBackprop")]

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3]), tf.TensorSpec([3, 3, 3, 4]),
                                  tf.TensorSpec([None, 8, 8, None]), tf.TensorSpec([3, 3, 2, 4])])
    def build(x, k, unknown_channels, grouped_k):
        y = tf.nn.conv2d(x, k, 1, "SAME")
        with _tf_patches.canonical_conv_gradients():  # outside a compiled loop: TF's gradient ops
            with tf.GradientTape(persistent=True) as tape:
                tape.watch([x, unknown_channels])
                dk = _conv_layout.filter_gradient_as_conv2d(x, tf.ones_like(y), [3, 3], y.op)
                user = tf.nn.conv2d(unknown_channels, grouped_k, 1, "SAME")
            seen["ours"] = gradient_ops(x.graph, lambda: tape.gradient(dk, x))
            seen["user"] = gradient_ops(x.graph, lambda: tape.gradient(user, unknown_channels))
        return dk

    build.get_concrete_function()
    assert passed == ["_MockOp", "_MockOp"]
    assert sorted(op.type for op in seen["ours"]) == ["Conv2DBackpropFilter", "Conv2DBackpropInput"]
    assert all(_conv_layout.channels(op) == (None, None) and _conv_layout.one_group(op) for op in seen["ours"])
    assert seen["user"] and not any(_conv_layout.one_group(op) for op in seen["user"])


def test_tfs_gradient_ops_of_the_convolutions_built_here_are_one_group_in_a_while_loops_gradient(monkeypatch):
    """In a while loop's gradient the gradient function sees the conv's filter as an accumulator's
    pop (TensorListPopBack), not as the op built in `one_group_scope()`: the gradient ops are
    still one group, by their own names (channels (None, None): the batch is unknown)."""
    from tf_bilevel import _tf_patches

    built = []
    tf_gradient = _tf_patches._conv2d_gradient

    def recording(op, dy):
        grads = tf_gradient(op, dy)
        built.extend(g.op for g in grads if isinstance(g.graph, _tf_patches._LOOP_GRAPHS))
        return grads

    monkeypatch.setattr(_tf_patches, "_conv2d_gradient", recording)

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3])])
    def build(x):
        y = tf.nn.conv2d(x, tf.ones([3, 3, 3, 4]), 1, "SAME")
        with _tf_patches.canonical_conv_gradients():  # no XLA: TF's gradient ops
            with tf.GradientTape() as tape:
                tape.watch(x)

                def body(i, total):
                    return i + 1, total + _conv_layout.filter_gradient_as_conv2d(x, y, [3, 3], y.op)

                _, out = tf.while_loop(lambda i, _: i < 2, body, [0, tf.zeros([3, 3, 3, 4])])
            return tape.gradient(out, x)

    build.get_concrete_function()
    assert sorted(op.type for op in built) == ["Conv2DBackpropFilter", "Conv2DBackpropInput"]
    assert all(_conv_layout.channels(op) == (None, None) and _conv_layout.one_group(op) for op in built)


def test_tfs_gradient_op_is_one_group_where_the_canonical_one_declines(monkeypatch):
    """Under XLA in a loop's gradient, where the filter gradient is not replaced (here forced),
    TF's Conv2DBackpropFilter of a convolution built here is still one group (channels (None, None))."""
    from tf_bilevel import _tf_patches

    built = []
    replaced = _tf_patches._conv2d_gradient

    def recording(op, dy):
        grads = replaced(op, dy)
        built.extend(g.op for g in grads if g.op.type.startswith("Conv2DBackprop"))
        return grads

    monkeypatch.setattr(_tf_patches, "_conv2d_gradient", recording)
    monkeypatch.setattr(_tf_patches, "filter_gradient_as_conv2d", lambda *args: None)

    @tf.function(jit_compile=True, input_signature=[tf.TensorSpec([None, 8, 8, 3])])
    def build(x):  # traced only: the XLA context is set while tracing
        y = tf.nn.conv2d(x, tf.ones([3, 3, 3, 4]), 1, "SAME")
        with _tf_patches.canonical_conv_gradients():
            with tf.GradientTape() as tape:
                tape.watch(x)

                def body(i, total):
                    return i + 1, total + _conv_layout.filter_gradient_as_conv2d(x, y, [3, 3], y.op)

                loop = tf.while_loop(lambda i, _: i < 2, body, [0, tf.zeros([3, 3, 3, 4])], maximum_iterations=2)
            return tape.gradient(loop[1], x)  # the loop's gradient: tf.gradients' names, not the tape's

    build.get_concrete_function()
    assert [op.type for op in built] == ["Conv2DBackpropFilter"]
    assert _conv_layout.channels(built[0]) == (None, None) and _conv_layout.one_group(built[0])
