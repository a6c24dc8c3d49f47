"""One configuration style for every experiment program: a dataclass whose fields declare their
own flag, presets that override the defaults, and the settings fingerprint.

    @dataclasses.dataclass
    class Config:
        output_dir: str = option("out/toy", "Where results.json and the figures go.", result=False)
        steps: int = option(100, "T, inner steps.")
        truncate: Sequence[int] = option((1, 5), "K values of K-RMD.")

    PRESETS = {"full": {}, "quick": {"steps": 10}}
    define_flags(Config, PRESETS)             # --preset, --quick, --output_dir, --steps, --truncate
    cfg = config_from_flags(Config, PRESETS)  # explicit flags beat the preset
    guard_settings(state, result_settings(cfg))

The flag type follows the annotation (int, float, str, bool, Optional[X], Sequence[X] as a
comma-separated list; `choices=` makes an enum). `result=False` marks a field that cannot change
any number of the results (where output goes, what is measured on the side): `result_settings`
leaves it out, so a rerun with another value resumes the saved state.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import typing
from typing import Any, Mapping, Optional, Sequence, TypeVar

from tf_bilevel.resume import jsonable

ConfigT = TypeVar("ConfigT")
Presets = Mapping[str, Mapping[str, Any]]

def option(default: Any, help: str, *, flag: Optional[str] = None, result: bool = True,
           choices: Optional[Sequence[str]] = None, internal: bool = False) -> Any:
    """A Config field with its flag: `help` for --help, `flag` when the flag's name differs from
    the field's, `result=False` when the field cannot change the results (not fingerprinted),
    `choices` for an enum, `internal` for a flag only tests and workers pass (hidden from --help)."""
    metadata = {"help": help, "flag": flag, "result": result, "choices": choices, "internal": internal}
    if isinstance(default, (list, dict, set)):
        raise TypeError(f"option(default={default!r}): use a tuple, a mutable default would be shared")
    return dataclasses.field(default=default, metadata=metadata)


def _flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or field.name


def _flag_fields(config_class: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_class) if f.name != "preset" and "help" in f.metadata]


def _kind(annotation: Any) -> tuple[str, Any]:
    """('scalar', type) or ('list', element type) of a field's annotation, Optional removed."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union:
        if len(args) != 1:
            raise TypeError(f"unsupported Config annotation {annotation!r}")
        return _kind(args[0])
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, collections.abc.Sequence):
        element = args[0] if args else str
        return "list", (str if element is Any else element)
    return "scalar", annotation


def _parse_element(value: str, element: type, name: str) -> Any:
    try:
        return element(value.strip())
    except ValueError:
        raise ValueError(f"--{name}: {value!r} is not a {element.__name__}") from None


def define_flags(config_class: type, presets: Presets, default_preset: str = "full",
                 flag_values: Any = None) -> None:
    """Registers --preset, --quick (= --preset=quick) and one absl flag per field of `config_class`
    (in absl's FLAGS unless `flag_values` is given), as flags of the calling module (so that the
    program's --help lists them)."""
    from absl import flags

    flags.disclaim_key_flags()  # the flags belong to the caller (the program): --help lists them
    if default_preset not in presets:
        raise ValueError(f"default_preset={default_preset!r} is not one of the presets {sorted(presets)}")
    into = {} if flag_values is None else {"flag_values": flag_values}
    flags.DEFINE_enum("preset", default_preset, sorted(presets),
                      "A named set of defaults; explicit flags override it (see the module docstring).",
                      **into)
    if "quick" in presets:
        flags.DEFINE_bool("quick", False, "Same as --preset=quick.", **into)
    define_fields(config_class, flag_values)


