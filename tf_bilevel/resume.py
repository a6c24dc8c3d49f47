"""Checkpoint and resume a functional outer loop, and refuse to mix two configurations.

`HyperStepCheckpoint` saves a `tfb.HyperStep`'s state (λ, the outer optimizer's state, the
counter k) with `tf.train.CheckpointManager`: the variables' bytes, so a loop interrupted after
any saved hyper-step and resumed ends bit-identical to an uninterrupted one (same device, same
data order). With `settings=` it first runs `guard_settings`: the result-affecting settings of
the run that wrote a folder are stored there, and resuming with others is a
`SettingsMismatchError` naming each difference.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping, Optional

import tensorflow as tf

SETTINGS_FILE = "settings.json"


class SettingsMismatchError(ValueError):
    """A folder holds the saved state of a run with other result-affecting settings."""


def _as_json(settings: Mapping[str, Any], argument: str) -> dict:
    """`settings` as it reads back from JSON (tuples become lists, keys str)."""
    if not isinstance(settings, Mapping):
        raise TypeError(f"{argument} must be a dict of the settings that affect the results, got {type(settings).__name__}")
    try:
        return json.loads(json.dumps(dict(settings), default=_json_default))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{argument} must hold JSON-able values (numbers, strings, lists, dicts): {err}") from None


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # NumPy arrays and scalars
        return value.tolist()
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON-able")


def settings_difference(stored: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """'' if equal, else "key: stored then, current now" for every differing key, sorted."""
    changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    return ", ".join(f"{k}: {stored.get(k)!r} then, {current.get(k)!r} now" for k in changed)


def check_settings(
    stored: Mapping[str, Any], current: Mapping[str, Any], *, where: str, what: str = "the checkpoints",
    remedy: Optional[str] = None,
) -> None:
    """Raises `SettingsMismatchError` if `current` differs from `stored` (the settings that
    wrote `where`), naming every difference and `remedy`."""
    details = settings_difference(stored, current)
    if details:
        remedy = remedy or (f"Resuming would mix two runs: use the original settings, another folder, or delete "
                            f"{where} to start over.")
        raise SettingsMismatchError(f"{where} holds {what} of a run with other settings ({details}). {remedy}")


def _dump_durably(f: Any, value: Any) -> None:
    """Writes `value` as JSON to the open file `f` and forces it to disk."""
    json.dump(value, f, default=_json_default)
    f.flush()
    os.fsync(f.fileno())


def write_json_atomically(path: str | os.PathLike, value: Any) -> None:
    """Writes `value` as JSON to `path` through a unique temporary file renamed over it (flushed
    first): a kill never leaves a half-written `path`."""
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=f"-{name}")
    try:
        with os.fdopen(fd, "w") as f:
            _dump_durably(f, value)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _create_json_exclusively(path: str, value: Any) -> bool:
    """Creates `path` holding `value` as JSON unless it exists; True if this call created it.

    The file is written and flushed under a temporary name, then hard-linked to `path`: link
    fails if `path` exists, so of two processes creating it at once exactly one wins, and a
    reader never sees it half-written. (Where the filesystem has no hard links, an O_EXCL create
    of `path` itself decides the winner.)"""
    directory, name = os.path.split(path)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=f"-{name}")
    try:
        with os.fdopen(fd, "w") as f:
            _dump_durably(f, value)
        try:
            os.link(temporary, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (EPERM, ENOTSUP, ...)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                _dump_durably(f, value)
            return True
    finally:
        os.remove(temporary)


def guard_settings(directory: str | os.PathLike, settings: Mapping[str, Any], *, what: str = "the checkpoints") -> None:
    """On the first call for `directory`, stores `settings` in <directory>/settings.json; later,
    raises `SettingsMismatchError` if they differ from the stored ones. The first writer wins:
    of processes starting together on one fresh folder, one stores its settings and the others
    are checked against them. Pass every setting that
    changes the numbers (learning rates, T, K, seeds, a hash of the data), none that does not
    (output paths, logging), so that resuming never mixes two configurations."""
    settings = _as_json(settings, "settings")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, SETTINGS_FILE)
    if not os.path.exists(path) and _create_json_exclusively(path, settings):
        return
    try:
        with open(path) as f:
            stored = json.load(f)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is damaged ({err}): delete {directory} to start over") from None
    if not isinstance(stored, dict):
        raise ValueError(f"{path} is damaged (a JSON {type(stored).__name__}, not an object): delete {directory} to start over")
    check_settings(stored, settings, where=os.fspath(directory), what=what)


class HyperStepCheckpoint:
    """Saves and restores a `tfb.HyperStep` in `directory` (a `tf.train.CheckpointManager`).

    ```
    ckpt = tfb.HyperStepCheckpoint("ckpt", step, settings={"lr": 0.1, "T": 100})
    for k in range(ckpt.restore(), R):     # 0 on a fresh folder, else the hyper-steps saved
        step(params, batch, val_batch)
        if (k + 1) % 10 == 0:
            ckpt.save()
    ```

    Args:
      directory: the folder of the checkpoints (created).
      hyper_step: the `HyperStep` whose state is saved.
      settings: optional dict of the result-affecting settings: `guard_settings(directory, settings)`
        is checked here, before anything is read or written.
      max_to_keep: checkpoints kept (the latest ones).
      **more: other trackable objects saved and restored with the step (e.g. a Keras model, a
        `tf.random.Generator`).
    """

    def __init__(self, directory: str | os.PathLike, hyper_step: Any, *, settings: Optional[Mapping[str, Any]] = None,
                 max_to_keep: int = 1, **more: Any):
        from tf_bilevel.outer import HyperStep

        if not isinstance(hyper_step, HyperStep):
            raise TypeError(f"HyperStepCheckpoint(hyper_step=...) must be a tfb.HyperStep, got {type(hyper_step).__name__}")
        self.directory = os.fspath(directory)
        self.hyper_step = hyper_step
        if settings is not None:
            guard_settings(self.directory, settings)
        self.manager = tf.train.CheckpointManager(hyper_step.checkpoint(**more), self.directory, max_to_keep=max_to_keep)

    def restore(self) -> int:
        """Restores the latest checkpoint, if any (every saved value must be consumed); returns
        the hyper-steps done, k (0 when there is none)."""
        latest = self.manager.latest_checkpoint
        if latest is None:
            return 0
        self.manager.checkpoint.restore(latest).assert_consumed()
        return int(self.hyper_step.iterations.numpy())

    def save(self) -> str:
        """Saves the state as checkpoint ckpt-<k>; returns its path prefix."""
        return self.manager.save(checkpoint_number=int(self.hyper_step.iterations.numpy()))
