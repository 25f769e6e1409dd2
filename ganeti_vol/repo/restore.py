"""``import INSTANCE PATH::SNAPSHOT --into-existing``: write only the chunks that differ.

Each disk's target must exist and hold an older state of the disk (last
night's, or a half-finished import).  Workers read the target chunk by
chunk and hash it; a chunk whose digest equals the snapshot's is left alone
(nothing is read from the repository for it); any other is read from the
repository, decoded, verified against its digest and only then written.
After an fsync the written chunks are read back (page cache dropped) and
checked.  Rolling back to last night costs about the size of the change, and
an interrupted import resumes by running it again: only what is still wrong
is written.

The targets are written directly (raw), like ``import --raw``: an OS import
script gets a whole stream and could not skip anything.  No hooks run.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections import deque
from concurrent import futures
from typing import Any

from ganeti_vol import codec, hashing, streams
from ganeti_vol import errors as E
from ganeti_vol.model import Instance
from ganeti_vol.repo.snapshot import Snapshot, SnapshotDisk

_SAME, _ZERO = object(), object()


def _compare_and_fetch(disk: SnapshotDisk, target: streams.RawTarget, i: int, zero: bool,
                       digest: bytes, offset: int, length: int) -> Any:
    """_SAME, _ZERO (write zeros) or the verified bytes to write."""
    algo = disk.repo.hash_algo
    buf = bytearray(length)
    n = target.read_into(offset, memoryview(buf))
    if n == length:
        same = (buf == codec.zero_bytes(length)) if zero else (
            hashing.chunk_hash(algo, buf) == digest)
        if same:
            return _SAME
    if zero:
        return _ZERO
    where = f"{disk.what} at offset {offset}"
    frame = disk.repo.read_frame(digest)
    if frame is None:
        raise E.IntegrityError(f"cannot read {where}: chunk {digest.hex()} is missing from the "
                               "repository (run 'ganeti-vol repo check')", disk=disk.index,
                               offset=offset)
    data = codec.decode(frame, length, where)
    if hashing.chunk_hash(algo, data) != digest:
        raise E.IntegrityError(f"cannot read {where}: chunk hash mismatch (corrupt data)",
                               disk=disk.index, offset=offset)
    return data


def _one_disk(disk: SnapshotDisk, path: str, pool: futures.ThreadPoolExecutor, workers: int,
              progress: Any, cancel: threading.Event | None) -> dict[str, Any]:
    idx = disk.open_index()
    cs, size = idx.chunk_size, idx.size
    algo = disk.repo.hash_algo
    target = streams.RawTarget(path)
    what = disk.what
    started = time.monotonic()
    required = max(size, disk.disk_size or 0)
    counts = {"chunks": 0, "same_chunks": 0, "written_chunks": 0, "written_bytes": 0}
    written: list[tuple[int, int, bytes]] = []
    digest = hashing.DiskDigest(algo, cs)
    target.begin(required, cs, what, cancel, getattr(progress, "touch", None))
    try:
        pending: deque[tuple[int, int, bytes, futures.Future[Any]]] = deque()

        def emit(limit: int) -> None:
            while len(pending) > limit:
                offset, length, d, fut = pending.popleft()
                result = fut.result()
                counts["chunks"] += 1
                if result is _SAME:
                    counts["same_chunks"] += 1
                else:
                    if result is _ZERO:
                        target.write_zero(offset, length)
                    else:
                        target.write(offset, result)
                    written.append((offset, length, d))
                    counts["written_chunks"] += 1
                    counts["written_bytes"] += length
                if progress is not None:
                    progress.advance(length)

        for i, zero, _flen, d in idx.entries():
            streams.check_cancel(cancel, f"cannot import {what}")
            offset = i * cs
            length = min(cs, size - offset)
            digest.update(d)
            pending.append((offset, length, d, pool.submit(
                _compare_and_fetch, disk, target, i, zero, d, offset, length)))
            emit(2 * workers + 2)
        emit(0)
        if digest.finish(size) != disk.entry.get("digest"):
            raise E.IntegrityError(f"cannot read {what}: the index does not give the whole-disk "
                                   "digest of the manifest", disk=disk.index)
        target.finish()
        buf = mmap.mmap(-1, cs)  # page-aligned: the read-back may use O_DIRECT
        try:
            for offset, length, d in written:
                mv = memoryview(buf)[:length]
                n = target.read_into(offset, mv)
                ok = n == length and hashing.chunk_hash(algo, mv) == d
                mv.release()
                if not ok:
                    raise E.IntegrityError(f"cannot verify {what}: read-back at offset {offset} "
                                           "does not match what was written", offset=offset)
        finally:
            buf.close()
        target.close()
    except BaseException as err:
        target.abort()
        note = target.broken_note()
        if note and isinstance(err, E.GanetiVolError):
            raise type(err)(f"{err}; {note}", **err.fields) from err
        raise
    return {"index": disk.index, "target": path, "size": size, **counts,
            "seconds": round(time.monotonic() - started, 3), "state": "good"}


def import_into_existing(snap: Snapshot, instance: Instance, *, workers: int = 0,
                         progress: Any = None, cancel: threading.Event | None = None
                         ) -> dict[str, Any]:
    """Bring each existing disk of ``instance`` to the state of ``snap`` (see the module doc)."""
    if len(snap.disks) > len(instance.disks):
        raise E.UsageError(f"cannot import: the snapshot has {len(snap.disks)} disks, instance "
                           f"'{instance.name}' has {len(instance.disks)}")
    for d in snap.disks:
        path = instance.disks[d.index].path
        if not path or not os.path.exists(path):
            raise E.UsageError(f"cannot import disk {d.index} of instance '{instance.name}' "
                               f"--into-existing: '{path}' does not exist (import without "
                               "--into-existing to create it)")
    workers = workers or (os.cpu_count() or 1)
    started = time.monotonic()
    disks = []
    with snap.repo.shared(), futures.ThreadPoolExecutor(
            workers, thread_name_prefix="ganeti-vol-restore") as pool:
        for d in snap.disks:
            dp = progress.disk(d.index, d.size) if progress is not None else None
            disks.append(_one_disk(d, instance.disks[d.index].path or "", pool, workers, dp,
                                   cancel))
            if dp is not None:
                dp.finish()
    elapsed = time.monotonic() - started
    size = sum(d["size"] for d in disks)
    return {"operation": "import", "mode": "into-existing", "instance": instance.name,
            "source": snap.path, "disks": disks, "size": size,
            "written_bytes": sum(d["written_bytes"] for d in disks),
            "seconds": round(elapsed, 3),
            "mb_per_s": round(size / elapsed / 1e6, 1) if elapsed > 0 else None, "status": "ok"}
