"""Reading archives: a native archive's disks (checked index and dump) and a Ganeti v0 export's raw dumps, as chunk sources."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any, Generic, Protocol, TypeVar

from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import ReadAhead, close_fd, fadvise
from ganeti_vol.engine import codec, hashing
from ganeti_vol.engine.chunks import Chunk, DecodeSummary, check_decoded
from ganeti_vol.engine.sources import RandomAccessReader
from ganeti_vol.formats import ganeti_export as G
from ganeti_vol.formats.archive.layout import (
    CONFIG,
    DUMP_SUFFIX,
    FLAG_ZERO,
    IDX_ENTRY,
    IDX_HEADER,
    IDX_MAGIC,
    IDX_VERSION,
    KNOWN_FLAGS,
    MANIFEST,
    MAX_MANIFEST,
    ArchiveDir,
    iso_time,
    member_name,
    quote,
)
from ganeti_vol.formats.archive.manifest import check_disks, parse_manifest

#: bytes of the index read at a time (it is hashed and parsed as it is read)
_INDEX_READ = 1 << 20


# --- reading: archives -----------------------------------------------------------------


class _IndexReader:
    """Reads an index file front to back in 1 MiB blocks, hashing what it reads."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0
        self.block = b""
        self.off = 0
        self.sha = hashlib.sha256()

    def read(self, n: int) -> bytes:
        """The next ``n`` bytes (fewer only if the file shrank while being read)."""
        if self.off + n > len(self.block):
            more = os.pread(self.fd, max(n, _INDEX_READ), self.pos)
            self.pos += len(more)
            self.sha.update(more)
            self.block = self.block[self.off:] + more
            self.off = 0
        out = self.block[self.off:self.off + n]
        self.off += n
        return out


