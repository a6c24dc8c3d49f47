"""AutoGraph for the user's functions only.

The engine is plain graph code (explicit `tf.while_loop`s), so it is traced with
`autograph=False`: converting it took ~90% of the trace time (full RMD at T=100: 3.1 s →
0.2 s). The user's losses, initializer and learning-rate schedule are converted here, once,
so that they may still use Python `if`/`for`/`while` on tensors as in any `tf.function`.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Callable, TypeVar

import tensorflow as tf

F = TypeVar("F", bound=Callable)


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
    try:
        return tf.autograph.to_graph(fn)
    except Exception:  # noqa: BLE001 - AutoGraph raises many types; unconverted is still correct
        return fn
