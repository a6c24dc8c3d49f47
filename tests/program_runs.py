"""Programs run as real subprocesses, killed with SIGKILL at a known point and rerun: the
scaffolding of the resume tests (the program writes a marker file and waits where it should
be killed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds; a stuck program must fail the test, not hang it


def start(command: list, log: Path) -> subprocess.Popen:
    """`command` (argv; a leading "-m" means `python -m ...`) in the repo, output appended to `log`
    (a file, not a pipe: nothing blocks on a full pipe)."""
    argv = [sys.executable, *command] if command[0] == "-m" or command[0].endswith(".py") else list(command)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO),
           "TF_BILEVEL_OFFLINE": "1"}  # never let a test wait on the network
    env.pop("TF_CONFIG", None)
    with open(log, "ab") as out:
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def wait_for(process: subprocess.Popen, marker: Path, log: Path, timeout: float = TIMEOUT) -> None:
    """Waits until the program writes `marker` (--pause_after: it then waits to be killed, or
    for <marker>.continue)."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"the program exited ({process.returncode}) before reaching {marker.name}:\n{tail(log)}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the program did not reach {marker.name} within {timeout} s:\n{tail(log)}")
        time.sleep(0.05)


def kill_when_paused(process: subprocess.Popen, marker: Path, log: Path, timeout: float = TIMEOUT) -> None:
    """Waits until the program writes `marker` (it then waits to be killed), then SIGKILLs it."""
    wait_for(process, marker, log, timeout)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


def finish(process: subprocess.Popen, log: Path, timeout: float = TIMEOUT) -> None:
    """Waits for the program to exit, which it must do with status 0."""
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"the program did not finish within {timeout} s:\n{tail(log)}")
    assert returncode == 0, tail(log)


def run(command: list, log: Path, timeout: float = TIMEOUT) -> tuple[int, str]:
    """Runs the program to its end: (exit status, its output, stdout and stderr together)."""
    start_at = log.stat().st_size if log.exists() else 0
    process = start(command, log)
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"the program did not finish within {timeout} s:\n{tail(log)}")
    return returncode, log.read_bytes()[start_at:].decode(errors="replace")


def assert_clear_error(returncode: int, output: str, *fragments: str) -> str:
    """The program failed (non-zero exit) with one `<program>: error: ...` line containing every
    fragment, and no traceback; returns that line."""
    assert returncode not in (0, None), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if ": error: " in line]
    assert len(lines) == 1, output[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]
