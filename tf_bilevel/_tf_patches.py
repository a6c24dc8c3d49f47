"""The two places where tf_bilevel patches private TensorFlow state, and why (TF 2.21).

1. `guarded()` / `compiled(fn)`: compiled calls (the Keras trainer's steps, `Hypergradient`
   calls, `HyperStep`) run without Grappler's AddN-to-TemporaryVariable rewrite, which breaks
   loops. TF cause: Grappler's memory optimizer leaks a TemporaryVariable from a rewritten AddN
   in a while loop's exit iteration (the second call fails). Public replacement: none
   (`tf.config.optimizer.set_experimental_options` has no memory_optimization key); TF fixing it.
2. `canonical_conv_gradients()`: while tracing under XLA inside a while loop, Conv2D's registered
   gradient computes both gradients as Conv2D ops in XLA:CPU's fast layout
   (tf_bilevel/_conv_layout.py). TF cause: XLA:CPU canonicalizes the layout of convolutions only
   outside while loops, so TF's gradient ops inside the inner-step loop run ~100-450x slower.
   Outside loops TF's own gradient stays: XLA makes it fast there, and its graph is smaller to
   trace and compile. Public replacement: none that scopes a
   gradient to one trace (`tf.RegisterGradient` refuses an op that has one); XLA:CPU fixing it.

Grappler's memory optimizer (memory_optimizer.cc, `SchedulingPass`, on by default) rewrites an
AddN of more than 2 inputs into a TemporaryVariable summed into by AssignAdds whenever the static
peak-memory estimate of the function exceeds 80 % of the device's memory. On CPU that memory is
the device's nominal 256 MiB `memory_limit`, not the machine's RAM, so a BatchNorm CNN at
batch 128 crosses it. The temporary variable waits, by a control edge, on the node producing the
AddN's earliest input. Inside a lowered `tf.while_loop`, when that input is a loop variable read
straight from the loop's Switch (the adjoint that the backward loop of K-RMD accumulates: the
tape's AddN of it and the step's new terms), a control edge out of a Switch is live in the
loop's exit iteration too, where the rest of the rewrite is dead: the variable
`.../tmp_var/frame:F/iter:T` is created and never destroyed, stays in the per-step container
`__per_step_0`, and the next call fails with AlreadyExistsError (observed with TF 2.21: the
first call succeeds, every later one fails).

`guarded()` runs the calls inside it with `memory_optimization=SWAPPING_HEURISTICS`: Grappler's
default minus that pass (the swapping pass, GPU only, stays), through the per-thread function
call options the eager runtime attaches to every function call (`config_proto`; Grappler reads
it when it instantiates the function). Under XLA (`jit_compile=True`) the rewrite does not run.
If the error appears anyway (another TF version, a user's explicit memory_optimization setting)
it is re-raised with the cause and the fix.

The gradient registry is process-wide; `canonical_conv_gradients()` installs its Conv2D
gradient while any thread is inside it (a lock and a count; the last one out restores TF's
entry, also on an exception), and the installed gradient is TF's own except for the thread
inside the scope tracing a loop under XLA, so other threads' traces are unaffected.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Iterator, Optional

import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.eager import context as eager_context
from tensorflow.python.framework import ops
from tensorflow.python.ops import control_flow_util, control_flow_v2_func_graphs

from tf_bilevel._conv_layout import filter_gradient_as_conv2d, input_gradient_as_conv2d, one_group, one_group_scope

_DEFAULT = rewriter_config_pb2.RewriterConfig.DEFAULT_MEM_OPT
_WITHOUT_SCHEDULING = rewriter_config_pb2.RewriterConfig.SWAPPING_HEURISTICS
_cache: dict = {}  # (executor type, serialized config) -> FunctionCallOptions without the pass

EXPLANATION = (
    "Grappler's memory optimizer rewrote an AddN inside a tf.while_loop into a TemporaryVariable "
    "that leaks in the loop's exit iteration (TF bug; it fires when the function's static memory "
    "estimate exceeds 80% of the device's memory_limit, 256 MiB on CPU, e.g. a BatchNorm CNN at "
    "batch 128), so the second call fails. Fix: jit_compile=True (XLA does not run the rewrite), "
    "or leave Grappler's memory_optimization at its default (tf_bilevel's calls then run "
    "without the rewrite: SWAPPING_HEURISTICS)."
)


class GrapplerLoopError(RuntimeError):
    """Grappler's AddN rewrite broke a compiled loop (see the module docstring)."""


def _options_without_scheduling(base: eager_context.FunctionCallOptions) -> Optional[eager_context.FunctionCallOptions]:
    """`base` with the scheduling pass off, or None to keep `base` (an explicit user setting)."""
    key = (base.executor_type, base.config_proto_serialized)
    options = _cache.get(key, False)
    if options is not False:
        return options
    options = None
    if base.config_proto_serialized is not None:  # None: TF's all-off rewriter config, kept
        config = config_pb2.ConfigProto.FromString(base.config_proto_serialized)
        rewrite = config.graph_options.rewrite_options
        if rewrite.memory_optimization == _DEFAULT and not rewrite.disable_meta_optimizer:
            rewrite.memory_optimization = _WITHOUT_SCHEDULING
            options = eager_context.FunctionCallOptions(executor_type=base.executor_type, config_proto=config)
    _cache[key] = options  # one dict store: atomic under the GIL
    return options


