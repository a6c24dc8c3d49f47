"""The one-shot classification network of the paper (Fig. 8, appendix G.3) and its bilevel problem.

Fig. 8: four blocks "conv 3×3, 64 kernels → max-pool 2×2 → BatchNorm → ReLU", then a dense
k-way classifier. With 28×28 inputs the spatial size goes 28 → 14 → 7 → 3 → 1, so the last
block outputs a 64-d vector.

* hyper-representation (λ_l1, λ_l2): blocks 1–2, frozen in the inner loop (`build_hyper_model`);
* task-specific layers w = {w_l3, w_l4, w_l5}: blocks 3–4 and the dense classifier
  (`build_inner_model`), fine-tuned on each task's support set S.

Counting (64 channels, 5-way): λ_l = 37,696 (conv kernels + BN scale/offset), w = 74,309,
so λ = λ_l ∪ c ∪ ρ ∪ γ ≈ 112k and w ≈ 74k, matching the appendix's "≈110k hyperparameters
and ≈75k parameters". Convolutions have no bias: BatchNorm's offset follows them (max-pool
commutes with a per-channel constant), so a bias would be redundant.

The inner problem of §4.3 (one task):

    g(w, λ) = mean_{(x,y)∈S} CE(nn(x; w, λ), y) + Σ_{j=1}^{3} ρ_j ‖w_j − c_j‖²,
    f(w, λ) = mean_{(x,y)∈Q} CE(nn(x; w, λ), y),

with T steps of gradient descent w_{t+1} = w_t − γ ∇_w g. The paper does not say where w
starts; we start every task from the same fixed w_0 (the inner layers' initial weights: Glorot
kernels, zero classifier), and the learned centers c (initialized at w_0) carry what is
meta-learned about w. This keeps λ at the paper's size (≈110k; a separately learned w_0 would
add another 74k) and is what `tf_bilevel.BilevelTrainer(inner_init="fixed")` does; w_0 = c
would need an `inner_init="centers"` option in the trainer. One ρ_j per layer w_j (3), as in
§4.3. ρ_j = softplus(ν_j) and γ = softplus(ν_γ) stay positive under plain outer gradient
steps on the raw ν. The paper sums the loss over S; we average it (γ and ρ are learned, so
this is a fixed rescaling of both).

BatchNorm uses the statistics of the batch being processed, per task: the support set inside
the inner loop and the query set for f, as in MAML and Franceschi et al. (transductive BN),
with a layer whose second derivatives are exact (`BatchStatisticsNormalization`).

The hyper-representation is applied once per task, outside the inner loop (λ_l is fixed
there): its outputs φ_S = φ(x_S; λ_l) and φ_Q are handed to the core as hyperparameters,
and d_{λ_l} f = (∂φ/∂λ_l)ᵀ d_φ f by the chain rule. This is exact, and K-RMD commutes with
it (the B_t terms of Eq. 8 for λ_l are (∂φ/∂λ_l)ᵀ times those for φ).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

import tf_bilevel as tfb
from experiments.data import episodes, tfds_offline
from experiments.data import kanji_strokes
from tf_bilevel.keras import inverse_softplus, losses
from tf_bilevel.keras.layers import batch_moments

__all__ = [
    "BatchStatisticsNormalization",
    "FewShotProblem",
    "MetaData",
    "Task",
    "as_task",
    "as_trainer_element",
    "build_hyper_model",
    "build_inner_model",
    "check_export",
    "cross_entropy",
    "evaluate_tasks",
    "export_and_check",
    "layer_groups",
    "load_meta_data",
    "meta_loss",
    "relative_error_vs_k",
    "scaled_rho",
]


# --------------------------------------------------------------------------
# Fig. 8 network (Keras 3 layers, called functionally with stateless_call).
# --------------------------------------------------------------------------


class BatchStatisticsNormalization(keras.layers.Layer):
    """BatchNorm that always normalizes with the statistics of the batch it is given (one
    task's support or query set), in training and in inference, with learned scale/offset.

    Its moments are `tf_bilevel.keras.layers.batch_moments`, those of
    `tf_bilevel.keras.BatchNormalization` in training mode: the variance is not taken around
    `stop_gradient(mean)` as in `keras.layers.BatchNormalization`, whose second derivatives
    are wrong, and RMD differentiates ∇_w g once more (the A_t, B_t of Eq. 6; see
    tests/test_omniglot.py). Why not `tf_bilevel.keras.BatchNormalization` itself: that one
    keeps moving statistics and serves with them, while here the exported model serves
    exactly the per-task (transductive) embeddings used in meta-training and meta-testing;
    and a layer without state runs in the trainer's stacked meta-batch path
    (`tf_bilevel.keras.batched`, through `batched_call`).
    """

    def __init__(self, epsilon: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        channels = input_shape[-1]
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros")

    def call(self, x):
        mean, variance = batch_moments(x, list(range(len(x.shape) - 1)), keepdims=True)
        return (x - mean) * keras.ops.rsqrt(variance + self.epsilon) * self.gamma + self.beta

    def batched_call(self, weights, x):
        """B tasks at once (tf_bilevel.keras.batched): x [B, n, ..., C], γ and β [B, C], each
        task normalized with its own batch statistics."""
        mean, variance = batch_moments(x, list(range(1, len(x.shape) - 1)), keepdims=True)
        shape = [-1] + [1] * (len(x.shape) - 2) + [x.shape[-1]]
        gamma, beta = (keras.ops.reshape(w, shape) for w in weights)
        return (x - mean) * keras.ops.rsqrt(variance + self.epsilon) * gamma + beta

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def _conv_block(channels: int, name: str, seed: int, dtype: str) -> keras.Sequential:
    """conv 3×3 → max-pool 2×2 → BatchNorm → ReLU (Fig. 8)."""
    return keras.Sequential(
        [
            keras.layers.Conv2D(channels, 3, padding="same", use_bias=False, dtype=dtype,
                                kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
                                name=f"{name}_conv"),
            keras.layers.MaxPooling2D(2, dtype=dtype, name=f"{name}_pool"),
            BatchStatisticsNormalization(epsilon=1e-3, dtype=dtype, name=f"{name}_bn"),
            keras.layers.ReLU(dtype=dtype, name=f"{name}_relu"),
        ],
        name=name,
    )


def build_hyper_model(
    *, channels: int = 64, image_size: int = 28, image_channels: int = 1, seed: int = 0,
    dtype: str = "float32",
) -> keras.Sequential:
    """Blocks 1–2 of Fig. 8: image [B, H, W, C] → hyper-representation [B, H/4, W/4, channels]."""
    model = keras.Sequential(
        [keras.Input((image_size, image_size, image_channels), dtype=dtype)]
        + [_conv_block(channels, f"block{i}", seed + i, dtype) for i in (1, 2)],
        name="hyper_representation",
    )
    return model


def build_inner_model(
    n_way: int, *, channels: int = 64, input_size: int = 7, seed: int = 0, dtype: str = "float32",
) -> keras.Sequential:
    """Blocks 3–4 and the dense k-way classifier of Fig. 8: w = {w_l3, w_l4, w_l5}.

    The dense layer starts at zero (uniform predictions), the usual choice for a classifier
    that every task re-trains from the same starting point.
    """
    return keras.Sequential(
        [keras.Input((input_size, input_size, channels), dtype=dtype)]
        + [_conv_block(channels, f"block{i}", seed + i, dtype) for i in (3, 4)]
        + [
            keras.layers.Flatten(dtype=dtype, name="flatten"),
            keras.layers.Dense(n_way, kernel_initializer="zeros", dtype=dtype, name="classifier"),
        ],
        name="task_layers",
    )


def layer_groups(model: keras.Model) -> list[int]:
    """For each trainable variable of `model` (in order), the index j of its layer w_j
    (a conv block or the classifier): ρ_j and c_j are per layer, as in §4.3."""
    groups, j = [], 0
    for layer in model.layers:
        n = len(layer.trainable_variables)
        if n:
            groups += [j] * n
            j += 1
    if len(groups) != len(model.trainable_variables):
        raise ValueError("could not attribute every trainable variable to a top-level layer")
    return groups


def cross_entropy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Mean k-way cross-entropy: the trainer's loss (`tf_bilevel.keras.losses`, log_softmax
    based, twice differentiable on every TF version: RMD differentiates ∇_w g once more)."""
    return tf.reduce_mean(losses.sparse_categorical_crossentropy(labels, logits))


# --------------------------------------------------------------------------
# The bilevel problem on plain tensors.
# --------------------------------------------------------------------------


class Task(NamedTuple):
    support_x: tf.Tensor
    support_y: tf.Tensor
    query_x: tf.Tensor
    query_y: tf.Tensor


def as_task(batch: dict) -> Task:
    """A `episodes.make_episodes` element as a Task."""
    return Task(batch["support_x"], batch["support_y"], batch["query_x"], batch["query_y"])


def as_trainer_element(batch: dict) -> tuple:
    """A `episodes.make_episodes` element as the BilevelTrainer's ((x_inner, y_inner), (x_outer, y_outer))."""
    return (batch["support_x"], batch["support_y"]), (batch["query_x"], batch["query_y"])


class MetaData:
    """Images, labels and the disjoint class pools ("train", "val", "test") tasks are drawn from."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, pools: dict, description: str):
        self.images, self.labels, self.pools, self.description = images, labels, pools, description

    def episodes(self, pool: str, *, n_way: int, k_shot: int, n_query: int, seed: int,
                 num_episodes: Optional[int], meta_batch_size: Optional[int]) -> tf.data.Dataset:
        return episodes.make_episodes(self.images, self.labels, self.pools[pool], n_way=n_way, k_shot=k_shot,
                                      n_query=n_query, seed=seed, num_episodes=num_episodes,
                                      meta_batch_size=meta_batch_size)

    def training_stream(self, *, n_way: int, k_shot: int, n_query: int, meta_batch_size: int,
                        seed: int) -> Callable[[Any], tf.data.Dataset]:
        """`start -> dataset` of the trainer's meta-batches from hyper-iteration `start` on (the
        episodes of `episodes("train", ...)`, as trainer elements): `trainer.resumable` jumps
        to a resumed run's hyper-iteration instead of drawing and dropping the earlier ones."""
        sampler = episodes.episode_sampler(self.images, self.labels, self.pools["train"], n_way=n_way,
                                           k_shot=k_shot, n_query=n_query, seed=seed)
        return tfb.keras.episodes(lambda i: as_trainer_element(sampler(i)), batch=meta_batch_size)


