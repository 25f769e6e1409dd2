"""Repositories in S3-compatible object storage: ``--repo s3://BUCKET/PREFIX``.

The objects under ``PREFIX/`` are the repository format of
``doc/repository-format.md``, key for path (``config.json``,
``chunks/<xx>/<digest>``, ``snapshots/<id>/{disk<i>.idx,config.ini,manifest.json}``).
:class:`S3Repository` is a :class:`~ganeti_vol.repo.store.Repository` whose chunk store and
snapshot list are in the bucket; snapshot metadata is fetched into a private temporary
directory on first use (snapshots are immutable), and a snapshot being written is staged
there and uploaded at commit: indexes and ``config.ini`` first, ``manifest.json`` last, so a
snapshot is listed only once everything it names is stored.

Object storage has no ``flock`` and no ``utime``, so concurrency uses **leases** (objects
under ``locks/``, refreshed while their holder runs, stale after :data:`LEASE_TTL` seconds of
the server's clock) and one mutual exclusion, between a writer and the *sweep* of ``repo gc``:

* a writer (export, prune, remove, repair) puts ``locks/writer.<token>`` and then lists
  ``locks/sweep.*``; while a live sweep marker exists it waits;
* ``repo gc`` marks (reads every index) alongside running writers, then puts
  ``locks/sweep.<token>`` and lists ``locks/writer.*``; if a live writer exists it takes its
  marker back and waits for the writers to finish, then tries again.

Writers put their lease before they look, and gc puts its marker before it looks, so on a
store with read-after-write consistency (S3 since 2020, SeaweedFS, MinIO, Ceph RGW) at least
one of them sees the other: no chunk is deleted while a writer that may have reused it runs.
A writer whose lease lapsed (stalled longer than the TTL) checks before it publishes that
every chunk its indexes name is still stored.  One gc at a time: ``locks/gc`` is created with
``If-None-Match: *`` and read back (where a server ignores the condition two gc may run,
which is harmless: each sweep excludes the writers by itself).
The protocol is specified in ``doc/remote.md``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from typing import Any

from ganeti_vol.core import atomicfile
from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import check_cancel
from ganeti_vol.remote import s3client
from ganeti_vol.repo import format as F
from ganeti_vol.repo.store import Repository, Writer, new_config

log = logging.getLogger(__name__)

SCHEME = "s3://"
#: seconds of the server's clock after which an unrefreshed lease is stale (node config
#: ``[s3] lease_ttl``)
LEASE_TTL = 600.0
#: seconds between lease refreshes (at most a quarter of the TTL)
LEASE_REFRESH = 60.0
#: seconds a writer waits for a running gc sweep (which only deletes) before giving up
SWEEP_WAIT = 600.0
#: chunk reads in flight during an import (bounds memory: x chunk size)
READ_AHEAD = 8
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes at the ends)."""
    if not url.startswith(SCHEME):
        raise E.UsageError(f"'{url}' is not an S3 repository (s3://BUCKET[/PREFIX])")
    bucket, _, prefix = url[len(SCHEME):].partition("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise E.UsageError(f"invalid bucket name '{bucket}' in '{url}': 3 to 63 lower-case "
                           "letters, digits, '.' and '-' (DNS-valid)")
    prefix = prefix.strip("/")
    if any(p in ("", ".", "..") for p in prefix.split("/")) and prefix:
        raise E.UsageError(f"invalid prefix '{prefix}' in '{url}'")
    return bucket, prefix


def node_settings() -> dict[str, Any]:
    """The node config's ``[s3]`` section (endpoint, region, profile, keys)."""
    from ganeti_vol.ganeti import config as cfgmod

    return dict(cfgmod.load_node_config(missing_ok=True).s3)


def client_for(node: dict[str, Any]) -> s3client.S3Client:
    return s3client.S3Client(s3client.load_settings(node),
                             retries=int(node.get("retries", s3client.RETRIES)))


