#!/usr/bin/env python3
"""Generate the top-level Bazel ``BUILD`` from the source tree, and check it.

    python tools/gen_build.py            # rewrite BUILD from the tree
    python tools/gen_build.py --check    # list files without a target, exit 1 if any

Targets written (Bazel's native Python rules, so no rules_python is needed):

* ``//:tf_bilevel``        py_library, ``glob(["tf_bilevel/**/*.py"])``;
* ``//:experiments_lib``   py_library: the experiments/ modules that are not programs;
* ``//:experiments_programs``  py_library of every experiment program, for tests
  that import a program or run it with ``python -m``;
* ``//:NAME``              py_binary per program ``experiments/NAME.py`` (a module
  with ``if __name__ == "__main__":``); the same for ``benchmarks/`` if it exists;
* ``//:test_support``      py_library: tests/conftest.py, non-test helpers in
  tests/, the tools a test loads, the pytest runner; data: pyproject.toml (pytest's
  configuration), the other files in tests/ (tests/test_seconds.json) and the
  non-Python tools a test runs (TEST_TOOL_DATA: tools/long_runs/state.sh);
* ``//:test_NAME``         py_test per ``tests/test_NAME.py``, run through pytest by
  ``tools/bazel_pytest_main.py``. Tests that import TensorFlow (or the packages
  built on it, or say ``# bazel: tf``) are tagged ``tf`` and sized ``large``; the
  others are ``small``.

Every test depends on every library: the tree is small, and a test that runs an
experiment in a subprocess imports more than its own import lines show.

``check(root)`` is what tests/test_build_sync.py runs: it parses BUILD (it is
Starlark, which for these rules is valid Python syntax, so ``ast`` reads it) and
reports every module, test or program without a target, and every target that
names a missing file. Standard library only: the sync test never imports TF.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

REGENERATE = "python tools/gen_build.py"
LIBRARY = "tf_bilevel"
TEST_DIR = "tests"
TEST_SUPPORT = "test_support"
PYTEST_MAIN = "tools/bazel_pytest_main.py"
TEST_TOOLS = ("tools/test_seconds.py",)  # tools a test loads (tests/test_tiers.py)
TEST_TOOL_DATA = ("tools/long_runs/state.sh",)  # non-Python tools a test runs (tests/test_long_runs_state.py)
SYNC_TEST = "test_build_sync"
# Folders of absl programs: each program gets a py_binary, the rest a py_library.
PROGRAM_DIRS = ("experiments", "benchmarks")
# The sync test reads the whole tree, so Bazel must rerun it when any file changes.
SYNC_TEST_DATA_GLOBS = ("tf_bilevel/**/*.py", "tests/**/*.py", "experiments/**/*.py",
                        "benchmarks/**/*.py", "tools/**/*.py")

_MAIN_GUARD = re.compile(r"^if\s+__name__\s*==\s*['\"]__main__['\"]\s*:", re.MULTILINE)
_USES_TF = re.compile(
    r"^\s*(?:import|from)\s+(?:tensorflow|tensorflow_datasets|keras|tf_keras|tf_bilevel|"
    r"experiments|benchmarks)\b|['\"]-m['\"]\s*,\s*['\"](?:experiments|benchmarks)\.|"
    r"^#\s*bazel:\s*tf\b",  # a test that runs TensorFlow another way (e.g. README code in subprocesses)
    re.MULTILINE,
)
_RULES = ("py_library", "py_binary", "py_test")


# --------------------------------------------------------------------------
# The tree.


@dataclass(frozen=True)
class ProgramDir:
    """One folder of programs (experiments/ or benchmarks/)."""

    name: str
    programs: tuple[str, ...]  # repo-relative paths of modules with a __main__ guard
    helpers: tuple[str, ...]  # the other modules

    @property
    def lib_target(self) -> str:
        return f"{self.name}_lib"

    @property
    def programs_target(self) -> str:
        return f"{self.name}_programs"


@dataclass(frozen=True)
class Tree:
    library: tuple[str, ...]  # tf_bilevel/**/*.py
    tests: tuple[str, ...]  # tests/**/test_*.py
    test_helpers: tuple[str, ...]  # tests/**/*.py that are not test files (conftest.py, ...)
    test_data: tuple[str, ...]  # the other files of tests/ (tests/test_seconds.json) and TEST_TOOL_DATA
    test_tools: tuple[str, ...]  # the TEST_TOOLS that exist
    program_dirs: tuple[ProgramDir, ...]
    tf_tests: frozenset[str]  # tests that import TensorFlow or packages built on it


def _py_files(root: Path, folder: str) -> list[str]:
    base = root / folder
    if not base.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in base.rglob("*.py")
                  if "__pycache__" not in p.parts and p.is_file())


# Left-overs of editors, merges and Python in a working tree, never data (nor committed).
_NOT_DATA_SUFFIXES = ("~", ".orig", ".rej", ".swp", ".swo", ".bak", ".tmp", ".py", ".pyc", ".pyo")


def _data_files(root: Path, folder: str) -> list[str]:
    """The files under `folder` that are neither Python nor junk: no hidden file or folder (a dot
    first: .DS_Store, .pytest_cache), nothing in __pycache__, no _NOT_DATA_SUFFIXES. A filter, not
    `git ls-files`: the sync test also runs in Bazel's sandbox, which has no git."""
    base = root / folder
    if not base.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in base.rglob("*")
                  if p.is_file() and not p.name.endswith(_NOT_DATA_SUFFIXES)
                  and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(base).parts))