def define_fields(config_class: type, flag_values: Any = None) -> None:
    """`define_flags` without --preset and --quick: one flag per field, for a group of flags that
    joins another program's (e.g. a benchmark suite's); read them back with `fields_from_flags`."""
    from absl import flags

    from experiments.common.cli import define_internal

    flags.disclaim_key_flags()
    into = {} if flag_values is None else {"flag_values": flag_values}
    hints = typing.get_type_hints(config_class)
    for field in _flag_fields(config_class):
        kind, element = _kind(hints[field.name])
        name, default, meta = _flag_name(field), field.default, field.metadata
        if meta["choices"]:
            define, args = flags.DEFINE_enum, {"enum_values": list(meta["choices"])}
        elif kind == "list":
            define, args = flags.DEFINE_list, {}
            default = None if default is None else [str(v) for v in default]
        else:
            define, args = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
                            str: flags.DEFINE_string}[element], {}
        args.update(into)
        if meta["internal"]:
            define_internal(define, name, default, meta["help"], **args)
        else:
            define(name, default, help=meta["help"], **args)


def config_from_flags(config_class: type[ConfigT], presets: Presets, flag_values: Any = None) -> ConfigT:
    """The Config the command line asks for: the preset's values, then the flags given explicitly."""
    from absl import flags

    F = flag_values if flag_values is not None else flags.FLAGS
    cfg, explicit = fields_from_flags(config_class, F)
    preset = "quick" if ("quick" in presets and F["quick"].value) else F["preset"].value
    return apply_preset(cfg, presets, preset, explicit)


def fields_from_flags(config_class: type[ConfigT], flag_values: Any = None) -> tuple[ConfigT, list[str]]:
    """(the Config of the flags' values, the names of the fields given explicitly): no preset."""
    from absl import flags

    F = flag_values if flag_values is not None else flags.FLAGS
    hints = typing.get_type_hints(config_class)
    values, explicit = {}, []
    for field in _flag_fields(config_class):
        name = _flag_name(field)
        value = F[name].value
        kind, element = _kind(hints[field.name])
        if kind == "list" and value is not None:
            value = tuple(_parse_element(v, element, name) for v in value)
        values[field.name] = value
        if F[name].present:
            explicit.append(field.name)
    return config_class(**values), explicit


def apply_preset(cfg: ConfigT, presets: Presets, preset: str, explicit: Sequence[str] = ()) -> ConfigT:
    """`cfg` with the preset's values, except for the fields in `explicit` (set by the user)."""
    if preset not in presets:
        raise ValueError(f"--preset must be one of {sorted(presets)}, got {preset!r}")
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(presets[preset]) - names)
    if unknown:
        raise ValueError(f"preset {preset!r} sets unknown fields {unknown}")
    values = {k: v for k, v in presets[preset].items() if k not in explicit}
    if "preset" in names:
        values["preset"] = preset
    return dataclasses.replace(cfg, **values)


def require(cfg: Any, **rules: tuple[bool, str]) -> None:
    """Config validation: `field=(ok, what)` raises ValueError("--<flag> must be <what>, got
    <value>") for the first rule whose `ok` is false."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for name, (ok, what) in rules.items():
        if not ok:
            raise ValueError(f"--{_flag_name(fields[name])} must be {what}, got {getattr(cfg, name)!r}")


def result_settings(cfg: Any, **extra: Any) -> dict:
    """The fields of `cfg` that can change its results (not `result=False`), plus `extra` (e.g. a
    hash of the data), as they read back from a fingerprint file."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
              if f.metadata.get("result", True) and f.name != "preset"}
    return jsonable({**fields, **extra})


def parse_truncate(values: Sequence[str], steps: int) -> list[Optional[int]]:
    """A --truncate list ('full' or K in [1, T]) as K values, None for full RMD ('full', 'none' or K = T)."""
    out = []
    for value in values:
        if value.strip().lower() in ("full", "none"):
            out.append(None)
            continue
        k = _parse_element(value, int, "truncate")
        if not 1 <= k <= steps:
            raise ValueError(f"--truncate values must be in [1, --inner_steps={steps}] or 'full', got {value}")
        out.append(None if k == steps else k)
    return out
