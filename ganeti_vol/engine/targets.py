"""Where an import's verified bytes go: a raw disk, an import script's stdin, nowhere.

:meth:`~ganeti_vol.engine.parallel.Engine.decode` writes each chunk, in
order, to a :class:`Target`; a target that can be read back
(:class:`RawTarget`) is verified after the writes are durable.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import threading
from collections.abc import Callable
from typing import Protocol

from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import (
    Buffer,
    PipeWriter,
    close_fd,
    enlarge_pipe,
    fadvise,
    io_error,
    pread_full,
    pwrite_all,
)
from ganeti_vol.core.holes import Runs, all_hole, zero_bytes
from ganeti_vol.core.libc import punch_hole
from ganeti_vol.engine.writers import DirectWriter, Writeback

log = logging.getLogger(__name__)

#: linux/fs.h: zero a range of a block device
BLKZEROOUT = 0x127F


class Writable(Protocol):
    """What :func:`write_runs` writes to (a :class:`Target`, or a restore's disk writer)."""

    def write(self, offset: int, data: Buffer) -> None: ...
    def write_zero(self, offset: int, length: int) -> None: ...


def write_runs(target: Writable, offset: int, data: Buffer, length: int, runs: Runs) -> int:
    """Write the ``[start, end)`` data runs of a ``length``-byte chunk at ``offset``, and the
    gaps between them as zeros (:meth:`Writable.write_zero`); the bytes written as data."""
    pos = written = 0
    mv = memoryview(data)
    for a, b in runs:
        if a > pos:
            target.write_zero(offset + pos, a - pos)
        target.write(offset + a, mv[a:b])
        written += b - a
        pos = b
    if pos < length:
        target.write_zero(offset + pos, length - pos)
    return written


class Target:
    """Where :meth:`Engine.decode` writes verified bytes; subclasses override what they need."""

    #: True if the engine should read the data back and verify it after ``finish``
    can_read_back = False
    #: > 0: zero runs of this granularity inside data chunks may be skipped (write_zero)
    sparse_granule = 0
    #: True if :meth:`read_into` wants page-aligned buffers (O_DIRECT)
    aligned_reads = False
    what = "disk"

    def begin(
        self,
        required: int | None,
        chunk_size: int,
        what: str,
        cancel: threading.Event | None,
        activity: Callable[[], None] | None = None,
    ) -> None:
        """Called once before the first write; ``required``: the least target size."""
        self.what, self.cancel, self.activity = what, cancel, activity
        self.open(required, chunk_size)

    def open(self, required: int | None, chunk_size: int) -> None:
        """Take the target (subclasses); ``self.what``/``cancel``/``activity`` are set."""

    def write(self, offset: int, data: Buffer) -> None:
        raise E.ProgrammerError(f"{type(self).__name__} does not implement write")

    def write_zero(self, offset: int, length: int) -> None:
        self.write(offset, zero_bytes(length))

    def finish(self) -> None:
        """Everything was written: make it durable."""

    def read_into(self, offset: int, mv: memoryview) -> int:
        raise E.ProgrammerError(f"{type(self).__name__} cannot be read back")

    def close(self) -> None:
        """Release what ``begin`` took (after success)."""

    def abort(self) -> None:
        self.close()

    def broken_note(self) -> str:
        """After a failure: what the user must know about the target ("" if untouched)."""
        return ""


class NullTarget(Target):
    """Discards everything (``backup verify`` re-hashes every chunk through it)."""

    def write(self, offset: int, data: Buffer) -> None:
        pass

    def write_zero(self, offset: int, length: int) -> None:
        pass


class StreamTarget(Target):
    """Writes every byte in order to ``fd`` (an import script's stdin); fd is not closed."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.out: PipeWriter | None = None
        self.written = 0

    def open(self, required: int | None, chunk_size: int) -> None:
        self.what = f"{self.what} to the import script"
        enlarge_pipe(self.fd)
        self.out = PipeWriter(self.fd, self.what, self.cancel, self.activity)

    def write(self, offset: int, data: Buffer) -> None:
        assert self.out is not None
        self.out.write(data)
        self.written += len(data)

    def write_zero(self, offset: int, length: int) -> None:
        assert self.out is not None
        self.out.write_zeros(length)
        self.written += length

    def close(self) -> None:
        self.out = None

    def broken_note(self) -> str:
        if not self.written:
            return ""
        return f"the import script got only the first {self.written} bytes: the disk is broken"


class RawTarget(Target):
    """Writes a disk directly: a block device or an existing file (never truncated).

    ``known_zero``: the target reads as zeros already (a fresh sparse file or
    thin volume), so zero chunks and zero 64 KiB granules are skipped.  A file
    that is one single hole is detected as known zero too (after an fsync,
    ``SEEK_DATA`` finds no data; the read-back would catch a lie).  Otherwise
    zero runs become
    ``BLKZEROOUT`` (block device) or ``fallocate(PUNCH_HOLE|KEEP_SIZE)``
    (file), falling back to writing zeros.  A target smaller than the disk is
    refused.  ``finish`` fsyncs and drops the cached pages, so the engine's
    read-back comes from the device.
    """

    can_read_back = True
    #: zero granules skipped inside data chunks of a known-zero target (its extents are
    #: this fine: the mixed test image's holes are 64 KiB-granular)
    SPARSE_GRANULE = 64 << 10

    def __init__(self, path: str, known_zero: bool = False) -> None:
        self.path = path
        self.known_zero = known_zero
        self.sparse_granule = self.SPARSE_GRANULE if known_zero else 0
        self.writeback: Writeback | None = None
        #: O_DIRECT fd for the read-back (None: buffered reads after dropping the cache)
        self.direct_fd: int | None = None
        #: background O_DIRECT writes of whole aligned pieces
        self.direct: DirectWriter | None = None
        self.aligned_reads = True
        self.fd: int | None = None
        self.size = 0
        self.is_block = False
        self.what = f"'{path}'"
        self.touched = False
        self.skipped_bytes = 0
        self._zero_start = 0
        self._zero_len = 0

    def open(self, required: int | None, chunk_size: int) -> None:
        what = self.what
        self.what = f"{what} to '{self.path}'"
        try:
            st = os.stat(self.path)
            self.is_block = stat.S_ISBLK(st.st_mode)
            if not (self.is_block or stat.S_ISREG(st.st_mode)):
                raise E.DeviceError(
                    f"cannot import {what} into '{self.path}': not a file or block device"
                )
            flags = os.O_RDWR | os.O_CLOEXEC | (os.O_EXCL if self.is_block else 0)
            self.fd = os.open(self.path, flags)
        except OSError as err:
            raise E.DeviceError(
                f"cannot import {what} into '{self.path}': {err.strerror or err}"
            ) from err
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.writeback = Writeback(self.fd)
        self._open_direct(chunk_size)
        if not self.known_zero and not self.is_block and all_hole(self.fd, sync=True):
            log.debug("%s: the target file is one hole: known to be zero", self.what)
            self.known_zero = True
            self.sparse_granule = self.SPARSE_GRANULE
        if required is not None and self.size < required:
            self.close()
            raise E.DeviceError(
                f"cannot import {what} into '{self.path}': the target has {self.size} bytes, "
                f"fewer than the disk's {required}"
            )

    def _open_direct(self, chunk_size: int) -> None:
        """O_DIRECT for whole aligned writes: no page cache to fill (and flush) on the way."""
        try:
            self.direct = DirectWriter(self.path, self.what, chunk_size)
        except OSError as err:
            log.debug("%s: no O_DIRECT writes (%s)", self.what, err.strerror)

    def _write_direct(self, offset: int, data: Buffer) -> bool:
        n = len(data)
        if self.direct is None or offset % 4096 or n % 4096 or n > self.direct.size:
            return False
        buf = self.direct.buffer()
        buf[:n] = data
        self.direct.submit(buf, n, offset)
        return True

    def _check_bounds(self, offset: int, length: int) -> None:
        if offset + length > self.size:
            raise E.DeviceError(
                f"cannot write {self.what}: offset {offset + length} is past the end of the "
                f"target ({self.size} bytes)"
            )

    def write(self, offset: int, data: Buffer) -> None:
        assert self.fd is not None
        self._check_bounds(offset, len(data))
        self._flush_zero()
        self.touched = True
        if self._write_direct(offset, data):
            return
        pwrite_all(self.fd, data, offset, self.what)
        assert self.writeback is not None
        self.writeback.written(offset + len(data))

    def write_zero(self, offset: int, length: int) -> None:
        self._check_bounds(offset, length)
        if self.known_zero:
            self.skipped_bytes += length
            return
        if self._zero_len and self._zero_start + self._zero_len == offset:
            self._zero_len += length
            return
        self._flush_zero()
        self._zero_start, self._zero_len = offset, length

    def _flush_zero(self) -> None:
        offset, length = self._zero_start, self._zero_len
        if not length:
            return
        assert self.fd is not None
        self._zero_len = 0
        self.touched = True
        if self.is_block:
            aligned = length - length % 512 if offset % 512 == 0 else 0
            if aligned and blkzeroout(self.fd, offset, aligned):
                offset, length = offset + aligned, length - aligned
        elif punch_hole(self.fd, offset, length):
            return
        for pos in range(offset, offset + length, 4 << 20):
            n = min(4 << 20, offset + length - pos)
            pwrite_all(self.fd, zero_bytes(n), pos, self.what)

    def finish(self) -> None:
        assert self.fd is not None
        self._flush_zero()
        if self.direct is not None:
            self.direct.drain()
        try:
            os.fsync(self.fd)
        except OSError as err:
            raise io_error("flush", self.what, err) from err
        fadvise(self.fd, os.POSIX_FADV_DONTNEED)
        try:  # read back from the device itself, not from (freshly refilled) page cache
            self.direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as err:
            log.debug("%s: no O_DIRECT read-back (%s)", self.what, err.strerror)

    def read_into(self, offset: int, mv: memoryview) -> int:
        """Read back for verification after :meth:`finish`; the bytes read.

        Whole 4 KiB blocks are read with ``O_DIRECT`` (``mv`` must then be
        page-aligned, e.g. a slice from the start of an mmap) so they come
        from the device, not from the page cache; an unaligned tail, or
        everything where ``O_DIRECT`` is refused, is read buffered (after
        :meth:`finish` dropped the cached pages).
        """
        assert self.fd is not None
        length = len(mv)
        head = length - length % 4096 if offset % 4096 == 0 else 0
        done = self._read_direct(offset, mv[:head]) if head else 0
        if done < head:
            return done
        if done < length:
            done += pread_full(self.fd, mv[done:], offset + done, f"back {self.what}")
        return done

    def _read_direct(self, offset: int, mv: memoryview) -> int:
        assert self.fd is not None
        if self.direct_fd is not None:
            try:
                return pread_full(self.direct_fd, mv, offset, f"back {self.what}")
            except E.StreamError as err:
                if not isinstance(err.__cause__, OSError) or err.__cause__.errno != errno.EINVAL:
                    raise
                log.debug("%s: O_DIRECT read refused, reading buffered", self.what)
                close_fd(self.direct_fd)
                self.direct_fd = None
        return pread_full(self.fd, mv, offset, f"back {self.what}")

    def close(self) -> None:
        if self.fd is not None:
            fadvise(self.fd, os.POSIX_FADV_DONTNEED)
        self.abort()

    def abort(self) -> None:
        if self.direct is not None:
            self.direct.close()
            self.direct = None
        for fd in (self.direct_fd, self.fd):
            close_fd(fd)
        self.fd = self.direct_fd = None

    def broken_note(self) -> str:
        if not self.touched:
            return ""
        return f"'{self.path}' holds partial or wrong data and must not be used (broken)"


def blkzeroout(fd: int, offset: int, length: int) -> bool:
    """``BLKZEROOUT`` on a block device: the range reads as zeros; False if refused."""
    try:
        fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))
    except OSError as err:
        log.debug("BLKZEROOUT failed (%s): writing zeros", err)
        return False
    return True
