"""Installs forward mode's pfor converters (_pfor_conv, _pfor_pool, _pfor_activation) in front
of TF's own.

`tf.vectorized_map` over forward mode's N tangent columns meets ops whose one operand is the
primal's (shared by all columns) and whose other differs per column; for the ops below TF's
converters loop over the columns or copy the shared operand N times. Each converter here falls
back to TF's (the `original` it is given) outside the cases it handles.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

from tf_bilevel.estimators import _pfor_activation, _pfor_conv, _pfor_pool

_tried = False
installed = False  # whether install() put the converters in pfor's registry
TF_CONVERTERS: dict = {}  # TF's converters that ours replaced: tests compare ours against them


def install() -> None:
    """Puts the converters in front of pfor's own (once; a no-op where this TF's pfor internals
    are not the expected ones, which leaves TF's converters in place: slower, and exact except
    for a grouped convolution's filter gradient with per-column output gradients, which TF 2.21's
    converter gets wrong: `checking_convolutions` then refuses grouped convolutions instead)."""
    global _tried, installed
    if _tried:
        return
    _tried = True
    converters = {**_pfor_conv.CONVERTERS, **_pfor_pool.CONVERTERS, **_pfor_activation.CONVERTERS}
    try:
        from tensorflow.python.ops.parallel_for import pfor

        registry, wrap = pfor._pfor_converter_registry, pfor.wrap
        originals = {op: registry[op] for op in converters}
    except (ImportError, AttributeError, KeyError):
        return
    TF_CONVERTERS.update(originals)
    for op, make in converters.items():
        registry[op] = make(wrap, originals[op])
    installed = True


def checking_convolutions() -> ContextManager[None]:
    """Around forward mode's per-column function: where the converters are not installed (they
    refuse grouped convolutions inside `_pfor_conv.forward_mode()`), the convolutions it builds
    are checked at trace time instead (`_pfor_conv.convolutions_built_checked`)."""
    return contextlib.nullcontext() if installed else _pfor_conv.convolutions_built_checked()
