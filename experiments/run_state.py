"""What the experiment programs keep on disk to resume: NumPy values made JSON-able, kill-safe
writes under unique temporary names, the exclusive lock that lets one run at a time use an
--output_dir, reading state files back with a clear error when they are damaged, the guard that
keeps a resumed run from mixing two configurations, and the test hook that stops a run at a
known point to be killed."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

LOCK_NAME = ".lock"
RESTART_HINT = "or rerun with --restart to discard all saved state and start over"
_UMASK = os.umask(0)
os.umask(_UMASK)  # (read once: os.umask can only be read by setting it)


def jsonable(x: Any) -> Any:
    """`x` with NumPy arrays and scalars turned into lists and Python numbers, keys into str."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, np.generic)):
        return x.tolist()
    return x


# ----------------------------------------------------------------------------------------
# Kill-safe writes.
# ----------------------------------------------------------------------------------------
def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls `write(temporary)` and renames the temporary file over `path`, so that a kill (even
    SIGKILL) never leaves `path` half-written. The temporary file is new and unique
    (.tmp-<random>-<name> in the same folder: writers in two processes never collide, and its
    name ends like `path`, so ".weights.h5" / ".png" checks still pass); it is flushed to disk
    before the rename and removed if `write` fails."""
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=f"-{name}")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files: give the usual permissions
        os.close(fd)
        write(temporary)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def write_json_atomically(path: str | os.PathLike, value: Any, indent: Optional[int] = None) -> None:
    """Writes `value` as JSON to `path` with `write_atomically`."""

    def write(temporary: str) -> None:
        with open(temporary, "w") as f:
            json.dump(value, f, indent=indent)

    write_atomically(path, write)


# ----------------------------------------------------------------------------------------
# One run per output folder.
# ----------------------------------------------------------------------------------------
class OutputDirError(RuntimeError):
    """--output_dir cannot be used: not creatable or writable, or in use by another run."""


def _lock_holder(fd: int) -> str:
    """Who holds the lock: the PID line its holder wrote (it writes right after locking)."""
    for _ in range(20):
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.05)
    return "PID unknown"


def _why_unusable(path: str, err: OSError) -> str:
    """What is wrong with `path` as a folder to write to: a file in the way, or err's reason."""
    ancestor = os.path.abspath(path)
    while True:  # the nearest existing path on the way: a regular file there blocks the folder
        if os.path.lexists(ancestor):
            if not os.path.isdir(ancestor):
                return f"{ancestor} is a file, not a folder"
            break
        parent = os.path.dirname(ancestor)
        if parent == ancestor:
            break
        ancestor = parent
    where = f" ({err.filename})" if err.filename and os.fspath(err.filename) != path else ""
    return f"{err.strerror or err}{where}"


@contextlib.contextmanager
def exclusive_output_dir(output_dir: str | os.PathLike, program: str) -> Iterator[None]:
    """Creates `output_dir` and holds an exclusive lock on <output_dir>/.lock (fcntl.flock) while
    the block runs. A second run on the same folder is refused at once (OutputDirError naming the
    folder and the PID of the running process) instead of waiting: two runs writing the same state
    would mix their results. The kernel releases the lock when the process ends, however it ends
    (SIGKILL included), so a killed run never leaves a stale lock; the .lock file itself stays
    (it holds the last holder's PID). A folder that cannot be created or written is an
    OutputDirError too, naming the path and the reason."""
    output_dir = os.fspath(output_dir)
    try:
        os.makedirs(output_dir, exist_ok=True)
        fd = os.open(os.path.join(output_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise OutputDirError(f"--output_dir={output_dir} cannot be used: {_why_unusable(output_dir, err)}. "
                             "Pick a folder you can create and write to.") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputDirError(
                f"--output_dir={output_dir} is in use by another run ({_lock_holder(fd)}): wait for it to "
                "finish, or pick another --output_dir.") from None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"PID {os.getpid()}: {program}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


# ----------------------------------------------------------------------------------------
# Reading state back.
# ----------------------------------------------------------------------------------------
class StateFileError(RuntimeError):
    """A file of a program's saved state is damaged (truncated, garbage, not what was written)."""


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
class SettingsMismatchError(ValueError):
    """A resumable program's state folder holds the state of a run with other settings."""


def guard_settings(state_dir: str | os.PathLike, settings: dict, what: str = "the state") -> None:
    """Stores the result-affecting `settings` in <state_dir>/fingerprint.json on the first run, or
    checks them against the stored ones: resuming must never mix two configurations. (Call it
    under `exclusive_output_dir`: no other run can write the fingerprint between the check and
    the write.)"""
    settings = json.loads(json.dumps(jsonable(settings)))  # as it reads back (tuples become lists)
    os.makedirs(state_dir, exist_ok=True)
    path = os.path.join(state_dir, "fingerprint.json")
    if not os.path.exists(path):
        write_json_atomically(path, settings)
        return
    # Deleting the fingerprint alone would let a run with other settings adopt this state.
    stored = read_state_json(path, f"delete {state_dir} to start over, {RESTART_HINT}")
    changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
    if changed:
        details = ", ".join(f"{k}: {stored.get(k)!r} then, {settings.get(k)!r} now" for k in changed)
        raise SettingsMismatchError(
            f"{state_dir} holds {what} of a run with other settings ({details}). Resuming would mix two "
            f"runs: rerun with the original flags, use another --output_dir, or delete {state_dir} (or rerun "
            "with --restart) to start over.")


def discard_state(state_dir: str | os.PathLike) -> None:
    """--restart: removes a program's saved state (call it under `exclusive_output_dir`)."""
    import shutil

    if os.path.isdir(state_dir):
        print(f"--restart: removing the saved state in {os.fspath(state_dir)}", flush=True)
        shutil.rmtree(state_dir)


# The errors a program reports as one line (`exit_with_error`), not as a traceback.
STATE_ERRORS = (OutputDirError, StateFileError, SettingsMismatchError)


def exit_with_error(program: str, err: BaseException, status: int = 2) -> int:
    """Prints `err` as one line `program: error: ...` to stderr; returns the exit status."""
    print(f"{program}: error: {err}", file=sys.stderr, flush=True)
    return status


# ----------------------------------------------------------------------------------------
# Tests.
# ----------------------------------------------------------------------------------------
def pause_to_be_killed(marker: str | os.PathLike, seconds: float = 300.0) -> None:
    """--pause_after (tests): writes `marker` and waits to be killed, once: a rerun that finds the
    marker goes on. A file <marker>.continue lets the waiting run go on instead (tests of what
    happens while a run is in progress). Nobody killing the program within `seconds` is a
    failure (exit 3), not a hang."""
    if os.path.exists(marker):
        return
    write_json_atomically(marker, {"paused": True})
    print(f"paused: {marker} (--pause_after)", flush=True)
    go_on = os.fspath(marker) + ".continue"
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if os.path.exists(go_on):
            return
        time.sleep(0.05)
    os._exit(3)


def parse_pause_after(value: Optional[str], what: str = "METHOD,ITER") -> Optional[tuple[str, int]]:
    """--pause_after (tests): 'NAME,N' as (NAME, N), None when unset. `what` names the two parts
    in the error (e.g. 'K,ITER', 'METHOD,EPOCH')."""
    if not value:
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 2 or not parts[0] or not parts[1].isdigit():
        raise ValueError(f"--pause_after must be {what} (e.g. 1,3), got {value!r}")
    return parts[0], int(parts[1])
