"""Raw restore: a stream or an image file into an existing disk, optionally read back and compared.

See :mod:`ganeti_vol.engine.rawio` for the rules (never created or
truncated, refused when mounted or held, zero runs skipped or zeroed).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import time
from collections import deque
from collections.abc import Generator
from concurrent import futures
from typing import TYPE_CHECKING

from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import Buffer, disk_size, enlarge_pipe, pread_full, read_full
from ganeti_vol.core.holes import data_runs, extents
from ganeti_vol.core.lazy import lazy
from ganeti_vol.engine.rawdisk import CHUNK, CopySummary, is_all_hole_path

# pyudev loads only when a disk is looked at; the restore side (hashes, the engine's
# target and read-back, locks) only when a disk is written: `dump` starts without them
if TYPE_CHECKING:
    from ganeti_vol.engine import hashing, targets, workers
    from ganeti_vol.system import devices, locks
else:
    devices = lazy("ganeti_vol.system.devices")
    hashing = lazy("ganeti_vol.engine.hashing")
    locks = lazy("ganeti_vol.system.locks")
    targets = lazy("ganeti_vol.engine.targets")
    workers = lazy("ganeti_vol.engine.workers")

log = logging.getLogger(__name__)

#: zero runs are looked for in steps of this size (data extents are 64 KiB granular)
GRANULE = 64 << 10
#: the chunk hash of restore's read-back verification (detects corruption, ~20 GB/s)
VERIFY_HASH = "xxh3-128"


# --- restore -------------------------------------------------------------------------------


def check_target(
    path: str, min_size: int = 0, what: str | None = None, verb: str = "restore into"
) -> devices.DeviceFacts:
    """Refuse a write target that is missing, not a disk, mounted, held, read-only or too small."""
    what = what or f"'{path}'"
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise E.DeviceError(
            f"cannot {verb} {what}: {err.strerror} (a disk is never created)"
        ) from err
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise E.DeviceError(f"cannot {verb} {what}: not a file or block device")
    facts = devices.describe(path)
    refusal = devices.import_target_refusal(facts, min_size)
    if refusal:
        raise E.DeviceError(f"cannot {verb} {what}: {refusal}")
    return facts


class DiskWriter:
    """Writes an existing file disk or block device at offsets; never truncates.

    A thin layer over :class:`ganeti_vol.engine.targets.RawTarget` (the engine's raw
    import target: ``O_EXCL`` for block devices, aligned ``O_DIRECT`` writes,
    zero runs skipped, ``BLKZEROOUT`` or punched, fsync at the end) that
    first refuses targets that are missing, mounted, held, read-only or
    smaller than ``min_size`` (the input size, when known).
    ``known_zero=None`` detects a file disk without any data (it reads as
    zeros); block devices are zero only when the caller says so.  Use as a
    context manager; :meth:`finish` must be called for a complete copy.
    """

    def __init__(
        self,
        path: str,
        *,
        min_size: int = 0,
        known_zero: bool | None = None,
        what: str | None = None,
    ) -> None:
        self.path = path
        self.what = what or f"'{path}'"
        facts = check_target(path, min_size, self.what)
        if known_zero is None:
            known_zero = not facts.is_block and is_all_hole_path(path)
        # one writer per disk: an import running this restore holds the lock for it
        self._locks = locks.Locks(C.DEFAULT_STATE_DIR, locks.Owner.current("restore", self.what),
                                  "restore into")
        self._locks.target(path, what=self.what, allow_ancestors=True)
        try:
            self.target = targets.RawTarget(path, known_zero=known_zero)
            self.target.begin(min_size or None, CHUNK, "the input", None)
        except E.DeviceError as err:
            self._locks.release()
            cause = err.__cause__
            if isinstance(cause, OSError) and cause.errno == errno.EBUSY:
                raise E.BusyError(
                    f"cannot restore into {self.what}: it is in use (mounted, held or "
                    "opened exclusively by another program)"
                ) from err
            raise
        except BaseException:
            self._locks.release()
            raise

    @property
    def is_block(self) -> bool:
        return self.target.is_block

    @property
    def size(self) -> int:
        return self.target.size

    @property
    def known_zero(self) -> bool:
        return self.target.known_zero

    @property
    def touched(self) -> bool:
        return self.target.touched

    def __enter__(self) -> DiskWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, offset: int, data: Buffer) -> None:
        self.target.write(offset, data)

    def write_zero(self, offset: int, length: int) -> None:
        """The range reads as zeros afterwards (skipped, zeroed or punched)."""
        self.target.write_zero(offset, length)

    def finish(self) -> None:
        """Flush pending zeros and fsync: the data is durable when this returns.

        The target's cached pages are dropped and an ``O_DIRECT`` read fd is
        opened where the target allows it, for :meth:`read_into`.
        """
        self.target.finish()

    def read_into(self, offset: int, mv: memoryview) -> int:
        """Read the target back into ``mv`` after :meth:`finish`; the bytes read
        (:meth:`ganeti_vol.engine.targets.RawTarget.read_into`: whole 4 KiB blocks from
        the device with ``O_DIRECT``, ``mv`` then page-aligned; the rest buffered)."""
        return self.target.read_into(offset, mv)

    def close(self) -> None:
        try:
            self.target.close()
        finally:
            self._locks.release()


def _input_chunks(
    in_fd: int, mvs: list[memoryview]
) -> Generator[tuple[int, int, int | None], None, None]:
    """``(offset, length, slot)`` of an input fd; the data lies in ``mvs[slot][:length]``.

    ``slot`` is None for a hole (no data read).  Data chunks alternate between
    the buffers of ``mvs``, so the consumer may still be writing the previous
    chunk while the next one is read.  A regular file is read from its
    current offset with its hole map (holes are not read); anything else is
    read sequentially in CHUNK steps.
    """
    st = os.fstat(in_fd)
    slot = 0
    if stat.S_ISREG(st.st_mode):
        base = os.lseek(in_fd, 0, os.SEEK_CUR)
        for start, end, is_data in extents(in_fd, st.st_size):
            if end <= base:
                continue
            start = max(start, base)
            if not is_data:
                yield start - base, end - start, None
                continue
            for off in range(start, end, CHUNK):
                mv = mvs[slot]
                n = pread_full(in_fd, mv[: min(CHUNK, end - off)], off, "the input")
                if n == 0:
                    return
                yield off - base, n, slot
                slot = (slot + 1) % len(mvs)
        return
    enlarge_pipe(in_fd)
    offset = 0
    while True:
        n = read_full(in_fd, mvs[slot], None, "the input")
        if n == 0:
            return
        yield offset, n, slot
        offset += n
        if n < CHUNK:
            return
        slot = (slot + 1) % len(mvs)


def input_size(in_fd: int) -> int | None:
    """Bytes left to read from ``in_fd`` if it is a regular file, else None."""
    st = os.fstat(in_fd)
    if not stat.S_ISREG(st.st_mode):
        return None
    return max(0, st.st_size - os.lseek(in_fd, 0, os.SEEK_CUR))


def _write_chunk(
    writer: DiskWriter, offset: int, length: int, buf: mmap.mmap | None, mv: memoryview | None
) -> tuple[int, int]:
    """Write one input chunk (zero runs as zeros); ``(data bytes, zero bytes)``."""
    if buf is None or mv is None:
        writer.write_zero(offset, length)
        return 0, length
    runs = data_runs(buf, GRANULE, length)
    if runs is None:
        writer.write(offset, mv[:length])
        return length, 0
    data = targets.write_runs(writer, offset, mv, length, runs)
    return data, length - data


class _ChunkHashes:
    """The hash of every CHUNK-sized piece ``[k*CHUNK, (k+1)*CHUNK)`` of a copy's output.

    Fed with the input pieces in order (data, or ``None`` for a hole that
    reads as zeros), whatever their offsets and lengths: a piece that covers
    a whole aligned chunk is hashed in place (a hole: the cached zero hash),
    the rest is assembled in one CHUNK buffer first.  Memory: one digest per
    chunk, plus the assembly buffer when the pieces are not aligned.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.hashes: list[bytes] = []
        self.pos = 0
        self._asm: bytearray | None = None

    def add(self, offset: int, length: int, mv: memoryview | None) -> None:
        if offset != self.pos:
            raise E.StreamError(
                f"cannot verify {self.what}: the input jumped from offset {self.pos} to "
                f"{offset} (did it change while it was read?)"
            )
        done = 0
        while done < length:
            at = self.pos % CHUNK
            take = min(length - done, CHUNK - at)
            if take == CHUNK:
                if mv is None:
                    self.hashes.append(hashing.zero_hash(VERIFY_HASH, CHUNK))
                else:
                    self.hashes.append(hashing.chunk_hash(VERIFY_HASH, mv[done:done + CHUNK]))
            else:
                if self._asm is None:
                    self._asm = bytearray(CHUNK)
                if mv is None:
                    self._asm[at:at + take] = bytes(take)
                else:
                    self._asm[at:at + take] = mv[done:done + take]
                if at + take == CHUNK:
                    self.hashes.append(hashing.chunk_hash(VERIFY_HASH, self._asm))
            done += take
            self.pos += take

    def finish(self) -> list[bytes]:
        """All chunk hashes, the last (short) chunk's included."""
        tail = self.pos % CHUNK
        if tail:
            assert self._asm is not None
            self.hashes.append(hashing.chunk_hash(VERIFY_HASH, memoryview(self._asm)[:tail]))
        self._asm = None
        return self.hashes


