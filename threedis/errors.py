"""The one base class of user mistakes, shared by the kernels and the engine.

A module of its own at the top of the package, importing nothing: `threedis.kernels`
needs only torch and triton, yet its rule errors (bad regions, a bad schedule) must be
caught by the same `except UserError` as the engine's, by an app or the CLI alike.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad layout, wrong size, missing weights, too little VRAM).

    The message must say what to change; no stack trace is shown for it.
    """
