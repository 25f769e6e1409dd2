"""Loop devices and partitions: attach, expose partitions, detach and verify, reconcile.

:func:`attached` is the one way ganeti-vol turns a file disk into a block
device.  It talks to the kernel with raw ioctls (``fcntl.ioctl`` + ``struct``):

* ``LOOP_CTL_GET_FREE`` + ``LOOP_CONFIGURE`` (``LOOP_SET_FD`` +
  ``LOOP_SET_STATUS64`` on kernels before 5.8) with the flags
  ``LO_FLAGS_AUTOCLEAR | LO_FLAGS_PARTSCAN`` (+ ``READ_ONLY`` when only read).
  While attached, ganeti-vol holds the loop device open; if the process dies,
  the kernel detaches the device when its last user closes it, and because of
  ``PARTSCAN`` it drops the partitions with it.
* The 64-byte ``lo_file_name`` carries a marker (``ganeti-vol:<pid>:<start>:<tag>``)
  so :func:`cleanup` can tell ganeti-vol's loop devices from anybody else's.
* Kernels without partition-table parsers (like the CI machines) create no
  ``loopNpM``: :mod:`ganeti_vol.system.partitions` parses MBR (primary, extended,
  logical) and GPT (CRC-checked, backup header as fallback) itself, and the
  partitions are added with ``BLKPG_ADD_PARTITION``.
* While an OS script runs (``hold=False``) ganeti-vol lets go of the device
  (autoclear off, its descriptor closed), so the script's last close writes
  back and drops the device's page cache as it does on a real disk: what
  was written through the whole device is then seen through its
  partitions, and the other way round.
* On exit, on every path: write back and drop the caches of the device and
  of each partition (``fsync`` + ``BLKFLSBUF``; a write error is reported,
  never swallowed), delete the partitions (``BLKPG_DEL_PARTITION``,
  retrying while busy), ``LOOP_CLR_FD``, check that nothing was written
  after the flush, close, and *verify* the detach by polling sysfs (it is
  asynchronous).  Lost writes are a :class:`~ganeti_vol.core.errors.DeviceError`
  (:class:`~ganeti_vol.core.errors.NoSpaceError` when the file's filesystem is
  full); what cannot be cleaned up is reported as
  :class:`~ganeti_vol.core.errors.BusyError` naming the device and who holds it.

The library never prints; everything is logged.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import functools
import logging
import os
import stat
import struct
import time
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ganeti_vol.core import errors as E
from ganeti_vol.core import signals
from ganeti_vol.core.lazy import lazy
from ganeti_vol.core.libc import sync_file_range
from ganeti_vol.core.procs import process_alive, process_start_time
from ganeti_vol.core.records import RecordDir, owner_alive
from ganeti_vol.core.retry import retry_busy
from ganeti_vol.system.partitions import PartitionEntry, read_partition_table

log = logging.getLogger(__name__)
#: pyudev is only loaded when a device is looked at (not by every export that uses a helper)
devices = lazy("ganeti_vol.system.devices")

T = TypeVar("T")

# --- linux/loop.h, linux/fs.h, linux/blkpg.h ------------------------------------
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
#: loop-control: add a loop device (a negative number: any unused one); returns its number
LOOP_CTL_ADD = 0x4C80
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_PARTSCAN = 8
LO_NAME_SIZE = 64
#: struct loop_info64
LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32sQQ")
#: struct loop_config: fd, block_size, loop_info64, 8 reserved u64
LOOP_CONFIG = struct.Struct("=II" + LOOP_INFO64.format[1:] + "8Q")

BLKPG = 0x1269
#: linux/fs.h: write back and invalidate a block device's page cache
BLKFLSBUF = 0x1261
BLKPG_ADD_PARTITION = 1
BLKPG_DEL_PARTITION = 2
#: struct blkpg_partition: start, length, pno, devname[64], volname[64] (padded to 8)
BLKPG_PARTITION = struct.Struct("=qqi64s64s4x")
#: struct blkpg_ioctl_arg: op, flags, datalen, void *data
BLKPG_IOCTL_ARG = struct.Struct("@iiiP")

LOOP_CONTROL = "/dev/loop-control"
SYS_BLOCK = "/sys/block"
MARKER_PREFIX = "ganeti-vol:"
RECORD_DIR = "loop"

#: seconds to wait for device nodes to appear
NODE_TIMEOUT = 5.0
#: seconds to keep retrying a busy partition delete / detach before giving up
DETACH_TIMEOUT = 10.0
#: how often LOOP_CONFIGURE may lose the race for a free loop device
ATTACH_RETRIES = 8

def _is_ebusy(err: Exception) -> bool:
    return isinstance(err, OSError) and err.errno == errno.EBUSY


# --- ioctls -----------------------------------------------------------------------


def _blkpg(fd: int, op: int, number: int, start: int = 0, length: int = 0) -> None:
    part = ctypes.create_string_buffer(
        BLKPG_PARTITION.pack(start, length, number, b"", b""), BLKPG_PARTITION.size
    )
    arg = BLKPG_IOCTL_ARG.pack(op, 0, BLKPG_PARTITION.size, ctypes.addressof(part))
    fcntl.ioctl(fd, BLKPG, arg)


def add_partition(fd: int, part: PartitionEntry) -> None:
    """``BLKPG_ADD_PARTITION`` on an open whole-disk fd."""
    _blkpg(fd, BLKPG_ADD_PARTITION, part.number, part.start, part.size)


def delete_partition(fd: int, number: int) -> None:
    """``BLKPG_DEL_PARTITION``; EBUSY while the partition is open or mounted."""
    _blkpg(fd, BLKPG_DEL_PARTITION, number)


@dataclass(frozen=True)
class LoopStatus:
    """The parts of ``struct loop_info64`` ganeti-vol uses."""

    backing_dev: int
    backing_inode: int
    offset: int
    sizelimit: int
    flags: int
    file_name: str

    @property
    def read_only(self) -> bool:
        return bool(self.flags & LO_FLAGS_READ_ONLY)


def get_status(fd: int) -> LoopStatus | None:
    """``LOOP_GET_STATUS64``; None for an unbound loop device."""
    try:
        raw = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64.size))
    except OSError as err:
        if err.errno == errno.ENXIO:
            return None
        raise
    values = LOOP_INFO64.unpack(raw)
    return LoopStatus(
        backing_dev=values[0],
        backing_inode=values[1],
        offset=values[3],
        sizelimit=values[4],
        flags=values[8],
        file_name=values[9].split(b"\0", 1)[0].decode("utf-8", "replace"),
    )


def set_autoclear(fd: int, on: bool) -> None:
    """Turn ``LO_FLAGS_AUTOCLEAR`` on or off, keeping every other setting (marker included)."""
    values = list(LOOP_INFO64.unpack(fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64.size))))
    flags = values[8]
    values[8] = flags | LO_FLAGS_AUTOCLEAR if on else flags & ~LO_FLAGS_AUTOCLEAR
    fcntl.ioctl(fd, LOOP_SET_STATUS64, LOOP_INFO64.pack(*values))


def _info64(flags: int, file_name: bytes) -> tuple[Any, ...]:
    return (0, 0, 0, 0, 0, 0, 0, 0, flags, file_name, b"", b"", 0, 0)


def _configure(loop_fd: int, backing_fd: int, flags: int, marker: bytes) -> None:
    config = LOOP_CONFIG.pack(backing_fd, 0, *_info64(flags, marker), *([0] * 8))
    try:
        fcntl.ioctl(loop_fd, LOOP_CONFIGURE, config)
        return
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
    # kernels before 5.8: two steps (read-only follows the backing fd's mode)
    fcntl.ioctl(loop_fd, LOOP_SET_FD, backing_fd)
    try:
        status = LOOP_INFO64.pack(*_info64(flags & ~LO_FLAGS_READ_ONLY, marker))
        fcntl.ioctl(loop_fd, LOOP_SET_STATUS64, status)
    except OSError:
        fcntl.ioctl(loop_fd, LOOP_CLR_FD)
        raise


# --- sysfs and device nodes ---------------------------------------------------------


def _name(device: str) -> str:
    return os.path.basename(device)


def is_bound(device: str) -> bool:
    """True while a loop device has a backing file (sysfs ``loop/`` exists)."""
    return os.path.exists(os.path.join(SYS_BLOCK, _name(device), "loop", "backing_file"))


def _sysfs_devnum(sys_dir: str) -> int:
    with open(os.path.join(sys_dir, "dev")) as f:
        major, minor = f.read().strip().split(":")
    return os.makedev(int(major), int(minor))


def ensure_node(path: str, devnum: int, timeout: float = NODE_TIMEOUT) -> bool:
    """Wait for the block device node ``path`` (device ``devnum``) to appear.

    devtmpfs normally creates it; if it is missing (or wrong) after half the
    timeout, create it with mknod.  Returns True if this function created it.
    Raises DeviceError if no correct node exists after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    grace = time.monotonic() + timeout / 2
    delay = 0.005
    while True:
        try:
            st = os.stat(path)
            if stat.S_ISBLK(st.st_mode) and st.st_rdev == devnum:
                return False
        except FileNotFoundError:
            st = None
        now = time.monotonic()
        if now >= grace:
            try:
                if st is not None:
                    os.unlink(path)
                os.mknod(path, 0o660 | stat.S_IFBLK, devnum)
                log.info("created device node %s (%d:%d)", path, os.major(devnum), os.minor(devnum))
                return True
            except FileExistsError:
                pass
            except OSError as err:
                if now >= deadline:
                    raise E.DeviceError(
                        f"cannot create device node '{path}': {err.strerror}"
                    ) from err
        if now >= deadline:
            raise E.DeviceError(f"cannot find device node '{path}': it did not appear")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


