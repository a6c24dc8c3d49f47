"""The programs as a user installs them (issue #10): `pip install .` puts them on PATH as tfb-*
commands, and `python -m experiments.NAME` works from any directory, not only the repository's.

The package is built from a copy of the source into a fresh folder (`pip install --target`,
offline: no index, no dependencies, no build isolation), and every command runs with only that
folder on PYTHONPATH and another folder as the working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here starts Python processes

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300
HELP_EXIT_STATUS = 1  # absl's --help prints the help and exits with status 1


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")  # the build backend, from the environment (no isolation)
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for package in ("tf_bilevel", "experiments"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(src)],
                   check=True, cwd=src, timeout=TIMEOUT, capture_output=True)
    return target


def run(installed: Path, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed), "TF_CPP_MIN_LOG_LEVEL": "2", "TF_BILEVEL_OFFLINE": "1"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def test_the_installed_package_holds_the_programs_and_their_commands(installed, tmp_path):
    done = run(installed, [sys.executable, "-c", "import experiments.hypercleaning as m, tf_bilevel as t; "
                           "print(m.__file__); print(t.__file__)"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(line.startswith(str(installed)) for line in done.stdout.split()), done.stdout
    scripts = sorted(p.name for p in (installed / "bin").iterdir())
    assert scripts == ["tfb-benchmark", "tfb-hypercleaning", "tfb-omniglot", "tfb-online-hpo", "tfb-reweighting",
                       "tfb-task-interaction", "tfb-toy"]


def test_console_script_help_lists_the_flags_but_not_the_internal_ones(installed, tmp_path):
    done = run(installed, [str(installed / "bin" / "tfb-hypercleaning"), "--help"], tmp_path)
    assert done.returncode == HELP_EXIT_STATUS, done.stderr[-3000:]
    help_text = done.stdout
    assert help_text.startswith("Data hypercleaning on MNIST"), help_text[:500]
    for flag in ("--preset", "--output_dir", "--local_dir", "--save_every", "--truncate"):
        assert flag in help_text, flag
    for internal in ("--memory_probe:", "--pause_after:", "--checkpoint_every:", "--mnist_dir:"):  # `--name: help`
        assert internal not in help_text, internal


def test_console_script_runs_a_quick_program_from_another_directory(installed, tmp_path):
    done = run(installed, [str(installed / "bin" / "tfb-toy"), "--preset=quick"], tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    results = json.loads((tmp_path / "out" / "toy" / "results.json").read_text())  # the default out/<program>
    assert results["config"]["preset"] == "quick"


def test_python_m_runs_the_installed_module_from_another_directory(installed, tmp_path):
    done = run(installed, [sys.executable, "-m", "experiments.online_hpo", "--help"], tmp_path)
    assert done.returncode == HELP_EXIT_STATUS, done.stderr[-3000:]
    assert "--local_dir:" in done.stdout and "--pause_after:" not in done.stdout


def test_console_scripts_and_programs_name_the_same_modules(monkeypatch):
    """pyproject's [project.scripts] and experiments.common.cli.PROGRAMS are one list: each tfb-*
    command is declared in both, and its entry point runs the module PROGRAMS names."""
    import tomllib

    from experiments.common import cli

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(cli.PROGRAMS)
    ran = []
    monkeypatch.setattr(cli, "_run", ran.append)
    for script, target in scripts.items():
        module, function = target.split(":")
        assert module == "experiments.common.cli"
        getattr(cli, function)()
        assert ran[-1] == cli.PROGRAMS[script], script
        assert (REPO / (cli.PROGRAMS[script].replace(".", "/") + ".py")).exists()