def is_leaked_temporary_variable(error: BaseException) -> bool:
    """The AlreadyExistsError of a TemporaryVariable that Grappler's AddN rewrite leaked."""
    return isinstance(error, tf.errors.AlreadyExistsError) and "TemporaryVariable" in str(error) and "tmp_var" in str(error)


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Runs the tf.function calls inside without Grappler's AddN rewrite (module docstring)."""
    ctx = eager_context.context()
    base = ctx.function_call_options
    options = _options_without_scheduling(base)
    if options is not None:
        ctx.function_call_options = options
    try:
        yield
    except tf.errors.AlreadyExistsError as error:
        if is_leaked_temporary_variable(error):
            raise GrapplerLoopError(EXPLANATION) from error
        raise
    finally:
        if options is not None:
            ctx.function_call_options = base


def compiled(fn: Callable) -> Callable:
    """`fn` (a compiled function: a `tf.function`, a Keras step function) called under `guarded()`."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with guarded():
            return fn(*args, **kwargs)

    return call


# -- Conv2D's gradient in XLA:CPU's canonical layout ---------------------------------------------
_registry_lock = threading.Lock()
_registry_users = 0  # canonical_conv_gradients() blocks open, over all threads
_tf_entry: Optional[dict] = None  # TF's registry entry for Conv2D (kept once seen)
_canonical_gradient_blocks = threading.local()  # .depth: canonical_conv_gradients() blocks open in this thread
_LOOP_GRAPHS = (control_flow_v2_func_graphs.WhileBodyFuncGraph, control_flow_v2_func_graphs.WhileCondFuncGraph)


def in_compiled_loop() -> bool:
    """Whether the ops built now are compiled by XLA inside a while loop: between the graph being
    built and the graph that calls the XLA-compiled function (the first one in XLA's context),
    one graph is the body or condition of a while_v2 loop (a loop's gradient is such a loop too).
    A loop around the call (e.g. Keras' steps_per_execution) does not count: XLA compiles the
    function's convolutions at its top level, where XLA:CPU canonicalizes them itself."""
    graph, in_loop = ops.get_default_graph(), False
    while graph is not None:
        if control_flow_util.InXlaContext(graph):
            return in_loop
        in_loop = in_loop or isinstance(graph, _LOOP_GRAPHS)
        graph = getattr(graph, "outer_graph", None)
    return False


def _conv2d_gradient(op, dy):
    """TF's Conv2D gradient, except under XLA inside a while loop in a thread inside
    `canonical_conv_gradients()`: then both gradients are Conv2D ops in XLA:CPU's canonical
    layout (_conv_layout), for an ungrouped convolution (the kernel's input channels are the
    input's)."""
    x, kernel = op.inputs[0], op.inputs[1]
    # A grouped convolution (channels = groups × the kernel's), or channels not static and the op
    # not one of _conv_layout's (one group by construction): TF's.
    ungrouped = one_group(op)
    if not (ungrouped and getattr(_canonical_gradient_blocks, "depth", 0) and in_compiled_loop()):
        # TF's gradient ops of a one-group conv are one group too (their channel counts may not be static).
        with one_group_scope() if ungrouped else contextlib.nullcontext():
            return _tf_entry["type"](op, dy)
    dx = input_gradient_as_conv2d(x, kernel, dy, op)
    dk = filter_gradient_as_conv2d(x, dy, kernel.shape[:2], op)
    if dx is None or dk is None:
        with one_group_scope():  # `ungrouped` holds here: marked as above
            tf_dx, tf_dk = _tf_entry["type"](op, dy)  # the part not replaced (XLA drops the other)
        dx, dk = (tf_dx if dx is None else dx), (tf_dk if dk is None else dk)
    return dx, dk


@contextlib.contextmanager
def canonical_conv_gradients() -> Iterator[None]:
    """Gradients of Conv2D taken in this thread while tracing a while loop under XLA inside the
    block (the inner gradient of every step, K-RMD's VJPs of it, forward mode's JVPs) are Conv2D
    ops in XLA:CPU's fast layout (module docstring, 2.). Reentrant and thread-safe; outside XLA
    or outside loops TF's own gradient."""
    global _registry_users, _tf_entry
    registry = ops._gradient_registry._registry  # noqa: SLF001 (no public way to scope a gradient)
    with _registry_lock:
        if _registry_users == 0 and "Conv2D" in registry and registry["Conv2D"]["type"] is not _conv2d_gradient:
            _tf_entry = registry["Conv2D"]
            registry["Conv2D"] = {**_tf_entry, "type": _conv2d_gradient}
        _registry_users += 1
    _canonical_gradient_blocks.depth = getattr(_canonical_gradient_blocks, "depth", 0) + 1
    try:
        yield
    finally:
        _canonical_gradient_blocks.depth -= 1
        with _registry_lock:
            _registry_users -= 1
            if _registry_users == 0 and _tf_entry is not None:
                registry["Conv2D"] = _tf_entry