# --- ownership: marker and records ----------------------------------------------------


@dataclass(frozen=True)
class Marker:
    """Who attached a loop device, as written into ``lo_file_name``."""

    pid: int
    start_time: int
    tag: str

    def encode(self) -> bytes:
        text = f"{MARKER_PREFIX}{self.pid}:{self.start_time}:{self.tag}"
        return text.encode("utf-8")[: LO_NAME_SIZE - 1]

    @classmethod
    def parse(cls, file_name: str) -> Marker | None:
        if not file_name.startswith(MARKER_PREFIX):
            return None
        pid, _, rest = file_name[len(MARKER_PREFIX) :].partition(":")
        start, _, tag = rest.partition(":")
        if not (pid.isdigit() and start.isdigit()):
            return None
        return cls(int(pid), int(start), tag)

    @property
    def alive(self) -> bool:
        return process_alive(self.pid, self.start_time)


def _own_marker(tag: str | None) -> Marker:
    pid = os.getpid()
    return Marker(pid, process_start_time(pid) or 0, tag or "")


def records(state_dir: str) -> RecordDir:
    """The records of the loop devices attached with ``state_dir`` (named like the device)."""
    return RecordDir(os.path.join(state_dir, RECORD_DIR), "loop")


def _write_record(state_dir: str, device: str, record: Mapping[str, Any]) -> None:
    records(state_dir).write(_name(device), record)


