"""Checkpoint and resume a functional outer loop, and refuse to mix two configurations: the one
owner of saved state in tf_bilevel and its experiment programs.

`HyperStepCheckpoint` saves a `tfb.HyperStep`'s state (λ, the outer optimizer's state, the
counter k) with `tf.train.CheckpointManager`: the variables' bytes, so a loop interrupted after
any saved hyper-step and resumed ends bit-identical to an uninterrupted one (same device, same
data order). An optional JSON sidecar holds the loop's plain values (curves, counters) with each
checkpoint. With `settings=` it first runs `guard_settings`: the result-affecting settings of
the run that wrote a folder are stored there, and resuming with others is a
`SettingsMismatchError` naming each difference.

Underneath: `write_atomically` / `write_json_atomically` (a kill never leaves a half-written
file), `jsonable` (values as they read back from JSON), and `read_state_json` / `reading_state`,
which turn a damaged state file into a `StateFileError` naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

SETTINGS_FILE = "settings.json"
_UMASK = os.umask(0)
os.umask(_UMASK)  # (read once: os.umask can only be read by setting it)


class SettingsMismatchError(ValueError):
    """A folder holds the saved state of a run with other result-affecting settings."""


class StateFileError(RuntimeError):
    """A file of saved state is damaged (truncated, garbage, not what was written)."""


# ----------------------------------------------------------------------------------------
# JSON values and kill-safe writes.
# ----------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    return value


def jsonable(value: Any) -> Any:
    """`value` as it reads back from JSON: NumPy arrays and scalars as lists and Python numbers,
    tuples as lists, keys as str. TypeError for a value JSON cannot hold."""
    return json.loads(json.dumps(_plain(value)))


def _as_json(settings: Mapping[str, Any], argument: str) -> dict:
    if not isinstance(settings, Mapping):
        raise TypeError(f"{argument} must be a dict of the settings that affect the results, got {type(settings).__name__}")
    try:
        return jsonable(settings)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{argument} must hold JSON-able values (numbers, strings, lists, dicts): {err}") from None


@contextlib.contextmanager
def _temporary_beside(path: str | os.PathLike) -> Iterator[str]:
    """A new file .tmp-<random>-<name> in the folder of `path` (unique: writers in two processes
    never collide; it ends like `path`, so ".weights.h5" / ".png" checks pass), with the usual
    permissions; removed at the end unless it was renamed or linked away."""
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=f"-{name}")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files
        os.close(fd)
        yield temporary
    finally:
        with contextlib.suppress(OSError):
            os.remove(temporary)


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls `write(temporary)` and renames the temporary file over `path` once it is on disk, so
    that a kill (even SIGKILL) never leaves `path` half-written; if `write` fails, `path` is
    untouched and the temporary file removed."""
    with _temporary_beside(path) as temporary:
        write(temporary)
        _fsync(temporary)
        os.replace(temporary, path)


def _dump(value: Any, indent: Optional[int]) -> Callable[[str], None]:
    def write(temporary: str) -> None:
        with open(temporary, "w") as f:
            json.dump(_plain(value), f, indent=indent)

    return write


def write_json_atomically(path: str | os.PathLike, value: Any, indent: Optional[int] = None) -> None:
    """Writes `value` (NumPy values allowed) as JSON to `path` with `write_atomically`."""
    write_atomically(path, _dump(value, indent))


