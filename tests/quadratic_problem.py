"""The small functional problem the bad-input and reliability tests share: a 2-d quadratic inner
objective with a target and an exp(log_l2) ridge term, and a quadratic outer objective."""

from __future__ import annotations

import tensorflow as tf

import tf_bilevel as tfb


def inner(params, hparams):
    return tf.reduce_sum((params["w"] - hparams["target"]) ** 2) + tf.exp(hparams["log_l2"]) * tf.reduce_sum(params["w"] ** 2)


def outer(params, hparams):
    return tf.reduce_sum((params["w"] - 1.0) ** 2)


def start():
    """(params, hparams) to start from."""
    return {"w": tf.constant([0.5, -0.5])}, {"target": tf.constant([1.0, 2.0]), "log_l2": tf.constant(-1.0)}


def build(inner_loss=inner, outer_loss=outer, **kwargs):
    """`tfb.hypergradient_fn` on the problem: 4 steps of GD with γ = 0.1, eager, unless overridden."""
    kwargs.setdefault("steps", 4)
    if "inner_optimizer" not in kwargs:
        kwargs.setdefault("learning_rate", 0.1)
    kwargs.setdefault("jit_compile", False)
    return tfb.hypergradient_fn(inner_loss, outer_loss, **kwargs)