def _remove_record(state_dir: str | None, device: str) -> None:
    if state_dir:
        records(state_dir).remove(_name(device))


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
    """What :func:`_teardown` could not do: writes that were lost, and what stayed busy."""

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
        with open(os.path.join(SYS_BLOCK, _name(device), "loop", "backing_file")) as f:
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


def _teardown(device: str, fd: int | None, timeout: float, partitions_only: bool) -> Teardown:
    """See :func:`teardown`."""
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
    return _teardown(device, fd, timeout, partitions_only).problems


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
            ensure_node(device, _sysfs_devnum(os.path.join(SYS_BLOCK, f"loop{number}")))
            loop_fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            try:
                _configure(loop_fd, backing_fd, flags, marker.encode())
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
        _write_record(state_dir, att.device, record)
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
    record so :func:`cleanup` can reconcile after a crash.  Loop devices on
    the same file that a killed ganeti-vol left behind are detached first.

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
                    _write_record(state_dir, device, record)
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
            result = _teardown(att.device, loop_fd, timeout, partitions_only=False)
        if loop_fd is not None or not is_bound(att.device):  # else the nodes are another's
            for node in created:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(node)
        if not result.problems:
            _remove_record(state_dir, att.device)
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
        record = records(state_dir).read_all().get(_name(device)) if state_dir else None
        for action in _reconcile_bound(device, path, record, state_dir or "", False, timeout):
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
        name = _name(device)
        record = recorded.pop(name, None)
        if backing and prefix and record is None and not backing.startswith(prefix):
            continue
        if backing:
            actions.extend(_reconcile_bound(device, backing, record, state_dir, dry_run, timeout))
        elif devices.partition_devices(device) and record is not None:
            actions.extend(_reconcile_unbound(device, record, state_dir, dry_run, timeout))
        elif record is not None:
            actions.append(_forget(device, "not attached any more", state_dir, dry_run))
    for name in recorded:
        actions.append(_forget(f"/dev/{name}", "loop device does not exist", state_dir, dry_run))
    return actions


def _forget(device: str, reason: str, state_dir: str, dry_run: bool) -> CleanupAction:
    if not dry_run:
        _remove_record(state_dir, device)
    return CleanupAction(device, "forget-record", reason, not dry_run)


def _reconcile_bound(
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
        _remove_record(state_dir, device)
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
        _remove_record(state_dir, device)
    return [CleanupAction(device, "delete-partitions", reason, not problems, "; ".join(problems))]
