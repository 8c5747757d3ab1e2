"""Hyperparameter dataclasses: build them from keyword arguments, strings or YAML, and describe them.

A method's hyperparameters are one dataclass whose fields carry `metadata={"help": ...}`; an
optional `validate()` method raises PrunekitError for out-of-range values. The CLI flags and the
bench suites are generated from these fields, so everything here is written once.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Mapping

from .errors import PrunekitError


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    name: str
    type: Any
    default: Any
    help: str


def describe(cls: type) -> list[FieldInfo]:
    """Name, type, default and help of every field."""
    hints = typing.get_type_hints(cls)
    return [FieldInfo(f.name, hints[f.name], _default(f), f.metadata.get("help", ""))
            for f in dataclasses.fields(cls)]


def build(cls: type, values: Mapping[str, Any], owner: str) -> Any:
    """An instance of `cls` from `values` (strings are parsed to the field's type), validated."""
    fields = {info.name: info for info in describe(cls)}
    unknown = [key for key in values if key not in fields]
    if unknown:
        known = ", ".join(fields) or "none"
        raise PrunekitError(f"{owner} has no hyperparameter {unknown[0]!r}; its hyperparameters are: {known}")
    parsed = {key: parse_value(value, fields[key].type, f"{owner} {key}") for key, value in values.items()}
    instance = cls(**parsed)
    if hasattr(instance, "validate"):
        instance.validate()
    return instance


def to_dict(instance: Any) -> dict[str, Any]:
    return dataclasses.asdict(instance)


def parse_value(value: Any, annotation: Any, what: str) -> Any:
    """Coerce a value (a string from the command line, or YAML) to a field's annotated type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return parse_value(value, inner[0], what)
    if origin is typing.Literal:
        if value not in args:
            raise PrunekitError(f"{what} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin in (tuple, list):
        items = _as_sequence(value, what)
        item_type = args[0] if args else str
        return origin(parse_value(item, item_type, what) for item in items)
    if origin in (dict, Mapping) or annotation is dict:
        return _as_mapping(value, what)
    return _scalar(value, annotation, what)


def _scalar(value: Any, annotation: Any, what: str) -> Any:
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise PrunekitError(f"{what} must be true or false; got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise PrunekitError(f"{what} must be a number; got {value!r}")
        try:
            number = annotation(value) if annotation is float else _to_int(value)
        except (TypeError, ValueError):
            raise PrunekitError(f"{what} must be {'an integer' if annotation is int else 'a number'}; got {value!r}") from None
        return number
    if annotation is str:
        return str(value)
    return value


def _to_int(value: Any) -> int:
    number = float(value)
    if number != int(number):
        raise ValueError(value)
    return int(number)


def _as_sequence(value: Any, what: str) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    raise PrunekitError(f"{what} must be a list (comma-separated on the command line); got {value!r}")


def _as_mapping(value: Any, what: str) -> dict:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            return parsed
    raise PrunekitError(f"{what} must be a mapping, e.g. '{{\"fc1\": 0.5}}'; got {value!r}")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None
