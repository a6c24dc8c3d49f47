"""tf_bilevel/_tf_patches.py: both private-TF patches are undone after normal exit and after an
exception, nest, and stay per thread (the Grappler mechanism itself: tests/test_grappler.py;
the Conv2D gradients' values: tests/test_conv_layout.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.eager import context as eager_context
from tensorflow.python.framework import ops

from tf_bilevel import _tf_patches

REGISTRY = ops._gradient_registry._registry  # noqa: SLF001


def _tf_entry() -> dict:
    return REGISTRY["Conv2D"]


def _memory_optimization() -> int:
    serialized = eager_context.context().function_call_options.config_proto_serialized
    return config_pb2.ConfigProto.FromString(serialized).graph_options.rewrite_options.memory_optimization


def _gradient_op_types(jit_compile: bool, in_loop: bool = True) -> set:
    """Op types of the traced gradient of a convolution (traced only, not run), taken in the body
    of a tf.while_loop or at the function's top level; the loop body's ops are in the library."""

    def loss_gradient(x, k):
        with tf.GradientTape() as tape:
            tape.watch([x, k])
            y = tf.reduce_sum(tf.nn.conv2d(x, k, 1, "VALID"))
        return tape.gradient(y, [x, k])

    def in_a_loop(x, k):
        return tf.while_loop(lambda i, dx, dk: i < 2, lambda i, dx, dk: (i + 1, *loss_gradient(x + dx, k + dk)),
                             (0, tf.zeros_like(x), tf.zeros_like(k)), maximum_iterations=2)[1:]

    fn = tf.function(in_a_loop if in_loop else loss_gradient, jit_compile=jit_compile, autograph=False)
    graph_def = fn.get_concrete_function(tf.TensorSpec([2, 6, 6, 3]), tf.TensorSpec([3, 3, 3, 4])).graph.as_graph_def()
    return {node.op for node in graph_def.node} | {
        node.op for function in graph_def.library.function for node in function.node_def}


def test_conv_gradients_are_replaced_under_xla_only_inside_and_restored_after():
    entry = _tf_entry()
    with _tf_patches.canonical_conv_gradients():
        assert REGISTRY["Conv2D"] is not entry
        inside_xla, inside_graph = _gradient_op_types(True), _gradient_op_types(False)
    assert REGISTRY["Conv2D"] is entry
    assert not {"Conv2DBackpropInput", "Conv2DBackpropFilter"} & inside_xla and "Conv2D" in inside_xla
    assert {"Conv2DBackpropInput", "Conv2DBackpropFilter"} <= inside_graph  # TF's own without XLA
    assert {"Conv2DBackpropInput", "Conv2DBackpropFilter"} <= _gradient_op_types(True)  # outside the block


def test_outside_a_while_loop_tfs_own_gradient_stays_under_xla_and_equals_the_replacement():
    """XLA:CPU canonicalizes a convolution outside loops itself: there the block keeps TF's
    gradient ops (a smaller graph to trace and compile). The values equal those of the
    replacement in a compiled loop and of TF's ops without XLA; a loop around the call of a
    compiled function does not count as a loop of the compiled function."""
    seen = {}

    def gradient(x, k, where=None):
        if where:
            seen[where] = _tf_patches.in_compiled_loop()
        with tf.GradientTape() as tape:
            tape.watch([x, k])
            y = tf.reduce_sum(tf.sin(tf.nn.conv2d(x, k, 2, "SAME")))
        return tape.gradient(y, [x, k])

    def in_a_loop(step, where):
        def run(x, k):
            return tf.while_loop(lambda i, dx, dk: i < 1, lambda i, dx, dk: (i + 1, *step(x, k, where)),
                                 (0, tf.zeros_like(x), tf.zeros_like(k)), maximum_iterations=1)[1:]

        return run

    compiled = tf.function(lambda x, k: gradient(x, k, "compiled, called in a loop"), jit_compile=True, autograph=False)
    rng = np.random.default_rng(0)
    x, k = tf.constant(rng.normal(size=(2, 7, 6, 3))), tf.constant(rng.normal(size=(3, 2, 3, 4)))
    with _tf_patches.canonical_conv_gradients():
        assert {"Conv2DBackpropInput", "Conv2DBackpropFilter"} <= _gradient_op_types(True, in_loop=False)
        top_level = tf.function(lambda x, k: gradient(x, k, "top level"), jit_compile=True, autograph=False)(x, k)
        looped = tf.function(in_a_loop(gradient, "loop"), jit_compile=True, autograph=False)(x, k)
        tf_ops = tf.function(in_a_loop(gradient, "loop without XLA"), autograph=False)(x, k)
        around = tf.function(in_a_loop(lambda x, k, where: compiled(x, k), None), autograph=False)(x, k)
    assert seen == {"top level": False, "loop": True, "loop without XLA": False, "compiled, called in a loop": False}
    for a, b, c, d in zip(top_level, looped, tf_ops, around):
        for got in (a, b, d):
            np.testing.assert_allclose(got.numpy(), c.numpy(), rtol=1e-12, atol=1e-12)


def test_the_registry_is_restored_after_an_exception_and_after_nested_blocks():
    entry = _tf_entry()
    with pytest.raises(ValueError, match="inside"):
        with _tf_patches.canonical_conv_gradients():
            raise ValueError("inside")
    assert REGISTRY["Conv2D"] is entry
    with _tf_patches.canonical_conv_gradients():
        with _tf_patches.canonical_conv_gradients():
            pass
        assert REGISTRY["Conv2D"] is not entry  # the outer block still holds it
        assert not {"Conv2DBackpropFilter"} & _gradient_op_types(True)
    assert REGISTRY["Conv2D"] is entry


def test_two_threads_inside_at_once_leave_tfs_gradient_and_do_not_affect_each_other():
    """Thread A enters, thread B enters, A leaves while B is still inside (and B is the last to
    leave), and a thread C outside the block traces TF's own gradient meanwhile."""
    entry = _tf_entry()
    barrier = threading.Barrier(3, timeout=60)
    seen: dict = {}
    errors: list = []

    def run(name, steps):
        try:
            for step in steps:
                step(name)
        except BaseException as error:  # noqa: BLE001 (reported by the main thread)
            errors.append((name, error))
            barrier.abort()

    def wait(_):
        barrier.wait()

    def trace(name):
        seen[name] = _gradient_op_types(True)

    def patched_while_b_inside(_):
        seen["patched while B inside"] = REGISTRY["Conv2D"] is not entry

    block = {}

    def enter(name):
        block[name] = _tf_patches.canonical_conv_gradients()
        block[name].__enter__()

    def leave(name):
        block.pop(name).__exit__(None, None, None)

    threads = [
        threading.Thread(target=run, args=("A", [enter, wait, wait, trace, leave, wait])),
        threading.Thread(target=run, args=("B", [wait, enter, wait, wait, patched_while_b_inside, trace, leave])),
        threading.Thread(target=run, args=("C", [wait, wait, trace, wait])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert seen["patched while B inside"]
    assert REGISTRY["Conv2D"] is entry and _tf_patches._registry_users == 0
    assert "Conv2DBackpropFilter" not in seen["A"] and "Conv2DBackpropFilter" not in seen["B"]
    assert {"Conv2DBackpropInput", "Conv2DBackpropFilter"} <= seen["C"]


def test_compiled_calls_run_without_the_scheduling_pass_and_restore_the_options():
    ctx = eager_context.context()
    base = ctx.function_call_options
    inside = []

    def fn(fail):
        inside.append(_memory_optimization())
        if fail:
            raise ValueError("in the call")
        return "result"

    call = _tf_patches.compiled(fn)
    assert call(False) == "result"
    assert ctx.function_call_options is base
    with pytest.raises(ValueError, match="in the call"):
        call(True)
    assert ctx.function_call_options is base
    assert inside == [rewriter_config_pb2.RewriterConfig.SWAPPING_HEURISTICS] * 2
    assert _memory_optimization() == rewriter_config_pb2.RewriterConfig.DEFAULT_MEM_OPT
