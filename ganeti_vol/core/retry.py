"""Retrying what is briefly busy (umount, losetup -d, lvremove), with exponential backoff."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def retry_busy(
    action: Callable[[], T],
    *,
    is_busy: Callable[[Exception], bool],
    timeout: float,
    what: str,
    first_delay: float = 0.05,
    max_delay: float = 1.0,
) -> T:
    """Run ``action``; while it fails with a busy error, retry with exponential backoff.

    The last error is re-raised when ``timeout`` seconds have passed.
    """
    deadline = time.monotonic() + timeout
    delay = first_delay
    while True:
        try:
            return action()
        except Exception as err:
            if not is_busy(err) or time.monotonic() + delay > deadline:
                raise
            log.debug("%s: busy (%s), retrying in %.2fs", what, err, delay)
            time.sleep(delay)
            delay = min(delay * 2, max_delay)
