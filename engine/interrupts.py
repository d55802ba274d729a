"""SIGTERM handled like Ctrl-C, and short critical sections that an interrupt cannot split.

Why: a render's files must appear together or not at all. Writing them aside is
slow and may be interrupted at any point (the temporary folder is then removed);
moving them in is a handful of links, and an interrupt in the middle of it would
leave half a set under final names. `uninterruptible()` holds SIGINT and SIGTERM for
that moment and delivers them right after. Signals reach Python only in the main
thread, so elsewhere (a service's worker thread) there is nothing to hold.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

__all__ = ["Terminated", "interrupt_message", "mark_completed", "terminate_like_interrupt", "uninterruptible"]

_HELD = (signal.SIGINT, signal.SIGTERM)
_COMPLETED = "threedis_completed"  # attribute of an interrupt: what was finished before it was acted on


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would raise KeyboardInterrupt so the same clean-up runs."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"terminated by signal {signum}")


@contextlib.contextmanager
def terminate_like_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises Terminated (a KeyboardInterrupt) in the main thread; restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then act on the first one that came (as its handler would)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, Any]] = []
    previous = {sig: signal.getsignal(sig) for sig in _HELD}

    def hold(signum: int, frame: Any) -> None:
        pending.append((signum, frame))

    for sig in _HELD:
        signal.signal(sig, hold)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if pending:
            signum, frame = pending[0]
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)  # the default action (SIGTERM: exit), now that the set is whole


def mark_completed(err: BaseException, lines: list[str]) -> None:
    """Record on an interrupt that was held until work was whole (a set moved in) what that work left, one line each."""
    setattr(err, _COMPLETED, [*getattr(err, _COMPLETED, []), *lines])


def interrupt_message(err: KeyboardInterrupt) -> str:
    """The lines a command prints when a signal ends it: nothing partial, or what was completed first."""
    what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
    done = getattr(err, _COMPLETED, [])
    if not done:
        return f"threedis: {what}; nothing partial was written"
    head = f"threedis: {what} once the outputs were complete; they are whole:"
    return "\n".join([head, *(f"  {line}" for line in done)])
