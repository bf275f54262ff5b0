"""Settings declared once: a frozen dataclass field holds a setting's type, default and help together.

``setting(default, help, cli=True)`` declares a field; ``from_mapping`` builds the dataclass from a JSON object,
refusing unknown keys (with the nearest known name) and values of the wrong type, so that the dataclass's own
``__post_init__`` checks only ranges and choices. ``add_cli_overrides``/``cli_overrides`` turn the fields
marked ``cli`` into command-line options that override the JSON, with the field's help: no setting is
declared twice. (fastargs' ``Section(...).params(...)`` is the same idea; dataclasses keep it in the stdlib.)
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from typing import Any, Dict, Iterable, Mapping, Type, TypeVar

T = TypeVar("T")


def setting(default: Any, help: str, cli: bool = False):
    """A dataclass field with its help text; ``cli`` also makes it a ``--name`` command-line override."""
    return dataclasses.field(default=default, metadata={"help": help, "cli": cli})


def unknown_keys_error(where: str, unknown: Iterable[str], known: Iterable[str], list_known: bool = True,
                       why: str = "") -> ValueError:
    """One error naming each unknown key and, where one is close, the known key it probably meant."""
    known = sorted(known)
    parts = []
    for key in sorted(unknown):
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ValueError(f"{where}: unknown key{'s' if len(parts) > 1 else ''} {', '.join(parts)}"
                      + (f" ({why})" if why else "") + (f"; known: {', '.join(known)}" if list_known else ""))


def from_mapping(cls: Type[T], values: Mapping[str, Any], where: str) -> T:
    """``cls(**values)`` for a JSON object: unknown keys and wrongly typed values are refused, lists become
    tuples where the field is a tuple."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{where} must be an object, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise unknown_keys_error(where, unknown, fields)
    hints = typing.get_type_hints(cls)
    converted = {}
    for key, value in values.items():
        if isinstance(value, list):
            value = tuple(value)
        if not _matches(value, hints[key]):
            raise ValueError(f"{where}.{key}: expected {_describe(hints[key])}, got {value!r}")
        converted[key] = value
    return cls(**converted)


def check_types(where: str, values: Mapping[str, Any], hints: Mapping[str, Any]) -> None:
    """Refuse a value whose type is not its hint's (for keyword arguments read from JSON)."""
    for key, value in values.items():
        if key in hints and not _matches(value, hints[key]):
            raise ValueError(f"{where}.{key}: expected {_describe(hints[key])}, got {value!r}")


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
