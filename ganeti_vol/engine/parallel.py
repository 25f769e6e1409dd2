"""The central parallel compressor: disks encoded into chunks, and chunks decoded into disks.

One :class:`Engine` per process holds the *one central parallel compressor*:
a thread pool shared by every disk (python-lz4, xxhash and hashlib release
the GIL, so the workers really run in parallel).  Several disks may be
encoded or decoded at the same time from several threads; each call keeps
its own bounded set of in-flight chunks (:mod:`ganeti_vol.engine.workers`),
so peak memory stays at roughly ``2 x max_in_flight x chunk_size`` per
running disk whatever the disk size.

Export of one disk (``source_kind`` is ``"pipe"`` for an export script's
stdout, ``"file"`` or ``"block"`` for raw mode; :mod:`ganeti_vol.engine.sources`)::

    from ganeti_vol.core.fdio import Cancel
    from ganeti_vol.engine.parallel import Engine
    from ganeti_vol.formats.archive import ArchiveWriter, DiskMeta

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
is passed on; :mod:`ganeti_vol.engine.targets`)::

    from ganeti_vol.engine.targets import RawTarget, StreamTarget
    from ganeti_vol.formats.archive import open_archive

    archive = open_archive(path)            # native archive or Ganeti v0 export
    with process.open_script_stream(..., direction="write", op="import") as script_io:
        engine.decode(archive.disk(0), StreamTarget(script_io.fd),
                      progress=progress.disk(0), cancel=cancel)
    # raw mode: pwrite into the disk, fsync, drop caches, read back and verify
    engine.decode(archive.disk(0), RawTarget(disk_path, known_zero=True), cancel=cancel)

A stream made by ``export -o -`` is read with :class:`ganeti_vol.formats.wire.WireReader`,
whose ``disks()`` yields sources for :meth:`Engine.decode` in the same way.

On every error path the in-flight chunks are cancelled or waited for, the
fds this module opened are closed, and the sink or target is aborted.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from concurrent import futures
from typing import Any

from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import check_cancel
from ganeti_vol.core.holes import is_zero, runs_are_zero, zero_bytes
from ganeti_vol.engine import codec, hashing
from ganeti_vol.engine.chunks import (
    SOURCE_KINDS,
    Chunk,
    ChunkSink,
    ChunkSource,
    DecodeSummary,
    EncodeInfo,
    EncodeSummary,
    NoProgress,
    Progress,
)
from ganeti_vol.engine.sources import PipeReader, RandomAccessReader
from ganeti_vol.engine.targets import Target, write_runs
from ganeti_vol.engine.workers import (
    DECODE_BUDGET,
    Buffers,
    Hashes,
    InFlight,
    OutputBuffers,
    decode_one,
    encode_one,
    encode_runs,
    read_back,
)

log = logging.getLogger(__name__)


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
        unchanged: Mapping[int, bytes] | None = None,
    ) -> EncodeSummary:
        """Read ``fd`` to EOF in chunks and put them, in order, into ``sink``.

        ``source_kind``: ``"pipe"`` (any sequential fd, e.g. an export script's
        stdout; the pipe is enlarged to 1 MiB), ``"file"`` (a regular file:
        holes skipped, see the module doc), ``"block"`` (a block device,
        pread) or ``"auto"`` (chosen from ``fstat``).  ``size_hint`` returns
        the size the script announced (``EXP_SIZE_FD``), or None; a dump of
        another size is a :class:`~ganeti_vol.core.errors.ShortTransfer`, as is an
        empty dump (unless ``allow_empty``) or one that differs from
        ``expected_size``.  ``fd`` is never closed here.  ``unchanged``: chunk
        index -> digest of chunks a change map found as the sink's store has them
        (:mod:`ganeti_vol.system.changemap`); they are not read, and the sink gets
        them as known chunks (no frame); the sink is not asked about the others
        (``known``).  Only for a file or block source and a sink that compresses
        and knows chunks.
        """
        if source_kind not in SOURCE_KINDS:
            raise E.ProgrammerError(f"unknown source kind {source_kind!r}")
        if source_kind == "auto":
            mode = os.fstat(fd).st_mode
            source_kind = (
                "file" if stat.S_ISREG(mode) else "block" if stat.S_ISBLK(mode) else "pipe"
            )
        progress = progress or NoProgress()
        started, t0 = time.time(), time.monotonic()
        reader: PipeReader | RandomAccessReader
        if source_kind == "pipe":
            reader = PipeReader(fd, what, cancel, progress.touch)
        else:
            reader = RandomAccessReader(
                fd, what, source_kind, verify_holes, sparse_runs=sink.compress
            )
        if unchanged:
            if not isinstance(reader, RandomAccessReader) or not sink.compress \
                    or not hasattr(sink, "known"):
                raise E.ProgrammerError(f"{what}: a change map needs a file or block source "
                                        "and a sink that knows chunks")
            cs = self.chunk_size
            reader.only_chunks([i * cs for i in range(-(-reader.size // cs))
                                if i not in unchanged], cs)
        try:
            total = reader.size if reader.size is not None else expected_size
            progress.set_total(total)
            info = EncodeInfo(
                what, self.chunk_size, self.hash_algo, source_kind, reader.size, reader.identity
            )
            try:
                sink.begin(info)
                counts = self._encode_loop(reader, sink, progress, cancel, what, size_hint,
                                           unchanged or {})
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
        reader: PipeReader | RandomAccessReader,
        sink: ChunkSink,
        progress: Progress,
        cancel: threading.Event | None,
        what: str,
        size_hint: Callable[[], int | None] | None,
        unchanged: Mapping[int, bytes],
    ) -> dict[str, Any]:
        cs, algo = self.chunk_size, self.hash_algo
        hash_fn = hashing.hash_function(algo)
        compress, want_crc = sink.compress, sink.want_crc
        # with a change map the chunks read are the ones rewritten since the last backup:
        # almost always new, so they are stored without asking first (a store that has
        # one already keeps it and says so)
        known = getattr(sink, "known", None) if compress and not unchanged else None
        zero_full = zero_bytes(cs)
        digest = hashing.DiskDigest(algo, cs)
        c: dict[str, Any] = {"size": 0, "chunks": 0, "zero_chunks": 0, "zero_bytes": 0,
                             "hole_bytes": 0, "stored_bytes": 0, "unchanged_bytes": 0}
        buffers = Buffers(cs, self.max_in_flight)
        inflight = InFlight(cancel, f"cannot export {what}")
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
                known_digest = unchanged.get(index)
                if known_digest is not None:  # as in the last backup: not read
                    n = min(cs, reader.size - index * cs)  # type: ignore[operator]
                    c["unchanged_bytes"] += n
                    inflight.add(Chunk(index, index * cs, n, False, known_digest), None)
                    index += 1
                    while (entry := inflight.pop(block=False)):
                        emit(entry)
                    if n < cs:
                        break
                    continue
                buf = buffers.get(inflight, emit)
                n, hole, runs, zero = reader.read_chunk(buf, index * cs, cs)
                if n == 0:
                    buffers.put(buf)
                    break
                if runs is not None:
                    c["hole_bytes"] += n - sum(end - start for start, end in runs)
                if zero is None:
                    zero = hole or (runs_are_zero(buf, runs) if runs
                                    else is_zero(buf, n, zero_full))
                if zero:
                    if hole:
                        c["hole_bytes"] += n
                    buffers.put(buf)
                    zc = Chunk(index, index * cs, n, True, hashing.zero_hash(algo, n),
                               codec.zero_frame(n) if compress else None,
                               None if compress else zero_bytes(n))
                    if want_crc and zc.frame is not None:
                        zc.crc = zlib.crc32(zc.frame)
                    inflight.add(zc, None)
                elif runs:
                    fut = self._pool.submit(encode_runs, buf, n, runs, algo, want_crc, known)
                    inflight.add((index, n, buf), fut)
                else:
                    fut = self._pool.submit(encode_one, buf, n, hash_fn, compress, want_crc,
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

    def in_flight(self, chunk_bytes: int) -> int:
        """Chunks one decode or read-back keeps in flight: bounded by bytes as well.

        At least ``workers + 2`` (every worker busy, one ready, one being
        read), but no more than :data:`DECODE_BUDGET` worth: the largest
        chunk size must not multiply the memory of the default one.
        """
        return min(self.max_in_flight, max(self.workers + 2, DECODE_BUDGET // chunk_bytes))

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
        progress = progress or NoProgress()
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
            hashes = Hashes(algo) if target.can_read_back else None
            counts = self._decode_loop(source, target, progress, cancel, algo, hashes)
            summary = DecodeSummary(what=what, hash_algo=algo, seconds=0.0, **counts)
            source.finish(summary)
            progress.set_stage("flushing")
            target.finish()
            if hashes is not None:
                progress.set_stage("verifying")
                codec.trim_malloc()  # the decode's buffers are free: its peak and ours never add
                read_back(target, hashes, source.chunk_size, counts["size"], algo, self._pool,
                          self.in_flight(source.chunk_size), aligned=target.aligned_reads,
                          progress=progress.verified, cancel=cancel, what=what)
                summary.read_back = True
            target.close()
        except BaseException as err:
            target.abort()
            broken = mark_broken(err, target, what)
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
        hashes: Hashes | None,
    ) -> dict[str, Any]:
        what, cs = source.what, source.chunk_size
        hash_fn = hashing.hash_function(algo)
        zero_full = zero_bytes(cs)
        granule = target.sparse_granule
        digest = hashing.DiskDigest(algo, cs)
        c: dict[str, Any] = {"size": 0, "chunks": 0, "zero_chunks": 0, "zero_bytes": 0}
        inflight = InFlight(cancel, f"cannot import {what}")
        max_in_flight = self.in_flight(2 * cs)  # a frame and its decoded bytes
        outputs = OutputBuffers(cs)
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
            chunk, (data, digest_bytes, zero_chunk, runs, buf) = entry
            if zero_chunk:
                target.write_zero(chunk.offset, chunk.length)
                c["zero_chunks"] += 1
                c["zero_bytes"] += chunk.length
            elif runs is None:
                target.write(chunk.offset, data)
            else:  # a sparse target: write the data runs only, skip the zero granules
                write_runs(target, chunk.offset, data, chunk.length, runs)
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
                    fut = self._pool.submit(decode_one, chunk, hash_fn, zero_full, what,
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


def mark_broken(err: BaseException, target: Target, what: str) -> BaseException:
    """Say in the error that a target which may hold part of the data is broken."""
    note = target.broken_note()
    if not note:
        return err
    log.error("%s: %s", what, note)
    if isinstance(err, E.GanetiVolError):
        return err.restated(f"; {note}", target_broken=True)
    return err
