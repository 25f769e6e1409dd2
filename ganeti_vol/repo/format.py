"""The repository's on-disk formats: config, snapshot manifest, disk index, chunk paths.

Pure encoding and decoding (no locking, no policy); the spec is
``doc/repository-format.md``.  Every metadata file carries its own checksum,
so that a damaged field, even a timestamp or a path, is detected:

* ``config.json`` and each snapshot's ``manifest.json`` hold a
  ``"checksum": "sha256:<hex>"`` of their canonical JSON without that field;
* each disk index (``disk<i>.idx``) ends with the SHA-256 of everything
  before it, and the manifest records the SHA-256 of the whole file.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from typing import Any, BinaryIO

from ganeti_vol.core import errors as E
from ganeti_vol.engine import hashing
from ganeti_vol.formats.archive import check_format

REPO_FORMAT = "ganeti-vol-repository"
SNAPSHOT_FORMAT = "ganeti-vol-snapshot"
#: the layout this code writes; older ones are read and upgraded (``repo upgrade``):
#: 1 kept every chunk in ``chunks/``; 2 spreads them over ``chunks/<first 2 hex>/``
FORMAT_VERSION = 2
#: every layout version this code can read
READABLE_VERSIONS = frozenset({1, 2})
#: features this reader implements; a repository may require any subset of them
SUPPORTED_FEATURES = frozenset({"lz4-frame-chunks", "snapshot-index-v1"})
WRITTEN_FEATURES = ("lz4-frame-chunks", "snapshot-index-v1")
#: chunk digests allowed: cryptographic only (a tenant must not be able to craft collisions)
DIGESTS = ("blake3", "sha256")


def default_digest() -> str:
    """blake3 where its package is installed (about 3x faster here), else sha256."""
    return "blake3" if hashing.available("blake3") else "sha256"


CONFIG = "config.json"
MANIFEST = "manifest.json"
SNAPSHOT_CONFIG = "config.ini"
CHUNKS = "chunks"
SNAPSHOTS = "snapshots"
QUARANTINE = "quarantine"
LOCKS = "locks"
TMP = "tmp"
TRASH = "trash"
ORIGINS = "origins"
DIRS = (CHUNKS, SNAPSHOTS, QUARANTINE, LOCKS, TMP, TRASH, ORIGINS)

#: index header: magic, version, digest length, reserved, chunk size
IDX_HEADER = struct.Struct("<8sHHIQ")
IDX_MAGIC = b"GVRIDX1\n"
IDX_VERSION = 1
#: index entry (followed by the digest): flags, reserved, frame length
IDX_ENTRY = struct.Struct("<B3xI")
#: index trailer: chunk count, logical size, then SHA-256 of everything before the digest
IDX_TRAILER = struct.Struct("<QQ32s")
FLAG_ZERO = 0x01
_KNOWN_FLAGS = FLAG_ZERO


# --- self-checking JSON ----------------------------------------------------------------


def _canonical(obj: dict[str, Any]) -> bytes:
    body = {k: v for k, v in obj.items() if k != "checksum"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def seal(obj: dict[str, Any]) -> bytes:
    """The file text of ``obj`` with its ``checksum`` field set."""
    sealed = dict(obj)
    sealed["checksum"] = "sha256:" + hashlib.sha256(_canonical(obj)).hexdigest()
    return (json.dumps(sealed, indent=1, ensure_ascii=False) + "\n").encode()


def unseal(data: bytes, what: str) -> dict[str, Any]:
    """Parse a sealed JSON file; IntegrityError if any field differs from its checksum."""
    try:
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise E.IntegrityError(f"cannot read {what}: incomplete or invalid JSON ({err})") from err
    want = obj.get("checksum")
    got = "sha256:" + hashlib.sha256(_canonical(obj)).hexdigest()
    if want != got:
        raise E.IntegrityError(f"cannot read {what}: it does not match its checksum (damaged)")
    return obj


def check_header(obj: dict[str, Any], what: str, fmt: str) -> int:
    """Refuse a config this reader cannot read (as archives do); the format version."""
    check_format(obj, what, fmt=fmt, version=FORMAT_VERSION, supported=SUPPORTED_FEATURES)
    version = int(obj["format_version"])
    if version not in READABLE_VERSIONS:
        raise E.ArchiveFormatError(f"cannot open {what}: format version {version} is not readable")
    return version


# --- chunk names -------------------------------------------------------------------------


def chunk_relpath(digest_hex: str, version: int) -> str:
    """Where a chunk lives, relative to the repository (layout ``version``)."""
    if version == 1:
        return f"{CHUNKS}/{digest_hex}"
    return f"{CHUNKS}/{digest_hex[:2]}/{digest_hex}"


def chunk_dirs(version: int) -> list[str]:
    """The chunk directories of a layout, relative to the repository (made up front)."""
    return [] if version == 1 else [f"{CHUNKS}/{i:02x}" for i in range(256)]


def is_digest_name(name: str, length: int) -> bool:
    return len(name) == 2 * length and all(c in "0123456789abcdef" for c in name)


# --- disk index --------------------------------------------------------------------------


class IndexWriter:
    """Write a disk index to an open file, entry by entry, hashing as it goes."""

    def __init__(self, f: BinaryIO, algo: str, chunk_size: int) -> None:
        self.f = f
        self.hlen = hashing.digest_size(algo)
        self.sha = hashlib.sha256()
        self.count = 0
        self.buf = bytearray()
        self._put(IDX_HEADER.pack(IDX_MAGIC, IDX_VERSION, self.hlen, 0, chunk_size))

    def _put(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= 1 << 16:
            self._flush()

    def _flush(self) -> None:
        self.sha.update(self.buf)
        self.f.write(self.buf)
        self.buf = bytearray()

    def add(self, zero: bool, frame_len: int, digest: bytes) -> None:
        self._put(IDX_ENTRY.pack(FLAG_ZERO if zero else 0, frame_len) + digest)
        self.count += 1

    def finish(self, size: int) -> None:
        head = struct.pack("<QQ", self.count, size)
        self._put(head)
        self._flush()
        self.f.write(self.sha.digest())


class Index:
    """A checked disk index, read sequentially (memory does not grow with the disk)."""

    def __init__(self, path: str, algo: str, what: str) -> None:
        self.path, self.what = path, what
        self.hlen = hashing.digest_size(algo)
        self.step = IDX_ENTRY.size + self.hlen
        try:
            with open(path, "rb") as f:
                head = f.read(IDX_HEADER.size)
                f.seek(0, 2)
                total = f.tell()
                f.seek(max(0, total - IDX_TRAILER.size))
                tail = f.read()
        except OSError as err:
            raise E.IntegrityError(f"cannot read {what}: {err.strerror or err}") from err
        body = total - IDX_HEADER.size - IDX_TRAILER.size
        if len(head) < IDX_HEADER.size or body < 0 or body % self.step:
            raise E.IntegrityError(f"cannot read {what}: truncated or malformed index")
        magic, version, hlen, _, self.chunk_size = IDX_HEADER.unpack(head)
        if (magic, version, hlen) != (IDX_MAGIC, IDX_VERSION, self.hlen):
            raise E.IntegrityError(f"cannot read {what}: unexpected index header")
        self.count, self.size, self.trailer_sha = IDX_TRAILER.unpack(tail)
        if self.count != body // self.step:
            raise E.IntegrityError(f"cannot read {what}: wrong number of entries")

    def entries(self) -> Iterator[tuple[int, bool, int, bytes]]:
        """(chunk index, zero, frame length, digest) in order; the checksum is checked at
        the end (IntegrityError then: callers must not trust what they saw before)."""
        sha = hashlib.sha256()
        try:
            with open(self.path, "rb") as f:
                head = f.read(IDX_HEADER.size)
                sha.update(head)
                i = 0
                while i < self.count:
                    block = f.read(self.step * min(4096, self.count - i))
                    if not block or len(block) % self.step:
                        raise E.IntegrityError(f"cannot read {self.what}: truncated index")
                    sha.update(block)
                    mv = memoryview(block)
                    for pos in range(0, len(block), self.step):
                        flags, flen = IDX_ENTRY.unpack_from(mv, pos)
                        if flags & ~_KNOWN_FLAGS:
                            raise E.IntegrityError(
                                f"cannot read {self.what}: unknown chunk flags {flags:#x}")
                        yield i, bool(flags & FLAG_ZERO), flen, bytes(
                            mv[pos + IDX_ENTRY.size:pos + self.step])
                        i += 1
                sha.update(f.read(16))
        except OSError as err:
            raise E.IntegrityError(f"cannot read {self.what}: {err.strerror or err}") from err
        if sha.digest() != self.trailer_sha:
            raise E.IntegrityError(f"cannot read {self.what}: it does not match its checksum "
                                   "(damaged)")

    def verify(self) -> None:
        """Read it through: checksum and flags (IntegrityError)."""
        for _ in self.entries():
            pass


def file_sha256(path: str, what: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    except OSError as err:
        raise E.IntegrityError(f"cannot read {what}: {err.strerror or err}") from err
    return h.hexdigest()
