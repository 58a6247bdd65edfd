"""Configs are data: YAML files map onto dataclasses, unknown keys are errors.

Usage
-----
>>> @dataclass
... class Cfg:
...     beta: float = 0.01
...     steps: int = 200
>>> cfg = load_config(Cfg, "configs/ddip.yaml", overrides=["beta=0.1"])

Nested dataclasses are supported; overrides use dotted keys (``prior.rank=8``).  Values given with
``--set`` are parsed as YAML scalars (``true``, ``1e-3``, ``[1, 2]``).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union or (hasattr(__import__("types"), "UnionType") and origin is __import__("types").UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp, key: str, source: str):
    tp = _unwrap_optional(tp)
    if value is None:
        return None
    if _is_dataclass_type(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: key '{key}' must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, source=source, prefix=key + ".")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{source}: key '{key}' expects {tp.__name__}, got {value!r}")
    if tp is int and isinstance(value, float) and not float(value).is_integer():
        raise ConfigError(f"{source}: key '{key}' expects an integer, got {value!r}")
    try:
        if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)
        if tp is int and isinstance(value, (int, str)) and not isinstance(value, bool):
            if isinstance(value, str):
                return int(value)
            return value
        if tp is int and isinstance(value, float) and float(value).is_integer():
            return int(value)
        if tp is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if tp is str:
            if isinstance(value, (str, int, float)):
                return str(value)
            raise TypeError
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: key '{key}' expects {getattr(tp, '__name__', tp)}, got {value!r}") from None
    if tp in (int, float) and not isinstance(value, (int, float)):
        raise ConfigError(f"{source}: key '{key}' expects {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any] | None, source: str = "config", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys raise :class:`ConfigError`.

    Parameters
    ----------
    cls : dataclass type
    data : mapping or None
    source : str
        Where the data came from (a file name), for error messages.
    prefix : str
        Dotted prefix for nested keys in error messages.
    """
    data = dict(data or {})
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        known = ", ".join(sorted(types))
        raise ConfigError(f"{source}: unknown config key(s) {', '.join(prefix + u for u in unknown)}; known keys: {known}")
    kwargs = {k: _coerce(v, types[k], prefix + k, source) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj) -> dict[str, Any]:
    """A plain, YAML-serialisable dict of a (nested) dataclass."""
    return dataclasses.asdict(obj)


def parse_overrides(overrides: Iterable[str] | None, source: str = "--set") -> dict[str, Any]:
    """Parse ``key=value`` strings into a nested dict (dotted keys nest)."""
    out: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"{source}: expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"{source}: empty key in {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: key '{key}' conflicts with an earlier override")
        node[parts[-1]] = value
    return out


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with clear errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (UTF-8) YAML file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] | Mapping | None = None,
                base: Mapping[str, Any] | None = None) -> T:
    """Load a dataclass config from YAML ``path`` (optional), then apply ``overrides``.

    Parameters
    ----------
    cls : dataclass type
    path : path, optional
        YAML file.
    overrides : list of "key=value" strings or a mapping, optional
    base : mapping, optional
        Values applied before the file (e.g. programmatic defaults).
    """
    data: dict[str, Any] = dict(base or {})
    source = "config"
    if path is not None:
        data = deep_merge(data, read_yaml(path))
        source = str(path)
    if overrides:
        ov = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
        data = deep_merge(data, ov)
        source = f"{source} (+ overrides)"
    return from_dict(cls, data, source=source)


def dump_yaml(obj, path: str | Path) -> None:
    """Write a dataclass or mapping as YAML (UTF-8, atomically)."""
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
    from .utils.atomic import write_text

    write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