class _Lease:
    """An object refreshed by a thread while held; deleted on release."""

    def __init__(self, repo: S3Repository, key: str, body: dict[str, Any]) -> None:
        self.repo, self.key, self.body = repo, key, body
        self.started = 0.0
        self.max_gap = 0.0
        self._last = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def put(self, *, create: bool = False) -> bool:
        body = json.dumps({**self.body, "refreshed": time.time()}).encode()
        stored, server_time = self.repo.client.put(self.repo.bucket, self.repo.key(self.key),
                                                   body, if_none_match=create)
        if stored:
            now = time.monotonic()
            if self._last:
                self.max_gap = max(self.max_gap, now - self._last)
            self._last = now
            self.started = self.started or server_time
        return stored

    def lapsed(self) -> bool:
        """True if the lease may have gone stale at some point (a refresh came too late)."""
        gap = max(self.max_gap, time.monotonic() - self._last)
        return gap > self.repo.lease_ttl * 0.8

    def start_refresh(self) -> None:
        def run() -> None:
            while not self._stop.wait(self.repo.lease_refresh):
                try:
                    self.put()
                except E.GanetiVolError as err:
                    log.warning("cannot refresh lease %s: %s", self.key, err)

        self._thread = threading.Thread(target=run, name="ganeti-vol-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(E.GanetiVolError):
            self.repo.client.delete(self.repo.bucket, self.repo.key(self.key))


class S3Repository(Repository):
    """A repository under ``s3://bucket/prefix`` (see the module doc)."""

    remote = True
    #: chunks in flight to the store during an export: covers the request latency; at most
    #: this many frames of memory (plus the engine's)
    store_threads = 8

    def __init__(self, url: str, client: s3client.S3Client, config: dict[str, Any],
                 node: dict[str, Any] | None = None) -> None:
        self.bucket, self.prefix = parse_url(url)
        self.client = client
        self.cache = atomicfile.private_temp_dir("ganeti-vol-s3")
        for d in (F.SNAPSHOTS, F.TMP, F.LOCKS, F.ORIGINS, F.QUARANTINE):
            os.mkdir(os.path.join(self.cache, d), 0o700)
        super().__init__(self.cache, config)
        self.path = f"{SCHEME}{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.what = f"repository '{self.path}'"
        self.lease_ttl = float((node or {}).get("lease_ttl") or LEASE_TTL)
        self.lease_refresh = min(LEASE_REFRESH, self.lease_ttl / 4)
        self.sweep_wait = SWEEP_WAIT
        self._sizes: dict[bytes, int] = {}
        self._sizes_lock = threading.Lock()
        self._reads: dict[bytes, list[Any]] = {}
        self._read_pool: futures.ThreadPoolExecutor | None = None
        self._lease: _Lease | None = None

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        pool = getattr(self, "_read_pool", None)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            self._read_pool = None
        shutil.rmtree(getattr(self, "cache", ""), ignore_errors=True)
        with contextlib.suppress(AttributeError):
            self.client.close()

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def chunk_key(self, digest: bytes) -> str:
        return self.key(F.chunk_relpath(digest.hex(), self.version))

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str, *, write: bool = False, upgrading: bool = False) -> S3Repository:
        if upgrading:
            raise E.UsageError(f"cannot upgrade '{path}': S3 repositories are created in the "
                               "current format and need no upgrade")
        bucket, prefix = parse_url(path)
        node = node_settings()
        client = client_for(node)
        key = f"{prefix}/{F.CONFIG}" if prefix else F.CONFIG
        what = f"repository '{path}'"
        data = client.get(bucket, key)
        if data is None:
            if not client.bucket_exists(bucket):
                raise E.ArchiveError(f"cannot open {what}: no such bucket '{bucket}' at "
                                     f"{client.settings.endpoint}")
            raise E.ArchiveError(f"cannot open {what}: not a repository (no {F.CONFIG}; "
                                 "create one with 'ganeti-vol repo init')")
        config = F.unseal(data, f"{what}: {F.CONFIG}")
        version = F.check_header(config, what, F.REPO_FORMAT)
        if version != F.FORMAT_VERSION or config.get("chunk_hash") not in F.DIGESTS:
            raise E.ArchiveFormatError(f"cannot open {what}: format version {version} or "
                                       f"digest '{config.get('chunk_hash')}' is not supported")
        return cls(path, client, config, node)

    @classmethod
    def init(cls, path: str, *, hash_algo: str | None = None,
             chunk_size: int = 4 << 20) -> S3Repository:
        """Create a repository under an empty prefix (and the bucket if it is missing)."""
        bucket, prefix = parse_url(path)
        config = new_config(path, hash_algo, chunk_size)
        node = node_settings()
        client = client_for(node)
        if not client.bucket_exists(bucket):
            client.create_bucket(bucket)
        if next(iter(client.list(bucket, f"{prefix}/" if prefix else "")), None) is not None:
            raise E.UsageError(f"cannot create repository '{path}': the prefix is not empty")
        key = f"{prefix}/{F.CONFIG}" if prefix else F.CONFIG
        stored, _ = client.put(bucket, key, F.seal(config), if_none_match=True)
        if not stored:
            raise E.UsageError(f"cannot create repository '{path}': it exists already")
        log.info("created repository '%s' (%s, %d-byte chunks)", path, config["chunk_hash"],
                 chunk_size)
        return cls(path, client, config, node)

    # -- chunks --------------------------------------------------------------------------

    def touch(self, digest: bytes) -> int | None:
        """The stored size of a chunk (None if absent).  Nothing to touch: gc's sweep does
        not run while this writer's lease is live (module doc)."""
        with self._sizes_lock:
            size = self._sizes.get(digest)
        if size is not None:
            return size
        head = self.client.head(self.bucket, self.chunk_key(digest))
        if head is None:
            return None
        with self._sizes_lock:
            self._sizes[digest] = head[0]
        return head[0]

    chunk_size_on_disk = touch

    def haves(self, digests: Sequence[bytes]) -> list[int | None]:
        """Per digest its stored size, or None: HEADs in parallel."""
        return list(self._pool().map(self.touch, digests))

    def _pool(self) -> futures.ThreadPoolExecutor:
        if self._read_pool is None:
            self._read_pool = futures.ThreadPoolExecutor(4, thread_name_prefix="ganeti-vol-s3")
        return self._read_pool

    def store(self, digest: bytes, frame: bytes | bytearray | memoryview, tmpdir: str) -> bool:
        if self.touch(digest) is not None:
            return False
        self.client.put(self.bucket, self.chunk_key(digest), frame)
        with self._sizes_lock:
            self._sizes[digest] = len(frame)
        return True

    def chunk_dir(self, digest: bytes) -> str:
        return ""

    def sync_dirs(self, dirs: set[str]) -> None:
        pass  # a PUT is durable when it returns

    def prefetch(self, digest: bytes) -> None:
        """Start reading a chunk (bounded by the reader's look-ahead)."""
        slot = self._reads.get(digest)
        if slot is not None:
            slot[1] += 1
            return
        self._reads[digest] = [self._pool().submit(self._get, digest), 1]

    def _get(self, digest: bytes) -> bytes | None:
        return self.client.get(self.bucket, self.chunk_key(digest))

    def read_frame(self, digest: bytes) -> bytes | None:
        slot = self._reads.get(digest)
        if slot is None:
            return self._get(digest)
        slot[1] -= 1
        if slot[1] <= 0:
            del self._reads[digest]
        frame: bytes | None = slot[0].result()
        return frame

    def quarantine(self, digest: bytes) -> str | None:
        """Copy a damaged chunk to ``quarantine/<hex>.<n>.bad``, then delete it."""
        frame = self._get(digest)
        if frame is None:
            return None
        for n in range(1000):
            key = self.key(f"{F.QUARANTINE}/{digest.hex()}.{n}.bad")
            stored, _ = self.client.put(self.bucket, key, frame, if_none_match=True)
            if stored:
                self.client.delete(self.bucket, self.chunk_key(digest))
                with self._sizes_lock:
                    self._sizes.pop(digest, None)
                log.warning("quarantined damaged chunk %s as s3://%s/%s", digest.hex(),
                            self.bucket, key)
                return f"s3://{self.bucket}/{key}"
        raise E.ArchiveError(f"cannot quarantine chunk {digest.hex()}: too many copies")

    def iter_chunks(self) -> Iterator[tuple[bytes, str]]:
        for digest, key, _, _ in self._list_chunks():
            yield digest, key

    def _list_chunks(self) -> Iterator[tuple[bytes, str, int, float]]:
        for key, size, mtime in self.client.list(self.bucket, self.key(F.CHUNKS) + "/"):
            name = key.rpartition("/")[2]
            if F.is_digest_name(name, self.hlen):
                yield bytes.fromhex(name), key, size, mtime

    # -- snapshots -----------------------------------------------------------------------

    def snapshot_ids(self) -> list[str]:
        """Snapshots whose manifest is stored (it is uploaded last)."""
        root = self.key(F.SNAPSHOTS) + "/"
        ids = []
        for key, _, _ in self.client.list(self.bucket, root):
            snap_id, _, name = key[len(root):].partition("/")
            if name == F.MANIFEST and not snap_id.startswith("."):
                ids.append(snap_id)
        return sorted(ids)

    def snapshot_dir(self, snap_id: str) -> str:
        """The snapshot's files, fetched into the cache on first use."""
        local = os.path.join(self.cache, F.SNAPSHOTS, snap_id)
        if os.path.isdir(local) or "/" in snap_id or snap_id.startswith("."):
            return local
        root = self.key(f"{F.SNAPSHOTS}/{snap_id}") + "/"
        keys = [k for k, _, _ in self.client.list(self.bucket, root)]
        if self.key(f"{F.SNAPSHOTS}/{snap_id}/{F.MANIFEST}") not in keys:
            return local  # no such snapshot (or not published): readers say so
        part = local + f".part-{secrets.token_hex(3)}"
        os.mkdir(part, 0o700)
        for k in keys:
            name = k[len(root):]
            if "/" in name or name.startswith("."):
                continue
            data = self.client.get(self.bucket, k)
            if data is not None:
                with open(os.path.join(part, name), "wb") as f:
                    f.write(data)
        os.rename(part, local)
        return local

    def local_file(self, *parts: str) -> str:
        """A snapshot's file, fetched with the rest of its snapshot on first use; an origin
        record, fetched (a missing file gives a path that does not exist)."""
        if len(parts) == 3 and parts[0] == F.SNAPSHOTS:
            return os.path.join(self.snapshot_dir(parts[1]), parts[2])
        local = os.path.join(self.cache, *parts)
        if ".." in parts or not os.path.exists(local):
            data = self.client.get(self.bucket, self.key("/".join(parts)))
            if data is not None and ".." not in parts:
                os.makedirs(os.path.dirname(local), 0o700, exist_ok=True)
                with open(local, "wb") as f:
                    f.write(data)
        return local

    def publish_snapshot(self, staging: str, snap_id: str) -> None:
        """Upload a staged snapshot: every file, ``manifest.json`` last (module doc)."""
        self._before_publish(staging)
        names = sorted(n for n in os.listdir(staging) if n != F.MANIFEST)
        for name in [*names, F.MANIFEST]:
            with open(os.path.join(staging, name), "rb") as f:
                data = f.read()
            key = self.key(f"{F.SNAPSHOTS}/{snap_id}/{name}")
            stored, _ = self.client.put(self.bucket, key, data, if_none_match=True)
            if not stored:
                raise E.ArchiveError(f"cannot publish snapshot {snap_id} in {self.what}: "
                                     f"s3://{self.bucket}/{key} exists already")
        os.rename(staging, os.path.join(self.cache, F.SNAPSHOTS, snap_id))

    def _before_publish(self, staging: str) -> None:
        """Refresh the lease, wait out a sweep, and if the lease lapsed meanwhile, check
        that every chunk the staged indexes name is still stored."""
        lease = self._lease
        if lease is None:
            return
        lease.put()
        self._wait_no_sweep()
        if not lease.lapsed():
            return
        log.warning("the writer lease of %s lapsed; checking every chunk is still stored",
                    self.what)
        with self._sizes_lock:
            self._sizes.clear()
        for name in sorted(os.listdir(staging)):
            if not name.endswith(".idx"):
                continue
            idx = F.Index(os.path.join(staging, name), self.hash_algo, name)
            for i, zero, _, digest in idx.entries():
                if not zero and self.touch(digest) is None:
                    raise E.ArchiveError(
                        f"cannot publish the snapshot in {self.what}: chunk {digest.hex()} "
                        f"(chunk {i} of {name}) was deleted by a 'repo gc' while this "
                        "writer's lease had lapsed; run the export again")

    def remove_snapshot(self, snap_id: str, tmpdir: str) -> None:
        """The manifest first (the snapshot is unlisted at once), then its other files."""
        root = self.key(f"{F.SNAPSHOTS}/{snap_id}") + "/"
        manifest = root + F.MANIFEST
        keys = [k for k, _, _ in self.client.list(self.bucket, root)]
        if manifest not in keys:
            raise E.ArchiveError(f"cannot remove snapshot {snap_id} of {self.what}: no such "
                                 "snapshot")
        self.client.delete(self.bucket, manifest)
        self.client.delete_many(self.bucket, [k for k in keys if k != manifest])
        shutil.rmtree(os.path.join(self.cache, F.SNAPSHOTS, snap_id), ignore_errors=True)

    # -- leases --------------------------------------------------------------------------

    @contextlib.contextmanager
    def shared(self) -> Iterator[Repository]:
        yield self  # nothing to exclude: S3 repositories are never upgraded in place

    @contextlib.contextmanager
    def exclusive(self, why: str) -> Iterator[Repository]:
        raise E.UsageError(f"cannot use {self.what} for {why}: not supported on S3")
        yield self  # pragma: no cover

    def _leases(self, kind: str) -> list[tuple[str, float, bool]]:
        """(key, last refresh, live) of every ``locks/<kind>.*`` object."""
        now = self.server_time()
        return [(k, t, now - t < self.lease_ttl)
                for k, _, t in self.client.list(self.bucket, self.key(f"{F.LOCKS}/{kind}."))]

    def server_time(self) -> float:
        _, h, _ = self.client.request("HEAD", self.bucket, self.key(F.CONFIG),
                                      ok=(200, 404))
        return s3client.http_time(h.get("date"))

    def _wait_no_sweep(self) -> None:
        deadline = time.monotonic() + self.sweep_wait
        while any(live for _, _, live in self._leases("sweep")):
            if time.monotonic() > deadline:
                raise E.BusyError(f"cannot write to {self.what}: a 'repo gc' is deleting "
                                  f"chunks and has not finished within {self.sweep_wait:.0f} s")
            time.sleep(0.5)

    @contextlib.contextmanager
    def writer(self) -> Iterator[Writer]:
        """A writer lease for the block (module doc); a private local temp dir."""
        if self._lease is not None:
            raise E.ProgrammerError(f"{self.what}: a writer is already registered")
        token = f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"
        tmpdir = os.path.join(self.cache, F.TMP, token)
        os.mkdir(tmpdir, 0o700)
        lease = _Lease(self, f"{F.LOCKS}/writer.{token}",
                       {"host": socket.gethostname(), "pid": os.getpid(),
                        "started": time.time()})
        try:
            lease.put()
            self._lease = lease
            lease.start_refresh()
            self._wait_no_sweep()
            with self._sizes_lock:  # what was seen before: a sweep may have deleted it since
                self._sizes.clear()
            yield Writer(token, tmpdir, lease.started, -1)
        finally:
            self._lease = None
            lease.release()
            shutil.rmtree(tmpdir, ignore_errors=True)

    def live_writers(self) -> list[float]:
        return [t for _, t, live in self._leases("writer") if live]

    def fs_now(self) -> float:
        return self.server_time()

    def restore_trash(self) -> int:
        return 0  # gc deletes in one step; there is no trash/

    @contextlib.contextmanager
    def gc_lock(self) -> Iterator[None]:
        """``locks/gc``: created only if absent; a stale one (its holder died) is replaced."""
        lease = _Lease(self, f"{F.LOCKS}/gc", {"host": socket.gethostname(),
                                                 "pid": os.getpid(), "token":
                                                 secrets.token_hex(8)})
        key = self.key(lease.key)
        if not lease.put(create=True):
            head = self.client.head(self.bucket, key)
            if head is not None and self.server_time() - head[1] < self.lease_ttl:
                raise E.BusyError(f"cannot use {self.what}: another 'repo gc' is running")
            self.client.delete(self.bucket, key)
            if not lease.put(create=True):
                raise E.BusyError(f"cannot use {self.what}: another 'repo gc' is running")
        data = self.client.get(self.bucket, key)  # a server that ignored If-None-Match
        if data is None or json.loads(data).get("token") != lease.body["token"]:
            raise E.BusyError(f"cannot use {self.what}: another 'repo gc' is running")
        lease.start_refresh()
        try:
            yield
        finally:
            lease.release()

    def collect_garbage(self, *, grace: float, dry_run: bool,
                        cancel: threading.Event | None = None) -> dict[str, Any]:
        """``repo gc`` on S3: mark alongside writers, sweep under the exclusion (module doc).

        Deleted: chunks no snapshot names, files of unpublished snapshots, stale writer
        leases, all last modified before ``sweep start - grace``.
        """
        stop = f"cannot collect garbage in {self.what}"
        with self.gc_lock():
            named: set[bytes] = set()
            marked: set[str] = set()
            refs = 0

            def mark() -> None:
                nonlocal refs
                for snap_id in self.snapshot_ids():
                    if snap_id in marked:
                        continue
                    from ganeti_vol.repo.gc import indexes_of

                    for idx in indexes_of(self, snap_id):
                        for _, zero, _, digest in idx.entries():
                            check_cancel(cancel, stop)
                            if not zero:
                                named.add(digest)
                                refs += 1
                    marked.add(snap_id)

            mark()
            sweep = _Lease(self, f"{F.LOCKS}/sweep.{secrets.token_hex(6)}",
                           {"host": socket.gethostname(), "pid": os.getpid()})
            seen = 0  # the most writers that ran at once while gc waited
            t_wait = time.monotonic()
            try:
                while True:
                    check_cancel(cancel, stop)
                    if not dry_run:
                        sweep.put()
                    writers = self.live_writers()
                    seen = max(seen, len(writers))
                    if not writers or dry_run:
                        break
                    self.client.delete(self.bucket, self.key(sweep.key))
                    log.info("gc of %s: %d writer(s) running; sweeping when they finish",
                             self.what, len(writers))
                    time.sleep(1.0)
                waited = time.monotonic() - t_wait
                if not dry_run:
                    sweep.start_refresh()
                mark()  # snapshots published while marking or waiting
                cutoff = self.server_time() - grace
                doomed: list[str] = []
                freed = freed_bytes = kept = 0
                for digest, key, size, mtime in self._list_chunks():
                    check_cancel(cancel, stop)
                    if digest in named or mtime >= cutoff:
                        kept += 1
                        continue
                    doomed.append(key)
                    freed += 1
                    freed_bytes += size
                leftovers = self._leftovers(cutoff)
                if not dry_run:
                    self.client.delete_many(self.bucket, doomed + leftovers)
            finally:  # the sweep marker goes on every path (a stale one would stall writers)
                sweep.release()
        log.info("gc of %s: %d chunk(s), %d bytes freed", self.what, freed, freed_bytes)
        return {"repository": self.path, "dry_run": dry_run, "snapshots": len(marked),
                "references_marked": refs, "live_writers": seen, "grace": grace,
                "waited_for_writers": round(waited, 3), "chunks_kept": kept,
                "chunks_freed": freed, "bytes_freed": freed_bytes,
                "leftovers_removed": 0 if dry_run else len(leftovers),
                "restored_from_trash": 0}

    def _leftovers(self, cutoff: float) -> list[str]:
        """Stale writer leases, and files of snapshots never published, older than cutoff."""
        out = [k for k, t, live in self._leases("writer") if not live and t < cutoff]
        root = self.key(F.SNAPSHOTS) + "/"
        files: dict[str, list[tuple[str, float]]] = {}
        for key, _, mtime in self.client.list(self.bucket, root):
            snap_id = key[len(root):].partition("/")[0]
            files.setdefault(snap_id, []).append((key, mtime))
        for entries in files.values():
            if (not any(k.endswith("/" + F.MANIFEST) for k, _ in entries)
                    and all(t < cutoff for _, t in entries)):
                out.extend(k for k, _ in entries)
        return out

    def info(self) -> dict[str, Any]:
        return {**super().info(), "path": self.path,
                "endpoint": self.client.settings.endpoint}


def open_repository(spec: str, *, write: bool = False) -> S3Repository:
    """The backend seam's opener (``ganeti_vol.remote.SCHEMES``)."""
    return S3Repository.open(spec, write=write)


def init_repository(spec: str, *, hash_algo: str | None = None,
                    chunk_size: int = 4 << 20) -> dict[str, Any]:
    """``repo init s3://…`` (``ganeti_vol.remote.init_repository``); its info."""
    repo = S3Repository.init(spec, hash_algo=hash_algo, chunk_size=chunk_size)
    try:
        return repo.info()
    finally:
        repo.close()