def _is_test_file(path: str) -> bool:
    return Path(path).name.startswith("test_")


def is_program(source: str) -> bool:
    """A program is a module that runs something when executed (absl ``app.run``)."""
    return bool(_MAIN_GUARD.search(source))


def scan_tree(root: Path) -> Tree:
    """Finds the library modules, tests and programs under ``root``."""
    test_files = _py_files(root, TEST_DIR)
    tests = tuple(p for p in test_files if _is_test_file(p))
    program_dirs = []
    for folder in PROGRAM_DIRS:
        files = _py_files(root, folder)
        if not files:
            continue
        programs = tuple(p for p in files if is_program((root / p).read_text(encoding="utf-8")))
        program_dirs.append(ProgramDir(folder, programs, tuple(p for p in files if p not in programs)))
    tf_tests = frozenset(t for t in tests
                         if _USES_TF.search((root / t).read_text(encoding="utf-8")))
    return Tree(
        library=tuple(_py_files(root, LIBRARY)),
        tests=tests,
        test_helpers=tuple(p for p in test_files if not _is_test_file(p)),
        test_data=tuple(_data_files(root, TEST_DIR)) + tuple(p for p in TEST_TOOL_DATA if (root / p).is_file()),
        test_tools=tuple(p for p in TEST_TOOLS if (root / p).is_file()),
        program_dirs=tuple(program_dirs),
        tf_tests=tf_tests,
    )


def target_name(path: str, folder: str) -> str:
    """``experiments/meta/omniglot.py`` -> ``meta_omniglot``; ``tests/test_x.py`` -> ``test_x``."""
    relative = Path(path).relative_to(folder).with_suffix("")
    return "_".join(relative.parts)


# --------------------------------------------------------------------------
# Writing BUILD.


def _list(items: Iterable[str], indent: str = "    ") -> str:
    items = list(items)
    if not items:
        return "[]"
    if len(items) == 1:
        return f'["{items[0]}"]'
    inner = "".join(f'{indent}    "{item}",\n' for item in items)
    return f"[\n{inner}{indent}]"


def _rule(kind: str, **attrs: object) -> str:
    lines = [f"{kind}("]
    for key, value in attrs.items():
        if value is None:
            continue
        if isinstance(value, str) and not value.startswith(("glob(", "[")):
            value = f'"{value}"'
        lines.append(f"    {key} = {value},")
    lines.append(")")
    return "\n".join(lines)


