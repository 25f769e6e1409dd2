"""Repositories off this node: the backend seam, ssh (and, beside it, S3), and moves.

May import: :mod:`ganeti_vol.repo` and every room below it (core, system,
engine, ganeti, formats, ops), never :mod:`ganeti_vol.cli`.  It shares a layer
with :mod:`ganeti_vol.repo`, which never imports it: the repository code works on
any opened backend it is given (``repo.prepare_export(ctx, backend)``,
``repo.snapshot.open_snapshot(spec, backend)``), and the CLI opens backends
here (:func:`open_repository`, :func:`open_snapshot`).

**The seam.**  A repository is named by a *spec*:

* ``/path`` (or any spec without a scheme): a local directory,
  :class:`ganeti_vol.repo.store.Repository`;
* ``ssh://[user@]host[:port]/path``: :mod:`ganeti_vol.remote.ssh`, which
  runs ``ganeti-vol repo serve`` on the far side over the system ``ssh``;
* more schemes: one line each in :data:`SCHEMES`.

:func:`open_repository` returns a :class:`RepositoryBackend`, the part of a
repository that writing a snapshot (``export --repo``) and reading one
(``import REPO::SNAP``) use.  Whole-repository verbs (list, info, diff,
check, prune, gc, remove) go through :func:`run`: on a local repository they
run here, on an ssh repository on the server, next to the data.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ganeti_vol.core import errors as E

if TYPE_CHECKING:
    from ganeti_vol.repo.snapshot import Snapshot

#: scheme -> "module:callable"; the callable takes (spec, write=bool) and returns a
#: RepositoryBackend.  Add a scheme with one line here.
SCHEMES: dict[str, str] = {
    "ssh": "ganeti_vol.remote.ssh:open_repository",
    "s3": "ganeti_vol.remote.s3:open_repository",
}

_SCHEME_RE = re.compile(r"^([a-z][a-z0-9+.-]*)://")


@runtime_checkable
class RepositoryBackend(Protocol):
    """What the snapshot writer and reader need from a repository (local or remote).

    Chunks are named by their digest (``bytes``) and stored as one LZ4 frame
    each; snapshots are directories of small files (``manifest``,
    ``config.ini``, ``diskN.idx``) published last and atomically.
    """

    #: the spec the user gave (local: the absolute path); ``what``: for messages
    path: str
    what: str
    hash_algo: str
    chunk_size: int
    version: int
    hlen: int
    #: chunks an export stores at once (a remote backend: enough to cover the link latency)
    store_threads: int

    # -- chunks ------------------------------------------------------------------------
    def haves(self, digests: Sequence[bytes]) -> list[int | None]:
        """Batched: per digest, its stored frame size (and it is touched: a running GC
        keeps it), or None if the repository lacks it."""

    def touch(self, digest: bytes) -> int | None:
        """``haves([digest])[0]``; called concurrently by the engine's workers (a remote
        backend coalesces concurrent calls into one batch)."""

    def chunk_size_on_disk(self, digest: bytes) -> int | None:
        """The stored frame size, or None (no touch)."""

    def store(self, digest: bytes, frame: bytes | memoryview, tmpdir: str) -> bool:
        """Store a chunk frame unless it is there; True if this call stored it."""

    def chunk_dir(self, digest: bytes) -> str:
        """Where the chunk lives, for :meth:`sync_dirs` ('' if the backend tracks it)."""

    def sync_dirs(self, dirs: set[str]) -> None:
        """Make every stored chunk durable (before an index names it)."""

    def read_frame(self, digest: bytes) -> bytes | None:
        """A chunk's frame, or None if it is missing."""

    def prefetch(self, digest: bytes) -> None:
        """A read of this chunk comes soon (a remote backend requests it now)."""

    # -- snapshots and small files ------------------------------------------------------
    def snapshot_ids(self) -> list[str]:
        """The published snapshots, sorted."""

    def local_file(self, *parts: str) -> str:
        """A local path holding the repository file ``parts`` (``snapshots/ID/NAME``,
        ``origins/NAME.json``); fetched first from a remote repository.  A missing file
        gives a path that does not exist."""

    def publish_snapshot(self, staging: str, snap_id: str) -> None:
        """Publish the complete local directory ``staging`` as snapshot ``snap_id``:
        the last step of an export, atomic (all there or not listed)."""

    # -- locks -------------------------------------------------------------------------
    def shared(self) -> AbstractContextManager[Any]:
        """Hold the repository shared (anything but upgrade)."""

    def writer(self) -> AbstractContextManager[Any]:
        """Register as a writer (GC keeps what it touches); yields an object with a local
        ``tmpdir`` for staging."""

    def close(self) -> None:
        """Release the connection (a no-op for a local repository)."""


