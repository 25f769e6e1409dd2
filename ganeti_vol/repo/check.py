"""``repo check``: structure (and with ``read_data`` content) of every snapshot, a health
per snapshot, quarantine of damaged chunks, and repair from a named source.

Health, as VDSM names a volume's state:

``ok``
    every chunk a snapshot names is there with the recorded size (and, with
    ``--read-data``, decodes to bytes with its digest), and its metadata
    checks out;
``degraded``
    a chunk is damaged or missing, but a good copy can be had: from the
    ``--repair-from`` source (another repository, or the live disks of an
    instance), or from ``trash/`` where an interrupted GC left it.  With a
    source, the copy is verified against the digest and stored, and the
    snapshot is ok again;
``broken``
    data is lost (no good copy) or the snapshot's own metadata is damaged.

Each problem names the disk, the first bad offset and the reason.  A
damaged chunk is moved to ``quarantine/`` (never deleted); the next export
that has that chunk stores it again, which repairs every snapshot naming it.

Memory stays flat: chunk files are verified one pass over the store (each
once, however many snapshots share it), indexes are streamed, and only the
damaged digests are remembered.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from concurrent import futures
from typing import Any

from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import check_cancel
from ganeti_vol.core.model import Instance
from ganeti_vol.engine import codec, hashing
from ganeti_vol.repo import format as F
from ganeti_vol.repo.snapshot import Snapshot
from ganeti_vol.repo.store import Repository

log = logging.getLogger(__name__)


def verify_frame(frame: bytes, digest: bytes, algo: str, length: int | None = None) -> str | None:
    """Why a stored frame is not the chunk ``digest`` (None: it is)."""
    size = codec.frame_content_size(frame)
    if size is None or (length is not None and size != length):
        return "unreadable frame header"
    try:
        data = codec.decode(frame, size, "chunk")
    except E.CompressionError as err:
        return str(err).split(": ", 1)[-1]
    if hashing.chunk_hash(algo, data) != digest:
        return "digest mismatch"
    return None


class Source:
    """Where good copies of damaged chunks can be had (``--repair-from``)."""

    what = "nothing"

    def find(self, digest: bytes, locations: list[tuple[int, int, int]]) -> bytes | None:
        """The chunk's uncompressed bytes, verified, or None."""
        return None

    def close(self) -> None:
        pass


class RepoSource(Source):
    """Another repository with the same chunk digest."""

    def __init__(self, repo: Repository, other: Repository) -> None:
        if other.hash_algo != repo.hash_algo:
            raise E.UsageError(f"cannot repair from {other.what}: its chunk digest is "
                               f"{other.hash_algo}, not {repo.hash_algo}")
        self.other, self.algo, self.what = other, repo.hash_algo, other.what

    def find(self, digest: bytes, locations: list[tuple[int, int, int]]) -> bytes | None:
        frame = self.other.read_frame(digest)
        if frame is None or verify_frame(frame, digest, self.algo) is not None:
            return None
        size = codec.frame_content_size(frame)
        assert size is not None
        return codec.decode(frame, size, "chunk")


class InstanceSource(Source):
    """The live disks of an instance: read at the offsets where the chunk was exported."""

    def __init__(self, repo: Repository, instance: Instance) -> None:
        self.algo, self.instance = repo.hash_algo, instance
        self.what = f"the disks of instance '{instance.name}'"
        self.fds: dict[int, int] = {}

    def _fd(self, index: int) -> int | None:
        if index not in self.fds:
            path = self.instance.disks[index].path if index < len(self.instance.disks) else None
            if not path:
                return None
            try:
                self.fds[index] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as err:
                raise E.DeviceError(f"cannot read disk {index} of instance "
                                    f"'{self.instance.name}': {err.strerror or err}") from err
        return self.fds[index]

    def find(self, digest: bytes, locations: list[tuple[int, int, int]]) -> bytes | None:
        for disk, offset, length in locations:
            fd = self._fd(disk)
            if fd is None:
                continue
            data = os.pread(fd, length, offset)
            if len(data) == length and hashing.chunk_hash(self.algo, data) == digest:
                return data
        return None

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _read_data(repo: Repository, workers: int, cancel: threading.Event | None
               ) -> tuple[int, int, dict[bytes, str]]:
    """Re-hash every stored chunk once; quarantine the damaged ones.  (count, bytes, bad)."""
    bad: dict[bytes, str] = {}
    count = nbytes = 0

    def one(digest: bytes, path: str) -> tuple[bytes, int, str | None]:
        frame = repo.read_frame(digest)
        if frame is None:  # removed meanwhile (gc): nothing to check
            return digest, 0, None
        return digest, codec.frame_content_size(frame) or 0, verify_frame(
            frame, digest, repo.hash_algo)

    with futures.ThreadPoolExecutor(workers, thread_name_prefix="ganeti-vol-check") as pool:
        pending: deque[futures.Future[Any]] = deque()

        def drain(limit: int) -> None:
            nonlocal count, nbytes
            while len(pending) > limit:
                digest, size, problem = pending.popleft().result()
                count += 1
                nbytes += size
                if problem is not None:
                    bad[digest] = problem
                    repo.quarantine(digest)

        for digest, path in repo.iter_chunks():
            check_cancel(cancel, f"cannot check {repo.what}")
            pending.append(pool.submit(one, digest, path))
            drain(4 * workers)
        drain(0)
    return count, nbytes, bad


