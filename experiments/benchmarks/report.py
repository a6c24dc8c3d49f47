"""The report of a benchmark suite, one shape for every suite.

    report = SuiteReport("cnn", output_dir, "cnn_results.json")   # when the suite starts
    ...                                                          # measure
    report.write(settings, rows, format_table(rows), summary=..., problem=...)

`write` prints the table (and the summary's text), writes <output_dir>/<filename> atomically
(experiments/common/run_state.write_json_atomically) as

    {"date", "environment", "settings", "results", ["summary",] ["problem",] "table"}

(`environment`: experiments/common/provenance.py's record from when the suite started, with the
load average at its end added), draws the suite's figures, if any, after the JSON is safe, and
ends with the closing line every program prints (`program.announce_done`). Also the cells the
suites' tables share.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional, Sequence

from experiments.common import program, provenance
from experiments.common.run_state import jsonable, write_json_atomically


class SuiteReport:
    """The report of one suite run: create it when the suite starts (the environment record and
    the clock start then), `write` it when the suite has measured."""

    def __init__(self, suite: str, output_dir: str | os.PathLike, filename: str):
        self.suite, self.output_dir, self.filename = suite, os.fspath(output_dir), filename
        self.environment = provenance.environment()
        self.started = time.time()

    def write(self, settings: dict, results: list, table: str, *, summary: Any = None, summary_text: str = "",
              problem: Optional[dict] = None,
              figures: Optional[Callable[[str], Sequence[str]]] = None) -> dict:
        """Prints `table` and `summary_text`, writes the JSON (module docstring), then
        `figures(output_dir)` (the names of the files it drew); returns the report."""
        provenance.mark_end(self.environment)
        report = {"date": self.environment["date"], "environment": self.environment, "settings": settings,
                  "results": results}
        if summary is not None:
            report["summary"] = summary
        if problem is not None:
            report["problem"] = problem
        report["table"] = table
        print("\n" + "\n".join(filter(None, [table, summary_text])), flush=True)
        os.makedirs(self.output_dir, exist_ok=True)
        write_json_atomically(os.path.join(self.output_dir, self.filename), jsonable(report), indent=2)
        drawn = list(figures(self.output_dir)) if figures is not None else []
        program.announce_done(f"{self.suite} suite", " and ".join([self.filename, *drawn]), self.output_dir,
                              time.time() - self.started)
        return report


def verdict(met: Optional[bool]) -> str:
    """A target's verdict in the printed summaries: "met", "MISSED", or "n/a" when not measured."""
    return "n/a" if met is None else "met" if met else "MISSED"


def mb(value: Optional[float]) -> str:
    """Bytes as MB with one decimal; "-" for no value."""
    return "-" if value is None else f"{value / 2**20:.1f}"


def ratio_of(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """a / b, or None when either is missing or b is 0."""
    return None if a is None or b is None or b == 0 else a / b


def error_row(row: dict, steps: Any, label: str, columns: int) -> str:
    """The table row of a configuration that failed: its last error line in the third of
    `columns` cells."""
    text = row["error"].strip()
    message = text.splitlines()[-1][:80] if text else "?"
    return f"| {steps} | {label} | ERROR: {message} |" + " |" * (columns - 3)
