"""Typed configuration: dataclasses loaded from commented YAML, overridable with `key=value` strings.

Unknown keys and values of the wrong type are rejected with a message that names the key, the
value given and what would be accepted (in the manner of hszhao/semseg's strict overrides).
Configurations serialize to plain dicts so they travel inside checkpoints.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is not acceptable."""


def config_from_dict(cls: type[T], data: dict[str, Any] | None, source: str = "config") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and checking every value's type."""
    data = dict(data or {})
    hints = get_type_hints(cls)
    field_names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(field_names))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; allowed keys: {field_names}")
    values = {name: _coerce(hints[name], value, f"{source}: {name}") for name, value in data.items()}
    try:
        return cls(**values)
    except TypeError as error:  # a required field is missing
        raise ConfigError(f"{source}: {error}") from error


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain, YAML/JSON-serializable dict (tuples become lists)."""

    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return config_to_dict(value)
        return value

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """Turn ["lr=0.02", "crop_size=[512, 512]"] into {"lr": 0.02, "crop_size": [512, 512]}."""
    parsed = {}
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        parsed[key.strip()] = yaml.safe_load(text) if text.strip() else ""
    return parsed


def read_yaml_mapping(path: str | Path, expected: str = "a mapping of key: value") -> dict[str, Any]:
    """The top-level mapping of a YAML file; ConfigError if the file is missing or holds something else."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected {expected} at the top level")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Dataclass defaults, then the YAML file (if given), then `key=value` overrides, in that order."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        data = read_yaml_mapping(path)
        source = str(path)
    base = config_from_dict(cls, data, source)
    return replace_config(base, parse_overrides(overrides), "command-line override")


def replace_config(config: T, changes: dict[str, Any], source: str = "override") -> T:
    merged = config_to_dict(config)
    merged.update(changes)
    return config_from_dict(type(config), merged, source)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of the allowed values {list(allowed)}")
        return value
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {options}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item_hint = args[0] if args else Any
        items = [_coerce(item_hint, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return config_from_dict(hint, value, where)
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ConfigError(f"{where}: cannot check a value against type {typing.get_type_hints and hint!r}")
