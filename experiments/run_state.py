"""What the experiment programs keep on disk to resume: NumPy values made JSON-able, kill-safe
writes, the guard that keeps a resumed run from mixing two configurations, and the test hook
that stops a run at a known point to be killed."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

import numpy as np


def jsonable(x: Any) -> Any:
    """`x` with NumPy arrays and scalars turned into lists and Python numbers, keys into str."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, np.generic)):
        return x.tolist()
    return x


def write_json_atomically(path: str | os.PathLike, value: Any, indent: Optional[int] = None) -> None:
    """Writes `value` as JSON so that a kill (even SIGKILL) never leaves a half-written file:
    write aside, flush to disk, then rename over `path`."""
    partial = os.fspath(path) + ".partial"
    with open(partial, "w") as f:
        json.dump(value, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


class SettingsMismatchError(ValueError):
    """A resumable program's state folder holds the state of a run with other settings."""


def guard_settings(state_dir: str | os.PathLike, settings: dict, what: str = "the state") -> None:
    """Stores the result-affecting `settings` in <state_dir>/fingerprint.json on the first run, or
    checks them against the stored ones: resuming must never mix two configurations."""
    settings = json.loads(json.dumps(jsonable(settings)))  # as it reads back (tuples become lists)
    os.makedirs(state_dir, exist_ok=True)
    path = os.path.join(state_dir, "fingerprint.json")
    if not os.path.exists(path):
        write_json_atomically(path, settings)
        return
    with open(path) as f:
        stored = json.load(f)
    changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
    if changed:
        details = ", ".join(f"{k}: {stored.get(k)!r} then, {settings.get(k)!r} now" for k in changed)
        raise SettingsMismatchError(
            f"{state_dir} holds {what} of a run with other settings ({details}). Resuming would mix two "
            f"runs: rerun with the original flags, use another --output_dir, or delete {state_dir} to start over.")


def pause_to_be_killed(marker: str | os.PathLike, seconds: float = 300.0) -> None:
    """--pause_after (tests): writes `marker` and waits to be killed, once: a rerun that finds the
    marker goes on. Nobody killing the program within `seconds` is a failure (exit 3), not a hang."""
    if os.path.exists(marker):
        return
    write_json_atomically(marker, {"paused": True})
    print(f"paused: {marker} (--pause_after)", flush=True)
    time.sleep(seconds)
    os._exit(3)
