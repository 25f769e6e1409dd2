"""A repository directory: its config, the chunk store, snapshot directories and locks.

Locks (all ``flock``, so a killed process never leaves one behind):

* ``locks/repository``: every operation holds it shared; ``repo upgrade``
  takes it exclusively (and refuses to start while anything runs);
* ``locks/gc``: one garbage collection at a time;
* ``locks/writer.<host>.<pid>.<random>``: one per running writer (export,
  repair, origin import), locked exclusively for its lifetime.  GC reads the
  oldest live writer's start (the file's mtime) and frees no chunk touched
  since then, and removes the files and ``tmp/<token>/`` of dead writers.

Every writer touches (``utime``) each chunk it reuses, and writes new ones
through a temporary file, fsync and rename; see :mod:`ganeti_vol.repo.gc`
for why that makes GC safe while writers run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import secrets
import shutil
import socket
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ganeti_vol import __version__
from ganeti_vol.core import atomicfile
from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import fadvise, io_error, pwrite_all
from ganeti_vol.engine import codec, hashing
from ganeti_vol.repo import format as F

log = logging.getLogger(__name__)

MIN_CHUNK = codec.MIN_CHUNK_SIZE  # the archive format's range, which the engine checks
MAX_CHUNK = codec.MAX_CHUNK


def iso_time(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def write_atomic(path: str, data: bytes, tmpdir: str, what: str) -> None:
    """Create or replace ``path`` with ``data`` through a temporary file in ``tmpdir``
    (:func:`ganeti_vol.core.atomicfile.replace`); a failure names ``what``."""
    try:
        atomicfile.replace(path, data, 0o640, tmp_dir=tmpdir)
    except OSError as err:
        raise io_error("write", what, err) from err


def new_config(path: str, hash_algo: str | None, chunk_size: int) -> dict[str, Any]:
    """The config of a new repository at ``path`` (any backend), its arguments checked: the
    chunk digest is :func:`~ganeti_vol.repo.format.default_digest` unless ``hash_algo``."""
    hash_algo = hash_algo or F.default_digest()
    if hash_algo not in F.DIGESTS:
        raise E.UsageError(f"cannot create repository '{path}': chunk digest '{hash_algo}' "
                           f"is not one of {', '.join(F.DIGESTS)} (cryptographic only)")
    hashing.chunk_hash(hash_algo, b"")  # a ConfigError if its package is missing
    if chunk_size & (chunk_size - 1) or not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise E.UsageError(f"cannot create repository '{path}': chunk size {chunk_size} is "
                           f"not a power of two from {MIN_CHUNK} to {MAX_CHUNK}")
    return {
        "format": F.REPO_FORMAT,
        "format_version": F.FORMAT_VERSION,
        "mandatory_features": list(F.WRITTEN_FEATURES),
        "optional_features": [],
        "id": str(uuidlib.uuid4()),
        "created": iso_time(time.time()),
        "created_by": f"ganeti-vol {__version__}",
        "chunk_hash": hash_algo,
        "chunk_size": chunk_size,
        "compression": codec.COMPRESSION,
    }


@dataclass
class Writer:
    """A registered writer: its token, its private temp dir and its start (filesystem time)."""

    token: str
    tmpdir: str
    started: float
    fd: int


class Repository:
    """An opened repository (``Repository.open`` / ``Repository.init``)."""

    #: chunks an export stores at once (each: temp file, fsync, rename)
    store_threads = 2

    def __init__(self, path: str, config: dict[str, Any]) -> None:
        self.path = os.path.abspath(path)
        self.config = config
        self.version = int(config["format_version"])
        self.hash_algo = str(config["chunk_hash"])
        self.chunk_size = int(config["chunk_size"])
        self.hlen = hashing.digest_size(self.hash_algo)
        self.what = f"repository '{self.path}'"
        self._direct = True
        self._local = threading.local()

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def init(cls, path: str, *, hash_algo: str | None = None,
             chunk_size: int = 4 << 20) -> Repository:
        """Create a new, empty repository at ``path`` (a new or empty directory); the chunk
        digest is :func:`~ganeti_vol.repo.format.default_digest` unless ``hash_algo``."""
        config = new_config(path, hash_algo, chunk_size)
        path = os.path.abspath(path)
        try:
            os.makedirs(path, mode=0o750, exist_ok=True)
            if os.listdir(path):
                raise E.UsageError(f"cannot create repository '{path}': the directory is not "
                                   "empty")
            for d in F.DIRS:
                os.mkdir(os.path.join(path, d), 0o750)
            for d in F.chunk_dirs(F.FORMAT_VERSION):
                os.mkdir(os.path.join(path, d), 0o750)
            open(os.path.join(path, F.LOCKS, "repository"), "ab").close()
            for d in F.DIRS:
                atomicfile.fsync_dir(os.path.join(path, d))
        except OSError as err:
            raise io_error("create repository in", f"'{path}'", err) from err
        write_atomic(os.path.join(path, F.CONFIG), F.seal(config), os.path.join(path, F.TMP),
                     f"'{path}/{F.CONFIG}'")
        log.info("created repository '%s' (%s, %d-byte chunks)", path, config["chunk_hash"],
                 chunk_size)
        return cls(path, config)

    @classmethod
    def open(cls, path: str, *, write: bool = False, upgrading: bool = False) -> Repository:
        """Open a repository; ``write``: the caller will add data (needs the current layout).

        A repository whose upgrade was interrupted is refused (``upgrading``:
        except by ``repo upgrade`` itself, which finishes it).
        """
        path = os.path.abspath(path)
        what = f"repository '{path}'"
        try:
            with open(os.path.join(path, F.CONFIG), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise E.ArchiveError(f"cannot open {what}: not a repository (no {F.CONFIG}; "
                                 "create one with 'ganeti-vol repo init')") from None
        except OSError as err:
            raise E.ArchiveError(f"cannot open {what}: {err.strerror or err}") from err
        config = F.unseal(data, f"{what}: {F.CONFIG}")
        version = F.check_header(config, what, F.REPO_FORMAT)
        if (config.get("chunk_hash") not in F.DIGESTS
                or config.get("compression") != codec.COMPRESSION):
            raise E.ArchiveFormatError(
                f"cannot open {what}: unsupported chunk digest '{config.get('chunk_hash')}' or "
                f"compression '{config.get('compression')}'")
        if config.get("upgrade") and not upgrading:
            raise E.ArchiveFormatError(
                f"cannot open {what}: an upgrade to format version {version} was interrupted; "
                f"run 'ganeti-vol repo upgrade {path}' to finish it")
        if write and version != F.FORMAT_VERSION:
            raise E.ArchiveFormatError(
                f"cannot write to {what}: its format version {version} is older than "
                f"{F.FORMAT_VERSION}; run 'ganeti-vol repo upgrade {path}' first")
        return cls(path, config)

    # -- paths ---------------------------------------------------------------------------

    def join(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def chunk_path(self, digest: bytes) -> str:
        return self.join(F.chunk_relpath(digest.hex(), self.version))

    def chunk_dir(self, digest: bytes) -> str:
        return os.path.dirname(self.chunk_path(digest))

    def snapshot_dir(self, snap_id: str) -> str:
        return self.join(F.SNAPSHOTS, snap_id)

    # -- chunks --------------------------------------------------------------------------

    def touch(self, digest: bytes) -> int | None:
        """Mark a chunk as in use now (GC keeps it); its size, or None if it is not there."""
        path = self.chunk_path(digest)
        try:
            os.utime(path)
            return os.stat(path).st_size
        except FileNotFoundError:
            return None
        except OSError as err:
            raise io_error("touch", f"chunk '{path}'", err) from err

    def haves(self, digests: Sequence[bytes]) -> list[int | None]:
        """Per digest: its stored size (touched), or None (the backend seam's batched call)."""
        return [self.touch(d) for d in digests]

    def chunk_size_on_disk(self, digest: bytes) -> int | None:
        try:
            return os.stat(self.chunk_path(digest)).st_size
        except FileNotFoundError:
            return None

    def read_frame(self, digest: bytes) -> bytes | None:
        """The stored frame of a chunk, or None if it is missing.

        A chunk that an interrupted GC left in ``trash/`` is found there too
        (the next GC or writer puts it back).
        """
        for path in (self.chunk_path(digest), self.join(F.TRASH, digest.hex())):
            try:
                with open(path, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                continue
            except OSError as err:
                raise E.IntegrityError(f"cannot read chunk '{path}': {err.strerror or err}",
                                       ) from err
        return None

    def prefetch(self, digest: bytes) -> None:
        """Ask the kernel to read a chunk file in the background (reads come soon)."""
        try:
            fd = os.open(self.chunk_path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # missing: the read reports it
        try:
            fadvise(fd, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def store(self, digest: bytes, frame: bytes | bytearray | memoryview, tmpdir: str) -> bool:
        """Store a chunk unless it is there (then touch it); True if this call wrote it.

        Temp file in ``tmpdir``, fsync, rename: a reader never sees a partial
        chunk.  The directory entry is made durable by :meth:`sync_dirs`.
        """
        path = self.chunk_path(digest)
        if self.touch(digest) is not None:
            return False
        tmp = os.path.join(tmpdir, f"{digest.hex()}.{secrets.token_hex(4)}")
        what = f"chunk '{path}'"
        try:
            self._write_new(tmp, frame, what)
            try:
                os.rename(tmp, path)
            except FileNotFoundError:  # the chunk directory (layout v2) does not exist yet
                os.makedirs(os.path.dirname(path), 0o750, exist_ok=True)
                os.rename(tmp, path)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise io_error("write", what, err) from err
        return True

    def _write_new(self, tmp: str, frame: bytes | bytearray | memoryview, what: str) -> None:
        """Create ``tmp`` holding ``frame``, fsynced.

        Through O_DIRECT where the filesystem allows it: chunks are written
        once and read rarely, and filling the page cache with them costs more
        CPU than compressing them on this machine kind (fresh pages are
        slow).  The frame is padded to whole 4 KiB blocks in an aligned
        buffer, written, and the file cut back to its length before the fsync.
        """
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        n = len(frame)
        if self._direct:
            try:
                fd = os.open(tmp, flags | os.O_DIRECT, 0o640)
            except OSError:  # e.g. tmpfs: buffered from now on
                self._direct = False
            else:
                try:
                    buf = self._aligned(n)
                    buf[:n] = frame
                    pwrite_all(fd, memoryview(buf)[:-(-n // 4096) * 4096], 0, what)
                    os.ftruncate(fd, n)
                    os.fsync(fd)
                    return
                finally:
                    os.close(fd)
        fd = os.open(tmp, flags, 0o640)
        try:
            pwrite_all(fd, frame, 0, what)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _aligned(self, n: int) -> mmap.mmap:
        """This thread's page-aligned buffer of at least ``n`` bytes (kept for reuse)."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < n:
            buf = self._local.buf = mmap.mmap(-1, -(-max(n, self.chunk_size + 65536) // 4096)
                                              * 4096)
        return buf

    def sync_dirs(self, dirs: set[str]) -> None:
        """fsync the chunk directories that received new chunks (before any index names them)."""
        for d in sorted(dirs):
            try:
                atomicfile.fsync_dir(d)
            except OSError as err:
                raise io_error("flush", f"'{d}'", err) from err

    def quarantine(self, digest: bytes) -> str | None:
        """Move a damaged chunk to ``quarantine/<hex>.<n>.bad`` (never deleted); its new path."""
        src = self.chunk_path(digest)
        qdir = self.join(F.QUARANTINE)
        for n in range(1000):
            dst = os.path.join(qdir, f"{digest.hex()}.{n}.bad")
            if os.path.exists(dst):
                continue
            try:
                os.rename(src, dst)
            except FileNotFoundError:
                return None
            except OSError as err:
                raise io_error("quarantine", f"chunk '{src}'", err) from err
            atomicfile.fsync_dir(qdir)
            log.warning("quarantined damaged chunk %s as '%s'", digest.hex(), dst)
            return dst
        raise E.ArchiveError(f"cannot quarantine chunk '{src}': too many quarantined copies")

    def iter_chunks(self) -> Iterator[tuple[bytes, str]]:
        """Every stored chunk: (digest, path), in directory order."""
        root = self.join(F.CHUNKS)
        stack = [root]
        while stack:
            d = stack.pop()
            try:
                with os.scandir(d) as it:
                    for e in it:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        elif F.is_digest_name(e.name, self.hlen):
                            yield bytes.fromhex(e.name), e.path
            except FileNotFoundError:
                continue

    # -- snapshots -----------------------------------------------------------------------

    def local_file(self, *parts: str) -> str:
        """The path of the repository file ``parts`` (a remote backend fetches it first)."""
        return self.join(*parts)

    def publish_snapshot(self, staging: str, snap_id: str) -> None:
        """Rename the complete directory ``staging`` into ``snapshots/`` (fsynced both
        sides): the snapshot appears whole or not at all."""
        final = self.snapshot_dir(snap_id)
        try:
            atomicfile.fsync_dir(staging)
            atomicfile.replace_dir(staging, final)
        except OSError as err:
            raise io_error("publish", f"snapshot {snap_id} in {self.what}", err) from err

    def close(self) -> None:
        """Nothing to release (the backend seam's call: a remote one closes its link)."""

    def remove_snapshot(self, snap_id: str, tmpdir: str) -> None:
        """Remove a snapshot's metadata: renamed into ``tmpdir`` first (it disappears at
        once and whole), then deleted."""
        src = self.snapshot_dir(snap_id)
        dst = os.path.join(tmpdir, f"removed-{snap_id}")
        try:
            os.rename(src, dst)
            atomicfile.fsync_dir(os.path.dirname(src))
        except FileNotFoundError:
            raise E.ArchiveError(f"cannot remove snapshot {snap_id} of {self.what}: no such "
                                 "snapshot") from None
        except OSError as err:
            raise io_error("remove", f"snapshot {snap_id} of {self.what}", err) from err
        shutil.rmtree(dst, ignore_errors=True)

    def snapshot_ids(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.join(F.SNAPSHOTS)) if not n.startswith("."))
        except OSError as err:
            raise E.ArchiveError(f"cannot list snapshots of {self.what}: "
                                 f"{err.strerror or err}") from err

    # -- locks ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def shared(self) -> Iterator[Repository]:
        """Hold the repository lock shared (anything but upgrade)."""
        fd = self._flock("repository", fcntl.LOCK_SH,
                         "it is being upgraded ('repo upgrade' is running)")
        try:
            yield self
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def exclusive(self, why: str) -> Iterator[Repository]:
        fd = self._flock("repository", fcntl.LOCK_EX,
                         f"another operation is using it (wait for it to finish before {why})")
        try:
            yield self
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def gc_lock(self) -> Iterator[None]:
        fd = self._flock("gc", fcntl.LOCK_EX, "another 'repo gc' is running")
        try:
            yield
        finally:
            os.close(fd)

    def _flock(self, name: str, mode: int, busy: str) -> int:
        path = self.join(F.LOCKS, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except PermissionError:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise io_error("lock", self.what, err) from err
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise E.BusyError(f"cannot use {self.what}: {busy}") from None
        return fd

    @contextlib.contextmanager
    def writer(self) -> Iterator[Writer]:
        """Register as a writer for the duration of the block (see the module doc)."""
        locks = self.join(F.LOCKS)
        token = f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"
        tmp = os.path.join(locks, f".new-{token}")
        final = os.path.join(locks, f"writer.{token}")
        tmpdir = self.join(F.TMP, token)
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        except OSError as err:
            raise io_error("register a writer in", self.what, err) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode())
            started = os.fstat(fd).st_mtime
            os.rename(tmp, final)  # visible to GC only once locked
            os.mkdir(tmpdir, 0o750)
        except OSError as err:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise io_error("register a writer in", self.what, err) from err
        try:
            yield Writer(token, tmpdir, started, fd)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.unlink(final)
            os.close(fd)

    def live_writers(self) -> list[float]:
        """Start times (filesystem clock) of the live writers; dead ones are cleaned up."""
        starts = []
        locks = self.join(F.LOCKS)
        for name in sorted(os.listdir(locks)):
            if not name.startswith("writer."):
                continue
            path = os.path.join(locks, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    starts.append(os.fstat(fd).st_mtime)
                    continue
                log.info("removing the leftovers of dead writer %s", name[7:])
                shutil.rmtree(self.join(F.TMP, name[7:]), ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            finally:
                os.close(fd)
        return starts

    def fs_now(self) -> float:
        """The current time as the repository's filesystem stamps it (mtime of a new file)."""
        path = self.join(F.TMP, f".now-{secrets.token_hex(4)}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)
            os.unlink(path)

    def restore_trash(self) -> int:
        """Put back chunks an interrupted GC left in ``trash/`` (see gc); how many."""
        trash = self.join(F.TRASH)
        count = 0
        try:
            names = os.listdir(trash)
        except FileNotFoundError:
            return 0
        for name in names:
            if not F.is_digest_name(name, self.hlen):
                continue
            dst = self.chunk_path(bytes.fromhex(name))
            try:
                if os.path.exists(dst):
                    os.unlink(os.path.join(trash, name))
                else:
                    os.makedirs(os.path.dirname(dst), 0o750, exist_ok=True)
                    os.rename(os.path.join(trash, name), dst)
                    count += 1
            except FileNotFoundError:
                continue
            except OSError as err:
                if err.errno != errno.ENOENT:
                    raise io_error("restore", f"'{trash}/{name}'", err) from err
        if count:
            log.info("restored %d chunk(s) an interrupted gc left in '%s'", count, trash)
        return count

    def info(self) -> dict[str, Any]:
        c = self.config
        return {"path": self.path, "id": c.get("id"), "format_version": self.version,
                "chunk_hash": self.hash_algo, "chunk_size": self.chunk_size,
                "compression": c.get("compression"), "created": c.get("created"),
                "mandatory_features": c.get("mandatory_features")}
