"""One measurement per fresh Python process: what a process has compiled, cached or allocated
before cannot leak into the next measurement's time or peak memory.

The driver calls `run_fresh("experiments.benchmark", "worker", config, timeout)`: it runs
`python -m experiments.benchmark --worker=<config as JSON>` from the repository root, and the
worker answers with `print_result(value)`. `run_each` does that for a list of configurations
and prints one progress line per configuration; with `arrays=` (data the driver has, e.g. a
dataset split), the workers read them from an .npz file (`load_arrays`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_MARKER = "EXPERIMENT_WORKER_RESULT "


def print_result(value: Any) -> None:
    """The worker's answer: `value` as one JSON line on stdout (anything else it prints is ignored)."""
    print(RESULT_MARKER + json.dumps(value), flush=True)


def run_fresh(module: str, flag: str, payload: Any, timeout: float) -> dict:
    """Runs `python -m <module> --<flag>=<payload as JSON>` in a fresh process and returns what it
    passed to `print_result`, or {"error": ...} when it timed out, failed or printed no result
    (the end of its stderr, else of its stdout)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [sys.executable, "-m", module, f"--{flag}={json.dumps(payload)}"]
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    results = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if done.returncode == 0 and results:
        return json.loads(results[-1][len(RESULT_MARKER):])
    output = (done.stderr.strip() or done.stdout.strip())[-2000:]
    return {"error": f"worker exited with {done.returncode}{'' if results else ' (no result)'}: {output}"}


def run_each(configs: Sequence[dict], module: str, flag: str, timeout: float,
             describe: Callable[[dict], str], report: Callable[[dict], str],
             arrays: Optional[Mapping[str, np.ndarray]] = None, arrays_dir: str | os.PathLike = ".") -> list[dict]:
    """`run_fresh` for every configuration in turn, printing `[i/n] describe(config) ...` and then
    `report(result)` or the error's last line. A failed configuration's entry is the
    configuration with its "error". `arrays`: written to an .npz file in `arrays_dir` (removed
    at the end) whose path every configuration gets as "arrays" (`load_arrays` reads it)."""
    if arrays is not None:
        os.makedirs(arrays_dir, exist_ok=True)
        path = os.path.join(os.path.abspath(arrays_dir), f"_worker_arrays_{os.getpid()}.npz")
        np.savez(path, **arrays)
        try:
            return run_each([{**config, "arrays": path} for config in configs], module, flag, timeout, describe, report)
        finally:
            os.remove(path)
    results, started = [], time.perf_counter()
    for i, config in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] {describe(config)} ...", end=" ", flush=True)
        result = run_fresh(module, flag, config, timeout)
        if "error" in result:
            result = {**config, **result}
            last = result["error"].strip().splitlines()
            print(f"ERROR {last[-1] if last else ''}", flush=True)
        else:
            print(f"{report(result)} ({time.perf_counter() - started:.0f} s elapsed)", flush=True)
        results.append(result)
    return results


def load_arrays(config: dict) -> dict[str, np.ndarray]:
    """In a worker of `run_each(..., arrays=...)`: the arrays of its configuration."""
    with np.load(config["arrays"]) as data:
        return {key: data[key] for key in data.files}
