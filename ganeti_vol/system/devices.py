"""Facts about disks: regular files and block devices.  The only module importing pyudev.

:func:`describe` resolves a disk path to a frozen :class:`DeviceFacts`:
what kind of disk it is, its size in bytes, device number, read-only flag,
logical block size, holders and partitions (from sysfs), where it (or a
partition of it, or a loop device backed by it) is mounted, and the backing
file of a loop device.  :func:`check_import_target` refuses a target an
import must not write to, and :func:`open_block_device` opens a block device
with ``O_EXCL`` so nobody else can claim it at the same time.

pyudev reads sysfs through libudev; it needs no udev daemon (this module never
waits for udev events and never uses ``/dev/disk/by-*``).  Its exceptions are
translated to :class:`~ganeti_vol.core.errors.DeviceError` here.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pyudev

from ganeti_vol.core import errors as E

log = logging.getLogger(__name__)

#: the sysfs ``size`` attribute counts 512-byte sectors whatever the block size
SYSFS_SECTOR = 512
LOOP_MAJOR = 7
MOUNTINFO = "/proc/self/mountinfo"

KIND_FILE = "file"
KIND_BLOCK = "block"
KIND_LOOP = "loop"
KIND_PARTITION = "partition"


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo`` that concerns a disk."""

    mount_point: str
    fstype: str
    source: str
    #: the device that is mounted ("7:0"), which may be a partition or loop device of the disk
    device: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class DeviceFacts:
    """What ganeti-vol knows about one disk path (sizes in bytes)."""

    path: str
    #: the path with symlinks resolved
    resolved: str
    kind: str  # file | block | loop | partition
    size: int
    #: "major:minor", or "" for a regular file
    devnum: str
    read_only: bool
    #: logical block size in bytes; 0 for a regular file
    logical_block_size: int
    #: /dev paths of devices stacked on this one (sysfs ``holders``)
    holders: tuple[str, ...] = ()
    #: /dev paths of this disk's partitions
    partitions: tuple[str, ...] = ()
    mounts: tuple[Mount, ...] = ()
    #: for a loop device (or a partition of one): the file behind it
    backing_file: str | None = None
    #: for a regular file: the loop devices it is attached to
    loop_devices: tuple[str, ...] = ()
    #: for a partition: the whole disk
    parent: str | None = None

    @property
    def is_block(self) -> bool:
        return self.kind != KIND_FILE

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["mounts"] = [m.to_json() for m in self.mounts]
        for key in ("holders", "partitions", "loop_devices"):
            out[key] = list(out[key])
        return out


# --- mountinfo ----------------------------------------------------------------


