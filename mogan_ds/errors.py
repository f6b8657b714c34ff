"""Error types for mistakes in what a user gave: a setting, a path, a file's content.

Command-line entry points (`mogan_ds.cli.errors.user_errors`) print these as one line and exit
with code 2 instead of a traceback, so the types say "the input is wrong, the code is
not". This module imports nothing, so any part of the package can raise them.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected mistake in the user's input; the message names the key, flag or path."""


class BadFileError(UserError, ValueError):
    """A file the user pointed at exists but cannot be used (malformed, wrong content)."""


class ConfigError(UserError, ValueError):
    """A recipe or override is invalid; the message names the key."""
