"""Chunk hashes and the whole-disk digest.

Two chunk hash algorithms, chosen by name (node config ``chunk_hash``):

``xxh3-128``
    xxHash3, 128 bits (package ``xxhash``): ~21 GB/s per core, releases the
    GIL.  Detects corruption, not tampering.  The default.
``sha256``
    hashlib SHA-256 (SHA-NI): ~1.2 GB/s per core.  For archives that leave
    the cluster and must resist deliberate collisions.
``blake3``
    BLAKE3, 256 bits (package ``blake3``): cryptographic like SHA-256 and
    ~3x faster here (5.3 vs 1.8 GB/s per core, doc/repository-format.md);
    the default chunk digest of backup repositories (:mod:`ganeti_vol.repo`)
    where the package is installed.  It is imported when first used, so a
    node without it (Debian 12 has no python3-blake3) runs everything else;
    using it there is a clear :class:`~ganeti_vol.core.errors.ConfigError`.

Digests are raw bytes (16 or 32); archives store them in binary and show
them in hex.

The **whole-disk digest** (``disk_digest``) is SHA-256 over::

    b"ganeti-vol disk digest 1\\n" + algo + b"\\n" + u64be(chunk_size)
    + hash(chunk 0) + hash(chunk 1) + ... + hash(chunk n-1)
    + u64be(logical size)

written ``"sha256:<hex>"``.  Exporter and importer each compute it from the
chunk hashes they saw, so comparing the two strings proves that the same
chunks arrived in the same order and nothing was lost or added at the end,
without hashing the disk twice.  It depends on the chunk size and chunk hash
algorithm, which are recorded next to it.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Callable
from typing import Any

import xxhash

from ganeti_vol.core import errors as E
from ganeti_vol.core.holes import zero_view

Buffer = bytes | bytearray | memoryview

DEFAULT = "xxh3-128"


def _sha256(data: Buffer) -> bytes:
    return hashlib.sha256(data).digest()


@functools.lru_cache(maxsize=1)
def _blake3_module() -> Any:
    try:
        import blake3
    except ModuleNotFoundError as err:
        if err.name != "blake3":  # blake3 itself is broken: say so, loudly
            raise
        raise E.ConfigError(
            "cannot use the chunk digest 'blake3': the Python package blake3 is not installed "
            "(pip install blake3), or use sha256"
        ) from err
    return blake3


def available(algo: str) -> bool:
    """True if ``algo`` can be used on this node (blake3 needs its package)."""
    if algo != "blake3":
        return algo in _ALGORITHMS
    try:
        _blake3_module()
    except E.ConfigError:
        return False
    return True


def _blake3(data: Buffer) -> bytes:
    return bytes(_blake3_module().blake3(data).digest())


_ALGORITHMS: dict[str, tuple[Callable[[Buffer], bytes], int]] = {
    "xxh3-128": (xxhash.xxh3_128_digest, 16),
    "sha256": (_sha256, 32),
    "blake3": (_blake3, 32),
}
ALGORITHMS = tuple(_ALGORITHMS)

DIGEST_ALGO = "sha256"
_DIGEST_MAGIC = b"ganeti-vol disk digest 1\n"
_U64 = struct.Struct(">Q")


def _lookup(algo: str) -> tuple[Callable[[Buffer], bytes], int]:
    try:
        return _ALGORITHMS[algo]
    except KeyError:
        raise E.ArchiveFormatError(
            f"unsupported chunk hash algorithm '{algo}' (supported: {', '.join(ALGORITHMS)})"
        ) from None


def hash_function(algo: str) -> Callable[[Buffer], bytes]:
    """The function ``bytes-like -> digest bytes`` of ``algo``."""
    return _lookup(algo)[0]


def digest_size(algo: str) -> int:
    """Length in bytes of one chunk hash of ``algo``."""
    return _lookup(algo)[1]


def chunk_hash(algo: str, data: Buffer) -> bytes:
    """Hash one chunk."""
    return _lookup(algo)[0](data)


_STREAMING: dict[str, Callable[[], Any]] = {
    "xxh3-128": xxhash.xxh3_128,
    "sha256": hashlib.sha256,
    "blake3": lambda: _blake3_module().blake3(),
}
_ZERO_PIECE = 1 << 20


def hash_runs(algo: str, data: memoryview, runs: list[tuple[int, int]]) -> bytes:
    """The chunk hash of ``data`` with every byte outside the ``[start, end)`` runs taken as zero.

    Equal to ``chunk_hash(algo, content)`` of the chunk whose holes read as
    zeros; the buffer between the runs is never read (it may hold anything).
    """
    _lookup(algo)
    h = _STREAMING[algo]()
    zeros = zero_view(_ZERO_PIECE)

    def zero_fill(n: int) -> None:
        while n:
            piece = min(n, _ZERO_PIECE)
            h.update(zeros[:piece])
            n -= piece

    pos = 0
    for start, end in runs:
        zero_fill(start - pos)
        h.update(data[start:end])
        pos = end
    zero_fill(len(data) - pos)
    return bytes(h.digest())


@functools.lru_cache(maxsize=32)
def zero_hash(algo: str, length: int) -> bytes:
    """The hash of ``length`` zero bytes (computed once per algorithm and length)."""
    return chunk_hash(algo, bytes(length))


class DiskDigest:
    """Incremental whole-disk digest over the ordered chunk hashes (see module doc)."""

    def __init__(self, algo: str, chunk_size: int) -> None:
        _lookup(algo)
        self.algo = algo
        self.chunk_size = chunk_size
        self._h = hashlib.sha256(_DIGEST_MAGIC + algo.encode() + b"\n" + _U64.pack(chunk_size))

    def update(self, chunk_digest: bytes) -> None:
        self._h.update(chunk_digest)

    def finish(self, size: int) -> str:
        """The digest string for a disk of ``size`` logical bytes."""
        h = self._h.copy()
        h.update(_U64.pack(size))
        return f"{DIGEST_ALGO}:{h.hexdigest()}"


def disk_digest(algo: str, chunk_size: int, hashes: list[bytes], size: int) -> str:
    """The whole-disk digest of a complete list of chunk hashes."""
    d = DiskDigest(algo, chunk_size)
    for h in hashes:
        d.update(h)
    return d.finish(size)
