"""Inner optimizers as differentiable update rules on plain tensors.

In the style of optax: an optimizer is a pair of pure functions
``init(params) -> state`` and ``update(grads, state, params, hparams, step) -> (updates, state)``.
The optimizer state (momentum, Adam moments) is part of the dynamical system's state, so
it is back-propagated through exactly like the weights (paper, footnote 2).

A learning rate is one of
  * a number (constant γ),
  * a Keras ``LearningRateSchedule`` or any one-argument callable ``step -> γ``,
  * a two-argument callable ``(step, hparams) -> γ``: γ is computed from the hyperparameters,
    so it is learned (e.g. ``lambda step, hp: tf.nn.softplus(hp["log_lr"])``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import tensorflow as tf

from tf_bilevel import _validate
from tf_bilevel._autograph import convert_user_function
from tf_bilevel._signature import requires

Params = Any
HParams = Any
LearningRate = Union[float, Callable[..., Any]]


class InnerOptimizer(NamedTuple):
    """A differentiable inner update rule. ``learning_rate`` is kept for the Neumann estimator."""

    init: Callable[[Params], Any]
    update: Callable[[Params, Any, Params, HParams, tf.Tensor], tuple[Params, Any]]
    learning_rate: LearningRate | None = None


def resolve_learning_rate(learning_rate: LearningRate, step: tf.Tensor, hparams: HParams) -> Any:
    """γ_t for inner step ``step`` (0-based): a scalar tensor, or the number itself if constant
    (kept as a Python number so float64 problems are not rounded through float32)."""
    if not callable(learning_rate):
        return learning_rate
    schedule = convert_user_function(learning_rate)
    if requires(learning_rate, 2):
        return tf.convert_to_tensor(schedule(step, hparams))
    return tf.convert_to_tensor(schedule(step))


def cast_scalar(value: Any, dtype: tf.DType) -> tf.Tensor:
    """A number or tensor as `dtype`, without a float32 detour for Python numbers."""
    if isinstance(value, (tf.Tensor, tf.Variable)) or hasattr(value, "dtype"):
        return tf.cast(value, dtype)
    return tf.constant(value, dtype)


def _scaled(lr: Any, tree: Params) -> Params:
    return tf.nest.map_structure(lambda x: -cast_scalar(lr, x.dtype) * x, tree)


def sgd(learning_rate: LearningRate) -> InnerOptimizer:
    """Gradient descent: w_{t+1} = w_t − γ_t ∇w g(w_t, λ) (the transition of Prop. 3.1)."""
    learning_rate = _validate.learning_rate(learning_rate, "sgd(learning_rate=...)")

    def init(params: Params) -> tuple:
        return ()

    def update(grads, state, params, hparams, step):
        return _scaled(resolve_learning_rate(learning_rate, step, hparams), grads), state

    return InnerOptimizer(init, update, learning_rate)


def momentum(learning_rate: LearningRate, beta: float = 0.9, nesterov: bool = False) -> InnerOptimizer:
    """Heavy-ball momentum: v ← βv + g, w ← w − γv (Nesterov: w ← w − γ(g + βv))."""
    learning_rate = _validate.learning_rate(learning_rate, "momentum(learning_rate=...)")
    # β ≥ 1 makes v grow without bound (and β < 0 oscillates): a finite but meaningless w_T.
    beta = float(_validate.real_in_range(beta, "momentum(beta=...)", low=0.0, high=1.0, meaning="the decay of v"))
    nesterov = _validate.boolean(nesterov, "momentum(nesterov=...)")

    def init(params: Params) -> Params:
        return tf.nest.map_structure(tf.zeros_like, params)

    def update(grads, velocity, params, hparams, step):
        velocity = tf.nest.map_structure(lambda v, g: beta * v + g, velocity, grads)
        direction = (
            tf.nest.map_structure(lambda g, v: g + beta * v, grads, velocity) if nesterov else velocity
        )
        return _scaled(resolve_learning_rate(learning_rate, step, hparams), direction), velocity

    return InnerOptimizer(init, update)


class AdamState(NamedTuple):
    mu: Params
    nu: Params
    # Steps taken so far (float: it is a leaf of the back-propagated state; exact below 2^24).
    # In the state, not taken from the step index, so that a continued run (opt_state=...)
    # keeps counting and its bias correction does not restart.
    count: tf.Tensor


def adam(
    learning_rate: LearningRate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 1e-12,
) -> InnerOptimizer:
    """Adam with bias correction; ``eps_root`` inside the square root keeps the second-order
    terms finite where a gradient entry is exactly zero (d√ν/dν is infinite at ν = 0)."""
    learning_rate = _validate.learning_rate(learning_rate, "adam(learning_rate=...)")
    b1 = float(_validate.real_in_range(b1, "adam(b1=...)", low=0.0, high=1.0, meaning="the decay of the first moment"))
    b2 = float(_validate.real_in_range(b2, "adam(b2=...)", low=0.0, high=1.0, meaning="the decay of the second moment"))
    eps = float(_validate.real_in_range(eps, "adam(eps=...)", low=0.0, meaning="added to the denominator"))
    eps_root = float(_validate.real_in_range(eps_root, "adam(eps_root=...)", meaning="added inside the square root"))
    if eps_root <= 0:
        raise ValueError(
            f"adam(eps_root={eps_root}): eps_root must be > 0, otherwise hypergradients through "
            "Adam are NaN wherever a gradient entry is zero. Use e.g. eps_root=1e-12."
        )

    def init(params: Params) -> AdamState:
        zeros = tf.nest.map_structure(tf.zeros_like, params)
        return AdamState(mu=zeros, nu=tf.nest.map_structure(tf.zeros_like, params), count=tf.zeros([], tf.float32))

    def update(grads, state, params, hparams, step):
        mu = tf.nest.map_structure(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, grads)
        nu = tf.nest.map_structure(lambda v, g: b2 * v + (1.0 - b2) * tf.square(g), state.nu, grads)
        lr = resolve_learning_rate(learning_rate, step, hparams)

        count = state.count + 1.0

        def leaf_update(m, v):
            count_m = tf.cast(count, m.dtype)
            # cast_scalar, not tf.cast: tf.cast(0.9, tf.float64) rounds 0.9 through float32
            m_hat = m / (1.0 - tf.pow(cast_scalar(b1, m.dtype), count_m))
            v_hat = v / (1.0 - tf.pow(cast_scalar(b2, m.dtype), count_m))
            return -cast_scalar(lr, m.dtype) * m_hat / (tf.sqrt(v_hat + eps_root) + eps)

        return tf.nest.map_structure(leaf_update, mu, nu), AdamState(mu, nu, count)

    return InnerOptimizer(init, update)
