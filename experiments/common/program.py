"""The skeleton of every experiment program and benchmark suite, written once.

A program is its `Config` (experiments/common/config.py: a dataclass whose fields declare their
flags), its presets, and its experiment: load the data, run, draw the figures, format the table.
Everything around that is here:

    run_program   output-folder lock → --restart → settings fingerprint → environment record →
                  data → experiment → results.json → figures → table
    main, start   flags → Config (a bad value is a usage error) → run_program → exit status

    PROGRAM = program.Program("toy", ToyConfig, PRESETS, experiment=run, table=format_summary)
    if __name__ == "__main__":
        program.start(PROGRAM)

Exit status (README, "Exit codes"), one convention for every program and suite:

    0  finished
    1  the run failed (non-finite values; an unexpected error, with its traceback)
    2  the command cannot run as given: a bad flag or value, no data, a method the installed
       library cannot run
    3  the output folder or its saved state cannot be used: in use by another run, not
       writable, damaged, or holding the state of a run with other settings

Errors 1 (non-finite values), 2 and 3 are one line `<program>: error: ...` on stderr (absl
prints a bad flag with the program's usage), never a traceback.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from experiments.common import config
from experiments.common.run_state import (
    STATE_ERRORS, discard_state, exclusive_output_dir, guard_settings, jsonable, write_json_atomically,
)


class Exit(enum.IntEnum):
    """The exit status of every program (the module docstring says when each is used)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    STATE = 3


class UnavailableError(RuntimeError):
    """The command asks for something this installation cannot run (exit status 2)."""


def _validated(cfg: Any) -> Any:
    return cfg.validated() if hasattr(cfg, "validated") else cfg


