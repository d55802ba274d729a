"""User-facing errors: the CLI prints these as one line and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad layout, wrong size, missing weights, too little VRAM).

    The message must say what to change; no stack trace is shown for it.
    """


class NonFiniteError(UserError):
    """A render's numbers stopped being finite (NaN/Inf); saving its black image would hide the cause.

    The message names the likely cause: the guidance value, the depth map, or NaN/Inf in a
    model's weights.
    """


class ThreedisWarning(UserWarning):
    """Something the user should know about a render that still succeeded."""
