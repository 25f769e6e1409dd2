"""Writers that keep the disk busy while the CPU works: early writeback, background O_DIRECT.

:class:`Writeback` starts writeback as data is written, so the final fsync
has little left to do; :class:`DirectWriter` writes aligned buffers with
``O_DIRECT`` from a helper thread; :class:`AppendWriter` appends to a new
file through it (archive dumps, which are written once and read much later).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
from concurrent import futures

from ganeti_vol.core.fdio import Buffer, close_fd, io_error, pwrite_all
from ganeti_vol.core.libc import SYNC_FILE_RANGE_WRITE, sync_file_range

log = logging.getLogger(__name__)


class Writeback:
    """Start writeback of what was written every ``step`` bytes (sync_file_range).

    The final fsync then has little left to do: the disk writes overlap the
    compression instead of following it.  Failures are ignored (fsync reports
    real I/O errors).
    """

    def __init__(self, fd: int, step: int = 32 << 20) -> None:
        self.fd, self.step = fd, step
        self.started = 0

    def written(self, end: int) -> None:
        """Everything from the last call up to ``end`` has been written."""
        if end - self.started >= self.step:
            with contextlib.suppress(OSError):
                sync_file_range(self.fd, self.started, end - self.started, SYNC_FILE_RANGE_WRITE)
            self.started = end


class DirectWriter:
    """O_DIRECT writes of aligned buffers by one helper thread, so disk time overlaps work.

    :meth:`buffer` hands out one of ``buffers`` page-aligned buffers (waiting
    for a write to finish if all are busy), :meth:`submit` queues it; the
    first failed write is raised by the next call.  :meth:`drain` waits for
    everything queued; :meth:`close` stops the thread.  Opening probes the
    filesystem with an O_DIRECT read, so a refusal shows up here as OSError
    (and callers write buffered instead) rather than later in the thread.
    """

    def __init__(self, path: str, what: str, size: int, buffers: int = 3) -> None:
        self.what, self.size, self.limit = what, size, buffers
        self.dfd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        try:
            probe = mmap.mmap(-1, 4096)
            os.preadv(self.dfd, [probe], 0)
        except OSError:
            os.close(self.dfd)
            raise
        self._free: list[mmap.mmap] = [probe] if size == 4096 else []
        self._count = len(self._free)
        self._pending = 0
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._pool: futures.ThreadPoolExecutor | None = futures.ThreadPoolExecutor(
            1, thread_name_prefix="ganeti-vol-dio"
        )

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def buffer(self) -> mmap.mmap:
        with self._cond:
            while not self._free and self._count >= self.limit and self._error is None:
                self._cond.wait()
            self._check()
            if self._free:
                return self._free.pop()
            self._count += 1
        return mmap.mmap(-1, self.size)

    def submit(self, buf: mmap.mmap, n: int, offset: int) -> None:
        assert self._pool is not None
        with self._cond:
            self._check()
            self._pending += 1
        self._pool.submit(self._write, buf, n, offset)

    def _write(self, buf: mmap.mmap, n: int, offset: int) -> None:
        error = None
        try:
            pwrite_all(self.dfd, memoryview(buf)[:n], offset, self.what)
        except BaseException as err:  # handed to the submitting thread
            error = err
        with self._cond:
            self._pending -= 1
            self._free.append(buf)
            if error is not None and self._error is None:
                self._error = error
            self._cond.notify_all()

    def drain(self) -> None:
        with self._cond:
            while self._pending:
                self._cond.wait()
            self._check()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        close_fd(self.dfd)
        self.dfd = -1


class AppendWriter:
    """Append to a new file through aligned buffers written with O_DIRECT in the background.

    Dumps are written once and read much later: filling the page cache with
    them costs more CPU than the compression of mostly-zero data (fresh pages
    are slow on this machine kind) and leaves a long fsync.  Whole 4 KiB
    blocks go out through a :class:`DirectWriter` while the next buffer
    fills; the unaligned tail goes through the page cache at :meth:`finish`,
    which also fsyncs.  Where O_DIRECT is refused (some filesystems) it writes
    buffered with early writeback.
    """

    def __init__(self, fd: int, path: str, what: str, buffer_size: int = 8 << 20) -> None:
        self.fd, self.what = fd, what
        self.pos = 0  # bytes appended
        self.flushed = 0  # bytes handed to O_DIRECT writes
        self.fill = 0  # bytes waiting in the buffer
        self.writeback = Writeback(fd)
        self.direct: DirectWriter | None = None
        self.buf: mmap.mmap | None = None
        try:
            self.direct = DirectWriter(path, what, buffer_size, buffers=2)
        except OSError as err:
            log.debug("%s: no O_DIRECT (%s): writing buffered", what, err.strerror)
            return
        self.buf = self.direct.buffer()

    def append(self, data: Buffer) -> None:
        n = len(data)
        if self.buf is None:
            pwrite_all(self.fd, data, self.pos, self.what)
            self.pos += n
            self.writeback.written(self.pos)
            return
        mv = memoryview(data)
        while len(mv):
            take = min(len(mv), len(self.buf) - self.fill)
            self.buf[self.fill:self.fill + take] = mv[:take]
            self.fill += take
            mv = mv[take:]
            if self.fill == len(self.buf):
                self._hand_off()
        self.pos += n

    def _hand_off(self) -> None:
        """Queue the buffer's whole blocks; carry the rest over to a fresh buffer."""
        assert self.buf is not None and self.direct is not None
        n = self.fill - self.fill % 4096
        fresh = self.direct.buffer()
        rest = self.fill - n
        if rest:
            fresh[:rest] = self.buf[n:self.fill]
        self.direct.submit(self.buf, n, self.flushed)
        self.flushed += n
        self.buf, self.fill = fresh, rest

    def finish(self) -> None:
        """Write everything still buffered, then fsync."""
        try:
            if self.direct is not None and self.buf is not None:
                n = self.fill - self.fill % 4096
                if n:
                    self._hand_off()
                self.direct.drain()
                if self.fill:  # the unaligned tail, through the page cache
                    pwrite_all(self.fd, memoryview(self.buf)[:self.fill], self.flushed,
                               self.what)
                    self.fill = 0
            try:
                os.fsync(self.fd)
            except OSError as err:
                raise io_error("flush", self.what, err) from err
        finally:
            self.close()

    def close(self) -> None:
        """Stop the helper thread (after its current write) and close the O_DIRECT fd."""
        if self.direct is not None:
            self.direct.close()
            self.direct = None
