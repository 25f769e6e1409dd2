"""Disks for OS scripts: ``EXP_SIZE_FD``, raw export and import, images, and a file disk as
a block device with its partitions."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from ganeti_vol.core import errors as E
from ganeti_vol.engine import rawio
from ganeti_vol.osapi.osenv import OSEnv
from ganeti_vol.system import devices, loopdev

log = logging.getLogger(__name__)



# --- EXP_SIZE_FD, export and import -----------------------------------------------------


def announce_size(size: int, environ: Mapping[str, str] | None = None) -> bool:
    """Write ``size`` on ``EXP_SIZE_FD`` if it is set; True if it was.

    Works for any fd number (a shell needs bash for fds above 9).
    """
    fd = rawio.size_fd_from_env(environ)
    if fd is None:
        return False
    rawio.announce_size(size, fd)
    return True


def export_disk(env: OSEnv, out_fd: int = 1) -> rawio.CopySummary:
    """Write the export disk raw to ``out_fd`` (stdout), announcing its size first."""
    disk = env.transfer_disk("export")
    return rawio.dump(disk.device, out_fd, environ=env.raw)


def import_disk(
    env: OSEnv, in_fd: int = 0, *, known_zero: bool | None = None, verify: bool = False
) -> rawio.CopySummary:
    """Write the raw disk read from ``in_fd`` (stdin) into the import disk; never truncates.

    ``verify``: read it back from the disk and compare (``restore --verify``).
    """
    disk = env.transfer_disk("import")
    return rawio.restore(in_fd, disk.device, known_zero=known_zero, verify=verify)


def restore_stream(
    in_fd: int,
    disk_path: str,
    *,
    known_zero: bool | None = None,
    size: int | None = None,
    verify: bool = False,
) -> rawio.CopySummary:
    """Write everything read from ``in_fd`` (a pipe, e.g. a decompressor's stdout) into
    the existing disk ``disk_path``: never truncated, zero runs skipped on a zero
    target, an input larger than the disk stopped at the first byte past its end."""
    return rawio.restore(in_fd, disk_path, known_zero=known_zero, size=size, verify=verify)


def copy_image(
    image: str, disk_path: str, *, known_zero: bool | None = None, verify: bool = False
) -> rawio.CopySummary:
    """Copy a raw image file into a disk: holes skipped, zero runs skipped on a zero
    target, an image larger than the disk refused, the disk never truncated.
    ``verify``: read it back from the disk and compare."""
    return rawio.copy_image(image, disk_path, known_zero=known_zero, verify=verify)


def sha256_file(path: str) -> str:
    """The hex sha256 of a file."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as err:
        raise E.UsageError(f"cannot read '{path}': {err.strerror}") from err


# --- block devices ---------------------------------------------------------------------


@dataclass(frozen=True)
class BlockDevice:
    """A disk as a block device (yielded by :func:`block_device`)."""

    device: str
    #: /dev paths of its partitions, in partition-number order
    partitions: tuple[str, ...]
    #: True if it is a loop device attached for the duration of the block
    attached: bool

    def partition(self, number: int) -> str:
        """The /dev path of partition ``number`` (1-based)."""
        if not 1 <= number <= len(self.partitions):
            raise E.DeviceError(
                f"'{self.device}' has no partition {number} (it has {len(self.partitions)})"
            )
        return self.partitions[number - 1]


@contextlib.contextmanager
def block_device(
    path: str, *, read_only: bool = False, partitions: bool = True, tag: str | None = None
) -> Iterator[BlockDevice]:
    """The disk ``path`` as a block device with its partitions, for the ``with`` block.

    A file disk is attached as a loop device (partitions added from its MBR or
    GPT even on kernels without partition parsers) and detached on exit, on
    every path; a block device is used as it is.  Use it with
    ``script.cleanup.enter_context(osapi.block_device(path))``.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise E.DeviceError(f"cannot use disk '{path}': {err.strerror}") from err
    if stat.S_ISBLK(mode):
        parts = tuple(p for _, p, _ in devices.partition_devices(path)) if partitions else ()
        yield BlockDevice(path, parts, False)
        return
    # hold=False: the script's own programs (mkfs, mount, dd) are the device's only users,
    # so each last close writes the cache back and the disk and partition nodes agree
    with loopdev.attached(path, read_only=read_only, partitions=partitions, tag=tag,
                          hold=False) as att:
        yield BlockDevice(att.device, tuple(att.partitions), True)
