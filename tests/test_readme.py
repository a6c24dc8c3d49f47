"""The README's Python examples run as written (they are the public API's documentation)."""

# bazel: tf  (the examples import TensorFlow in subprocesses: a large test)

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here starts Python processes

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index):
    result = subprocess.run(
        [sys.executable, "-c", EXAMPLES[index]], cwd=REPO, capture_output=True, text=True, timeout=600,
        env={"TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "each example prints its result"
    weights = re.search(r"clean ([\d.]+), corrupted ([\d.]+)", result.stdout)
    if weights:  # the hypercleaning example must actually down-weight the corrupted examples
        assert float(weights[1]) > float(weights[2]) + 0.2, result.stdout
