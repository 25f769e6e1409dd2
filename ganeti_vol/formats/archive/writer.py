"""Writing an archive: per-disk sinks into a staging directory, published atomically by :class:`ArchiveWriter`."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any

from ganeti_vol import __version__
from ganeti_vol.core import atomicfile
from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import close_fd, io_error, pwrite_all
from ganeti_vol.core.model import Instance
from ganeti_vol.engine import hashing
from ganeti_vol.engine.chunks import Chunk, ChunkSink, EncodeInfo, EncodeSummary
from ganeti_vol.engine.writers import AppendWriter
from ganeti_vol.formats import ganeti_export as G
from ganeti_vol.formats.archive.exports import check_replaceable
from ganeti_vol.formats.archive.layout import (
    CONFIG,
    DUMP_SUFFIX,
    FLAG_ZERO,
    FORMAT,
    FORMAT_VERSION,
    IDX_ENTRY,
    IDX_HEADER,
    IDX_MAGIC,
    IDX_VERSION,
    INDEX_SUFFIX,
    MANIFEST,
    WRITTEN_FEATURES,
    WRITTEN_OPTIONAL_FEATURES,
    ZERO_MAP_MAX,
    check_name,
    iso_time,
    write_file,
)
from ganeti_vol.formats.archive.manifest import render_manifest
from ganeti_vol.formats.archive.workdirs import owned_tempdir, publish, reclaim_work_dirs

log = logging.getLogger(__name__)

class _ZeroMap:
    """The manifest's ``zero_map``: [[first, count], ...] runs of zero chunks, in order.

    At most :data:`ZERO_MAP_MAX` runs are kept; a disk with more gets ``None``
    (the index's flags always hold the whole map), so a manifest stays small.
    """

    def __init__(self) -> None:
        self.runs: list[list[int]] | None = []

    def add(self, index: int) -> None:
        runs = self.runs
        if runs is None:
            return
        if runs and runs[-1][0] + runs[-1][1] == index:
            runs[-1][1] += 1
        elif len(runs) < ZERO_MAP_MAX:
            runs.append([index, 1])
        else:
            self.runs = None


# --- writing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskMeta:
    """What the caller knows about a disk being exported (goes to the manifest)."""

    index: int
    uuid: str
    #: size of the instance disk in bytes
    disk_size: int
    name: str | None = None
    #: "script" (export script's stdout) or "raw" (the disk read directly)
    mode: str = "script"
    #: where the data came from: {"path": ..., "snapshot": {...} | None, ...}
    source: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_disk(cls, instance: Instance, index: int, **kw: Any) -> DiskMeta:
        disk = instance.disks[index]
        source = kw.pop("source", None) or {"path": disk.path, "snapshot": None}
        return cls(index=index, uuid=disk.uuid, disk_size=disk.size_bytes, name=disk.name,
                   source=source, **kw)


class _DiskSinkBase:
    """Common part of the per-disk sinks: files in the staging dir, registration."""

    compress = True
    want_crc = False

    def __init__(self, writer: ArchiveWriter, meta: DiskMeta, dump_name: str) -> None:
        self.writer = writer
        self.meta = meta
        self.dump_name = dump_name
        self.dump_path = os.path.join(writer.staging, dump_name)
        self.what = f"dump of disk {meta.index} '{self.dump_path}'"
        self.fd: int | None = None
        self.info: EncodeInfo | None = None

    def _open(self, path: str) -> int:
        try:
            return atomicfile.create_fd(path, 0o640)
        except OSError as err:
            raise io_error("create", f"'{path}'", err) from err

    def begin(self, info: EncodeInfo) -> None:
        self.info = info
        self.fd = self._open(self.dump_path)

    def _fsync(self, fd: int, what: str) -> None:
        try:
            os.fsync(fd)
        except OSError as err:
            raise io_error("flush", what, err) from err

    def _close(self) -> None:
        close_fd(self.fd)
        self.fd = None

    def abort(self, error: BaseException) -> None:
        self._close()
        self.writer._disk_failed(self.meta.index)


class _LZ4DiskSink(_DiskSinkBase):
    """Native archive disk: frames appended to ``<uuid>.lz4``, entries to ``<uuid>.idx``."""

    def __init__(self, writer: ArchiveWriter, meta: DiskMeta) -> None:
        super().__init__(writer, meta, meta.uuid + DUMP_SUFFIX)
        self.index_name = meta.uuid + INDEX_SUFFIX
        self.index_path = os.path.join(writer.staging, self.index_name)
        self.idx_fd: int | None = None
        self.out: AppendWriter | None = None
        self.idx_hash = hashlib.sha256()
        self.idx_buf = bytearray()
        self.idx_pos = 0
        self.pos = 0
        self.zero_map = _ZeroMap()

    def begin(self, info: EncodeInfo) -> None:
        super().begin(info)
        assert self.fd is not None
        self.out = AppendWriter(self.fd, self.dump_path, self.what)
        self.idx_fd = self._open(self.index_path)
        hlen = hashing.digest_size(info.hash_algo)
        self._idx_append(IDX_HEADER.pack(IDX_MAGIC, IDX_VERSION, hlen, 0, info.chunk_size))

    def _idx_append(self, data: bytes, flush: bool = False) -> None:
        self.idx_buf += data
        if flush or len(self.idx_buf) >= 1 << 16:
            assert self.idx_fd is not None
            self.idx_hash.update(self.idx_buf)
            pwrite_all(self.idx_fd, self.idx_buf, self.idx_pos, f"'{self.index_path}'")
            self.idx_pos += len(self.idx_buf)
            self.idx_buf = bytearray()

    def write_chunk(self, chunk: Chunk) -> None:
        assert self.fd is not None and chunk.frame is not None and chunk.hash is not None
        assert self.out is not None
        self.out.append(chunk.frame)
        flags = FLAG_ZERO if chunk.zero else 0
        if chunk.zero:
            self.zero_map.add(chunk.index)
        self._idx_append(IDX_ENTRY.pack(flags, len(chunk.frame), self.pos) + chunk.hash)
        self.pos += len(chunk.frame)

    def finish(self, summary: EncodeSummary) -> None:
        assert self.fd is not None and self.idx_fd is not None
        self._idx_append(b"", flush=True)
        assert self.out is not None
        self.out.finish()
        self._fsync(self.idx_fd, f"'{self.index_path}'")
        self._close()
        close_fd(self.idx_fd)
        self.idx_fd = None
        entry = _disk_entry(self.meta, summary, self.dump_name, self.pos)
        entry.update(
            index_file=self.index_name,
            index_sha256=self.idx_hash.hexdigest(),
            zero_map=self.zero_map.runs,
        )
        self.writer._disk_done(self.meta, entry)

    def _close(self) -> None:
        if self.out is not None:
            self.out.close()
        super()._close()
        close_fd(self.idx_fd)
        self.idx_fd = None


class _RawDiskSink(_DiskSinkBase):
    """Ganeti-format disk: the uncompressed dump ``<uuid>``, zero chunks left as holes."""

    compress = False

    def __init__(self, writer: ArchiveWriter, meta: DiskMeta) -> None:
        super().__init__(writer, meta, meta.uuid)

    def write_chunk(self, chunk: Chunk) -> None:
        assert self.fd is not None and chunk.data is not None
        if not chunk.zero:
            pwrite_all(self.fd, chunk.data, chunk.offset, self.what)

    def finish(self, summary: EncodeSummary) -> None:
        assert self.fd is not None
        try:
            os.ftruncate(self.fd, summary.size)  # a new file: only extends over trailing zeros
        except OSError as err:
            raise io_error("extend", self.what, err) from err
        self._fsync(self.fd, self.what)
        self._close()
        self.writer._disk_done(self.meta, _disk_entry(self.meta, summary, self.dump_name,
                                                      summary.size))


def _disk_entry(
    meta: DiskMeta, summary: EncodeSummary, dump: str, dump_bytes: int
) -> dict[str, Any]:
    source = {"kind": summary.source_kind, "mode": meta.mode, "identity": summary.source_identity,
              "size_hint": summary.size_hint, "snapshot": None, **meta.source}
    return {
        "index": meta.index,
        "uuid": meta.uuid,
        "name": meta.name,
        "dump": dump,
        "dump_bytes": dump_bytes,
        "size": summary.size,
        "disk_size": meta.disk_size,
        "chunk_size": summary.chunk_size,
        "chunks": summary.chunks,
        "compression": summary.compression or "none",
        "hash": summary.hash_algo,
        "digest": summary.digest,
        "zero_chunks": summary.zero_chunks,
        "zero_bytes": summary.zero_bytes,
        "data_bytes": summary.size - summary.zero_bytes,
        "hole_bytes": summary.hole_bytes,
        "source": source,
        "timings": {
            "started": iso_time(summary.started),
            "seconds": round(summary.seconds, 3),
            "mb_per_s": round(summary.size / summary.seconds / 1e6, 1) if summary.seconds else None,
        },
        "base": None,
    }


class ArchiveWriter:
    """Stage an archive and publish it atomically on a clean exit of the ``with`` block.

    ``format``: ``"native"`` (LZ4 dumps, index, manifest) or ``"ganeti"``
    (what Ganeti writes: uncompressed dumps named by disk uuid + config.ini).
    ``name`` defaults to the instance name.  An existing ``<export_dir>/<name>``
    is replaced only if :func:`check_replaceable` allows it (``force``),
    checked before anything is staged and again just before publishing.
    The staging directory's name records its owner; staging directories of
    dead owners in ``export_dir`` are removed first (:func:`reclaim_work_dirs`).
    """

    def __init__(
        self,
        export_dir: str,
        instance: Instance,
        *,
        chunk_size: int = 4 << 20,
        hash_algo: str = hashing.DEFAULT,
        format: str = "native",
        name: str | None = None,
        extra: dict[str, Any] | None = None,
        force: bool = False,
    ) -> None:
        if format not in ("native", "ganeti"):
            raise E.ProgrammerError(f"unknown archive format {format!r}")
        self.name = name or instance.name
        check_name(self.name)
        self.instance = instance
        self.format = format
        self.chunk_size = chunk_size
        self.hash_algo = hash_algo
        self.extra = extra or {}
        self.export_dir = export_dir
        self.path = os.path.join(export_dir, self.name)
        self.force = force
        check_replaceable(self.path, instance.name, force=force)
        self._lock = threading.Lock()
        self._sinks: dict[int, _DiskSinkBase] = {}
        self._done: dict[int, dict[str, Any]] = {}
        self._failed: set[int] = set()
        self.started = time.time()
        try:
            os.makedirs(export_dir, mode=0o750, exist_ok=True)
            reclaim_work_dirs(export_dir)
            self.staging = owned_tempdir(export_dir, self.name, "new")
        except OSError as err:
            raise io_error("create a staging directory in", f"'{export_dir}'", err) from err
        self.published = False

    #: disks may be written at once (see :class:`ganeti_vol.ops.endpoints.ExportDestination`)
    parallel = True

    @property
    def hook_path(self) -> str:
        """``EXPORT_PATH`` of the post hooks: the archive."""
        return self.path

    def extra_result(self) -> dict[str, Any]:
        return {}

    def disk_sink(self, index: int, meta: DiskMeta | None = None) -> ChunkSink:
        """The sink for disk ``index`` (pass it to :meth:`Engine.encode`)."""
        meta = meta or DiskMeta.for_disk(self.instance, index)
        if meta.index != index:
            raise E.ProgrammerError(f"disk_sink({index}) got metadata of disk {meta.index}")
        with self._lock:
            if index in self._sinks:
                raise E.ProgrammerError(f"disk {index} is already being written")
            sink = (_LZ4DiskSink if self.format == "native" else _RawDiskSink)(self, meta)
            self._sinks[index] = sink
        return sink

    def _disk_done(self, meta: DiskMeta, entry: dict[str, Any]) -> None:
        with self._lock:
            self._done[meta.index] = entry

    def _disk_failed(self, index: int) -> None:
        with self._lock:
            self._failed.add(index)

    def commit(self) -> str:
        """Write config.ini and the manifest, fsync, publish; the archive path."""
        with self._lock:
            unfinished = sorted(set(self._sinks) - set(self._done))
            if unfinished or self._failed:
                raise E.ArchiveError(
                    f"cannot publish archive '{self.path}': disk(s) "
                    f"{', '.join(map(str, sorted(set(unfinished) | self._failed)))} not exported"
                )
            entries = [self._done[i] for i in sorted(self._done)]
        dumps = {e["index"]: e["dump"].removesuffix(DUMP_SUFFIX) for e in entries}
        config = G.render_config(self.instance, dumps, timestamp=int(self.started)).encode()
        write_file(os.path.join(self.staging, CONFIG), config, f"'{self.staging}/{CONFIG}'")
        if self.format == "native":
            manifest = self._manifest(entries, hashlib.sha256(config).hexdigest())
            text = render_manifest(manifest)
            write_file(os.path.join(self.staging, MANIFEST), text,
                        f"'{self.staging}/{MANIFEST}'")
        check_replaceable(self.path, self.instance.name, force=self.force)
        try:
            os.chmod(self.staging, 0o750)
            atomicfile.fsync_dir(self.staging)
            publish(self.staging, self.path)
        except OSError as err:
            raise io_error("publish", f"archive '{self.path}'", err) from err
        self.published = True
        log.info("published archive '%s' (%d disk(s))", self.path, len(entries))
        return self.path

    def _manifest(self, entries: list[dict[str, Any]], config_sha256: str) -> dict[str, Any]:
        inst = self.instance
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "mandatory_features": list(WRITTEN_FEATURES),
            "optional_features": list(WRITTEN_OPTIONAL_FEATURES),
            "export_id": str(uuidlib.uuid4()),
            "created": iso_time(self.started),
            "finished": iso_time(time.time()),
            "created_by": f"ganeti-vol {__version__}",
            "instance": {"name": inst.name, "os": inst.os, "uuid": inst.uuid,
                         "hypervisor": inst.hypervisor, "disk_count": len(inst.disks)},
            "config": CONFIG,
            "config_sha256": config_sha256,
            "osparams_private_omitted": sorted(inst.osparams_private),
            **self.extra,
            "disks": entries,
        }

    def abort(self) -> None:
        """Remove the staging directory (nothing is published)."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:
            self.abort()
            raise
