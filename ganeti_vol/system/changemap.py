"""Change maps for reflink snapshots: which chunks of a disk file did not change since its
last backup, told by the filesystem instead of by reading and hashing them.

After a raw export of a file disk into a repository with the ``reflink``
snapshot provider, the snapshot (a FICLONE clone) is kept next to the disk as
the disk's **base** for that repository, ``.<disk>.gvbase-<key>``, and a map
beside it, ``.<disk>.gvbase-<key>.map``, records each chunk's digest.  The next
export takes a new clone and asks FIEMAP for the physical extents of both
files.  A chunk whose every byte maps to the same physical block in both
files (or is a hole in both) holds the same data as in the base: the blocks
are shared, and a shared block is never written in place (a write to the disk
allocates new blocks: copy on write), nor freed or reused while the base
still refers to it.  Such a chunk is not read at all; its digest comes from
the map.  This is the change map that ``zfs send -i`` and ``btrfs send -p``
use, for one file.

It is used only when it is safe and it is never the only check:

* the base must be the file the map describes (inode, size, mtime and ctime
  recorded after it was made read-only; a write, chmod or link changes the
  ctime), of the disk's size, with the chunk size and hash of this export;
* an extent whose physical address does not say what the data is (delayed
  allocation, inline, encoded or encrypted data, an unknown location) makes
  its chunks "changed";
* the repository is asked once, in batches, whether it has every digest the
  map would reuse (which also touches them, so a concurrent gc keeps them);
  a digest it lacks is read and stored as usual.

Anything else falls back to reading the whole disk, with the reason logged.
The base holds the blocks the disk overwrote since the last export: it costs
as much space as the disk changed (doc/snapshots.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ganeti_vol.core import atomicfile

log = logging.getLogger(__name__)

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
_LAST = 0x1
#: flags under which an extent's physical address does not identify its data
_UNTRUSTED = (0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400)  # unknown, delalloc, encoded,
#                                     encrypted, not aligned, inline, tail
_UNWRITTEN = 0x800
_HEAD = struct.Struct("=QQLLLL")
_EXTENT = struct.Struct("=QQQQQLLLL")
_BATCH = 512
MAP_VERSION = 1

#: an extent: logical start, end, physical start (-1: not to be trusted), unwritten
Extent = tuple[int, int, int, bool]


def fiemap(fd: int, size: int) -> list[Extent]:
    """The file's extents up to ``size`` (FIEMAP, after a sync), holes left out."""
    out: list[Extent] = []
    start = 0
    while start < size:
        buf = bytearray(_HEAD.size + _BATCH * _EXTENT.size)
        _HEAD.pack_into(buf, 0, start, size - start, FIEMAP_FLAG_SYNC, 0, _BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        mapped = _HEAD.unpack_from(buf, 0)[3]
        if not mapped:
            break
        last = False
        for i in range(mapped):
            logical, physical, length, _, _, flags, _, _, _ = _EXTENT.unpack_from(
                buf, _HEAD.size + i * _EXTENT.size)
            trusted = not flags & _UNTRUSTED
            out.append((logical, logical + length, physical if trusted else -1,
                        bool(flags & _UNWRITTEN)))
            start = logical + length
            last = bool(flags & _LAST)
        if last:
            break
    return out


def _pieces(extents: Sequence[Extent], size: int) -> Iterator[tuple[int, int, int, bool]]:
    """[start, end) pieces covering [0, size): (start, end, physical at start or -2 for a
    hole, unwritten)."""
    pos = 0
    for lstart, lend, phys, unwritten in extents:
        start, end = max(lstart, pos), min(lend, size)
        if start >= end:
            continue
        if start > pos:
            yield pos, start, -2, False
        yield start, end, phys if phys < 0 else phys + (start - lstart), unwritten
        pos = end
    if pos < size:
        yield pos, size, -2, False


def changed_chunks(base: Sequence[Extent], new: Sequence[Extent], size: int,
                   chunk_size: int) -> set[int]:
    """Indexes of the chunks in which ``new`` maps some byte differently from ``base``."""
    a, b = list(_pieces(base, size)), list(_pieces(new, size))
    changed: set[int] = set()
    i = j = 0
    pos = 0
    while pos < size:
        sa, ea, pa, ua = a[i]
        sb, eb, pb, ub = b[j]
        end = min(ea, eb)
        # the physical address of pos in each file (a hole stays -2, untrusted -1)
        xa = pa + (pos - sa) if pa >= 0 else pa
        xb = pb + (pos - sb) if pb >= 0 else pb
        if xa != xb or xa == -1 or ua != ub:
            changed.update(range(pos // chunk_size, (end - 1) // chunk_size + 1))
        pos = end
        if ea == end:
            i += 1
        if eb == end:
            j += 1
    return changed


# --- the base and its map -----------------------------------------------------------------


def base_path(disk_path: str, key: str) -> str:
    head, tail = os.path.split(disk_path)
    return os.path.join(head, f".{tail}.gvbase-{key}")


def base_key(repository: str, instance_uuid: str, disk_index: int) -> str:
    """One base per disk and repository."""
    text = f"{repository}\n{instance_uuid}\n{disk_index}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _identity(st: os.stat_result) -> dict[str, int]:
    return {"inode": st.st_ino, "device": st.st_dev, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


@dataclass
class Plan:
    """What an export may skip: chunk index -> digest of its unchanged data."""

    unchanged: dict[int, bytes] = field(default_factory=dict)
    reason: str = ""


@dataclass
class Base:
    """One disk's base for one repository (see the module doc)."""

    disk_path: str
    key: str
    chunk_size: int
    hash_algo: str
    #: this export's chunk digests, in order (filled by the Recorder that planned() gives)
    digests: list[bytes] = field(default_factory=list)

    @property
    def path(self) -> str:
        return base_path(self.disk_path, self.key)

    @property
    def map_path(self) -> str:
        return self.path + ".map"

    def plan(self, snapshot_fd: int, size: int, zero_digest: bytes,
             present: Callable[[list[bytes]], set[bytes]]) -> Plan:
        """The unchanged chunks of the new snapshot (an empty plan, with why, if none)."""
        try:
            with open(self.map_path, encoding="utf-8") as f:
                record = json.load(f)
        except FileNotFoundError:
            return Plan(reason="no base yet")
        except (OSError, ValueError) as err:
            return Plan(reason=f"unreadable map '{self.map_path}': {err}")
        try:
            st = os.stat(self.path)
        except OSError as err:
            return Plan(reason=f"base '{self.path}': {err.strerror}")
        expected = {"version": MAP_VERSION, "chunk_size": self.chunk_size,
                    "hash": self.hash_algo, "identity": _identity(st)}
        for key, value in expected.items():
            if record.get(key) != value:
                return Plan(reason=f"base '{self.path}' does not match its map ({key})")
        if st.st_size != size:
            return Plan(reason=f"the disk's size changed ({st.st_size} -> {size})")
        digests = [bytes.fromhex(d) for d in record.get("digests", [])]
        if len(digests) != -(-size // self.chunk_size):
            return Plan(reason=f"map '{self.map_path}' has {len(digests)} chunks")
        try:
            with open(self.path, "rb") as base:
                changed = changed_chunks(fiemap(base.fileno(), size),
                                         fiemap(snapshot_fd, size), size, self.chunk_size)
        except OSError as err:
            if err.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                return Plan(reason="the filesystem has no FIEMAP")
            return Plan(reason=f"FIEMAP of '{self.path}': {err.strerror}")
        candidates = {i: d for i, d in enumerate(digests)
                      if i not in changed and d != zero_digest}
        have = present(sorted(set(candidates.values())))
        unchanged = {i: d for i, d in candidates.items() if d in have}
        log.info("change map of '%s': %d of %d chunks changed, %d unchanged chunks reused",
                 self.disk_path, len(changed), len(digests), len(unchanged))
        return Plan(unchanged)

    def stage(self, snapshot_path: str) -> str | None:
        """Link the snapshot (still held) as the next base, not yet in place; None if that
        failed (logged: the export itself succeeded)."""
        new = self.path + ".new"
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(new)
            os.link(snapshot_path, new)
            os.chmod(new, 0o400)
        except OSError as err:
            self._give_up(f"cannot keep the snapshot '{snapshot_path}' as the base "
                          f"'{self.path}': {err.strerror}")
            return None
        return new

    def commit(self, staged: str) -> None:
        """Put the staged base in place and write its map (after the snapshot's release,
        which changes the inode's ctime); a failure is logged, as for :meth:`stage`."""
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.map_path)  # an old map never describes the new base
            os.rename(staged, self.path)
            st = os.stat(self.path)
            record: dict[str, Any] = {
                "version": MAP_VERSION, "disk": self.disk_path, "chunk_size": self.chunk_size,
                "hash": self.hash_algo, "identity": _identity(st),
                "digests": [d.hex() for d in self.digests]}
            atomicfile.replace(self.map_path, json.dumps(record).encode(), 0o600)
        except OSError as err:
            self._give_up(f"cannot keep the base '{self.path}': {err.strerror}")

    def _give_up(self, why: str) -> None:
        log.warning("%s; the next export reads the whole disk", why)
        self.drop()

    def drop(self) -> None:
        for path in (self.map_path, self.path, self.path + ".new"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class Recorder:
    """A chunk sink that passes everything on and remembers each chunk's digest in order."""

    def __init__(self, sink: Any, digests: list[bytes]) -> None:
        self._sink = sink
        self.digests = digests

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sink, name)

    def write_chunk(self, chunk: Any) -> None:
        self._sink.write_chunk(chunk)
        self.digests.append(chunk.hash)


def for_export(enabled: bool, disk_path: str, instance_uuid: str, index: int, snapshot: Any,
               sink: Any) -> Base | None:
    """The base to plan a raw export with and to keep afterwards, or None: only a reflink
    snapshot into a sink that can ask its store which chunks it has (a repository)."""
    if not enabled or snapshot.provider != "reflink" or not hasattr(sink, "present"):
        return None
    repo = sink.repo
    return Base(disk_path, base_key(repo.path, instance_uuid, index), repo.chunk_size,
                repo.hash_algo)


@contextlib.contextmanager
def planned(base: Base | None, snapshot_fd: int, sink: Any,
            zero_digest: bytes) -> Iterator[tuple[Any, dict[int, bytes] | None]]:
    """(the sink to encode into, the unchanged chunks or None) for one export."""
    if base is None:
        yield sink, None
        return
    plan = base.plan(snapshot_fd, os.fstat(snapshot_fd).st_size, zero_digest, sink.present)
    if plan.reason:
        log.info("no change map for '%s': %s", base.disk_path, plan.reason)
    yield Recorder(sink, base.digests), plan.unchanged
