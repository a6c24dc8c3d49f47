"""experiments/common/program.py: the one exit-status convention of every program and benchmark suite,
in process (`program.main` with the program's flags in a fresh FlagValues):

    0 finished, 1 the run failed, 2 the command cannot run as given (bad flag or value, no data,
    a method the library lacks), 3 the output folder or its saved state cannot be used.

A failure of kind 1 (non-finite values), 2 (no data, unavailable) or 3 is one line
`<program>: error: ...` on stderr; a bad flag value is absl's UsageError with status 2."""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

import pytest
from absl import app, flags

import tf_bilevel as tfb
from experiments import benchmark, hypercleaning, omniglot, online_hpo, reweighting, task_interaction, toy
from experiments.benchmarks import cnn as benchmark_cnn
from experiments.benchmarks import forward as benchmark_forward
from experiments.benchmarks import metabatch as benchmark_metabatch
from experiments.benchmarks import online as benchmark_online
from experiments.common import program, run_state
from experiments.data.sources import DataUnavailableError

# Each program family: the paper's programs, the online programs, the benchmark and its suites;
# per program, flags under which it gets past its checks (cheaply) and one bad flag value.
PROGRAMS = {
    "toy": (toy.PROGRAM, [], "--hyper_iters=0"),
    "hypercleaning": (hypercleaning.PROGRAM, [], "--hyper_iterations=0"),
    "omniglot": (omniglot.PROGRAM, [], "--class_split=1,2"),
    "task_interaction": (task_interaction.PROGRAM, [], "--pause_after=0,nope"),
    "online_hpo": (online_hpo.PROGRAM, ["--methods=default"], "--methods=nope"),
    "reweighting": (reweighting.PROGRAM, [], "--seeds=-1"),
    "benchmark": (benchmark.PROGRAM, [], "--suites=nope"),
    "benchmarks.online": (benchmark_online.PROGRAM, [], "--online_configs=20y5"),
    "benchmarks.cnn": (benchmark_cnn.PROGRAM, [], "--cnn_conv=nope"),
    "benchmarks.metabatch": (benchmark_metabatch.PROGRAM, [], "--metabatch_paths=nope"),
    "benchmarks.forward": (benchmark_forward.PROGRAM, [], None),
}


def run_main(prog: program.Program, *argv: str, positional: tuple = ()) -> int:
    fv = flags.FlagValues()
    program.define_flags(prog, fv)
    fv([prog.name, *argv])
    return program.main(prog, [prog.name, *positional], flag_values=fv)


def error_line(capsys) -> str:
    """The one `<program>: error:` line on stderr."""
    lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_a_bad_flag_value_or_argument_is_a_usage_error_with_status_2(name, tmp_path):
    prog, good, bad = PROGRAMS[name]
    out = f"--output_dir={tmp_path / 'out'}"
    with pytest.raises(app.UsageError, match="Unexpected arguments") as err:
        run_main(prog, out, *good, positional=("extra",))
    assert err.value.exitcode == program.Exit.USAGE == 2
    if bad is not None:
        with pytest.raises(app.UsageError, match=f"--{bad[2:].split('=')[0]}") as err:
            run_main(prog, out, *good, bad)
        assert err.value.exitcode == 2
    assert not (tmp_path / "out").exists()  # refused before anything was written
    with pytest.raises(SystemExit) as exit_:  # absl's own flag errors exit with the same status
        program.parse_flags([name, "--no_such_flag=1"], flags.FlagValues())
    assert exit_.value.code == 2


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_an_output_dir_in_use_is_one_line_with_status_3(name, tmp_path, capsys):
    prog, good, _ = PROGRAMS[name]
    out = tmp_path / "out"
    with run_state.exclusive_output_dir(out, "another run"):
        assert run_main(prog, f"--output_dir={out}", *good) == program.Exit.STATE == 3
    line = error_line(capsys)
    assert line.startswith(f"{name}: error: --output_dir={out} is in use by another run")


@pytest.mark.parametrize("name", ["omniglot", "task_interaction", "online_hpo", "reweighting"])
def test_damaged_or_other_settings_state_is_one_line_with_status_3(name, tmp_path, capsys):
    prog, good, _ = PROGRAMS[name]
    out = tmp_path / "out"
    state = out / prog.fingerprint
    state.mkdir(parents=True)
    (state / "fingerprint.json").write_text('{"seed": 0, "ste')
    assert run_main(prog, f"--output_dir={out}", *good) == 3
    assert f"{state / 'fingerprint.json'} is damaged" in error_line(capsys)
    (state / "fingerprint.json").write_text(json.dumps({"a setting of another run": 1}))
    assert run_main(prog, f"--output_dir={out}", *good) == 3
    line = error_line(capsys)
    assert str(state) in line and "of a run with other settings" in line and "--restart" in line
    # --restart discards the saved state: the check passes, the run starts (and stops at the data here).
    failing = dataclasses.replace(prog, load_data=_no_data, experiment=_no_data)
    assert run_main(failing, f"--output_dir={out}", "--restart", *good) == 2
    assert json.loads((state / "fingerprint.json").read_text()) != {"a setting of another run": 1}


