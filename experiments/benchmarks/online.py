r"""Cost of one online hyper-iteration over plain Keras training of the same network (issue #11).

One hyper-iteration of `BilevelTrainer(..., online=True)`: T inner minibatch steps (momentum),
the K-RMD backward pass through the last K of them, and the outer Adam update of λ (per-layer
weight decay and the learning rate). A configuration "Txf" is forward mode instead
(`estimator="forward"`, tangents carried across hyper-iterations): each inner step also
propagates the N = 5 tangent columns (one vectorized JVP), no backward pass; its target is
ratio ≤ 1 + N (the issue's bound for one forward step over one plain step). The reference is what the user would run instead: T plain
Keras train steps (`model.fit`'s compiled train function, SGD with momentum, the same weight
decay as a loss term) of the same model on the same minibatches. Both compiled with XLA (and, as a second table, both without), timed
alternately in ONE process (so that machine load hits both alike), medians of wall time:

    ratio = time(one hyper-iteration) / time(T plain train steps)

The plain step is timed twice: one compiled call per step (Keras' default, what `fit` does)
and T steps in one call (`steps_per_execution=T`, no per-step Python). Peak memory: TF's CPU
allocator peak during the first steady-state call (the working set), for both. Each
configuration gets `--repeats` timed rounds, fewer (at least one) once its rounds took
`--online_budget_seconds`: with XLA on CPU a T = 20 hyper-iteration can take a minute (the JSON's
`rounds` says how many ran). `train_step_traces` counts the traces of the trainer's step (1: no
retracing).

  python -m experiments.benchmark --suites=online        # the same, from the benchmark program
  python -m experiments.benchmarks.online                 # T=K=1, T=20 with K in {1, 5, 20}, forward T in {1, 20}
  python -m experiments.benchmarks.online --preset=quick  # tiny sizes (used by the tests)
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_bilevel as tfb  # noqa: E402
from experiments.benchmarks.report import SuiteReport, verdict  # noqa: E402
from experiments.common import program  # noqa: E402
from experiments.common.memory import PeakMemory, mib  # noqa: E402
from experiments.common.config import option  # noqa: E402
from experiments.common.timing import block, wall_seconds  # noqa: E402

TARGETS = {(20, 1): 1.3, (1, 1): 5.0}  # (T, K) -> ratio target of the issue: reported, never asserted
FORWARD = "f"  # K of a forward-mode configuration ("Txf")
NUM_KERNELS = 4
NUM_HYPERPARAMETERS = NUM_KERNELS + 1  # the decays and γ: forward mode's N tangent columns
WEIGHT_DECAY, LEARNING_RATE, MOMENTUM = 5e-4, 0.05, 0.9


def cnn(image_size: int, channels: int, filters: int, seed: int) -> keras.Model:
    """The online-HPO network: two conv blocks and a dense head (Fashion-MNIST sized by default)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((image_size, image_size, 1)),
        keras.layers.Conv2D(filters, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(2 * filters, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(channels, activation="relu"),
        keras.layers.Dense(10),
    ])


def kernels_penalty(weights: list, decays) -> tf.Tensor:
    """Σ_l decay_l ‖kernel_l‖² over the kernels (every other weight: kernel, bias, ...)."""
    return tf.add_n([decays[i] * tf.reduce_sum(tf.square(w)) for i, w in enumerate(weights[::2])])


def parse_config(text: str) -> tuple:
    """"TxK" -> (T, K); "Txf" -> (T, "f"), forward mode."""
    steps, _, k = text.partition("x")
    return int(steps), (FORWARD if k == FORWARD else int(k))


def _target(T: int, K) -> float | None:
    return 1.0 + NUM_HYPERPARAMETERS if K == FORWARD else TARGETS.get((T, K))


def _count_traces(trainer) -> list:
    """A one-element list counting the traces of `trainer.train_step` (Keras traces it when it
    compiles the train function; each further count is a retrace)."""
    count, train_step = [0], trainer.train_step

    def counted(data):
        count[0] += 1
        return train_step(data)

    trainer.train_step = counted
    return count


