"""Raw disk I/O for OS scripts: dump a disk to a stream, restore a stream into a disk.

These are the library halves of ``ganeti-vol dump`` and ``ganeti-vol
restore`` (and of :mod:`ganeti_vol.osapi`); they replace the peers'
``dd if=$DEV bs=1M`` and ``dd of=$DEV conv=nocreat,notrunc oflag=dsync``.

**dump** (:func:`dump`) writes a file or block device to a file descriptor:

- the data ranges of a regular file (``SEEK_DATA``/``SEEK_HOLE``) move with
  ``splice(2)`` into a pipe, ``sendfile(2)`` into anything else, so the
  bytes never enter this process (falls back to ``pread``/``write`` where
  the kernel refuses); a block device is read with 4 MiB ``O_DIRECT`` reads
  (3-4x faster than through the page cache from a loop device here);
- holes become zeros without being read: into a pipe with ``vmsplice(2)``
  of one zero buffer that is never written (pages are referenced, not
  copied), into a
  regular file that ends where we write by seeking past them (the output
  stays sparse), anywhere else by writing a shared zero buffer;
- an output pipe is enlarged to 1 MiB (:func:`ganeti_vol.core.fdio.enlarge_pipe`);
- the size can be announced first on ``EXP_SIZE_FD`` (:func:`announce_size`),
  for files and block devices alike.

**restore** (:func:`restore`, :func:`copy_image`) writes a stream or an image
file into an existing disk through a :class:`DiskWriter`:

- a file disk is never created, truncated or extended; a block device is
  claimed with ``O_EXCL``; the writing itself is the engine's
  :class:`~ganeti_vol.engine.targets.RawTarget` (aligned ``O_DIRECT`` writes where
  possible: 2-4x faster than buffered writes to a loop device here);
- missing, mounted (also through a loop device or partition), held or
  read-only targets are refused first (:func:`check_target`, with
  :func:`ganeti_vol.system.devices.import_target_refusal`), and so is a target
  smaller than the input when the input's size is known; an input that
  turns out to be larger stops at the first byte past the end;
- zero runs (64 KiB granules) are skipped when the target is known to read as
  zeros (a file disk with no data at all, or ``known_zero=True``); otherwise
  they become ``BLKZEROOUT`` (block device) or punched holes (file), which
  also keeps file disks sparse;
- the target is fsynced at the end;
- with ``verify=True`` every 4 MiB chunk of what was meant to land is hashed
  (xxh3-128) while it is copied, and after the fsync the written range is
  read back (``O_DIRECT`` where the target allows it, else buffered after
  the cached pages were dropped) and compared chunk by chunk: a mismatch is
  an :class:`~ganeti_vol.core.errors.IntegrityError` naming the chunk's offset.

Nothing here prints; errors are :class:`~ganeti_vol.core.errors.GanetiVolError`
subclasses with one-line messages.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat
import time
from collections import deque
from collections.abc import Generator, Mapping
from concurrent import futures
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import (
    Buffer,
    close_fd,
    enlarge_pipe,
    fadvise,
    io_error,
    pread_full,
    read_full,
    wait_fd,
    write_all,
)
from ganeti_vol.core.holes import all_hole, data_runs, extents
from ganeti_vol.core.lazy import lazy
from ganeti_vol.core.libc import PIPE_SIZE, vmsplice_zeros
from ganeti_vol.engine import hashing
from ganeti_vol.engine.targets import RawTarget, write_runs
from ganeti_vol.engine.workers import read_back
from ganeti_vol.system import locks

# pyudev loads only when a disk is looked at
if TYPE_CHECKING:
    from ganeti_vol.system import devices
else:
    devices = lazy("ganeti_vol.system.devices")

log = logging.getLogger(__name__)

#: bytes per read/write; also the O_DIRECT write size
CHUNK = 4 << 20
#: zero runs are looked for in steps of this size (data extents are 64 KiB granular)
GRANULE = 64 << 10
#: bytes per sendfile call into a pipe (the enlarged pipe's size)
PIPE_STEP = PIPE_SIZE
#: bytes per sendfile call into anything else
FILE_STEP = 8 << 20
EXP_SIZE_FD = "EXP_SIZE_FD"
#: the chunk hash of restore's read-back verification (detects corruption, ~20 GB/s)
VERIFY_HASH = "xxh3-128"


@dataclass
class CopySummary:
    """What a dump, restore or image copy did (sizes in bytes)."""

    what: str
    size: int = 0
    #: bytes moved as data
    data_bytes: int = 0
    #: bytes of holes or zero runs: not read (dump) or not written as data (restore)
    zero_bytes: int = 0
    seconds: float = 0.0
    #: restore: the zero runs were skipped because the target reads as zeros
    known_zero: bool = False
    #: the size announced on EXP_SIZE_FD, if any
    announced: int | None = None
    #: restore: everything written was read back from the target and matched
    verified: bool = False
    #: restore: seconds of the read-back (part of ``seconds``)
    verify_seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.size / self.seconds / 1e6 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mb_per_s"] = round(self.mb_per_s, 1)
        return out

    def describe(self, verb: str) -> str:
        text = (
            f"{verb} {self.what}: {self.size} bytes ({self.data_bytes} data, "
            f"{self.zero_bytes} zeros) in {self.seconds:.2f}s ({self.mb_per_s:.0f} MB/s)"
        )
        if self.verified:
            text += f", read back and verified in {self.verify_seconds:.2f}s"
        return text


# --- sizes and EXP_SIZE_FD ---------------------------------------------------------------


def fd_size(fd: int) -> int:
    """Size in bytes of an open regular file or block device (``lseek(SEEK_END)``)."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    pos = os.lseek(fd, 0, os.SEEK_CUR)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.lseek(fd, pos, os.SEEK_SET)


