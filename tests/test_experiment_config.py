"""experiments.common.config: flags generated from a Config dataclass, presets, explicit flags winning,
the settings fingerprint; run_state.parse_pause_after; provenance.environment."""

from __future__ import annotations

import dataclasses
import json
from typing import Optional, Sequence

import pytest
from absl import flags

from experiments.common import config as ec
from experiments.common.provenance import environment
from experiments.common.run_state import parse_pause_after


@dataclasses.dataclass(frozen=True)
class Config:
    output_dir: str = ec.option("out/x", "Where output goes.", result=False)
    steps: int = ec.option(100, "T.")
    lr: float = ec.option(0.5, "γ.")
    truncate: Sequence[int] = ec.option((1, 5), "K values.")
    thresholds: Sequence[float] = ec.option((-1.0,), "τ.")
    n_train: Optional[int] = ec.option(None, "Examples (None: all).")
    loss: str = ec.option("mean", "Normalization.", choices=("mean", "sum"))
    save_every: int = ec.option(10, "Saves.", flag="checkpoint_period", result=False)
    jit_compile: bool = ec.option(True, "XLA.")
    worker: Optional[str] = ec.option(None, "internal", internal=True, result=False)
    preset: str = "full"


PRESETS = {"full": {}, "quick": {"steps": 3, "truncate": (1,)}, "readme": {"steps": 20}}


@pytest.fixture
def fresh_flags():
    return flags.FlagValues()


def test_defaults_types_and_presets(fresh_flags):
    ec.define_flags(Config, PRESETS, flag_values=fresh_flags)
    fv = fresh_flags
    fv(["program"])
    cfg = ec.config_from_flags(Config, PRESETS, fv)
    assert cfg == Config()
    fv.unparse_flags()
    fv(["program", "--truncate=2,7", "--thresholds=-3,-1.5", "--n_train=40", "--loss=sum", "--nojit_compile",
        "--checkpoint_period=4", "--preset=quick"])
    cfg = ec.config_from_flags(Config, PRESETS, fv)
    # explicit --truncate beats the preset's; the preset's steps applies
    assert cfg.truncate == (2, 7) and cfg.steps == 3 and cfg.preset == "quick"
    assert cfg.thresholds == (-3.0, -1.5) and cfg.n_train == 40 and cfg.loss == "sum"
    assert cfg.jit_compile is False and cfg.save_every == 4


def test_quick_is_preset_quick(fresh_flags):
    ec.define_flags(Config, PRESETS, flag_values=fresh_flags)
    fv = fresh_flags
    fv(["program", "--quick", "--steps=9"])
    cfg = ec.config_from_flags(Config, PRESETS, fv)
    assert cfg.preset == "quick" and cfg.truncate == (1,) and cfg.steps == 9


def test_bad_values_name_the_flag(fresh_flags):
    ec.define_flags(Config, PRESETS, flag_values=fresh_flags)
    fv = fresh_flags
    fv(["program", "--truncate=1,x"])
    with pytest.raises(ValueError, match="--truncate: 'x' is not a int"):
        ec.config_from_flags(Config, PRESETS, fv)
    with pytest.raises(flags.IllegalFlagValueError):
        fv(["program", "--loss=median"])


def test_internal_flags_are_hidden_from_help(fresh_flags):
    ec.define_flags(Config, PRESETS, flag_values=fresh_flags)
    fv = fresh_flags
    assert "worker" in fv and "Internal:" in fv["worker"].help
    assert fv.find_module_defining_flag("worker") == "experiments.common.cli"


def test_result_settings_leave_out_non_result_fields():
    settings = ec.result_settings(Config(), data_sha256="abc")
    assert "output_dir" not in settings and "save_every" not in settings and "preset" not in settings
    assert settings["truncate"] == [1, 5] and settings["data_sha256"] == "abc"
    assert json.loads(json.dumps(settings)) == settings
    assert ec.result_settings(dataclasses.replace(Config(), output_dir="elsewhere")) == ec.result_settings(Config())
    assert ec.result_settings(dataclasses.replace(Config(), steps=7)) != ec.result_settings(Config())


def test_presets_are_checked():
    with pytest.raises(ValueError, match="--preset must be one of"):
        ec.apply_preset(Config(), PRESETS, "paper")
    with pytest.raises(ValueError, match="unknown fields \\['stpes'\\]"):
        ec.apply_preset(Config(), {"full": {"stpes": 1}}, "full")
    with pytest.raises(TypeError, match="use a tuple"):
        ec.option([1, 2], "mutable")


def test_fields_without_a_preset_join_another_programs_flags(fresh_flags):
    @dataclasses.dataclass
    class Suite:
        suite_steps: Sequence[int] = ec.option((10, 50), "T values.")
        suite_repeats: int = ec.option(3, "Repeats.")

    ec.define_flags(Config, PRESETS, flag_values=fresh_flags)
    ec.define_fields(Suite, flag_values=fresh_flags)  # no second --preset/--quick: no clash
    fresh_flags(["prog", "--quick", "--suite_steps=2,3"])
    suite, explicit = ec.fields_from_flags(Suite, fresh_flags)
    assert suite == Suite(suite_steps=(2, 3), suite_repeats=3) and explicit == ["suite_steps"]
    assert ec.config_from_flags(Config, PRESETS, fresh_flags).steps == 3  # the program's preset still applies


def test_require_names_the_flag_of_the_first_broken_rule():
    cfg = Config(steps=0, save_every=-1)
    ec.require(cfg, lr=(cfg.lr > 0, "> 0"))  # nothing broken: no error
    with pytest.raises(ValueError, match=r"^--steps must be >= 1, got 0$"):
        ec.require(cfg, lr=(True, "> 0"), steps=(cfg.steps >= 1, ">= 1"), save_every=(cfg.save_every >= 0, ">= 0"))
    with pytest.raises(ValueError, match=r"^--checkpoint_period must be >= 0, got -1$"):  # the field's flag name
        ec.require(cfg, save_every=(cfg.save_every >= 0, ">= 0"))


def test_parse_pause_after():
    assert parse_pause_after(None) is None and parse_pause_after("") is None
    assert parse_pause_after("full, 2") == ("full", 2)
    for bad in ("3", "a,b", ",2", "1,2,3"):
        with pytest.raises(ValueError, match="--pause_after must be K,ITER"):
            parse_pause_after(bad, "K,ITER")


def test_environment_names_the_machine_and_versions():
    env = environment()
    assert env["cpu_count"] >= 1 and env["tensorflow"] and env["keras"] and env["date"].endswith("+00:00")
