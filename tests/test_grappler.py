"""Grappler's AddN-to-TemporaryVariable rewrite inside a while loop (tf_bilevel/_tf_patches.py).

The smallest graph that breaks: a `tf.while_loop` whose body sums its loop variable and two new
terms with one AddN (what the tape's gradient aggregation does with K-RMD's adjoint), on
tensors big enough (3 × 80 MB) for the static memory estimate to pass 80 % of the CPU device's
nominal 256 MiB. The rewritten AddN's TemporaryVariable is created in the loop's exit iteration
and never destroyed, so the function's second call fails. `grappler.guarded()` runs the calls
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

from tf_bilevel import _tf_patches as grappler

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
    """The TF bug the guard is for (if this starts passing, TF fixed it: see grappler.py)."""
    run = _accumulating_loop("unguarded")
    x = tf.fill([N], 0.5)
    run(x)  # first call: the leaked variable is created
    with pytest.raises(tf.errors.AlreadyExistsError, match="tmp_var") as error:
        run(x)
    assert grappler.is_leaked_temporary_variable(error.value)


def test_guarded_calls_run_the_loop_every_time_with_the_right_values():
    run = _accumulating_loop("guarded")
    x = tf.fill([N], 0.5)
    base = eager_context.context().function_call_options
    for _ in range(3):
        with grappler.guarded():
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
        with grappler.guarded():
            run(x)
        with pytest.raises(grappler.GrapplerLoopError, match=r"Grappler.*AddN.*Fix: jit_compile=True"):
            with grappler.guarded():
                run(x)
    finally:
        ctx.function_call_options = base


def test_other_errors_pass_through_unchanged():
    with pytest.raises(tf.errors.AlreadyExistsError, match="a resource"):
        with grappler.guarded():
            raise tf.errors.AlreadyExistsError(None, None, "a resource")
    with pytest.raises(ValueError, match="other"):
        with grappler.guarded():
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
        with grappler.guarded():
            inside = config_pb2.ConfigProto.FromString(ctx.function_call_options.config_proto_serialized)
        assert ctx.function_call_options is users
    finally:
        ctx.function_call_options = base
    expected = config_pb2.ConfigProto()
    expected.CopyFrom(config)
    expected.graph_options.rewrite_options.memory_optimization = rewriter_config_pb2.RewriterConfig.SWAPPING_HEURISTICS
    assert inside == expected
