"""Attaching a file disk as a loop device with its partitions, for the duration of a block.

:func:`attached` is the one way ganeti-vol turns a file disk into a block
device.  It talks to the kernel with raw ioctls (``fcntl.ioctl`` + ``struct``):

* ``LOOP_CTL_GET_FREE`` + ``LOOP_CONFIGURE`` (``LOOP_SET_FD`` +
  ``LOOP_SET_STATUS64`` on kernels before 5.8) with the flags
  ``LO_FLAGS_AUTOCLEAR | LO_FLAGS_PARTSCAN`` (+ ``READ_ONLY`` when only read).
  While attached, ganeti-vol holds the loop device open; if the process dies,
  the kernel detaches the device when its last user closes it, and because of
  ``PARTSCAN`` it drops the partitions with it.
* The 64-byte ``lo_file_name`` carries a marker (``ganeti-vol:<pid>:<start>:<tag>``)
  so :func:`~ganeti_vol.system.loopleftovers.cleanup` can tell ganeti-vol's loop
  devices from anybody else's (the ioctls and the marker are in
  :mod:`ganeti_vol.system.loopctl`).
* Kernels without partition-table parsers (like the CI machines) create no
  ``loopNpM``: :mod:`ganeti_vol.system.partitions` parses MBR (primary, extended,
  logical) and GPT (CRC-checked, backup header as fallback) itself, and the
  partitions are added with ``BLKPG_ADD_PARTITION``.
* While an OS script runs (``hold=False``) ganeti-vol lets go of the device
  (autoclear off, its descriptor closed), so the script's last close writes
  back and drops the device's page cache as it does on a real disk: what
  was written through the whole device is then seen through its
  partitions, and the other way round.
* On exit, on every path (:mod:`ganeti_vol.system.loopteardown`): write back
  and drop the caches of the device and of each partition (``fsync`` +
  ``BLKFLSBUF``; a write error is reported, never swallowed), delete the partitions (``BLKPG_DEL_PARTITION``,
  retrying while busy), ``LOOP_CLR_FD``, check that nothing was written
  after the flush, close, and *verify* the detach by polling sysfs (it is
  asynchronous).  Lost writes are a :class:`~ganeti_vol.core.errors.DeviceError`
  (:class:`~ganeti_vol.core.errors.NoSpaceError` when the file's filesystem is
  full); what cannot be cleaned up is reported as
  :class:`~ganeti_vol.core.errors.BusyError` naming the device and who holds it.

What scripts and crashed processes leave behind is found and cleared by
:mod:`ganeti_vol.system.loopleftovers`; its names that ``ops/`` and ``cli/``
use are importable from here too.

The library never prints; everything is logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ganeti_vol.core import errors as E
from ganeti_vol.core import signals
from ganeti_vol.core.lazy import lazy
from ganeti_vol.core.procs import process_start_time
from ganeti_vol.system.loopctl import (
    ATTACH_RETRIES,
    LO_FLAGS_AUTOCLEAR,
    LO_FLAGS_PARTSCAN,
    LO_FLAGS_READ_ONLY,
    LOOP_CONTROL,
    LOOP_CTL_ADD,
    LOOP_CTL_GET_FREE,
    RECORD_DIR as RECORD_DIR,
    SYS_BLOCK,
    Marker,
    add_partition,
    configure,
    device_name,
    ensure_node,
    get_status,
    is_bound,
    records,
    remove_record,
    set_autoclear,
    sysfs_devnum,
    write_record,
)
from ganeti_vol.system.loopleftovers import (  # the names ops/ and cli/ use through loopdev
    LoopState as LoopState,
    cleanup as cleanup,
    clear_leftovers as clear_leftovers,
    find_leftovers as find_leftovers,
    loop_state as loop_state,
    reconcile_bound,
)
from ganeti_vol.system.loopteardown import (
    DETACH_TIMEOUT,
    Teardown,
    lost_writes_error,
    teardown,
    teardown_result,
)
from ganeti_vol.system.partitions import PartitionEntry, read_partition_table

log = logging.getLogger(__name__)
#: pyudev is only loaded when a device is looked at (not by every export that uses a helper)
devices = lazy("ganeti_vol.system.devices")


def _own_marker(tag: str | None) -> Marker:
    pid = os.getpid()
    return Marker(pid, process_start_time(pid) or 0, tag or "")


# --- attach -----------------------------------------------------------------------------


@dataclass
class LoopAttachment:
    """A file disk attached as a loop device (yielded by :func:`attached`)."""

    device: str
    backing_file: str
    read_only: bool
    tag: str
    size: int
    #: /dev paths of the partitions, in partition-number order
    partitions: list[str] = field(default_factory=list)
    #: the partition table that was read (empty if none or not asked for)
    table: list[PartitionEntry] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["table"] = [dataclasses.asdict(p) for p in self.table]
        return out


def _attach(backing_fd: int, path: str, marker: Marker, flags: int) -> tuple[str, int]:
    """Claim a free loop device and bind it to ``backing_fd``; returns (device, open fd)."""
    try:
        ctl = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise E.DeviceError(f"cannot attach '{path}': {LOOP_CONTROL}: {err.strerror}") from err
    try:
        last: OSError | None = None
        for _ in range(ATTACH_RETRIES):
            number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            if devices.partition_paths(f"/dev/loop{number}"):
                # unbound but with partitions: a crashed user's (or losetup's) leftovers; its
                # partitions would shadow ours, so take a new device instead
                number = fcntl.ioctl(ctl, LOOP_CTL_ADD, -1)
            device = f"/dev/loop{number}"
            ensure_node(device, sysfs_devnum(os.path.join(SYS_BLOCK, f"loop{number}")))
            loop_fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            try:
                configure(loop_fd, backing_fd, flags, marker.encode())
            except OSError as err:
                os.close(loop_fd)
                if err.errno != errno.EBUSY:
                    raise
                last = err  # somebody else took this one meanwhile: ask again
                continue
            return device, loop_fd
        raise last if last else OSError(errno.EBUSY, "no free loop device")
    except OSError as err:
        raise E.DeviceError(f"cannot attach '{path}' to a loop device: {err.strerror}") from err
    finally:
        os.close(ctl)


def _add_partitions(
    att: LoopAttachment, fd: int, state_dir: str | None, record: dict[str, Any]
) -> list[str]:
    """Expose the partitions of an attached disk; returns device nodes created by mknod."""
    created: list[str] = []
    present = devices.partition_devices(att.device)
    if not present:
        with open(att.device, "rb", buffering=0) as f:
            att.table = read_partition_table(f, att.size, what=att.backing_file)
        for part in att.table:
            try:
                add_partition(fd, part)
            except OSError as err:
                raise E.DeviceError(
                    f"cannot add partition {part.number} of '{att.backing_file}' "
                    f"to '{att.device}': {err.strerror}"
                ) from err
        present = devices.partition_devices(att.device)
    for _number, part_path, devnum in present:
        major, minor = devnum.split(":")
        if ensure_node(part_path, os.makedev(int(major), int(minor))):
            created.append(part_path)
    att.partitions = [p for _, p, _ in present]
    if state_dir:
        record.update(partitions=att.partitions, created_nodes=created)
        write_record(state_dir, att.device, record)
    return created


@contextlib.contextmanager
def attached(
    path: str,
    *,
    read_only: bool,
    partitions: bool = True,
    tag: str | None = None,
    state_dir: str | None = None,
    timeout: float = DETACH_TIMEOUT,
    hold: bool = True,
) -> Iterator[LoopAttachment]:
    """Attach the file disk ``path`` as a loop device for the duration of the block.

    ``read_only`` attaches it read-only (the backing file is opened
    ``O_RDONLY`` too).  With ``partitions`` its MBR/GPT partitions appear as
    ``loopNpM`` (added with BLKPG when the kernel creates none).  ``tag`` is
    recorded with the device; ``state_dir`` (the node's ``state_dir``) keeps a
    record so :func:`~ganeti_vol.system.loopleftovers.cleanup` can reconcile
    after a crash.  Loop devices on the same file that a killed ganeti-vol left
    behind are detached first.

    With ``hold`` (the default) ganeti-vol keeps the device open with
    autoclear, so the kernel detaches it if this process dies.  Without it,
    once the partitions are in place, autoclear is switched off and the
    descriptor closed: the device then has no user but the ones the block
    starts, and its page cache is written back and dropped whenever the
    last of them closes it, as on a real disk.  Give ``hold=False`` when
    other programs (OS scripts) write through the device or its partitions.
    (If this process is killed meanwhile, the device stays attached until
    ``ganeti-vol cleanup`` or the next attach of the same file.)

    On exit (also on exceptions and KeyboardInterrupt) the caches of the
    device and all its partitions are written back and dropped, all
    partitions are deleted -- including ones a script added -- the device is
    detached, and the detach is verified.  Writes that did not reach the
    file raise :class:`~ganeti_vol.core.errors.DeviceError` (``NoSpaceError`` if
    its filesystem is full); a device still in use after ``timeout`` seconds
    of retrying raises :class:`~ganeti_vol.core.errors.BusyError` naming its
    holders.  If the block itself raised, that exception propagates instead
    and the cleanup failure is logged and added as a note.
    """
    path = os.path.abspath(path)
    try:
        backing_fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as err:
        raise E.DeviceError(f"cannot attach '{path}': {err.strerror}") from err
    try:
        st = os.fstat(backing_fd)
        if not stat.S_ISREG(st.st_mode):
            raise E.DeviceError(f"cannot attach '{path}': not a regular file")
        if st.st_size % 512:
            log.warning(
                "%s: size %d is not a multiple of 512; the tail is not visible", path, st.st_size
            )
        _reclaim(path, state_dir, timeout)
        marker = _own_marker(tag)
        flags = LO_FLAGS_AUTOCLEAR | LO_FLAGS_PARTSCAN | (LO_FLAGS_READ_ONLY if read_only else 0)
        record: dict[str, Any] = {}
        with signals.deferred():
            device, loop_fd = _attach(backing_fd, path, marker, flags)
            if state_dir:
                record = {
                    "device": device,
                    "backing_file": path,
                    "backing_dev": st.st_dev,
                    "backing_inode": st.st_ino,
                    "read_only": read_only,
                    "pid": marker.pid,
                    "start_time": marker.start_time,
                    "tag": tag or "",
                    "time": time.time(),
                    "partitions": [],
                    "created_nodes": [],
                }
                try:
                    write_record(state_dir, device, record)
                except OSError as err:
                    teardown(device, loop_fd, timeout=timeout)
                    raise E.DeviceError(
                        f"cannot record loop device '{device}' in '{state_dir}': {err.strerror}"
                    ) from err
    finally:
        os.close(backing_fd)
    log.info("attached %s to %s%s", path, device, " (read-only)" if read_only else "")
    att = LoopAttachment(device, path, read_only, tag or "", st.st_size - st.st_size % 512)
    created: list[str] = []
    raised: BaseException | None = None
    held: int | None = loop_fd
    try:
        if partitions:
            created = _add_partitions(att, loop_fd, state_dir, record)
        if not hold:
            with signals.deferred():
                set_autoclear(loop_fd, False)
                held = None
                os.close(loop_fd)
            log.debug("released %s: the scripts are its only users now", device)
        yield att
    except BaseException as err:
        raised = err
        raise
    finally:
        _finish(att, held, (marker, st), created, state_dir, timeout, raised)


def _reacquire(att: LoopAttachment, owner: tuple[Marker, os.stat_result]) -> int | None:
    """Open a released attachment again; None if it is no longer ours (somebody detached it)."""
    marker, st = owner
    try:
        fd = os.open(att.device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        log.warning("cannot open %s again: %s", att.device, err.strerror)
        return None
    try:
        status = get_status(fd)
        found = Marker.parse(status.file_name) if status else None
        mine = (
            status is not None
            and found is not None
            and (found.pid, found.start_time) == (marker.pid, marker.start_time)
            and (status.backing_dev, status.backing_inode) == (st.st_dev, st.st_ino)
        )
        if mine:
            set_autoclear(fd, True)  # from here on, a crash detaches it again
            return fd
    except OSError as err:
        log.warning("cannot take %s back: %s", att.device, err.strerror)
    os.close(fd)
    log.warning("%s was detached from %s by somebody else", att.device, att.backing_file)
    return None


def _finish(
    att: LoopAttachment,
    loop_fd: int | None,
    owner: tuple[Marker, os.stat_result],
    created: list[str],
    state_dir: str | None,
    timeout: float,
    raised: BaseException | None,
) -> None:
    """The exit half of :func:`attached`; runs with signals deferred."""
    with signals.deferred():
        if loop_fd is None:
            loop_fd = _reacquire(att, owner)
        if loop_fd is None:  # not ours any more: nothing to flush or detach
            result = Teardown()
        else:
            result = teardown_result(att.device, loop_fd, timeout, partitions_only=False)
        if loop_fd is not None or not is_bound(att.device):  # else the nodes are another's
            for node in created:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(node)
        if not result.problems:
            remove_record(state_dir, att.device)
            log.info("detached %s from %s", att.device, att.backing_file)
            return
    if result.lost:
        error = lost_writes_error(att.device, att.backing_file, result.lost)
        if result.busy:
            error.add_note(f"'{att.device}' also: " + "; ".join(result.busy))
    else:
        error = E.BusyError(
            f"cannot detach '{att.device}' ({att.backing_file}): " + "; ".join(result.busy)
        )
    if raised is None:
        raise error
    log.error("%s", error)
    raised.add_note(str(error))


def _reclaim(path: str, state_dir: str | None, timeout: float) -> None:
    """Detach loop devices on ``path`` that a ganeti-vol process which is gone left attached."""
    for device in devices.loop_devices_backed_by(path):
        record = records(state_dir).read_all().get(device_name(device)) if state_dir else None
        for action in reconcile_bound(device, path, record, state_dir or "", False, timeout):
            log.warning("%s: %s %s", device, action.reason, action.error or "(detached)")


# --- block devices for OS scripts ------------------------------------------------------


@contextlib.contextmanager
def block_devices_for(
    instance_disks: Sequence[Any],
    *,
    read_only: bool,
    partitions: bool = True,
    state_dir: str | None = None,
    tag: str | None = None,
    timeout: float = DETACH_TIMEOUT,
    hold: bool = True,
) -> Iterator[dict[int, str]]:
    """Make every disk of an instance a block device for the duration of the block.

    ``instance_disks`` are :class:`~ganeti_vol.core.model.Disk` objects (anything
    with ``.path`` and ``.access``).  File disks are attached as loop devices
    (read-only if ``read_only`` or the disk's access is ``ro``; ``hold`` as
    in :func:`attached`); block devices are passed through unchanged; disks
    without a path are left out.  Yields ``{disk index: device path}``.  All
    loop devices are flushed and detached on exit.
    """
    with contextlib.ExitStack() as stack:
        mapping: dict[int, str] = {}
        for index, disk in enumerate(instance_disks):
            disk_path = getattr(disk, "path", None)
            if not disk_path:
                continue
            try:
                mode = os.stat(disk_path).st_mode
            except OSError as err:
                raise E.DeviceError(
                    f"cannot use disk {index} '{disk_path}': {err.strerror}"
                ) from err
            if stat.S_ISBLK(mode):
                mapping[index] = disk_path
            elif stat.S_ISREG(mode):
                ro = read_only or getattr(disk, "access", "rw") == "ro"
                att = stack.enter_context(
                    attached(
                        disk_path,
                        read_only=ro,
                        partitions=partitions,
                        tag=f"{tag}:disk{index}" if tag else f"disk{index}",
                        state_dir=state_dir,
                        timeout=timeout,
                        hold=hold,
                    )
                )
                mapping[index] = att.device
            else:
                raise E.DeviceError(
                    f"cannot use disk {index} '{disk_path}': not a regular file or block device"
                )
        yield mapping

