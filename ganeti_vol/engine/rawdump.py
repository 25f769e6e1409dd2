"""Raw dump: a file disk or block device to a file descriptor, holes as zeros never read.

See :mod:`ganeti_vol.engine.rawio` for how (``splice``/``sendfile``,
``O_DIRECT`` reads of block devices, ``vmsplice`` of zeros).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat
import time
from collections.abc import Mapping

from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import (
    enlarge_pipe,
    fadvise,
    fd_size,
    io_error,
    open_readonly,
    pread_full,
    wait_fd,
    write_all,
)
from ganeti_vol.core.holes import extents, settle
from ganeti_vol.core.libc import PIPE_SIZE, vmsplice_zeros
from ganeti_vol.engine.rawdisk import (
    CHUNK,
    CopySummary,
    announce_size,
    size_fd_from_env,
)

log = logging.getLogger(__name__)

#: bytes per sendfile call into a pipe (the enlarged pipe's size)
PIPE_STEP = PIPE_SIZE
#: bytes per sendfile call into anything else
FILE_STEP = 8 << 20


# --- zeros into an output fd -------------------------------------------------------------


class ZeroWriter:
    """Emits runs of zeros into ``out_fd`` as cheaply as its kind allows (see module doc)."""

    def __init__(self, out_fd: int, what: str) -> None:
        self.fd = out_fd
        self.what = what
        st = os.fstat(out_fd)
        self._seek_end: int | None = None
        self._vmsplice = stat.S_ISFIFO(st.st_mode)
        if stat.S_ISREG(st.st_mode) and not fcntl.fcntl(out_fd, fcntl.F_GETFL) & os.O_APPEND:
            pos = os.lseek(out_fd, 0, os.SEEK_CUR)
            if pos >= st.st_size:  # everything we would write over reads as zero already
                self._seek_end = pos
        self._zeros = bytes(PIPE_STEP)

    def write(self, length: int) -> None:
        if self._seek_end is not None:
            self._seek_end = os.lseek(self.fd, length, os.SEEK_CUR)
            return
        while length > 0:
            step = min(length, PIPE_STEP)
            n = self._splice(step) if self._vmsplice else 0
            if n == 0:
                write_all(self.fd, memoryview(self._zeros)[:step], None, self.what)
                n = step
            length -= n

    def _splice(self, length: int) -> int:
        while True:
            try:
                return vmsplice_zeros(self.fd, length)
            except BlockingIOError:  # somebody made the pipe non-blocking
                wait_fd(self.fd, True, None, self.what)
            except BrokenPipeError:
                raise
            except (OSError, AttributeError) as err:
                log.debug("vmsplice not available (%s): writing zeros", err)
                self._vmsplice = False
                return 0

    def finish(self) -> None:
        """Make a sparse output file as long as what was "written" into it."""
        if self._seek_end is not None and os.fstat(self.fd).st_size < self._seek_end:
            os.ftruncate(self.fd, self._seek_end)

    def close(self) -> None:
        pass


# --- dump ----------------------------------------------------------------------------------


def _send(out_fd: int, in_fd: int, offset: int, count: int, what: str, pipe: bool) -> int:
    """Move up to ``count`` bytes without copying them through this process.

    Into a pipe ``splice(2)`` (one hop; ``sendfile`` from a block device is
    several times slower here), else ``sendfile(2)``.  0 means the kernel
    refuses this pair: the caller falls back to pread + write.
    """
    while True:
        try:
            if pipe:
                return os.splice(in_fd, out_fd, count, offset_src=offset)
            return os.sendfile(out_fd, in_fd, offset, count)
        except BlockingIOError:  # somebody made the output non-blocking
            wait_fd(out_fd, True, None, what)
        except BrokenPipeError:
            raise
        except OSError as err:
            if err.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                return 0
            raise io_error("dump", what, err, offset) from err


def _copy_range(
    out_fd: int, in_fd: int, start: int, end: int, pipe: bool, what: str, buf: bytearray
) -> None:
    """Move ``[start, end)`` of ``in_fd`` to ``out_fd``: splice/sendfile, else pread + write."""
    offset = start
    zero_copy = True
    step = PIPE_STEP if pipe else FILE_STEP
    while offset < end:
        count = min(step, end - offset)
        n = _send(out_fd, in_fd, offset, count, what, pipe) if zero_copy else 0
        if n == 0:
            if zero_copy:
                zero_copy = False
                log.debug("%s: splice/sendfile refused, reading and writing", what)
            mv = memoryview(buf)[: min(count, len(buf))]
            n = pread_full(in_fd, mv, offset, what)
            if n == 0:
                raise E.ShortTransfer(
                    what=f"cannot dump {what}: the source ends early at offset {offset}",
                    expected=end, actual=offset,
                )
            write_all(out_fd, mv[:n], None, f"{what} to the output")
        offset += n


def _copy_block_direct(out_fd: int, path: str, size: int, what: str) -> int:
    """Copy a block device to ``out_fd`` with 4 MiB ``O_DIRECT`` reads; the bytes done.

    Through the page cache (``splice``, buffered reads) a loop device reads at
    ~0.4 GB/s here, with ``O_DIRECT`` at 1.3-2 GB/s, and the node's page cache
    is left alone.  Stops before a tail that is not 4 KiB aligned, and returns
    0 at once if the device refuses ``O_DIRECT``: the caller copies the rest.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as err:
        log.debug("%s: no O_DIRECT reads (%s)", what, err.strerror)
        return 0
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    mv = memoryview(buf)
    offset = 0
    try:
        while size - offset >= 4096:
            count = min(CHUNK, size - offset)
            count -= count % 4096
            try:
                n = os.preadv(fd, [mv[:count]], offset)
            except OSError as err:
                if err.errno == errno.EINVAL and offset == 0:
                    log.debug("%s: O_DIRECT read refused, reading buffered", what)
                    return 0
                raise io_error("read", what, err, offset) from err
            if n <= 0:
                break  # the device shrank: the caller's buffered copy reports it
            write_all(out_fd, mv[:n], None, f"{what} to the output")
            offset += n
    finally:
        mv.release()
        buf.close()
        os.close(fd)
    return offset


