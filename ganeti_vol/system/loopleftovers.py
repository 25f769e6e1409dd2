"""Leftover loop devices and partitions: what a script or a crashed ganeti-vol left behind.

Only ganeti-vol's own devices are touched: an attached loop device must carry
ganeti-vol's :class:`~ganeti_vol.system.loopctl.Marker` and its owner must be
gone, or the device must have appeared while a script of ours ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from typing import Any

from ganeti_vol.core import errors as E
from ganeti_vol.core import signals
from ganeti_vol.core.lazy import lazy
from ganeti_vol.core.records import owner_alive
from ganeti_vol.system.loopctl import Marker, device_name, get_status, records, remove_record
from ganeti_vol.system.loopteardown import DETACH_TIMEOUT, teardown
from ganeti_vol.system.partitions import read_partition_table

log = logging.getLogger(__name__)
#: pyudev is only loaded when a device is looked at (not by every export that uses a helper)
devices = lazy("ganeti_vol.system.devices")


# --- what a script left behind ---------------------------------------------------------


@dataclass(frozen=True)
class LoopState:
    """Every loop device with its backing file (None: unbound) and its partitions, at one time."""

    loops: dict[str, str | None]
    partitions: dict[str, frozenset[str]]


def loop_state() -> LoopState:
    loops = dict(devices.iter_loop_devices())
    return LoopState(loops, {dev: devices.partition_paths(dev) for dev in loops})


def table_geometries(paths: Iterable[str]) -> set[tuple[int, int]]:
    """(start, size) in bytes of every partition in the tables of these disks (files or devices)."""
    found: set[tuple[int, int]] = set()
    for path in paths:
        with contextlib.suppress(OSError, E.GanetiVolError), open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            found.update((p.start, p.size) for p in read_partition_table(f, size, what=path))
    return found


@dataclass(frozen=True)
class Leftovers:
    """Loop devices and partitions a script left behind (see :func:`find_leftovers`)."""

    #: loop devices still attached to one of our files
    leaked: list[str]
    #: loop device -> the partitions that are new on it
    partitions: dict[str, list[str]]


def find_leftovers(
    before: LoopState,
    after: LoopState,
    ours: Callable[[str | None], bool],
    *,
    keep: Container[str] = (),
    disks: Iterable[str] = (),
) -> Leftovers:
    """What appeared between ``before`` and ``after`` and belongs to us.

    ``ours(backing)`` says whether a backing file is one of ours.  A loop
    device is *leaked* if it is now bound to one of ours (and was not
    before) and is not in ``keep`` (our own attachments).  New partitions
    count on a leaked device, on any device bound to one of ours, and on an
    unbound device (unbound or ours before) when their geometry matches a
    partition in the table of one of ``disks``: on kernels without partition
    parsers, BLKPG partitions outlive ``losetup -d``.  A device another
    ganeti-vol process attached and still uses is never a leftover.
    """
    leaked = sorted(
        dev for dev, backing in after.loops.items()
        if backing and before.loops.get(dev) != backing and ours(backing) and dev not in keep
        and not _used_by_other_ganeti_vol(dev)
    )
    partitions: dict[str, list[str]] = {}
    geometries: set[tuple[int, int]] | None = None
    for dev, parts in after.partitions.items():
        new = sorted(parts - before.partitions.get(dev, frozenset()))
        if not new:
            continue
        now, was = after.loops.get(dev), before.loops.get(dev)
        if dev in leaked or (ours(now) and not _used_by_other_ganeti_vol(dev)):
            partitions[dev] = new
        elif now is None and (was is None or ours(was)):
            geometries = table_geometries(disks) if geometries is None else geometries
            stale = [p for p in new if devices.partition_geometry(p) in geometries]
            if stale:
                partitions[dev] = stale
    return Leftovers(leaked, partitions)


def _used_by_other_ganeti_vol(device: str) -> bool:
    """True if another ganeti-vol process that still runs attached ``device``."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        status = get_status(fd)
    except OSError:
        return False
    finally:
        os.close(fd)
    marker = Marker.parse(status.file_name) if status else None
    return marker is not None and marker.pid != os.getpid() and marker.alive


