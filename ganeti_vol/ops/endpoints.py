"""The two ends of a transfer: what an import reads and what an export writes.

Each end carries its own shape, so export and import ask it instead of
asking what kind of thing it is:

- an :class:`ImportSource` (a native archive, a Ganeti v0 export, the
  export stream, a repository snapshot, local or remote) names its instance,
  path and format, says whether its disks come one after the other
  (``sequential``: the stream) or may be read in any order and at once, lists
  the disk indexes it holds (a stream: those its header announces), gives its
  disks as :class:`DiskSource` objects, and the hook variables that describe
  it (``SRC_PATH``, ``SRC_IMAGES``);
- an :class:`ExportDestination` (an archive, the stream, a repository
  snapshot) says whether disks may be written at once, gives each disk's
  chunk sink, the path the result names and the one post hooks see
  (``EXPORT_PATH``), and what it adds to the export's result.

The implementations live in :mod:`ganeti_vol.formats` and
:mod:`ganeti_vol.repo`; they conform structurally (nothing there imports this).
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import Any, Protocol, Self

from ganeti_vol.core.model import Instance
from ganeti_vol.engine.chunks import ChunkSink, ChunkSource
from ganeti_vol.formats.archive import DiskMeta


class DiskSource(ChunkSource, Protocol):
    """One disk of an import source, as the engine decodes it."""

    @property
    def index(self) -> int: ...
    @property
    def mode(self) -> str | None:
        """How it was exported: "script", "raw", or None if not recorded."""


class ImportSource(Protocol):
    """What :func:`ganeti_vol.ops.transfer.import_instance` reads."""

    @property
    def instance(self) -> Instance:
        """The exported instance (its config.ini)."""
    @property
    def path(self) -> str:
        """Where it is: a directory, ``REPO::ID``, or "-" for a stream."""
    @property
    def format(self) -> str:
        """"native", "ganeti", "repository" or "stream"."""
    @property
    def sequential(self) -> bool:
        """True: each disk must be read to its end before the next one comes (a stream)."""
    @property
    def indexes(self) -> list[int]:
        """The disk indexes it holds, known before any disk is read."""

    def disk_sources(self) -> Iterator[DiskSource]: ...
    def hook_vars(self) -> dict[str, str]:
        """``SRC_PATH`` and ``SRC_IMAGES`` of the instance-add hooks."""
    def close(self) -> None: ...


class ExportDestination(Protocol):
    """What :func:`ganeti_vol.ops.transfer.export_instance` writes (a context manager that
    publishes on a clean exit and discards on an error)."""

    @property
    def parallel(self) -> bool:
        """True: several disks may be written at once."""
    @property
    def path(self) -> str:
        """What the export's result names: an archive, ``REPO::ID``, or "-" for a stream."""
    @property
    def hook_path(self) -> str:
        """``EXPORT_PATH`` of the instance-export post hooks ("" for a stream)."""

    def disk_sink(self, index: int, meta: DiskMeta | None = None) -> ChunkSink: ...
    def extra_result(self) -> dict[str, Any]:
        """Entries the export's result gets besides its own (after the block)."""
    def __enter__(self) -> Self: ...
    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...
