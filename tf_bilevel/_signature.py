"""How many positional arguments a user's function takes: whether to pass it the optional ones
(a loss's batch or hyperparameters, a learning rate's hyperparameters) and to explain a
mismatch before Python's own TypeError would."""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple, Optional


class Arity(NamedTuple):
    required: int  # positional parameters without a default (before any *args)
    maximum: Optional[int]  # all positional parameters; None: any number (*args) or no signature


def positional_arity(fn: Callable) -> Arity:
    """The positional arity of a function, method, `functools.partial`, callable object or
    `tf.function` (through its wrapped function); (0, None) when Python cannot tell."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return Arity(0, None)
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(1 for p in positional if p.default is p.empty)
    variadic = any(p.kind == p.VAR_POSITIONAL for p in parameters)
    return Arity(required, None if variadic else len(positional))


def requires(fn: Callable, count: int) -> bool:
    """Whether `fn` must be called with (at least) `count` positional arguments. The optional
    trailing argument of a user function (e.g. `hparams`) is passed only when it is required:
    a variadic `*args` function gets the required ones only (a forwarding wrapper
    `lambda *a: loss(*a)` must not receive a dict as its wrapped function's third argument)."""
    return positional_arity(fn).required >= count
