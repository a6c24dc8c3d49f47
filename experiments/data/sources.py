"""Where the data comes from: the tfds data_dir, a quick probe of the download hosts (so that
an offline machine fails in seconds instead of hanging in tfds's retries), the record of each
dataset's source, the lock that serializes preparing a dataset, and `DataUnavailableError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import ssl
import threading
import urllib.parse
from pathlib import Path

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


class DataUnavailableError(RuntimeError):
    """No local copy of a dataset and no network to download it."""


# Where each dataset came from, as experiments.data.tfds_offline.get_prepared_builder last found it in this process (programs
# record it in results.json); a sidecar file in data_dir remembers the origin of a prepared copy.
_SOURCES: dict[str, str] = {}


def data_source(name: str) -> str | None:
    """Where the last load of `name` in this process came from (local IDX folder, tfds data_dir,
    tfds download, npm registry package), or None if it was not loaded."""
    return _SOURCES.get(name)


def source_file(data_dir: str, name: str) -> Path:
    return Path(data_dir) / f".{name}.source"


def record_source(name: str, data_dir: str, source: str, *, prepared_now: bool) -> str:
    """Records `source` as where `name` came from; a fresh preparation also leaves it in data_dir."""
    if prepared_now:
        with contextlib.suppress(OSError):  # only a note: a read-only data_dir must not fail the load
            source_file(data_dir, name).write_text(source + "\n")
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


def probe_address(name: str) -> tuple[str, int]:
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


def can_download(name: str) -> bool:
    if os.environ.get("TF_BILEVEL_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    return network_reachable(*probe_address(name))


@contextlib.contextmanager
def exclusive(data_dir: str, name: str):
    """An inter-process lock per (data_dir, dataset): two programs preparing the same dataset
    at once would race on tfds's final rename (FileExistsError)."""
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".{name}.prepare.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
