"""User-facing errors: the CLI prints these as one line and exits with code 2."""

from __future__ import annotations


from threedis.errors import UserError  # the shared base: kernels' RuleError is one too

__all__ = ["NonFiniteError", "ThreedisWarning", "UserError"]


class NonFiniteError(UserError):
    """A render's numbers stopped being finite (NaN/Inf); saving its black image would hide the cause.

    The message names the likely cause: the guidance value, the depth map, or NaN/Inf in a
    model's weights.
    """


class ThreedisWarning(UserWarning):
    """Something the user should know about a render that still succeeded."""