def checked(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A `Program.prepare` that calls `check(cfg)` (ValueError names a bad flag) and keeps the Config."""

    def prepare(cfg: Any) -> Any:
        check(cfg)
        return cfg

    return prepare


@dataclasses.dataclass(frozen=True)
class Program:
    """One program: `name` (experiments.<name>; the prefix of its error lines), its Config and
    presets, and its parts:

    experiment(cfg, data, run) -> results   the experiment itself (`run`: a `Run`)
    load_data(cfg) -> data                  called when `run_program` is given no data
    figures(results, output_dir) -> names   PNGs, their names stored as results["figures"]
                                            (None: nothing stored)
    table(results) -> str                   printed at the end
    prepare(cfg) -> cfg                     the Config checked (ValueError naming the flag) and its
                                            defaults filled in; must be idempotent
    state_dirs                              folders of saved state under output_dir: --restart
                                            (a Config field `restart`) removes them
    fingerprint                             the folder (one of state_dirs) whose settings
                                            fingerprint guards the state, checked before the data
                                            (None: the program guards its own, as hypercleaning
                                            does with a hash of its data)
    results_file                            where `run_program` writes the results (None: the
                                            experiment writes its own reports, as the benchmark
                                            suites do: experiments/benchmarks/report.py)
    worker                                  (Config field, function): with that internal flag set,
                                            `main` only runs function(JSON payload) and prints
                                            the result (experiments/common/subprocesses.py)
    report                                  (Config field, function): with that field set,
                                            `run_program` only returns function(cfg): a report
                                            from the saved state, no lock, nothing trained or
                                            written to output_dir (reweighting's --report_dir)
    data_name(cfg) -> str                   names the data in "no <data> data" errors
    failure_hint(err, cfg) -> str           appended to the error line of a failed run
    """

    name: str
    config: type
    presets: Mapping[str, Mapping[str, Any]]
    experiment: Callable[[Any, Any, "Run"], dict]
    load_data: Optional[Callable[[Any], Any]] = None
    figures: Optional[Callable[[dict, str], Optional[dict]]] = None
    table: Optional[Callable[[dict], str]] = None
    prepare: Callable[[Any], Any] = _validated
    state_dirs: Sequence[str] = ()
    fingerprint: Optional[str] = None
    fingerprint_what: str = "the state"
    results_file: Optional[str] = "results.json"
    worker: Optional[tuple[str, Callable[[dict], Any]]] = None
    report: Optional[tuple[str, Callable[[Any], Any]]] = None
    data_name: Callable[[Any], str] = lambda cfg: "such"
    failure_hint: Callable[[BaseException, Any], str] = lambda err, cfg: ""
    default_preset: str = "full"

    def __post_init__(self):
        fields = {f.name for f in dataclasses.fields(self.config)}
        if self.state_dirs and "restart" not in fields:
            raise TypeError(f"{self.name}: a program with state_dirs needs a Config field `restart`")
        if self.fingerprint is not None and self.fingerprint not in self.state_dirs:
            raise TypeError(f"{self.name}: fingerprint={self.fingerprint!r} is not one of state_dirs")
        if "output_dir" not in fields:
            raise TypeError(f"{self.name}: the Config needs a field `output_dir`")
        if self.report is not None and self.report[0] not in fields:
            raise TypeError(f"{self.name}: report={self.report[0]!r} is not a field of the Config")


@dataclasses.dataclass
class Run:
    """What `run_program` hands the experiment: where the output goes, when the run started,
    the environment it started in (experiments/common/provenance.py), and the results writer (for
    programs that write results.json after every finished part, too)."""

    program: Program
    output_dir: str
    started: float
    environment: dict

    def seconds(self) -> float:
        return time.time() - self.started

    def write_results(self, results: dict) -> None:
        write_json_atomically(os.path.join(self.output_dir, self.program.results_file), jsonable(results), indent=1)


# ----------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------
def run_program(program: Program, cfg: Any, data: Any = None) -> dict:
    """Runs `program` with `cfg` (`data`: instead of `program.load_data(cfg)`) under an exclusive
    lock on cfg.output_dir; returns the results. Raises the run_state errors (STATE_ERRORS) for
    a busy or unusable folder and for damaged or mismatched state, DataUnavailableError when
    there is no data."""
    from experiments.common import provenance

    cfg = program.prepare(cfg)
    if program.report is not None and getattr(cfg, program.report[0]):
        return program.report[1](cfg)  # reads the state only: safe while a run holds the folder
    with exclusive_output_dir(cfg.output_dir, f"experiments.{program.name}"):
        if program.state_dirs and cfg.restart:
            for name in program.state_dirs:
                discard_state(os.path.join(cfg.output_dir, name))
        guard_state(program, cfg)
        run = Run(program, cfg.output_dir, time.time(), provenance.environment())
        if data is None and program.load_data is not None:
            data = program.load_data(cfg)
        results = program.experiment(cfg, data, run)
        if program.results_file is None:
            return results
        results = jsonable(results)
        if program.figures is not None:
            figures = program.figures(results, cfg.output_dir)
            if figures is not None:
                results["figures"] = figures
        run.write_results(results)
        if program.table is not None:
            print(program.table(results), flush=True)
        announce_done(program.name, f"{program.results_file} and figures", cfg.output_dir, run.seconds())
        return results


def announce_done(name: str, what: str, output_dir: str, seconds: float) -> None:
    """The closing line of every program and benchmark suite: `[name] <what> in <output_dir> (<s> s)`."""
    print(f"[{name}] {what} in {output_dir} ({seconds:.0f} s)", flush=True)


def guard_state(program: Program, cfg: Any) -> None:
    """Stores the settings that can change the results in <output_dir>/<program.fingerprint>, or
    checks them against the stored ones (SettingsMismatchError): resuming never mixes two
    configurations. Nothing when the program guards its own state."""
    if program.fingerprint is not None:
        guard_settings(os.path.join(cfg.output_dir, program.fingerprint), config.result_settings(cfg),
                       program.fingerprint_what)


def suite(name: str, config_class: type, settings_of: Callable[[Any], dict], run: Callable[[dict, str], dict], *,
          quick_flags: Optional[Mapping[str, Any]] = None,
          worker: Optional[tuple[str, Callable[[dict], Any]]] = None) -> Program:
    """A benchmark suite as a Program. Presets: full (the Config's defaults) and quick
    (`quick_flags`; `settings_of` also shrinks the sizes when cfg.preset == "quick").
    `settings_of(cfg)` is checked before the run (ValueError names a bad flag), then
    `run(settings, output_dir)` measures and writes its own report
    (experiments/benchmarks/report.py)."""
    return Program(name, config_class, {"full": {}, "quick": dict(quick_flags or {})}, results_file=None,
                   prepare=checked(settings_of), worker=worker,
                   experiment=lambda cfg, data, ctx: run(settings_of(cfg), cfg.output_dir))


# ----------------------------------------------------------------------------------------
# The command line.
# ----------------------------------------------------------------------------------------
def define_flags(program: Program, flag_values: Any = None) -> None:
    """The program's flags (--preset, --quick, one per Config field), as flags of the calling
    module (the program: its --help lists them); in `flag_values` if given (tests)."""
    from absl import flags

    flags.disclaim_key_flags()
    config.define_flags(program.config, program.presets, program.default_preset, flag_values)


def config_from_flags(program: Program, flag_values: Any = None) -> Any:
    """The Config the command line asks for (preset, then explicit flags), prepared; ValueError
    names a bad flag."""
    return program.prepare(config.config_from_flags(program.config, program.presets, flag_values))


def error(program: Program, message: Any, status: Exit) -> int:
    """Prints `<program>: error: <message>` to stderr; returns `status`."""
    print(f"{program.name}: error: {message}", file=sys.stderr, flush=True)
    return int(status)


def main(program: Program, argv: Sequence[str], flag_values: Any = None) -> int:
    """The absl main of every program: the Config from the flags, then `run_program`; returns
    the exit status (raises absl's UsageError, status 2, for a bad flag value or argument)."""
    from absl import app, flags, logging
    import tensorflow as tf

    import tf_bilevel as tfb
    from experiments.data.sources import DataUnavailableError

    logging.set_verbosity(logging.WARNING)  # tfds logs every dataset it opens at INFO
    tf.get_logger().setLevel("ERROR")  # Keras' retracing notes are noise in a program's output
    values = flags.FLAGS if flag_values is None else flag_values
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}", exitcode=Exit.USAGE)
    if program.worker is not None and values[program.worker[0]].value:
        from experiments.common.subprocesses import print_result

        print_result(program.worker[1](json.loads(values[program.worker[0]].value)))
        return Exit.OK
    try:
        try:
            cfg = config_from_flags(program, values)
        except ValueError as err:
            raise app.UsageError(str(err), exitcode=Exit.USAGE) from None
        run_program(program, cfg)
    except DataUnavailableError as err:
        return error(program, f"no {program.data_name(cfg)} data: {err}", Exit.USAGE)
    except UnavailableError as err:
        return error(program, err, Exit.USAGE)
    except STATE_ERRORS as err:  # output folder busy or not writable, damaged state, other settings
        return error(program, err, Exit.STATE)
    except tfb.NonFiniteError as err:
        return error(program, f"{err}{program.failure_hint(err, cfg)}", Exit.FAILURE)
    return Exit.OK


def parse_flags(argv: list[str], flag_values: Any = None) -> list[str]:
    """absl's flag parsing (of `flag_values`, default absl's FLAGS), exiting with the usage
    status on a bad flag (absl's own parser exits 1)."""
    from absl import flags

    try:
        return (flags.FLAGS if flag_values is None else flag_values)(argv)
    except flags.Error as err:
        print(f"FATAL Flags parsing error: {err}\nPass --helpshort or --helpfull to see help on flags.",
              file=sys.stderr, flush=True)
        sys.exit(Exit.USAGE)


def start(program: Program) -> None:
    """`python -m experiments.<name>`: defines the flags and runs `main` (exits with its status)."""
    from absl import app

    define_flags(program)
    app.run(lambda argv: main(program, argv), flags_parser=parse_flags)
