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

:func:`tune_malloc` applies the glibc ``mallopt`` settings that keep the
multi-MiB buffers python-lz4 returns from being unmapped and faulted in again
on every call (it doubles decompression speed on this machine kind).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import threading

import lz4.frame

from ganeti_vol import errors as E

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
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name or "libc.so.6")
            mallopt = libc.mallopt
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


def encode(data: bytes | bytearray | memoryview) -> bytes:
    """Compress one chunk into one standalone LZ4 frame."""
    return lz4.frame.compress(data, **_FRAME_ARGS)


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


def is_zero_frame(frame: bytes | bytearray | memoryview, length: int) -> bool:
    """True if ``frame`` is exactly the cached zero frame of ``length`` (a memcmp)."""
    expected = zero_frame(length)
    if len(frame) != len(expected):
        return False
    if isinstance(frame, memoryview):  # memoryview == bytes compares item by item: slow
        frame = frame.tobytes()
    return frame == expected