def render_build(tree: Tree) -> str:
    """The BUILD file for ``tree`` (deterministic: same tree, same bytes)."""
    names: dict[str, str] = {}

    def claim(name: str, path: str) -> str:
        if name in names:
            raise ValueError(f"target name {name!r} is used by both {names[name]} and {path}: "
                             "rename one of the files")
        names[name] = path
        return name

    header = [
        "# Generated by tools/gen_build.py from the source tree. Do not edit by hand:",
        f"# after adding or removing a module, test or program, run `{REGENERATE}`.",
        "# tests/test_build_sync.py fails while a file has no target.",
        "# Bazel 4's native Python rules; see WORKSPACE and tools/bazel_test.sh for the",
        "# offline toolchain (`bazel test //...` runs the suite through pytest).",
        "",
        'package(default_visibility = ["//visibility:public"])',
        "",
        'exports_files(["BUILD", "pyproject.toml"])',
    ]
    blocks = [_rule("py_library", name=claim(LIBRARY, f"{LIBRARY}/"),
                    srcs=f'glob(["{LIBRARY}/**/*.py"])')]
    libraries = [f":{LIBRARY}"]
    for folder in tree.program_dirs:
        blocks.append(_rule("py_library", name=claim(folder.lib_target, f"{folder.name}/"),
                            srcs=_list(folder.helpers), deps=_list([f":{LIBRARY}"])))
        blocks.append(_rule("py_library", name=claim(folder.programs_target, f"{folder.name}/"),
                            srcs=_list(folder.programs), deps=_list([f":{folder.lib_target}"])))
        libraries += [f":{folder.lib_target}", f":{folder.programs_target}"]
        for program in folder.programs:
            blocks.append(_rule(
                "py_binary", name=claim(target_name(program, folder.name), program),
                srcs=_list([program]), main=program, python_version="PY3",
                # A program may import another program of its folder.
                deps=_list([f":{folder.programs_target}"]),
            ))
    blocks.append(_rule(
        "py_library", name=claim(TEST_SUPPORT, f"{TEST_DIR}/"),
        srcs=_list(list(tree.test_helpers) + list(tree.test_tools) + [PYTEST_MAIN]),
        data=_list(["pyproject.toml"] + list(tree.test_data)),
    ))
    test_deps = _list(libraries + [f":{TEST_SUPPORT}"])
    for test in tree.tests:
        name = claim(target_name(test, TEST_DIR), test)
        uses_tf = test in tree.tf_tests
        data = None
        if name == SYNC_TEST:  # it reads the whole tree: rerun it when the tree changes
            globs = ", ".join(f'"{g}"' for g in SYNC_TEST_DATA_GLOBS)
            data = f'["BUILD", "WORKSPACE"] + glob([{globs}])'
        blocks.append(_rule(
            "py_test", name=name, size="large" if uses_tf else "small",
            srcs=_list([PYTEST_MAIN, test]), main=PYTEST_MAIN, args=_list([test]),
            data=data, python_version="PY3", tags=_list(["tf"]) if uses_tf else None,
            deps=test_deps,
        ))
    return "\n".join(header) + "\n\n" + "\n\n".join(blocks) + "\n"


# --------------------------------------------------------------------------
# Reading BUILD.


@dataclass
class Target:
    kind: str
    name: str
    srcs: list[str] = field(default_factory=list)  # files, globs expanded
    data: list[str] = field(default_factory=list)
    deps: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    main: str | None = None
    missing: list[str] = field(default_factory=list)  # explicit files that do not exist
    empty_globs: list[str] = field(default_factory=list)


def _in_subpackage(root: Path, path: Path) -> bool:
    """Bazel globs stop at folders that hold their own BUILD file."""
    for parent in path.relative_to(root).parents:
        if parent != Path(".") and any((root / parent / b).exists() for b in ("BUILD", "BUILD.bazel")):
            return True
    return False


def _glob(root: Path, patterns: Sequence[str], exclude: Sequence[str]) -> list[str]:
    excluded: set[str] = set()
    for pattern in exclude:
        excluded.update(p.relative_to(root).as_posix() for p in root.glob(pattern))
    found: set[str] = set()
    for pattern in patterns:
        for p in root.glob(pattern):
            rel = p.relative_to(root).as_posix()
            if p.is_file() and rel not in excluded and not _in_subpackage(root, p):
                found.add(rel)
    return sorted(found)


