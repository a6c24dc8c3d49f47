"""Compiled calls (the Keras trainer's steps, `Hypergradient.detailed` / `solve`, `HyperStep`)
run without Grappler's AddN-to-TemporaryVariable rewrite, which breaks loops.

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
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.eager import context as eager_context

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