def measure(T: int, K, settings: dict, jit_compile: bool = True) -> dict:
    """Times and memory of one (T, K) configuration (K = "f": forward mode), bilevel and plain,
    in this process, both compiled with XLA or both without."""
    size, batch = settings["image_size"], settings["batch_size"]
    rng = np.random.default_rng(settings["seed"])
    x = rng.random((T * batch, size, size, 1), dtype=np.float32)
    y = rng.integers(0, 10, T * batch).astype("int32")
    x_val, y_val = rng.random((batch, size, size, 1), dtype=np.float32), rng.integers(0, 10, batch).astype("int32")
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True).cache()
    val = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(batch).cache()

    model = cnn(size, settings["dense_units"], settings["filters"], settings["seed"])
    trainer = tfb.BilevelTrainer(
        model, inner_loss=tfb.keras.losses.sparse_categorical_crossentropy,
        outer_loss=tfb.keras.losses.sparse_categorical_crossentropy,
        steps=T, online=True, inner_optimizer="momentum",
        **({"estimator": "forward", "forget": 1.0} if K == FORWARD else {"truncate": K}),
        inner_learning_rate=tfb.Hyperparameter(LEARNING_RATE, transform="exp"),
        hyperparameters={"weight_decay": tfb.Hyperparameter(np.full(NUM_KERNELS, WEIGHT_DECAY), transform="exp")},
        inner_regularizer=lambda w, hp: kernels_penalty(w, hp["weight_decay"]),
    )
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=jit_compile)
    traces = _count_traces(trainer)
    tasks = iter(tfb.keras.online_tasks(train, val, steps=T))
    trainer.build_from_spec(tfb.keras.online_tasks(train, val, steps=T).element_spec)
    hyper_step = trainer.make_train_function()

    def plain_model(steps_per_execution: int):
        """The same network with Keras' own L2 (decay·‖kernel‖², the bilevel model's penalty)."""
        plain = cnn(size, settings["dense_units"], settings["filters"], settings["seed"])
        for layer in plain.layers:
            if hasattr(layer, "kernel_regularizer"):
                layer.kernel_regularizer = keras.regularizers.L2(WEIGHT_DECAY)
        plain.compile(
            optimizer=keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit_compile, steps_per_execution=steps_per_execution,
        )
        return plain

    per_step, fused = plain_model(1), plain_model(T)
    train_iter = iter(train.repeat())
    per_step.fit(train.take(1), verbose=0)  # builds the compiled train function
    fused.fit(train.repeat().take(T), verbose=0)
    step_fn = per_step.make_train_function()
    fused_fn = fused.make_train_function()

    runs = {
        "bilevel": lambda: block(hyper_step(tasks)),
        "plain_per_step": lambda: block([step_fn(train_iter) for _ in range(T)][-1]),
        "plain_fused": lambda: block(fused_fn(train_iter)),
    }
    first = {name: wall_seconds(fn) for name, fn in runs.items()}  # compile + first call
    memory, times = {}, {name: [] for name in runs}
    started = time.perf_counter()
    for round_ in range(settings["repeats"]):  # alternate, so that load changes hit all alike
        for name, fn in runs.items():
            if round_ == 0:  # the first steady-state call also gives the working set
                with PeakMemory() as peak:
                    times[name].append(wall_seconds(fn))
                memory[name] = peak.allocator_peak_growth
            else:
                times[name].append(wall_seconds(fn))
        if time.perf_counter() - started > settings["budget_seconds"]:
            break
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "T": T, "K": None if K == FORWARD else K, "jit_compile": jit_compile,
        "estimator": "forward" if K == FORWARD else "reverse", "num_hyperparameters": NUM_HYPERPARAMETERS,
        "median_seconds": median,
        "times_seconds": times,
        "rounds": len(times["bilevel"]),
        "train_step_traces": traces[0],
        "first_call_seconds": first,
        "allocator_peak_growth_bytes": memory,
        "ratio_to_plain_per_step": median["bilevel"] / median["plain_per_step"],
        "ratio_to_plain_fused": median["bilevel"] / median["plain_fused"],
        "target": _target(T, K),
        "num_params": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
    }


