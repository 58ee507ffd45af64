"""The one kind of error a user is owed a single line for: every command turns a `UserError` into
`error: <message>` on stderr and exit code 2, after nothing (or nothing lasting) was written."""

from __future__ import annotations

import io
import sys
from collections.abc import Callable


class UserError(ValueError):
    """A mistake in what the user gave (config, data, run dir, checkpoint, spec); the message names it."""


class ConfigError(UserError):
    """A mistake in a config, a sweep spec or a cluster profile; the message names the key."""


def run_command(command: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run a command's main; a UserError becomes its one line on stderr and exit code 2."""
    tolerant_output()
    try:
        return command(argv)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever a library's message held
        return 2


def tolerant_output() -> None:
    """Text the output's encoding cannot show (a class named "café" on an ASCII stdout: LC_ALL=C
    without Python's UTF-8 mode) is printed escaped (caf\\xe9) rather than ending the command."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
