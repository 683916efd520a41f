"""Typed dataclass configs from YAML and ``--set a.b=c`` overrides.

One small loader shared by the prep dataset files and the trainer configs:

* ``load(cls, path_or_dict, overrides)`` builds a (nested) dataclass, checking every key and type;
* unknown keys, missing required keys and wrong types raise :class:`ConfigError` naming the full
  dotted key and what is allowed;
* ``to_dict(obj)`` gives the resolved config back as plain data (saved beside every output).

Supported field types: bool, int, float, str, ``Literal[...]``, ``X | None``, ``list[X]``,
``tuple[X, ...]``, ``dict[str, X]`` and nested dataclasses.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import (
    Any,
    Literal,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

import yaml

from medsass.atomic import atomic_write_bytes
from medsass.errors import ConfigError

T = TypeVar("T")

_MISSING = object()


def load(cls: type[T], source: str | Path | Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from a YAML file or mapping, then apply ``key.path=value`` overrides."""
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        data = read_yaml(source)
    data = apply_overrides(data, overrides)
    return from_dict(cls, data)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:  # a binary file, or text saved in another encoding
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "give a YAML file, saved as UTF-8"
        ) from None
    except OSError as exc:  # a folder, no permission
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror or exc}); give a readable YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (value parsed as YAML: ``3``, ``true``, ``[a, b]``, ``null``)."""
    out = _deepcopy(dict(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_key(out, key, value, item)
    return out


def set_values(data: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with each dotted key of ``values`` set to its value (values already typed, e.g. from CLI
    flags, where :func:`apply_overrides` parses strings)."""
    out = _deepcopy(dict(data))
    for key, value in values.items():
        _set_key(out, key, value, f"{key}={value!r}")
    return out


def _set_key(data: dict[str, Any], key: str, value: Any, item: str) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Strictly convert ``data`` into dataclass ``cls``."""
    where = prefix or "<top level>"
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__} {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(_join(prefix, k) for k in unknown)}; "
            f"valid keys{' under ' + prefix if prefix else ''}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, field in fields.items():
        key = _join(prefix, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {key}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ validation
        raise ConfigError(f"{where}: {exc}") from None


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_name(tp)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (list, Sequence, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item_t = args[0] if args else Any
        items = [_convert(item_t, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        val_t = args[1] if len(args) == 2 else Any
        return {str(k): _convert(val_t, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{key}: expected a path, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {_name(tp)}")


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) for YAML/JSON; Paths become strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def diff(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old value, new value) of every leaf that differs between two plain-data trees, keys in sorted
    order; a key missing on one side is None there. Used where a store or a run is re-opened with another config."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for key in sorted(set(old) | set(new)):
            out.update(diff(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else f"{key}"))
        return out
    return {} if old == new else {prefix or "<root>": (old, new)}


def dump_yaml(obj: Any, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(to_dict(obj), sort_keys=False)
    if path is not None:
        atomic_write_bytes(path, text.encode())
    return text


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _deepcopy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deepcopy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deepcopy(v) for v in value]
    return value


__all__ = ["apply_overrides", "diff", "dump_yaml", "from_dict", "load", "read_yaml", "set_values", "to_dict", "typing"]
