"""The one kind of error a user is owed a single line for: every command turns a `UserError` into
`error: <message>` on stderr and exit code 2, after nothing (or nothing lasting) was written."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user gave (config, data, run dir, checkpoint, spec); the message names it."""


class ConfigError(UserError):
    """A mistake in a config, a sweep spec or a cluster profile; the message names the key."""