def copy_into(
    in_fd: int, writer: DiskWriter, *, size: int | None = None, verify: bool = False
) -> CopySummary:
    """Copy everything readable from ``in_fd`` into ``writer`` and fsync it.

    Reading and writing overlap: one thread writes a chunk (the write
    syscalls release the GIL) while the next one is read into the other of
    two buffers.  ``size`` (if given) is the number of bytes the input must
    have.  An empty input is refused: it is the mark of an export that
    produced nothing.

    ``verify``: hash every CHUNK of what is meant to land on the target
    while copying, and after the fsync read it all back (``O_DIRECT`` where
    possible, see :meth:`DiskWriter.read_into`) and compare; the first
    chunk that differs is an :class:`~ganeti_vol.core.errors.IntegrityError`
    with its ``offset``.  Without it nothing is hashed or read back.
    """
    summary = CopySummary(what=writer.what, known_zero=writer.known_zero)
    started = time.monotonic()
    bufs = [mmap.mmap(-1, CHUNK) for _ in range(2)]  # page-aligned, as O_DIRECT needs
    mvs = [memoryview(b) for b in bufs]
    chunks = _input_chunks(in_fd, mvs)
    pool = futures.ThreadPoolExecutor(1, thread_name_prefix="ganeti-vol-restore")
    pending: deque[futures.Future[tuple[int, int]]] = deque()
    hasher = _ChunkHashes(writer.what) if verify else None
    flushed = False

    def collect(fut: futures.Future[tuple[int, int]]) -> None:
        data, zeros = fut.result()
        summary.data_bytes += data
        summary.zero_bytes += zeros

    total = 0
    try:
        for offset, length, slot in chunks:
            buf = None if slot is None else bufs[slot]
            mv = None if slot is None else mvs[slot]
            pending.append(pool.submit(_write_chunk, writer, offset, length, buf, mv))
            if hasher is not None:  # while the buffer is written (both only read it)
                hasher.add(offset, length, mv)
            total = offset + length
            while len(pending) > 1:  # the other buffer must be free before the next read
                collect(pending.popleft())
        while pending:
            collect(pending.popleft())
        if total == 0:
            raise E.ShortTransfer(
                f"cannot restore into {writer.what}: the input is empty "
                "(did the export produce nothing?)", expected=size, actual=0,
            )
        if size is not None and total != size:
            raise E.ShortTransfer(
                what=f"cannot restore into {writer.what}: the input does not have the "
                "announced size", expected=size, actual=total,
            )
        writer.finish()
        flushed = True
        if hasher is not None:
            verify_started = time.monotonic()
            hint = (", or it did not read as zeros as assumed: zero runs were skipped"
                    if writer.known_zero else "")
            workers.read_back(writer, hasher.finish(), CHUNK, total, VERIFY_HASH, pool, 2, aligned=True,
                      hint=hint)
            summary.verified = True
            summary.verify_seconds = time.monotonic() - verify_started
    except BaseException as err:
        for fut in pending:
            fut.cancel()
        if writer.touched and not flushed and isinstance(err, E.GanetiVolError):
            raise err.restated("; the target holds partial data") from err
        raise
    finally:
        pool.shutdown(wait=True)  # no write may still use a buffer when it is unmapped
        chunks.close()
        for mv in mvs:
            mv.release()
        for buf in bufs:
            try:
                buf.close()
            except BufferError:  # a slice is still held by the traceback of the error
                pass  # being raised: the mapping goes with it, and must not hide it
    summary.size = total
    summary.seconds = time.monotonic() - started
    return summary


