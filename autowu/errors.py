"""The package's own error classes: what a user can fix, told apart from the package's bugs.

A ``UserError`` says what in the user's input is wrong (a config value, a path, a world size, a checkpoint) and
what works instead; the launcher prints it as one line. Anything else raised inside the package is a bug and
keeps its traceback. Both subclass the built-in errors a caller would catch without knowing this module.
"""
from __future__ import annotations


class UserError(ValueError):
    """Input the user can fix; the message names the setting, file or value and what works instead."""


class ConfigError(UserError):
    """A config (DeepSpeed JSON, its ``"train"`` block, a data config, a scheduler or optimizer block) that cannot
    run as asked."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (a config, a beton, a checkpoint) that is not there or not whole."""
