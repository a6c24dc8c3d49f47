"""Grappler's AddN-to-TemporaryVariable rewrite inside a while loop (tf_bilevel/_tf_patches.py).

The smallest graph that breaks: a `tf.while_loop` whose body sums its loop variable and two new
terms with one AddN (what the tape's gradient aggregation does with K-RMD's adjoint), on
tensors big enough (3 × 80 MB) for the static memory estimate to pass 80 % of the CPU device's
nominal 256 MiB. The rewritten AddN's TemporaryVariable is created in the loop's exit iteration
and never destroyed, so the function's second call fails. `_tf_patches.guarded()` runs the calls
without that rewrite, and explains the error when a user's explicit setting keeps it.

Each function is built in its own name scope: a leaked variable stays in the process (in the
per-step container every eager call shares), under a name derived from the graph's node names.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.eager import context as eager_context

from tf_bilevel import _tf_patches

N, STEPS = 20_000_000, 3  # 80 MB per tensor: the rewrite fires (CPU memory_limit 256 MiB)


def _accumulating_loop(scope: str):
    @tf.function(autograph=False)
    def run(x):
        with tf.name_scope(scope):
            def body(i, acc):
                s = tf.sin(acc)
                return i + 1, tf.add_n([acc, s, s * s])  # the loop variable itself is an AddN input

            return tf.while_loop(lambda i, acc: i < STEPS, body, (tf.constant(0), x))[1]

    return run


def _reference(x0: float) -> float:
    acc = np.float32(x0)
    for _ in range(STEPS):
        s = np.sin(acc)
        acc = acc + s + s * s
    return float(acc)


def test_unguarded_loop_fails_on_the_second_call():
    """The TF bug the guard is for (if this starts passing, TF fixed it: see _tf_patches.py)."""
    run = _accumulating_loop("unguarded")
    x = tf.fill([N], 0.5)
    run(x)  # first call: the leaked variable is created
    with pytest.raises(tf.errors.AlreadyExistsError, match="tmp_var") as error:
        run(x)
    assert _tf_patches.is_leaked_temporary_variable(error.value)


def test_guarded_calls_run_the_loop_every_time_with_the_right_values():
    run = _accumulating_loop("guarded")
    x = tf.fill([N], 0.5)
    base = eager_context.context().function_call_options
    for _ in range(3):
        with _tf_patches.guarded():
            out = run(x)
        assert eager_context.context().function_call_options is base  # restored after the call
        np.testing.assert_allclose(out[:5].numpy(), _reference(0.5), rtol=1e-6)
        np.testing.assert_allclose(out[-5:].numpy(), _reference(0.5), rtol=1e-6)


def test_an_explicit_memory_optimization_is_kept_and_its_error_explained():
    ctx = eager_context.context()
    base = ctx.function_call_options
    config = config_pb2.ConfigProto.FromString(base.config_proto_serialized)
    config.graph_options.rewrite_options.memory_optimization = rewriter_config_pb2.RewriterConfig.SCHEDULING_HEURISTICS
    ctx.function_call_options = eager_context.FunctionCallOptions(executor_type=base.executor_type, config_proto=config)
    try:
        run = _accumulating_loop("explicit")
        x = tf.fill([N], 0.5)
        with _tf_patches.guarded():
            run(x)
        with pytest.raises(_tf_patches.GrapplerLoopError, match=r"Grappler.*AddN.*Fix: jit_compile=True"):
            with _tf_patches.guarded():
                run(x)
    finally:
        ctx.function_call_options = base


def test_other_errors_pass_through_unchanged():
    with pytest.raises(tf.errors.AlreadyExistsError, match="a resource"):
        with _tf_patches.guarded():
            raise tf.errors.AlreadyExistsError(None, None, "a resource")
    with pytest.raises(ValueError, match="other"):
        with _tf_patches.guarded():
            raise ValueError("other")


def test_guarded_changes_only_the_memory_optimizer_of_the_callers_options():
    ctx = eager_context.context()
    base = ctx.function_call_options
    config = config_pb2.ConfigProto.FromString(base.config_proto_serialized)
    config.graph_options.rewrite_options.constant_folding = rewriter_config_pb2.RewriterConfig.OFF
    config.inter_op_parallelism_threads = 3
    users = eager_context.FunctionCallOptions(executor_type=base.executor_type, config_proto=config)
    ctx.function_call_options = users
    try:
        with _tf_patches.guarded():
            inside = config_pb2.ConfigProto.FromString(ctx.function_call_options.config_proto_serialized)
        assert ctx.function_call_options is users
    finally:
        ctx.function_call_options = base
    expected = config_pb2.ConfigProto()
    expected.CopyFrom(config)
    expected.graph_options.rewrite_options.memory_optimization = rewriter_config_pb2.RewriterConfig.SWAPPING_HEURISTICS
    assert inside == expected


# -- Where the rewrite does not fire, the guard changes nothing (RESULTS.md, issue #16) ------------

def _optimized_graphs(call):
    """(call(), the graphs after Grappler of the functions the call instantiated): the eager
    runtime's run metadata. A function is instantiated once per config, so a call under other
    function call options (guarded()) is optimized anew."""
    ctx = eager_context.context()
    ctx.enable_run_metadata()
    try:
        out = call()
        metadata = ctx.export_run_metadata()
    finally:
        ctx.disable_run_metadata()
    return out, [g.post_optimization_graph for g in metadata.function_graphs]


def _guarded(call):
    with _tf_patches.guarded():
        return call()


def _nodes(graph):
    return [*graph.node, *(node for function in graph.library.function for node in function.node_def)]


def _serialized(graphs) -> list:
    return [g.SerializeToString(deterministic=True) for g in graphs]


def test_where_the_rewrite_fires_the_optimized_graphs_differ():
    """The control of the next test: comparing the optimized graphs sees the rewrite."""
    run = _accumulating_loop("compared")
    x = tf.fill([N], 0.5)
    _, plain = _optimized_graphs(lambda: run(x))  # (leaks its variable, under this test's own name)
    _, guarded = _optimized_graphs(lambda: _guarded(lambda: run(x)))
    assert len(plain) == len(guarded) == 1 and _serialized(plain) != _serialized(guarded)
    assert "TemporaryVariable" in {n.op for n in _nodes(plain[0])}
    assert "TemporaryVariable" not in {n.op for n in _nodes(guarded[0])}


def _conv_krmd():
    """K-RMD (T = 6, K = 3, no XLA) of a 2-conv net's per-kernel weight decays: small, so the
    static memory estimate stays far under the threshold, as on the `cnn` network of online_hpo."""
    import tf_bilevel as tfb

    rng = np.random.default_rng(0)
    params = {"k1": rng.normal(0, 0.3, (3, 3, 1, 4)), "k2": rng.normal(0, 0.2, (3, 3, 4, 4)),
              "dense": rng.normal(0, 0.1, (4 * 4 * 4, 3))}
    params = {name: tf.constant(value, tf.float32) for name, value in params.items()}

    def cross_entropy(w, batch):
        h = tf.nn.relu(tf.nn.conv2d(batch["x"], w["k1"], 2, "SAME"))
        h = tf.nn.relu(tf.nn.conv2d(h, w["k2"], 2, "SAME"))
        logits = tf.reshape(h, [h.shape[0], -1]) @ w["dense"]
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(batch["y"], logits))

    def inner(w, log_decays, batch):
        decay = tf.add_n([tf.exp(log_decays[i]) * tf.reduce_sum(tf.square(w[k])) for i, k in enumerate(sorted(w))])
        return cross_entropy(w, batch) + decay

    def batch():
        return {"x": tf.constant(rng.normal(size=(8, 16, 16, 1)), tf.float32),
                "y": tf.constant(rng.integers(0, 3, 8), tf.int32)}

    hg = tfb.hypergradient_fn(inner, lambda w, lam, b: cross_entropy(w, b), steps=6, truncate=3, learning_rate=0.1,
                              jit_compile=False)
    return hg, (params, tf.fill([3], float(np.log(1e-3))), batch(), batch())


def test_where_the_rewrite_does_not_fire_the_guard_changes_nothing():
    """K-RMD's hypergradient function on a small conv net, its engine in a tf.function of our own
    (not guarded by the library): Grappler's optimized graph is the same byte for byte with and
    without guarded(), though its backward loop has AddNs of more than two inputs (what the pass
    rewrites when it fires), and the results are the same bits, also through `hg.detailed`."""
    hg, args = _conv_krmd()
    compute = tf.function(hg.compute, autograph=False)
    plain_out, plain = _optimized_graphs(lambda: compute(*args))
    guarded_out, guarded = _optimized_graphs(lambda: _guarded(lambda: compute(*args)))
    assert len(plain) == len(guarded) == 1 and _serialized(plain) == _serialized(guarded)
    candidates = [n for n in _nodes(plain[0]) if n.op == "AddN" and "while" in n.name
                  and sum(not i.startswith("^") for i in n.input) > 2]
    assert candidates
    for out in (guarded_out, hg.detailed(*args)):
        for a, b in zip(tf.nest.flatten(plain_out), tf.nest.flatten(out), strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert np.all(np.isfinite(plain_out.hypergrad.numpy())) and np.any(plain_out.hypergrad.numpy() != 0)
