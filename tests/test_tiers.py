"""The two tiers (conftest.py): an unmarked test that starts a Python process fails, whether
it lets the error through or catches it; a process of another program (git, a shell tool) is
allowed; a marked test runs the process. With CI set, a skipped test fails. Under
`--dist loadfile` the longest file goes out first, by tools/test_seconds.py's JSON."""
# bazel: tf  (imports conftest, which imports TensorFlow)

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import multiprocessing.process
import subprocess
import sys
from pathlib import Path

import pytest

import conftest

pytest_plugins = ["pytester"]


def _recorded_and_forgotten(request) -> bool:
    """Whether the check recorded this test as unmarked; forgets it (this test expected it)."""
    recorded = request.node.stash.get(conftest._UNMARKED, None) is not None
    if recorded:
        del request.node.stash[conftest._UNMARKED]
    return recorded


def test_an_unmarked_test_cannot_start_python(request):
    for start in (lambda: subprocess.run([sys.executable, "-c", "pass"]),
                  lambda: subprocess.Popen(f"{sys.executable} -c pass", shell=True),
                  lambda: subprocess.check_output(["python3", "-c", "pass"])):
        with pytest.raises(conftest.UnmarkedSlowTestError, match="test_an_unmarked_test_cannot_start_python.*slow"):
            start()
        assert _recorded_and_forgotten(request)


def test_an_unmarked_test_cannot_start_a_multiprocessing_process(request):
    with pytest.raises(conftest.UnmarkedSlowTestError, match="multiprocessing"):
        multiprocessing.get_context("spawn").Process(target=print).start()
    assert _recorded_and_forgotten(request)


def test_other_programs_are_allowed_unmarked(request):
    assert subprocess.run(["true"]).returncode == 0
    assert not _recorded_and_forgotten(request)


@pytest.mark.slow
def test_a_marked_test_starts_python(request):
    done = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "42"
    assert not _recorded_and_forgotten(request)


def test_a_test_that_catches_the_error_still_fails_and_ci_fails_skips(pytester, monkeypatch):
    pytester.makeconftest((Path(__file__).with_name("conftest.py")).read_text())
    pytester.makeini("[pytest]\nmarkers =\n    slow: slow tier\n")
    pytester.makepyfile(test_inner='''
        import subprocess, sys, pytest

        def test_hides_its_process():
            try:
                subprocess.run([sys.executable, "-c", "pass"])
            except Exception:
                pass

        def test_skips():
            pytest.skip("no data here")
    ''')
    # The inner session's conftest wraps these again: restored when the test ends.
    monkeypatch.setattr(subprocess.Popen, "__init__", subprocess.Popen.__init__)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", multiprocessing.process.BaseProcess.start)
    monkeypatch.delenv("CI", raising=False)
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, skipped=1)
    result.stdout.fnmatch_lines(["*test_hides_its_process starts a Python process*not marked @pytest.mark.slow*"])
    monkeypatch.setenv("CI", "1")
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*skipped with CI set (no data here): in CI a missing data source or tool fails the run*"])


@pytest.mark.slow
def test_loadfile_hands_out_the_longest_file_first_not_the_one_with_most_tests(pytester):
    # xdist's own order (most tests first) would run test_many first; test_seconds.json says
    # test_online_hpo takes longer (test_many, not listed, counts 1 s a test), so the one worker
    # gets it first.
    pytester.makeconftest((Path(__file__).with_name("conftest.py")).read_text())
    (pytester.path / "test_seconds.json").write_text('{"test_online_hpo": {"fast": 20, "slow": 300}}')
    pytester.makeini("[pytest]\nmarkers =\n    slow: slow tier\n")
    pytester.makepyfile(test_many="def test_a(): pass\ndef test_b(): pass\ndef test_c(): pass\n",
                        test_online_hpo="def test_long(): pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "1", "--dist", "loadfile", "-v")
    result.assert_outcomes(passed=4)
    ran = [line for line in result.outlines if "PASSED" in line]
    assert "test_online_hpo.py::test_long" in ran[0] and "test_many.py::test_c" in ran[-1], ran


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"test_x": {"fast": 3}}', "\udcff"])
def test_a_malformed_seconds_file_only_warns(tmp_path, monkeypatch, text):
    """The JSON only orders the files: a malformed one orders them by their number of tests."""
    path = tmp_path / "test_seconds.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    monkeypatch.setattr(conftest, "SECONDS_FILE", path)
    with pytest.warns(UserWarning, match="test_seconds.py"):
        assert conftest._ci_seconds() == {}
    path.write_text('{"test_x": {"fast": 3, "slow": 0}}')
    assert conftest._ci_seconds() == {"test_x": {"fast": 3, "slow": 0}}


