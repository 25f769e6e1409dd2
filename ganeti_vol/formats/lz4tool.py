"""The stream of ``ganeti-vol-lz4``, the compression tool for Ganeti's own transfers.

Ganeti's import/export daemon moves disks with ``dd | TOOL | socat`` and
``socat | TOOL -d | dd`` (``doc/remote.md``).  :func:`compress` and
:func:`decompress` are those two filters, built on the streaming engine
(:mod:`ganeti_vol.engine.parallel`): the input is cut into 4 MiB chunks, zero chunks
are recognised and sent as a flag, the others are hashed (xxh3-128) and
compressed into one LZ4 frame each, in parallel; decompression checks every
chunk's hash in a worker *before* the chunk is written, so a corrupt or
missing chunk stops the output at the last good chunk.

The stream is lighter than ``export -o -`` (no instance, no config.ini), and
laid out like it (``doc/remote.md`` § "The stream", little-endian)::

    header  20 bytes  <8sHBBII: b"GVLZ4T1\\n", version 1, log2(chunk size), 0,
                      feature bits (0), crc32 of the 16 bytes before
    record  40 bytes  <2sBBIIQ16sI: b"GC", type, flags, payload length,
                      chunk length, index, xxh3-128, crc32 of the 36 bytes before
            payload   CHUNK: the chunk's LZ4 frame (none for a zero chunk, flag bit 0)
                      END: JSON {size, chunks, zero_chunks, digest}; the hash covers it

    header CHUNK* END, then end of input

Memory stays bounded whatever the input: at most ``MAX_IN_FLIGHT`` chunks
(each with its frame) are held by a side, and all threads share one malloc
heap: a peak RSS of 70-120 MiB with any number of threads.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from typing import Any

from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import (
    PipeWriter,
    check_cancel,
    close_fd,
    enlarge_pipe,
    read_full,
    read_some,
    reopen_nonblocking,
)
from ganeti_vol.engine import codec, hashing
from ganeti_vol.engine.chunks import Chunk, DecodeSummary, EncodeInfo, EncodeSummary, check_decoded
from ganeti_vol.engine.parallel import Engine
from ganeti_vol.engine.targets import StreamTarget

MAGIC = b"GVLZ4T1\n"
VERSION = 1
#: feature bits this version reads (a stream with any other bit set needs a newer reader)
FEATURES = 0
CHUNK_SIZE = 4 << 20
HASH = "xxh3-128"
CHUNK, END = 1, 2
FLAG_ZERO = 0x01
#: default worker threads: one per CPU but one (kept for the pipeline's dd and socat, as
#: Engine.from_config's busy_cpus), at least one, at most this
MAX_WORKERS = 4
#: chunks held by one side at most (each with its frame): the memory bound
MAX_IN_FLIGHT = 8
MAX_END = 64 << 10

_HEADER = struct.Struct("<8sHBBII")
_RECORD = struct.Struct("<2sBBIIQ16sI")
_MARKER = b"GC"
_WHAT = "the compressed stream on stdin"

#: first bytes of what is often fed to ``-d`` by mistake, for the error message
_LOOKALIKES = (
    (b"\x1f\x8b", "gzip data"),
    (b"\x04\x22\x4d\x18", "an lz4 frame"),
    (b"\x28\xb5\x2f\xfd", "zstd data"),
    (b"\x89LZO", "lzop data"),
    (b"GVSTRM1\n", "a ganeti-vol export stream"),
    (b"M=", "an uncompressed Ganeti transfer"),
)


def _hash(data: bytes | bytearray | memoryview) -> bytes:
    return hashing.chunk_hash(HASH, data)


def _record(rtype: int, flags: int, payload_len: int, length: int, index: int,
            digest: bytes) -> bytes:
    head = _RECORD.pack(_MARKER, rtype, flags, payload_len, length, index, digest, 0)[:-4]
    return head + struct.pack("<I", zlib.crc32(head))


def engine(workers: int = 0) -> Engine:
    """The engine of one side: ``workers`` threads (0: one per CPU but one, 1 to ``MAX_WORKERS``).

    Whatever the number of threads, at most ``MAX_IN_FLIGHT`` chunks are held.
    """
    workers = workers if workers > 0 else max(1, min((os.cpu_count() or 1) - 1, MAX_WORKERS))
    codec.limit_arenas(1)  # one heap: the buffers freed by any thread are reused by all
    return Engine(workers=workers, chunk_size=CHUNK_SIZE, hash_algo=HASH,
                          max_in_flight=min(2 * workers + 2, MAX_IN_FLIGHT))


# --- compressing -----------------------------------------------------------------------


class _RecordSink:
    """Writes the header, one record per chunk and the END record to ``fd``."""

    compress = True
    want_crc = False

    def __init__(self, fd: int, cancel: threading.Event | None) -> None:
        enlarge_pipe(fd)
        self.out = PipeWriter(fd, "the compressed stream to stdout", cancel)
        self.written = 0

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        self.out.write(data)
        self.written += len(data)

    def begin(self, info: EncodeInfo) -> None:
        head = _HEADER.pack(MAGIC, VERSION, info.chunk_size.bit_length() - 1, 0, FEATURES, 0)
        self._write(head[:-4] + struct.pack("<I", zlib.crc32(head[:-4])))

    def write_chunk(self, chunk: Chunk) -> None:
        assert chunk.hash is not None
        if chunk.zero:
            self._write(_record(CHUNK, FLAG_ZERO, 0, chunk.length, chunk.index, chunk.hash))
            return
        assert chunk.frame is not None
        self._write(_record(CHUNK, 0, len(chunk.frame), chunk.length, chunk.index, chunk.hash))
        self._write(chunk.frame)

    def finish(self, summary: EncodeSummary) -> None:
        end = json.dumps({"size": summary.size, "chunks": summary.chunks,
                          "zero_chunks": summary.zero_chunks, "digest": summary.digest},
                         sort_keys=True).encode()
        self._write(_record(END, 0, len(end), 0, summary.chunks, _hash(end)) + end)

    def abort(self, error: BaseException) -> None:
        """Nothing to undo: a stream without its END record is refused by :func:`decompress`."""


def compress(in_fd: int, out_fd: int, *, workers: int = 0,
             cancel: threading.Event | None = None) -> EncodeSummary:
    """Compress everything from ``in_fd`` into one stream on ``out_fd`` (neither is closed).

    ``in_fd`` may be a pipe, a regular file (its holes are not even read) or
    a block device; empty input gives a valid stream of no chunks.
    """
    sink = _RecordSink(out_fd, cancel)
    with engine(workers) as eng:
        summary = eng.encode(in_fd, sink, cancel=cancel, source_kind="auto", what="stdin",
                             allow_empty=True)
    summary.stored_bytes = sink.written
    return summary


# --- decompressing ---------------------------------------------------------------------


class _RecordSource:
    """The chunks of a stream read from ``fd``, as a :class:`~ganeti_vol.engine.chunks.ChunkSource`."""

    hash_algo = HASH
    size: int | None = None
    disk_size: int | None = None

    def __init__(self, fd: int, cancel: threading.Event | None) -> None:
        self.what = _WHAT
        self.cancel = cancel
        self._own = reopen_nonblocking(fd, write=False)
        self.fd = self._own if self._own is not None else fd
        enlarge_pipe(fd)
        self.pos = 0  # bytes of the stream consumed
        self.end: dict[str, Any] | None = None
        try:
            self.chunk_size = self._header()
        except BaseException:
            self.close()
            raise
        self.max_frame = self.chunk_size + self.chunk_size // 255 + (64 << 10)

    def close(self) -> None:
        close_fd(self._own)
        self._own = None

    def _read(self, n: int, what: str) -> bytearray:
        buf = bytearray(n)
        got = read_full(self.fd, memoryview(buf), self.cancel, self.what)
        self.pos += got
        if got < n:
            check_cancel(self.cancel, f"cannot read {self.what}")
            raise E.StreamError(f"cannot read {self.what}: truncated at byte {self.pos} "
                                f"(while reading {what}); did the sender fail?")
        return buf

    def _corrupt(self, problem: str) -> E.IntegrityError:
        return E.IntegrityError(f"cannot read {self.what}: {problem} at byte {self.pos} "
                                "(corrupt data)")

    def _header(self) -> int:
        head = bytearray(_HEADER.size)
        got = read_full(self.fd, memoryview(head), self.cancel, self.what)
        self.pos = got
        if head[:min(got, len(MAGIC))] != MAGIC[:got] or got == 0:
            looks = next((name for magic, name in _LOOKALIKES if head.startswith(magic)), None)
            hint = (f"it looks like {looks}: do both sides use the same compression?"
                    if looks else "empty input" if got == 0 else
                    f"it starts with {bytes(head[:8]).hex()}")
            raise E.ArchiveError(f"cannot read {self.what}: not a ganeti-vol-lz4 stream "
                                 f"({hint})")
        if got < _HEADER.size:
            raise E.StreamError(f"cannot read {self.what}: truncated at byte {got} "
                                "(while reading the header)")
        _, version, log2, _, features, crc = _HEADER.unpack(head)
        if zlib.crc32(head[:-4]) != crc:
            raise self._corrupt("header checksum mismatch")
        if version > VERSION or features & ~FEATURES:
            raise E.ArchiveFormatError(
                f"cannot read {self.what}: stream version {version} with features "
                f"{features:#x}: a newer ganeti-vol is required")
        if not 16 <= log2 <= codec.MAX_CHUNK.bit_length() - 1:
            raise self._corrupt(f"chunk size 2^{log2} out of range")
        return int(1 << log2)

    def chunks(self) -> Iterator[Chunk]:
        index = 0
        try:
            while True:
                head = self._read(_RECORD.size, f"record {index}")
                marker, rtype, flags, plen, length, idx, digest, crc = _RECORD.unpack(head)
                if marker != _MARKER or zlib.crc32(head[:-4]) != crc:
                    raise self._corrupt(f"record {index} header checksum mismatch")
                if rtype == END:
                    self._end(plen, idx, digest, index)
                    return
                if rtype != CHUNK or flags & ~FLAG_ZERO:
                    raise self._corrupt(f"record {index} has unknown type {rtype} "
                                        f"or flags {flags:#x}")
                if idx != index:
                    raise self._corrupt(f"chunk {idx} found where chunk {index} was due")
                zero = bool(flags & FLAG_ZERO)
                if not 0 < length <= self.chunk_size or (zero and plen) or \
                        (not zero and not 0 < plen <= self.max_frame):
                    raise self._corrupt(f"chunk {index} claims {length} bytes in a "
                                        f"{plen}-byte frame")
                frame = self._read(plen, f"chunk {index}") if plen else None
                yield Chunk(index, index * self.chunk_size, length, zero,
                                    bytes(digest), frame)
                index += 1
        finally:
            self.close()

    def _end(self, plen: int, count: int, digest: bytes, index: int) -> None:
        if plen > MAX_END or count != index:
            raise self._corrupt(f"END record claims {count} chunks ({index} were read) "
                                f"and {plen} bytes")
        payload = self._read(plen, "the END record")
        if _hash(payload) != digest:
            raise self._corrupt("END record hash mismatch")
        try:
            end = json.loads(payload)
        except ValueError as err:
            raise self._corrupt(f"END record is not JSON ({err})") from err
        if not isinstance(end, dict):
            raise self._corrupt("END record is not a JSON object")
        probe = bytearray(1)
        if read_some(self.fd, memoryview(probe), self.cancel, self.what):
            raise self._corrupt("data after the END record")
        self.end = end

    def finish(self, summary: DecodeSummary) -> None:
        check_decoded(summary, self.end or {}, self.what, 0, "the compressing side")


class _Output(StreamTarget):
    """Verified chunks, in order, to ``fd`` (zero chunks spliced into a pipe, not copied)."""

    def open(self, required: int | None, chunk_size: int) -> None:
        super().open(required, chunk_size)
        self.what = "the decompressed data to stdout"
        assert self.out is not None
        self.out.what = self.what

    def broken_note(self) -> str:
        return f"only verified data went to stdout ({self.written} bytes in whole chunks)"


def decompress(in_fd: int, out_fd: int, *, workers: int = 0,
               cancel: threading.Event | None = None) -> DecodeSummary:
    """Verify and decompress the stream on ``in_fd`` to ``out_fd`` (neither is closed).

    Every chunk is checked against its hash before it is written; the
    stream must end with its END record (whose totals and whole-stream digest
    must match) followed by the end of input.  On any error nothing after the
    last good chunk has been written.
    """
    source = _RecordSource(in_fd, cancel)
    try:
        with engine(workers) as eng:
            return eng.decode(source, _Output(out_fd), cancel=cancel)
    finally:
        source.close()