def open_readonly(path: str) -> int:
    """An O_RDONLY fd of ``path`` (the caller closes it); DeviceError naming it if impossible."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise E.DeviceError(f"cannot open '{path}': {err.strerror}") from err


def disk_size(path: str) -> int:
    """Size in bytes of a file disk or block device."""
    fd = open_readonly(path)
    try:
        return fd_size(fd)
    finally:
        os.close(fd)


def size_fd_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """The fd number in ``EXP_SIZE_FD``, or None when it is not set (or empty)."""
    value = (os.environ if environ is None else environ).get(EXP_SIZE_FD, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise E.UsageError(f"{EXP_SIZE_FD}='{value}' is not a file descriptor number")
    return int(value)


def announce_size(size: int, fd: int, *, close: bool = True) -> None:
    """Write ``size`` and a newline to ``fd`` (Ganeti's ``EXP_SIZE_FD`` protocol).

    Any fd number works here (shells need bash for fds above 9; Python does
    not).  The fd is closed afterwards unless ``close`` is False, so a
    reader waiting for EOF is not kept waiting.
    """
    line = b"%d\n" % size
    try:
        write_all(fd, line, None, f"{EXP_SIZE_FD}={fd}")
    except E.StreamError as err:
        raise E.UsageError(
            f"cannot announce the size on {EXP_SIZE_FD}={fd}: {_cause(err)} "
            "(the fd must be open for writing in this process)"
        ) from err
    finally:
        if close:
            close_fd(fd)
    log.debug("announced %d bytes on %s=%d", size, EXP_SIZE_FD, fd)


def _cause(err: BaseException) -> str:
    return str(err).rsplit(": ", 1)[-1]


# --- disks -------------------------------------------------------------------------------


def is_all_hole_path(path: str) -> bool:
    """True if ``path`` is a regular file without any data (reads as zeros)."""
    fd = open_readonly(path)
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and all_hole(fd)
    finally:
        os.close(fd)


def sync_path(path: str) -> None:
    """fsync a disk written by another program (e.g. qemu-img)."""
    fd = open_readonly(path)
    try:
        os.fsync(fd)
    except OSError as err:
        raise E.DeviceError(f"cannot flush '{path}': {err.strerror}") from err
    finally:
        os.close(fd)


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
            try:
                os.fsync(fd)  # delayed allocations must not look like holes
            except OSError as err:
                log.debug("cannot fsync %s before mapping holes: %s", what, err)
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
            self.target = RawTarget(path, known_zero=known_zero)
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
    data = write_runs(writer, offset, mv, length, runs)
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
            read_back(writer, hasher.finish(), CHUNK, total, VERIFY_HASH, pool, 2, aligned=True,
                      hint=hint)
            summary.verified = True
            summary.verify_seconds = time.monotonic() - verify_started
    except BaseException as err:
        for fut in pending:
            fut.cancel()
        if writer.touched and not flushed and isinstance(err, E.GanetiVolError):
            err.message += "; the target holds partial data"
            err.args = (err.message,)
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
