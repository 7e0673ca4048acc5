"""Typed configs, their command-line flags and their YAML form, from one declaration.

A run config is a frozen dataclass whose fields are *sections* (frozen dataclasses of plain
fields) or plain fields. Every plain field is declared with `opt(default, help)`: that help text
is the `--help` of its flag, so the documentation lives in one place. A section can carry a flag
prefix (PPO's `actor-`/`critic-`), so two sections of the same type get distinct flags.

Precedence when a run is resolved: field defaults < `--config run.yaml` < flags given on the
command line. The YAML form is the nested dict that `to_dict` writes, so a run's resolved
`run_config.yaml` can be passed back with `--config` to repeat it.

No torch import here: `dschat --help` must stay instant.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterator


class ConfigError(ValueError):
    """A user mistake in a config value. `where` is a field path ("deepspeed.zero_stage") or a
    flag/file name; the CLI turns field paths into flag names so the user sees what to change."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


def opt(default: Any, help: str, *, choices: tuple | None = None, flag: str | None = None,
        min: float | None = None, max: float | None = None, hidden: bool = False) -> Any:
    """Declare a config field: its default, its help text, and optional value checks."""
    meta = {"help": help, "choices": choices, "flag": flag, "min": min, "max": max, "hidden": hidden}
    return field(default=default, metadata=meta)


def section(cls: type, prefix: str = "", panel: str | None = None) -> Any:
    """Declare a sub-config: a frozen dataclass with its own fields and an optional flag prefix."""
    return field(default_factory=cls, metadata={"section": True, "prefix": prefix, "panel": panel})


