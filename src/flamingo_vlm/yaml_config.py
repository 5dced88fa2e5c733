"""YAML file + ``key.path=value`` overrides -> a dataclass: the one config loader of every command.

    data = read_yaml_mapping("train.yaml", what="train config")
    apply_overrides(data, ["steps=100", "datasets.0.batch_size=4"])
    config = from_dict(TrainConfig, data)          # or load_dataclass(TrainConfig, "train.yaml", overrides)

Values are coerced to the field types (YAML 1.1 reads ``1e-4`` as a string; an override ``steps=10`` is
read as YAML, so it is already an int). Nested dataclasses and lists of dataclasses are built from their
mappings. A key the dataclass does not have is an error naming it, the closest known key, and all of them.

A low layer: it imports only the standard library and yaml.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def unknown_keys_error(cls: type, unknown: Sequence[str], where: str = "", *, known: Sequence[str] | None = None) -> ValueError:
    """The error for keys ``cls`` does not have: each with its closest known key, then every known key.

    known: the accepted keys when ``cls`` is not a dataclass (e.g. a constructor's parameter names).
    """
    names = list(known) if known is not None else [f.name for f in dataclasses.fields(cls)]

    def hint(key: str) -> str:
        close = difflib.get_close_matches(key, names, n=1)
        return f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)

    return ValueError(
        f"{_prefix(where)}unknown {cls.__name__} key(s) {', '.join(hint(k) for k in unknown)}; known keys: {', '.join(sorted(names))}"
    )


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` made to fit the type ``hint`` of the field at ``where`` (a dotted name, for errors)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        if len(errors) == 1:  # an optional field: the one real type's message says most
            raise ValueError(errors[0])
        raise ValueError(f"{where}: cannot use {value!r} as {hint}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"{where} must be one of {typing.get_args(hint)}, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where} must be an integer, got {value!r}") from e
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"{where} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where} must be a number, got {value!r}") from e
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return str(value)
    if origin in (list, tuple, Sequence):
        if isinstance(value, (str, os.PathLike)) and origin is list:
            value = [value]  # `paths: x.tar` means one path
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{where} must have {len(args)} items, got {value!r}")
            return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """A ``cls`` dataclass from a mapping: unknown and missing keys are errors, values coerced to the field types.

    where: the dotted path of ``data`` inside the whole config (``datasets[1]``), put in front of errors.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{where or 'the config'} must be a mapping of {cls.__name__} keys, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise unknown_keys_error(cls, unknown, where)
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{_prefix(where)}missing required {cls.__name__} key(s) {missing}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"datasets.0.batch_size=4"`` -> (["datasets", "0", "batch_size"], 4); the value is read as YAML."""
    import yaml

    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value (e.g. steps=100 or datasets.0.batch_size=4)")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ValueError(f"override {text!r} has no key")
    return path, yaml.safe_load(raw) if raw.strip() else None


def apply_override(data: dict, path: Sequence[str], value: Any) -> None:
    """Set ``data[path[0]][path[1]]... = value`` in place; list indices are digits, missing mappings are created."""
    node: Any = data
    dotted = ".".join(path)
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"override {dotted}: {'.'.join(path[: i + 1])} is not an index of a list of {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ValueError(f"override {dotted}: {'.'.join(path[:i]) or 'the config'} is a {type(node).__name__}, not a mapping or list")


def apply_overrides(data: dict, overrides: Sequence[str] | Mapping[str, Any] = ()) -> dict:
    """Apply ``key.path=value`` strings, or a mapping of dotted keys to already-parsed values, to ``data`` in place."""
    items = overrides.items() if isinstance(overrides, Mapping) else (parse_override(text) for text in overrides)
    for key, value in items:
        apply_override(data, key.split(".") if isinstance(key, str) else key, value)
    return data


def read_yaml_mapping(path: str | os.PathLike, what: str = "config") -> dict:
    """The top-level mapping of a YAML file (an empty file is ``{}``); ``what`` names the file in errors."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a {what} must be a mapping of keys, got {type(data).__name__}")
    return data


def load_dataclass(
    cls: type[T], source: str | os.PathLike | Mapping | None, overrides: Sequence[str] | Mapping[str, Any] = (), *, what: str = "config"
) -> T:
    """A ``cls`` from a YAML file (or a mapping, copied; or None: no keys), with overrides applied."""
    if source is None:
        data: dict = {}
    elif isinstance(source, Mapping):
        data = copy.deepcopy(dict(source))
    else:
        data = read_yaml_mapping(source, what)
    return from_dict(cls, apply_overrides(data, overrides))