def restore(
    in_fd: int,
    path: str,
    *,
    known_zero: bool | None = None,
    size: int | None = None,
    verify: bool = False,
) -> CopySummary:
    """Write everything read from ``in_fd`` into the existing disk ``path``; see the module doc.

    ``size``: the input's size, if known (a regular file's is found here);
    a smaller target is refused before anything is written.  ``verify``:
    read everything written back from the disk and compare (see
    :func:`copy_into`); an IntegrityError names the first bad chunk's offset.
    """
    if size is None:
        size = input_size(in_fd)
    with DiskWriter(path, min_size=size or 0, known_zero=known_zero) as writer:
        summary = copy_into(in_fd, writer, size=size, verify=verify)
    log.info("%s", summary.describe("restored"))
    return summary


def copy_image(
    image: str, path: str, *, known_zero: bool | None = None, verify: bool = False
) -> CopySummary:
    """Copy a raw image file into the disk ``path``: holes skipped, never truncated.

    An image larger than the disk is refused before anything is written.
    ``verify``: read it back and compare, as :func:`restore` does.
    """
    try:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise E.UsageError(f"cannot open image '{image}': {err.strerror}") from err
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise E.UsageError(f"cannot use image '{image}': not a regular file")
        size = input_size(fd) or 0
        target = disk_size(path)
        if size > target:
            raise E.DeviceError(
                f"cannot write image '{image}' to '{path}': the image has {size} bytes, "
                f"the disk only {target}"
            )
        with DiskWriter(path, min_size=size, known_zero=known_zero) as writer:
            summary = copy_into(fd, writer, size=size, verify=verify)
    finally:
        os.close(fd)
    log.info("%s", summary.describe(f"copied image '{image}' into"))
    return summary
