"""Hyperparameter dataclasses: declare, build, check and describe them.

A settings class is a dataclass whose fields are declared with `setting(default, help, check)`:
the help text and the allowed range live beside the field, and `validate` enforces every range
with one message. Groups of settings compose instead of inheriting: `group(TrainConfig, epochs=5)`
nests a training recipe (with its own defaults) inside a method's hyperparameters. Users see the
fields of nested groups as flat names (`epochs=5`, `--epochs 5`, `hparams: {epochs: 5}`), so a
name appears once across a class and its groups. Checks that relate several fields live in an
optional `check_relations()` method, run after the field checks. The CLI flags and the bench
suites are generated from these declarations, so everything here is written once.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from collections.abc import Mapping as AbstractMapping
from numbers import Real
from typing import Any, Mapping

from .errors import PrunekitError

# Names users typed that moved out of the hyperparameters, and where they live now.
RELOCATED = {
    "seed": "seed is not a hyperparameter: runs are seeded by prune()'s `seed` (--seed; `seeds:` in a suite)",
    "batch_size": "batch_size is not a hyperparameter: training takes the batch size of the data you pass "
                  "(the loader's; --batch-size; `batch_size:` in a suite)",
}


# ---------------------------------------------------------------- declaring fields

@dataclasses.dataclass(frozen=True)
class Check:
    """A field's allowed values: `requirement` completes "set it to ..."."""

    requirement: str
    test: Callable[[Any], bool]

    def __call__(self, value: Any) -> bool:
        return self.test(value)


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def integer(minimum: int = 0, maximum: int | None = None) -> Check:
    if maximum is None:
        return Check(f"an integer >= {minimum}", lambda v: is_integer(v) and v >= minimum)
    return Check(f"an integer in [{minimum}, {maximum}]", lambda v: is_integer(v) and minimum <= v <= maximum)


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Check:
    """A finite number, optionally within bounds (closed unless `*_open`)."""
    def test(value: Any) -> bool:
        if not is_number(value):
            return False
        above = low is None or (value > low if low_open else value >= low)
        below = high is None or (value < high if high_open else value <= high)
        return above and below
    if low is not None and high is not None:
        text = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        text = f"a finite number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        text = f"a finite number {'<' if high_open else '<='} {high:g}"
    else:
        text = "a finite number"
    return Check(text, test)


def one_of(*choices: Any) -> Check:
    return Check(f"one of {', '.join(map(str, choices))}", lambda v: v in choices)


def optional(check: Check) -> Check:
    return Check(f"None or {check.requirement}", lambda v: v is None or check(v))


def setting(default: Any, help: str, check: Check | None = None, flag: str | None = None) -> Any:
    """A field with its help text and its allowed values; `flag` where its command-line name differs."""
    metadata = {"help": help, "check": check, "flag": flag or "--" + "{name}"}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def group(cls: type, help: Mapping[str, str] | None = None, checks: Mapping[str, Check] | None = None,
          **defaults: Any) -> Any:
    """A nested settings group with its own defaults, e.g. `training: TrainConfig = group(TrainConfig, epochs=5)`.

    `help` and `checks` replace the group's help texts and checks of some fields for this owner
    (e.g. a method that may train for 0 epochs).
    """
    return dataclasses.field(default_factory=lambda: cls(**defaults),
                             metadata={"group": cls, "help": dict(help or {}), "checks": dict(checks or {})})


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    name: str
    type: Any
    default: Any
    help: str
    path: tuple[str, ...] = ()  # the groups it is nested in, outermost first
    check: Check | None = None
    flag: str = ""  # its command-line flag


def describe(cls: type, defaults: Any = None) -> list[FieldInfo]:
    """Name, type, default and help of every setting, nested groups' settings flattened in place."""
    hints = typing.get_type_hints(cls)
    infos: list[FieldInfo] = []
    for f in dataclasses.fields(cls):
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        inner = f.metadata.get("group")
        if inner is None:
            infos.append(FieldInfo(f.name, hints[f.name], default, f.metadata.get("help", ""), (),
                                   f.metadata.get("check"), flag_of(f)))
            continue
        helps, checks = f.metadata["help"], f.metadata["checks"]
        infos += [dataclasses.replace(info, path=(f.name, *info.path), help=helps.get(info.name, info.help),
                                      check=checks.get(info.name, info.check))
                  for info in describe(inner, default)]
    names = [info.name for info in infos]
    repeated = {name for name in names if names.count(name) > 1}
    if repeated:
        raise TypeError(f"{cls.__name__}: settings {sorted(repeated)} appear in more than one group")
    return infos


