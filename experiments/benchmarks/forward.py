r"""Cost of one online forward-mode step (RTHO, issue #16) over one plain step of the same CNN.

The functional core only (no Keras): a CNN on plain tensors (conv 3×3 – max-pool – conv 3×3 –
max-pool – dense – dense, 28×28 inputs, minibatch 128) trained by heavy-ball momentum, with
N = 6 hyperparameters: 4 per-layer weight decays (one per kernel), the learning rate and the
momentum β (both through the update rule). Three compiled functions, timed alternately in ONE
process (so machine load hits all alike), medians of wall time:

  plain      one momentum step of the same network and loss (no tangents): `hg.solve`
  one pass   `hg.detailed(..., tangents=Z)` with estimator="forward", T = 1: the step with all N
             tangent columns of (w, v) advanced together (one vectorized JVP) and
             d_λf = Z ∇w f + ∇λ f on a validation minibatch
  N reruns   the same step and hypergradient, each column its own JVP (the primal step computed
             again per column: what forward mode did before, column by column)

  ratio = time(forward step) / time(plain step);  target (issue #16): one pass ≤ 1 + N.

  python -m experiments.benchmarks.forward            # XLA on and off
  python -m experiments.benchmarks.forward --quick    # tiny sizes (the program's test)
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_bilevel as tfb  # noqa: E402
from experiments.benchmarks.report import SuiteReport, verdict  # noqa: E402
from experiments.common import program  # noqa: E402
from experiments.common.config import option  # noqa: E402
from experiments.common.timing import block, wall_seconds  # noqa: E402
from tf_bilevel.dynamics import InnerState  # noqa: E402

NUM_KERNELS = 4
WEIGHT_DECAY, LEARNING_RATE, MOMENTUM = 5e-4, 0.05, 0.9


# -- the network and the bilevel problem on plain tensors ------------------------------------------

def init_params(settings: dict) -> list:
    """[kernel, bias] × (conv, conv, dense, dense), Glorot-uniform kernels, zero biases."""
    size, filters, units = settings["image_size"], settings["filters"], settings["dense_units"]
    flat = ((size - 2) // 2 - 2) // 2
    shapes = [(3, 3, 1, filters), (3, 3, filters, 2 * filters), (flat * flat * 2 * filters, units), (units, 10)]
    rng = np.random.default_rng(settings["seed"])
    params = []
    for shape in shapes:
        fan_in, fan_out = np.prod(shape[:-1]), shape[-1] * (np.prod(shape[:2]) if len(shape) == 4 else 1)
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        params += [tf.constant(rng.uniform(-limit, limit, shape), tf.float32), tf.zeros([shape[-1]], tf.float32)]
    return params


def logits(params: list, x: tf.Tensor) -> tf.Tensor:
    k1, b1, k2, b2, k3, b3, k4, b4 = params
    h = tf.nn.max_pool2d(tf.nn.relu(tf.nn.conv2d(x, k1, 1, "VALID") + b1), 2, 2, "VALID")
    h = tf.nn.max_pool2d(tf.nn.relu(tf.nn.conv2d(h, k2, 1, "VALID") + b2), 2, 2, "VALID")
    h = tf.nn.relu(tf.reshape(h, [tf.shape(h)[0], -1]) @ k3 + b3)
    return h @ k4 + b4


def cross_entropy(params: list, batch: tuple) -> tf.Tensor:
    x, y = batch
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits(params, x)))


def inner_loss(params: list, hp: dict, batch: tuple) -> tf.Tensor:
    """Training cross-entropy + Σ_l exp(log_decay_l) ‖kernel_l‖²."""
    decays = tf.exp(hp["log_decay"])
    penalty = tf.add_n([decays[i] * tf.reduce_sum(tf.square(k)) for i, k in enumerate(params[::2])])
    return cross_entropy(params, batch) + penalty


def outer_loss(params: list, hp: dict, batch: tuple) -> tf.Tensor:
    return cross_entropy(params, batch)


def learned_momentum() -> tfb.InnerOptimizer:
    """Heavy ball with both γ = exp(log_lr) and β = sigmoid(momentum_logit) hyperparameters."""

    def init(params):
        return [tf.zeros_like(w) for w in params]

    def update(grads, velocity, params, hp, step):
        beta, lr = tf.sigmoid(hp["momentum_logit"]), tf.exp(hp["log_lr"])
        velocity = [beta * v + g for v, g in zip(velocity, grads)]
        return [-lr * v for v in velocity], velocity

    return tfb.InnerOptimizer(init, update)


def initial_hparams() -> dict:
    return {
        "log_decay": tf.constant(np.log(np.full(NUM_KERNELS, WEIGHT_DECAY)), tf.float32),
        "log_lr": tf.constant(np.log(LEARNING_RATE), tf.float32),
        "momentum_logit": tf.constant(np.log(MOMENTUM / (1 - MOMENTUM)), tf.float32),
    }


def column_by_column(hg: tfb.Hypergradient, jit_compile: bool) -> Callable:
    """The reference: one JVP per hyperparameter coordinate, each recomputing the primal step
    (Z's columns one at a time, as forward mode did before the vectorized pass), then the same
    d_λf = Z ∇w f + ∇λ f. The same Transition as `hg`, so the same step."""
    transition, problem = hg.transition, hg.problem

    def step(params, velocity, hparams, tangents, inner_batch, outer_batch):
        flat_hp = tf.nest.flatten(hparams)
        n = sum(int(x.shape.num_elements()) for x in flat_hp)
        state = InnerState(params, velocity)
        columns = []
        for i in range(n):
            onehot = tf.one_hot(i, n, dtype=tf.float32)
            hp_dot = tf.nest.pack_sequence_as(hparams, tf.split(onehot, [int(x.shape.num_elements()) for x in flat_hp]))
            hp_dot = tf.nest.map_structure(lambda d, x: tf.reshape(d, x.shape), hp_dot, hparams)
            state_dot = tf.nest.map_structure(lambda z: z[i], tangents)
            with tf.autodiff.ForwardAccumulator((state, hparams), (state_dot, hp_dot)) as acc:
                new_state, _ = transition(state, hparams, tf.constant(0), inner_batch)
            columns.append(acc.jvp(new_state, unconnected_gradients=tf.UnconnectedGradients.ZERO))
        new_tangents = tf.nest.map_structure(lambda *cols: tf.stack(cols), *columns)
        with tf.GradientTape() as tape:
            tape.watch((new_state.params, hparams))
            value = problem.outer(new_state.params, hparams, outer_batch)
        grad_w, grad_hp = tape.gradient(value, (new_state.params, hparams),
                                        unconnected_gradients=tf.UnconnectedGradients.ZERO)
        through_w = tf.add_n([tf.linalg.matvec(tf.reshape(z, [n, -1]), tf.reshape(g, [-1]))
                              for z, g in zip(new_tangents.params, grad_w)])
        hypergrad = tf.concat([tf.reshape(g, [-1]) for g in tf.nest.flatten(grad_hp)], 0) + through_w
        return value, hypergrad, new_state, new_tangents

    return tf.function(step, jit_compile=jit_compile, autograph=False)


# -- timing -----------------------------------------------------------------------------------------

def measure(settings: dict, jit_compile: bool) -> dict:
    """Median times of the three functions (see the module docstring), in this process."""
    size, batch = settings["image_size"], settings["batch_size"]
    rng = np.random.default_rng(settings["seed"])
    x = tf.constant(rng.random((1, batch, size, size, 1), dtype=np.float32))  # T = 1 per-step minibatch
    y = tf.constant(rng.integers(0, 10, (1, batch)).astype("int32"))
    x_val = tf.constant(rng.random((batch, size, size, 1), dtype=np.float32))
    y_val = tf.constant(rng.integers(0, 10, batch).astype("int32"))
    hg = tfb.hypergradient_fn(
        inner_loss, outer_loss, steps=1, inner_optimizer=learned_momentum(), estimator="forward",
        per_step_batches=True, jit_compile=jit_compile,
    )
    params, hp = init_params(settings), initial_hparams()
    first = hg.detailed(params, hp, (x, y), (x_val, y_val))  # start the run: Z = B_0 = 0, then one step
    state = {"params": first.final_params, "opt_state": first.final_opt_state, "tangents": first.final_tangents}
    num_hparams = int(sum(np.prod(v.shape) for v in tf.nest.flatten(hp)))
    reruns = column_by_column(hg, jit_compile)
    check = reruns(state["params"], state["opt_state"], hp, state["tangents"], (x, y), (x_val, y_val))
    one_pass = hg.detailed(state["params"], hp, (x, y), (x_val, y_val), opt_state=state["opt_state"],
                           tangents=state["tangents"])
    flat = np.concatenate([np.ravel(v) for v in tf.nest.flatten(one_pass.hypergrad)])
    agreement = float(np.max(np.abs(flat - check[1].numpy())) / max(np.max(np.abs(flat)), 1e-30))

    runs = {
        "plain": lambda: block(hg.solve(state["params"], hp, (x, y))),
        "one_pass": lambda: block(hg.detailed(state["params"], hp, (x, y), (x_val, y_val),
                                              opt_state=state["opt_state"], tangents=state["tangents"])),
        "n_reruns": lambda: block(reruns(state["params"], state["opt_state"], hp, state["tangents"], (x, y),
                                         (x_val, y_val))),
    }
    first_call = {name: wall_seconds(fn) for name, fn in runs.items()}  # compile (where not yet) + first call
    times = {name: [] for name in runs}
    for _ in range(settings["repeats"]):  # alternate, so that load changes hit all alike
        for name, fn in runs.items():
            times[name].append(wall_seconds(fn))
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "jit_compile": jit_compile,
        "num_hparams": num_hparams,
        "num_params": int(sum(np.prod(w.shape) for w in params)),
        "tangent_bytes": int(sum(z.numpy().nbytes for z in tf.nest.flatten(first.final_tangents))),
        "median_seconds": median,
        "times_seconds": times,
        "first_call_seconds": first_call,
        "ratio_one_pass": median["one_pass"] / median["plain"],
        "ratio_n_reruns": median["n_reruns"] / median["plain"],
        "target": 1 + num_hparams,
        "relative_difference_one_pass_vs_reruns": agreement,
        "tracing_count": hg.tracing_count,
    }


def format_table(results: list[dict]) -> str:
    lines = [
        "XLA  N | plain step ms | forward one pass ms | N reruns ms | ratio one pass | ratio N reruns | target | rel. diff",
        "-" * 113,
    ]
    for r in results:
        m = r["median_seconds"]
        met = verdict(r["ratio_one_pass"] <= r["target"])
        lines.append(
            f"{'on ' if r['jit_compile'] else 'off'} {r['num_hparams']:2d} | {1e3 * m['plain']:13.2f} | "
            f"{1e3 * m['one_pass']:19.2f} | {1e3 * m['n_reruns']:11.2f} | {r['ratio_one_pass']:14.2f} | "
            f"{r['ratio_n_reruns']:14.2f} | <= {r['target']} {met:6s} | {r['relative_difference_one_pass_vs_reruns']:.1e}"
        )
    return "\n".join(lines)


def make_settings(repeats: int, quick: bool) -> dict:
    settings = {"image_size": 28, "batch_size": 128, "filters": 32, "dense_units": 128, "repeats": repeats,
                "seed": 0, "jit_compile": [True, False]}
    if quick:
        settings.update(image_size=12, batch_size=16, filters=4, dense_units=8, repeats=2)
    return settings


def run(settings: dict, output_dir: str) -> dict:
    report = SuiteReport("forward", output_dir, "forward_results.json")
    results = [measure(settings, jit) for jit in settings["jit_compile"]]
    return report.write(settings, results, format_table(results))


@dataclasses.dataclass
class Config:
    repeats: int = option(15, "Timed calls per function after warm-up (median reported).")
    output_dir: str = option("out/benchmark", "Where forward_results.json is written.")
    preset: str = "full"


def settings_of(cfg: Config) -> dict:
    return make_settings(cfg.repeats, cfg.preset == "quick")


# --preset=quick: tiny sizes and budgets, to test the program.
PROGRAM = program.suite("benchmarks.forward", Config, settings_of, run)


if __name__ == "__main__":
    program.start(PROGRAM)
