"""The one family of bad-input errors, at the bottom of the house (it imports nothing of ours).

Every module raises one of these when the *input* is wrong (a flag, a file, a checkpoint); the CLI
and the recipes turn any :class:`InputError` into one line on stderr and exit status 2, never a
traceback. The message names the flag, key or path, its value, and what to do instead.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad input: one line naming the flag, key or path and what to do (exit status 2)."""


class ConfigError(InputError, ValueError):
    """A bad flag or config value; the message names the flag."""


class DataError(InputError, ValueError):
    """Data that is missing, unreadable, too small or inconsistent; the message names the file."""


class TokenizerError(InputError, ValueError):
    """A tokenizer that cannot be loaded or trained; the message names the flag and what to do."""


class CheckpointError(InputError, RuntimeError):
    """A checkpoint that is missing, invalid, incompatible, or a save that failed in strict mode."""


class DamagedFile(CheckpointError):
    """A checkpoint file whose bytes, hashed as they were read, are not the ones saved: the reader
    that found it may have used some of them already (resume falls back past the checkpoint)."""


def error_class(name: str) -> type[InputError]:
    """The class of this family named ``name`` (to re-raise an error another rank reported by name)."""
    found = {cls.__name__: cls
             for cls in (InputError, ConfigError, DataError, TokenizerError, CheckpointError, DamagedFile)}
    return found.get(name, InputError)
