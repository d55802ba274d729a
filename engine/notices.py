"""Warnings of one render: each is a ThreedisWarning and is also kept for `result.settings["warnings"]`.

A service shows a render's warnings next to its image, so they are collected per
render rather than read back from the process-wide `warnings` machinery (whose
filters show a message once per place, and which two engines in two threads share).
The collector is a context variable: each thread, and each render in it, sees its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings
from typing import Any, Callable, Iterator

from threedis.engine.errors import ThreedisWarning

__all__ = ["collect_warnings", "records_warnings", "warn"]

_COLLECTED: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("threedis_warnings", default=None)


def warn(message: str, stacklevel: int = 2) -> None:
    """Emit `message` as a ThreedisWarning and record it in the current render's list, if any."""
    found = _COLLECTED.get()
    if found is not None:
        found.append(message)
    warnings.warn(message, ThreedisWarning, stacklevel=stacklevel + 1)


@contextlib.contextmanager
def collect_warnings() -> Iterator[list[str]]:
    """Yields the list that `warn` appends to until the block ends (nested blocks get their own)."""
    found: list[str] = []
    token = _COLLECTED.set(found)
    try:
        yield found
    finally:
        _COLLECTED.reset(token)


def records_warnings(render: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for a render function: its result's settings["warnings"] lists the warnings it raised."""

    @functools.wraps(render)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with collect_warnings() as found:
            result = render(*args, **kwargs)
        result.settings["warnings"] = list(found)
        return result

    return wrapper
