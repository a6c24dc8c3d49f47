"""A few hyper-iterations of a BilevelTrainer under a tf.distribute strategy, run by
tests/test_distribute.py as a subprocess (strategies must be set up before TF initializes).

    python tests/distribute_worker.py --mode mirrored --output OUT.npz
        MirroredStrategy over 2 logical CPU devices of this process.
    TF_CONFIG=... python tests/distribute_worker.py --mode multi_worker --output OUT.npz
        MultiWorkerMirroredStrategy, one replica per worker process (TF_CONFIG set by the test).

The problem (importable without side effects, the test computes its single-device
reference with it): float64 few-shot episodes, meta-batches of 4 tasks (2 per replica), a
hyper model with BatchNorm, a learned inner learning rate and L2 strength, w0 redrawn per
task, and plain SGD on λ, so that λ after a few steps carries the hypergradients.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

TASKS_PER_STEP = 4  # the global meta-batch: 2 tasks per replica on 2 replicas
STEPS = 3  # hyper-iterations
DIM, WAYS, SHOTS, QUERIES = 5, 3, 2, 3


def episode(index):
    """Few-shot task `index` (support, query), drawn from stateless seeds: the same tasks
    wherever and in whichever process it runs."""
    import tensorflow as tf

    index = tf.cast(index, tf.int64)
    centers = tf.random.stateless_normal([WAYS, DIM], seed=[index, 0], dtype=tf.float64)
    xs = centers[:, None, :] + 0.5 * tf.random.stateless_normal([WAYS, SHOTS, DIM], seed=[index, 1], dtype=tf.float64)
    xq = centers[:, None, :] + 0.5 * tf.random.stateless_normal([WAYS, QUERIES, DIM], seed=[index, 2], dtype=tf.float64)
    support = (tf.reshape(xs, [-1, DIM]), tf.repeat(tf.range(WAYS), SHOTS))
    query = (tf.reshape(xq, [-1, DIM]), tf.repeat(tf.range(WAYS), QUERIES))
    return support, query


def task_stream(task_indices=None):
    """Meta-batches of TASKS_PER_STEP episodes; shard by DATA across workers (a range-based
    pipeline has no files to shard)."""
    import tensorflow as tf

    indices = tf.data.Dataset.range(TASKS_PER_STEP * STEPS) if task_indices is None else (
        tf.data.Dataset.from_tensor_slices(np.asarray(task_indices, np.int64)))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    per_step = TASKS_PER_STEP if task_indices is None else len(task_indices) // STEPS
    return indices.map(episode).batch(per_step, drop_remainder=True).with_options(options)


def make_trainer(jit_compile: bool):
    """The trainer, with initial weights from NumPy (no dependence on Keras' RNG state)."""
    import keras
    import tensorflow as tf

    import tf_bilevel as tfb
    from tf_bilevel.keras import losses

    rng = np.random.default_rng(0)
    f64 = "float64"
    constant = lambda *shape: keras.initializers.Constant(rng.normal(size=shape) * 0.5)  # noqa: E731
    hyper = keras.Sequential([
        keras.layers.Dense(4, activation="tanh", kernel_initializer=constant(DIM, 4), bias_initializer=constant(4), dtype=f64),
        keras.layers.BatchNormalization(dtype=f64),
    ])
    inner = keras.Sequential([keras.layers.Dense(WAYS, kernel_initializer=constant(4, WAYS), dtype=f64)])
    ce = losses.sparse_categorical_crossentropy
    trainer = tfb.BilevelTrainer(
        inner, hyper_model=hyper, inner_loss=ce, outer_loss=ce, steps=4, truncate=2, meta_batch=True,
        inner_init="random", seed=3,
        hyperparameters={"l2": tfb.Hyperparameter(0.05, transform="softplus", dtype=f64)},
        inner_regularizer=lambda w, hp: hp["l2"] * tf.reduce_sum(tf.square(w[0])),
        inner_learning_rate=tfb.Hyperparameter(0.3, transform="softplus", dtype=f64))
    trainer.compile(optimizer=keras.optimizers.SGD(0.5), jit_compile=jit_compile)
    return trainer


def train(trainer, tasks) -> dict:
    """STEPS hyper-iterations; λ (raw variables), the hyper model's BatchNorm statistics and
    the logged outer losses, as NumPy."""
    history = trainer.fit(tasks, epochs=STEPS, steps_per_epoch=1, verbose=0)
    flat = lambda variables: np.concatenate([np.zeros(0)] + [np.ravel(v.numpy()) for v in variables])  # noqa: E731
    return {
        "hyperparameters": flat(trainer.hyper_variables),
        "hyper_state": flat(trainer.hyper_model.non_trainable_variables),
        "loss": np.asarray(history.history["loss"], np.float64),
        "meta_step": np.asarray(trainer.meta_step.numpy()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["mirrored", "multi_worker"], required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    import tensorflow as tf

    if args.mode == "mirrored":
        # Before anything initializes the devices.
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    else:
        if "TF_CONFIG" not in os.environ:
            sys.exit("--mode multi_worker needs TF_CONFIG (set by tests/test_distribute.py)")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    if strategy.num_replicas_in_sync != 2:
        sys.exit(f"expected 2 replicas, got {strategy.num_replicas_in_sync}")

    with strategy.scope():
        trainer = make_trainer(jit_compile=False)  # XLA:CPU cannot compile the cross-replica step
    result = train(trainer, task_stream())
    result["num_replicas"] = np.asarray(strategy.num_replicas_in_sync)
    np.savez(args.output, **result)
    print(f"{args.mode}: {STEPS} steps on {strategy.num_replicas_in_sync} replicas, loss {result['loss']}")


if __name__ == "__main__":
    main()
