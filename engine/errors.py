"""User-facing errors: the CLI prints these as one line and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad layout, wrong size, missing weights, too little VRAM).

    The message must say what to change; no stack trace is shown for it.
    """


class ThreedisWarning(UserWarning):
    """Something the user should know about a render that still succeeded."""
