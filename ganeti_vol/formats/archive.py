"""Export archives on disk: write (staged, atomic), read, verify, list, remove.

An archive is a directory ``<export_dir>/<instance>/`` (format spec:
``doc/archive-format.md``)::

    config.ini          Ganeti v0 export info (ganeti_vol.formats.ganeti_export)
    <disk-uuid>.lz4     per disk: concatenated LZ4 frames, one per chunk;
                        `lz4 -d <disk-uuid>.lz4` restores the raw dump <disk-uuid>
    <disk-uuid>.idx     per disk: binary chunk index (flags, frame offset/length, hash)
    manifest.json       written last: format version, features, per-disk facts

It is staged in a hidden directory ``.<instance>.new-XXXXXX`` next to the
final one; data files are fsynced, the manifest is written last, the
directory is fsynced, then it replaces ``<instance>/`` in one
``renameat2(RENAME_EXCHANGE)`` (the previous archive stays complete until
then) and the old one is deleted.  On any failure, Ctrl-C included, the
staging directory is removed and nothing is published.  A directory without
a complete manifest is "not an archive" (ArchiveError).

``ArchiveWriter(..., format="ganeti")`` writes what Ganeti itself would:
uncompressed (sparse) dumps named by disk uuid plus config.ini, no manifest.
:func:`open_archive` reads both kinds.

Export of one disk::

    with ArchiveWriter(cfg.export_dir, instance, chunk_size=engine.chunk_size,
                       hash_algo=engine.hash_algo) as aw:
        summary = engine.encode(script_io.fd, aw.disk_sink(0, DiskMeta.for_disk(instance, 0)),
                                progress=..., cancel=..., size_hint=script_io.size_hint)
    aw.path    # the published archive

Import of one disk::

    archive = open_archive(path)      # Archive or GanetiArchive
    engine.decode(archive.disk(0), target, progress=..., cancel=...)

Both :meth:`ArchiveWriter.disk_sink` and the engine may be used from several
threads at once (one disk per thread).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import struct
import tempfile
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from ganeti_vol import __version__
from ganeti_vol.core import atomicfile
from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import ReadAhead, close_fd, fadvise, io_error, pwrite_all, read_full
from ganeti_vol.core.model import Instance
from ganeti_vol.core.procs import process_alive, process_start_time
from ganeti_vol.engine import codec, hashing
from ganeti_vol.engine.chunks import (
    Chunk,
    ChunkSink,
    DecodeSummary,
    EncodeInfo,
    EncodeSummary,
    check_decoded,
)
from ganeti_vol.engine.parallel import Engine
from ganeti_vol.engine.sources import RandomAccessReader
from ganeti_vol.engine.targets import NullTarget
from ganeti_vol.engine.writers import AppendWriter
from ganeti_vol.formats import ganeti_export as G

log = logging.getLogger(__name__)

FORMAT = "ganeti-vol-archive"
FORMAT_VERSION = 1
#: features this reader implements; an archive may require any subset of them
SUPPORTED_FEATURES = frozenset({"lz4-frame-chunks", "chunk-index-v1"})
#: what this writer puts in every archive's mandatory_features
WRITTEN_FEATURES = ("lz4-frame-chunks", "chunk-index-v1")
#: optional feature: manifest.json carries its own checksum (readers that know it check it)
FEATURE_MANIFEST_SUM = "manifest-sha256"
WRITTEN_OPTIONAL_FEATURES = (FEATURE_MANIFEST_SUM,)
MANIFEST = "manifest.json"
CONFIG = "config.ini"
DUMP_SUFFIX = ".lz4"
INDEX_SUFFIX = ".idx"
#: the manifest's own checksum (see render_manifest)
MANIFEST_SUM = "manifest_sha256"
#: the most bytes read from a manifest.json: a valid one has at most 16 disks of at most
#: ZERO_MAP_MAX zero-map runs (well under 1 MiB); more is refused before it is parsed
MAX_MANIFEST = 2 << 20
#: the most bytes read from a config.ini (Ganeti's are a few KiB)
MAX_CONFIG = G.MAX_CONFIG_BYTES
#: the most zero-map runs the writer records per disk (see _ZeroMap)
ZERO_MAP_MAX = 1024

#: index file: magic, version, hash length, reserved, chunk size
_IDX_HEADER = struct.Struct("<8sHHIQ")
_IDX_MAGIC = b"GVIDX\x00\r\n"
_IDX_VERSION = 1
#: index entry (followed by the chunk hash): flags, reserved, frame length, frame offset
_IDX_ENTRY = struct.Struct("<B3xIQ")
FLAG_ZERO = 0x01
_KNOWN_FLAGS = FLAG_ZERO



# --- helpers ---------------------------------------------------------------------------


def _write_file(path: str, data: bytes, what: str) -> None:
    """Create ``path`` with ``data``, fsynced (never through a symlink, never an existing file)."""
    try:
        atomicfile.create(path, data, 0o640)
    except OSError as err:
        raise io_error("write", what, err) from err


# --- staging directories: named after their owner --------------------------------------

#: kinds of hidden work directories next to archives: a staged export, a replaced
#: archive on its way out, an archive being removed
WORK_KINDS = ("new", "old", "remove")


def _host_id() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def owned_tempdir(parent: str, name: str, kind: str) -> str:
    """A new hidden directory ``.<name>.<kind>-<host>-<pid>-<start>-XXXXXXXX`` in ``parent``.

    Its name records the owner (a hash of the host name, the pid and the
    process start time) at the moment it exists, so a process killed with -9
    leaves a directory that :func:`reclaim_work_dirs` can tell from a live
    one's.  Mode 0700 until published.
    """
    pid = os.getpid()
    start = process_start_time(pid) or 0
    return tempfile.mkdtemp(dir=parent, prefix=f".{name[:100]}.{kind}-{_host_id()}-{pid}-{start}-")


@dataclass(frozen=True)
class WorkDir:
    """A hidden work directory in an export directory, and who owns it."""

    path: str
    kind: str
    #: owner's host id, pid and start time (None: not recorded, e.g. made by an older version)
    host: str | None
    pid: int | None
    start: int | None

    @property
    def owner_alive(self) -> bool | None:
        """True/False for an owner on this host; None if unknown or on another host."""
        if self.pid is None or self.host != _host_id():
            return None
        return process_alive(self.pid, self.start or 0)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "pid": self.pid, "start": self.start,
                "owner_alive": self.owner_alive}


def parse_work_dir(parent: str, entry: str) -> WorkDir | None:
    """The :class:`WorkDir` named ``entry`` in ``parent``, or None if it is not one."""
    if not entry.startswith("."):
        return None
    for kind in WORK_KINDS:
        head, sep, rest = entry.rpartition(f".{kind}-")
        if not sep or not head:
            continue
        parts = rest.split("-")
        if len(parts) == 4 and all(p.isdigit() for p in parts[1:3]):
            return WorkDir(os.path.join(parent, entry), kind, parts[0], int(parts[1]),
                           int(parts[2]))
        if len(parts) == 1:
            return WorkDir(os.path.join(parent, entry), kind, None, None, None)
    return None


def reclaim_work_dirs(export_dir: str, dry_run: bool = False) -> list[WorkDir]:
    """Remove the work directories of dead owners in ``export_dir``; never a live one's,
    another host's, or one whose owner is unknown.  Returns those removed (or that would be)."""
    try:
        entries = os.listdir(export_dir)
    except OSError:
        return []
    out = []
    for entry in sorted(entries):
        work = parse_work_dir(export_dir, entry)
        if work is None or work.owner_alive is not False:
            continue
        if not os.path.isdir(work.path) or os.path.islink(work.path):
            continue
        out.append(work)
        if not dry_run:
            shutil.rmtree(work.path, ignore_errors=True)
            log.info("removed '%s', left by pid %d (no longer running)", work.path, work.pid)
    return out


