"""What the experiment programs add to tf_bilevel/resume.py (the one owner of saved state:
fingerprints, atomic writes, JSON values, damaged-file errors): the exclusive lock that lets one
run at a time use an --output_dir, the programs' settings guard (fingerprint.json, with the
--restart remedy), the one-line error of `main`, and the test hook that stops a run at a known
point to be killed. The library's names are re-exported here for the programs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from typing import Iterator, Optional, Sequence

from tf_bilevel.resume import (  # noqa: F401 (re-exported for the programs)
    SettingsMismatchError, StateFileError, damaged, jsonable, read_state_json, reading_state, write_atomically,
    write_json_atomically,
)
from tf_bilevel import resume

LOCK_NAME = ".lock"
FINGERPRINT = "fingerprint.json"  # the programs' settings file (tfb.guard_settings' filename=)
RESTART_HINT = "or rerun with --restart to discard all saved state and start over"


# ----------------------------------------------------------------------------------------
# One run per output folder.
# ----------------------------------------------------------------------------------------
class OutputDirError(RuntimeError):
    """--output_dir cannot be used: not creatable or writable, in use by another run, or (a report)
    holding nothing to report."""


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
# Settings.
# ----------------------------------------------------------------------------------------
def _remedies(state_dir: str | os.PathLike) -> tuple[str, str]:
    """(what to do on a settings mismatch, what to do on a damaged fingerprint)."""
    return ((f"rerun with the original flags, use another --output_dir, or delete {os.fspath(state_dir)} (or rerun "
             "with --restart) to start over"),
            # Deleting the fingerprint alone would let a run with other settings adopt this state.
            f"delete {os.fspath(state_dir)} to start over, {RESTART_HINT}")


def guard_settings(state_dir: str | os.PathLike, settings: dict, what: str = "the state") -> None:
    """`tfb.guard_settings` for a program: the result-affecting `settings` in
    <state_dir>/fingerprint.json, stored on the first run and checked on every later one (a
    mismatch is `tfb.SettingsMismatchError`, a damaged file a StateFileError, both naming
    --restart)."""
    remedy, damaged_remedy = _remedies(state_dir)
    resume.guard_settings(state_dir, settings, what=what, filename=FINGERPRINT, remedy=remedy,
                          damaged_remedy=damaged_remedy)


def check_stored_settings(state_dir: str | os.PathLike, settings: dict, what: str = "the state",
                          later: Sequence[str] = ()) -> None:
    """Part of `guard_settings` that can run before all settings are known (e.g. before the data
    that a setting hashes is loaded): if <state_dir>/fingerprint.json exists, checks `settings`
    against it, leaving out the stored keys `later` (guard_settings checks them). Reads only."""
    path = os.path.join(state_dir, FINGERPRINT)
    if not os.path.exists(path):
        return
    remedy, damaged_remedy = _remedies(state_dir)
    stored = {k: v for k, v in read_state_json(path, damaged_remedy).items() if k not in later}
    resume.check_settings(stored, jsonable(settings), where=os.fspath(state_dir), what=what, remedy=remedy)


def discard_state(state_dir: str | os.PathLike) -> None:
    """--restart: removes a program's saved state (call it under `exclusive_output_dir`)."""
    import shutil

    if os.path.isdir(state_dir):
        print(f"--restart: removing the saved state in {os.fspath(state_dir)}", flush=True)
        shutil.rmtree(state_dir)


# The errors a program reports as one line (experiments/common/program.py's `main`), not as a traceback.
STATE_ERRORS = (OutputDirError, StateFileError, SettingsMismatchError)


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