def format_table(results: list[dict]) -> str:
    lines = [
        "XLA   T   K | hyper-iter ms | T plain steps ms (per-step / fused) | ratio per-step | ratio fused | target | peak MB bilevel / plain",
        "-" * 122,
    ]
    for r in results:
        m, mem = r["median_seconds"], r["allocator_peak_growth_bytes"]
        target = "" if r["target"] is None else f"<= {r['target']:.1f} {verdict(r['ratio_to_plain_per_step'] <= r['target'])}"
        lines.append(
            f"{'on ' if r['jit_compile'] else 'off'} {r['T']:3d} {'fwd' if r['K'] is None else r['K']:>3} | {1e3 * m['bilevel']:13.1f} | {1e3 * m['plain_per_step']:16.1f} / {1e3 * m['plain_fused']:8.1f}"
            f"         | {r['ratio_to_plain_per_step']:14.2f} | {r['ratio_to_plain_fused']:11.2f} | {target:10s} | "
            f"{mib(mem['bilevel'])} / {mib(mem['plain_per_step'])}"
        )
    return "\n".join(lines)


def make_settings(configs: list, repeats: int, quick: bool, budget_seconds: float = 120.0) -> dict:
    """configs: ["TxK", ...] ("Txf": forward mode); `repeats` timed rounds per configuration, fewer
    (at least one) once they took `budget_seconds`. --quick: tiny network and budgets (the program's test)."""
    settings = {
        "configs": [parse_config(c) for c in configs],
        "image_size": 28, "batch_size": 128, "filters": 32, "dense_units": 128,
        "repeats": repeats, "budget_seconds": budget_seconds, "seed": 0, "jit_compile": [True, False],
    }
    if quick:
        settings.update(configs=[(2, 1), (1, 1), (2, FORWARD)], image_size=12, batch_size=16, filters=4, dense_units=8, repeats=2)
    return settings


def run(settings: dict, output_dir: str) -> dict:
    report = SuiteReport("online", output_dir, "online_results.json")
    results = [measure(T, K, settings, jit) for jit in settings["jit_compile"] for T, K in settings["configs"]]
    return report.write({**settings, "configs": [list(c) for c in settings["configs"]]}, results,
                        format_table(results))


@dataclasses.dataclass
class OnlineOptions:
    """The flag this suite adds to `python -m experiments.benchmark` too."""

    online_configs: Sequence[str] = option(("1x1", "20x1", "20x5", "20x20", "1xf", "20xf"),
                                           "TxK configurations of the online step; Txf: forward mode "
                                           "(estimator='forward').")
    online_budget_seconds: float = option(120.0, "A configuration's timed rounds stop after this many seconds "
                                          "(at least one round; XLA:CPU's T = 20 rows take about a minute "
                                          "per hyper-iteration).")


@dataclasses.dataclass
class Config(OnlineOptions):
    repeats: int = option(7, "Timed calls per configuration after warm-up (median reported).")
    output_dir: str = option("out/benchmark", "Where online_results.json is written.")
    preset: str = "full"


def settings_of(cfg: Any) -> dict:
    """The suite's settings from a Config with its flags and --repeats (ValueError names a bad flag)."""
    try:
        return make_settings(cfg.online_configs, cfg.repeats, cfg.preset == "quick", cfg.online_budget_seconds)
    except ValueError:
        raise ValueError(f"--online_configs: each entry is TxK or Txf (e.g. 20x5), got {list(cfg.online_configs)}") from None


# --preset=quick: tiny sizes and budgets, to test the program.
PROGRAM = program.suite("benchmarks.online", Config, settings_of, run)


if __name__ == "__main__":
    program.start(PROGRAM)