def load_meta_data(dataset: str, *, data_dir: Optional[str], local_dir: Optional[str], image_size: int,
                   class_split: Sequence[int], rotations: bool, seed: int) -> MetaData:
    """Omniglot (tfds, train + test), kanji_strokes (its Omniglot-shaped offline substitute,
    experiments/data/kanji_strokes.py) or (fashion_)mnist (train + test) with disjoint class pools of
    `class_split` = (train, val, test) base classes; `rotations`: each class also as its 90/180/270°
    rotations (new classes in the same pool)."""
    if dataset == "omniglot":
        images, labels = episodes.load_omniglot(data_dir=data_dir, image_size=image_size)
        source = "tfds omniglot (train + test), grayscale"
    elif dataset == kanji_strokes.NAME:
        images, labels = kanji_strokes.load_kanji_strokes(data_dir=data_dir, image_size=image_size)
        source = (f"tfds {kanji_strokes.NAME} ({kanji_strokes.NUM_CHARACTERS} characters x {kanji_strokes.NUM_DRAWERS} "
                  f"drawers, rendered from {kanji_strokes.DEBIAN_PACKAGE}'s strokes; synthetic, not Omniglot), "
                  f"{kanji_strokes.IMAGE_SIZE}x{kanji_strokes.IMAGE_SIZE} resized")
    else:
        data = tfds_offline.load_image_classification(dataset, data_dir=data_dir, local_dir=local_dir,
                                                  image_size=None if image_size == 28 else image_size)
        images = np.concatenate([data["train"][0], data["test"][0]])
        labels = np.concatenate([data["train"][1], data["test"][1]])
        source = f"tfds {dataset} (train + test)"
    base = episodes.class_split(labels, dict(zip(("train", "val", "test"), class_split)), seed=seed)
    pools = base
    if rotations:
        num_base = int(labels.max()) + 1
        images, labels = episodes.add_rotations(images, labels)
        pools = {k: episodes.rotated_classes(v, num_base) for k, v in base.items()}
    description = (f"{source}, {image_size}x{image_size}; base classes { {k: len(v) for k, v in base.items()} }"
                   + (f", x4 by 90-degree rotations -> { {k: len(v) for k, v in pools.items()} } classes"
                      if rotations else ""))
    return MetaData(images, labels, pools, description)