def _load_tool():
    path = Path(__file__).resolve().parents[1] / "tools" / "test_seconds.py"
    spec = importlib.util.spec_from_file_location("test_seconds_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _junit(path: Path, cases: list[tuple[str, float]], rows: str = "") -> Path:
    """A JUnit report like pytest's, one test per (classname, seconds), then `rows` as written."""
    rows = "".join(f'<testcase classname="{classname}" name="t{i}" time="{seconds}" />'
                   for i, (classname, seconds) in enumerate(cases)) + rows
    path.write_text('<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest">'
                    f"{rows}</testsuite></testsuites>")
    return path


def test_the_seconds_tool_sums_each_file_per_tier_and_averages_the_runs(tmp_path):
    tool = _load_tool()
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
    reports = [
        _junit(tmp_path / "a" / "fast.xml", [("tests.test_x", 1.25), ("tests.test_x.TestGroup", 2.5), ("tests.test_y", 0.8)]),
        _junit(tmp_path / "a" / "slow.xml", [("tests.test_x", 10.0), ("tests.test_z", 100.0), ("tests.test_z", 20.0)]),
        _junit(tmp_path / "b" / "fast.xml", [("tests.test_x", 6.25)]),  # test_y in one fast run only
        _junit(tmp_path / "b" / "slow.xml", [("tests.test_x", 12.0), ("tests.test_z", 140.0)]),
    ]
    output = tmp_path / "seconds.json"
    assert tool.main([*map(str, reports), "--output", str(output)]) == 0
    # test_x fast: (1.25 + 2.5 + 6.25) / 2 = 5, slow: (10 + 12) / 2 = 11; test_y fast: 0.8 over the one
    # run that holds it; test_z slow: (100 + 20 + 140) / 2
    assert json.loads(output.read_text()) == {
        "test_x": {"fast": 5, "slow": 11}, "test_y": {"fast": 1, "slow": 0}, "test_z": {"fast": 0, "slow": 130}}
    assert list(json.loads(output.read_text())) == ["test_x", "test_y", "test_z"]
    with pytest.raises(ValueError, match=r"named after its tier.*fast\.xml"):
        tool.main([str(_junit(tmp_path / "other.xml", [("tests.test_x", 1.0)])), "--output", str(output)])


def test_the_seconds_tool_reads_a_files_collection_error_or_module_skip_from_its_name(tmp_path):
    """pytest writes those with classname "" and the module's dotted path as name."""
    tool = _load_tool()
    rows = ('<testcase classname="" name="tests.test_broken" time="0.000"><error message="collection failure">'
            'SyntaxError</error></testcase><testcase classname="" name="tests.test_skipped" time="0.5">'
            '<skipped type="pytest.skip" message="no">skipped</skipped></testcase>')
    report = _junit(tmp_path / "fast.xml", [("tests.test_ok", 2.0)], rows)
    assert tool.file_seconds(report) == {"test_ok": 2.0, "test_broken": 0.0, "test_skipped": 0.5}


def test_the_committed_seconds_have_the_shape_conftest_reads():
    table = conftest._ci_seconds()
    assert "test_tiers" in table
    assert all(set(tiers) == {"fast", "slow"} and all(isinstance(s, int) and s >= 0 for s in tiers.values())
               for tiers in table.values())
