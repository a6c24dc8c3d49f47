"""Installs forward mode's pfor converters (_pfor_conv, _pfor_pool, _pfor_activation) in front
of TF's own.

`tf.vectorized_map` over forward mode's N tangent columns meets ops whose one operand is the
primal's (shared by all columns) and whose other differs per column; for the ops below TF's
converters loop over the columns or copy the shared operand N times. Each converter here falls
back to TF's (the `original` it is given) outside the cases it handles.
"""

from __future__ import annotations

import functools
from typing import Optional

import tensorflow as tf

from tf_bilevel.estimators import _pfor_activation, _pfor_conv, _pfor_pool

TF_CONVERTERS: dict = {}  # TF's converters that ours replaced: tests compare ours against them


@functools.cache
def _installed() -> Optional[BaseException]:
    """Puts the converters in pfor's registry (once per process): None, or why it could not."""
    converters = {**_pfor_conv.CONVERTERS, **_pfor_pool.CONVERTERS, **_pfor_activation.CONVERTERS}
    try:
        from tensorflow.python.ops.parallel_for import pfor

        registry, wrap = pfor._pfor_converter_registry, pfor.wrap
        originals = {op: registry[op] for op in converters}
    except (ImportError, AttributeError, KeyError) as error:
        return error
    TF_CONVERTERS.update(originals)
    for op, make in converters.items():
        registry[op] = make(wrap, originals[op])
    return None


def install() -> None:
    """Forward mode's entry: the converters in front of pfor's own, or a RuntimeError naming the
    fix where this TF's pfor internals are not the expected ones (TF's converters alone are slow,
    and wrong for a grouped convolution's filter gradient with per-column output gradients)."""
    error = _installed()
    if error is not None:
        raise RuntimeError(
            f"forward mode (estimator='forward') vectorizes its tangent columns with TensorFlow's pfor internals "
            f"(tensorflow.python.ops.parallel_for.pfor._pfor_converter_registry), which TensorFlow {tf.__version__} "
            f"does not have as expected ({type(error).__name__}: {error}): use reverse mode (estimator='reverse', "
            "K-RMD), or the TensorFlow version tf_bilevel supports (2.21)"
        ) from error
