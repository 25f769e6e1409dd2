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
import stat
import threading
import time
from collections import deque
from concurrent import futures
from typing import Any

from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import check_cancel
from ganeti_vol.core.holes import read_data, settle, zero_bytes
from ganeti_vol.core.model import Instance
from ganeti_vol.engine import codec, hashing
from ganeti_vol.engine.parallel import mark_broken
from ganeti_vol.engine.targets import RawTarget
from ganeti_vol.ops import opstate
from ganeti_vol.repo.snapshot import Snapshot, SnapshotDisk

_SAME = object()
#: the granule inside a differing chunk: only granules that differ are written
GRANULE = 64 << 10


def _compare_and_fetch(disk: SnapshotDisk, rfd: int, sparse: bool, zero: bool, digest: bytes,
                       offset: int, length: int) -> Any:
    """_SAME, or (the chunk's bytes, the granule runs to write: [(start, end, all zero)]).

    The target is read (holes of a sparse file are not: they read as zeros)
    and hashed; only if it differs is the chunk read from the repository,
    decoded and verified, and then compared granule by granule.
    """
    algo = disk.repo.hash_algo
    old = read_data(rfd, offset, length, sparse=sparse)  # holes are not read
    if old is None:  # a hole
        if zero:
            return _SAME
    elif len(old) == length and (old == zero_bytes(length) if zero else
                                 hashing.chunk_hash(algo, old) == digest):
        return _SAME
    if zero:
        new: bytes = zero_bytes(length)
    else:
        where = f"{disk.what} at offset {offset}"
        frame = disk.repo.read_frame(digest)
        if frame is None:
            raise E.IntegrityError(f"cannot read {where}: chunk {digest.hex()} is missing from "
                                   "the repository (run 'ganeti-vol repo check')",
                                   disk=disk.index, offset=offset)
        new = codec.decode(frame, length, where)
        if hashing.chunk_hash(algo, new) != digest:
            raise E.IntegrityError(f"cannot read {where}: chunk hash mismatch (corrupt data)",
                                   disk=disk.index, offset=offset)
    runs: list[tuple[int, int, bool]] = []  # (start, end, all zero)
    for a in range(0, length, GRANULE):
        b = min(a + GRANULE, length)
        piece = new[a:b]
        if old is None:
            before: bytes | bytearray | None = zero_bytes(b - a)
        else:
            before = old[a:b] if len(old) >= b else None
        if piece == before:
            continue
        is_zero = piece == zero_bytes(b - a)
        if runs and runs[-1][1] == a and runs[-1][2] == is_zero:
            runs[-1] = (runs[-1][0], b, is_zero)
        else:
            runs.append((a, b, is_zero))
    return new, runs


def _one_disk(disk: SnapshotDisk, path: str, pool: futures.ThreadPoolExecutor, workers: int,
              progress: Any, cancel: threading.Event | None) -> dict[str, Any]:
    idx = disk.open_index()
    cs, size = idx.chunk_size, idx.size
    algo = disk.repo.hash_algo
    target = RawTarget(path)
    what = disk.what
    rfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    # a file whose delayed writes cannot be flushed is read whole, holes too
    sparse = stat.S_ISREG(os.fstat(rfd).st_mode) and settle(rfd, what)
    started = time.monotonic()
    required = max(size, disk.disk_size or 0)
    counts = {"chunks": 0, "same_chunks": 0, "written_chunks": 0, "written_bytes": 0}
    written: list[tuple[int, int, bytes]] = []
    digest = hashing.DiskDigest(algo, cs)
    pending: deque[tuple[int, int, bytes, futures.Future[Any]]] = deque()
    try:
        target.begin(required, cs, what, cancel, getattr(progress, "touch", None))

        def emit(limit: int) -> None:
            while len(pending) > limit:
                offset, length, d, fut = pending.popleft()
                result = fut.result()
                counts["chunks"] += 1
                if result is _SAME:
                    counts["same_chunks"] += 1
                else:
                    data, runs = result
                    for a, b, is_zero in runs:
                        if is_zero:
                            target.write_zero(offset + a, b - a)
                        else:
                            target.write(offset + a, memoryview(data)[a:b])
                        counts["written_bytes"] += b - a
                    written.append((offset, length, d))
                    counts["written_chunks"] += 1
                if progress is not None:
                    progress.advance(length)

        for i, zero, _flen, d in idx.entries():
            check_cancel(cancel, f"cannot import {what}")
            offset = i * cs
            length = min(cs, size - offset)
            digest.update(d)
            pending.append((offset, length, d, pool.submit(
                _compare_and_fetch, disk, rfd, sparse, zero, d, offset, length)))
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
        for _, _, _, fut in pending:
            fut.cancel()
        futures.wait([f for _, _, _, f in pending])
        target.abort()
        said = mark_broken(err, target, what)
        if said is err:
            raise
        raise said from err
    finally:
        os.close(rfd)
    return {"index": disk.index, "target": path, "size": size, **counts,
            "seconds": round(time.monotonic() - started, 3), "state": "good"}


def import_into_existing(snap: Snapshot, instance: Instance, *, state_dir: str, workers: int = 0,
                         progress: Any = None, cancel: threading.Event | None = None
                         ) -> dict[str, Any]:
    """Bring each existing disk of ``instance`` to the state of ``snap`` (see the module doc).

    Like every import it locks the instance and its disks and marks the instance
    "import in progress" in ``state_dir`` until it completes (a failed or killed
    one leaves it broken until a rerun completes).
    """
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
    codec.tune_malloc()  # chunk-sized buffers are reused, not mapped and zeroed each time
    started = time.monotonic()
    disks = []
    with opstate.operation(state_dir, "import", instance, source=snap.path) as op, \
            snap.repo.shared(), futures.ThreadPoolExecutor(
                workers, thread_name_prefix="ganeti-vol-restore") as pool:
        op.begin_writes()
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
