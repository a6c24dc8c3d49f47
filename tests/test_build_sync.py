"""The Bazel BUILD file has a target for every module, test and program of the tree.

Pure Python and fast: tools/gen_build.py parses BUILD with `ast` and scans the
tree; nothing here imports TensorFlow. When a check fails, its message names the
file without a target and the command that regenerates BUILD.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# resolve(): under `bazel test` this file is a runfiles symlink into the checkout.
REPO = Path(__file__).resolve().parents[1]


def _load_gen_build():
    spec = importlib.util.spec_from_file_location("gen_build", REPO / "tools" / "gen_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_build"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


gen_build = _load_gen_build()

PROGRAM = textwrap.dedent("""\
    from absl import app

    def main(argv):
        del argv

    if __name__ == "__main__":
        app.run(main)
""")


# --------------------------------------------------------------------------
# The real tree.


def test_build_has_a_target_for_every_file_of_the_tree():
    problems = gen_build.check(REPO)
    assert not problems, "BUILD is out of sync with the tree:\n  " + "\n  ".join(problems)


def test_build_is_what_the_generator_writes():
    # Also catches what check() does not look at (deps, tags, sizes) going stale.
    expected = gen_build.render_build(gen_build.scan_tree(REPO))
    assert (REPO / "BUILD").read_text(encoding="utf-8") == expected, (
        f"BUILD differs from what tools/gen_build.py writes: run `{gen_build.REGENERATE}`")


def test_every_file_build_names_is_committed():
    # A BUILD generated from a working tree with uncommitted files fails `bazel test` on a clean
    # clone ("missing input file"): this catches it before the commit leaves the machine.
    try:
        tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    tracked_files = set(tracked.decode().split("\0"))
    named = {path for t in gen_build.parse_build(REPO, (REPO / "BUILD").read_text()) for path in (*t.srcs, *t.data)}
    untracked = sorted(path for path in named if path not in tracked_files and (REPO / path).is_file())
    assert not untracked, "BUILD names files that are not committed (git add them): " + ", ".join(untracked)


def test_real_tree_has_the_targets_the_issue_asks_for():
    targets = {t.name: t for t in gen_build.parse_build(REPO, (REPO / "BUILD").read_text())}
    library = targets["tf_bilevel"]
    assert library.kind == "py_library"
    assert "tf_bilevel/__init__.py" in library.srcs and "tf_bilevel/api.py" in library.srcs
    sync = targets["test_build_sync"]
    assert sync.kind == "py_test" and sync.args == ["tests/test_build_sync.py"]
    assert "BUILD" in sync.data  # Bazel reruns this test when BUILD changes
    helpers = targets["experiments_lib"].srcs
    assert "experiments/data/tfds_offline.py" in helpers and "experiments/__init__.py" in helpers


# --------------------------------------------------------------------------
# The checker on small trees: it must report what is missing.


def _write(root: Path, files: dict[str, str]) -> None:
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text, encoding="utf-8")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A tiny project with a generated, in-sync BUILD."""
    _write(tmp_path, {
        "tf_bilevel/__init__.py": "",
        "tf_bilevel/estimators/reverse.py": "",
        "experiments/__init__.py": "",
        "experiments/datasets.py": "def load():\n    return 'if __name__ == \"__main__\":'\n",
        "experiments/hypercleaning.py": PROGRAM,
        "tests/conftest.py": "",
        "tests/test_core.py": "import tensorflow as tf\n\ndef test_x():\n    assert tf\n",
        "tests/test_pure.py": "def test_y():\n    assert 1 + 1 == 2\n",
        "tools/bazel_pytest_main.py": "",
        "pyproject.toml": "",
        "WORKSPACE": "",
    })
    (tmp_path / "BUILD").write_text(gen_build.render_build(gen_build.scan_tree(tmp_path)))
    assert gen_build.check(tmp_path) == []
    return tmp_path


def _problems_about(root: Path, path: str) -> list[str]:
    return [p for p in gen_build.check(root) if path in p]


def test_generated_build_has_one_target_per_test_and_program(tree):
    targets = {t.name: t for t in gen_build.parse_build(tree, (tree / "BUILD").read_text())}
    assert targets["tf_bilevel"].srcs == ["tf_bilevel/__init__.py", "tf_bilevel/estimators/reverse.py"]
    assert targets["hypercleaning"].kind == "py_binary"
    assert targets["hypercleaning"].main == "experiments/hypercleaning.py"
    # datasets.py mentions __main__ only inside a string: a helper, not a program.
    assert targets["experiments_lib"].srcs == ["experiments/__init__.py", "experiments/datasets.py"]
    assert targets["test_core"].kind == targets["test_pure"].kind == "py_test"
    assert targets["test_core"].args == ["tests/test_core.py"]
    assert ":test_support" in targets["test_pure"].deps
    assert "tests/conftest.py" in targets["test_support"].srcs
    text = (tree / "BUILD").read_text()
    core = text[text.index('name = "test_core"'):text.index('name = "test_pure"')]
    assert 'tags = ["tf"]' in core and 'size = "large"' in core