def _check_snapshot(repo: Repository, snap_id: str, bad: dict[bytes, str],
                    problems: dict[bytes, list[tuple[int, int, int]]]) -> dict[str, Any]:
    """Structure of one snapshot; adds each missing chunk's locations to ``problems``."""
    result: dict[str, Any] = {"id": snap_id, "instance": None, "health": "ok", "reason": None,
                              "first_bad": None, "missing": set()}
    try:
        snap = Snapshot(repo, snap_id)
        result["instance"] = snap.instance.name
        for disk in snap.disks:
            idx = disk.open_index()
            digest_check = hashing.DiskDigest(repo.hash_algo, idx.chunk_size)
            for i, zero, flen, digest in idx.entries():
                offset = i * idx.chunk_size
                length = min(idx.chunk_size, idx.size - offset)
                digest_check.update(digest)
                if zero:
                    if digest != hashing.zero_hash(repo.hash_algo, length):
                        raise E.IntegrityError(f"disk {disk.index} at offset {offset}: a zero "
                                               "chunk with a wrong digest in the index")
                    continue
                reason = bad.get(digest)
                if reason is None:
                    size = repo.chunk_size_on_disk(digest)
                    if size is None:
                        reason = "missing"
                    elif size != flen:
                        reason = f"{size} bytes, the index says {flen}"
                        bad[digest] = reason
                        repo.quarantine(digest)
                if reason is not None:
                    problems.setdefault(digest, []).append((disk.index, offset, length))
                    result["missing"].add(digest)
                    if result["first_bad"] is None:
                        result["first_bad"] = {"disk": disk.index, "offset": offset,
                                               "chunk": digest.hex(), "reason": reason}
            if digest_check.finish(idx.size) != disk.entry.get("digest"):
                raise E.IntegrityError(f"disk {disk.index}: the index does not give the "
                                       "whole-disk digest of the manifest")
    except E.GanetiVolError as err:
        result.update(health="broken", reason=f"metadata: {err}", missing=set())
        return result
    if result["missing"]:
        first = result["first_bad"]
        result["health"] = "broken"
        result["reason"] = (f"{len(result['missing'])} chunk(s) damaged or missing; first at "
                            f"disk {first['disk']} offset {first['offset']} ({first['reason']})")
    return result


def check(repo: Repository, *, read_data: bool = False, source: Source | None = None,
          workers: int = 0, cancel: threading.Event | None = None) -> dict[str, Any]:
    """Check every snapshot; repair what ``source`` can supply.  See the module doc."""
    workers = workers or (os.cpu_count() or 1)
    source = source or Source()
    report: dict[str, Any] = {"repository": repo.path, "read_data": read_data,
                              "repair_from": source.what if source.what != "nothing" else None}
    with repo.shared():
        try:  # chunks an interrupted gc left in trash/ go back (never while a gc runs)
            with repo.gc_lock():
                report["restored_from_trash"] = repo.restore_trash()
        except E.BusyError:
            report["restored_from_trash"] = 0
        bad: dict[bytes, str] = {}
        if read_data:
            count, nbytes, bad = _read_data(repo, workers, cancel)
            report.update(chunks_checked=count, bytes_checked=nbytes)
        problems: dict[bytes, list[tuple[int, int, int]]] = {}
        snaps = []
        for snap_id in repo.snapshot_ids():
            check_cancel(cancel, f"cannot check {repo.what}")
            snaps.append(_check_snapshot(repo, snap_id, bad, problems))
        report["quarantined"] = [{"chunk": d.hex(), "reason": r} for d, r in sorted(bad.items())]
        found = _recover(repo, source, problems) if problems else {}
    report["repaired_chunks"] = sum(1 for ok in found.values() if ok)
    for s in snaps:
        missing = s.pop("missing")
        s["after_repair"] = s["health"]
        if missing and all(found.get(d) for d in missing):
            s["health"] = "degraded"
            s["after_repair"] = "ok"
            s["reason"] += f"; a good copy of each came from {source.what}"
        s["repaired"] = sum(1 for d in missing if found.get(d))
    report["snapshots"] = snaps
    report["ok"] = all(s["after_repair"] == "ok" for s in snaps)
    return report


def _recover(repo: Repository, source: Source,
             problems: dict[bytes, list[tuple[int, int, int]]]) -> dict[bytes, bool]:
    """Store a verified good copy of each damaged chunk that ``source`` has."""
    found: dict[bytes, bool] = {}
    if type(source) is Source:  # no --repair-from
        return found
    with repo.writer() as w:
        dirs: set[str] = set()
        try:
            for digest, locations in problems.items():
                data = source.find(digest, locations)
                if data is None or hashing.chunk_hash(repo.hash_algo, data) != digest:
                    found[digest] = False
                    continue
                repo.store(digest, codec.encode(data), w.tmpdir)
                dirs.add(repo.chunk_dir(digest))
                found[digest] = True
                log.info("repaired chunk %s from %s", digest.hex(), source.what)
        finally:
            source.close()
        repo.sync_dirs(dirs)
    return found


def open_source(repo: Repository, spec: str, instance: Instance | None) -> Source:
    """``--repair-from``: a repository directory, or an instance (already loaded)."""
    if os.path.isfile(os.path.join(spec, F.CONFIG)):
        return RepoSource(repo, Repository.open(spec))
    if instance is not None:
        return InstanceSource(repo, instance)
    raise E.UsageError(f"cannot repair from '{spec}': not a repository or an instance file")
