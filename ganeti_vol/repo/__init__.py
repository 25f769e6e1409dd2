"""Backup repositories: deduplicated, incremental, self-checking, with retention and GC.

A repository is a directory (spec: ``doc/repository-format.md``, guide:
``doc/repository.md``) holding a chunk store (one standalone LZ4 frame per
chunk, exactly as in archive v1, named by the BLAKE3 or SHA-256 digest of its
uncompressed bytes, zero chunks never stored) and snapshots (one per export:
config.ini, a manifest and per disk an index of chunk digests).  An export
stores only the chunks the repository lacks; an import verifies every chunk
before writing it.

Modules: :mod:`.format` (file formats), :mod:`.store` (the directory, chunk
store, locks), :mod:`.snapshot` (writing and reading snapshots),
:mod:`.inspect` (list, info, diff), :mod:`.check` (health, quarantine, repair),
:mod:`.restore` (``--into-existing``), :mod:`.prune`, :mod:`.gc`, :mod:`.upgrade`,
:mod:`.origin` (images instances were created from).

May import: :mod:`ganeti_vol.ops` and every room below it (not
:mod:`ganeti_vol.osapi`, :mod:`ganeti_vol.authoring` or the CLI).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Instance
from ganeti_vol.repo.snapshot import Snapshot, SnapshotWriter, open_snapshot, split_spec
from ganeti_vol.repo.store import Repository

if TYPE_CHECKING:
    from ganeti_vol.ops.operations import OpContext

__all__ = ["Repository", "Snapshot", "SnapshotWriter", "open_snapshot", "prepare_export",
           "split_spec", "is_snapshot_spec"]

_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def is_snapshot_spec(text: str) -> bool:
    """True for ``PATH::SNAPSHOT`` (an import source in a repository)."""
    return "::" in text


def prepare_export(ctx: OpContext, path: Any, *, tag: str | None = None
                   ) -> tuple[OpContext, Callable[[Instance], SnapshotWriter]]:
    """(context, writer factory) for ``transfer.export_instance(..., into=factory)``.

    ``path``: a repository directory, or an opened repository (any backend of
    :func:`ganeti_vol.remote.open_repository`).  The context's engine settings
    become the repository's chunk size and digest.
    """
    if tag is not None and not _TAG_RE.match(tag):
        raise E.UsageError(f"invalid tag '{tag}': use letters, digits, '.', '_' and '-'")
    repo: Any = Repository.open(path, write=True) if isinstance(path, str) else path
    node = ctx.node.replace(chunk_size=repo.chunk_size, chunk_hash=repo.hash_algo)

    def factory(instance: Instance) -> SnapshotWriter:
        from ganeti_vol.repo.origin import instance_origin

        return SnapshotWriter(repo, instance, tag=tag, origin=instance_origin(repo, instance.name))

    return dataclasses.replace(ctx, node=node), factory
