"""Snapshots: writing one from an export (dedup against the chunk store), reading one back.

Writing (``export INSTANCE --repo PATH``)::

    with SnapshotWriter(repo, instance, tag="nightly") as writer:
        engine.encode(fd, writer.disk_sink(0, DiskMeta.for_disk(instance, 0)), ...)
    writer.id, writer.result()

The sink asks the engine to skip compressing a chunk the store already holds
(``known``: the chunk is touched, so a running GC keeps it), writes new
chunks from a small thread pool (temp file, fsync, rename), and appends every
chunk's digest to the disk index.  On a clean exit the chunk directories are
fsynced, then config.ini and the index are complete, then the manifest is
written and the staging directory renamed into ``snapshots/``: a snapshot is
either all there or not listed.

Reading: :func:`open_snapshot` gives a :class:`Snapshot` whose disks are
:class:`~ganeti_vol.engine.chunks.ChunkSource` objects, so the engine verifies every
chunk against its digest before anything is written (``import PATH::SNAPSHOT``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent import futures
from typing import Any

from ganeti_vol import __version__
from ganeti_vol.core import atomicfile
from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import io_error
from ganeti_vol.core.model import Instance
from ganeti_vol.engine import codec
from ganeti_vol.engine.chunks import Chunk, DecodeSummary, EncodeInfo, EncodeSummary, check_decoded
from ganeti_vol.formats import ganeti_export as G
from ganeti_vol.formats.archive import DiskMeta, ListedSource
from ganeti_vol.repo import format as F
from ganeti_vol.repo.store import Repository, Writer, iso_time

log = logging.getLogger(__name__)

#: frames waiting to be written per disk (bounds memory: x chunk size)
_PENDING = 4
#: chunk files announced to the kernel ahead of the one being read
_READ_AHEAD = 8


def new_id(ts: float) -> str:
    """A snapshot id: UTC time to the millisecond (ids sort in time order), plus 6 random
    hex digits (two exports at once)."""
    ms = int(ts * 1000) % 1000
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(ts))}.{ms:03d}Z-{secrets.token_hex(3)}"


def index_name(disk: int) -> str:
    return f"disk{disk}.idx"


# --- writing ------------------------------------------------------------------------------


class _DiskSink:
    """Where the engine puts one disk's chunks (see the module doc)."""

    compress = True
    want_crc = False

    def __init__(self, writer: SnapshotWriter, meta: DiskMeta) -> None:
        self.writer, self.meta, self.repo = writer, meta, writer.repo
        self.path = os.path.join(writer.staging, index_name(meta.index))
        self.what = f"disk {meta.index} of snapshot {writer.id}"
        self._sizes: dict[bytes, int] = {}
        self._present: dict[bytes, int] = {}  # (see present)
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(max(_PENDING, self.repo.store_threads))
        self._pending: list[futures.Future[Any]] = []
        self.f: Any = None
        self.index: F.IndexWriter | None = None
        self.stats = {"new_chunks": 0, "new_bytes": 0, "new_stored_bytes": 0,
                      "reused_chunks": 0, "reused_bytes": 0, "stored_bytes": 0}

    def known(self, digest: bytes) -> bool:
        """Called by the engine's workers: True (and touched) if the store has the chunk."""
        size = self.repo.touch(digest)
        if size is None:
            return False
        with self._lock:
            self._sizes[digest] = size
        return True

    def present(self, digests: list[bytes]) -> set[bytes]:
        """Which of ``digests`` the store has: batched questions, which touch them (a running
        GC keeps them); their sizes are kept for :meth:`write_chunk` (a change map's chunks)."""
        found = {d: size for d, size in zip(digests, self.repo.haves(digests), strict=True)
                 if size is not None}
        with self._lock:
            self._present.update(found)
        return set(found)

    def begin(self, info: EncodeInfo) -> None:
        if (info.chunk_size, info.hash_algo) != (self.repo.chunk_size, self.repo.hash_algo):
            raise E.ProgrammerError(
                f"{self.what}: engine chunks ({info.chunk_size}, {info.hash_algo}) differ from "
                f"the repository's ({self.repo.chunk_size}, {self.repo.hash_algo})")
        try:
            self.f = os.fdopen(atomicfile.create_fd(self.path, 0o640), "wb")  # closed in finish/abort
        except OSError as err:
            raise io_error("create", f"'{self.path}'", err) from err
        self.index = F.IndexWriter(self.f, self.repo.hash_algo, self.repo.chunk_size)

    def _store(self, digest: bytes, frame: bytes | bytearray, length: int) -> None:
        try:
            written = self.repo.store(digest, frame, self.writer.tmpdir)
            with self._lock:
                if written:
                    self.stats["new_chunks"] += 1
                    self.stats["new_bytes"] += length
                    self.stats["new_stored_bytes"] += len(frame)
                    self.writer.dirs.add(self.repo.chunk_dir(digest))
                else:  # another writer (or this one) stored it meanwhile
                    self.stats["reused_chunks"] += 1
                    self.stats["reused_bytes"] += length
        finally:
            self._slots.release()

    def _check_pending(self, wait: bool) -> None:
        keep = []
        for fut in self._pending:
            if wait or fut.done():
                fut.result()  # raises the writer thread's error here
            else:
                keep.append(fut)
        self._pending = keep

    def write_chunk(self, chunk: Chunk) -> None:
        assert self.index is not None and chunk.hash is not None
        self._check_pending(wait=False)
        if chunk.zero:
            self.index.add(True, 0, chunk.hash)
            return
        if chunk.frame is None:  # the store has it (known)
            with self._lock:
                size = self._sizes.pop(chunk.hash, None) or self._present.get(chunk.hash)
            if size is None:
                size = self.repo.chunk_size_on_disk(chunk.hash)
            if size is None:
                raise E.ArchiveError(f"cannot export {self.what}: chunk {chunk.hash.hex()} "
                                     "vanished from the repository during the export")
            with self._lock:
                self.stats["reused_chunks"] += 1
                self.stats["reused_bytes"] += chunk.length
                self.stats["stored_bytes"] += size
            self.index.add(False, size, chunk.hash)
            return
        self._slots.acquire()
        try:
            fut = self.writer.pool.submit(self._store, chunk.hash, chunk.frame, chunk.length)
        except BaseException:
            self._slots.release()
            raise
        self._pending.append(fut)
        with self._lock:
            self.stats["stored_bytes"] += len(chunk.frame)
        self.index.add(False, len(chunk.frame), chunk.hash)

    def finish(self, summary: EncodeSummary) -> None:
        assert self.index is not None
        self._check_pending(wait=True)
        try:
            self.index.finish(summary.size)
            self.f.flush()
            os.fsync(self.f.fileno())
        except OSError as err:
            raise io_error("write", f"'{self.path}'", err) from err
        finally:
            self.f.close()
        entry = {
            "index": self.meta.index,
            "uuid": self.meta.uuid,
            "name": self.meta.name,
            "size": summary.size,
            "disk_size": self.meta.disk_size,
            "chunk_size": summary.chunk_size,
            "chunks": summary.chunks,
            "hash": summary.hash_algo,
            "compression": codec.COMPRESSION,
            "digest": summary.digest,
            "zero_chunks": summary.zero_chunks,
            "zero_bytes": summary.zero_bytes,
            "hole_bytes": summary.hole_bytes,
            "index_file": index_name(self.meta.index),
            "index_sha256": F.file_sha256(self.path, f"'{self.path}'"),
            **self.stats,
            "source": {"kind": summary.source_kind, "mode": self.meta.mode,
                       "size_hint": summary.size_hint, **self.meta.source},
            "timings": {"started": iso_time(summary.started),
                        "seconds": round(summary.seconds, 3)},
        }
        self.writer._disk_done(entry)

    def abort(self, error: BaseException) -> None:
        for fut in self._pending:
            fut.cancel()
        futures.wait(self._pending)
        self._pending = []
        if self.f is not None:
            self.f.close()
        self.writer._disk_failed(self.meta.index)


