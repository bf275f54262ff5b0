"""Settings declared once: a frozen dataclass field holds a setting's type, default and help together.

``setting(default, help, cli=True)`` declares a field; ``from_mapping`` builds the dataclass from a JSON object,
refusing unknown keys (with the nearest known name) and values of the wrong type (a field that is itself such a
dataclass is built from a nested object), so that the dataclass's own ``__post_init__`` checks only ranges and
choices. Every refusal is a ``ConfigError`` naming the key. ``add_cli_overrides``/``cli_overrides`` turn the fields
marked ``cli`` into command-line options that override the JSON, with the field's help: no setting is
declared twice. (fastargs' ``Section(...).params(...)`` is the same idea; dataclasses keep it in the stdlib.)
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from typing import Any, Dict, Iterable, Mapping, Type, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def setting(default: Any, help: str, cli: bool = False):
    """A dataclass field with its help text; ``cli`` also makes it a ``--name`` command-line override."""
    return dataclasses.field(default=default, metadata={"help": help, "cli": cli})


def unknown_keys_error(where: str, unknown: Iterable[str], known: Iterable[str], list_known: bool = True,
                       why: str = "") -> ConfigError:
    """One error naming each unknown key and, where one is close, the known key it probably meant."""
    known = sorted(known)
    parts = []
    for key in sorted(unknown):
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ConfigError(f"{where}: unknown key{'s' if len(parts) > 1 else ''} {', '.join(parts)}"
                      + (f" ({why})" if why else "") + (f"; known: {', '.join(known)}" if list_known else ""))


def from_mapping(cls: Type[T], values: Mapping[str, Any], where: str) -> T:
    """``cls(**values)`` for a JSON object: unknown keys and wrongly typed values are refused, lists become
    tuples where the field is a tuple, objects become the field's dataclass."""
    return cls(**checked_mapping(cls, values, where))


def checked_mapping(cls: Type, values: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """``values`` checked against ``cls``'s fields and type hints, converted as ``from_mapping`` does, not yet
    built (for a class whose construction needs more than its fields)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be an object, got {_json_name(values)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise unknown_keys_error(where, unknown, fields)
    hints = typing.get_type_hints(cls)
    converted = {}
    for key, value in values.items():
        hint = hints[key]
        nested = _dataclass_of(hint)
        if nested is not None and isinstance(value, Mapping):
            value = from_mapping(nested, value, f"{where}.{key}")
        elif isinstance(value, list):
            value = tuple(value)
        if not _matches(value, hint):
            raise ConfigError(f"{where}.{key}: expected {_describe(hint)}, got {shown(value)}")
        converted[key] = value
    return converted


def check_types(where: str, values: Mapping[str, Any], hints: Mapping[str, Any]) -> None:
    """Refuse a value whose type is not its hint's (for keyword arguments read from JSON)."""
    for key, value in values.items():
        if key in hints and not _matches(value, hints[key]):
            raise ConfigError(f"{where}.{key}: expected {_describe(hints[key])}, got {shown(value)}")


def _dataclass_of(hint: Any):
    """The dataclass a field holds (``X`` or ``Optional[X]``), or None."""
    candidates = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
    return next((c for c in candidates if dataclasses.is_dataclass(c) and isinstance(c, type)), None)


def _json_name(value: Any) -> str:
    """A value's type as JSON calls it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    return {dict: "an object", list: "a list", tuple: "a list", str: "a string", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def shown(value: Any) -> str:
    """A value as its JSON would show it, kept short."""
    text = "null" if value is None else "true" if value is True else "false" if value is False else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is typing.Union:
        return any(_matches(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} numbers" if args and args[-1] is not Ellipsis else "a list"
    if dataclasses.is_dataclass(hint):
        return f"an object of {hint.__name__}'s fields"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def add_cli_overrides(parser: argparse.ArgumentParser, cls: Type) -> None:
    """``--name`` for every field of ``cls`` declared with ``cli=True``; unset options override nothing."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli"):
            parser.add_argument(f"--{f.name}", type=hints[f.name], default=None,
                                help=f"{f.metadata['help']} (overrides the config; default {f.default!r})")


def cli_overrides(args: argparse.Namespace, cls: Type) -> Dict[str, Any]:
    """The ``cli`` fields that were given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.metadata.get("cli") and getattr(args, f.name, None) is not None}