def _unescape(field: str) -> str:
    """Undo the octal escapes (``\\040`` for a space) of mountinfo fields."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse the text of ``/proc/<pid>/mountinfo`` (see proc(5))."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 6 or len(fields) < sep + 3:
            continue
        mounts.append(
            Mount(
                mount_point=_unescape(fields[4]),
                fstype=fields[sep + 1],
                source=_unescape(fields[sep + 2]),
                device=fields[2],
            )
        )
    return mounts


def read_mounts(path: str = MOUNTINFO) -> list[Mount]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def _mount_devnum(mount: Mount) -> str | None:
    """The device number behind a mount's source, when the source is a block device.

    btrfs reports an anonymous ``0:N`` in the major:minor field, so the source
    device is asked too.
    """
    if mount.source.startswith("/"):
        try:
            st = os.stat(mount.source)
        except OSError:
            return None
        if stat.S_ISBLK(st.st_mode):
            return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return None


def mounts_of(devnums: set[str], mounts: list[Mount] | None = None) -> tuple[Mount, ...]:
    """The mounts whose device is one of ``devnums`` ("major:minor" strings)."""
    if not devnums:
        return ()
    if mounts is None:
        mounts = read_mounts()
    return tuple(m for m in mounts if m.device in devnums or _mount_devnum(m) in devnums)


# --- pyudev -------------------------------------------------------------------


_context: pyudev.Context | None = None


def _udev() -> pyudev.Context:
    global _context
    if _context is None:
        try:
            _context = pyudev.Context()
        except (pyudev.DeviceError, OSError, ImportError) as err:
            raise E.DeviceError(f"cannot use libudev: {err}") from err
    return _context


def _device_from_number(what: str, rdev: int) -> pyudev.Device:
    try:
        return pyudev.Devices.from_device_number(_udev(), "block", rdev)
    except (pyudev.DeviceError, OSError, ValueError) as err:
        raise E.DeviceError(
            f"cannot describe '{what}': block device "
            f"{os.major(rdev)}:{os.minor(rdev)} is not known to udev ({err})"
        ) from err


def _attr_str(device: pyudev.Device, name: str) -> str | None:
    try:
        value = device.attributes.get(name)
    except (pyudev.DeviceError, OSError):
        return None
    if not isinstance(value, bytes):
        return None
    return value.decode("utf-8", "surrogateescape").strip()


def _attr_int(device: pyudev.Device, name: str, default: int = 0) -> int:
    value = _attr_str(device, name)
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _dev_path(device: pyudev.Device) -> str:
    return device.device_node or os.path.join("/dev", device.sys_name)


def _devnum_str(device: pyudev.Device) -> str:
    number = device.device_number
    return f"{os.major(number)}:{os.minor(number)}"


def _holders(device: pyudev.Device) -> tuple[str, ...]:
    try:
        names = sorted(os.listdir(os.path.join(device.sys_path, "holders")))
    except OSError:
        return ()
    return tuple(os.path.join("/dev", name) for name in names)


def _partitions(device: pyudev.Device) -> list[pyudev.Device]:
    parts = [
        child
        for child in device.children
        if child.subsystem == "block" and child.device_type == "partition"
    ]
    return sorted(parts, key=lambda d: _attr_int(d, "partition"))


def _backing_file(device: pyudev.Device) -> str | None:
    value = _attr_str(device, "loop/backing_file")
    return value or None


def _is_loop(device: pyudev.Device) -> bool:
    return os.major(device.device_number) == LOOP_MAJOR and device.device_type == "disk"


def loop_devices_backed_by(path: str) -> tuple[str, ...]:
    """The loop devices whose backing file is ``path`` (compared after resolving links)."""
    wanted = os.path.realpath(path)
    return tuple(
        device
        for device, backing in iter_loop_devices()
        if backing and os.path.realpath(backing) == wanted
    )


def _natural_key(path: str) -> tuple[str, int]:
    stem = path.rstrip("0123456789")
    tail = path[len(stem) :]
    return stem, int(tail) if tail else -1


# --- describe -----------------------------------------------------------------


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise E.DeviceError(f"cannot describe '{path}': no such file or device") from None
    except OSError as err:
        raise E.DeviceError(f"cannot describe '{path}': {err.strerror}") from err


def _file_read_only(path: str) -> bool:
    try:
        readonly_fs = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        readonly_fs = False
    return readonly_fs or not os.access(path, os.W_OK)


def _describe_file(path: str, st: os.stat_result) -> DeviceFacts:
    loops = loop_devices_backed_by(path)
    devnums: set[str] = set()
    holders: list[str] = []
    for loop in loops:
        device = _device_from_number(loop, os.stat(loop).st_rdev)
        devnums.add(_devnum_str(device))
        devnums.update(_devnum_str(p) for p in _partitions(device))
        holders.extend(_holders(device))
    return DeviceFacts(
        path=path,
        resolved=os.path.realpath(path),
        kind=KIND_FILE,
        size=st.st_size,
        devnum="",
        read_only=_file_read_only(path),
        logical_block_size=0,
        holders=tuple(holders),
        mounts=mounts_of(devnums),
        loop_devices=loops,
    )


def _describe_block(path: str, st: os.stat_result) -> DeviceFacts:
    device = _device_from_number(path, st.st_rdev)
    is_partition = device.device_type == "partition"
    disk = device.parent if is_partition else device
    if disk is None:  # pragma: no cover - sysfs always has the whole disk
        raise E.DeviceError(f"cannot describe '{path}': partition without a disk")
    parts = [] if is_partition else _partitions(device)
    devnums = {_devnum_str(device)} | {_devnum_str(p) for p in parts}
    holders = list(_holders(device))
    for part in parts:
        holders.extend(_holders(part))
    if is_partition:
        kind = KIND_PARTITION
    elif _is_loop(device):
        kind = KIND_LOOP
    else:
        kind = KIND_BLOCK
    return DeviceFacts(
        path=path,
        resolved=os.path.realpath(path),
        kind=kind,
        size=_attr_int(device, "size") * SYSFS_SECTOR,
        devnum=_devnum_str(device),
        read_only=_attr_int(device, "ro") == 1 or _attr_int(disk, "ro") == 1,
        logical_block_size=_attr_int(disk, "queue/logical_block_size", SYSFS_SECTOR),
        holders=tuple(holders),
        partitions=tuple(_dev_path(p) for p in parts),
        mounts=mounts_of(devnums),
        backing_file=_backing_file(disk) if _is_loop(disk) else None,
        parent=_dev_path(disk) if is_partition else None,
    )


def describe(path: str) -> DeviceFacts:
    """Resolve a disk path (regular file or block device) to its facts."""
    path = os.path.abspath(path)
    st = _stat(path)
    if stat.S_ISREG(st.st_mode):
        return _describe_file(path, st)
    if stat.S_ISBLK(st.st_mode):
        return _describe_block(path, st)
    raise E.DeviceError(f"cannot describe '{path}': not a regular file or block device")


def partition_devices(path: str) -> list[tuple[int, str, str]]:
    """``(number, /dev path, "major:minor")`` of each partition sysfs shows for a disk."""
    device = _device_from_number(path, _stat(path).st_rdev)
    return [(_attr_int(p, "partition"), _dev_path(p), _devnum_str(p)) for p in _partitions(device)]


def partition_paths(device: str) -> frozenset[str]:
    """``/dev`` paths of the partitions sysfs lists below the disk ``device`` (by name).

    Read from sysfs directly, without udev's enumeration of children (~1 ms
    per call): the conformance runner asks this of every loop device before
    and after every step.  A device that does not exist has none.
    """
    sys_dir = os.path.join("/sys/class/block", os.path.basename(device))
    try:
        names = os.listdir(sys_dir)
    except OSError:
        return frozenset()
    return frozenset(os.path.join("/dev", name) for name in names
                     if os.path.exists(os.path.join(sys_dir, name, "partition")))


def partition_geometry(partition: str) -> tuple[int, int] | None:
    """(start, size) in bytes of a partition device, from sysfs (None if it is gone)."""
    sys_dir = os.path.join("/sys/class/block", os.path.basename(partition))
    try:
        with open(os.path.join(sys_dir, "start")) as f:
            start = int(f.read())
        with open(os.path.join(sys_dir, "size")) as f:
            size = int(f.read())
    except (OSError, ValueError):
        return None
    return start * SYSFS_SECTOR, size * SYSFS_SECTOR


def iter_loop_devices() -> Iterator[tuple[str, str | None]]:
    """``(/dev path, backing file or None)`` of every loop device sysfs knows."""
    try:
        devices = list(_udev().list_devices(subsystem="block", DEVTYPE="disk"))
    except (pyudev.DeviceError, OSError) as err:
        raise E.DeviceError(f"cannot list block devices: {err}") from err
    for device in sorted(devices, key=lambda d: _natural_key(d.sys_name)):
        if device.sys_name.startswith("loop") and _is_loop(device):
            yield _dev_path(device), _backing_file(device)


def openers(devnums: Sequence[int]) -> list[str]:
    """``"pid N (comm)"`` for each process holding one of the block devices open."""
    wanted = set(devnums)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode) and st.st_rdev in wanted:
                try:
                    with open(f"/proc/{entry}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    comm = "?"
                found.append(f"pid {entry} ({comm})")
                break
    return found


# --- import targets -----------------------------------------------------------


def import_target_refusal(facts: DeviceFacts, min_size: int) -> str | None:
    """Why a disk with these facts must not be written by an import (None: it may)."""
    if facts.mounts:
        mount = facts.mounts[0]
        via = "" if mount.source == facts.path else f" (as {mount.source})"
        return f"it is mounted at '{mount.mount_point}'{via}"
    if facts.holders:
        return f"it is held by {', '.join(facts.holders)}"
    if facts.read_only:
        return "it is read-only"
    if facts.size < min_size:
        return f"too small: {facts.size} < {min_size} bytes"
    return None


def check_import_target(path: str, min_size: int) -> DeviceFacts:
    """Refuse an import target that is mounted, held, read-only or too small.

    Returns the target's facts when it can be written.  Each refusal is a
    :class:`~ganeti_vol.core.errors.DeviceError` naming the cause.  (Another
    process claiming the device later is caught by :func:`open_block_device`.)
    """
    facts = describe(path)
    cause = import_target_refusal(facts, min_size)
    if cause is None and facts.is_block:
        cause = _exclusive_user(facts.path)
    if cause:
        raise E.DeviceError(f"cannot import into '{facts.path}': {cause}")
    return facts


def _exclusive_user(path: str) -> str | None:
    """Probe a block device with a short O_EXCL open: who has claimed it, if anybody."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as err:
        if err.errno != errno.EBUSY:
            return None  # open_block_device() will report it
        users = openers([os.stat(path).st_rdev])
        return "it is in use" + (f" by {', '.join(users)}" if users else " (claimed exclusively)")
    os.close(fd)
    return None


def open_block_device(path: str, write: bool = True) -> io.FileIO:
    """Open a disk unbuffered; a block device is opened ``O_EXCL`` (claimed).

    Another exclusive user (a mounted filesystem, a stacked device, another
    import) makes this fail with :class:`~ganeti_vol.core.errors.BusyError`.
    Regular files are opened normally.  Use it as a context manager.
    """
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC
    st = _stat(path)
    if stat.S_ISBLK(st.st_mode):
        flags |= os.O_EXCL
    elif not stat.S_ISREG(st.st_mode):
        raise E.DeviceError(f"cannot open '{path}': not a regular file or block device")
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.EBUSY:
            raise E.BusyError(
                f"cannot open '{path}': device is in use (mounted, held or opened exclusively)"
            ) from err
        raise E.DeviceError(f"cannot open '{path}': {err.strerror}") from err
    return io.FileIO(fd, "r+b" if write else "rb", closefd=True)
