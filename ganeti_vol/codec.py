"""LZ4 frames for one chunk: the only module that imports :mod:`lz4`.

Every chunk of a disk becomes one standalone LZ4 frame, so a dump file made
of concatenated frames decodes with the stock ``lz4 -d`` CLI alone.  The
frame settings are fixed here:

* compression level 0 (the lz4 CLI's ``-1``), 4 MiB blocks, independent
  blocks: with chunks of at most 4 MiB each frame holds exactly one block;
* content size stored in the frame header (8 bytes): a reader learns the
  chunk length without decompressing;
* **no** frame content checksum: ganeti-vol hashes every chunk itself
  (xxh3-128 or sha256, see :mod:`ganeti_vol.hashing`), and lz4's XXH32
  would halve the throughput on incompressible data
  (``../shared/reference/performance-facts.md``).

Zero chunks use one precomputed frame per chunk length (:func:`zero_frame`),
about 0.4 % of the chunk, costing no CPU at export time and recognised on
import by comparing bytes, without decompressing.

A chunk that is partly a hole of a sparse file (raw export) becomes one frame
of several blocks (:func:`encode_runs`): each data run is compressed as its
own block and each zero run is made of precomputed zero blocks, so the holes
inside a chunk are neither read nor compressed.  The LZ4 frame format allows
blocks shorter than the maximum anywhere in a frame; ``lz4 -d`` and
python-lz4 decode such frames like any other (tests check both).

:func:`tune_malloc` applies the glibc ``mallopt`` settings that keep the
multi-MiB buffers python-lz4 returns from being unmapped and faulted in again
on every call (it doubles decompression speed on this machine kind).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import struct
import threading

import lz4.block
import lz4.frame
import xxhash

from ganeti_vol import errors as E
from ganeti_vol import fdutil

log = logging.getLogger(__name__)

#: name of the compression recorded in manifests and stream headers
COMPRESSION = "lz4-frame"
#: the largest chunk one frame holds as a single block
MAX_CHUNK = 4 << 20

_FRAME_ARGS = {
    "compression_level": 0,
    "block_size": lz4.frame.BLOCKSIZE_MAX4MB,
    "block_linked": False,
    "content_checksum": False,
    "store_size": True,
}

#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30

_tuned = False
_tune_lock = threading.Lock()


def tune_malloc() -> bool:
    """Apply the mallopt settings once per process; True if they are in effect."""
    global _tuned
    with _tune_lock:
        if _tuned:
            return True
        try:
            mallopt = fdutil.libc().mallopt
        except (OSError, AttributeError) as err:  # not glibc: nothing to tune
            log.debug("mallopt not available: %s", err)
            return False
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
        ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
        _tuned = ok
        log.debug("mallopt(mmap=%d, trim=%d) -> %s", MMAP_THRESHOLD, TRIM_THRESHOLD, ok)
        return ok


def limit_arenas(count: int) -> bool:
    """Let every thread share ``count`` malloc heaps (``M_ARENA_MAX``); True if applied.

    A process-wide choice for processes that must stay small whatever the
    number of CPUs (``ganeti-vol-lz4``): with :func:`tune_malloc`'s trim
    threshold each worker thread's own heap keeps the chunk buffers it freed,
    so the peak RSS grows with the thread count.  Call it before threads start.
    """
    try:
        mallopt = fdutil.libc().mallopt
    except (OSError, AttributeError) as err:  # not glibc
        log.debug("mallopt not available: %s", err)
        return False
    return bool(mallopt(_M_ARENA_MAX, count) == 1)


def encode(data: bytes | bytearray | memoryview) -> bytes:
    """Compress one chunk into one standalone LZ4 frame."""
    return lz4.frame.compress(data, **_FRAME_ARGS)


_FRAME_MAGIC = struct.pack("<I", 0x184D2204)
#: FLG: version 01, independent blocks, no block checksum, content size, no content checksum
_FLG = 0x68
#: BD: 4 MiB maximum block size
_BD = 0x70
_U64 = struct.Struct("<Q")
_BLOCK_SIZE = struct.Struct("<I")
_UNCOMPRESSED = 0x80000000
_END_MARK = bytes(4)
#: zero runs are made of power-of-two zero blocks down to this size (then one exact block)
_MIN_ZERO_BLOCK = 4096


def _frame_header(content_size: int) -> bytes:
    descriptor = bytes((_FLG, _BD)) + _U64.pack(content_size)
    return _FRAME_MAGIC + descriptor + bytes(((xxhash.xxh32_intdigest(descriptor) >> 8) & 0xFF,))


def _data_block(data: memoryview) -> tuple[bytes, bytes | memoryview]:
    """Size word and body of one block (stored uncompressed if LZ4 cannot shrink it)."""
    packed = lz4.block.compress(data, mode="default", store_size=False)
    if len(packed) >= len(data):
        return _BLOCK_SIZE.pack(len(data) | _UNCOMPRESSED), data
    return _BLOCK_SIZE.pack(len(packed)), packed


@functools.lru_cache(maxsize=64)
def _zero_block(length: int) -> bytes:
    size, body = _data_block(memoryview(bytes(length)))
    return size + bytes(body)


def _zero_blocks(length: int, parts: list[bytes | memoryview]) -> None:
    """Append blocks holding ``length`` zero bytes: cached power-of-two blocks, so no work."""
    size = MAX_CHUNK
    while length:
        while size > length and size > _MIN_ZERO_BLOCK:
            size >>= 1
        piece = min(size, length)
        parts.append(_zero_block(piece))
        length -= piece


def encode_runs(data: memoryview, runs: list[tuple[int, int]]) -> bytes:
    """One frame for ``data`` whose bytes outside the ``[start, end)`` ``runs`` are zero.

    Only the runs are read and compressed (one block per 4 MiB of a run); the
    bytes between them are never looked at and come out as zeros.
    """
    parts: list[bytes | memoryview] = [_frame_header(len(data))]
    pos = 0
    for start, end in runs:
        if start > pos:
            _zero_blocks(start - pos, parts)
        for piece in range(start, end, MAX_CHUNK):  # a block holds at most 4 MiB
            parts.extend(_data_block(data[piece:min(piece + MAX_CHUNK, end)]))
        pos = end
    if pos < len(data):
        _zero_blocks(len(data) - pos, parts)
    parts.append(_END_MARK)
    return b"".join(parts)


def decode(frame: bytes | bytearray | memoryview, length: int, what: str) -> bytes:
    """Decompress one frame that must hold exactly ``length`` bytes.

    ``what`` names the chunk for the error message, e.g.
    ``"disk 0 of 'web1' at offset 4194304"``.
    """
    try:
        data, used = lz4.frame.decompress(frame, return_bytes_read=True)
    except (RuntimeError, ValueError) as err:
        raise E.CompressionError(f"cannot decode {what}: corrupt LZ4 frame ({err})") from err
    if used != len(frame):
        raise E.CompressionError(
            f"cannot decode {what}: {len(frame) - used} stray bytes after the LZ4 frame"
        )
    if len(data) != length:
        raise E.CompressionError(
            f"cannot decode {what}: LZ4 frame holds {len(data)} bytes, expected {length}"
        )
    return data


def frame_content_size(frame: bytes | bytearray | memoryview) -> int | None:
    """The content size stored in a frame header, or None if absent or unreadable."""
    try:
        info = lz4.frame.get_frame_info(frame)
    except (RuntimeError, ValueError):
        return None
    size = info.get("content_size")
    return int(size) if size else None


@functools.lru_cache(maxsize=16)
def zero_frame(length: int) -> bytes:
    """The frame of ``length`` zero bytes (computed once per length)."""
    return encode(bytes(length))


@functools.lru_cache(maxsize=16)
def zero_bytes(length: int) -> bytes:
    """A shared, immutable buffer of ``length`` zero bytes."""
    return bytes(length)


@functools.lru_cache(maxsize=16)
def zero_view(length: int) -> memoryview:
    """A memoryview of :func:`zero_bytes`: its slices are zeros of any shorter length, uncopied.

    ``buf.startswith(zero_view(n)[:k], pos)`` tests ``k`` bytes of a bytearray
    at ``pos`` for zeros at memcmp speed, without slicing ``buf`` (a copy).
    (Comparing a memoryview with ``==`` goes item by item: 30x slower.)
    """
    return memoryview(zero_bytes(length))


def is_zero_frame(frame: bytes | bytearray | memoryview, length: int) -> bool:
    """True if ``frame`` is exactly the cached zero frame of ``length`` (a memcmp)."""
    expected = zero_frame(length)
    if len(frame) != len(expected):
        return False
    if isinstance(frame, memoryview):  # memoryview == bytes compares item by item: slow
        frame = frame.tobytes()
    return frame == expected
