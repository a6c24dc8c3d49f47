"""Fixed image features for linear models: pixels, or a pretrained CNN's pooled layer.

Appendix G.2 of the paper extracts features "from the output of the average pooling
layer in ResNet-18 trained on ImageNet", with the ResNet pre-processing. Keras offers no
ResNet-18; the closest is `keras.applications.ResNet50` (same residual family, same
global-average-pooled head; 2048-d instead of 512-d), the default here. MobileNetV2
(1280-d) is offered as a lighter alternative.

ImageNet weights are fetched by Keras on first use; `ensure_weights_available` fails in
seconds (instead of hanging in a download) when they are neither cached nor reachable.
`weights=None` builds a randomly initialized network: only for testing the code path.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NamedTuple, Optional

import numpy as np
import tensorflow as tf

__all__ = [
    "BACKBONES",
    "FeaturesUnavailableError",
    "build_extractor",
    "ensure_weights_available",
    "extract_features",
    "load_features",
    "normalize_features",
    "pixel_features",
]

WEIGHTS_HOST = ("storage.googleapis.com", 443)  # where Keras downloads application weights


class FeaturesUnavailableError(RuntimeError):
    """Pretrained weights are neither cached locally nor downloadable."""


class Backbone(NamedTuple):
    constructor: Callable[..., "object"]
    preprocess: Callable[[tf.Tensor], tf.Tensor]
    notop_weights_file: str  # file name Keras caches in ~/.keras/models
    dim: int


def _backbones() -> dict[str, Backbone]:
    import keras  # Keras 3; imported lazily so `pixels` runs never build Keras apps.

    apps = keras.applications
    return {
        "resnet50": Backbone(
            apps.ResNet50, apps.resnet50.preprocess_input,
            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", 2048),
        "mobilenet_v2": Backbone(
            apps.MobileNetV2, apps.mobilenet_v2.preprocess_input,
            "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5", 1280),
    }


BACKBONES = ("resnet50", "mobilenet_v2")


def ensure_weights_available(backbone: str, weights: str | None) -> None:
    """Raise `FeaturesUnavailableError` fast if ImageNet weights cannot be obtained."""
    if weights != "imagenet":
        if weights is not None and not os.path.isfile(weights):
            raise FeaturesUnavailableError(f"weights file {weights!r} does not exist")
        return
    cached = os.path.join(os.path.expanduser("~"), ".keras", "models",
                          _backbones()[backbone].notop_weights_file)
    if os.path.isfile(cached):
        return
    from experiments.data.sources import network_reachable  # same fast probe as the data layer

    if not network_reachable(*WEIGHTS_HOST):
        raise FeaturesUnavailableError(
            f"ImageNet weights for {backbone} are not cached ({cached}) and "
            f"{WEIGHTS_HOST[0]} is unreachable. Run once on a machine with internet (Keras "
            "caches the file there; copy it to ~/.keras/models/), pass --weights=PATH to a "
            "local .h5/.weights.h5 file, or use --features=pixels.")


def build_extractor(backbone: str = "resnet50", *, weights: str | None = "imagenet",
                    image_size: int = 224) -> Callable[[tf.Tensor], tf.Tensor]:
    """A compiled function: uint8/float images [N, H, W, C] (C = 1 or 3) -> pooled features.

    Images are resized to `image_size`² (bilinear), gray images are repeated to RGB, and
    the backbone's own ImageNet pre-processing is applied (caffe-style mean subtraction
    for ResNet50), as the paper does for ResNet.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    ensure_weights_available(backbone, weights)
    spec = _backbones()[backbone]
    model = spec.constructor(include_top=False, weights=weights, pooling="avg",
                             input_shape=(image_size, image_size, 3))

    @tf.function(reduce_retracing=True)
    def extract(images: tf.Tensor) -> tf.Tensor:
        x = tf.cast(images, tf.float32)
        if x.shape[-1] == 1:
            x = tf.repeat(x, 3, axis=-1)
        x = tf.image.resize(x, (image_size, image_size))
        return model(spec.preprocess(x), training=False)

    extract.dim = spec.dim
    return extract


def extract_features(images: np.ndarray, extractor: Callable[[tf.Tensor], tf.Tensor], *,
                     batch_size: int = 256, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Run `extractor` over `images` in batches; float32 [N, D]."""
    out = []
    for start in range(0, len(images), batch_size):
        out.append(extractor(tf.constant(images[start:start + batch_size])).numpy())
        if progress is not None:
            progress(min(start + batch_size, len(images)))
    return np.concatenate(out).astype(np.float32)


def pixel_features(images: np.ndarray) -> np.ndarray:
    """Flattened pixels scaled to [0, 1]; float32 [N, H*W*C]."""
    x = images.reshape(len(images), -1).astype(np.float32)
    return x / 255.0 if np.issubdtype(images.dtype, np.integer) else x


def normalize_features(x: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Per-example L2 normalization times `scale`.

    Uses no dataset statistics (so nothing leaks from test images) and bounds the
    curvature of the logistic loss by scale²/2, which keeps plain gradient descent with
    the paper's fixed step γ = 0.1 stable whatever the feature extractor.
    """
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (scale * x / np.maximum(norms, 1e-12)).astype(np.float32)


def load_features(dataset: str, kind: str, *, scale: float, data_dir: Optional[str] = None,
                  local_dir: Optional[str] = None, backbone: str = "resnet50", weights: str = "imagenet",
                  image_size: int = 224, cache_dir: Optional[str] = None) -> tuple[np.ndarray, np.ndarray, str]:
    """All images of `dataset` (tfds train + test, `tfds_offline.load_image_classification`) as
    normalized features [N, d] (`kind`: "pixels" or "pretrained", the pooled output of `backbone`
    with `weights`: "imagenet", "random" (untrained; tests only) or a weights file), labels [N]
    and a description. Pretrained features are cached in `cache_dir` when it is given."""
    from experiments.data import tfds_offline  # (imports tensorflow_datasets: only when data is loaded)
    from experiments.common.run_state import damaged, reading_state, write_atomically

    data = tfds_offline.load_image_classification(dataset, data_dir=data_dir, local_dir=local_dir)
    images = np.concatenate([data["train"][0], data["test"][0]])
    labels = np.concatenate([data["train"][1], data["test"][1]])
    if kind == "pixels":
        return normalize_features(pixel_features(images), scale), labels, "raw pixels"
    loaded = None if weights == "random" else weights
    desc = f"keras.applications {backbone} average-pooled features, weights={weights}, {image_size}px"
    cache = None
    if cache_dir and loaded is not None:
        tag = "imagenet" if loaded == "imagenet" else os.path.basename(loaded)
        cache = os.path.join(cache_dir, f"{dataset}_{backbone}_{tag}_{image_size}.npy")
        if os.path.isfile(cache):
            remedy = "delete it to extract the features again"
            with reading_state(cache, remedy, (OSError, ValueError, EOFError)):
                x = np.load(cache)
            if x.shape[0] != len(images):
                raise damaged(cache, f"{x.shape[0]} rows for {len(images)} images", remedy)
            return normalize_features(x, scale), labels, desc
    extractor = build_extractor(backbone, weights=loaded, image_size=image_size)
    bar = tf.keras.utils.Progbar(len(images), verbose=1 if sys.stdout.isatty() else 2)
    print(f"Extracting {desc} from {len(images)} images")
    x = extract_features(images, extractor, progress=bar.update)
    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        write_atomically(cache, lambda temporary: np.save(temporary, x))
    return normalize_features(x, scale), labels, desc
