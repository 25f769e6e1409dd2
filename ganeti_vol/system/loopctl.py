"""The kernel interface of loop devices: ioctls, sysfs, device nodes, ownership marker, records.

Raw ``fcntl.ioctl`` + ``struct`` calls (``linux/loop.h``, ``linux/fs.h``,
``linux/blkpg.h``); the 64-byte ``lo_file_name`` carries a :class:`Marker`
(``ganeti-vol:<pid>:<start>:<tag>``) so ganeti-vol's loop devices can be told
from anybody else's.  :mod:`ganeti_vol.system.loopdev` attaches with these.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ganeti_vol.core import errors as E
from ganeti_vol.core.procs import process_alive
from ganeti_vol.core.records import RecordDir
from ganeti_vol.system.partitions import PartitionEntry

log = logging.getLogger(__name__)

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
#: how often LOOP_CONFIGURE may lose the race for a free loop device
ATTACH_RETRIES = 8


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


def configure(loop_fd: int, backing_fd: int, flags: int, marker: bytes) -> None:
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


def device_name(device: str) -> str:
    return os.path.basename(device)


def is_bound(device: str) -> bool:
    """True while a loop device has a backing file (sysfs ``loop/`` exists)."""
    return os.path.exists(os.path.join(SYS_BLOCK, device_name(device), "loop", "backing_file"))


def sysfs_devnum(sys_dir: str) -> int:
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



def records(state_dir: str) -> RecordDir:
    """The records of the loop devices attached with ``state_dir`` (named like the device)."""
    return RecordDir(os.path.join(state_dir, RECORD_DIR), "loop")


def write_record(state_dir: str, device: str, record: Mapping[str, Any]) -> None:
    records(state_dir).write(device_name(device), record)


def remove_record(state_dir: str | None, device: str) -> None:
    if state_dir:
        records(state_dir).remove(device_name(device))