def clear_leftovers(found: Leftovers, after: LoopState) -> list[tuple[str, str]]:
    """Detach the leaked devices and delete the new partitions (``(check, message)`` each)."""
    out = []
    for dev in found.leaked:
        problems = teardown(dev)
        out.append(("loop devices", f"left {dev} attached (backing '{after.loops[dev]}'); "
                    + (f"cannot detach it: {'; '.join(problems)}" if problems else "detached")))
    for dev, added in found.partitions.items():
        if dev in found.leaked:
            continue  # deleted with the device
        problems = teardown(dev, partitions_only=True)
        out.append(("partitions", f"left partition(s) {', '.join(added)} on {dev}; "
                    + (f"cannot delete them: {'; '.join(problems)}" if problems else "deleted")))
    return out


# --- reconcile after a crash -----------------------------------------------------------


@dataclass(frozen=True)
class CleanupAction:
    """One thing :func:`cleanup` did (or would do, in a dry run)."""

    device: str
    action: str  # detach | delete-partitions | forget-record
    reason: str
    done: bool
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def cleanup(
    state_dir: str,
    dry_run: bool = False,
    *,
    timeout: float = DETACH_TIMEOUT,
    under: str | None = None,
) -> list[CleanupAction]:
    """Detach loop devices and delete partitions that a crashed ganeti-vol left behind.

    Only ganeti-vol's own devices are touched: an attached loop device must
    carry ganeti-vol's marker and its owner process must be gone; partitions
    left on an unbound loop device must be listed in a record in
    ``state_dir``.  Foreign loop devices are never touched.  ``under``
    limits the attached devices looked at to those backed by files below that
    directory (records in ``state_dir`` are always reconciled).  Returns what
    was done; actions with ``error`` set failed (typically: still in use).
    """
    recorded = records(state_dir).read_all()
    prefix = os.path.abspath(under).rstrip("/") + "/" if under else None
    actions: list[CleanupAction] = []
    for device, backing in devices.iter_loop_devices():
        name = device_name(device)
        record = recorded.pop(name, None)
        if backing and prefix and record is None and not backing.startswith(prefix):
            continue
        if backing:
            actions.extend(reconcile_bound(device, backing, record, state_dir, dry_run, timeout))
        elif devices.partition_devices(device) and record is not None:
            actions.extend(_reconcile_unbound(device, record, state_dir, dry_run, timeout))
        elif record is not None:
            actions.append(_forget(device, "not attached any more", state_dir, dry_run))
    for name in recorded:
        actions.append(_forget(f"/dev/{name}", "loop device does not exist", state_dir, dry_run))
    return actions


def _forget(device: str, reason: str, state_dir: str, dry_run: bool) -> CleanupAction:
    if not dry_run:
        remove_record(state_dir, device)
    return CleanupAction(device, "forget-record", reason, not dry_run)


def reconcile_bound(
    device: str,
    backing: str,
    record: dict[str, Any] | None,
    state_dir: str,
    dry_run: bool,
    timeout: float,
) -> list[CleanupAction]:
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        log.debug("cannot open %s: %s", device, err)
        return []
    try:
        status = get_status(fd)
    except OSError as err:
        os.close(fd)
        log.debug("cannot get the status of %s: %s", device, err)
        return []
    marker = Marker.parse(status.file_name) if status else None
    if marker is None:
        os.close(fd)  # foreign (or detached meanwhile): not ours to touch
        if record is not None:
            return [_forget(device, f"now used by something else ({backing})", state_dir, dry_run)]
        return []
    if marker.alive:
        os.close(fd)
        log.debug("%s is in use by ganeti-vol pid %d: not leaked", device, marker.pid)
        return []
    reason = f"leaked by ganeti-vol pid {marker.pid} ({backing})"
    if dry_run:
        os.close(fd)
        return [CleanupAction(device, "detach", reason, False)]
    with signals.deferred():
        problems = teardown(device, fd, timeout=timeout)
    if not problems:
        remove_record(state_dir, device)
    return [CleanupAction(device, "detach", reason, not problems, "; ".join(problems))]


def _reconcile_unbound(
    device: str, record: dict[str, Any], state_dir: str, dry_run: bool, timeout: float
) -> list[CleanupAction]:
    pid = record.get("pid")
    if owner_alive(record):
        log.debug("%s is in use by ganeti-vol pid %d: not leaked", device, pid)
        return []
    reason = f"stale partitions left by ganeti-vol pid {pid}"
    if dry_run:
        return [CleanupAction(device, "delete-partitions", reason, False)]
    with signals.deferred():
        problems = teardown(device, timeout=timeout, partitions_only=True)
    if not problems:
        remove_record(state_dir, device)
    return [CleanupAction(device, "delete-partitions", reason, not problems, "; ".join(problems))]