def _create_json_exclusively(path: str, value: Any) -> bool:
    """Creates `path` holding `value` as JSON unless it exists; True if this call created it.

    The file is written and flushed under a temporary name, then hard-linked to `path`: link
    fails if `path` exists, so of two processes creating it at once exactly one wins, and a
    reader never sees it half-written. (Where the filesystem has no hard links, an O_EXCL create
    of `path` itself decides the winner.)"""
    with _temporary_beside(path) as temporary:
        _dump(value, None)(temporary)
        _fsync(temporary)
        try:
            os.link(temporary, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (EPERM, ENOTSUP, ...)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                return False
            os.close(fd)
            _dump(value, None)(path)
            _fsync(path)
            return True


# ----------------------------------------------------------------------------------------
# Reading state back.
# ----------------------------------------------------------------------------------------
def damaged(path: str | os.PathLike, problem: str, remedy: str) -> StateFileError:
    """The error for a damaged state file: which file, what is wrong with it, what to do."""
    return StateFileError(f"{os.fspath(path)} is damaged ({problem}). To go on: {remedy}.")


def read_state_json(path: str | os.PathLike, remedy: str, required: Sequence[str] = ()) -> dict:
    """The JSON object in state file `path` with at least the keys `required`; StateFileError
    (naming the file and `remedy`) if it cannot be read, is not JSON (truncated, garbage) or is
    not such an object."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise StateFileError(f"{os.fspath(path)} cannot be read ({err.strerror or err}). To go on: {remedy}.") from None
    try:
        value = json.loads(raw)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        kind = "empty" if not raw.strip() else f"not valid JSON: {err}"
        raise damaged(path, kind, remedy) from None
    if not isinstance(value, dict):
        raise damaged(path, f"a JSON {type(value).__name__} where an object was written", remedy)
    missing = [key for key in required if key not in value]
    if missing:
        raise damaged(path, f"no {', '.join(map(repr, missing))}", remedy)
    return value


@contextlib.contextmanager
def reading_state(path: str | os.PathLike, remedy: str, errors: tuple = (OSError, ValueError)) -> Iterator[None]:
    """Turns `errors` raised while the block reads state file `path` with another library (a
    TF checkpoint, Keras weights, a .npy file) into a StateFileError naming the file and `remedy`."""
    try:
        yield
    except errors as err:
        detail = (str(err).strip().splitlines() or [""])[0][:300]
        raise damaged(path, f"{type(err).__name__}: {detail}" if detail else type(err).__name__, remedy) from None


# ----------------------------------------------------------------------------------------
# Settings.
# ----------------------------------------------------------------------------------------
def settings_difference(stored: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """'' if equal, else "key: stored then, current now" for every differing key, sorted."""
    changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    return ", ".join(f"{k}: {stored.get(k)!r} then, {current.get(k)!r} now" for k in changed)


def check_settings(
    stored: Mapping[str, Any], current: Mapping[str, Any], *, where: str, what: str = "the checkpoints",
    remedy: Optional[str] = None,
) -> None:
    """Raises `SettingsMismatchError` if `current` differs from `stored` (the settings that
    wrote `where`), naming every difference and `remedy` (what to do instead)."""
    details = settings_difference(stored, current)
    if details:
        remedy = remedy or f"use the original settings, another folder, or delete {where} to start over"
        raise SettingsMismatchError(f"{where} holds {what} of a run with other settings ({details}). "
                                    f"Resuming would mix two runs: {remedy}.")


def guard_settings(directory: str | os.PathLike, settings: Mapping[str, Any], *, what: str = "the checkpoints",
                   filename: str = SETTINGS_FILE, remedy: Optional[str] = None,
                   damaged_remedy: Optional[str] = None) -> None:
    """On the first call for `directory`, stores `settings` in <directory>/<filename>; later,
    raises `SettingsMismatchError` if they differ from the stored ones. The first writer wins:
    of processes starting together on one fresh folder, one stores its settings and the others
    are checked against them. Pass every setting that changes the numbers (learning rates, T, K,
    seeds, a hash of the data), none that does not (output paths, logging), so that resuming
    never mixes two configurations.

    `remedy` ends the mismatch message (default: use the original settings, another folder, or
    delete `directory`); `damaged_remedy` ends the `StateFileError` of a damaged settings file
    (default: delete `directory` to start over: deleting the file alone would let a run with
    other settings adopt the state)."""
    settings = _as_json(settings, "settings")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, filename)
    if not os.path.exists(path) and _create_json_exclusively(path, settings):
        return
    stored = read_state_json(path, damaged_remedy or f"delete {os.fspath(directory)} to start over")
    check_settings(stored, settings, where=os.fspath(directory), what=what, remedy=remedy)


# ----------------------------------------------------------------------------------------
# A HyperStep's checkpoints.
# ----------------------------------------------------------------------------------------
_INDEX = "checkpoint"  # tf.train.CheckpointManager's text index of the checkpoints
# TF's errors on a damaged checkpoint: OpError (checksums), IndexError (a truncated data file),
# AssertionError (assert_consumed: a value not restored), ValueError, OSError.
_CHECKPOINT_ERRORS = (tf.errors.OpError, IndexError, AssertionError, ValueError, OSError)


def _sidecar_path(directory: str, k: int) -> str:
    return os.path.join(directory, f"state-{k}.json")


class HyperStepCheckpoint:
    """Saves and restores a `tfb.HyperStep` in `directory` (a `tf.train.CheckpointManager`),
    optionally with a JSON sidecar of plain values (curves, counters, a timer) per checkpoint.

    ```
    ckpt = tfb.HyperStepCheckpoint("ckpt", step, settings={"lr": 0.1, "T": 100}, sidecar_keys=["losses"])
    done = ckpt.restore()                  # 0 on a fresh folder, else the hyper-steps saved
    losses = ckpt.sidecar["losses"] if done else []
    for k in range(done, R):
        losses.append(float(step(params, batch, val_batch).outer_value))
        if (k + 1) % 10 == 0:
            ckpt.save({"losses": losses})
    ```

    The sidecar of checkpoint ckpt-<k> is state-<k>.json: written (atomically) before the
    checkpoint, the sidecars of older checkpoints removed after it, so that wherever a kill
    lands the latest checkpoint has its sidecar, and the values restored together are those
    saved together. `HyperStepCheckpoint.latest_sidecar(directory)` reads it before the step
    exists (e.g. a learning rate stored there builds the optimizer).

    Damaged state (a truncated or garbage checkpoint, index or sidecar, a sidecar missing or
    without `sidecar_keys`) is a `StateFileError` naming the file and `remedy`, never a silent
    restore (TF checksums the variables it restores).

    Args:
      directory: the folder of the checkpoints (created).
      hyper_step: the `HyperStep` whose state is saved.
      settings: optional dict of the result-affecting settings: `guard_settings(directory, settings)`
        is checked here, before anything is read or written.
      max_to_keep: checkpoints kept (the latest ones).
      sidecar_keys: None (no sidecar), or the keys every sidecar must hold: `save(sidecar)` then
        needs the dict, and `restore()` sets `self.sidecar` to the latest one.
      remedy: what a damaged-state error tells the user to do (default: delete `directory`).
      **more: other trackable objects saved and restored with the step (e.g. a Keras model, a
        `tf.random.Generator`).
    """

    def __init__(self, directory: str | os.PathLike, hyper_step: Any, *, settings: Optional[Mapping[str, Any]] = None,
                 max_to_keep: int = 1, sidecar_keys: Optional[Sequence[str]] = None, remedy: Optional[str] = None,
                 **more: Any):
        from tf_bilevel.outer import HyperStep

        if not isinstance(hyper_step, HyperStep):
            raise TypeError(f"HyperStepCheckpoint(hyper_step=...) must be a tfb.HyperStep, got {type(hyper_step).__name__}")
        if isinstance(sidecar_keys, str):
            raise TypeError(f"HyperStepCheckpoint(sidecar_keys=...) must be a list of keys, got the str {sidecar_keys!r}")
        self.directory = os.fspath(directory)
        self.hyper_step = hyper_step
        self.remedy = remedy or f"delete {self.directory} to start over"
        self.sidecar_keys = None if sidecar_keys is None else tuple(sidecar_keys)
        self.sidecar: Optional[dict] = None
        if settings is not None:
            guard_settings(self.directory, settings, damaged_remedy=self.remedy)
        with _reading_index(self.directory, self.remedy):
            self.manager = tf.train.CheckpointManager(hyper_step.checkpoint(**more), self.directory,
                                                      max_to_keep=max_to_keep)

    @staticmethod
    def latest_sidecar(directory: str | os.PathLike, *, sidecar_keys: Sequence[str] = (),
                       remedy: Optional[str] = None) -> Optional[dict]:
        """The sidecar of the latest checkpoint in `directory`, None if there is no checkpoint."""
        directory = os.fspath(directory)
        remedy = remedy or f"delete {directory} to start over"
        k = _latest_number(directory, remedy)
        return None if k is None else _read_sidecar(directory, k, tuple(sidecar_keys), remedy)

    def restore(self) -> int:
        """Restores the latest checkpoint, if any (every saved value must be consumed), and its
        sidecar into `self.sidecar`; returns the hyper-steps done, k (0 when there is none)."""
        k = _latest_number(self.directory, self.remedy)
        if k is None:
            self.sidecar = None
            return 0
        if self.sidecar_keys is not None:
            self.sidecar = _read_sidecar(self.directory, k, self.sidecar_keys, self.remedy)
        prefix = os.path.join(self.directory, f"ckpt-{k}")
        name = os.path.basename(prefix)
        with reading_state(f"the checkpoint {prefix} ({name}.index, {name}.data-*)", self.remedy, _CHECKPOINT_ERRORS):
            self.manager.checkpoint.restore(prefix).assert_consumed()
        done = int(self.hyper_step.iterations.numpy())
        if done != k:
            raise damaged(prefix, f"it holds hyper-step {done}, not {k}", self.remedy)
        return done

    def save(self, sidecar: Optional[Mapping[str, Any]] = None) -> str:
        """Saves the state as checkpoint ckpt-<k> (with `sidecar` as state-<k>.json when the
        checkpoint has one); returns its path prefix."""
        k = int(self.hyper_step.iterations.numpy())
        if (sidecar is None) != (self.sidecar_keys is None):
            raise ValueError("HyperStepCheckpoint.save(sidecar=...) needs a dict exactly when the checkpoint was made "
                             f"with sidecar_keys= (here sidecar_keys={self.sidecar_keys!r})")
        if sidecar is not None:
            missing = [key for key in self.sidecar_keys if key not in sidecar]
            if missing:
                raise ValueError(f"HyperStepCheckpoint.save(sidecar=...) lacks the keys {missing} of sidecar_keys")
            os.makedirs(self.directory, exist_ok=True)
            write_json_atomically(_sidecar_path(self.directory, k), sidecar)
        prefix = self.manager.save(checkpoint_number=k)
        if sidecar is not None:
            kept = {_sidecar_path(self.directory, _number(p)) for p in self.manager.checkpoints}
            for name in os.listdir(self.directory):
                path = os.path.join(self.directory, name)
                if re.fullmatch(r"state-\d+\.json", name) and path not in kept:
                    os.remove(path)
        return prefix


def _reading_index(directory: str, remedy: str):
    """TF parses <directory>/checkpoint (the index of checkpoints) as text: garbage raises."""
    return reading_state(os.path.join(directory, _INDEX), remedy,
                         (tf.errors.OpError, ValueError, UnicodeDecodeError, OSError))


def _number(prefix: str) -> int:
    return int(prefix.rsplit("-", 1)[1])


def _latest_number(directory: str, remedy: str) -> Optional[int]:
    """k of the latest checkpoint ckpt-<k> in `directory`, None if there is none."""
    index = os.path.join(directory, _INDEX)
    with _reading_index(directory, remedy):
        latest = tf.train.latest_checkpoint(directory)
    if latest is None:
        if os.path.exists(index):  # TF ignores an index it cannot parse (a truncated one, say)
            raise damaged(index, "TensorFlow cannot parse it", remedy)
        return None
    try:
        return _number(latest)
    except ValueError:
        raise damaged(index, f"it names the checkpoint {latest!r}", remedy) from None


def _read_sidecar(directory: str, k: int, keys: Sequence[str], remedy: str) -> dict:
    path = _sidecar_path(directory, k)
    if not os.path.exists(path):
        raise damaged(directory, f"checkpoint ckpt-{k} has no sidecar {os.path.basename(path)}", remedy)
    return read_state_json(path, remedy, keys)
