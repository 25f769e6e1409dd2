"""``repo gc``: free the chunks no snapshot names; safe while exports run.

Mark and sweep, with chunk mtimes as the marks (Proxmox Backup Server's
atime GC, made exact by a writer registry instead of a 24-hour grace):

1. ``t0`` = now on the repository's filesystem clock; read the live writers
   (``locks/writer.*``, each locked by a running export) and their start
   times; the **cutoff** is ``min(t0, oldest live writer's start) - grace``.
2. Mark: for every snapshot, touch (``utime``) every chunk its indexes name.
3. Sweep: a chunk whose mtime is older than the cutoff is renamed into
   ``trash/``, its mtime read again there, and only then deleted; if it was
   touched in between it is put back.

Why nothing a snapshot names is ever deleted:

* a snapshot published before the mark listing is marked (its chunks' mtime
  becomes >= t0);
* a writer alive at ``t0`` started at or after the cutoff, and touches every
  chunk it reuses (and writes new ones) after its start, so their mtime is
  >= cutoff; a writer registered after ``t0`` touches after ``t0``;
* a writer that touches a chunk while the sweep moves it: the touch either
  lands before the rename (the re-read in ``trash/`` sees it, the chunk goes
  back) or after it (the touch fails, the writer stores the chunk again);
* a GC killed between rename and delete leaves the chunk in ``trash/``:
  readers look there too, and the next gc or check puts it back first.

A snapshot whose indexes cannot be read stops the GC (it cannot know what
that snapshot names): check and remove it first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any

from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import check_cancel, io_error
from ganeti_vol.repo import format as F
from ganeti_vol.repo.snapshot import Snapshot
from ganeti_vol.repo.store import Repository

log = logging.getLogger(__name__)

#: seconds subtracted from the cutoff: covers filesystems whose clients stamp
#: times with their own (skewed) clock; same-host and NFS stamps need none
GRACE = 300.0


def indexes_of(repo: Repository, snap_id: str) -> list[F.Index]:
    """A snapshot's disk indexes, from its manifest or else by their own checksums; an
    ArchiveError if they cannot be read (what the snapshot names is then unknown)."""
    try:
        indexes = [d.open_index() for d in Snapshot(repo, snap_id).disks]
    except E.GanetiVolError as err:  # fall back to the indexes' own checksums
        sdir = repo.snapshot_dir(snap_id)
        try:
            names = sorted(n for n in os.listdir(sdir) if n.endswith(".idx"))
            indexes = [F.Index(os.path.join(sdir, n), repo.hash_algo, f"'{sdir}/{n}'")
                       for n in names]
            if not names:
                raise err
        except (E.GanetiVolError, OSError) as err2:
            raise E.ArchiveError(
                f"cannot collect garbage in {repo.what}: snapshot {snap_id} is unreadable, so "
                f"what it names is unknown ({err2}); check it and remove it first") from err2
        log.warning("snapshot %s: %s; marking the chunks its indexes name", snap_id, err)
    return indexes


def _mark(repo: Repository, snap_id: str, cancel: threading.Event | None) -> int:
    """Touch every chunk a snapshot names; the number of references."""
    refs = 0
    for idx in indexes_of(repo, snap_id):
        for _, zero, _, digest in idx.entries():
            if not zero:
                check_cancel(cancel, f"cannot collect garbage in {repo.what}")
                repo.touch(digest)
                refs += 1
    return refs


def gc(repo: Repository, *, grace: float = GRACE, dry_run: bool = False,
       cancel: threading.Event | None = None) -> dict[str, Any]:
    """Mark and sweep (see the module doc); the figures, with ``bytes_freed``."""
    collect = getattr(repo, "collect_garbage", None)  # remote: its own protocol
    if collect is not None:
        return collect(grace=grace, dry_run=dry_run, cancel=cancel)  # type: ignore[no-any-return]
    with repo.shared(), repo.gc_lock():
        restored = repo.restore_trash()
        t0 = repo.fs_now()
        starts = repo.live_writers()
        cutoff = min([t0, *starts]) - grace
        refs = 0
        snaps = repo.snapshot_ids()
        for snap_id in snaps:
            refs += _mark(repo, snap_id, cancel)
        freed = freed_bytes = kept = 0
        trash = repo.join(F.TRASH)
        for digest, path in repo.iter_chunks():
            check_cancel(cancel, f"cannot collect garbage in {repo.what}")
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if st.st_mtime >= cutoff:
                kept += 1
                continue
            if dry_run:
                freed += 1
                freed_bytes += st.st_size
                continue
            held = os.path.join(trash, digest.hex())
            try:
                os.rename(path, held)
                st = os.stat(held)
            except FileNotFoundError:
                continue
            except OSError as err:
                raise io_error("collect", f"chunk '{path}'", err) from err
            if st.st_mtime >= cutoff:  # touched by a writer while we moved it: keep it
                os.rename(held, path)
                kept += 1
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(held)
            freed += 1
            freed_bytes += st.st_size
    log.info("gc of %s: %d chunk(s), %d bytes freed", repo.what, freed, freed_bytes)
    return {"repository": repo.path, "dry_run": dry_run, "snapshots": len(snaps),
            "references_marked": refs, "live_writers": len(starts), "grace": grace,
            "chunks_kept": kept, "chunks_freed": freed, "bytes_freed": freed_bytes,
            "restored_from_trash": restored}