class ArchiveDisk:
    """One disk of a native archive, as a :class:`~ganeti_vol.engine.chunks.ChunkSource`."""

    def __init__(self, archive: Archive, entry: dict[str, Any]) -> None:
        self.archive = archive
        self.entry = entry  # checked by _check_manifest
        self.index: int = entry["index"]
        self.what = f"disk {self.index} of archive '{archive.path}'"
        if entry["compression"] != codec.COMPRESSION:
            raise E.ArchiveFormatError(
                f"cannot open {self.what}: unsupported compression {quote(entry['compression'])}"
            )
        self.hash_algo: str | None = entry["hash"]
        self.hash_len = hashing.digest_size(entry["hash"])
        self.chunk_size: int = entry["chunk_size"]
        self.size: int | None = entry["size"]
        self.disk_size: int | None = entry.get("disk_size") or None
        #: how the dump was made: "script" (an export script's stdout) or "raw"
        self.mode: str | None = (entry.get("source") or {}).get("mode")
        self.dump_path = os.path.join(archive.path, entry["dump"])
        self.index_path = os.path.join(archive.path, entry["index_file"])
        # refuse links, FIFOs, devices and files of the wrong size before any disk is written
        os.close(self._open_index())
        os.close(self._open_dump())

    def _open_index(self) -> int:
        """The index's fd, checked to have the size of the manifest's chunk count."""
        count = self.entry["chunks"]
        fd = self.archive.dir.open(self.entry["index_file"], self.what)
        expected = IDX_HEADER.size + count * (IDX_ENTRY.size + self.hash_len)
        if (size := os.fstat(fd).st_size) != expected:
            os.close(fd)
            raise self._corrupt(f"index '{self.index_path}' has {size} bytes, {expected} "
                                f"expected for {count} chunks")
        return fd

    def _open_dump(self) -> int:
        """The dump's fd, checked to have the manifest's size."""
        fd = self.archive.dir.open(self.entry["dump"], self.what)
        if (size := os.fstat(fd).st_size) != self.entry["dump_bytes"]:
            os.close(fd)
            raise self._corrupt(f"'{self.dump_path}' has {size} bytes, the manifest says "
                                f"{self.entry['dump_bytes']}")
        return fd

    def _corrupt(self, problem: str, offset: int | None = None) -> E.IntegrityError:
        return E.IntegrityError(f"cannot read {self.what}: {problem}", disk=self.index,
                                offset=offset)

    def _entries(self, ifd: int) -> Iterator[tuple[int, int, int, bytes]]:
        """(flags, frame length, frame offset, hash) per chunk, read as they are taken.

        The index's size is checked first and its checksum after the last
        entry, so memory stays flat whatever the disk size; each entry is
        checked before it is used (known flags, contiguous frames of a
        possible length), so an entry damaged before the end never reaches a target.
        """
        count, cs, size = self.entry["chunks"], self.chunk_size, self.entry["size"]
        step = IDX_ENTRY.size + self.hash_len
        index = _IndexReader(ifd)
        header = index.read(IDX_HEADER.size)
        if len(header) != IDX_HEADER.size:
            raise self._corrupt(f"index '{self.index_path}' is truncated")
        magic, version, hlen, _, chunk_size = IDX_HEADER.unpack(header)
        if (magic, version, hlen, chunk_size) != (IDX_MAGIC, IDX_VERSION, self.hash_len, cs):
            raise self._corrupt(f"index '{self.index_path}' has an unexpected header")
        pos = 0
        for i in range(count):
            raw = index.read(step)
            if len(raw) != step:
                raise self._corrupt(f"index '{self.index_path}' is truncated", i * cs)
            flags, flen, foff = IDX_ENTRY.unpack_from(raw)
            length = min(cs, size - i * cs)
            if flags & ~KNOWN_FLAGS:
                raise self._corrupt(f"unknown chunk flags {flags:#x} in the index", i * cs)
            if foff != pos or not 0 < flen <= codec.max_frame(length):
                raise self._corrupt(f"the index does not describe contiguous frames of possible "
                                    f"lengths (chunk {i}: {flen} bytes at {foff})", i * cs)
            pos += flen
            yield flags, flen, foff, raw[IDX_ENTRY.size:]
        if index.sha.hexdigest() != self.entry["index_sha256"]:
            raise self._corrupt(f"index '{self.index_path}' does not match its checksum")

    def read_index(self) -> list[tuple[int, int, int, bytes]]:
        """The whole checked index: (flags, frame length, frame offset, hash) per chunk."""
        ifd = self._open_index()
        try:
            return list(self._entries(ifd))
        finally:
            os.close(ifd)

    def chunks(self) -> Iterator[Chunk]:
        """The chunks in order, with their recorded hashes (frames not yet checked)."""
        cs, size = self.chunk_size, self.entry["size"]
        ifd = self._open_index()
        fd = None
        try:
            fd = self._open_dump()
            dsize = self.entry["dump_bytes"]
            fadvise(fd, os.POSIX_FADV_SEQUENTIAL)
            ahead = ReadAhead(fd)
            end = 0
            for i, (flags, flen, foff, digest) in enumerate(self._entries(ifd)):
                offset = i * cs
                if foff + flen > dsize:
                    raise self._corrupt(f"'{self.dump_path}' is truncated", offset)
                ahead.reached(foff + flen)
                frame = os.pread(fd, flen, foff)
                if len(frame) != flen:
                    raise self._corrupt(f"'{self.dump_path}' is truncated", offset)
                end = foff + flen
                yield Chunk(i, offset, min(cs, size - offset), bool(flags & FLAG_ZERO),
                                    digest, frame)
            if end != dsize:
                raise self._corrupt(f"'{self.dump_path}' has {dsize} bytes, the index "
                                    f"describes {end}")
        except OSError as err:
            raise self._corrupt(f"cannot read '{self.dump_path}': {err.strerror or err}") from err
        finally:
            os.close(ifd)
            close_fd(fd)

    def finish(self, summary: DecodeSummary) -> None:
        """Compare what was decoded with the manifest (size, chunk count, whole-disk digest)."""
        check_decoded(summary, self.entry, self.what, self.index, "the manifest")


class _Dump(Protocol):
    @property
    def index(self) -> int: ...
    @property
    def dump_path(self) -> str: ...


