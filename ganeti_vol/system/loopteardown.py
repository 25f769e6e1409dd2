"""Tearing a loop device down: flush, delete its partitions, detach, verify nothing was lost.

Every step runs even if an earlier one failed; lost writes are a
:class:`~ganeti_vol.core.errors.DeviceError` (``NoSpaceError`` when the file's
filesystem is full), what stays busy is reported naming who holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ganeti_vol.core import errors as E
from ganeti_vol.core.lazy import lazy
from ganeti_vol.core.libc import sync_file_range
from ganeti_vol.core.retry import retry_busy
from ganeti_vol.system.loopctl import (
    BLKFLSBUF,
    LOOP_CLR_FD,
    SYS_BLOCK,
    delete_partition,
    device_name,
    get_status,
    is_bound,
)

log = logging.getLogger(__name__)
#: pyudev is only loaded when a device is looked at (not by every export that uses a helper)
devices = lazy("ganeti_vol.system.devices")

#: seconds to keep retrying a busy partition delete / detach before giving up
DETACH_TIMEOUT = 10.0


def _is_ebusy(err: Exception) -> bool:
    return isinstance(err, OSError) and err.errno == errno.EBUSY


# --- teardown -------------------------------------------------------------------------


def _delete_partitions(fd: int, device: str, timeout: float) -> list[str]:
    """Delete every partition sysfs shows for ``device``; returns the problems."""
    problems = []
    for number, part_path, _devnum in devices.partition_devices(device):
        try:
            retry_busy(
                functools.partial(delete_partition, fd, number),
                is_busy=_is_ebusy,
                timeout=timeout,
                what=f"delete {part_path}",
            )
            log.debug("deleted partition %s", part_path)
        except OSError as err:
            if err.errno == errno.ENXIO:
                continue  # already gone
            problems.append(f"partition '{part_path}' {_busy_cause(part_path, err)}")
    return problems


def _busy_cause(path: str, err: OSError | None = None) -> str:
    """Why a device is busy: its mounts, or the processes holding it open."""
    try:
        facts = devices.describe(path)
        rdevs = [os.stat(p).st_rdev for p in (path, *facts.partitions) if os.path.exists(p)]
    except (E.DeviceError, OSError):
        facts, rdevs = None, []
    reasons = []
    if facts is not None and facts.mounts:
        reasons.append("mounted at " + ", ".join(f"'{m.mount_point}'" for m in facts.mounts))
    holders = devices.openers(rdevs)
    if holders:
        reasons.append("open by " + ", ".join(holders))
    if not reasons:
        reasons.append(err.strerror if err is not None and err.strerror else "busy")
    return "is busy: " + "; ".join(reasons)


def _wait_unbound(device: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while is_bound(device):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    return True


@dataclass
class Teardown:
    """What :func:`teardown_result` could not do: writes that were lost, and what stayed busy."""

    #: "'/dev/loop3p1': Input/output error": writes through that node did not reach the file
    lost: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [f"lost writes {p}" for p in self.lost] + self.busy


def _flush_node(path: str, fd: int) -> str | None:
    """fsync (write back; reports a write error not seen before) and BLKFLSBUF (drop the cache)."""
    failed = None
    try:
        os.fsync(fd)
    except OSError as err:
        failed = f"'{path}': {err.strerror}"
    try:
        fcntl.ioctl(fd, BLKFLSBUF)
    except OSError as err:
        log.debug("BLKFLSBUF on %s: %s", path, err)
    return failed


def _flush_caches(device: str, fd: int) -> list[str]:
    """Write back and drop the page cache of each partition of ``device``, then of ``device``.

    The whole device and each partition have a cache of their own, so
    without this a read through one node can miss what was written through
    another.  A node's fsync also reports a write error the kernel hit when
    its last writer closed it (nobody has seen it yet), which is how a
    script's lost writes are caught.  Returns the nodes whose writes failed.
    """
    lost = []
    for _number, part, _devnum in devices.partition_devices(device):
        try:
            part_fd = os.open(part, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            log.debug("cannot open %s to flush it: %s", part, err)
            continue
        try:
            failed = _flush_node(part, part_fd)
        finally:
            os.close(part_fd)
        if failed:
            lost.append(failed)
    failed = _flush_node(device, fd)
    return [*lost, failed] if failed else lost


def flush(device: str) -> None:
    """Make what was written through a loop device and its partitions reach the backing file.

    Writes back and drops the caches of the device and every partition, so
    the next read through any of them sees every write.  Raises
    :class:`~ganeti_vol.core.errors.DeviceError` (or ``NoSpaceError``) if writes
    through it were lost.
    """
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise E.DeviceError(f"cannot flush '{device}': {err.strerror}") from err
    try:
        lost = _flush_caches(device, fd)
    finally:
        os.close(fd)
    if lost:
        raise lost_writes_error(device, backing_file(device), lost)


def backing_file(device: str) -> str | None:
    """The file a loop device is attached to (sysfs), None if unbound."""
    try:
        with open(os.path.join(SYS_BLOCK, device_name(device), "loop", "backing_file")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def lost_writes_error(device: str, backing: str | None, lost: Sequence[str]) -> E.GanetiVolError:
    """The error for writes through ``device`` that never reached ``backing``."""
    full = False
    if backing:
        with contextlib.suppress(OSError):
            full = os.statvfs(os.path.dirname(backing) or "/").f_bavail == 0
    what = f"'{backing}' through '{device}'" if backing else f"'{device}'"
    message = (
        f"cannot write {what}: {'; '.join(lost)}"
        + (" (the file's filesystem is full)" if full else "")
        + ": data written through the loop device was lost"
    )
    return E.NoSpaceError(message, what=what) if full else E.DeviceError(message)


def teardown_result(device: str, fd: int | None, timeout: float, partitions_only: bool) -> Teardown:
    """:func:`teardown`, returning what was lost and what stayed busy apart."""
    result = Teardown()
    if fd is None:
        try:
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            result.busy.append(f"cannot open: {err.strerror}")
            return result
    try:
        try:
            status = get_status(fd)
        except OSError:
            status = None
        writable = status is not None and not status.read_only
        if writable:
            result.lost.extend(_flush_caches(device, fd))
        result.busy.extend(_delete_partitions(fd, device, timeout))
        if not partitions_only:
            try:
                retry_busy(
                    lambda: fcntl.ioctl(fd, LOOP_CLR_FD),
                    is_busy=_is_ebusy,
                    timeout=timeout,
                    what=f"detach {device}",
                )
            except OSError as err:
                if err.errno != errno.ENXIO:  # ENXIO: not bound any more
                    result.busy.append(f"LOOP_CLR_FD failed: {err.strerror}")
            if writable:
                # Pages dirtied since the flush (a writer that came and went meanwhile):
                # when we are the last user, the detach has begun and they cannot be
                # written any more, so this fails exactly when something is lost.
                try:
                    sync_file_range(fd)
                except OSError as err:
                    result.lost.append(
                        f"'{device}': written after the final flush ({err.strerror})"
                    )
    finally:
        os.close(fd)
    if not partitions_only and not _wait_unbound(device, timeout):
        result.busy.append(f"still attached after {timeout:g}s, {_busy_cause(device)}")
    return result


def teardown(
    device: str,
    fd: int | None = None,
    *,
    timeout: float = DETACH_TIMEOUT,
    partitions_only: bool = False,
) -> list[str]:
    """Flush a loop device, delete its partitions, detach it and verify the detach.

    ``fd`` is an open descriptor of ``device`` (one is opened if None); it is
    closed here.  The caches of the device and its partitions are written
    back and dropped first (unless it is read-only), and after
    ``LOOP_CLR_FD`` ganeti-vol checks that nothing written meanwhile was
    lost.  Every step runs even if an earlier one failed; the problems are
    returned (an empty list means nothing was lost and the device is clean
    and unbound).
    """
    return teardown_result(device, fd, timeout, partitions_only).problems

