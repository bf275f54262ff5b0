"""Reading the project's JSON configs with one clear error for a missing or malformed file; writing a file all or
nothing."""
from __future__ import annotations

import json
import os
from typing import Any

from .errors import ConfigError, MissingFileError


def read_json(path: "str | os.PathLike", what: str) -> Any:
    """The parsed JSON at ``path``; ``what`` names the file in errors ("DeepSpeed config", "data config")."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{what} {path} is not valid JSON: {err}") from None


def write_durably(path: "str | os.PathLike", text: str) -> None:
    """Write to a temporary name, flush it to the disk, rename into place, flush the folder: all or nothing."""
    path = os.fspath(path)
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