D = TypeVar("D", bound=_Dump)


class ListedSource(Generic[D]):
    """An import source whose disks are all listed once it is opened, so they may be read
    in any order and at once (a native archive, a Ganeti export, a repository snapshot;
    see :class:`ganeti_vol.ops.endpoints.ImportSource`)."""

    path: str
    disks: list[D]
    sequential = False
    #: what :meth:`disk` says of an index it does not hold
    no_disk = "'{path}' has no dump of disk {index}"

    @property
    def indexes(self) -> list[int]:
        return [d.index for d in self.disks]

    def disk_sources(self) -> Iterator[D]:
        return iter(self.disks)

    def hook_vars(self) -> dict[str, str]:
        """``SRC_PATH`` and ``SRC_IMAGES`` (every dump's path) of the instance-add hooks."""
        return {"SRC_PATH": self.path, "SRC_IMAGES": repr([d.dump_path for d in self.disks])}

    def disk(self, index: int) -> D:
        """The ChunkSource of disk ``index``."""
        for d in self.disks:
            if d.index == index:
                return d
        raise E.UsageError(self.no_disk.format(path=self.path, index=index))

    def close(self) -> None:
        """Nothing to release (every file is opened when it is read)."""


class Archive(ListedSource[ArchiveDisk]):
    """A native ganeti-vol archive (opened read-only).

    ``manifest_checked``: False for a manifest written without its own
    checksum (before the ``manifest-sha256`` feature): its other fields are
    still checked against the files, but e.g. its time stamps are not.
    """

    format = "native"

    def __init__(self, path: str) -> None:
        where = f"archive '{path}'"
        self.dir = ArchiveDir(path, where)
        self.path = self.dir.path
        data = self.dir.read(MANIFEST, where, MAX_MANIFEST)
        self.manifest, self.manifest_checked = parse_manifest(data, where)
        self.config_text, self.export = self.dir.config(self.manifest["config"], where)
        if hashlib.sha256(self.config_text).hexdigest() != self.manifest["config_sha256"]:
            raise E.IntegrityError(f"cannot open {where}: {CONFIG} does not match "
                                   "its checksum in the manifest")
        self.instance = self.export.instance
        if self.manifest["instance"]["name"] != self.instance.name:
            raise E.ArchiveError(
                f"cannot open {where}: {MANIFEST} is of instance "
                f"{quote(self.manifest['instance']['name'])}, {CONFIG} of "
                f"{quote(self.instance.name)}")
        entries = self.manifest["disks"]
        check_disks({e["index"]: (e["dump"].removesuffix(DUMP_SUFFIX), e.get("disk_size"))
                     for e in entries}, self.export, where, MANIFEST)
        self.disks = [ArchiveDisk(self, e) for e in sorted(entries, key=lambda e: e["index"])]

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "name": os.path.basename(self.path),
            "path": self.path,
            "format": "native",
            "format_version": m["format_version"],
            "manifest_checked": self.manifest_checked,
            "instance": m["instance"]["name"],
            "os": m["instance"]["os"],
            "created": m.get("created"),
            "export_id": m.get("export_id"),
            "disks": [
                {k: e.get(k) for k in ("index", "uuid", "name", "size", "disk_size",
                                       "dump_bytes", "chunk_size", "chunks", "compression",
                                       "hash", "digest", "zero_chunks", "zero_bytes")}
                | {"mode": (e.get("source") or {}).get("mode"), "timings": e.get("timings")}
                for e in m["disks"]
            ],
            "size": sum(e["size"] for e in m["disks"]),
            "stored_bytes": sum(e["dump_bytes"] for e in m["disks"]),
        }