def evaluate_tasks(trainer: Any, tasks: Sequence[Task], batch_size: int) -> np.ndarray:
    """Query accuracy of each task after the trainer's T inner steps on its support set (trainer.predict)."""
    stacked = Task(*[tf.stack(list(x)) for x in zip(*tasks)])
    # Full task elements (predict does not use the query labels).
    ds = tf.data.Dataset.from_tensor_slices(
        ((stacked.support_x, stacked.support_y), (stacked.query_x, stacked.query_y))).batch(batch_size)
    logits = trainer.predict(ds, verbose=0)
    return (np.argmax(logits, axis=-1) == stacked.query_y.numpy()).mean(axis=1)


class FewShotProblem:
    """g, f and γ of §4.3 on plain tensors, for `tfb.hypergradient_fn`: an independent
    implementation of what `build_trainer` trains, used as the reference in the tests.

    Raw hyperparameters:
      "hyper":   the hyper model's trainable values (λ_l1, λ_l2);
      "centers": c, one tensor per inner trainable variable (the structure of w);
      "rho_raw": ν_ρ [3], ρ_j = softplus(ν_ρ,j) (one strength per layer w_j);
      "gamma_raw": ν_γ [], γ = softplus(ν_γ).
    The core sees λ_core = {"phi_support", "phi_query", "centers", "rho", "gamma"}: the
    hyper-representation of the task's support and query images and the positive values.
    w_0 = the inner model's stored weights (`self.w0`), fixed: there is no B_0 term.
    """

    def __init__(self, hyper_model: keras.Model, inner_model: keras.Model):
        self.hyper_model = hyper_model
        self.inner_model = inner_model
        self.groups = layer_groups(inner_model)
        self.num_layers = max(self.groups) + 1
        self.hyper_state = [v.value for v in hyper_model.non_trainable_variables]
        self.inner_state = [v.value for v in inner_model.non_trainable_variables]
        self.w0 = [tf.identity(v.value) for v in inner_model.trainable_variables]

    # -- initial values -------------------------------------------------------------
    def initial_raw(self, *, init_rho: float, init_gamma: float) -> dict:
        dtype = self.w0[0].dtype
        return {
            "hyper": [tf.identity(v.value) for v in self.hyper_model.trainable_variables],
            "centers": [tf.identity(w) for w in self.w0],
            "rho_raw": tf.fill([self.num_layers], tf.constant(float(inverse_softplus(init_rho)), dtype)),
            "gamma_raw": tf.constant(float(inverse_softplus(init_gamma)), dtype),
        }

    # -- networks ---------------------------------------------------------------------
    def represent(self, hyper_values: Sequence[tf.Tensor], images: tf.Tensor) -> tf.Tensor:
        """φ(x; λ_l): blocks 1–2 with the batch statistics of `images` (training-mode BN)."""
        out, _ = self.hyper_model.stateless_call(list(hyper_values), self.hyper_state, images, training=True)
        return out

    def logits(self, w: Sequence[tf.Tensor], features: tf.Tensor) -> tf.Tensor:
        """nn(x; w, λ) given φ(x; λ_l): blocks 3–4 (batch-statistics BN) and the classifier."""
        out, _ = self.inner_model.stateless_call(list(w), self.inner_state, features, training=True)
        return out

    def core_hparams(self, raw: dict, support_x: tf.Tensor, query_x: tf.Tensor, rho_scale: Any = 1.0) -> dict:
        """λ_core from raw λ (differentiable). `rho_scale=0` gives the unregularized model ρ = 0."""
        rho = tf.nn.softplus(raw["rho_raw"])
        return {
            "phi_support": self.represent(raw["hyper"], support_x),
            "phi_query": self.represent(raw["hyper"], query_x),
            "centers": list(raw["centers"]),
            "rho": rho * tf.cast(rho_scale, rho.dtype),
            "gamma": tf.nn.softplus(raw["gamma_raw"]),
        }

    def proximal(self, w: Sequence[tf.Tensor], centers: Sequence[tf.Tensor], rho: tf.Tensor) -> tf.Tensor:
        """Σ_j ρ_j ‖w_j − c_j‖², w_j = all variables of layer j."""
        sq = tf.stack([tf.reduce_sum(tf.square(a - c)) for a, c in zip(w, centers)])
        return tf.reduce_sum(rho * tf.math.unsorted_segment_sum(sq, self.groups, self.num_layers))

    # -- the core's functions -------------------------------------------------------------
    def inner_loss(self, w: list, hp: dict, support_y: tf.Tensor) -> tf.Tensor:
        """g(w, λ) = mean CE on S + Σ_j ρ_j ‖w_j − c_j‖² (§4.3)."""
        loss = cross_entropy(self.logits(w, hp["phi_support"]), support_y)
        return loss + self.proximal(w, hp["centers"], hp["rho"])

    def outer_loss(self, w: list, hp: dict, query_y: tf.Tensor) -> tf.Tensor:
        """f(w, λ) = mean CE on Q (depends on λ_l directly through φ_Q: ∇_λ f ≠ 0)."""
        return cross_entropy(self.logits(w, hp["phi_query"]), query_y)

    @staticmethod
    def learning_rate(step: tf.Tensor, hp: dict) -> tf.Tensor:
        del step
        return hp["gamma"]

    def hypergradient_fn(self, *, steps: int, truncate: Optional[int]) -> tfb.Hypergradient:
        """K-RMD (truncate=K, Eq. 8) or full RMD (None, Eq. 6) for one task; graph-building
        `.compute` / `.solve_uncompiled` are used inside our own compiled functions."""
        return tfb.hypergradient_fn(
            self.inner_loss, self.outer_loss, steps=steps, learning_rate=self.learning_rate,
            truncate=truncate, jit_compile=False,
        )

    # -- the same problem as a tf_bilevel.BilevelTrainer ----------------------------------
    def build_trainer(self, *, steps: int, truncate: Optional[int], init_rho: float, init_gamma: float,
                      diagnostics_every: Optional[int] = None, seed: int = 0,
                      meta_batch_mode: str = "auto") -> "tfb.BilevelTrainer":
        """A `BilevelTrainer` (meta-batch of tasks) for this problem: named hyperparameters
        "c" (centers) and "rho" (softplus), learned γ (softplus), w_0 = stored inner weights."""
        from tf_bilevel.keras import Hyperparameter

        dtype = self.w0[0].dtype.name

        def proximal(w, hp):  # the trainer's inner_regularizer: Σ_j ρ_j ‖w_j − c_j‖²
            return self.proximal(w, hp["c"], hp["rho"])

        return tfb.BilevelTrainer(
            self.inner_model, hyper_model=self.hyper_model,
            inner_loss=losses.sparse_categorical_crossentropy,
            outer_loss=losses.sparse_categorical_crossentropy,
            steps=steps, truncate=truncate, meta_batch=True, inner_init="fixed",
            hyperparameters={
                "c": [Hyperparameter(w.numpy(), dtype=dtype) for w in self.w0],
                "rho": Hyperparameter(np.full([self.num_layers], init_rho), transform="softplus", dtype=dtype),
            },
            inner_regularizer=proximal,
            inner_learning_rate=Hyperparameter(init_gamma, transform="softplus", dtype=dtype),
            diagnostics_every=diagnostics_every, seed=seed, meta_batch_mode=meta_batch_mode,
        )


