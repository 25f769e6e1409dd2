"""Ctrl-C and its kin (SIGINT, SIGTERM, SIGHUP): turned into an exception, or held back.

- :func:`interrupting` makes them raise :class:`~ganeti_vol.core.errors.Interrupted`
  (the command lines, and an OS script's cleanup stack), so cleanup runs;
- :func:`deferred` blocks them for this thread while a step that must not
  be cut in half runs (attaching or detaching a loop device, releasing a
  snapshot, undoing); one that arrives meanwhile is delivered right after;
- :func:`held` queues them while a child process is started (a blocked
  signal mask would be inherited by the child, so handlers queue instead).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from ganeti_vol.core import errors as E

#: the signals that stop an operation
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def raise_interrupted(signum: int, frame: FrameType | None) -> None:
    """A signal handler: raise :class:`~ganeti_vol.core.errors.Interrupted`."""
    raise E.Interrupted(signum)


def install_interrupting(signals: tuple[int, ...] = SIGNALS) -> dict[int, Any]:
    """Make ``signals`` raise Interrupted; the handlers they had (none outside the main
    thread, where signal handlers cannot be set).  Undo with :func:`restore`."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for signum in signals:
        previous[signum] = signal.signal(signum, raise_interrupted)
    return previous


def restore(previous: dict[int, Any]) -> None:
    """Put back the handlers :func:`install_interrupting` replaced."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    previous.clear()


@contextlib.contextmanager
def interrupting(signals: tuple[int, ...] = SIGNALS) -> Iterator[None]:
    """``signals`` raise Interrupted while the block runs (main thread only)."""
    previous = install_interrupting(signals)
    try:
        yield
    finally:
        restore(previous)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold back SIGINT/SIGTERM/SIGHUP for this thread while the block runs.

    Used around attach and cleanup steps that must not be cut in half; a
    signal that arrives meanwhile is delivered (and raises) right after.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT, SIGTERM, SIGHUP) while a child is started and made ours.

    Without it, a signal arriving between the fork and the moment the caller
    holds the child (inside ``Popen``) would leave the child running.  The
    handlers run in the main thread only, so only there is anything held;
    a held signal is delivered (and raises) as the block ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old: dict[int, Callable[[int, FrameType | None], Any]] = {}
    for signum in SIGNALS:
        handler = signal.getsignal(signum)
        if callable(handler):
            old[signum] = handler
            signal.signal(signum, lambda n, _frame: pending.append(n))
    try:
        yield
    finally:
        for held_signum, previous in old.items():
            signal.signal(held_signum, previous)
        for arrived in pending:
            old[arrived](arrived, None)