class _Evaluator:
    """Evaluates the Starlark expressions a BUILD for Python rules uses."""

    def __init__(self, root: Path):
        self.root = root
        self.globs: list[tuple[str, bool]] = []  # (pattern text, matched anything)

    def value(self, node: ast.AST) -> object:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [self.value(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self.value(node.left) + self.value(node.right)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "glob":
            include = self.value(node.args[0]) if node.args else []
            kwargs = {k.arg: self.value(k.value) for k in node.keywords}
            include = kwargs.get("include", include)
            files = _glob(self.root, include, kwargs.get("exclude", []))
            self.globs.append((", ".join(include), bool(files)))
            return files
        raise ValueError(f"line {getattr(node, 'lineno', '?')}: unsupported expression "
                         f"{ast.dump(node)[:80]}")


def parse_build(root: Path, text: str) -> list[Target]:
    """The py_* targets of a BUILD file, with globs expanded against ``root``."""
    targets = []
    for statement in ast.parse(text, filename="BUILD").body:
        call = statement.value if isinstance(statement, ast.Expr) else None
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                and call.func.id in _RULES):
            continue
        evaluator = _Evaluator(root)
        attrs = {k.arg: evaluator.value(k.value) for k in call.keywords}
        target = Target(kind=call.func.id, name=str(attrs.get("name")))
        for key in ("srcs", "data", "deps", "args"):
            setattr(target, key, [str(v) for v in attrs.get(key, [])])
        target.main = attrs.get("main")
        explicit = [f for f in target.srcs + target.data + ([target.main] if target.main else [])]
        target.missing = [f for f in explicit if not f.startswith((":", "//", "@"))
                          and not (root / f).is_file()]
        target.empty_globs = [pattern for pattern, matched in evaluator.globs if not matched]
        targets.append(target)
    return targets


# --------------------------------------------------------------------------
# The check.


def _runs(target: Target, path: str) -> bool:
    """Whether running ``target`` runs ``path`` (as main, or via the pytest runner)."""
    if target.main == PYTEST_MAIN:
        return path in target.args and path in target.srcs
    if target.main is not None:
        return target.main == path
    return target.srcs == [path]


def check(root: Path) -> list[str]:
    """Everything out of sync between ``root/BUILD`` and the tree; empty when in sync."""
    root = Path(root)
    build = root / "BUILD"
    fix = f"run `{REGENERATE}` to regenerate BUILD"
    if not build.is_file():
        return [f"{build} does not exist; {fix}"]
    try:
        targets = parse_build(root, build.read_text(encoding="utf-8"))
    except (SyntaxError, ValueError) as error:
        return [f"cannot read {build}: {error}; {fix}"]
    tree = scan_tree(root)
    problems: list[str] = []
    by_name: dict[str, Target] = {}
    for target in targets:
        if target.name in by_name:
            problems.append(f"target //:{target.name} is defined twice")
        by_name[target.name] = target
        for path in target.missing:
            problems.append(f"target //:{target.name} names {path}, which does not exist; {fix}")
        for pattern in target.empty_globs:
            problems.append(f"target //:{target.name}: glob([{pattern}]) matches no file")
        for dep in target.deps:
            if dep.startswith(":") and dep[1:] not in {t.name for t in targets}:
                problems.append(f"target //:{target.name} depends on missing target {dep}")
    libraries = [t for t in targets if t.kind == "py_library"]
    tests = [t for t in targets if t.kind == "py_test"]
    binaries = [t for t in targets if t.kind == "py_binary"]

    library = by_name.get(LIBRARY)
    if library is None or library.kind != "py_library":
        problems.append(f"BUILD has no py_library named {LIBRARY!r}; {fix}")
    else:
        for module in tree.library:
            if module not in library.srcs:
                problems.append(f"{module} is not in the srcs of //:{LIBRARY}; {fix}")

    for test in tree.tests:
        if not any(_runs(t, test) for t in tests):
            problems.append(f"{test} has no py_test target (a py_test that runs it); {fix}")
    for helper in tree.test_helpers + tree.test_data + tree.test_tools:
        holders = [t.name for t in libraries if helper in t.srcs + t.data]
        if not holders:
            problems.append(f"{helper} is in no py_library (test support); {fix}")
            continue
        for t in tests:
            if not any(f":{h}" in t.deps for h in holders):
                problems.append(f"py_test //:{t.name} does not depend on the library holding "
                                f"{helper} (//:{holders[0]}); {fix}")

    for folder in tree.program_dirs:
        for program in folder.programs:
            if not any(_runs(b, program) for b in binaries):
                problems.append(f"{program} is a program (it has `if __name__ == \"__main__\"`) "
                                f"but has no py_binary target; {fix}")
        for helper in folder.helpers:
            if not any(helper in t.srcs for t in libraries):
                problems.append(f"{helper} is in no py_library (e.g. //:{folder.lib_target}); {fix}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                        help="repository root (default: this checkout)")
    parser.add_argument("--check", action="store_true",
                        help="do not write; list what is out of sync and exit 1 if anything is")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.root)
        for problem in problems:
            print(problem)
        if not problems:
            print(f"{args.root / 'BUILD'} is in sync with the tree")
        return 1 if problems else 0
    text = render_build(scan_tree(args.root))
    path = args.root / "BUILD"
    old = path.read_text(encoding="utf-8") if path.is_file() else None
    if old != text:
        path.write_text(text, encoding="utf-8")
    print(f"{path}: {'unchanged' if old == text else 'written'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