class scaled_rho:
    """Context manager: the trainer's ρ_j multiplied by `scale` while inside (ρ = softplus(ν):
    ν is set to softplus⁻¹(scale·ρ); scale = 0 gives ρ = 0 exactly, and d f/dν_ρ = 0, through
    a ν so negative that softplus and its derivative underflow to 0), restored on exit."""

    def __init__(self, trainer: Any, scale: float):
        names = [v.name.split("/")[-1] for v in trainer.hyper_variables]
        if "user_rho" not in names:
            raise ValueError(f"the trainer has no hyperparameter 'rho' (its variables: {names})")
        self.variable = trainer.hyper_variables[names.index("user_rho")]
        self.scale = float(scale)

    def __enter__(self):
        self.saved = tf.identity(self.variable)
        rho = tf.cast(tf.nn.softplus(self.saved), tf.float64) * self.scale
        raw = inverse_softplus(np.maximum(rho.numpy(), 1e-300)) if self.scale > 0 else np.full(rho.shape, -1e4)
        self.variable.assign(tf.cast(raw, self.variable.dtype))
        return self

    def __exit__(self, *exc):
        self.variable.assign(self.saved)
        return False


def meta_loss(problem: FewShotProblem, raw: dict, task: Task, steps: int, rho_scale: float = 1.0) -> tf.Tensor:
    """F(λ) = f(w_T(λ), λ) computed directly (the representation re-applied inside the loop):
    an independent forward reference for finite differences in the tests."""
    gamma = tf.nn.softplus(raw["gamma_raw"])
    rho = tf.nn.softplus(raw["rho_raw"]) * rho_scale

    def g(w):
        feats = problem.represent(raw["hyper"], task.support_x)
        loss = cross_entropy(problem.logits(w, feats), task.support_y)
        for a, c, j in zip(w, raw["centers"], problem.groups):
            loss += rho[j] * tf.reduce_sum(tf.square(a - c))
        return loss

    w = list(problem.w0)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            tape.watch(w)
            loss = g(w)
        w = [a - gamma * d for a, d in zip(w, tape.gradient(loss, w))]
    return cross_entropy(problem.logits(w, problem.represent(raw["hyper"], task.query_x)), task.query_y)


