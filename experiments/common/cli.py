"""Console-script entry points of the experiment programs (pyproject.toml `[project.scripts]`),
and `define_internal` for the programs' internal flags.

`tfb-hypercleaning ARGS` is `python -m experiments.hypercleaning ARGS`: each entry point runs
the program module as `__main__` through `runpy`, as `python -m` does. absl's `--help` prints
the `__main__` module's docstring and the flags defined by the module named `sys.argv[0]`, so a
plain function call (flags registered under "experiments.hypercleaning", argv[0] the script)
would print no flags at all.
"""

from __future__ import annotations

import os
import runpy
from typing import Any, Callable

PROGRAMS = {
    "tfb-toy": "experiments.toy",
    "tfb-hypercleaning": "experiments.hypercleaning",
    "tfb-task-interaction": "experiments.task_interaction",
    "tfb-omniglot": "experiments.omniglot",
    "tfb-online-hpo": "experiments.online_hpo",
    "tfb-reweighting": "experiments.reweighting",
    "tfb-benchmark": "experiments.benchmark",
}


def define_internal(define: Callable[..., Any], name: str, default: Any, help: str, **kwargs: Any) -> Any:
    """`define(name, default, help)` (an absl `flags.DEFINE_*`) for a flag that only tests and the
    program's own worker processes pass: registered under this module rather than the program, so
    `--help` (the main module's flags) leaves it out; `--helpfull` still lists it."""
    return define(name, default, help=f"Internal: {help}", module_name=__name__, **kwargs)


def _run(module: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's start-up notes would bury --help
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def toy() -> None:
    _run(PROGRAMS["tfb-toy"])


def hypercleaning() -> None:
    _run(PROGRAMS["tfb-hypercleaning"])


def task_interaction() -> None:
    _run(PROGRAMS["tfb-task-interaction"])


def omniglot() -> None:
    _run(PROGRAMS["tfb-omniglot"])


def online_hpo() -> None:
    _run(PROGRAMS["tfb-online-hpo"])


def reweighting() -> None:
    _run(PROGRAMS["tfb-reweighting"])


def benchmark() -> None:
    _run(PROGRAMS["tfb-benchmark"])
