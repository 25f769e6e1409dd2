"""The single self-describing stream of ``export -o -`` / ``import … -``.

One stream carries the instance metadata and every disk, so
``ganeti-vol export … -o - | ssh node2 ganeti-vol import … -`` works.  Disks
are sent one after the other (compression stays parallel inside a disk), so
the importer handles them in order.  Truncation or corruption anywhere is
detected: every record has a crc32 of its header and of its payload and a
sequence number, every chunk its hash, every disk its whole-disk digest, and
a stream without its trailer is a failure.  Layout (``doc/archive-format.md``
§ "Stream")::

    preamble  b"GVSTRM1\\n"  (8 bytes)
    record*   fixed header  <2sBBIQI: b"GR", type, flags, payload length, seq, payload crc32
              extension     CHUNK only: <QI4x chunk index, chunk length + chunk hash
              header crc32  <I over fixed header + extension
              payload       JSON (HEADER, DISK_BEGIN, DISK_END, TRAILER, ABORT)
                            or the chunk's LZ4 frame (empty for a zero chunk)

    HEADER (DISK_BEGIN CHUNK* DISK_END)* TRAILER     -- or ABORT anywhere after HEADER

Writing::

    with WireWriter(out_fd, instance, chunk_size=engine.chunk_size,
                    hash_algo=engine.hash_algo, cancel=cancel) as ww:
        for i in range(len(instance.disks)):           # one disk at a time
            engine.encode(fd_i, ww.disk_sink(i), cancel=cancel, ...)
    # a clean exit writes the trailer; an exception writes an ABORT record

Reading (each disk must be decoded before the next one is taken)::

    with WireReader(in_fd, cancel=cancel, activity=progress.touch) as reader:
        reader.instance, reader.config_ini              # metadata (private values never sent)
        for disk in reader.disks():                     # checks the trailer and EOF at the end
            engine.decode(disk, target_for(disk.index), progress=..., cancel=cancel)
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
import uuid as uuidlib
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from ganeti_vol import __version__
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
from ganeti_vol.core.model import Instance
from ganeti_vol.engine import codec, hashing
from ganeti_vol.engine.chunks import (
    Chunk,
    ChunkSink,
    DecodeSummary,
    EncodeInfo,
    EncodeSummary,
    check_decoded,
)
from ganeti_vol.formats import archive
from ganeti_vol.formats import ganeti_export as G

log = logging.getLogger(__name__)

PREAMBLE = b"GVSTRM1\n"
FORMAT = "ganeti-vol-stream"
FORMAT_VERSION = 1
SUPPORTED_FEATURES = frozenset({"lz4-frame-chunks", "record-crc32"})
WRITTEN_FEATURES = ("lz4-frame-chunks", "record-crc32")

HEADER, DISK_BEGIN, CHUNK, DISK_END, TRAILER, ABORT = 1, 2, 3, 4, 5, 6
_NAMES = {HEADER: "HEADER", DISK_BEGIN: "DISK_BEGIN", CHUNK: "CHUNK", DISK_END: "DISK_END",
          TRAILER: "TRAILER", ABORT: "ABORT"}
FLAG_ZERO = 0x01

_FIXED = struct.Struct("<2sBBIQI")
_MARKER = b"GR"
_CHUNK_EXT = struct.Struct("<QI4x")
_CRC = struct.Struct("<I")
#: the largest JSON record (the HEADER holds config.ini, at most archive.MAX_CONFIG)
MAX_JSON = archive.MAX_CONFIG + (1 << 20)
_READ_AHEAD = 1 << 16
_WHAT = "export stream"
#: the stream's path, on the command line and in results
STREAM = "-"


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


# --- writing ---------------------------------------------------------------------------


class WireWriter:
    """Write one stream to ``fd`` (not closed here); see the module doc.

    As an export's destination (:class:`ganeti_vol.ops.endpoints.ExportDestination`)
    it takes one disk at a time, and post hooks see no ``EXPORT_PATH``.
    """

    parallel = False
    path = STREAM
    hook_path = ""

    def __init__(
        self,
        fd: int,
        instance: Instance,
        *,
        chunk_size: int,
        hash_algo: str,
        disks: list[int] | None = None,
        cancel: threading.Event | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.instance = instance
        self.chunk_size = chunk_size
        self.hash_algo = hash_algo
        self.disks = list(range(len(instance.disks))) if disks is None else list(disks)
        self.cancel = cancel
        self.seq = 0
        self.what = f"{_WHAT} of '{instance.name}'"
        self._active: _WireDiskSink | None = None
        self._sent: list[int] = []
        self.logical_bytes = 0
        self.wire_bytes = 0
        self.closed = False
        enlarge_pipe(fd)
        self.out = PipeWriter(fd, self.what, cancel)
        dumps = {i: instance.disks[i].uuid for i in self.disks}
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "mandatory_features": list(WRITTEN_FEATURES),
            "optional_features": [],
            "export_id": str(uuidlib.uuid4()),
            "created": archive.iso_time(time.time()),
            "created_by": f"ganeti-vol {__version__}",
            "instance": {"name": instance.name, "os": instance.os, "uuid": instance.uuid},
            "config_ini": G.render_config(instance, dumps),
            "osparams_private_omitted": sorted(instance.osparams_private),
            "chunk_size": chunk_size,
            "hash": hash_algo,
            "disks": self.disks,
            **(extra or {}),
        }
        self._write(PREAMBLE)
        self.record(HEADER, _json(header))

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        self.out.write(data)
        self.wire_bytes += len(data)

    def record(
        self, rtype: int, payload: bytes | bytearray, *, flags: int = 0, ext: bytes = b"",
        payload_crc: int | None = None,
    ) -> None:
        """Append one record (payload_crc may come precomputed from a worker)."""
        crc = zlib.crc32(payload) if payload_crc is None else payload_crc
        head = _FIXED.pack(_MARKER, rtype, flags, len(payload), self.seq, crc) + ext
        self._write(head + _CRC.pack(zlib.crc32(head)))
        if payload:
            self._write(payload)
        self.seq += 1

    def extra_result(self) -> dict[str, Any]:
        return {}

    def disk_sink(self, index: int, meta: archive.DiskMeta | None = None) -> ChunkSink:
        """The sink of disk ``index``; disks go one at a time, in the announced order."""
        if self._active is not None:
            raise E.ProgrammerError(f"disk {self._active.meta.index} of the stream is still open")
        expected = self.disks[len(self._sent)] if len(self._sent) < len(self.disks) else None
        if index != expected:
            raise E.ProgrammerError(f"stream expects disk {expected} next, not {index}")
        self._active = _WireDiskSink(self, meta or archive.DiskMeta.for_disk(self.instance, index))
        return self._active

    def _disk_closed(self, sink: _WireDiskSink, ok: bool) -> None:
        self._active = None
        if ok:
            self._sent.append(sink.meta.index)

    def close(self) -> None:
        """Write the trailer (every announced disk must have been sent)."""
        if self.closed:
            return
        if self._sent != self.disks:
            raise E.StreamError(f"cannot finish {self.what}: disks {self.disks} announced, "
                                f"{self._sent} sent")
        self.record(TRAILER, _json({"disks": self._sent, "records": self.seq + 1,
                                    "logical_bytes": self.logical_bytes}))
        self.closed = True

    def abort(self, error: BaseException) -> None:
        """Tell the reader in-band why the stream stops (best effort), then stop."""
        if not self.closed:
            self.closed = True
            try:
                self.record(ABORT, _json({"error": str(error) or type(error).__name__}))
            except BaseException as err:  # the reader may be gone: its error is the news
                log.debug("cannot send the abort record: %s", err)

    def __enter__(self) -> WireWriter:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.abort(exc)
        else:
            self.close()


class _WireDiskSink:
    """Chunk sink of one disk in a stream (the workers compute each frame's crc)."""

    compress = True
    want_crc = True

    def __init__(self, writer: WireWriter, meta: archive.DiskMeta) -> None:
        self.writer = writer
        self.meta = meta

    def begin(self, info: EncodeInfo) -> None:
        w = self.writer
        if (info.chunk_size, info.hash_algo) != (w.chunk_size, w.hash_algo):
            raise E.ProgrammerError("engine and stream disagree on chunk size or hash")
        w.record(DISK_BEGIN, _json({
            "index": self.meta.index, "uuid": self.meta.uuid, "name": self.meta.name,
            "disk_size": self.meta.disk_size, "mode": self.meta.mode, "size": info.size,
            "chunk_size": info.chunk_size, "hash": info.hash_algo,
            "compression": codec.COMPRESSION,
            "source": {"kind": info.source_kind, "identity": info.source_identity,
                       **self.meta.source},
        }))

    def write_chunk(self, chunk: Chunk) -> None:
        assert chunk.hash is not None
        ext = _CHUNK_EXT.pack(chunk.index, chunk.length) + chunk.hash
        if chunk.zero:
            self.writer.record(CHUNK, b"", flags=FLAG_ZERO, ext=ext)
        else:
            assert chunk.frame is not None
            self.writer.record(CHUNK, chunk.frame, ext=ext, payload_crc=chunk.crc)
        self.writer.logical_bytes += chunk.length

    def finish(self, summary: EncodeSummary) -> None:
        self.writer.record(DISK_END, _json(summary.as_dict()))
        self.writer._disk_closed(self, True)

    def abort(self, error: BaseException) -> None:
        self.writer._disk_closed(self, False)


# --- reading ---------------------------------------------------------------------------


class _Input:
    """Buffered reads from the stream fd, waiting with cancel checks on pipes."""

    def __init__(
        self, fd: int, cancel: threading.Event | None, activity: Callable[[], None] | None
    ) -> None:
        self.cancel = cancel
        self.activity = activity
        self._own = reopen_nonblocking(fd, write=False)
        self.fd = self._own if self._own is not None else fd
        enlarge_pipe(fd)
        self.buf = b""
        self.pos = 0  # bytes of the stream consumed so far

    def read(self, n: int, what: str) -> bytes | bytearray:
        """Exactly ``n`` bytes; a StreamError saying 'truncated' at EOF."""
        if n <= len(self.buf):
            out, self.buf = self.buf[:n], self.buf[n:]
            self.pos += n
            return out
        have = len(self.buf)
        if n - have >= _READ_AHEAD:  # a frame: read it in place
            buf = bytearray(n)
            buf[:have] = self.buf
            self.buf = b""
            got = have + read_full(self.fd, memoryview(buf)[have:], self.cancel, _WHAT,
                                           self.activity)
        else:  # a record header: read ahead, the payload usually follows
            more = bytearray(_READ_AHEAD)
            got = have
            while got < n:
                k = read_some(self.fd, memoryview(more), self.cancel, _WHAT)
                if k == 0:
                    break
                self.buf += more[:k]
                got += k
            buf, self.buf = bytearray(self.buf[:n]), self.buf[n:]
            got = min(got, n)
        if got < n:
            check_cancel(self.cancel, f"cannot read {_WHAT}")  # EOF after a kill
            raise E.StreamError(
                f"cannot read {_WHAT}: truncated at byte {self.pos + got} (while reading {what})"
            )
        self.pos += n
        return buf

    def at_eof(self) -> bool:
        if self.buf:
            return False
        probe = bytearray(1)
        return read_some(self.fd, memoryview(probe), self.cancel, _WHAT) == 0

    def close(self) -> None:
        close_fd(self._own)
        self._own = None


class WireReader:
    """Read one stream from ``fd`` (not closed here); see the module doc.

    As an import's source (:class:`ganeti_vol.ops.endpoints.ImportSource`) its
    disks come one after the other, each read to its end before the next.
    """

    path = STREAM
    format = "stream"
    sequential = True

    def __init__(
        self,
        fd: int,
        *,
        cancel: threading.Event | None = None,
        activity: Callable[[], None] | None = None,
    ) -> None:
        self.input = _Input(fd, cancel, activity)
        self.seq = 0
        self.hash_len = 0
        self.trailer: dict[str, Any] | None = None
        try:
            if self.input.read(len(PREAMBLE), "the preamble") != PREAMBLE:
                raise E.ArchiveError(f"cannot read {_WHAT}: not a ganeti-vol stream "
                                     "(bad preamble)")
            rtype, _, payload = self._next()
            if rtype != HEADER:
                raise self._corrupt(f"expected HEADER, found {_NAMES[rtype]}")
            self.header = self._parse(payload)
            archive.check_format(self.header, _WHAT, fmt=FORMAT, version=FORMAT_VERSION,
                                 supported=SUPPORTED_FEATURES)
            self._check_header(self.header)
            self.chunk_size: int = self.header["chunk_size"]
            self.hash_algo: str = self.header["hash"]
            self.hash_len = hashing.digest_size(self.hash_algo)
            self.config_ini: str = self.header["config_ini"]
            self.export = G.parse_config(self.config_ini, f"{_WHAT} header")
            self.instance = self.export.instance
            self.announced: list[int] = self.header["disks"]
            archive.check_disks(dict.fromkeys(self.announced, (None, None)), self.export, _WHAT,
                                "the header")
            #: config.ini's disks (dump name: the disk uuid, as in DISK_BEGIN)
            self.config_disks = {d.index: d for d in self.export.disks}
            self._sent: list[int] = []
        except BaseException:
            self.input.close()
            raise

    def close(self) -> None:
        """Close the fd this reader opened (``disks()`` does it when it ends)."""
        self.input.close()

    @property
    def indexes(self) -> list[int]:
        """The disks the header announces, in stream order."""
        return self.announced

    def disk_sources(self) -> Iterator[WireDisk]:
        return self.disks()

    def hook_vars(self) -> dict[str, str]:
        """``SRC_PATH`` and ``SRC_IMAGES`` of the instance-add hooks (no images: a stream)."""
        return {"SRC_PATH": STREAM, "SRC_IMAGES": "[]"}

    def __enter__(self) -> WireReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _corrupt(self, problem: str) -> E.IntegrityError:
        return E.IntegrityError(f"cannot read {_WHAT}: {problem} at byte {self.input.pos}")

    def _parse(self, payload: bytes | bytearray) -> dict[str, Any]:
        try:
            obj = json.loads(payload)
        except (ValueError, RecursionError) as err:  # RecursionError: nested too deep
            raise self._corrupt(f"invalid JSON record ({err})") from None
        if not isinstance(obj, dict):
            raise self._corrupt("JSON record is not an object")
        return obj

    def _check_header(self, header: dict[str, Any]) -> None:
        """The header fields this reader uses have their types and allowed values."""
        def bad(key: str, expect: str) -> E.ArchiveError:
            return E.ArchiveError(f"cannot read {_WHAT}: header field '{key}' must be "
                                  f"{expect}, not {archive.quote(header.get(key))}")

        if not codec.valid_chunk_size(header.get("chunk_size")):
            raise bad("chunk_size", "a power of two from 64 KiB to 16 MiB")
        if not isinstance(header.get("hash"), str):
            raise bad("hash", "a hash algorithm name")
        config = header.get("config_ini")
        if not isinstance(config, str) or len(config) > archive.MAX_CONFIG:
            raise bad("config_ini", f"the text of config.ini (at most {archive.MAX_CONFIG} "
                                    "bytes)")
        disks = header.get("disks")
        if (not isinstance(disks, list) or len(disks) > G.MAX_DISKS
                or not all(type(i) is int and 0 <= i < G.MAX_DISKS for i in disks)
                or len(set(disks)) != len(disks)):
            raise bad("disks", f"a list of at most {G.MAX_DISKS} distinct disk indexes")

    def _next(self) -> tuple[int, bytes | bytearray, Any]:
        """(type, extension, payload) of the next record (a chunk record's payload: its
        :class:`Chunk`); JSON payloads crc-checked here."""
        fixed = self.input.read(_FIXED.size, f"record {self.seq}")
        marker, rtype, flags, plen, seq, pcrc = _FIXED.unpack(fixed)
        if marker != _MARKER or rtype not in _NAMES:
            raise self._corrupt(f"record {self.seq} is not a record (corrupt stream)")
        ext = self.input.read(_CHUNK_EXT.size + self.hash_len, "a chunk header") \
            if rtype == CHUNK else b""
        (hcrc,) = _CRC.unpack(self.input.read(_CRC.size, f"record {self.seq}"))
        if zlib.crc32(fixed + ext) != hcrc:
            raise self._corrupt(f"record {self.seq} header checksum mismatch")
        if seq != self.seq:
            raise self._corrupt(f"record {seq} found where record {self.seq} was due "
                                "(records lost or reordered)")
        if rtype == CHUNK:
            index, length = _CHUNK_EXT.unpack_from(ext)
            zero = bool(flags & FLAG_ZERO)
            # checked before the payload is read: nothing is allocated for impossible sizes
            if not 0 < length <= self.chunk_size:
                raise self._corrupt(f"chunk record {seq} claims a chunk of {length} bytes "
                                    f"(chunk size {self.chunk_size})")
            if plen > (0 if zero else codec.max_frame(length)):
                raise self._corrupt(f"chunk record {seq} claims {plen} payload bytes for a "
                                    f"{'zero ' if zero else ''}chunk of {length} bytes")
        elif plen > MAX_JSON:
            raise self._corrupt(f"record {seq} claims {plen} payload bytes")
        payload = self.input.read(plen, f"record {seq}") if plen else b""
        self.seq += 1
        if rtype == CHUNK:
            return rtype, ext, Chunk(index, index * self.chunk_size, length, zero,
                                             bytes(ext[_CHUNK_EXT.size:]), payload or None,
                                             crc=None if zero else pcrc)
        if zlib.crc32(payload) != pcrc:
            raise self._corrupt(f"record {seq} ({_NAMES[rtype]}) payload checksum mismatch")
        if rtype == ABORT:
            reason = str(self._parse(payload).get("error", "unknown error"))
            if not reason.isprintable() or len(reason) > 1000:  # it is printed to a terminal
                reason = archive.quote(reason, 1000)
            raise E.StreamError(f"cannot read {_WHAT}: the exporter aborted: {reason}")
        return rtype, ext, payload

    def disks(self) -> Iterator[WireDisk]:
        """The disks in stream order; after the last one the trailer and EOF are checked."""
        try:
            while True:
                rtype, _, payload = self._next()
                if rtype == TRAILER:
                    self._finish(self._parse(payload))
                    return
                if rtype != DISK_BEGIN:
                    raise self._corrupt(f"expected DISK_BEGIN or TRAILER, found {_NAMES[rtype]}")
                disk = WireDisk(self, self._parse(payload))
                yield disk
                if not disk.ended:
                    raise E.ProgrammerError(f"{disk.what} was not read to its end")
                self._sent.append(disk.index)
        finally:
            self.input.close()

    def _next_disk(self, begin: dict[str, Any]) -> int:
        """The index a DISK_BEGIN must carry: the next disk the header announced."""
        if len(self._sent) >= len(self.announced):
            raise self._corrupt(f"DISK_BEGIN after every announced disk {self.announced} was "
                                "sent")
        expected = self.announced[len(self._sent)]
        if begin.get("index") != expected:
            raise self._corrupt(f"DISK_BEGIN of disk {archive.quote(begin.get('index'))} where "
                                f"disk {expected} was due (announced: {self.announced})")
        disk = self.config_disks[expected]
        for key, value in (("chunk_size", self.chunk_size), ("hash", self.hash_algo),
                           ("uuid", disk.dump), ("disk_size", disk.size_mib << 20)):
            if key in begin and begin[key] != value:
                raise self._corrupt(f"DISK_BEGIN of disk {expected}: {key} "
                                    f"{archive.quote(begin[key])} differs from the header's")
        for key in ("size", "disk_size"):
            if begin.get(key) is not None and not (type(begin[key]) is int and begin[key] >= 0):
                raise self._corrupt(f"DISK_BEGIN of disk {expected}: {key} "
                                    f"{archive.quote(begin[key])} is not a byte count")
        return expected

    def _finish(self, trailer: dict[str, Any]) -> None:
        if self._sent != self.announced:
            raise self._corrupt(f"trailer after disks {self._sent}, the header announced "
                                f"{self.announced}")
        if trailer.get("records") != self.seq:
            raise self._corrupt(f"trailer counts {trailer.get('records')} records, "
                                f"{self.seq} were read")
        if trailer.get("disks") != self.announced:
            raise self._corrupt(f"trailer lists disks {trailer.get('disks')}, header "
                                f"announced {self.announced}")
        if not self.input.at_eof():
            raise self._corrupt("data after the trailer")
        self.trailer = trailer


class WireDisk:
    """One disk of a stream, as a :class:`~ganeti_vol.engine.chunks.ChunkSource`."""

    def __init__(self, reader: WireReader, begin: dict[str, Any]) -> None:
        self.reader = reader
        self.begin = begin
        self.index = reader._next_disk(begin)
        self.what = f"disk {self.index} of the {_WHAT}"
        self.chunk_size = reader.chunk_size
        self.hash_algo: str | None = reader.hash_algo
        self.size: int | None = begin.get("size")
        self.disk_size: int | None = begin.get("disk_size")
        self.mode: str | None = begin.get("mode")
        self.end: dict[str, Any] | None = None
        self.ended = False

    def chunks(self) -> Iterator[Chunk]:
        while True:
            rtype, _, payload = self.reader._next()
            if rtype == DISK_END:
                self.end = self.reader._parse(payload)
                self.ended = True
                return
            if rtype != CHUNK:
                raise self.reader._corrupt(f"expected CHUNK or DISK_END in {self.what}, "
                                           f"found {_NAMES[rtype]}")
            yield payload

    def finish(self, summary: DecodeSummary) -> None:
        check_decoded(summary, self.end or {}, self.what, self.index, "the exporter")