# --------------------------------------------------------------------------
# SavedModel export check.
# --------------------------------------------------------------------------


def check_export(hyper_model: keras.Model, path: str, images: np.ndarray,
                 training_embeddings: Optional[np.ndarray] = None) -> dict:
    """Reloads a SavedModel of the hyper-representation (tf.saved_model.load and
    keras.layers.TFSMLayer, endpoint "serve") and compares its embeddings of `images` bit for
    bit with the in-memory model's, and optionally with those computed in meta-training."""
    x = tf.constant(images, hyper_model.inputs[0].dtype)
    reference = tf.function(lambda x: hyper_model(x, training=False), autograph=False)(x).numpy()
    restored = tf.saved_model.load(path)  # keep a reference: its functions use its variables
    loaded = restored.serve(x).numpy()
    via_layer = np.asarray(keras.layers.TFSMLayer(path, call_endpoint="serve")(x))
    out = {
        "path": path,
        "num_images": int(len(images)),
        "embedding_shape": list(reference.shape),
        "saved_model_load_bit_identical": bool(np.array_equal(reference, loaded)),
        "tfsmlayer_bit_identical": bool(np.array_equal(reference, via_layer)),
        "max_abs_diff_saved_model_load": float(np.max(np.abs(reference - loaded))),
        "max_abs_diff_tfsmlayer": float(np.max(np.abs(reference - via_layer))),
    }
    if training_embeddings is not None:
        out["bit_identical_to_meta_training_representation"] = bool(np.array_equal(training_embeddings, loaded))
    return out