def groups(cls: type) -> dict[str, type]:
    """The nested groups of `cls`: {field name: group class}."""
    return {f.name: f.metadata["group"] for f in dataclasses.fields(cls) if "group" in f.metadata}


def build(cls: type, values: Mapping[str, Any], owner: str) -> Any:
    """An instance of `cls` from flat `values` (strings are parsed to the field's type), validated.

    A nested group may also be given as a mapping under its own name (`training={"epochs": 5}`).
    """
    fields = {info.name: info for info in describe(cls)}
    flat = dict(values)
    for name in groups(cls):
        if isinstance(flat.get(name), Mapping):
            flat.update(flat.pop(name))
    unknown = [key for key in flat if key not in fields]
    if unknown:
        if unknown[0] in RELOCATED:
            raise PrunekitError(RELOCATED[unknown[0]])
        known = ", ".join(fields) or "none"
        raise PrunekitError(f"{owner} has no hyperparameter {unknown[0]!r}; its hyperparameters are: {known}")
    parsed = {key: parse_value(value, fields[key].type, f"{owner} {key}") for key, value in flat.items()}
    instance = _assemble(cls, parsed, fields)
    validate(instance, owner)
    return instance


def _assemble(cls: type, parsed: Mapping[str, Any], fields: Mapping[str, FieldInfo], depth: int = 0,
              template: Any = None) -> Any:
    """`template` (default: cls()) with the values of this level set and its groups rebuilt from theirs."""
    changes = {key: value for key, value in parsed.items() if len(fields[key].path) == depth}
    template = cls() if template is None else template
    for name, inner in groups(cls).items():
        nested = {key: value for key, value in parsed.items() if fields[key].path[depth:depth + 1] == (name,)}
        if nested:
            changes[name] = _assemble(inner, nested, fields, depth + 1, getattr(template, name))
    return dataclasses.replace(template, **changes)


def validate(instance: Any, owner: str = "", checks: Mapping[str, Check] | None = None) -> Any:
    """Check every declared range (nested groups included), then `check_relations()`; returns `instance`.

    `checks` replace some fields' declared checks (what a group's owner declared for them).
    """
    prefix = f"{owner} " if owner else ""
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if "group" in f.metadata:
            validate(value, owner, f.metadata["checks"])
            continue
        check = (checks or {}).get(f.name, f.metadata.get("check"))
        if check is not None:
            require(value, check, f"{prefix}{f.name}", f" ({flag_of(f)})")
    relations = getattr(instance, "check_relations", None)
    if relations is not None:
        relations()
    return instance


def require(value: Any, check: Check, what: str, hint: str = "") -> Any:
    """`value` if it passes `check`, else the one message every setting and argument fails with."""
    if not check(value):
        raise PrunekitError(f"{what}={value!r} is invalid: set it to {check.requirement}{hint}")
    return value


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a field: its declared one, else --name-with-dashes."""
    return f.metadata.get("flag", "--{name}").format(name=f.name.replace("_", "-"))


def to_dict(instance: Any) -> dict[str, Any]:
    """The settings as flat {name: value}, nested groups' fields in place (what users type)."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if "group" in f.metadata:
            flat.update(to_dict(value))
        else:
            flat[f.name] = value.copy() if isinstance(value, (dict, list)) else value
    return flat


def parse_value(value: Any, annotation: Any, what: str) -> Any:
    """Coerce a value (a string from the command line, or YAML) to a field's annotated type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        for member in inner[:-1]:  # the first member the value parses as, e.g. float | str takes "auto"
            try:
                return parse_value(value, member, what)
            except PrunekitError:
                pass
        return parse_value(value, inner[-1], what)
    if origin is typing.Literal:
        if value not in args:
            raise PrunekitError(f"{what} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin in (tuple, list):
        items = _as_sequence(value, what)
        item_type = args[0] if args else str
        return origin(parse_value(item, item_type, what) for item in items)
    if origin in (dict, AbstractMapping) or annotation is dict:  # get_origin(typing.Mapping[...]) is the abc
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
            kind = "an integer" if annotation is int else "a number"
            raise PrunekitError(f"{what} must be {kind}; got {value!r}") from None
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
