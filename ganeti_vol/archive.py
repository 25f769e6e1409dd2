"""Export archives on disk: write (staged, atomic), read, verify, list, remove.

An archive is a directory ``<export_dir>/<instance>/`` (format spec:
``doc/archive-format.md``)::

    config.ini          Ganeti v0 export info (ganeti_vol.ganeti_export)
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

import ctypes
import errno
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
from typing import Any

from ganeti_vol import __version__, atomicfile, codec, fdutil, hashing, locks, streams
from ganeti_vol import errors as E
from ganeti_vol import ganeti_export as G
from ganeti_vol.model import Instance

log = logging.getLogger(__name__)

FORMAT = "ganeti-vol-archive"
FORMAT_VERSION = 1
#: features this reader implements; an archive may require any subset of them
SUPPORTED_FEATURES = frozenset({"lz4-frame-chunks", "chunk-index-v1"})
#: what this writer puts in every archive's mandatory_features
WRITTEN_FEATURES = ("lz4-frame-chunks", "chunk-index-v1")
MANIFEST = "manifest.json"
CONFIG = "config.ini"
DUMP_SUFFIX = ".lz4"
INDEX_SUFFIX = ".idx"

#: index file: magic, version, hash length, reserved, chunk size
_IDX_HEADER = struct.Struct("<8sHHIQ")
_IDX_MAGIC = b"GVIDX\x00\r\n"
_IDX_VERSION = 1
#: index entry (followed by the chunk hash): flags, reserved, frame length, frame offset
_IDX_ENTRY = struct.Struct("<B3xIQ")
FLAG_ZERO = 0x01
_KNOWN_FLAGS = FLAG_ZERO

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


# --- helpers ---------------------------------------------------------------------------


def _write_file(path: str, data: bytes, what: str) -> None:
    """Create ``path`` with ``data``, fsynced (never through a symlink, never an existing file)."""
    try:
        atomicfile.create(path, data, 0o640)
    except OSError as err:
        raise streams.io_error("write", what, err) from err


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
    start = locks.process_start_time(pid) or 0
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
        return locks.process_alive(self.pid, self.start or 0)

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


def _renameat2_exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        fn = fdutil.libc().renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _publish(staging: str, final: str) -> None:
    """Move ``staging`` to ``final``, replacing an existing archive atomically."""
    try:
        os.rename(staging, final)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if _renameat2_exchange(staging, final):
            shutil.rmtree(staging, ignore_errors=True)  # now holds the previous archive
        else:  # no RENAME_EXCHANGE: a short window without the archive
            old = owned_tempdir(os.path.dirname(final), os.path.basename(final), "old")
            os.rename(final, os.path.join(old, "archive"))
            try:
                os.rename(staging, final)
            except OSError:
                os.rename(os.path.join(old, "archive"), final)
                raise
            shutil.rmtree(old, ignore_errors=True)
    atomicfile.fsync_dir(os.path.dirname(final))


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or name in ("..",):
        raise E.UsageError(f"cannot use '{name}' as an archive name")


def iso_time(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _runs(indexes: list[int]) -> list[list[int]]:
    """[[first, count], ...] for sorted chunk indexes."""
    out: list[list[int]] = []
    for i in indexes:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1][1] += 1
        else:
            out.append([i, 1])
    return out


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
        self.info: streams.EncodeInfo | None = None

    def _open(self, path: str) -> int:
        try:
            return atomicfile.create_fd(path, 0o640)
        except OSError as err:
            raise streams.io_error("create", f"'{path}'", err) from err

    def begin(self, info: streams.EncodeInfo) -> None:
        self.info = info
        self.fd = self._open(self.dump_path)

    def _fsync(self, fd: int, what: str) -> None:
        try:
            os.fsync(fd)
        except OSError as err:
            raise streams.io_error("flush", what, err) from err

    def _close(self) -> None:
        streams.close_fd(self.fd)
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
        self.out: streams.AppendWriter | None = None
        self.idx_hash = hashlib.sha256()
        self.idx_buf = bytearray()
        self.idx_pos = 0
        self.pos = 0
        self.zero_indexes: list[int] = []

    def begin(self, info: streams.EncodeInfo) -> None:
        super().begin(info)
        assert self.fd is not None
        self.out = streams.AppendWriter(self.fd, self.dump_path, self.what)
        self.idx_fd = self._open(self.index_path)
        hlen = hashing.digest_size(info.hash_algo)
        self._idx_append(_IDX_HEADER.pack(_IDX_MAGIC, _IDX_VERSION, hlen, 0, info.chunk_size))

    def _idx_append(self, data: bytes, flush: bool = False) -> None:
        self.idx_buf += data
        if flush or len(self.idx_buf) >= 1 << 16:
            assert self.idx_fd is not None
            self.idx_hash.update(self.idx_buf)
            streams.pwrite_all(self.idx_fd, self.idx_buf, self.idx_pos, f"'{self.index_path}'")
            self.idx_pos += len(self.idx_buf)
            self.idx_buf = bytearray()

    def write_chunk(self, chunk: streams.Chunk) -> None:
        assert self.fd is not None and chunk.frame is not None and chunk.hash is not None
        assert self.out is not None
        self.out.append(chunk.frame)
        flags = FLAG_ZERO if chunk.zero else 0
        if chunk.zero:
            self.zero_indexes.append(chunk.index)
        self._idx_append(_IDX_ENTRY.pack(flags, len(chunk.frame), self.pos) + chunk.hash)
        self.pos += len(chunk.frame)

    def finish(self, summary: streams.EncodeSummary) -> None:
        assert self.fd is not None and self.idx_fd is not None
        self._idx_append(b"", flush=True)
        assert self.out is not None
        self.out.finish()
        self._fsync(self.idx_fd, f"'{self.index_path}'")
        self._close()
        streams.close_fd(self.idx_fd)
        self.idx_fd = None
        entry = _disk_entry(self.meta, summary, self.dump_name, self.pos)
        entry.update(
            index_file=self.index_name,
            index_sha256=self.idx_hash.hexdigest(),
            zero_map=_runs(self.zero_indexes),
        )
        self.writer._disk_done(self.meta, entry)

    def _close(self) -> None:
        if self.out is not None:
            self.out.close()
        super()._close()
        streams.close_fd(self.idx_fd)
        self.idx_fd = None


class _RawDiskSink(_DiskSinkBase):
    """Ganeti-format disk: the uncompressed dump ``<uuid>``, zero chunks left as holes."""

    compress = False

    def __init__(self, writer: ArchiveWriter, meta: DiskMeta) -> None:
        super().__init__(writer, meta, meta.uuid)

    def write_chunk(self, chunk: streams.Chunk) -> None:
        assert self.fd is not None and chunk.data is not None
        if not chunk.zero:
            streams.pwrite_all(self.fd, chunk.data, chunk.offset, self.what)

    def finish(self, summary: streams.EncodeSummary) -> None:
        assert self.fd is not None
        try:
            os.ftruncate(self.fd, summary.size)  # a new file: only extends over trailing zeros
        except OSError as err:
            raise streams.io_error("extend", self.what, err) from err
        self._fsync(self.fd, self.what)
        self._close()
        self.writer._disk_done(self.meta, _disk_entry(self.meta, summary, self.dump_name,
                                                      summary.size))


def _disk_entry(
    meta: DiskMeta, summary: streams.EncodeSummary, dump: str, dump_bytes: int
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
            raise streams.io_error("create a staging directory in", f"'{export_dir}'", err) from err
        self.published = False

    def disk_sink(self, index: int, meta: DiskMeta | None = None) -> streams.ChunkSink:
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
            text = (json.dumps(manifest, indent=1, sort_keys=False) + "\n").encode()
            _write_file(os.path.join(self.staging, MANIFEST), text,
                        f"'{self.staging}/{MANIFEST}'")
        check_replaceable(self.path, self.instance.name, force=self.force)
        try:
            os.chmod(self.staging, 0o750)
            atomicfile.fsync_dir(self.staging)
            _publish(self.staging, self.path)
        except OSError as err:
            raise streams.io_error("publish", f"archive '{self.path}'", err) from err
        self.published = True
        log.info("published archive '%s' (%d disk(s))", self.path, len(entries))
        return self.path

    def _manifest(self, entries: list[dict[str, Any]], config_sha256: str) -> dict[str, Any]:
        inst = self.instance
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "mandatory_features": list(WRITTEN_FEATURES),
            "optional_features": [],
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


# --- reading ---------------------------------------------------------------------------


def _load_manifest(path: str) -> dict[str, Any]:
    mpath = os.path.join(path, MANIFEST)
    try:
        with open(mpath, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise E.ArchiveError(f"cannot open archive '{path}': not an archive (no {MANIFEST})") from None
    except OSError as err:
        raise E.ArchiveError(f"cannot open archive '{path}': {err.strerror or err}") from err
    try:
        manifest = json.loads(data)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise E.ArchiveError(
            f"cannot open archive '{path}': not an archive (incomplete or invalid {MANIFEST}: "
            f"{err})"
        ) from err
    check_format(manifest, f"archive '{path}'")
    return manifest


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
        raise E.ArchiveError(f"cannot open {what}: not a {fmt}")
    found = header.get("format_version")
    if not isinstance(found, int) or found < 1:
        raise E.ArchiveError(f"cannot open {what}: invalid format_version {found!r}")
    if found > version:
        raise E.ArchiveFormatError(
            f"cannot open {what}: format version {found} is newer than {version}; "
            "a newer ganeti-vol is required"
        )
    features = header.get("mandatory_features")
    if not isinstance(features, list):
        raise E.ArchiveError(f"cannot open {what}: invalid mandatory_features {features!r}")
    missing = sorted(set(map(str, features)) - supported)
    if missing:
        raise E.ArchiveFormatError(
            f"cannot open {what}: archive needs feature(s) {', '.join(missing)}; "
            "a newer ganeti-vol is required"
        )


class ArchiveDisk:
    """One disk of a native archive, as a :class:`~ganeti_vol.streams.ChunkSource`."""

    def __init__(self, archive: Archive, entry: dict[str, Any]) -> None:
        self.archive = archive
        self.entry = entry
        self.index = int(entry["index"])
        self.what = f"disk {self.index} of archive '{archive.path}'"
        if entry.get("compression") != codec.COMPRESSION:
            raise E.ArchiveFormatError(
                f"cannot open {self.what}: unsupported compression '{entry.get('compression')}'"
            )
        self.hash_algo: str | None = str(entry["hash"])
        hashing.digest_size(self.hash_algo)
        self.chunk_size = int(entry["chunk_size"])
        self.size: int | None = int(entry["size"])
        self.disk_size: int | None = int(entry.get("disk_size") or 0) or None
        #: how the dump was made: "script" (an export script's stdout) or "raw"
        self.mode: str | None = (entry.get("source") or {}).get("mode")
        self.dump_path = os.path.join(archive.path, entry["dump"])
        self.index_path = os.path.join(archive.path, entry["index_file"])

    def _corrupt(self, problem: str, offset: int | None = None) -> E.IntegrityError:
        return E.IntegrityError(f"cannot read {self.what}: {problem}", disk=self.index,
                                offset=offset)

    def read_index(self) -> list[tuple[int, int, int, bytes]]:
        """The checked index: (flags, frame length, frame offset, hash) per chunk."""
        try:
            with open(self.index_path, "rb") as f:
                raw = f.read()
        except OSError as err:
            raise E.ArchiveError(f"cannot read {self.what}: index '{self.index_path}': "
                                 f"{err.strerror or err}") from err
        if hashlib.sha256(raw).hexdigest() != self.entry["index_sha256"]:
            raise self._corrupt(f"index '{self.index_path}' does not match its checksum")
        magic, version, hlen, _, chunk_size = _IDX_HEADER.unpack_from(raw)
        assert self.hash_algo is not None
        if (magic, version, hlen, chunk_size) != (
            _IDX_MAGIC, _IDX_VERSION, hashing.digest_size(self.hash_algo), self.chunk_size
        ):
            raise self._corrupt(f"index '{self.index_path}' has an unexpected header")
        step = _IDX_ENTRY.size + hlen
        body = memoryview(raw)[_IDX_HEADER.size:]
        if len(body) % step or len(body) // step != int(self.entry["chunks"]):
            raise self._corrupt(f"index '{self.index_path}' has the wrong number of entries")
        out = []
        for pos in range(0, len(body), step):
            flags, flen, foff = _IDX_ENTRY.unpack_from(body, pos)
            if flags & ~_KNOWN_FLAGS:
                raise self._corrupt(f"unknown chunk flags {flags:#x} in the index")
            out.append((flags, flen, foff, bytes(body[pos + _IDX_ENTRY.size:pos + step])))
        return out

    def chunks(self) -> Iterator[streams.Chunk]:
        """The chunks in order, with their recorded hashes (frames not yet checked)."""
        entries = self.read_index()
        cs, size = self.chunk_size, int(self.entry["size"])
        try:
            fd = os.open(self.dump_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise E.ArchiveError(f"cannot read {self.what}: '{self.dump_path}': "
                                 f"{err.strerror or err}") from err
        try:
            streams.fadvise(fd, os.POSIX_FADV_SEQUENTIAL)
            ahead = streams.ReadAhead(fd)
            pos = 0
            for i, (flags, flen, foff, digest) in enumerate(entries):
                offset = i * cs
                length = min(cs, size - offset)
                if foff != pos or length <= 0:
                    raise self._corrupt("the index does not describe contiguous frames", offset)
                ahead.reached(foff + flen)
                frame = os.pread(fd, flen, foff)
                if len(frame) != flen:
                    raise self._corrupt(f"'{self.dump_path}' is truncated", offset)
                pos += flen
                yield streams.Chunk(i, offset, length, bool(flags & FLAG_ZERO), digest, frame)
            if os.fstat(fd).st_size != pos or pos != int(self.entry["dump_bytes"]):
                raise self._corrupt(f"'{self.dump_path}' has {os.fstat(fd).st_size} bytes, "
                                    f"the index describes {pos}")
        finally:
            os.close(fd)

    def finish(self, summary: streams.DecodeSummary) -> None:
        """Compare what was decoded with the manifest (size, chunk count, whole-disk digest)."""
        streams.check_decoded(summary, self.entry, self.what, self.index, "the manifest")


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
    """A native ganeti-vol archive (opened read-only)."""

    format = "native"

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.manifest = _load_manifest(self.path)
        cpath = os.path.join(self.path, self.manifest.get("config", CONFIG))
        try:
            with open(cpath, "rb") as f:
                self.config_text = f.read()
        except OSError as err:
            raise E.ArchiveError(f"cannot open archive '{path}': {err.strerror or err}") from err
        if hashlib.sha256(self.config_text).hexdigest() != self.manifest.get("config_sha256"):
            raise E.IntegrityError(f"cannot open archive '{path}': {CONFIG} does not match "
                                   "its checksum in the manifest")
        self.export = G.parse_config(self.config_text.decode("utf-8"), cpath)
        self.instance = self.export.instance
        try:
            self.disks = [ArchiveDisk(self, e) for e in self.manifest["disks"]]
        except (KeyError, TypeError, ValueError) as err:
            raise E.ArchiveError(f"cannot open archive '{path}': invalid disk entry in "
                                 f"{MANIFEST} ({err!r})") from err

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "name": os.path.basename(self.path),
            "path": self.path,
            "format": "native",
            "format_version": m["format_version"],
            "instance": m["instance"]["name"],
            "os": m["instance"]["os"],
            "created": m.get("created"),
            "export_id": m.get("export_id"),
            "disks": [
                {k: e.get(k) for k in ("index", "uuid", "name", "size", "disk_size",
                                       "dump_bytes", "chunk_size", "chunks", "compression",
                                       "hash", "digest", "zero_chunks", "zero_bytes")}
                | {"mode": e.get("source", {}).get("mode"), "timings": e.get("timings")}
                for e in m["disks"]
            ],
            "size": sum(int(e["size"]) for e in m["disks"]),
            "stored_bytes": sum(int(e["dump_bytes"]) for e in m["disks"]),
        }


class GanetiDumpDisk:
    """One uncompressed dump of a Ganeti v0 export, as a ChunkSource (no recorded hashes)."""

    hash_algo = None

    def __init__(self, archive: GanetiArchive, disk: G.ExportDisk, chunk_size: int) -> None:
        self.index = disk.index
        self.what = f"disk {disk.index} of Ganeti export '{archive.path}'"
        self.dump_path = os.path.join(archive.path, disk.dump or "")
        self.chunk_size = chunk_size
        self.disk_size: int | None = disk.size_mib << 20
        self.mode: str | None = None  # Ganeti does not record it
        try:
            self.size: int | None = os.stat(self.dump_path).st_size
        except OSError as err:
            raise E.ArchiveError(f"cannot open {self.what}: dump '{self.dump_path}': "
                                 f"{err.strerror or err}") from err

    def chunks(self) -> Iterator[streams.Chunk]:
        try:
            fd = os.open(self.dump_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise E.ArchiveError(f"cannot read {self.what}: {err.strerror or err}") from err
        try:
            reader = streams.RandomAccessReader(fd, self.what, "file", verify_holes=False)
            self.size = reader.size
            index = 0
            while True:
                buf = bytearray(self.chunk_size)
                n, hole, _, _ = reader.read_chunk(buf, index * self.chunk_size, self.chunk_size)
                if n == 0:
                    break
                data = None if hole else (buf if n == self.chunk_size else bytes(buf[:n]))
                yield streams.Chunk(index, index * self.chunk_size, n, hole, None, data=data)
                index += 1
            reader.finish()
        finally:
            os.close(fd)

    def finish(self, summary: streams.DecodeSummary) -> None:
        if summary.size != self.size:
            raise E.ShortTransfer(what=f"cannot read {self.what}", expected=self.size,
                                  actual=summary.size)


class GanetiArchive(_OpenedArchive):
    """A Ganeti v0 export directory: config.ini plus uncompressed dumps."""

    format = "ganeti"

    def __init__(self, path: str, chunk_size: int = 4 << 20) -> None:
        self.path = os.path.abspath(path)
        self.export = G.read_config(os.path.join(self.path, CONFIG))
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
            "disks": [{"index": d.index, "dump": os.path.basename(d.dump_path), "size": d.size,
                       "disk_size": d.disk_size} for d in self.disks],
            "size": sum(d.size or 0 for d in self.disks),
            "stored_bytes": sum(d.size or 0 for d in self.disks),
        }


def open_archive(path: str, *, chunk_size: int = 4 << 20) -> Archive | GanetiArchive:
    """Open a native archive, or a Ganeti v0 export (config.ini + raw dumps, no manifest)."""
    if not os.path.isdir(path):
        raise E.ArchiveError(f"cannot open archive '{path}': no such directory")
    if os.path.exists(os.path.join(path, MANIFEST)):
        return Archive(path)
    if os.path.exists(os.path.join(path, CONFIG)):
        export = G.read_config(os.path.join(path, CONFIG))
        if any(d.dump and not os.path.exists(os.path.join(path, d.dump)) for d in export.disks):
            raise E.ArchiveError(
                f"cannot open archive '{path}': not an archive (no {MANIFEST}, and the dumps "
                f"named in {CONFIG} are missing)"
            )
        return GanetiArchive(path, chunk_size)
    raise E.ArchiveError(f"cannot open archive '{path}': not an archive (no {MANIFEST})")


# --- verify / list / remove ------------------------------------------------------------


def verify(
    path: str,
    engine: streams.Engine | None = None,
    cancel: threading.Event | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Re-hash every chunk of every disk; raise on the first bad one, else a report.

    The error (IntegrityError, or CompressionError for an undecodable frame)
    names the disk and offset and carries them as ``disk`` and ``offset``.
    A Ganeti export has no hashes: its dumps are only read through.
    ``progress`` is a :class:`ganeti_vol.progress.Progress` (or None).
    """
    archive = open_archive(path)
    own = engine is None
    engine = engine or streams.Engine()
    report: dict[str, Any] = {"path": archive.path, "format": archive.format, "disks": []}
    try:
        for disk in archive.disks:
            try:
                dp = progress.disk(disk.index, disk.size) if progress is not None else None
                summary = engine.decode(disk, streams.NullTarget(), cancel=cancel, progress=dp)
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
    """Every visible directory in ``export_dir``: its info, or its error if not an archive."""
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
    return out


def remove(path: str) -> None:
    """Remove an archive (it must be one): renamed away atomically, then deleted."""
    path = os.path.abspath(path)
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
