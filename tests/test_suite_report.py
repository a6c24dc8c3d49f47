"""The benchmark suites' one report writer (experiments/benchmarks/report.py) and the parts of their rows
they share (timing.FloorRun.row, memory.stored_states), in-process."""

from __future__ import annotations

import json
import os

import pytest

from experiments.benchmarks import report as suite_report


def test_the_report_is_written_once_in_one_shape_and_the_figures_after_it(tmp_path, capsys):
    out = tmp_path / "out"  # made by the writer
    report = suite_report.SuiteReport("demo", out, "demo_results.json")
    assert report.environment["cpu_count"] >= 1 and len(report.environment["load_average"]) == 3
    seen_by_figures = []

    def figures(output_dir):
        seen_by_figures.append(json.loads(open(os.path.join(output_dir, "demo_results.json")).read()))
        return ["demo.png"]

    rows = [{"x": 1.0}, {"x": (2, 3)}]
    written = report.write({"repeats": 2}, rows, "| x |", summary={"met": True}, summary_text="met: yes",
                           figures=figures)
    stored = json.loads((out / "demo_results.json").read_text())
    assert list(stored) == ["date", "environment", "settings", "results", "summary", "table"]
    assert stored["date"] == stored["environment"]["date"] == written["date"]
    assert len(stored["environment"]["load_average_end"]) == 3
    assert stored["settings"] == {"repeats": 2} and stored["summary"] == {"met": True} and stored["table"] == "| x |"
    assert stored["results"] == [{"x": 1.0}, {"x": [2, 3]}]
    assert seen_by_figures == [stored]  # drawn after the JSON was on disk
    assert [p.name for p in out.iterdir()] == ["demo_results.json"]  # no temporary file left
    printed = capsys.readouterr().out.splitlines()
    assert printed[1:3] == ["| x |", "met: yes"]
    assert printed[-1].startswith(f"[demo suite] demo_results.json and demo.png in {out} (")


def test_without_summary_or_problem_the_report_has_no_such_keys(tmp_path, capsys):
    stored = suite_report.SuiteReport("bare", tmp_path, "bare.json").write({}, [], "t")
    assert list(stored) == ["date", "environment", "settings", "results", "table"]
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"[bare suite] bare.json in {tmp_path} (")


@pytest.mark.parametrize("value, text", [(None, "-"), (3 * 2**20, "3.0"), (2**19, "0.5")])
def test_mb(value, text):
    assert suite_report.mb(value) == text


def test_ratio_of_is_none_without_a_value_or_a_divisor():
    assert suite_report.ratio_of(3.0, 2.0) == 1.5
    assert suite_report.ratio_of(None, 2.0) is suite_report.ratio_of(1.0, None) is suite_report.ratio_of(1.0, 0) is None


def test_error_row_has_the_tables_width_and_the_errors_last_line():
    row = suite_report.error_row({"error": "Traceback ...\n  line\nValueError: bad K\n"}, 4, "reverse K=2", 9)
    assert row == "| 4 | reverse K=2 | ERROR: ValueError: bad K |" + " |" * 6
    assert row.count("|") == 10  # 9 cells
    assert suite_report.error_row({"error": "  "}, 4, "x", 5).startswith("| 4 | x | ERROR: ? |")


def test_verdict():
    assert [suite_report.verdict(v) for v in (True, False, None)] == ["met", "MISSED", "n/a"]


def test_a_floor_runs_row_from_its_timings():
    """experiments/common/timing.FloorRun.row, the timing fields of the estimators' and cnn rows."""
    from types import SimpleNamespace

    from experiments.common.timing import FloorRun, Timing

    first_memory = SimpleNamespace(rss_before=100, process_peak_growth=7, allocator_peak_growth=5)
    run = FloorRun(built=None, first=Timing(10.0, 12.0), first_out=[], first_memory=first_memory,
                   steady_memory=SimpleNamespace(allocator_peak_growth=3), floor_first=Timing(4.0, 4.0),
                   times=[Timing(2.0, 3.0), Timing(1.0, 5.0), Timing(3.0, 4.0)],
                   floor_times=[Timing(1.0, 2.0), Timing(0.5, 1.0), Timing(2.0, 2.0)])
    row = run.row()
    assert row["repeats"] == 3 and row["times_seconds"] == [2.0, 1.0, 3.0] and row["cpu_times_seconds"] == [3.0, 5.0, 4.0]
    assert row["median_seconds"] == 2.0 and row["floor_median_seconds"] == 1.0
    assert row["time_over_floor"] == 2.0 and row["min_time_over_floor"] == 1.0 / 0.5 and row["cpu_over_floor"] == 2.0
    assert row["compile_seconds"] == 8.0 and row["compile_cpu_seconds"] == 8.0 and row["floor_compile_seconds"] == 3.0
    assert (row["rss_before_bytes"], row["process_peak_growth_bytes"], row["first_call_allocator_peak_growth_bytes"],
            row["allocator_peak_growth_bytes"]) == (100, 7, 5, 3)
    fast = run._replace(first=Timing(1.0, 1.0)).row()  # a first call faster than the median: no negative compile time
    assert fast["compile_seconds"] == 0.0 and fast["compile_cpu_seconds"] == 0.0


@pytest.mark.parametrize("estimator, truncate, states", [
    ("floor", None, 0), ("reverse", 25, 25), ("checkpointed", 100, 10 + 10), ("checkpointed", 5, 2 + 3),
    ("checkpointed", 1, 1 + 1), ("forward", None, 2), ("implicit_cg", 25, 4), ("neumann", 5, None),
])
def test_stored_states_of_table_1(estimator, truncate, states):
    """experiments/common/memory.stored_states, the estimators' and cnn rows' "stored_states":
    checkpointed RMD keeps ⌈K/s⌉ checkpoints plus one segment of s = ⌈√K⌉ states."""
    from experiments.common.memory import stored_states

    assert stored_states(estimator, truncate) == states
