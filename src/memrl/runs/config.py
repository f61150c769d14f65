"""Typed run configs: save a dataclass to ``config.yaml`` and load it back with type checks."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the key, the value and what was
    expected."""


@dataclasses.dataclass
class RunOptions:
    """Flags shared by every trainer (inherited by each command's config).

    ``RESUME_FLAGS`` names the fields a ``--resume`` may change: those that alter neither the
    model nor the data layout (a trainer adds its own, such as its step budget)."""

    RESUME_FLAGS: ClassVar[tuple[str, ...]] = ("device", "deterministic", "resume")

    seed: int = 0
    """Seed for python, numpy, torch and the environments."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Where to train: auto picks cuda, then mps, then cpu."""
    deterministic: bool = False
    """Deterministic algorithms (bit-identical reruns and resumes on CPU; slower on GPU)."""
    output_dir: Path | None = None
    """Run directory; default runs/<command>-<YYYYmmdd-HHMMSS>."""
    resume: Path | None = None
    """Continue the run in this directory from its checkpoints/last.pt."""


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass as plain YAML-able values (paths as str, tuples as lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


RUN_LOCAL = ("output_dir", "resume")
"""Fields that belong to one run directory: never saved, so that ``--config`` of a saved run
starts a new run rather than writing into the old one."""


def save_config(config: Any, path: str | Path) -> None:
    """Write the full resolved config, enough to rerun, as YAML (without the fields of
    ``RUN_LOCAL``), atomically."""
    data = {k: v for k, v in to_dict(config).items() if k not in RUN_LOCAL}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)


def changed_flags(config: Any, saved: Any, allowed: tuple[str, ...] = ()) -> list[str]:
    """The fields (as ``--flag`` names, nested fields by their own name) whose values differ
    between two configs of one class, leaving out ``allowed`` ones."""

    def leaves(data: dict, out: dict) -> dict:
        for key, value in data.items():
            if isinstance(value, dict):
                leaves(value, out)
            else:
                out[key] = value
        return out

    new, old = leaves(to_dict(config), {}), leaves(to_dict(saved), {})
    return [
        "--" + key.replace("_", "-")
        for key in new
        if key not in allowed and key not in RUN_LOCAL and new[key] != old.get(key)
    ]


def load_config(cls: type[T], path: str | Path) -> T:
    """Read a ``config.yaml`` written by :func:`save_config` into ``cls``, checking every key
    and value against the dataclass' field types."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        data = {}
    if isinstance(data, dict):  # written by an older memrl: a config never names its run
        data = {k: v for k, v in data.items() if k not in RUN_LOCAL}
        upgrade = getattr(cls, "upgrade_saved", None)  # a config class's older files
        if upgrade is not None:
            data = upgrade(data)
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, coercing and checking each field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)}; "
            f"expected some of: {', '.join(fields)}"
        )
    kwargs = {name: _coerce(data[name], hints[name], prefix + name) for name in data}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError("; ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r}; expected one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}; expected a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}={value!r}; expected {len(args)} items")
            items = [
                _coerce(v, a, f"{key}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            ]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}; expected a path")
        return Path(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}; expected true or false")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}; expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}; expected an integer")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}; expected a string")
        return value
    return value
