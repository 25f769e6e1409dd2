"""The streaming engine: chunk, detect zeros, hash, compress in parallel, write in order.

One :class:`Engine` per process holds the *one central parallel compressor*:
a thread pool shared by every disk (python-lz4, xxhash and hashlib release
the GIL, so the workers really run in parallel).  Several disks may be
encoded or decoded at the same time from several threads; each call keeps
its own bounded set of in-flight chunks, so peak memory stays at roughly
``2 x max_in_flight x chunk_size`` per running disk whatever the disk size.

Export of one disk (``source_kind`` is ``"pipe"`` for an export script's
stdout, ``"file"`` or ``"block"`` for raw mode)::

    from ganeti_vol.formats.archive import ArchiveWriter, DiskMeta
    from ganeti_vol.engine.streams import Cancel, Engine

    cancel = Cancel()
    with Engine.from_config(node_config) as engine:
        with ArchiveWriter(node_config.export_dir, instance, config_ini=text,
                           chunk_size=engine.chunk_size, hash_algo=engine.hash_algo) as aw:
            with process.open_script_stream(script, env, cwd=os_dir, log_path=log,
                                            direction="read", op="export",
                                            size_fd=True) as script_io:
                summary = engine.encode(
                    script_io.fd, aw.disk_sink(0, DiskMeta.for_disk(instance, 0)),
                    progress=progress.disk(0), cancel=cancel,
                    size_hint=script_io.size_hint, source_kind="pipe",
                    what=f"disk 0 of '{instance.name}'")
        # leaving the ArchiveWriter block publishes the archive atomically

Import of one disk (the archive verifies every chunk hash before the chunk
is passed on)::

    from ganeti_vol.formats.archive import open_archive
    from ganeti_vol.engine.streams import RawTarget, StreamTarget

    archive = open_archive(path)            # native archive or Ganeti v0 export
    with process.open_script_stream(..., direction="write", op="import") as script_io:
        engine.decode(archive.disk(0), StreamTarget(script_io.fd),
                      progress=progress.disk(0), cancel=cancel)
    # raw mode: pwrite into the disk, fsync, drop caches, read back and verify
    engine.decode(archive.disk(0), RawTarget(disk_path, known_zero=True), cancel=cancel)

A stream made by ``export -o -`` is read with :class:`ganeti_vol.formats.wire.WireReader`,
whose ``disks()`` yields sources for :meth:`Engine.decode` in the same way.

**Cancellation.**  Every loop checks ``cancel`` (any :class:`threading.Event`;
:class:`Cancel` also carries the error to raise, e.g. a
:class:`~ganeti_vol.core.errors.StallError` set by the stall watchdog).  Reads and
writes on pipes never block for long: FIFOs are reopened non-blocking
through ``/proc/self/fd`` (a new open file description, so the flags of a
shared stdin/stdout are not touched) and waited for with ``poll`` in 100 ms
steps.  On every error path the in-flight chunks are cancelled or waited for,
the fds this module opened are closed, and the sink or target is aborted.

**Hole maps are hints only.**  In ``"file"`` mode the source is fsynced
first, so that delayed allocation cannot make dirty data look like a hole
(the bmaptool FIEMAP_FLAG_SYNC lesson), then ``lseek(SEEK_DATA)`` tells for
each chunk whether it lies entirely in a hole; such a chunk is recorded as a
zero chunk without being read (a hole reads as zeros by definition).  In a
chunk that is partly a hole only the data extents are read, hashed and
compressed (:func:`ganeti_vol.engine.codec.encode_runs`); the holes between them
count as zeros.  Every
chunk that is read is zero-checked by content, so a map that reports holes
as data costs only speed.  A map that reports data as holes is the dangerous
case: it can only come from a concurrent writer or a filesystem bug, so the
file's size and mtime are checked again after the last chunk (a change is
an error) and ``verify_holes=True`` reads hole chunks too and checks that
they are zero.
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import select
import stat
import struct
import termios
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ganeti_vol.core import errors as E
from ganeti_vol.core import fdio as fdutil
from ganeti_vol.core.fdio import PIPE_SIZE, enlarge_pipe, vmsplice_zeros  # noqa: F401 (re-exported)
from ganeti_vol.engine import codec, hashing

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview

F_GETPIPE_SZ = 1032
_POLL_MS = 100
_BLKZEROOUT = 0x127F
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
SOURCE_KINDS = ("pipe", "file", "block", "auto")


# --- cancellation ----------------------------------------------------------------------


class Cancel(threading.Event):
    """A cancellation flag that remembers why: ``abort(error)`` makes loops raise ``error``."""

    def __init__(self) -> None:
        super().__init__()
        self.error: BaseException | None = None

    def abort(self, error: BaseException | None = None) -> None:
        if self.error is None:
            self.error = error
        self.set()


def check_cancel(cancel: threading.Event | None, what: str) -> None:
    """Raise if ``cancel`` is set: its ``error`` if it has one, else a StreamError."""
    if cancel is not None and cancel.is_set():
        error = getattr(cancel, "error", None)
        if error is not None:
            raise error
        raise E.StreamError(f"{what}: cancelled")


# --- data types ------------------------------------------------------------------------


@dataclass(slots=True)
class Chunk:
    """One chunk of a disk, as passed to sinks and taken from sources.

    ``frame`` is the LZ4 frame (``None`` for a raw sink/source), ``data`` the
    raw bytes (only for raw sinks/sources; a sink must use them before
    ``write_chunk`` returns, the buffer is recycled).  ``hash`` is the chunk
    hash of the uncompressed bytes (``None`` from sources without hashes, such
    as Ganeti dumps).  ``crc`` is the crc32 of ``frame`` when the sink asked
    for it (``want_crc``) or the source carries one to check.
    """

    index: int
    offset: int
    length: int
    zero: bool
    hash: bytes | None
    frame: bytes | None = None
    data: Buffer | None = None
    crc: int | None = None


class ChunkSink(Protocol):
    """Where :meth:`Engine.encode` puts chunks (archive dump, wire stream, raw dump)."""

    #: False: chunks carry ``data`` (raw bytes) instead of an LZ4 ``frame``
    compress: bool
    #: True: the workers also compute ``crc`` (crc32 of the frame)
    want_crc: bool
    #: optional ``known(digest) -> bool``, called by a worker once a chunk is hashed:
    #: True means the sink already stores that content, so the chunk is not
    #: compressed and reaches ``write_chunk`` with ``frame`` and ``data`` None
    #: (a deduplicating repository, :mod:`ganeti_vol.repo`)

    def begin(self, info: EncodeInfo) -> None: ...
    def write_chunk(self, chunk: Chunk) -> None: ...
    def finish(self, summary: EncodeSummary) -> None: ...
    def abort(self, error: BaseException) -> None: ...


class ChunkSource(Protocol):
    """What :meth:`Engine.decode` reads: one disk of an archive, stream or Ganeti export."""

    what: str
    chunk_size: int
    #: the chunk hash algorithm of the recorded hashes (None: nothing recorded)
    hash_algo: str | None
    #: logical bytes, if known before the chunks are read
    size: int | None
    #: size of the exported disk in bytes (a raw target must be at least this big)
    disk_size: int | None

    def chunks(self) -> Iterator[Chunk]: ...
    def finish(self, summary: DecodeSummary) -> None: ...


class Progress(Protocol):
    """What the engine reports to (see :class:`ganeti_vol.engine.progress.DiskProgress`)."""

    def advance(self, nbytes: int) -> None: ...
    def verified(self, nbytes: int) -> None: ...
    def touch(self) -> None: ...
    def set_total(self, nbytes: int | None) -> None: ...
    def set_stage(self, stage: str) -> None: ...


class _NoProgress:
    def advance(self, nbytes: int) -> None:
        pass

    verified = advance

    def touch(self) -> None:
        pass

    def set_total(self, nbytes: int | None) -> None:
        pass

    def set_stage(self, stage: str) -> None:
        pass


@dataclass(frozen=True)
class EncodeInfo:
    """Told to a sink before the first chunk."""

    what: str
    chunk_size: int
    hash_algo: str
    source_kind: str
    #: logical size if known up front (file/block sources)
    size: int | None
    #: device/inode identity of the source, for the manifest
    source_identity: dict[str, Any]


@dataclass
class EncodeSummary:
    """What :meth:`Engine.encode` did; sinks record it (manifest, stream trailer)."""

    what: str
    source_kind: str
    size: int
    chunk_size: int
    hash_algo: str
    compression: str | None
    chunks: int
    zero_chunks: int
    zero_bytes: int
    #: bytes never read because the hole map said they were holes
    hole_bytes: int
    #: bytes written to the sink (frames or raw data)
    stored_bytes: int
    digest: str
    started: float
    seconds: float
    size_hint: int | None = None
    source_identity: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DecodeSummary:
    """What :meth:`Engine.decode` did."""

    what: str
    size: int
    chunks: int
    zero_chunks: int
    zero_bytes: int
    digest: str
    hash_algo: str
    seconds: float
    #: True when the target was read back after fsync and matched
    read_back: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_decoded(
    summary: DecodeSummary, expected: dict[str, Any], what: str, disk: int, by: str
) -> None:
    """Compare a decode with the recorded size, chunk count and whole-disk digest."""
    want = (expected.get("size"), expected.get("chunks"), expected.get("digest"))
    got = (summary.size, summary.chunks, summary.digest)
    if want != got:
        raise E.IntegrityError(
            f"cannot read {what}: decoded {got[0]} bytes in {got[1]} chunks with digest "
            f"{got[2]}, {by} says {want[0]}/{want[1]}/{want[2]}", disk=disk,
        )


# --- low-level I/O ---------------------------------------------------------------------


def reopen_nonblocking(fd: int, write: bool) -> int | None:
    """A new non-blocking fd on the same FIFO as ``fd`` (None if ``fd`` is not a FIFO).

    Opening ``/proc/self/fd/N`` creates a new open file description, so
    ``O_NONBLOCK`` does not leak to other holders of ``fd`` (a shell's pipe).
    """
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return None
        mode = os.O_WRONLY if write else os.O_RDONLY
        return os.open(f"/proc/self/fd/{fd}", mode | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None


def wait_fd(fd: int, writable: bool, cancel: threading.Event | None, what: str) -> int:
    """Wait until ``fd`` is readable/writable (or hung up), checking ``cancel`` every 100 ms.

    Returns the poll events (POLLERR/POLLHUP: the other end is gone).
    """
    poller = select.poll()
    poller.register(fd, (select.POLLOUT if writable else select.POLLIN) | select.POLLPRI)
    while True:
        check_cancel(cancel, what)
        events = poller.poll(_POLL_MS)
        if events:
            return events[0][1]


def io_error(verb: str, obj: str, err: OSError, offset: int | None = None) -> E.GanetiVolError:
    """Translate an OSError into NoSpaceError or StreamError with a one-line message."""
    where = f" at offset {offset}" if offset is not None else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return E.NoSpaceError(what=f"{obj}{where}")
    return E.StreamError(f"cannot {verb} {obj}{where}: {err.strerror or err}")


def read_some(fd: int, mv: memoryview, cancel: threading.Event | None, what: str) -> int:
    """One read into ``mv`` (waiting for data if needed); 0 only at EOF."""
    while True:
        try:
            return os.readv(fd, [mv])
        except BlockingIOError:
            wait_fd(fd, False, cancel, what)
        except OSError as err:
            raise io_error("read", what, err) from err


def read_full(
    fd: int,
    mv: memoryview,
    cancel: threading.Event | None,
    what: str,
    activity: Callable[[], None] | None = None,
) -> int:
    """Read into ``mv`` until it is full or EOF; the number of bytes read.

    ``activity`` is called after every read: bytes trickling in are progress
    for the stall watchdog even before a whole chunk is complete.
    """
    pos, size = 0, len(mv)
    while pos < size:
        n = read_some(fd, mv[pos:], cancel, what)
        if n == 0:
            break
        pos += n
        if activity is not None:
            activity()
    return pos


def write_all(
    fd: int,
    data: Buffer,
    cancel: threading.Event | None,
    what: str,
    activity: Callable[[], None] | None = None,
) -> None:
    """Write all of ``data`` to ``fd`` (blocking or not), checking ``cancel`` while waiting."""
    mv = memoryview(data)
    pos, size = 0, len(mv)
    while pos < size:
        try:
            pos += os.write(fd, mv[pos:])
            if activity is not None and pos < size:
                activity()
        except BlockingIOError:
            wait_fd(fd, True, cancel, what)
        except BrokenPipeError as err:
            raise E.StreamError(f"cannot write {what}: the reader closed the pipe") from err
        except OSError as err:
            raise io_error("write", what, err) from err


class PipeWriter:
    """Writes to a pipe in large pieces, never blocking inside write(2).

    Writing whatever fits into a non-blocking pipe ends in many small writes
    (and reads on the other side): on this machine kind ``dd`` fed that way
    used twice the CPU and ran at 0.56x of ``dd`` fed by blocking 4 MiB writes.
    Here each write is sized to the free space of the pipe (FIONREAD), and
    when less than 64 KiB is free the writer waits (poll, then short naps)
    for the reader, checking ``cancel`` all the while.  A descriptor that is
    not a pipe is written with :func:`write_all`.
    """

    MIN_FREE = 64 << 10
    _SLACK = 2 * 4096  # partly filled pages may use a slot more than their bytes

    def __init__(
        self,
        fd: int,
        what: str,
        cancel: threading.Event | None,
        activity: Callable[[], None] | None = None,
    ) -> None:
        self.fd, self.what, self.cancel, self.activity = fd, what, cancel, activity
        self.size = 0
        self.splice_zeros = True
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                self.size = fcntl.fcntl(fd, F_GETPIPE_SZ)
        except OSError:
            self.size = 0

    def _free(self) -> int:
        queued = array.array("i", [0])
        fcntl.ioctl(self.fd, termios.FIONREAD, queued)
        return self.size - queued[0] - self._SLACK

    def _room(self, want: int) -> int:
        """Wait until ``want`` bytes fit (or the reader is gone); the bytes free, at least 1."""
        nap = 0.0002
        while True:
            free = self._free()
            if free >= want:
                return free
            events = wait_fd(self.fd, True, self.cancel, self.what)
            if events & (select.POLLERR | select.POLLHUP):
                return max(free, 1)  # write: a vanished reader raises EPIPE
            if self._free() >= want:
                continue
            time.sleep(nap)  # a page came free: let the reader empty more
            nap = min(nap * 2, 0.01)

    def write(self, data: Buffer) -> None:
        if not self.size:
            write_all(self.fd, data, self.cancel, self.what, self.activity)
            return
        mv = memoryview(data)
        pos, size = 0, len(mv)
        while pos < size:
            free = self._room(min(size - pos, self.MIN_FREE))
            try:
                pos += os.write(self.fd, mv[pos:pos + min(free, size - pos)])
            except BrokenPipeError as err:
                raise E.StreamError(f"cannot write {self.what}: the reader closed the pipe") \
                    from err
            except OSError as err:
                raise io_error("write", self.what, err) from err
            if self.activity is not None:
                self.activity()

    def write_zeros(self, length: int) -> None:
        """Write ``length`` zero bytes; into a pipe by reference (vmsplice), not by copy."""
        while length and self.size and self.splice_zeros:
            free = self._room(min(length, self.MIN_FREE))
            try:
                n = vmsplice_zeros(self.fd, min(free, length), nonblock=True)
            except BlockingIOError:  # the free-space estimate was off: wait for a slot
                wait_fd(self.fd, True, self.cancel, self.what)
                continue
            except BrokenPipeError as err:
                raise E.StreamError(f"cannot write {self.what}: the reader closed the pipe") \
                    from err
            except (OSError, AttributeError) as err:
                log.debug("%s: vmsplice not available (%s): writing zeros", self.what, err)
                self.splice_zeros = False
                break
            length -= n
            if self.activity is not None:
                self.activity()
        while length:
            step = min(length, PIPE_SIZE)
            self.write(codec.zero_bytes(step))
            length -= step


def pread_full(fd: int, mv: memoryview, offset: int, what: str) -> int:
    """pread until ``mv`` is full or EOF."""
    pos, size = 0, len(mv)
    while pos < size:
        try:
            n = os.preadv(fd, [mv[pos:]], offset + pos)
        except OSError as err:
            raise io_error("read", what, err, offset + pos) from err
        if n == 0:
            break
        pos += n
    return pos


def pwrite_all(fd: int, data: Buffer, offset: int, what: str) -> None:
    """pwrite all of ``data`` at ``offset``."""
    mv = memoryview(data)
    pos, size = 0, len(mv)
    while pos < size:
        try:
            pos += os.pwrite(fd, mv[pos:], offset + pos)
        except OSError as err:
            raise io_error("write", what, err, offset + pos) from err


def fadvise(fd: int, advice: int, offset: int = 0, length: int = 0) -> None:
    try:
        os.posix_fadvise(fd, offset, length, advice)
    except OSError:
        pass


#: one POSIX_FADV_WILLNEED reads at most the device's largest request (8 MiB here) and
#: silently drops the rest of the range, so longer ranges are announced in pieces
_WILLNEED_STEP = 4 << 20


def willneed(fd: int, offset: int, length: int) -> None:
    """Start reading ``[offset, offset + length)`` into the page cache in the background."""
    for pos in range(offset, offset + length, _WILLNEED_STEP):
        fadvise(fd, os.POSIX_FADV_WILLNEED, pos, min(_WILLNEED_STEP, offset + length - pos))


class ReadAhead:
    """Keep the next ``window`` bytes of a file being read in order on their way into the cache.

    A dump is read frame by frame: without this every frame past the kernel's
    small readahead is a synchronous read, and the disk idles while the frame
    is decompressed and written (the dumps are written with O_DIRECT, so an
    import reads them from the disk).  :meth:`reached` announces the window
    beyond a position (:func:`willneed`), half a window at a time.
    """

    def __init__(self, fd: int, window: int = 32 << 20) -> None:
        self.fd, self.window = fd, window
        self.announced = 0  # bytes before this offset were announced

    def reached(self, pos: int) -> None:
        """Reading has got to ``pos``: keep ``[pos, pos + window)`` announced."""
        if pos + self.window // 2 <= self.announced:
            return
        start, self.announced = max(self.announced, pos), pos + self.window
        willneed(self.fd, start, self.announced - start)


def close_fd(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def _identity(st: os.stat_result) -> dict[str, Any]:
    ident: dict[str, Any] = {"dev": st.st_dev, "ino": st.st_ino}
    if stat.S_ISBLK(st.st_mode):
        ident["rdev"] = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return ident


# --- sources of raw bytes (export side) ------------------------------------------------


class _PipeReader:
    """Sequential reads from a pipe (or any fd) into recycled chunk buffers."""

    kind = "pipe"

    def __init__(
        self, fd: int, what: str, cancel: threading.Event | None, activity: Callable[[], None]
    ) -> None:
        self.what = f"{what} from its export stream"
        self.cancel = cancel
        self.activity = activity
        enlarge_pipe(fd)
        self._own = reopen_nonblocking(fd, write=False)
        self.fd = self._own if self._own is not None else fd
        self.size: int | None = None
        self.identity = _identity(os.fstat(fd))

    def read_chunk(
        self, buf: bytearray, offset: int, length: int
    ) -> tuple[int, bool, None, bool]:
        """``(bytes, False, None, all zero)``: the zero test runs on each piece as it arrives.

        Tested right after its read, a piece is still in the CPU cache, and
        the pipe keeps flowing: a separate 4 MiB comparison after the chunk
        is complete left the writer blocked on a full pipe meanwhile
        (a ``cat`` export of sparse-90 through the pipe: 2.1 vs 2.5 GB/s).
        """
        zeros = codec.zero_view(length)
        pos, zero = 0, True
        with memoryview(buf) as mv:
            while pos < length:
                n = read_some(self.fd, mv[pos:length], self.cancel, self.what)
                if n == 0:
                    break
                if zero:
                    zero = buf.startswith(zeros[:n], pos)
                pos += n
                self.activity()
        return pos, False, None, zero

    def finish(self) -> None:
        pass

    def close(self) -> None:
        close_fd(self._own)
        self._own = None


class RandomAccessReader:
    """pread from a regular file (skipping holes, see the module doc) or a block device.

    With ``sparse_runs`` (a file, holes not verified), :meth:`read_chunk`
    reads only the data extents of a chunk that is partly a hole and returns
    them as runs; the buffer between the runs is left as it was.
    """

    #: a chunk split into more data runs than this is read whole (a badly fragmented file)
    MAX_RUNS = 16
    #: data extents of a file are announced to the kernel (WILLNEED) this far ahead
    PREFETCH = 32 << 20

    def __init__(
        self, fd: int, what: str, kind: str, verify_holes: bool, sparse_runs: bool = False
    ) -> None:
        self.fd = fd
        self.what = what
        st = os.fstat(fd)
        if kind == "file" and not stat.S_ISREG(st.st_mode):
            raise E.ProgrammerError(f"cannot export {what} as a file: not a regular file")
        if kind == "block" and not stat.S_ISBLK(st.st_mode):
            raise E.ProgrammerError(f"cannot export {what} as a block device: not one")
        self.kind = kind
        self.identity = _identity(st)
        self.verify_holes = verify_holes
        self.sparse_runs = sparse_runs and kind == "file" and not verify_holes
        self._seek_holes = kind == "file"
        self._extent = (0, 0, True)  # (start, end, is data) of the extent found last
        self._prefetched = 0  # data extents before this offset were announced
        if kind == "file":
            try:
                os.fsync(fd)  # allocate delayed writes before asking for the hole map
            except OSError as err:
                log.debug("cannot fsync %s before mapping holes: %s", what, err)
            self._before = (st.st_size, st.st_mtime_ns)
            self.size = st.st_size
        else:
            self._before = None
            self.size = os.lseek(fd, 0, os.SEEK_END)
        fadvise(fd, os.POSIX_FADV_SEQUENTIAL)

    def _extent_at(self, pos: int) -> tuple[bool, int]:
        """(is data, end) of the extent holding ``pos``: one lseek per hole, two per data extent."""
        start, end, is_data = self._extent
        if start <= pos < end:
            return is_data, end
        size = self.size or 0
        if not self._seek_holes:
            return True, size
        try:
            data = os.lseek(self.fd, pos, os.SEEK_DATA)
            if data == pos:
                self._extent = (pos, os.lseek(self.fd, pos, os.SEEK_HOLE), True)
            else:
                self._extent = (pos, data, False)
        except OSError as err:
            if err.errno != errno.ENXIO:  # the filesystem cannot tell: read everything
                self._seek_holes = False
                return True, size
            self._extent = (pos, max(size, pos + 1), False)  # no data at or after pos
        return self._extent[2], self._extent[1]

    def _prefetch(self, upto: int) -> None:
        """Ask the kernel to read the data extents up to ``upto`` in the background.

        Skipping holes defeats the kernel's sequential readahead: every data
        extent would start with a synchronous read.  Announcing the extents
        ahead (never the holes: readahead would fill the page cache with
        zeros) lets the disk work while the chunks before are compressed.
        """
        pos = max(self._prefetched, 0)
        size = self.size or 0
        upto = min(upto, size)
        try:
            while pos < upto:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
                if data >= upto:
                    pos = data
                    break
                end = min(os.lseek(self.fd, data, os.SEEK_HOLE), upto)
                willneed(self.fd, data, end - data)
                pos = end
        except OSError:  # ENXIO: no data after pos; others: the map is unknown, stop trying
            pos = size
        self._prefetched = max(pos, upto)

    def _is_hole(self, offset: int, length: int) -> bool:
        """True if [offset, offset+length) is inside one hole."""
        is_data, end = self._extent_at(offset)
        return not is_data and end >= offset + length

    def _data_runs(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        """The data extents of a chunk as [start, end) runs relative to ``offset``.

        None if the chunk is all data or too fragmented to be worth splitting.
        """
        runs: list[tuple[int, int]] = []
        pos, stop = offset, offset + length
        while pos < stop:
            is_data, end = self._extent_at(pos)
            end = min(end, stop)
            if is_data:
                runs.append((pos - offset, end - offset))
                if len(runs) > self.MAX_RUNS:
                    return None
            pos = end
        return None if runs == [(0, length)] else runs

    def read_chunk(
        self, buf: bytearray, offset: int, length: int
    ) -> tuple[int, bool, list[tuple[int, int]] | None, bool | None]:
        """``(bytes, is a hole, data runs, None)``; runs are None when the whole chunk was read.

        The last item (all zero) is None: the caller tests the bytes it got.
        """
        length = min(length, (self.size or 0) - offset)
        if length <= 0:
            return 0, False, None, None
        if self._seek_holes and self._prefetched < offset + self.PREFETCH:
            self._prefetch(offset + length + self.PREFETCH)
        hole = self._is_hole(offset, length)
        if hole and not self.verify_holes:
            return length, True, None, None
        runs = self._data_runs(offset, length) if self.sparse_runs else None
        with memoryview(buf) as mv:
            for start, end in runs or [(0, length)]:
                n = pread_full(self.fd, mv[start:end], offset + start, f"{self.what}")
                if n != end - start:
                    raise E.ShortTransfer(
                        what=f"cannot export {self.what}: source shrank while reading at "
                        f"offset {offset + start}",
                        expected=end - start, actual=n,
                    )
        if hole and buf[:length] != codec.zero_bytes(length):
            log.warning("%s: the hole map reports a hole with data at offset %d", self.what, offset)
            return length, False, None, None
        return length, hole, runs, None

    def finish(self) -> None:
        if self._before is None:
            return
        st = os.fstat(self.fd)
        if (st.st_size, st.st_mtime_ns) != self._before:
            raise E.StreamError(
                f"cannot export {self.what}: the source file changed while it was read "
                f"(size {self._before[0]} -> {st.st_size}); is the instance running?"
            )

    def close(self) -> None:
        pass


# --- ordered in-flight chunks ----------------------------------------------------------


class _InFlight:
    """Chunks in disk order: each is ready or a future of a worker; consumed in order."""

    def __init__(self, cancel: threading.Event | None, what: str) -> None:
        self._q: deque[tuple[Any, futures.Future[Any] | None, Any]] = deque()
        self.cancel = cancel
        self.what = what

    def __len__(self) -> int:
        return len(self._q)

    def add(self, item: Any, fut: futures.Future[Any] | None, ready: Any = None) -> None:
        self._q.append((item, fut, ready))

    def pop(self, block: bool) -> tuple[Any, Any] | None:
        """The oldest entry and its result, or None (queue empty, or head busy and not block)."""
        if not self._q:
            return None
        item, fut, result = self._q[0]
        if fut is not None:
            if not block and not fut.done():
                return None
            while True:
                try:
                    result = fut.result(timeout=_POLL_MS / 1000)
                    break
                except futures.TimeoutError:
                    check_cancel(self.cancel, self.what)
        self._q.popleft()
        return item, result

    def abort(self) -> None:
        """Cancel what has not started and wait for what runs (so no worker holds our buffers)."""
        running = [fut for _, fut, _ in self._q if fut is not None and not fut.cancel()]
        self._q.clear()
        futures.wait(running)


class _Buffers:
    """Recycled chunk buffers; at most ``limit`` exist, so memory stays bounded.

    ``aligned`` buffers are anonymous mmaps (page-aligned, as O_DIRECT wants).
    """

    def __init__(self, size: int, limit: int, aligned: bool = False) -> None:
        self.size, self.limit, self.aligned = size, limit, aligned
        self.free: list[Any] = []
        self.allocated = 0

    def get(self, inflight: _InFlight, consume: Callable[[Any], None]) -> Any:
        """A free buffer; consumes the oldest in-flight chunks until one is returned."""
        while not self.free and self.allocated >= self.limit:
            consume(inflight.pop(block=True))
        if self.free:
            return self.free.pop()
        self.allocated += 1
        return mmap.mmap(-1, self.size) if self.aligned else bytearray(self.size)

    def put(self, buf: Any) -> None:
        self.free.append(buf)


#: bytes of chunks (frames, decoded data, read-back buffers) one decode keeps in flight
#: (see Engine._in_flight)
_DECODE_BUDGET = 64 << 20


class _Hashes:
    """The chunk hashes of one decode, packed into one buffer (for the read-back).

    16 or 32 bytes per chunk instead of a bytes object each (about 65 bytes).
    """

    def __init__(self, algo: str) -> None:
        self.size = hashing.digest_size(algo)
        self.buf = bytearray()

    def append(self, digest: bytes) -> None:
        self.buf += digest

    def __len__(self) -> int:
        return len(self.buf) // self.size

    def __getitem__(self, index: int) -> bytes:
        return bytes(self.buf[index * self.size:(index + 1) * self.size])


# --- worker functions (run in the pool) ------------------------------------------------


def _encode_one(
    buf: bytearray, length: int, hash_fn: Callable[[Buffer], bytes], compress: bool, crc: bool,
    known: Callable[[bytes], bool] | None = None,
) -> tuple[bytes, bytes | None, int | None]:
    with memoryview(buf)[:length] as mv:
        digest = hash_fn(mv)
        frame = codec.encode(mv) if compress and not (known and known(digest)) else None
    return digest, frame, (zlib.crc32(frame) if crc and frame is not None else None)


def _encode_runs(
    buf: bytearray, length: int, runs: list[tuple[int, int]], algo: str, crc: bool,
    known: Callable[[bytes], bool] | None = None,
) -> tuple[bytes, bytes | None, int | None]:
    """Hash and compress a partly-sparse chunk whose bytes outside ``runs`` are zero."""
    with memoryview(buf)[:length] as mv:
        digest = hashing.hash_runs(algo, mv, runs)
        if known and known(digest):
            return digest, None, None
        frame = codec.encode_runs(mv, runs)
    return digest, frame, (zlib.crc32(frame) if crc else None)


def _runs_are_zero(buf: bytearray, runs: list[tuple[int, int]]) -> bool:
    if any(buf[start] for start, _ in runs):  # the usual case: data at once
        return False
    return all(buf[start:end] == codec.zero_bytes(end - start) for start, end in runs)


def _data_runs(
    data: Buffer, granule: int, size: int | None = None
) -> list[tuple[int, int]] | None:
    """The [start, end) runs of ``data[:size]`` not made of zero granules; None: no zero granule.

    A granule whose first byte is not zero is data at once, so text and random
    data cost one byte test per granule; only zero-looking granules are compared.
    """
    size = len(data) if size is None else size
    runs: list[tuple[int, int]] = []
    start: int | None = None
    found = False
    for a in range(0, size, granule):
        b = min(a + granule, size)
        if data[a] == 0 and data[a:b] == codec.zero_bytes(b - a):
            found = True
            if start is not None:
                runs.append((start, a))
                start = None
        elif start is None:
            start = a
    if not found:
        return None
    if start is not None:
        runs.append((start, size))
    return runs


class _OutputBuffers:
    """Recycled buffers the workers decompress chunks into (thread-safe).

    A buffer is taken by a worker and given back once its chunk is written,
    so there are never more than chunks in flight.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.free: list[bytearray] = []

    def take(self) -> bytearray:
        try:
            return self.free.pop()  # atomic under the GIL
        except IndexError:
            return bytearray(self.size)

    def give(self, buf: bytearray | None) -> None:
        if buf is not None:
            self.free.append(buf)


def _decode_one(
    chunk: Chunk, hash_fn: Callable[[Buffer], bytes], zero: bytes, what: str, granule: int,
    outputs: _OutputBuffers,
) -> tuple[Buffer, bytes, bool, list[tuple[int, int]] | None, bytearray | None]:
    """Decompress and check one chunk: (data, hash, all zero, data runs, buffer to give back)."""
    where = f"{what} at offset {chunk.offset}"
    buf: bytearray | None = None
    if chunk.frame is not None:
        if chunk.crc is not None and zlib.crc32(chunk.frame) != chunk.crc:
            raise E.IntegrityError(
                f"cannot read {where}: record checksum mismatch (corrupt data)",
                offset=chunk.offset,
            )
        buf = outputs.take()
        data: Buffer = codec.decode_into(chunk.frame, buf, chunk.length, where)
        chunk.frame = None  # only the decoded bytes wait in flight
        if not isinstance(data, memoryview):  # decoded elsewhere (python-lz4)
            outputs.give(buf)
            buf = None
    elif chunk.data is not None:
        data = chunk.data
    else:
        raise E.ProgrammerError(f"{where}: chunk has neither frame nor data")
    digest = hash_fn(data)
    if chunk.hash is not None and digest != chunk.hash:
        raise E.IntegrityError(
            f"cannot read {where}: chunk hash mismatch (corrupt data): "
            f"calculated {digest.hex()}, should be {chunk.hash.hex()}",
            offset=chunk.offset,
        )
    length = chunk.length
    whole = buf if buf is not None else data  # memcmp-speed tests need the bytearray itself
    is_zero = _is_zero(whole, length, zero)
    runs = _data_runs(whole, granule, length) if granule and not is_zero else None
    return data, digest, is_zero, runs, buf


def _is_zero(buf: Any, length: int, zero_full: bytes) -> bool:
    """memcmp-speed zero test of the first ``length`` bytes of a bytearray or mmap buffer."""
    if not length or buf[0] != 0:
        return not length
    if length == len(zero_full) == len(buf) and isinstance(buf, (bytes, bytearray)):
        return buf == zero_full
    return buf[:length] == codec.zero_bytes(length)


def _hash_into(buf: Any, length: int, hash_fn: Callable[[Buffer], bytes]) -> bytes:
    with memoryview(buf)[:length] as mv:
        return hash_fn(mv)


# --- the engine ------------------------------------------------------------------------


class Engine:
    """The central parallel compressor (one per process; thread-safe).

    ``workers`` threads (0 = one per CPU) hash, compress, decompress and
    verify chunks of ``chunk_size`` bytes for every disk.  ``max_in_flight``
    chunks per running disk bound the memory (default ``2 x workers + 2``).
    """

    def __init__(
        self,
        *,
        workers: int = 0,
        chunk_size: int = 4 << 20,
        hash_algo: str = hashing.DEFAULT,
        max_in_flight: int | None = None,
    ) -> None:
        if chunk_size <= 0 or chunk_size & (chunk_size - 1):
            raise E.ProgrammerError(f"chunk size must be a power of two, not {chunk_size}")
        hashing.digest_size(hash_algo)  # validates the name
        self.workers = workers if workers > 0 else (os.cpu_count() or 1)
        self.chunk_size = chunk_size
        self.hash_algo = hash_algo
        self.max_in_flight = max_in_flight or (2 * self.workers + 2)
        codec.tune_malloc()
        self._pool = futures.ThreadPoolExecutor(self.workers, thread_name_prefix="ganeti-vol-lz4")

    @classmethod
    def from_config(cls, cfg: Any, *, busy_cpus: int = 0) -> Engine:
        """An engine with the node config's workers, chunk size and chunk hash.

        With ``workers = 0`` the pool gets one thread per CPU, minus
        ``busy_cpus`` kept for other busy processes (an export or import
        script streaming through a pipe): on 2 CPUs one worker beside a
        ``cat`` script is 1.1-1.2x faster than two (doc/performance.md), while
        raw mode is faster with two.
        """
        workers = cfg.workers or max(1, (os.cpu_count() or 1) - busy_cpus)
        return cls(workers=workers, chunk_size=cfg.chunk_size, hash_algo=cfg.chunk_hash)

    def close(self) -> None:
        """Stop the worker threads (waits for running chunks)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- export ------------------------------------------------------------------------

    def encode(
        self,
        fd: int,
        sink: ChunkSink,
        *,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        size_hint: Callable[[], int | None] | None = None,
        source_kind: str = "pipe",
        what: str = "disk",
        expected_size: int | None = None,
        verify_holes: bool = False,
        allow_empty: bool = False,
    ) -> EncodeSummary:
        """Read ``fd`` to EOF in chunks and put them, in order, into ``sink``.

        ``source_kind``: ``"pipe"`` (any sequential fd, e.g. an export script's
        stdout; the pipe is enlarged to 1 MiB), ``"file"`` (a regular file:
        holes skipped, see the module doc), ``"block"`` (a block device,
        pread) or ``"auto"`` (chosen from ``fstat``).  ``size_hint`` returns
        the size the script announced (``EXP_SIZE_FD``), or None; a dump of
        another size is a :class:`~ganeti_vol.core.errors.ShortTransfer`, as is an
        empty dump (unless ``allow_empty``) or one that differs from
        ``expected_size``.  ``fd`` is never closed here.
        """
        if source_kind not in SOURCE_KINDS:
            raise E.ProgrammerError(f"unknown source kind {source_kind!r}")
        if source_kind == "auto":
            mode = os.fstat(fd).st_mode
            source_kind = (
                "file" if stat.S_ISREG(mode) else "block" if stat.S_ISBLK(mode) else "pipe"
            )
        progress = progress or _NoProgress()
        started, t0 = time.time(), time.monotonic()
        reader: _PipeReader | RandomAccessReader
        if source_kind == "pipe":
            reader = _PipeReader(fd, what, cancel, progress.touch)
        else:
            reader = RandomAccessReader(
                fd, what, source_kind, verify_holes, sparse_runs=sink.compress
            )
        try:
            total = reader.size if reader.size is not None else expected_size
            progress.set_total(total)
            info = EncodeInfo(
                what, self.chunk_size, self.hash_algo, source_kind, reader.size, reader.identity
            )
            try:
                sink.begin(info)
                counts = self._encode_loop(reader, sink, progress, cancel, what, size_hint)
                reader.finish()
                hint = size_hint() if size_hint is not None else None
                if counts["size"] or not allow_empty:
                    self._check_size(what, counts["size"], hint, expected_size)
                summary = EncodeSummary(
                    what=what, source_kind=source_kind, chunk_size=self.chunk_size,
                    hash_algo=self.hash_algo,
                    compression=codec.COMPRESSION if sink.compress else None,
                    started=started, seconds=time.monotonic() - t0, size_hint=hint,
                    source_identity=reader.identity, **counts,
                )
                sink.finish(summary)
            except BaseException as err:
                sink.abort(err)
                raise
        finally:
            reader.close()
        log.debug("encoded %s: %d bytes in %.2fs", what, summary.size, summary.seconds)
        return summary

    @staticmethod
    def _check_size(what: str, size: int, hint: int | None, expected: int | None) -> None:
        if size == 0:
            raise E.ShortTransfer(
                f"cannot export {what}: the export produced no data", expected=hint, actual=0
            )
        if hint is not None and hint != size:
            raise E.ShortTransfer(
                what=f"cannot export {what}: size announced on EXP_SIZE_FD does not match",
                expected=hint, actual=size,
            )
        if expected is not None and expected != size:
            raise E.ShortTransfer(what=f"cannot export {what}", expected=expected, actual=size)

    def _encode_loop(
        self,
        reader: _PipeReader | RandomAccessReader,
        sink: ChunkSink,
        progress: Progress,
        cancel: threading.Event | None,
        what: str,
        size_hint: Callable[[], int | None] | None,
    ) -> dict[str, Any]:
        cs, algo = self.chunk_size, self.hash_algo
        hash_fn = hashing.hash_function(algo)
        compress, want_crc = sink.compress, sink.want_crc
        known = getattr(sink, "known", None) if compress else None
        zero_full = codec.zero_bytes(cs)
        digest = hashing.DiskDigest(algo, cs)
        c = {"size": 0, "chunks": 0, "zero_chunks": 0, "zero_bytes": 0, "hole_bytes": 0,
             "stored_bytes": 0}
        buffers = _Buffers(cs, self.max_in_flight)
        inflight = _InFlight(cancel, f"cannot export {what}")
        announced = size_hint is None
        next_hint_check = 0.0

        def emit(entry: tuple[Any, Any]) -> None:
            item, result = entry
            if isinstance(item, Chunk):
                chunk = item
            else:
                index, length, buf = item
                mv = memoryview(buf)[:length] if not compress else None
                chunk = Chunk(index, index * cs, length, False, result[0], result[1], mv,
                              result[2])
            sink.write_chunk(chunk)
            c["chunks"] += 1
            c["size"] += chunk.length
            if chunk.frame is not None or not compress:  # (a chunk the sink knew stores nothing)
                c["stored_bytes"] += len(chunk.frame) if chunk.frame is not None else chunk.length
            if chunk.zero:
                c["zero_chunks"] += 1
                c["zero_bytes"] += chunk.length
            digest.update(chunk.hash)  # type: ignore[arg-type]
            progress.advance(chunk.length)
            if not isinstance(item, Chunk):
                if isinstance(chunk.data, memoryview):
                    chunk.data.release()
                buffers.put(item[2])

        try:
            index = 0
            while True:
                check_cancel(cancel, f"cannot export {what}")
                buf = buffers.get(inflight, emit)
                n, hole, runs, zero = reader.read_chunk(buf, index * cs, cs)
                if n == 0:
                    buffers.put(buf)
                    break
                if runs is not None:
                    c["hole_bytes"] += n - sum(end - start for start, end in runs)
                if zero is None:
                    zero = hole or (_runs_are_zero(buf, runs) if runs
                                    else _is_zero(buf, n, zero_full))
                if zero:
                    if hole:
                        c["hole_bytes"] += n
                    buffers.put(buf)
                    zc = Chunk(index, index * cs, n, True, hashing.zero_hash(algo, n),
                               codec.zero_frame(n) if compress else None,
                               None if compress else codec.zero_bytes(n))
                    if want_crc and zc.frame is not None:
                        zc.crc = zlib.crc32(zc.frame)
                    inflight.add(zc, None)
                elif runs:
                    fut = self._pool.submit(_encode_runs, buf, n, runs, algo, want_crc, known)
                    inflight.add((index, n, buf), fut)
                else:
                    fut = self._pool.submit(_encode_one, buf, n, hash_fn, compress, want_crc,
                                            known)
                    inflight.add((index, n, buf), fut)
                index += 1
                while (entry := inflight.pop(block=len(inflight) > 4 * self.max_in_flight)):
                    emit(entry)
                if not announced and time.monotonic() >= next_hint_check:
                    next_hint_check = time.monotonic() + 0.25  # a syscall: not every chunk
                    hint = size_hint()  # type: ignore[misc]
                    if hint is not None:
                        announced = True
                        progress.set_total(hint)
                if n < cs:
                    break
            while (entry := inflight.pop(block=True)):
                emit(entry)
            # an EOF may be the effect of a cancellation (the watchdog killed the script)
            check_cancel(cancel, f"cannot export {what}")
        except BaseException:
            inflight.abort()
            raise
        c["digest"] = digest.finish(c["size"])
        return c

    # -- import ------------------------------------------------------------------------

    def _in_flight(self, chunk_bytes: int) -> int:
        """Chunks one decode or read-back keeps in flight: bounded by bytes as well.

        At least ``workers + 2`` (every worker busy, one ready, one being
        read), but no more than :data:`_DECODE_BUDGET` worth: the largest
        chunk size must not multiply the memory of the default one.
        """
        return min(self.max_in_flight, max(self.workers + 2, _DECODE_BUDGET // chunk_bytes))

    def decode(
        self,
        source: ChunkSource,
        target: Target,
        *,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> DecodeSummary:
        """Verify every chunk of ``source`` and write it, in order, to ``target``.

        Each chunk's hash is checked in a worker *before* the chunk is passed
        to the target; zero chunks are recognised by their flag and frame
        bytes without decompressing.  Then the source checks its whole-disk
        digest, the target flushes (and a :class:`RawTarget` is read back and
        verified).  On any error the target is aborted; a raw target that may
        hold part of the data is reported as broken in the error message.
        """
        progress = progress or _NoProgress()
        what = source.what
        algo = source.hash_algo or self.hash_algo
        t0 = time.monotonic()
        if not codec.valid_chunk_size(source.chunk_size):
            raise E.ArchiveError(f"cannot read {what}: chunk size {source.chunk_size!r} is not "
                                 "a power of two from 64 KiB to 16 MiB")
        progress.set_total(source.size)
        required = max(source.disk_size or 0, source.size or 0)
        try:
            target.begin(required or None, source.chunk_size, what, cancel, progress.touch)
            # the chunk hashes for the read-back, packed (hash length bytes per chunk)
            hashes = _Hashes(algo) if target.can_read_back else None
            counts = self._decode_loop(source, target, progress, cancel, algo, hashes)
            summary = DecodeSummary(what=what, hash_algo=algo, seconds=0.0, **counts)
            source.finish(summary)
            progress.set_stage("flushing")
            target.finish()
            if hashes is not None:
                progress.set_stage("verifying")
                codec.trim_malloc()  # the decode's buffers are free: its peak and ours never add
                self._read_back(target, source.chunk_size, counts["size"], algo, hashes,
                                progress, cancel, what)
                summary.read_back = True
            target.close()
        except BaseException as err:
            target.abort()
            broken = _mark_broken(err, target, what)
            if broken is err:
                raise
            raise broken from err
        summary.seconds = time.monotonic() - t0
        return summary

    def _decode_loop(
        self,
        source: ChunkSource,
        target: Target,
        progress: Progress,
        cancel: threading.Event | None,
        algo: str,
        hashes: _Hashes | None,
    ) -> dict[str, Any]:
        what, cs = source.what, source.chunk_size
        hash_fn = hashing.hash_function(algo)
        zero_full = codec.zero_bytes(cs)
        granule = getattr(target, "sparse_granule", 0)
        digest = hashing.DiskDigest(algo, cs)
        c = {"size": 0, "chunks": 0, "zero_chunks": 0, "zero_bytes": 0}
        inflight = _InFlight(cancel, f"cannot import {what}")
        max_in_flight = self._in_flight(2 * cs)  # a frame and its decoded bytes
        outputs = _OutputBuffers(cs)
        nxt = {"index": 0, "offset": 0, "short": False}

        def check_order(chunk: Chunk) -> None:
            """Chunks come in order, each ``chunk_size`` long but the last (before any work)."""
            if (chunk.index != nxt["index"] or chunk.offset != nxt["offset"] or nxt["short"]
                    or not 0 < chunk.length <= cs):
                raise E.IntegrityError(
                    f"cannot read {what}: chunk {chunk.index} of {chunk.length} bytes at offset "
                    f"{chunk.offset} out of order (expected chunk {nxt['index']} at offset "
                    f"{nxt['offset']}{', after the last, short chunk' if nxt['short'] else ''})",
                    offset=nxt["offset"],
                )
            nxt["index"] += 1
            nxt["offset"] += chunk.length
            nxt["short"] = chunk.length < cs

        def emit(entry: tuple[Any, Any]) -> None:
            chunk, (data, digest_bytes, is_zero, runs, buf) = entry
            if is_zero:
                target.write_zero(chunk.offset, chunk.length)
                c["zero_chunks"] += 1
                c["zero_bytes"] += chunk.length
            elif runs is None:
                target.write(chunk.offset, data)
            else:  # a sparse target: write the data runs only, skip the zero granules
                pos = 0
                for a, b in runs:
                    if a > pos:
                        target.write_zero(chunk.offset + pos, a - pos)
                    target.write(chunk.offset + a, memoryview(data)[a:b])
                    pos = b
                if pos < chunk.length:
                    target.write_zero(chunk.offset + pos, chunk.length - pos)
            outputs.give(buf)
            if hashes is not None:
                hashes.append(digest_bytes)
            digest.update(digest_bytes)
            c["chunks"] += 1
            c["size"] += chunk.length
            progress.advance(chunk.length)

        chunks = source.chunks()
        try:
            for chunk in chunks:
                check_cancel(cancel, f"cannot import {what}")
                check_order(chunk)
                if chunk.zero:
                    inflight.add(chunk, None, self._zero_result(chunk, algo, what))
                else:
                    fut = self._pool.submit(_decode_one, chunk, hash_fn, zero_full, what,
                                            granule, outputs)
                    inflight.add(chunk, fut)
                while (entry := inflight.pop(block=len(inflight) >= max_in_flight)):
                    emit(entry)
            while (entry := inflight.pop(block=True)):
                emit(entry)
            check_cancel(cancel, f"cannot import {what}")
        except BaseException:
            inflight.abort()
            raise
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # a generator source closes its files now, not at garbage collection
        c["digest"] = digest.finish(c["size"])
        return c

    @staticmethod
    def _zero_result(
        chunk: Chunk, algo: str, what: str
    ) -> tuple[None, bytes, bool, None, None]:
        """Check a zero chunk without decompressing it: its frame and hash must be the known ones."""
        zh = hashing.zero_hash(algo, chunk.length)
        if (chunk.frame is not None and not codec.is_zero_frame(chunk.frame, chunk.length)) or (
            chunk.hash is not None and chunk.hash != zh
        ):
            raise E.IntegrityError(
                f"cannot read {what} at offset {chunk.offset}: "
                "zero chunk does not match the zero frame (corrupt data)",
                offset=chunk.offset,
            )
        return None, zh, True, None, None

    def _read_back(
        self,
        target: Target,
        cs: int,
        size: int,
        algo: str,
        hashes: _Hashes,
        progress: Progress,
        cancel: threading.Event | None,
        what: str,
    ) -> None:
        """Re-read every chunk from the target (caches dropped) and compare its hash."""
        hash_fn = hashing.hash_function(algo)
        zero_full = codec.zero_bytes(cs)
        buffers = _Buffers(cs, self._in_flight(cs), getattr(target, "aligned_reads", False))
        inflight = _InFlight(cancel, f"cannot verify {what}")

        def check(entry: tuple[Any, Any]) -> None:
            (index, length, buf), digest_bytes = entry
            if digest_bytes != hashes[index]:
                raise E.IntegrityError(
                    f"cannot verify {what}: read-back at offset {index * cs} does not match "
                    "what was written (the target's data is wrong)",
                    offset=index * cs,
                )
            buffers.put(buf)
            progress.verified(length)

        try:
            for index in range(len(hashes)):
                check_cancel(cancel, f"cannot verify {what}")
                buf = buffers.get(inflight, check)
                length = min(cs, size - index * cs)
                n = target.read_into(index * cs, memoryview(buf)[:length])
                if n != length:
                    raise E.IntegrityError(
                        f"cannot verify {what}: target ends at offset {index * cs + n}",
                        offset=index * cs + n,
                    )
                zh = hashing.zero_hash(algo, length)
                if hashes[index] == zh and _is_zero(buf, length, zero_full):
                    inflight.add((index, length, buf), None, zh)
                else:
                    inflight.add((index, length, buf), self._pool.submit(_hash_into, buf, length,
                                                                         hash_fn))
                while (entry := inflight.pop(block=False)):
                    check(entry)
            while (entry := inflight.pop(block=True)):
                check(entry)
        except BaseException:
            inflight.abort()
            raise


def _mark_broken(err: BaseException, target: Target, what: str) -> BaseException:
    """Say in the error that a target which may hold part of the data is broken."""
    note = target.broken_note()
    if not note:
        return err
    log.error("%s: %s", what, note)
    if isinstance(err, E.GanetiVolError):
        new = type(err)(f"{err}; {note}", **err.fields)
        return new
    return err


# --- targets (import side) -------------------------------------------------------------


class Target:
    """Where :meth:`Engine.decode` writes verified bytes; subclasses override what they need."""

    #: True if the engine should read the data back and verify it after ``finish``
    can_read_back = False
    #: > 0: zero runs of this granularity inside data chunks may be skipped (write_zero)
    sparse_granule = 0
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
        self.write(offset, codec.zero_bytes(length))

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
        if not self.known_zero and not self.is_block and _all_hole(self.fd):
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
            if aligned and _blkzeroout(self.fd, offset, aligned):
                offset, length = offset + aligned, length - aligned
        elif _punch_hole(self.fd, offset, length):
            return
        for pos in range(offset, offset + length, 4 << 20):
            n = min(4 << 20, offset + length - pos)
            pwrite_all(self.fd, codec.zero_bytes(n), pos, self.what)

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
        """Read back for verification (O_DIRECT when possible: aligned, whole blocks)."""
        assert self.fd is not None
        if self.direct_fd is not None and len(mv) % 4096 == 0 and offset % 4096 == 0:
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


def _all_hole(fd: int) -> bool:
    """True if a file has no data extent at all (after fsync): it reads as zeros."""
    try:
        os.fsync(fd)
        os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as err:
        return err.errno == errno.ENXIO
    return False


def _blkzeroout(fd: int, offset: int, length: int) -> bool:
    try:
        fcntl.ioctl(fd, _BLKZEROOUT, struct.pack("QQ", offset, length))
    except OSError as err:
        log.debug("BLKZEROOUT failed (%s): writing zeros", err)
        return False
    return True


_libc: Any = None
_SYNC_FILE_RANGE_WRITE = 2


def _get_libc() -> Any:
    global _libc
    if _libc is None:
        libc = fdutil.libc()
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                         ctypes.c_uint]
        _libc = libc
    return _libc


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _get_libc().fallocate(fd, mode, offset, length) == 0:
        return True
    log.debug("punching a hole failed (%s): writing zeros", os.strerror(ctypes.get_errno()))
    return False


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
            _get_libc().sync_file_range(self.fd, self.started, end - self.started,
                                        _SYNC_FILE_RANGE_WRITE)
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