@dataclass(frozen=True)
class FlagSpec:
    path: tuple[str, ...]  # ("deepspeed", "zero_stage") or ("output_dir",)
    flag: str  # "--zero-stage"
    param: str  # python identifier used in the typer signature
    type: Any  # int, float, str, bool, tuple (repeatable str)
    optional: bool
    default: Any
    help: str
    choices: tuple | None
    min: float | None
    max: float | None
    hidden: bool
    panel: str | None

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """Return (base type, optional?) for X, Optional[X], tuple[str, ...]."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base, _ = _unwrap(args[0])
        return base, True
    if origin is tuple:
        return tuple, False
    return tp, False


def flag_specs(cls: type) -> list[FlagSpec]:
    """All flags of a run config class, in declaration order."""
    out: list[FlagSpec] = []

    def walk(c: type, path: tuple[str, ...], prefix: str, panel: str | None) -> None:
        hints = typing.get_type_hints(c)
        for f in fields(c):
            if f.metadata.get("section"):
                walk(hints[f.name], path + (f.name,), prefix + f.metadata.get("prefix", ""),
                     f.metadata.get("panel") or panel)
                continue
            base, optional = _unwrap(hints[f.name])
            name = f.metadata.get("flag") or prefix + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else None
            out.append(FlagSpec(
                path=path + (f.name,), flag="--" + name, param=name.replace("-", "_"), type=base,
                optional=optional, default=default, help=f.metadata.get("help", ""),
                choices=f.metadata.get("choices"), min=f.metadata.get("min"),
                max=f.metadata.get("max"), hidden=f.metadata.get("hidden", False), panel=panel))

    walk(cls, (), "", None)
    seen: dict[str, FlagSpec] = {}
    for s in out:
        if s.flag in seen:
            raise TypeError(f"{cls.__name__}: flag {s.flag} declared twice ({seen[s.flag].dotted}, {s.dotted})")
        seen[s.flag] = s
    return out


def flag_for(cls: type, dotted: str) -> str:
    """'deepspeed.zero_stage' -> '--zero-stage' (falls back to the dotted path)."""
    for s in flag_specs(cls):
        if s.dotted == dotted:
            return s.flag
    return dotted


def _coerce(spec: FlagSpec, value: Any, where: str) -> Any:
    if value is None:
        if spec.optional:
            return None
        if spec.default is None:  # required field left unset
            return None
        raise ConfigError(where, "must not be empty")
    try:
        if spec.type is tuple:
            if isinstance(value, str):
                value = [value]
            return tuple(str(v) for v in value)
        if spec.type is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if spec.type is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if spec.type is float and isinstance(value, str):
            return float(value)
        return spec.type(value)
    except (TypeError, ValueError):
        raise ConfigError(where, f"expected {getattr(spec.type, '__name__', spec.type)}, got {value!r}") from None


def check_value(spec: FlagSpec, value: Any) -> None:
    """Choices and bounds, reported against the flag name."""
    if value is None:
        return
    if spec.choices is not None:  # a repeatable flag's choices are each value's
        for v in (value if spec.type is tuple else (value,)):
            if v not in spec.choices:
                opts = ", ".join(str(c) for c in spec.choices)
                raise ConfigError(spec.flag, f"{v!r} is not valid; choose one of {opts}")
    if spec.min is not None and value < spec.min:
        raise ConfigError(spec.flag, f"{value} is below the minimum {spec.min}")
    if spec.max is not None and value > spec.max:
        raise ConfigError(spec.flag, f"{value} is above the maximum {spec.max}")


def _flatten(d: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (str(k),))
        else:
            yield prefix + (str(k),), v


def build(cls: type, overrides: dict[tuple[str, ...], Any], source: str = "flags") -> Any:
    """Build a run config from {field path: value}; unknown paths, bad types and bad choices raise
    ConfigError naming the flag."""
    specs = {s.path: s for s in flag_specs(cls)}
    values: dict[tuple[str, ...], Any] = {}
    for path, raw in overrides.items():
        spec = specs.get(path)
        if spec is None:
            raise ConfigError(source, f"unknown option '{'.'.join(path)}'")
        value = _coerce(spec, raw, spec.flag)
        check_value(spec, value)
        values[path] = value

    def make(c: type, path: tuple[str, ...]) -> Any:
        hints = typing.get_type_hints(c)
        kwargs = {}
        for f in fields(c):
            p = path + (f.name,)
            if f.metadata.get("section"):
                kwargs[f.name] = make(hints[f.name], p)
            elif p in values:
                kwargs[f.name] = values[p]
        return c(**kwargs)

    try:
        return make(cls, ())
    except ConfigError as e:  # raised by a section's __post_init__ with a dotted path
        raise ConfigError(flag_for(cls, e.where), e.message) from None


def load_yaml(path: str | Path, flag: str = "--config") -> dict[tuple[str, ...], Any]:
    """Read a run-config YAML (given with `flag`) into {field path: value}."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(flag, f"file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(flag, f"{p} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(flag, f"{p} must hold a mapping of sections to options")
    return dict(_flatten(data))


def resolve(cls: type, yaml_path: str | None, given: dict[tuple[str, ...], Any], *,
            base: dict[tuple[str, ...], Any] | None = None, yaml_flag: str = "--config") -> Any:
    """defaults < `base` < YAML < flags given on the command line, each {field path: value}.
    `base` is a layer under the user's (`dschat pipeline`'s size presets); `yaml_flag` the option
    that named the YAML, for its errors (`dschat pipeline --sft-config`)."""
    merged: dict[tuple[str, ...], Any] = dict(base or {})
    if yaml_path:
        yaml_values = load_yaml(yaml_path, yaml_flag)
        specs = {s.path for s in flag_specs(cls)}
        for path in yaml_values:
            if path not in specs:
                raise ConfigError(yaml_flag, f"{yaml_path}: unknown {cls.__name__} option "
                                  f"'{'.'.join(path)}'")
        merged.update(yaml_values)
    merged.update(given)
    return build(cls, merged, source=yaml_flag)


def to_dict(cfg: Any) -> dict:
    """Nested plain dict (tuples as lists) for YAML/JSON."""
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if is_dataclass(v):
            out[f.name] = to_dict(v)
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    return out


def to_yaml(cfg: Any) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(cls: type, data: dict) -> Any:
    """Inverse of to_dict (used by workers to read the resolved config)."""
    return build(cls, dict(_flatten(data)), source="run config")


def flag_values(cls: type, values: dict[str, Any]) -> dict[tuple[str, ...], Any]:
    """{flag name as a Python identifier: value} -> {field path: value}:
    flag_values(SFTConfig, {"zero_stage": 3}) == {("deepspeed", "zero_stage"): 3}."""
    by_param = {s.param: s for s in flag_specs(cls)}
    unknown = [k for k in values if k not in by_param]
    if unknown:
        raise ConfigError(unknown[0], f"not an option of {cls.__name__}")
    return {by_param[k].path: v for k, v in values.items()}


def from_flags(cls: type, **values: Any) -> Any:
    """Build a run config in Python with the command line's names:
    from_flags(PPOConfig, actor_model="out/actor", actor_zero_stage=3, output_dir="out/ppo")."""
    return build(cls, flag_values(cls, values))
