#!/usr/bin/env python3
"""Write tests/test_seconds.json: each test file's seconds per tier in CI's JUnit reports.

    python tools/test_seconds.py REPORTS/fast.xml REPORTS/slow.xml [OTHER_RUN/fast.xml ...]

Each report is a pytest ``--junitxml`` file named after its tier (``.ci/run`` writes
``fast.xml`` and ``slow.xml`` into the directory it prints). A file's seconds in a tier are the
sum of its tests' times in one report, averaged over the reports of that tier that hold the
file, rounded to whole seconds. tests/conftest.py reads the JSON only to hand the files to the
xdist workers longest first (``--dist loadfile``), so a stale entry costs balance, never
correctness. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

TIERS = ("fast", "slow")
OUTPUT = Path(__file__).resolve().parents[1] / "tests" / "test_seconds.json"


def file_of(classname: str) -> str:
    """The test file's stem in a JUnit classname: "tests.test_x.TestY" -> "test_x"."""
    for part in classname.split("."):
        if part.startswith("test_"):
            return part
    raise ValueError(f"JUnit classname {classname!r} names no test_*.py module")


def file_seconds(report: Path) -> dict[str, float]:
    """Seconds per test file in one JUnit report (setup, call and teardown, as pytest records)."""
    seconds: dict[str, float] = defaultdict(float)
    for case in ET.parse(report).getroot().iter("testcase"):
        # A file's collection error or module-level skip: classname "", the module in name.
        seconds[file_of(case.get("classname") or case.get("name", ""))] += float(case.get("time", 0.0))
    return dict(seconds)


def tier_of(report: Path) -> str:
    if report.stem not in TIERS:
        raise ValueError(f"{report}: a report must be named after its tier, one of {[f'{t}.xml' for t in TIERS]}")
    return report.stem


def mean_seconds(reports: Iterable[Path]) -> dict[str, dict[str, int]]:
    """{file: {tier: whole seconds}}, each the mean over the tier's reports that hold the file;
    a file with no test in a tier has 0 there."""
    runs: dict[tuple[str, str], list[float]] = defaultdict(list)
    for report in reports:
        tier = tier_of(report)
        for name, seconds in file_seconds(report).items():
            runs[(name, tier)].append(seconds)
    table: dict[str, dict[str, int]] = {}
    for (name, tier), values in sorted(runs.items()):
        table.setdefault(name, dict.fromkeys(TIERS, 0))[tier] = round(sum(values) / len(values))
    return table


def render(table: dict[str, dict[str, int]]) -> str:
    """Sorted JSON, one file a line."""
    lines = [f"  {json.dumps(name)}: {json.dumps(table[name])}" for name in sorted(table)]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="JUnit XML files named fast.xml / slow.xml")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"default: {OUTPUT}")
    args = parser.parse_args(argv)
    table = mean_seconds(args.reports)
    args.output.write_text(render(table), encoding="utf-8")
    print(f"{args.output}: {len(table)} test files from {len(args.reports)} reports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