class SnapshotWriter:
    """Stage a snapshot and publish it on a clean exit of the ``with`` block.

    ``kind``: ``"export"`` or ``"origin"`` (an image that instances were
    created from, :mod:`ganeti_vol.repo.origin`).  ``origin``: the origin
    this instance was created from, recorded in the manifest.
    """

    def __init__(self, repo: Repository, instance: Instance, *, tag: str | None = None,
                 kind: str = "export", origin: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        self.repo, self.instance, self.tag, self.kind = repo, instance, tag, kind
        self.origin, self.extra = origin, extra or {}
        self.started = time.time()
        self.id = new_id(self.started)
        self.path = f"{repo.path}::{self.id}"
        self.dirs: set[str] = set()
        self._entries: dict[int, dict[str, Any]] = {}
        self._sinks: set[int] = set()
        self._failed: set[int] = set()
        self._lock = threading.Lock()
        self._stack = contextlib.ExitStack()
        self._config_sha: str | None = None  # set by commit, with config.ini
        self.published = False

    def __enter__(self) -> SnapshotWriter:
        try:
            self._stack.enter_context(self.repo.shared())
            w: Writer = self._stack.enter_context(self.repo.writer())
            self.tmpdir = w.tmpdir
            self.staging = os.path.join(w.tmpdir, f"snapshot-{self.id}")
            try:
                os.mkdir(self.staging, 0o750)
            except OSError as err:
                raise io_error("create", f"'{self.staging}'", err) from err
            self.pool = self._stack.enter_context(
                futures.ThreadPoolExecutor(self.repo.store_threads,
                                           thread_name_prefix="ganeti-vol-repo"))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            self._stack.close()  # pool drained, writer and lock released, tmp dir removed

    def disk_sink(self, index: int, meta: DiskMeta | None = None) -> _DiskSink:
        meta = meta or DiskMeta.for_disk(self.instance, index)
        with self._lock:
            if index in self._sinks:
                raise E.ProgrammerError(f"disk {index} is already being written")
            self._sinks.add(index)
        return _DiskSink(self, meta)

    def _disk_done(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._entries[entry["index"]] = entry

    def _disk_failed(self, index: int) -> None:
        with self._lock:
            self._failed.add(index)

    def manifest(self) -> dict[str, Any]:
        inst = self.instance
        entries = [self._entries[i] for i in sorted(self._entries)]
        return {
            "format": F.SNAPSHOT_FORMAT,
            "format_version": 1,
            "mandatory_features": list(F.WRITTEN_FEATURES),
            "optional_features": [],
            "id": self.id,
            "kind": self.kind,
            "tag": self.tag,
            "timestamp": self.started,
            "created": iso_time(self.started),
            "finished": iso_time(time.time()),
            "created_by": f"ganeti-vol {__version__}",
            "instance": {"name": inst.name, "os": inst.os, "uuid": inst.uuid,
                         "hypervisor": inst.hypervisor, "disk_count": len(inst.disks)},
            "origin": self.origin,
            "config": F.SNAPSHOT_CONFIG,
            "config_sha256": self._config_sha,
            "osparams_private_omitted": sorted(inst.osparams_private),
            **self.extra,
            "disks": entries,
        }

    def commit(self) -> None:
        """Chunk dirs fsynced, then config.ini and manifest, then the snapshot appears."""
        with self._lock:
            missing = sorted((self._sinks - set(self._entries)) | self._failed)
        if missing or not self._entries:
            raise E.ArchiveError(f"cannot publish snapshot {self.id} in {self.repo.what}: "
                                 f"disk(s) {', '.join(map(str, missing)) or '-'} not exported")
        self.repo.sync_dirs(self.dirs)
        dumps = {i: f"disk{i}" for i in self._entries}
        config = G.render_config(self.instance, dumps, timestamp=int(self.started)).encode()
        self._config_sha = hashlib.sha256(config).hexdigest()
        self._write(F.SNAPSHOT_CONFIG, config)
        self._write(F.MANIFEST, F.seal(self.manifest()))
        self.repo.publish_snapshot(self.staging, self.id)
        self.published = True
        log.info("published snapshot %s of '%s' in %s", self.id, self.instance.name,
                 self.repo.what)

    def _write(self, name: str, data: bytes) -> None:
        path = os.path.join(self.staging, name)
        try:
            atomicfile.create(path, data, 0o640)
        except OSError as err:
            raise io_error("write", f"'{path}'", err) from err

    #: disks may be written at once (see :class:`ganeti_vol.ops.endpoints.ExportDestination`)
    parallel = True

    @property
    def hook_path(self) -> str:
        """``EXPORT_PATH`` of the post hooks: ``REPO::ID``."""
        return self.path

    def extra_result(self) -> dict[str, Any]:
        """The export's result gets the repository's figures under "repository"."""
        return {"repository": self.result()}

    def result(self) -> dict[str, Any]:
        """The export's repository figures: new versus reused chunks and bytes."""
        keys = ("new_chunks", "new_bytes", "new_stored_bytes", "reused_chunks",
                "reused_bytes", "stored_bytes", "zero_chunks", "zero_bytes")
        totals = {k: sum(int(e.get(k) or 0) for e in self._entries.values()) for k in keys}
        return {"repository": self.repo.path, "snapshot": self.id, "tag": self.tag, **totals}


# --- reading ------------------------------------------------------------------------------


def split_spec(spec: str) -> tuple[str, str]:
    """``PATH::SNAPSHOT`` -> (PATH, SNAPSHOT)."""
    path, sep, snap = spec.rpartition("::")
    if not sep or not path or not snap:
        raise E.UsageError(f"'{spec}' is not REPOSITORY::SNAPSHOT")
    return path, snap


def load_manifest(repo: Repository, snap_id: str) -> dict[str, Any]:
    what = f"snapshot {snap_id} of {repo.what}"
    path = repo.local_file(F.SNAPSHOTS, snap_id, F.MANIFEST)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise E.ArchiveError(f"cannot open {what}: no such snapshot") from None
    except OSError as err:
        raise E.ArchiveError(f"cannot open {what}: {err.strerror or err}") from err
    manifest = F.unseal(data, f"{what}: {F.MANIFEST}")
    if manifest.get("format") != F.SNAPSHOT_FORMAT or manifest.get("id") != snap_id:
        raise E.IntegrityError(f"cannot open {what}: the manifest is not this snapshot's")
    missing = sorted(set(map(str, manifest.get("mandatory_features") or [])) -
                     F.SUPPORTED_FEATURES)
    if missing:
        raise E.ArchiveFormatError(f"cannot open {what}: it needs feature(s) "
                                   f"{', '.join(missing)}; a newer ganeti-vol is required")
    return manifest


def list_snapshots(repo: Repository) -> list[dict[str, Any]]:
    """Every snapshot's manifest (``valid``) or the error that makes it unreadable."""
    out = []
    for snap_id in repo.snapshot_ids():
        try:
            out.append({"valid": True, **load_manifest(repo, snap_id)})
        except E.GanetiVolError as err:
            out.append({"valid": False, "id": snap_id, "error": str(err)})
    out.sort(key=lambda m: (m.get("timestamp") or 0, m["id"]))
    return out


def resolve(repo: Repository, spec: str) -> str:
    """A snapshot id from an id, ``INSTANCE`` (its latest) or ``INSTANCE@TAG``."""
    ids = repo.snapshot_ids()
    if spec in ids:
        return spec
    name, _, tag = spec.partition("@")
    found = [m for m in list_snapshots(repo) if m["valid"] and m["instance"]["name"] == name
             and m.get("kind") == "export" and (not tag or m.get("tag") == tag)]
    if not found:
        raise E.ArchiveError(f"cannot find snapshot '{spec}' in {repo.what} (give an id, an "
                             "instance name for its latest snapshot, or INSTANCE@TAG)")
    return str(found[-1]["id"])


class SnapshotDisk:
    """One disk of a snapshot, as a :class:`~ganeti_vol.engine.chunks.ChunkSource`."""

    def __init__(self, snap: Snapshot, entry: dict[str, Any]) -> None:
        self.snap, self.entry, self.repo = snap, entry, snap.repo
        self.index = int(entry["index"])
        self.what = f"disk {self.index} of snapshot {snap.path}"
        if (entry.get("compression"), entry.get("hash")) != (codec.COMPRESSION,
                                                            snap.repo.hash_algo):
            raise E.ArchiveFormatError(f"cannot open {self.what}: unsupported compression or "
                                       "digest")
        self.hash_algo: str | None = snap.repo.hash_algo
        self.chunk_size = int(entry["chunk_size"])
        self.size: int | None = int(entry["size"])
        self.disk_size: int | None = int(entry.get("disk_size") or 0) or None
        self.mode: str | None = (entry.get("source") or {}).get("mode")
        self.index_path = snap.repo.local_file(F.SNAPSHOTS, snap.id, entry["index_file"])
        self.dump_path = f"{snap.path}/{entry['index_file']}"

    def open_index(self) -> F.Index:
        """The disk index, checked against the manifest (whole-file SHA-256, size, count)."""
        what = f"index of {self.what}"
        if F.file_sha256(self.index_path, what) != self.entry.get("index_sha256"):
            raise E.IntegrityError(f"cannot read {what}: it does not match its checksum in the "
                                   "manifest (damaged)")
        idx = F.Index(self.index_path, self.repo.hash_algo, what)
        if (idx.count, idx.size, idx.chunk_size) != (
                int(self.entry["chunks"]), self.size, self.chunk_size):
            raise E.IntegrityError(f"cannot read {what}: it disagrees with the manifest")
        return idx

    def chunks(self) -> Iterator[Chunk]:
        """The chunks in order; the next ones' files are announced to the kernel
        (``WILLNEED``) so that their reads overlap the decoding of the current ones."""
        idx = self.open_index()
        cs, size = self.chunk_size, int(self.entry["size"])
        ahead: deque[tuple[int, bool, bytes]] = deque()
        entries = idx.entries()
        for entry in entries:
            i, zero, _flen, digest = entry
            ahead.append((i, zero, digest))
            if not zero:
                self.repo.prefetch(digest)
            if len(ahead) < _READ_AHEAD:
                continue
            yield self._chunk(*ahead.popleft(), cs, size)
        while ahead:
            yield self._chunk(*ahead.popleft(), cs, size)

    def _chunk(self, i: int, zero: bool, digest: bytes, cs: int, size: int) -> Chunk:
        offset = i * cs
        length = min(cs, size - offset)
        if zero:
            return Chunk(i, offset, length, True, digest, codec.zero_frame(length))
        frame = self.repo.read_frame(digest)
        if frame is None:
            raise E.IntegrityError(
                f"cannot read {self.what} at offset {offset}: chunk {digest.hex()} is "
                "missing from the repository (run 'ganeti-vol repo check')",
                disk=self.index, offset=offset)
        return Chunk(i, offset, length, False, digest, frame)

    def finish(self, summary: DecodeSummary) -> None:
        check_decoded(summary, self.entry, self.what, self.index, "the manifest")


class Snapshot(ListedSource[SnapshotDisk]):
    """A published snapshot, opened read-only (a source for ``import``)."""

    format = "repository"
    no_disk = "snapshot {path} has no disk {index}"

    def __init__(self, repo: Repository, snap_id: str) -> None:
        self.repo, self.id = repo, snap_id
        self.path = f"{repo.path}::{snap_id}"
        self.manifest = load_manifest(repo, snap_id)
        cpath = repo.local_file(F.SNAPSHOTS, snap_id, F.SNAPSHOT_CONFIG)
        try:
            with open(cpath, "rb") as f:
                text = f.read()
        except OSError as err:
            raise E.IntegrityError(f"cannot open snapshot {self.path}: config.ini: "
                                   f"{err.strerror or err}") from err
        if hashlib.sha256(text).hexdigest() != self.manifest.get("config_sha256"):
            raise E.IntegrityError(f"cannot open snapshot {self.path}: config.ini does not "
                                   "match its checksum in the manifest (damaged)")
        self.instance = G.parse_config(text.decode("utf-8"), cpath).instance
        try:
            self.disks = [SnapshotDisk(self, e) for e in self.manifest["disks"]]
        except (KeyError, TypeError, ValueError) as err:
            raise E.IntegrityError(f"cannot open snapshot {self.path}: invalid disk entry "
                                   f"({err!r})") from err

    def close(self) -> None:
        self.repo.close()


def open_snapshot(spec: str, repo: Any = None) -> Snapshot:
    """Open ``PATH::SNAPSHOT`` for reading; ``repo``: the repository PATH names, already
    opened (any backend of :func:`ganeti_vol.remote.open_repository`).  The snapshot
    closes it."""
    path, snap = split_spec(spec)
    repo = Repository.open(path) if repo is None else repo
    try:
        return Snapshot(repo, resolve(repo, snap))
    except BaseException:
        repo.close()
        raise


def remove_snapshot(repo: Repository, snap_id: str, tmpdir: str) -> None:
    """Remove a snapshot's metadata (never chunks: ``repo gc`` frees what nothing names).

    The snapshot disappears at once and whole (:meth:`Repository.remove_snapshot`).
    """
    repo.remove_snapshot(snap_id, tmpdir)
