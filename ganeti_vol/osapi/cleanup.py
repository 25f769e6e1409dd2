"""The cleanup stack of an OS script: undo steps run in reverse on success, failure and
Ctrl-C, each logged, busy ones retried with backoff."""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ganeti_vol.core import errors as E
from ganeti_vol.core.retry import retry_busy
from ganeti_vol.core.signals import deferred, install_interrupting, restore

log = logging.getLogger(__name__)

T = TypeVar("T")


# --- cleanup stack ---------------------------------------------------------------------


def _is_busy(err: Exception) -> bool:
    if isinstance(err, OSError):
        return err.errno == errno.EBUSY
    if isinstance(err, E.BusyError):
        return True
    return isinstance(err, E.ScriptFailed) and "busy" in str(err).lower()


@dataclass
class _Step:
    description: str
    action: Callable[[], Any] | None = None
    exit: Callable[..., Any] | None = None


class CleanupStack:
    """Undo steps, run in reverse order when the ``with`` block ends, however it ends.

    Like :class:`contextlib.ExitStack`, plus:

    - inside the block SIGTERM, SIGINT and SIGHUP raise
      :class:`~ganeti_vol.core.errors.Interrupted` (main thread only), so the steps
      run on those signals too; while they run the signals are held back;
    - each step is logged (``undo: <description>``) before it runs;
    - a callback failing with a busy error (EBUSY, BusyError, a command
      saying "busy") is retried with exponential backoff for up to
      ``busy_timeout`` seconds (umount and losetup -d often are briefly busy);
    - a failing step does not stop the others; the first failure is raised
      afterwards (or added as a note to the exception already propagating).
    """

    def __init__(
        self,
        *,
        signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP),
        busy_timeout: float = 10.0,
    ) -> None:
        self._steps: list[_Step] = []
        self.signals = tuple(signals)
        self.busy_timeout = busy_timeout
        self._previous: dict[int, Any] = {}

    def callback(self, fn: Callable[..., Any], *args: Any, description: str | None = None,
                 **kwargs: Any) -> None:
        """Run ``fn(*args, **kwargs)`` at cleanup (retried while busy)."""
        text = description or str(getattr(fn, "__name__", None) or repr(fn))
        self._steps.append(_Step(text, action=lambda: fn(*args, **kwargs)))

    def enter_context(
        self, cm: contextlib.AbstractContextManager[T], description: str | None = None
    ) -> T:
        """Enter ``cm`` now and exit it at cleanup (not retried: a context exits once)."""
        value = cm.__enter__()
        self._steps.append(_Step(description or f"leave {type(cm).__name__}", exit=cm.__exit__))
        return value

    def __enter__(self) -> CleanupStack:
        self._previous = install_interrupting(self.signals)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            with deferred():
                failure = self._unwind(exc_type, exc, tb)
            # a signal held back meanwhile arrives here, still raising Interrupted
        finally:
            restore(self._previous)
        if failure is None:
            return
        if exc is not None:
            exc.add_note(f"cleanup also failed: {failure}")
            return
        if isinstance(failure, E.GanetiVolError) or not isinstance(failure, Exception):
            raise failure
        raise E.GanetiVolError(f"cleanup failed: {failure}") from failure

    def close(self) -> None:
        """Run the steps now (outside a ``with`` block)."""
        self.__exit__(None, None, None)

    def _unwind(self, exc_type: Any, exc: BaseException | None, tb: Any) -> BaseException | None:
        first: BaseException | None = None
        while self._steps:
            step = self._steps.pop()
            log.info("undo: %s", step.description)
            try:
                if step.exit is not None:
                    step.exit(exc_type, exc, tb)
                elif step.action is not None:
                    retry_busy(step.action, is_busy=_is_busy, timeout=self.busy_timeout,
                                       what=step.description, first_delay=0.25, max_delay=4.0)
            except BaseException as err:  # the other steps still run
                log.error("undo step '%s' failed: %s", step.description, err)
                first = first or err
        return first