def scheme(spec: str) -> str | None:
    """The scheme of a repository spec (``ssh``), or None for a local path."""
    m = _SCHEME_RE.match(spec)
    return m.group(1) if m else None


def is_remote(spec: str) -> bool:
    return scheme(spec) is not None


def _opener(spec: str) -> Any:
    name = scheme(spec)
    if name is None:
        return None
    target = SCHEMES.get(name)
    if target is None:
        raise E.UsageError(f"cannot open repository '{spec}': unknown scheme '{name}://' "
                           f"(use a path or one of {', '.join(s + '://' for s in SCHEMES)})")
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def open_repository(spec: str, *, write: bool = False) -> RepositoryBackend:
    """Open the repository named by ``spec`` (see the module doc); ``write``: the caller
    will add data (the repository must be at the current format version)."""
    opener = _opener(spec)
    if opener is None:
        from ganeti_vol.repo.store import Repository

        return Repository.open(spec, write=write)
    backend: RepositoryBackend = opener(spec, write=write)
    return backend


def open_snapshot(spec: str) -> Snapshot:
    """Open ``REPO::SNAPSHOT`` for reading, REPO a path or a remote spec (a
    :class:`ganeti_vol.repo.snapshot.Snapshot`; closing it closes the repository)."""
    from ganeti_vol.repo.snapshot import open_snapshot as open_in
    from ganeti_vol.repo.snapshot import split_spec

    return open_in(spec, open_repository(split_spec(spec)[0]))


def init_repository(spec: str, *, hash_algo: str | None = None,
                    chunk_size: int = 4 << 20) -> dict[str, Any]:
    """Create an empty repository (``repo init``; for ``ssh://``, on the server); its info.

    A scheme's module provides ``init_repository(spec, hash_algo=, chunk_size=)``.
    """
    name = scheme(spec)
    if name is None:
        from ganeti_vol.repo.store import Repository

        return Repository.init(spec, hash_algo=hash_algo, chunk_size=chunk_size).info()
    _opener(spec)  # an unknown scheme is a usage error
    module = importlib.import_module(SCHEMES[name].partition(":")[0])
    info: dict[str, Any] = module.init_repository(spec, hash_algo=hash_algo,
                                                  chunk_size=chunk_size)
    return info


def run(spec: str, verb: str, **kwargs: Any) -> dict[str, Any]:
    """Run a whole-repository verb (:data:`ganeti_vol.remote.verbs.VERBS`) where the
    repository is: here for a local path, on the server for ``ssh://``."""
    from ganeti_vol.remote import verbs

    if verb not in verbs.VERBS:
        raise E.ProgrammerError(f"unknown repository verb {verb!r}")
    opener = _opener(spec)
    if opener is None:
        from ganeti_vol.repo.store import Repository

        return verbs.VERBS[verb](Repository.open(spec, write=verb in verbs.WRITING), **kwargs)
    with contextlib.closing(opener(spec, write=verb in verbs.WRITING)) as backend:
        remote_run = getattr(backend, "run", None)
        if remote_run is None:
            return verbs.VERBS[verb](backend, **kwargs)
        result: dict[str, Any] = remote_run(verb, **kwargs)
        return result

