"""What flows through the engine: chunks, the protocols of their sinks and sources, summaries.

An export puts a disk's chunks into a :class:`ChunkSink` (an archive, the
wire stream, a repository); an import takes them from a :class:`ChunkSource`
(an archive, a stream, a Ganeti dump, a repository snapshot) and writes them
to a :class:`~ganeti_vol.engine.targets.Target`.  :class:`EncodeSummary` and
:class:`DecodeSummary` say what one disk's transfer did.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import Buffer

#: what :meth:`~ganeti_vol.engine.parallel.Engine.encode` reads from (``auto``: by fstat)
SOURCE_KINDS = ("pipe", "file", "block", "auto")


@dataclass(slots=True)
class Chunk:
    """One chunk of a disk, as passed to sinks and taken from sources.

    ``frame`` is the LZ4 frame (``None`` for a raw sink/source), ``data`` the
    raw bytes (only for raw sinks/sources; a sink must use them before
    ``write_chunk`` returns, the buffer is recycled).  ``hash`` is the chunk
    hash of the uncompressed bytes (``None`` from sources without hashes, such
    as Ganeti dumps).  ``crc`` is the crc32 of ``frame`` when the sink asked
    for it (``want_crc``) or the source carries one to check.
    """

    index: int
    offset: int
    length: int
    zero: bool
    hash: bytes | None
    frame: bytes | bytearray | None = None
    data: Buffer | None = None
    crc: int | None = None


class ChunkSink(Protocol):
    """Where :meth:`Engine.encode` puts chunks (archive dump, wire stream, raw dump)."""

    #: False: chunks carry ``data`` (raw bytes) instead of an LZ4 ``frame``
    compress: bool
    #: True: the workers also compute ``crc`` (crc32 of the frame)
    want_crc: bool
    #: optional ``known(digest) -> bool``, called by a worker once a chunk is hashed:
    #: True means the sink already stores that content, so the chunk is not
    #: compressed and reaches ``write_chunk`` with ``frame`` and ``data`` None
    #: (a deduplicating repository, :mod:`ganeti_vol.repo`)

    def begin(self, info: EncodeInfo) -> None: ...
    def write_chunk(self, chunk: Chunk) -> None: ...
    def finish(self, summary: EncodeSummary) -> None: ...
    def abort(self, error: BaseException) -> None: ...


class ChunkSource(Protocol):
    """What :meth:`Engine.decode` reads: one disk of an archive, stream or Ganeti export."""

    @property
    def what(self) -> str: ...
    @property
    def chunk_size(self) -> int: ...
    @property
    def hash_algo(self) -> str | None:
        """The chunk hash algorithm of the recorded hashes (None: nothing recorded)."""
    @property
    def size(self) -> int | None:
        """Logical bytes, if known before the chunks are read."""
    @property
    def disk_size(self) -> int | None:
        """Size of the exported disk in bytes (a raw target must be at least this big)."""

    def chunks(self) -> Iterator[Chunk]: ...
    def finish(self, summary: DecodeSummary) -> None: ...


class Progress(Protocol):
    """What the engine reports to (see :class:`ganeti_vol.engine.progress.DiskProgress`)."""

    def advance(self, nbytes: int) -> None: ...
    def verified(self, nbytes: int) -> None: ...
    def touch(self) -> None: ...
    def set_total(self, nbytes: int | None) -> None: ...
    def set_stage(self, stage: str) -> None: ...


class NoProgress:
    def advance(self, nbytes: int) -> None:
        pass

    verified = advance

    def touch(self) -> None:
        pass

    def set_total(self, nbytes: int | None) -> None:
        pass

    def set_stage(self, stage: str) -> None:
        pass


@dataclass(frozen=True)
class EncodeInfo:
    """Told to a sink before the first chunk."""

    what: str
    chunk_size: int
    hash_algo: str
    source_kind: str
    #: logical size if known up front (file/block sources)
    size: int | None
    #: device/inode identity of the source, for the manifest
    source_identity: dict[str, Any]


@dataclass
class EncodeSummary:
    """What :meth:`Engine.encode` did; sinks record it (manifest, stream trailer)."""

    what: str
    source_kind: str
    size: int
    chunk_size: int
    hash_algo: str
    compression: str | None
    chunks: int
    zero_chunks: int
    zero_bytes: int
    #: bytes never read because the hole map said they were holes
    hole_bytes: int
    #: bytes written to the sink (frames or raw data)
    stored_bytes: int
    digest: str
    started: float
    seconds: float
    size_hint: int | None = None
    source_identity: dict[str, Any] = field(default_factory=dict)
    #: bytes never read because a change map said they were as in the last backup
    unchanged_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DecodeSummary:
    """What :meth:`Engine.decode` did."""

    what: str
    size: int
    chunks: int
    zero_chunks: int
    zero_bytes: int
    digest: str
    hash_algo: str
    seconds: float
    #: True when the target was read back after fsync and matched
    read_back: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_decoded(
    summary: DecodeSummary, expected: dict[str, Any], what: str, disk: int, by: str
) -> None:
    """Compare a decode with the recorded size, chunk count and whole-disk digest."""
    want = (expected.get("size"), expected.get("chunks"), expected.get("digest"))
    got = (summary.size, summary.chunks, summary.digest)
    if want != got:
        raise E.IntegrityError(
            f"cannot read {what}: decoded {got[0]} bytes in {got[1]} chunks with digest "
            f"{got[2]}, {by} says {want[0]}/{want[1]}/{want[2]}", disk=disk,
        )
