"""The README's Python examples run as written (they are the public API's documentation).

All examples run in ONE Python process started for this module (`_RUNNER`, started once by a
module fixture): one TensorFlow import instead of one per example. Each example is executed as
a script (its own globals, `__name__ == "__main__"`) with its output captured, and Keras' session
cleared after it; an exception is recorded with its traceback and fails that example's test."""

# bazel: tf  (the examples import TensorFlow in subprocesses: a large test)

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here starts Python processes

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)

_RUNNER = r"""
import contextlib, io, json, sys, traceback
examples = json.loads(open(sys.argv[1]).read())
results = []
for index, code in enumerate(examples):
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            exec(compile(code, f"<README example {index}>", "exec"), {"__name__": "__main__"})
        error = None
    except BaseException:
        error = traceback.format_exc()
    results.append({"stdout": output.getvalue(), "error": error})
    if "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session()
with open(sys.argv[2], "w") as f:
    json.dump(results, f)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list:
    folder = tmp_path_factory.mktemp("readme")
    (folder / "examples.json").write_text(json.dumps(EXAMPLES))
    result = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(folder / "examples.json"), str(folder / "results.json")], cwd=REPO,
        capture_output=True, text=True, timeout=1800,
        # A bare environment, as a user's, but for conftest.py's XLA_FLAGS (every XLA pass, no LLVM
        # optimization of the CPU code: the same HLO compiled in less time), which the programs
        # the slow tier starts inherit too; every example here compiles with XLA.
        env={"TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
             **{k: v for k, v in os.environ.items() if k == "XLA_FLAGS"}},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((folder / "results.json").read_text())


def test_readme_has_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(runs, index):
    run = runs[index]
    assert run["error"] is None, run["error"][-3000:]
    assert run["stdout"].strip(), "each example prints its result"
    weights = re.search(r"clean ([\d.]+), corrupted ([\d.]+)", run["stdout"])
    if weights:  # the hypercleaning example must actually down-weight the corrupted examples
        assert float(weights[1]) > float(weights[2]) + 0.2, run["stdout"]
