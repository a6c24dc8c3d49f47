"""AutoGraph for the user's functions only.

The engine is plain graph code (explicit `tf.while_loop`s), so it is traced with
`autograph=False`: converting it took ~90% of the trace time (full RMD at T=100: 3.1 s →
0.2 s). The user's losses, initializer and learning-rate schedule are converted here, once,
so that they may still use Python `if`/`for`/`while` on tensors as in any `tf.function`.

A function whose source AutoGraph cannot parse (typically a lambda written in a REPL, a
heredoc or next to another lambda, whose source line is ambiguous or missing) is marked
`do_not_convert` instead: AutoGraph would only log "could not transform <lambda>" and run it
as is anyway, and a lambda is a single expression, so it has no statement to convert.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Callable, TypeVar

import tensorflow as tf

F = TypeVar("F", bound=Callable)


_parsable: dict = {}  # (file, code object) -> autograph_can_parse: the answer depends on the source only


def autograph_can_parse(fn: Callable) -> bool:
    """Whether AutoGraph can read the source of the plain function `fn` (once per code object:
    every trainer converts its losses for each estimator it builds)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return _parse(fn)
    key = (code.co_filename, code)  # code objects compare equal across files
    if key not in _parsable:
        _parsable[key] = _parse(fn)
    return _parsable[key]


def _parse(fn: Callable) -> bool:
    try:
        from tensorflow.python.autograph.pyct import parser  # the parser AutoGraph itself uses
    except ImportError:  # pragma: no cover - layout of a future TF
        return _has_source(fn)
    try:
        parser.parse_entity(fn, future_features=())
    except Exception:  # noqa: BLE001 - ValueError (ambiguous lambda), OSError (no source), ...
        return False
    return True


def _has_source(fn: Callable) -> bool:
    try:
        inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    return True


def leave_unparsable_unconverted(fn: F) -> F:
    """`fn` itself, or `fn` marked `do_not_convert` if AutoGraph cannot parse it, so that a
    converted caller runs it as is without a warning (used for functions that are called from
    converted code rather than converted on their own)."""
    if inspect.isfunction(fn) and not autograph_can_parse(fn):
        return tf.autograph.experimental.do_not_convert(fn)
    return fn


def convert_user_function(fn: F) -> F:
    """`fn` converted by AutoGraph: plain functions, bound methods and `functools.partial`s of
    them. Anything else, or what AutoGraph cannot convert, is returned as is (as `tf.function`
    does: it then runs as written, Python control flow on tensors raising the usual error)."""
    if isinstance(fn, functools.partial):
        return functools.partial(convert_user_function(fn.func), *fn.args, **fn.keywords)
    if inspect.ismethod(fn):  # to_graph would drop the binding of `self`
        return types.MethodType(convert_user_function(fn.__func__), fn.__self__)
    if not inspect.isfunction(fn):
        return fn
    if not autograph_can_parse(fn):
        return tf.autograph.experimental.do_not_convert(fn)
    try:
        return tf.autograph.to_graph(fn)
    except Exception:  # noqa: BLE001 - AutoGraph raises many types; unconverted is still correct
        return tf.autograph.experimental.do_not_convert(fn)
