"""Main of every Bazel py_test in BUILD: runs the one pytest file given as argument.

Bazel's py_test only executes its main module, and the test files are pytest
modules (functions + fixtures, no ``__main__`` block), so executing them directly
would pass without running a test. This runner hands the file to pytest instead,
writes the JUnit XML where Bazel asks for it, and fails the target when pytest
fails or collects nothing (exit code 5).
"""

from __future__ import annotations

import os
import sys

import pytest


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].endswith(".py"):
        print(f"usage: {argv[0]} tests/test_NAME.py (BUILD passes it in `args`)", file=sys.stderr)
        return 2
    args = [argv[1], "-p", "no:cacheprovider"]  # the runfiles tree is read-only
    xml_output = os.environ.get("XML_OUTPUT_FILE")  # set by `bazel test`
    if xml_output:
        args.append(f"--junitxml={xml_output}")
    return int(pytest.main(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