def _no_data(*args):
    raise DataUnavailableError("no local copy and no network")


@pytest.mark.parametrize("name", ["hypercleaning", "omniglot", "task_interaction", "online_hpo", "reweighting"])
def test_missing_data_is_one_line_with_status_2(name, tmp_path, capsys):
    prog, good, _ = PROGRAMS[name]
    # The data layer's own error (tests/test_datasets.py checks when it is raised), from where the
    # program reads its data: its load_data, or inside the experiment.
    failing = dataclasses.replace(prog, load_data=_no_data, experiment=_no_data)
    assert run_main(failing, f"--output_dir={tmp_path / 'out'}", *good) == program.Exit.USAGE
    line = error_line(capsys)
    assert line.startswith(f"{name}: error: no ") and "data: no local copy and no network" in line


def test_a_method_the_library_lacks_is_one_line_with_status_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(online_hpo, "has_online_forward", lambda: False)
    assert run_main(online_hpo.PROGRAM, f"--output_dir={tmp_path / 'out'}", "--methods=forward_forget") == 2
    assert error_line(capsys).startswith("online_hpo: error: method(s) forward_forget need")
    assert not (tmp_path / "out").exists()


def test_a_failed_run_is_one_line_with_status_1_and_the_programs_hint(tmp_path, capsys):
    def diverge(cfg, data, ctx):
        raise tfb.NonFiniteError("the inner loss is NaN at step 3")

    failing = dataclasses.replace(hypercleaning.PROGRAM, load_data=lambda cfg: None, experiment=diverge)
    out = f"--output_dir={tmp_path / 'out'}"
    assert run_main(failing, out, "--loss_normalization=sum") == program.Exit.FAILURE == 1
    assert "hypercleaning: error: the inner loss is NaN at step 3 GD with --inner_lr=1" in error_line(capsys)
    assert run_main(failing, out) == 1
    assert error_line(capsys).endswith("NaN at step 3 Lower --inner_lr.")


def test_a_finished_run_is_status_0_with_results_figures_and_table(tmp_path, capsys):
    def experiment(cfg, data, ctx):
        assert data == "the data" and ctx.environment["cpu_count"] >= 1
        return {"config": dataclasses.asdict(cfg), "value": 1.5}

    def figures(results, output_dir):
        return {"curve": "curve.png"}

    tiny = dataclasses.replace(toy.PROGRAM, load_data=lambda cfg: "the data", experiment=experiment,
                               figures=figures, table=lambda results: f"value = {results['value']}")
    out = tmp_path / "out"
    assert run_main(tiny, f"--output_dir={out}", "--quick") == program.Exit.OK == 0
    results = json.loads((out / "results.json").read_text())
    assert results["value"] == 1.5 and results["figures"] == {"curve": "curve.png"}
    assert results["config"]["preset"] == "quick"
    printed = capsys.readouterr().out
    assert "value = 1.5" in printed and f"[toy] results.json and figures in {out}" in printed


def test_a_state_folder_needs_a_restart_field():
    @dataclasses.dataclass
    class Config:
        output_dir: str = "out"

    with pytest.raises(TypeError, match="needs a Config field `restart`"):
        program.Program("x", Config, {"full": {}}, experiment=lambda *a: {}, state_dirs=("resume",))


def test_a_report_runs_instead_of_the_experiment_without_the_lock(tmp_path, capsys):
    @dataclasses.dataclass
    class Config:
        output_dir: str = str(tmp_path)
        report_dir: Optional[str] = None

    trained = []
    prog = program.Program("x", Config, {"full": {}}, experiment=lambda cfg, data, run: trained.append(cfg) or {},
                           report=("report_dir", lambda cfg: {"reported": cfg.report_dir}))
    with run_state.exclusive_output_dir(tmp_path, "the grid"):  # a run holds the folder
        assert program.run_program(prog, Config(report_dir="r")) == {"reported": "r"}
    assert trained == [] and not (tmp_path / "results.json").exists()
    program.run_program(prog, Config())
    assert len(trained) == 1 and (tmp_path / "results.json").exists()
    with pytest.raises(TypeError, match="report='nope' is not a field"):
        program.Program("x", Config, {"full": {}}, experiment=lambda *a: {}, report=("nope", lambda cfg: None))
    # reweighting's report on a folder without runs: exit status 3, one line naming --output_dir.
    empty = tmp_path / "empty"
    assert run_main(reweighting.PROGRAM, f"--output_dir={empty}", f"--report_dir={tmp_path / 'r'}") == 3
    assert f"--output_dir={empty} holds no runs" in error_line(capsys) and not empty.exists()