def test_new_test_file_without_target_is_reported(tree):
    _write(tree, {"tests/test_new.py": "def test_z():\n    pass\n"})
    [problem] = _problems_about(tree, "tests/test_new.py")
    assert "no py_test" in problem and gen_build.REGENERATE in problem


def test_new_program_without_py_binary_is_reported(tree):
    _write(tree, {"experiments/meta_learning.py": PROGRAM})
    [problem] = _problems_about(tree, "experiments/meta_learning.py")
    assert "py_binary" in problem and gen_build.REGENERATE in problem


def test_new_helper_module_outside_every_library_is_reported(tree):
    _write(tree, {"experiments/common/plotting.py": "import matplotlib\n"})
    [problem] = _problems_about(tree, "experiments/common/plotting.py")
    assert "py_library" in problem


def test_test_data_and_a_test_tool_outside_test_support_are_reported_then_listed(tree):
    _write(tree, {"tests/test_seconds.json": "{}\n", "tools/test_seconds.py": "", "tools/long_runs/state.sh": ""})
    for path in ("tests/test_seconds.json", "tools/test_seconds.py", "tools/long_runs/state.sh"):
        [problem] = _problems_about(tree, path)
        assert "py_library" in problem
    (tree / "BUILD").write_text(gen_build.render_build(gen_build.scan_tree(tree)))
    support = {t.name: t for t in gen_build.parse_build(tree, (tree / "BUILD").read_text())}["test_support"]
    assert "tests/test_seconds.json" in support.data and "tools/test_seconds.py" in support.srcs
    assert "tools/long_runs/state.sh" in support.data
    assert gen_build.check(tree) == []


def test_junk_in_tests_is_not_test_data(tree):
    junk = ["tests/.DS_Store", "tests/.pytest_cache/v/cache/nodeids", "tests/__pycache__/x.json",
            "tests/test_seconds.json~", "tests/test_seconds.json.orig", "tests/.test_core.py.swp", "tests/notes.bak"]
    _write(tree, {"tests/test_seconds.json": "{}\n", "tests/data/table.csv": "a\n", **dict.fromkeys(junk, "")})
    assert gen_build.scan_tree(tree).test_data == ("tests/data/table.csv", "tests/test_seconds.json")


def test_conftest_outside_test_support_is_reported(tree):
    build = tree / "BUILD"
    build.write_text(build.read_text().replace('"tests/conftest.py",', ""))
    assert any("py_library" in p for p in _problems_about(tree, "tests/conftest.py"))


def test_library_glob_keeps_new_core_modules_covered(tree):
    _write(tree, {"tf_bilevel/dynamics/loops.py": ""})
    assert gen_build.check(tree) == []
    # ... but a narrower hand-written glob leaves the subpackages out.
    build = tree / "BUILD"
    build.write_text(build.read_text().replace('glob(["tf_bilevel/**/*.py"])',
                                               'glob(["tf_bilevel/*.py"])'))
    problems = gen_build.check(tree)
    assert any("tf_bilevel/dynamics/loops.py" in p and "//:tf_bilevel" in p for p in problems)
    assert any("tf_bilevel/estimators/reverse.py" in p for p in problems)


def test_target_naming_a_deleted_file_is_reported(tree):
    (tree / "tests" / "test_pure.py").unlink()
    [problem] = _problems_about(tree, "tests/test_pure.py")
    assert "does not exist" in problem and "//:test_pure" in problem


def test_py_test_that_does_not_run_its_file_is_reported(tree):
    # The runner would execute pytest on nothing: the srcs alone do not run the test.
    build = tree / "BUILD"
    build.write_text(build.read_text().replace('args = ["tests/test_core.py"]', "args = []"))
    [problem] = _problems_about(tree, "tests/test_core.py")
    assert "no py_test" in problem


def test_missing_and_unreadable_build_are_reported(tree):
    build = tree / "BUILD"
    build.write_text("py_library(name = 'x', srcs = select({}))\n")
    [problem] = gen_build.check(tree)
    assert "cannot read" in problem and gen_build.REGENERATE in problem
    build.unlink()
    [problem] = gen_build.check(tree)
    assert "does not exist" in problem


def test_clashing_target_names_are_refused(tree):
    _write(tree, {"experiments/test_core.py": PROGRAM})
    with pytest.raises(ValueError, match="test_core"):
        gen_build.render_build(gen_build.scan_tree(tree))


@pytest.mark.slow
def test_command_line_check_and_regeneration(tree):
    command = [sys.executable, str(REPO / "tools" / "gen_build.py"), "--root", str(tree)]
    assert subprocess.run(command + ["--check"], capture_output=True).returncode == 0
    _write(tree, {"tests/test_new.py": "def test_z():\n    pass\n"})
    checked = subprocess.run(command + ["--check"], capture_output=True, text=True)
    assert checked.returncode == 1 and "tests/test_new.py" in checked.stdout
    assert subprocess.run(command, capture_output=True).returncode == 0  # regenerates BUILD
    assert gen_build.check(tree) == []
    assert 'args = ["tests/test_new.py"]' in (tree / "BUILD").read_text()
