"""Typed configuration: dataclass defaults in code, YAML overrides, then `--set`.

    cfg = load_config(AutoencoderConfig, "configs/demo/autoencoder.yaml",
                      ["train.lr=3e-4", "model.preset=base"])
    save_config(cfg, run_dir / "config.yaml")

Unknown keys and values of the wrong type raise `ConfigError` naming the file
and the dotted key, e.g. `configs/demo/x.yaml: unknown key 'train.lrr'`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import UserError
from .io import not_utf8, read_text, write_text


class ConfigError(UserError):
    """A configuration key that is unknown or has the wrong type."""


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Build `cls` from its defaults, a YAML file and `key.sub=value` overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(read_text(path))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: malformed YAML: {' '.join(str(err).split())}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(not_utf8(path, err, "YAML")) from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a folder, expected a YAML file") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(loaded).__name__}")
        data = loaded
    cfg = _build(cls, data, prefix="", source=source)
    for item in overrides or []:
        cfg = apply_override(cfg, item)
    return cfg


def apply_override(cfg, item: str):
    """Apply one `a.b=value` override (value parsed as YAML) and return the new config."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    nested: dict[str, Any] = {}
    cursor = nested
    parts = key.split(".")
    for part in parts[:-1]:
        cursor[part] = {}
        cursor = cursor[part]
    cursor[parts[-1]] = value
    return _merge(cfg, nested, prefix="", source="--set")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config as YAML next to the outputs (atomically)."""
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _build(cls, data: dict, prefix: str, source: str):
    return _merge(cls(), data, prefix, source)


# Keys that were renamed so that one concept has one name in every stage (STYLE.md 10): old dotted key -> new.
RENAMED = {
    "schedule": "train.lr_schedule, train.lr_warmup_steps and train.adam_betas",
    "lr_warmup": "train.lr_warmup_steps",
    "lr_schedule": "train.lr_schedule",
    "ensemble.warmup_steps": "train.lr_warmup_steps",
}


def _merge(instance, data: dict, prefix: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: key '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(instance)}
    hints = typing.get_type_hints(type(instance))
    changes = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields and dotted in RENAMED:
            raise ConfigError(f"{source}: key '{dotted}' was renamed: use {RENAMED[dotted]}")
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown key '{dotted}' (known here: {known})")
        hint = hints[key]
        current = getattr(instance, key)
        if dataclasses.is_dataclass(current):
            if value is None:  # `section:` with every key under it commented out: the section's defaults
                continue
            changes[key] = _merge(current, value, f"{dotted}.", source)
        else:
            changes[key] = _coerce(value, hint, dotted, source)
    return dataclasses.replace(instance, **changes)


def _coerce(value, hint, dotted: str, source: str):
    """Check `value` against a type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    def bad(expected: str):
        return ConfigError(f"{source}: key '{dotted}' must be {expected}, got {value!r}")

    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, dotted, source)
            except ConfigError as err:
                errors.append(err)
        raise bad(" or ".join(_expected(a) for a in args))
    if origin is Literal:
        if value not in args:
            raise bad("one of " + ", ".join(repr(a) for a in args))
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad(f"a list of {_PLURAL.get(args[0], _type_name(args[0])) if args else 'values'}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{dotted}[{i}]", source) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise bad(_expected(hint))
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(_expected(hint))
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(_expected(hint))
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad(_expected(hint))
        return value
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise bad(_expected(hint))


def _type_name(hint) -> str:
    return getattr(hint, "__name__", str(hint))


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null",
             dict: "a mapping", list: "a list"}
_PLURAL = {bool: "true or false values", int: "integers", float: "numbers", str: "strings"}


def _expected(hint) -> str:
    """What a value of type `hint` is called in an error, in the recipe's words (null, not NoneType)."""
    return _EXPECTED.get(hint, _type_name(hint))