# --- what an export may replace ---------------------------------------------------------


def _member_names(found: Archive | GanetiArchive) -> set[str]:
    if isinstance(found, Archive):
        names = {MANIFEST, found.manifest.get("config", CONFIG)}
        for d in found.disks:
            names.update((os.path.basename(d.dump_path), os.path.basename(d.index_path)))
        return names
    return {CONFIG} | {os.path.basename(d.dump_path) for d in found.disks}


_MEMBER_PATTERN = re.compile(r"^(manifest\.json|config\.ini|[0-9a-fA-F-]{36}(\.lz4|\.idx)?)$")


def check_replaceable(path: str, instance_name: str, *, force: bool = False) -> None:
    """Refuse to replace ``path`` unless it is missing, an empty directory, or an archive
    (native or Ganeti) of instance ``instance_name`` holding nothing but its own files.

    ``force`` also allows an archive of another instance, or a damaged one,
    but never a directory holding anything an archive does not hold.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as err:
        raise E.ArchiveError(f"cannot export to '{path}': {err.strerror or err}") from err
    if not stat.S_ISDIR(st.st_mode):
        raise E.ArchiveError(f"cannot export to '{path}': it exists and is not a directory "
                             "(it is never replaced)")
    try:
        entries = set(os.listdir(path))
    except OSError as err:
        raise E.ArchiveError(f"cannot export to '{path}': {err.strerror or err}") from err
    if not entries:
        return
    problem = None
    try:
        found = open_archive(path)
    except E.GanetiVolError as err:
        found, problem = None, str(err)
    allowed = _member_names(found) if found is not None else {
        e for e in entries if _MEMBER_PATTERN.match(e)}
    strangers = sorted(entries - allowed)
    if strangers or not entries & {MANIFEST, CONFIG}:
        shown = ", ".join(f"'{n}'" for n in strangers[:3]) + (" ..." if len(strangers) > 3 else "")
        raise E.ArchiveError(
            f"cannot export to '{path}': it is not an archive (it holds {shown or 'other files'}, "
            "which no archive holds); it is never replaced, not even with --force"
        )
    if found is None:
        if not force:
            raise E.ArchiveError(f"cannot export to '{path}': it holds a damaged archive "
                                 f"({problem}); use --force to replace it")
        return
    if found.instance.name != instance_name and not force:
        raise E.ArchiveError(
            f"cannot export instance '{instance_name}' to '{path}': it holds an archive of "
            f"instance '{found.instance.name}'; use --force to replace it"
        )


def _publish(staging: str, final: str) -> None:
    """Move ``staging`` to ``final``, replacing an existing archive atomically."""
    parent, name = os.path.split(final)
    atomicfile.replace_dir(staging, final, old_dir=lambda: owned_tempdir(parent, name, "old"))


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or name in ("..",):
        raise E.UsageError(f"cannot use '{name}' as an archive name")


def iso_time(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


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
        self._idx_append(_IDX_HEADER.pack(_IDX_MAGIC, _IDX_VERSION, hlen, 0, info.chunk_size))

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
        self._idx_append(_IDX_ENTRY.pack(flags, len(chunk.frame), self.pos) + chunk.hash)
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
        _check_name(self.name)
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
        _write_file(os.path.join(self.staging, CONFIG), config, f"'{self.staging}/{CONFIG}'")
        if self.format == "native":
            manifest = self._manifest(entries, hashlib.sha256(config).hexdigest())
            text = render_manifest(manifest)
            _write_file(os.path.join(self.staging, MANIFEST), text,
                        f"'{self.staging}/{MANIFEST}'")
        check_replaceable(self.path, self.instance.name, force=self.force)
        try:
            os.chmod(self.staging, 0o750)
            atomicfile.fsync_dir(self.staging)
            _publish(self.staging, self.path)
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


# --- reading: what an archive may name, and how it is opened ---------------------------

_SUM_PLACEHOLDER = b"0" * 64
_SUM_FIELD = re.compile(rb'"manifest_sha256"[ \t\r\n]*:[ \t\r\n]*"([^"\\]*)"')
_HEX64 = re.compile(r"[0-9a-f]{64}")
#: bytes of the index read at a time (it is hashed and parsed as it is read)
_INDEX_READ = 1 << 20


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def quote(value: object, limit: int = 60) -> str:
    """``value`` for an error message: repr (control characters escaped), shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def member_name(name: object, what: str) -> str:
    """``name`` if an archive may name it: a plain file name (no directory, not ``..``)."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise E.ArchiveError(f"cannot open {what}: {quote(name)} is not the name of a file "
                             "inside the archive (no directories, no '..', no absolute paths)")
    return name


class ArchiveDir:
    """An archive directory, pinned by its identity: its files are opened through it.

    The path may lead through a symbolic link (the operator's choice); what
    it leads to is remembered (device and inode), and every later open checks
    that the directory is still that one, so swapping it for another (say
    ``/etc``) between two opens is refused.
    """

    def __init__(self, path: str, what: str) -> None:
        self.path = os.path.abspath(path)
        try:
            st = os.stat(self.path)
        except OSError as err:
            raise E.ArchiveError(f"cannot open {what}: no such directory") from err
        if not stat.S_ISDIR(st.st_mode):
            raise E.ArchiveError(f"cannot open {what}: not a directory")
        self.identity = (st.st_dev, st.st_ino)

    def open(self, name: str, what: str) -> int:
        """A read-only fd of the regular file ``name`` directly inside the directory.

        ``name`` must be a plain name (:func:`member_name`).  It is opened
        relative to the directory's fd with ``O_NOFOLLOW``, after an ``lstat``
        that refuses anything but a regular file, so a symbolic link is never
        followed and a FIFO, device or socket is never opened (nothing
        blocks, no driver runs); the fd is checked again to be that same file.
        """
        member_name(name, what)
        path = os.path.join(self.path, name)
        try:
            dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise E.ArchiveError(f"cannot open {what}: '{self.path}': "
                                 f"{err.strerror or err}") from err
        try:
            here = os.fstat(dfd)
            if (here.st_dev, here.st_ino) != self.identity:
                raise E.ArchiveError(f"cannot open {what}: '{self.path}' was replaced by "
                                     "another directory while being read")
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise E.ArchiveError(f"cannot open {what}: '{path}' is {_kind(st.st_mode)}, "
                                     "not a regular file")
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                         | os.O_CLOEXEC, dir_fd=dfd)
        except FileNotFoundError:
            raise E.ArchiveError(f"cannot open {what}: '{path}' does not exist") from None
        except OSError as err:
            raise E.ArchiveError(f"cannot open {what}: '{path}': {err.strerror or err}") from err
        finally:
            os.close(dfd)
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            raise E.ArchiveError(f"cannot open {what}: '{path}' was replaced while being opened")
        os.set_blocking(fd, True)
        return fd

    def read(self, name: str, what: str, limit: int) -> bytes:
        """The bytes of the file ``name`` (see :meth:`open`), refused if over ``limit``."""
        path = os.path.join(self.path, name)
        fd = self.open(name, what)
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                raise E.ArchiveError(f"cannot open {what}: '{path}' has {size} bytes, more than "
                                     f"the {limit} allowed")
            buf = bytearray(size + 1)
            n = read_full(fd, memoryview(buf), None, f"'{path}'")
        finally:
            os.close(fd)
        if n != size:
            raise E.ArchiveError(f"cannot open {what}: '{path}' changed while being read")
        return bytes(buf[:n])

    def config(self, name: str, what: str) -> tuple[bytes, G.GanetiExport]:
        """config.ini (named ``name``): its bytes and what it says."""
        data = self.read(name, what, MAX_CONFIG)
        return data, G.parse_config(data, os.path.join(self.path, name))  # checks UTF-8


# --- reading: the manifest -------------------------------------------------------------


def render_manifest(manifest: dict[str, Any]) -> bytes:
    """manifest.json's bytes, ending with ``manifest_sha256``: its own checksum.

    The checksum is the SHA-256 of the file's bytes with its 64 hex digits
    replaced by 64 ``0``, so every byte of the manifest is covered.
    """
    body = {k: v for k, v in manifest.items() if k != MANIFEST_SUM}
    body[MANIFEST_SUM] = _SUM_PLACEHOLDER.decode()
    text = (json.dumps(body, indent=1) + "\n").encode()
    return _SUM_FIELD.sub(
        lambda m: m.group(0).replace(_SUM_PLACEHOLDER, hashlib.sha256(text).hexdigest().encode()),
        text,
    )


def _check_manifest_sum(data: bytes, manifest: dict[str, Any], where: str) -> bool:
    """Check manifest.json's own checksum; False for a manifest written without one.

    A manifest lists ``manifest-sha256`` in its features and has the field
    (written so since that feature); one with neither is from an older
    ganeti-vol and is read unchecked; anything in between is damage.
    """
    listed = any(_is_str_list(f) and FEATURE_MANIFEST_SUM in f
                 for f in (manifest.get("mandatory_features"), manifest.get("optional_features")))
    if MANIFEST_SUM not in manifest and not listed:
        return False
    found = _SUM_FIELD.findall(data)
    value = manifest.get(MANIFEST_SUM)
    if len(found) != 1 or not isinstance(value, str) or found[0] != value.encode() \
            or not _HEX64.fullmatch(value):
        raise E.IntegrityError(f"cannot open {where}: {MANIFEST} has no valid checksum "
                               f"('{MANIFEST_SUM}', found {len(found)})")
    if hashlib.sha256(_SUM_FIELD.sub(
            lambda m: m.group(0).replace(found[0], _SUM_PLACEHOLDER), data)).hexdigest() != value:
        raise E.IntegrityError(f"cannot open {where}: {MANIFEST} does not match its checksum "
                               f"('{MANIFEST_SUM}'): the manifest is damaged")
    return True


def _is_int(lo: int = 0, hi: int = (1 << 63) - 1) -> Any:
    return lambda v: type(v) is int and lo <= v <= hi


def _is_str(v: object) -> bool:
    return isinstance(v, str)


def _is_hex64(v: object) -> bool:
    return isinstance(v, str) and _HEX64.fullmatch(v) is not None


def _is_str_list(v: object) -> TypeGuard[list[str]]:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


class _Checker:
    """Type and range checks of one manifest object; errors name the key."""

    def __init__(self, obj: dict[str, Any], where: str, prefix: str = "") -> None:
        self.obj, self.where, self.prefix = obj, where, prefix

    def bad(self, key: str, problem: str) -> E.ArchiveError:
        return E.ArchiveError(f"cannot open {self.where}: {MANIFEST}: '{self.prefix}{key}' "
                              f"{problem}")

    def get(self, key: str, ok: Any, expect: str, *, required: bool = True,
            none: bool = False) -> Any:
        if key not in self.obj:
            if required:
                raise self.bad(key, "is missing")
            return None
        value = self.obj[key]
        if not (ok(value) or (none and value is None)):
            raise self.bad(key, f"must be {expect}, not {quote(value)}")
        return value


def _check_manifest(m: dict[str, Any], where: str) -> None:
    """Every field a reader uses has its type and range (ArchiveError naming the key)."""
    top = _Checker(m, where)
    top.get("mandatory_features", _is_str_list, "a list of names")
    top.get("optional_features", _is_str_list, "a list of names", required=False)
    top.get("export_id", _is_str, "a string")
    top.get("created", _is_str, "a time stamp string")
    for key in ("finished", "created_by"):
        top.get(key, _is_str, "a string", required=False)
    inst = _Checker(top.get("instance", lambda v: isinstance(v, dict), "an object"), where,
                    "instance.")
    inst.get("name", lambda v: isinstance(v, str) and v != "", "a non-empty string")
    inst.get("os", _is_str, "a string")
    for key in ("uuid", "hypervisor"):
        inst.get(key, _is_str, "a string", required=False, none=True)
    inst.get("disk_count", _is_int(0, G.MAX_DISKS), f"a number from 0 to {G.MAX_DISKS}",
             required=False)
    member_name(top.get("config", _is_str, "a file name"), where)
    top.get("config_sha256", _is_hex64, "64 hex digits")
    top.get("osparams_private_omitted", _is_str_list, "a list of names", required=False)
    disks = top.get("disks", lambda v: isinstance(v, list) and len(v) <= G.MAX_DISKS,
                    f"a list of at most {G.MAX_DISKS} disks")
    names = {MANIFEST, m["config"]}
    seen: set[int] = set()
    for n, entry in enumerate(disks):
        if not isinstance(entry, dict):
            raise top.bad(f"disks[{n}]", f"must be an object, not {quote(entry)}")
        d = _Checker(entry, where, f"disks[{n}].")
        index = d.get("index", _is_int(0, G.MAX_DISKS - 1), f"a number from 0 to "
                      f"{G.MAX_DISKS - 1}")
        if index in seen:
            raise d.bad("index", f"repeats disk {index}: every disk is listed once")
        seen.add(index)
        d.get("uuid", _is_str, "a string")
        d.get("name", _is_str, "a string", required=False, none=True)
        for key in ("dump", "index_file"):
            name = member_name(d.get(key, _is_str, "a file name"), where)
            if name in names:
                raise d.bad(key, f"names {quote(name)}, which is already another file of the "
                                 "archive")
            names.add(name)
        d.get("index_sha256", _is_hex64, "64 hex digits")
        size = d.get("size", _is_int(), "a byte count")
        d.get("disk_size", _is_int(), "a byte count", required=False, none=True)
        cs = d.get("chunk_size", codec.valid_chunk_size,
                   "a power of two from 64 KiB to 16 MiB")
        count = -(-size // cs)
        d.get("chunks", lambda v, n=count: v == n, f"{count} ({size} bytes in chunks of {cs})")
        d.get("dump_bytes", _is_int(), "a byte count")
        d.get("compression", _is_str, "a string")
        d.get("hash", _is_str, "a string")
        d.get("digest", lambda v: isinstance(v, str) and v.startswith("sha256:")
              and _is_hex64(v[7:]), "'sha256:' and 64 hex digits")
        d.get("zero_chunks", _is_int(0, entry["chunks"]), "a chunk count", required=False)
        for key in ("zero_bytes", "data_bytes", "hole_bytes"):
            d.get(key, _is_int(0, size), "a byte count", required=False)
        for key in ("source", "timings"):
            d.get(key, lambda v: isinstance(v, dict), "an object", required=False, none=True)
        _Checker(entry.get("source") or {}, where, f"disks[{n}].source.").get(
            "mode", _is_str, "a string", required=False, none=True)
        d.get("base", lambda v: False, "null (no base archive in format version 1)",
              required=False, none=True)
        d.get("zero_map", lambda v: isinstance(v, list), "a list", required=False, none=True)


def parse_manifest(data: bytes, where: str) -> tuple[dict[str, Any], bool]:
    """The checked manifest and whether it had its own checksum (see _check_manifest_sum)."""
    try:
        manifest = json.loads(data)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (ValueError, RecursionError) as err:  # RecursionError: nested too deep
        raise E.ArchiveError(
            f"cannot open {where}: not an archive (incomplete or invalid {MANIFEST}: {err})"
        ) from None
    check_format(manifest, f"{where}: {MANIFEST}")
    checked = _check_manifest_sum(data, manifest, where)
    _check_manifest(manifest, where)
    return manifest, checked


def check_format(
    header: dict[str, Any],
    what: str,
    *,
    fmt: str = FORMAT,
    version: int = FORMAT_VERSION,
    supported: frozenset[str] = SUPPORTED_FEATURES,
) -> None:
    """Refuse a manifest or stream header this reader cannot read (ArchiveFormatError)."""
    if header.get("format") != fmt:
        raise E.ArchiveError(f"cannot open {what}: not a {fmt} ('format' is "
                             f"{quote(header.get('format'))})")
    found = header.get("format_version")
    if type(found) is not int or found < 1:
        raise E.ArchiveError(f"cannot open {what}: invalid format_version {quote(found)}")
    if found > version:
        raise E.ArchiveFormatError(
            f"cannot open {what}: format version {found} is newer than {version}; "
            "a newer ganeti-vol is required"
        )
    features = header.get("mandatory_features")
    if not _is_str_list(features):
        raise E.ArchiveError(f"cannot open {what}: invalid mandatory_features {quote(features)}")
    missing = sorted(set(features) - supported)
    if missing:
        raise E.ArchiveFormatError(
            f"cannot open {what}: archive needs feature(s) "
            f"{', '.join(f if f.isprintable() else quote(f) for f in missing)}; "
            "a newer ganeti-vol is required"
        )


def check_disks(
    announced: dict[int, tuple[str | None, int | None]], export: G.GanetiExport, what: str,
    by: str,
) -> None:
    """The disks a manifest or stream announces are exactly config.ini's.

    ``announced`` maps each index to its dump name and disk size in bytes
    (None: not compared); config.ini gives the size in MiB.
    """
    config = {d.index: d for d in export.disks if d.dump}
    if sorted(announced) != sorted(config):
        raise E.ArchiveError(f"cannot open {what}: {by} has disks {sorted(announced)}, "
                             f"{CONFIG} has disks {sorted(config)}")
    for index, (dump, disk_size) in announced.items():
        disk = config[index]
        if dump is not None and dump != disk.dump:
            raise E.ArchiveError(f"cannot open {what}: {by} names {quote(dump)} for disk "
                                 f"{index}, {CONFIG} names {quote(disk.dump)}")
        if disk_size is not None and disk_size != disk.size_mib << 20:
            raise E.ArchiveError(f"cannot open {what}: {by} gives disk {index} "
                                 f"{quote(disk_size)} bytes, {CONFIG} {disk.size_mib} MiB")


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
        expected = _IDX_HEADER.size + count * (_IDX_ENTRY.size + self.hash_len)
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
        step = _IDX_ENTRY.size + self.hash_len
        index = _IndexReader(ifd)
        header = index.read(_IDX_HEADER.size)
        if len(header) != _IDX_HEADER.size:
            raise self._corrupt(f"index '{self.index_path}' is truncated")
        magic, version, hlen, _, chunk_size = _IDX_HEADER.unpack(header)
        if (magic, version, hlen, chunk_size) != (_IDX_MAGIC, _IDX_VERSION, self.hash_len, cs):
            raise self._corrupt(f"index '{self.index_path}' has an unexpected header")
        pos = 0
        for i in range(count):
            raw = index.read(step)
            if len(raw) != step:
                raise self._corrupt(f"index '{self.index_path}' is truncated", i * cs)
            flags, flen, foff = _IDX_ENTRY.unpack_from(raw)
            length = min(cs, size - i * cs)
            if flags & ~_KNOWN_FLAGS:
                raise self._corrupt(f"unknown chunk flags {flags:#x} in the index", i * cs)
            if foff != pos or not 0 < flen <= codec.max_frame(length):
                raise self._corrupt(f"the index does not describe contiguous frames of possible "
                                    f"lengths (chunk {i}: {flen} bytes at {foff})", i * cs)
            pos += flen
            yield flags, flen, foff, raw[_IDX_ENTRY.size:]
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


class _OpenedArchive:
    """What native archives and Ganeti exports share once opened."""

    path: str
    disks: list[Any]

    def disk(self, index: int) -> Any:
        """The ChunkSource of disk ``index``."""
        for d in self.disks:
            if d.index == index:
                return d
        raise E.UsageError(f"'{self.path}' has no dump of disk {index}")


class Archive(_OpenedArchive):
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


class GanetiArchive(_OpenedArchive):
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


# --- verify / list / remove ------------------------------------------------------------


def verify(
    path: str,
    engine: Engine | None = None,
    cancel: threading.Event | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Re-hash every chunk of every disk; raise on the first bad one, else a report.

    The error (IntegrityError, or CompressionError for an undecodable frame)
    names the disk and offset and carries them as ``disk`` and ``offset``.
    A Ganeti export has no hashes: its dumps are only read through.
    ``progress`` is a :class:`ganeti_vol.engine.progress.Progress` (or None).
    """
    archive = open_archive(path)
    own = engine is None
    engine = engine or Engine()
    report: dict[str, Any] = {"path": archive.path, "format": archive.format, "disks": [],
                              "manifest_checked": getattr(archive, "manifest_checked", False)}
    try:
        for disk in archive.disks:
            try:
                dp = progress.disk(disk.index, disk.size) if progress is not None else None
                summary = engine.decode(disk, NullTarget(), cancel=cancel, progress=dp)
                if dp is not None:
                    dp.finish()
            except E.GanetiVolError as err:
                if getattr(err, "disk", None) is None:
                    err.disk = disk.index  # type: ignore[attr-defined]
                raise
            report["disks"].append({"index": disk.index, "size": summary.size,
                                    "chunks": summary.chunks, "digest": summary.digest,
                                    "verified": disk.hash_algo is not None})
    finally:
        if own:
            engine.close()
    report["ok"] = True
    return report


def resolve(name_or_path: str, export_dir: str) -> str:
    """An archive path from a name in ``export_dir`` or a path."""
    if os.sep in name_or_path or name_or_path in (".", ".."):
        return os.path.abspath(name_or_path)
    _check_name(name_or_path)
    return os.path.join(export_dir, name_or_path)


def list_archives(export_dir: str) -> list[dict[str, Any]]:
    """Every visible directory in ``export_dir``: its info, or its error if not an archive.

    A broken or foreign directory is listed with its error (``valid`` False);
    it never hides the others.
    """
    try:
        names = sorted(n for n in os.listdir(export_dir) if not n.startswith("."))
    except FileNotFoundError:
        return []
    except OSError as err:
        raise E.ArchiveError(f"cannot list exports in '{export_dir}': {err.strerror}") from err
    out = []
    for name in names:
        path = os.path.join(export_dir, name)
        if not os.path.isdir(path):
            continue
        try:
            out.append({"valid": True, **open_archive(path).info()})
        except E.GanetiVolError as err:
            out.append({"valid": False, "name": name, "path": path, "error": str(err)})
        except Exception as err:  # a bug; one entry must still not hide the others
            log.debug("cannot list '%s'", path, exc_info=True)
            out.append({"valid": False, "name": name, "path": path,
                        "error": f"internal error reading it: {err!r} (please report this)"})
    return out


def remove(path: str) -> None:
    """Remove an archive (it must be one): renamed away atomically, then deleted."""
    path = os.path.abspath(path)
    if not os.path.lexists(path):
        raise E.ArchiveError(f"cannot remove '{path}': no such archive")
    if not os.path.isdir(path) or not (
        os.path.exists(os.path.join(path, MANIFEST)) or os.path.exists(os.path.join(path, CONFIG))
    ):
        raise E.ArchiveError(f"cannot remove '{path}': not an archive")
    parent, base = os.path.split(path)
    try:
        trash = owned_tempdir(parent, base, "remove")
        os.rename(path, os.path.join(trash, base))
    except OSError as err:
        raise E.ArchiveError(f"cannot remove '{path}': {err.strerror or err}") from err
    shutil.rmtree(trash, ignore_errors=True)