def export_and_check(problem: FewShotProblem, trainer: Any, task: Task, path: str) -> dict:
    """trainer.export, reloaded and compared bit for bit with the in-memory hyper model and with
    the per-task representation used in meta-training, on one task's images."""
    images = np.concatenate([task.support_x.numpy(), task.query_x.numpy()])
    trainer.export(path, verbose=False)
    hyper = problem.hyper_model
    per_task = tf.function(problem.represent, autograph=False)([v.value for v in hyper.trainable_variables],
                                                               tf.constant(images)).numpy()
    return {"endpoint": "serve (BatchNorm with the statistics of the served batch)",
            **check_export(hyper, path, images, training_embeddings=per_task)}


# --------------------------------------------------------------------------
# Fig. 7, plot 4: the error of K-RMD as a function of K.
# --------------------------------------------------------------------------


def relative_error_vs_k(problem: FewShotProblem, trainer: Any, tasks: Task, steps: int,
                        truncations: Sequence[int], rho_scales: dict, jit_compile: bool) -> dict:
    """‖h_K − d_λ f‖ / ‖d_λ f‖ at the trainer's λ on a fixed meta-batch, per K and per ρ scale
    (`rho_scales`: label -> factor): `hypergradient_of` of one BilevelTrainer per K on the same
    models, sharing that λ (the gradient with respect to the raw variables ν, as the optimizer
    receives it)."""
    element = ((tasks.support_x, tasks.support_y), (tasks.query_x, tasks.query_y))
    lam = [tf.identity(v) for v in trainer.hyper_variables]
    trainers = {}
    for k in sorted(set(truncations) | {steps}):
        t = problem.build_trainer(steps=steps, truncate=None if k == steps else k, init_rho=1.0, init_gamma=1.0)
        t.compile(jit_compile=jit_compile)
        t.build_from_spec(tf.nest.map_structure(lambda x: tf.TensorSpec(x.shape, x.dtype), element))
        for variable, value in zip(t.hyper_variables, lam):
            variable.assign(value)
        trainers[k] = t
    out = {}
    for label, scale in rho_scales.items():
        hypergradients = {}
        for k, t in trainers.items():
            with scaled_rho(t, scale):
                hypergradients[k] = t.hypergradient_of(element)
        exact = hypergradients[steps]
        out[label] = {
            "K": [int(k) for k in truncations],
            "relative_error": [float(tfb.diagnostics.relative_error(hypergradients[k], exact)) for k in truncations],
            "cosine": [float(tfb.diagnostics.cosine_similarity(hypergradients[k], exact)) for k in truncations],
            "exact_norm": float(tfb.diagnostics.global_norm(exact)),
        }
    return out