def open_source(path: str) -> int:
    """Open a file disk or block device read-only (an fd the caller closes)."""
    fd = open_readonly(path)
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise E.DeviceError(f"cannot dump '{path}': not a regular file or block device")
    return fd


def dump(
    path: str,
    out_fd: int,
    *,
    size_fd: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> CopySummary:
    """Write the file disk or block device ``path`` to ``out_fd``; see the module doc.

    The size is announced first on ``size_fd``, or on ``EXP_SIZE_FD`` from
    ``environ`` (default ``os.environ``) when ``size_fd`` is None.
    """
    what = f"'{path}'"
    if size_fd is None:
        size_fd = size_fd_from_env(environ)
    fd = open_source(path)
    started = time.monotonic()
    summary = CopySummary(what=what)
    zeros: ZeroWriter | None = None
    try:
        st = os.fstat(fd)
        is_file = stat.S_ISREG(st.st_mode)
        size = fd_size(fd)
        if is_file:
            settle(fd, what)
        if size_fd is not None:
            announce_size(size, size_fd)
            summary.announced = size
        out_pipe = stat.S_ISFIFO(os.fstat(out_fd).st_mode)
        if out_pipe:
            enlarge_pipe(out_fd)
        fadvise(fd, os.POSIX_FADV_SEQUENTIAL)
        zeros = ZeroWriter(out_fd, f"{what} to the output")
        buf = bytearray(PIPE_STEP if out_pipe else FILE_STEP)
        done = 0 if is_file else _copy_block_direct(out_fd, path, size, what)
        summary.data_bytes = summary.size = done
        for start, end, is_data in extents(fd, size) if is_file else [(done, size, True)]:
            if start >= end:
                continue
            if is_data:
                _copy_range(out_fd, fd, start, end, out_pipe, what, buf)
                summary.data_bytes += end - start
            else:
                zeros.write(end - start)
                summary.zero_bytes += end - start
            summary.size = end
        zeros.finish()
        if is_file:
            after = os.fstat(fd)
            if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                raise E.StreamError(
                    f"cannot dump {what}: it changed while it was read "
                    f"(size {st.st_size} -> {after.st_size}); is the instance running?"
                )
    finally:
        if zeros is not None:
            zeros.close()
        os.close(fd)
    summary.seconds = time.monotonic() - started
    log.info("%s", summary.describe("dumped"))
    return summary