class GanetiDumpDisk:
    """One uncompressed dump of a Ganeti v0 export, as a ChunkSource (no recorded hashes)."""

    hash_algo = None

    def __init__(self, archive: GanetiArchive, disk: G.ExportDisk, chunk_size: int) -> None:
        self.archive = archive
        self.index = disk.index
        self.what = f"disk {disk.index} of Ganeti export '{archive.path}'"
        self.dump = disk.dump or ""
        self.dump_path = os.path.join(archive.path, self.dump)
        self.chunk_size = chunk_size
        self.disk_size: int | None = disk.size_mib << 20
        self.mode: str | None = None  # Ganeti does not record it
        fd = archive.dir.open(self.dump, self.what)
        try:
            self.size: int | None = os.fstat(fd).st_size
        finally:
            os.close(fd)

    def chunks(self) -> Iterator[Chunk]:
        fd = self.archive.dir.open(self.dump, self.what)
        try:
            reader = RandomAccessReader(fd, self.what, "file", verify_holes=False)
            self.size = reader.size
            index = 0
            while True:
                buf = bytearray(self.chunk_size)
                n, hole, _, _ = reader.read_chunk(buf, index * self.chunk_size, self.chunk_size)
                if n == 0:
                    break
                data = None if hole else (buf if n == self.chunk_size else bytes(buf[:n]))
                yield Chunk(index, index * self.chunk_size, n, hole, None, data=data)
                index += 1
            reader.finish()
        finally:
            os.close(fd)

    def finish(self, summary: DecodeSummary) -> None:
        if summary.size != self.size:
            raise E.ShortTransfer(what=f"cannot read {self.what}", expected=self.size,
                                  actual=summary.size)


class GanetiArchive(ListedSource[GanetiDumpDisk]):
    """A Ganeti v0 export directory: config.ini plus uncompressed dumps."""

    format = "ganeti"

    def __init__(self, path: str, chunk_size: int = 4 << 20) -> None:
        what = f"Ganeti export '{path}'"
        self.dir = ArchiveDir(path, what)
        self.path = self.dir.path
        self.export = _ganeti_config(self.dir, what)
        self.instance = self.export.instance
        self.disks = [GanetiDumpDisk(self, d, chunk_size) for d in self.export.disks if d.dump]

    def info(self) -> dict[str, Any]:
        return {
            "name": os.path.basename(self.path),
            "path": self.path,
            "format": "ganeti",
            "format_version": self.export.version,
            "instance": self.instance.name,
            "os": self.instance.os,
            "created": iso_time(self.export.timestamp) if self.export.timestamp else None,
            "disks": [{"index": d.index, "dump": d.dump, "size": d.size,
                       "disk_size": d.disk_size} for d in self.disks],
            "size": sum(d.size or 0 for d in self.disks),
            "stored_bytes": sum(d.size or 0 for d in self.disks),
        }


def _ganeti_config(directory: ArchiveDir, what: str) -> G.GanetiExport:
    """config.ini of a Ganeti export whose dump names are plain, distinct file names."""
    _, export = directory.config(CONFIG, what)
    names = {CONFIG, MANIFEST}
    for d in export.disks:
        if d.dump:
            if member_name(d.dump, what) in names:
                raise E.ArchiveError(f"cannot open {what}: {CONFIG} names {quote(d.dump)} for "
                                     f"disk {d.index}, which is already another file")
            names.add(d.dump)
    return export


def open_archive(path: str, *, chunk_size: int = 4 << 20) -> Archive | GanetiArchive:
    """Open a native archive, or a Ganeti v0 export (config.ini + raw dumps, no manifest)."""
    directory = ArchiveDir(path, f"archive '{path}'")
    if os.path.lexists(os.path.join(path, MANIFEST)):
        return Archive(path)
    if os.path.lexists(os.path.join(path, CONFIG)):
        export = _ganeti_config(directory, f"archive '{path}'")
        if any(d.dump and not os.path.lexists(os.path.join(path, d.dump)) for d in export.disks):
            raise E.ArchiveError(
                f"cannot open archive '{path}': not an archive (no {MANIFEST}, and the dumps "
                f"named in {CONFIG} are missing)"
            )
        return GanetiArchive(path, chunk_size)
    raise E.ArchiveError(f"cannot open archive '{path}': not an archive (no {MANIFEST})")
