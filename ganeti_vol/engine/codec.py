"""LZ4 frames for one chunk: the only module that imports :mod:`lz4`.

Every chunk of a disk becomes one standalone LZ4 frame, so a dump file made
of concatenated frames decodes with the stock ``lz4 -d`` CLI alone.  The
frame settings are fixed here:

* compression level 0 (the lz4 CLI's ``-1``), 4 MiB blocks, independent
  blocks: with chunks of at most 4 MiB each frame holds exactly one block;
* content size stored in the frame header (8 bytes): a reader learns the
  chunk length without decompressing;
* **no** frame content checksum: ganeti-vol hashes every chunk itself
  (xxh3-128 or sha256, see :mod:`ganeti_vol.engine.hashing`), and lz4's XXH32
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
from typing import Any

import lz4.block
import lz4.block._block as lz4_block_extension
import lz4.frame

from ganeti_vol.core import errors as E
from ganeti_vol.core import libc

log = logging.getLogger(__name__)

#: name of the compression recorded in manifests and stream headers
COMPRESSION = "lz4-frame"
#: the largest chunk one frame holds as a single block
MAX_CHUNK = 4 << 20
#: the chunk sizes the format allows (a power of two between them; doc/archive-format.md)
MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 16 << 20

_FRAME_ARGS = {
    "compression_level": 0,
    "block_size": lz4.frame.BLOCKSIZE_MAX4MB,
    "block_linked": False,
    "content_checksum": False,
    "store_size": True,
}

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
        ok = libc.mallopt(libc.M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        ok = libc.mallopt(libc.M_TRIM_THRESHOLD, TRIM_THRESHOLD) and ok
        _tuned = ok
        log.debug("mallopt(mmap=%d, trim=%d) -> %s", MMAP_THRESHOLD, TRIM_THRESHOLD, ok)
        return ok


def trim_malloc() -> None:
    """Give freed heap memory back to the system now (glibc ``malloc_trim``).

    With :func:`tune_malloc`'s high trim threshold freed chunk buffers stay
    mapped; a phase that follows with buffers of its own (an import's
    read-back) calls this first, so the two phases' peaks do not add up.
    """
    libc.malloc_trim()


def limit_arenas(count: int) -> bool:
    """Let every thread share ``count`` malloc heaps (``M_ARENA_MAX``); True if applied.

    A process-wide choice for processes that must stay small whatever the
    number of CPUs (``ganeti-vol-lz4``): with :func:`tune_malloc`'s trim
    threshold each worker thread's own heap keeps the chunk buffers it freed,
    so the peak RSS grows with the thread count.  Call it before threads start.
    """
    return libc.mallopt(libc.M_ARENA_MAX, count)


def encode(data: bytes | bytearray | memoryview) -> bytes:
    """Compress one chunk into one standalone LZ4 frame."""
    frame: bytes = lz4.frame.compress(data, **_FRAME_ARGS)
    return frame


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


_XXH_PRIME = (2654435761, 2246822519, 3266489917, 668265263, 374761393)
_U32 = 0xFFFFFFFF


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _U32


@functools.lru_cache(maxsize=256)
def _header_checksum(descriptor: bytes) -> int:
    """The frame header's checksum byte: the second byte of XXH32 (seed 0) of the descriptor.

    The descriptor (FLG, BD, the content size; at most 14 bytes) is shorter
    than one XXH32 stripe, so only the algorithm's tail steps apply; they
    are computed here (once per descriptor) rather than pulling the xxhash
    package into the codec: :mod:`ganeti_vol.engine.hashing` is its home.
    """
    p1, p2, p3, p4, p5 = _XXH_PRIME
    acc = (p5 + len(descriptor)) & _U32
    i = 0
    while i + 4 <= len(descriptor):
        word = int.from_bytes(descriptor[i:i + 4], "little")
        acc = _rotl((acc + word * p3) & _U32, 17) * p4 & _U32
        i += 4
    for byte in descriptor[i:]:
        acc = _rotl((acc + byte * p5) & _U32, 11) * p1 & _U32
    acc ^= acc >> 15
    acc = acc * p2 & _U32
    acc ^= acc >> 13
    acc = acc * p3 & _U32
    acc ^= acc >> 16
    return (acc >> 8) & 0xFF


@functools.lru_cache(maxsize=16)
def _frame_header(content_size: int) -> bytes:
    descriptor = bytes((_FLG, _BD)) + _U64.pack(content_size)
    return _FRAME_MAGIC + descriptor + bytes((_header_checksum(descriptor),))


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


def valid_chunk_size(size: object) -> bool:
    """True if ``size`` is a chunk size the format allows (a power of two, 64 KiB-16 MiB)."""
    return (type(size) is int and MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE
            and not size & (size - 1))


def max_frame(length: int) -> int:
    """The most bytes a valid frame of a ``length``-byte chunk may have.

    The writer's worst case is a chunk stored uncompressed (4 bytes per block
    of overhead) or a partly sparse one of alternating 4 KiB data and hole
    runs (under 1 % overhead); readers refuse longer frames before reading
    or decompressing them, so a damaged length cannot make them allocate more.
    """
    return length + (length >> 6) + (64 << 10)


def _block_decoder() -> Any:
    """``LZ4_decompress_safe`` of the lz4 library inside python-lz4's extension, or None.

    It decompresses a block straight into a buffer of ours and never writes
    past the capacity it is given: no allocation and no copy per chunk
    (python-lz4's own functions allocate the output and then copy it, twice
    the chunk's memory), 1.6x faster here, and a bomb cannot grow anything.
    """
    try:
        fn = ctypes.CDLL(lz4_block_extension.__file__).LZ4_decompress_safe
    except (OSError, AttributeError) as err:
        log.debug("LZ4_decompress_safe not reachable (%s): python-lz4's decoder is used", err)
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_LZ4_DECOMPRESS_SAFE = _block_decoder()
_HEADER_SIZE = 15


def _address(buf: bytes | bytearray | memoryview) -> tuple[Any, int]:
    """(keep-alive object, address) of the bytes of ``buf`` (no copy)."""
    if isinstance(buf, bytes):
        ref: Any = ctypes.c_char_p(buf)
        return ref, ctypes.cast(ref, ctypes.c_void_p).value or 0
    ref = (ctypes.c_char * len(buf)).from_buffer(buf)
    return ref, ctypes.addressof(ref)


def _check_header(frame: bytes | bytearray | memoryview, length: int, what: str) -> int:
    """Check a frame header against the format (and ``length``); the maximum block size."""
    if len(frame) < _HEADER_SIZE or frame[:4] != _FRAME_MAGIC:
        raise E.CompressionError(f"cannot decode {what}: corrupt LZ4 frame (no frame header)")
    flg, bd = frame[4], frame[5]
    if _header_checksum(bytes(frame[4:14])) != frame[14]:
        raise E.CompressionError(f"cannot decode {what}: corrupt LZ4 frame (header checksum)")
    if flg != _FLG or bd & 0x8F or bd >> 4 < 4:
        raise E.CompressionError(f"cannot decode {what}: LZ4 frame settings FLG={flg:#04x} "
                                 f"BD={bd:#04x} are not those of the format")
    (size,) = _U64.unpack_from(frame, 6)
    if size != length:
        raise E.CompressionError(f"cannot decode {what}: LZ4 frame holds {size} bytes, "
                                 f"expected {length}")
    return 1 << (2 * (bd >> 4) + 8)


def decode_into(
    frame: bytes | bytearray | memoryview, out: bytearray, length: int, what: str
) -> bytes | memoryview:
    """Decompress one frame that must hold exactly ``length`` bytes; the chunk's bytes.

    They are decompressed into ``out`` (at least ``length`` bytes long) and a
    memoryview of it is returned; without :func:`_block_decoder` a new bytes
    object.  ``what`` names the chunk for the error message, e.g.
    ``"disk 0 of 'web1' at offset 4194304"``.  Nothing beyond ``length`` is
    ever produced: a frame longer than :func:`max_frame`, whose header
    differs from the format's or claims another content size, or whose
    blocks would decode to more than ``length`` bytes (a decompression bomb)
    is a :class:`~ganeti_vol.core.errors.CompressionError` before or while its
    block is decoded.
    """
    n = len(frame)
    if n > max_frame(length):
        raise E.CompressionError(f"cannot decode {what}: LZ4 frame of {n} bytes is too long for "
                                 f"a chunk of {length} bytes")
    if _LZ4_DECOMPRESS_SAFE is None:
        return _decode_python_lz4(frame, length, what)
    if isinstance(frame, memoryview) and frame.readonly:
        frame = frame.tobytes()
    block_max = _check_header(frame, length, what)
    src_ref, src = _address(frame)
    dst_ref, dst = _address(out)
    pos, done = _HEADER_SIZE, 0
    while True:
        if pos + 4 > n:
            raise E.CompressionError(f"cannot decode {what}: corrupt LZ4 frame (truncated)")
        (word,) = _BLOCK_SIZE.unpack_from(frame, pos)
        pos += 4
        if word == 0:
            break
        size, room = word & ~_UNCOMPRESSED, min(block_max, length - done)
        if size > n - pos or size > block_max:
            raise E.CompressionError(f"cannot decode {what}: corrupt LZ4 frame (block of {size} "
                                     f"bytes at byte {pos - 4})")
        if room <= 0:
            raise E.CompressionError(f"cannot decode {what}: corrupt LZ4 frame (blocks beyond "
                                     "its content size)")
        if word & _UNCOMPRESSED:
            got = size if size <= room else -1
            if got >= 0:
                out[done:done + size] = memoryview(frame)[pos:pos + size]
        else:
            got = _LZ4_DECOMPRESS_SAFE(src + pos, dst + done, size, room)
        if got < 0:
            raise E.CompressionError(f"cannot decode {what}: corrupt LZ4 frame (block at byte "
                                     f"{pos - 4} does not decode into the {room} bytes left)")
        done += got
        pos += size
    del src_ref, dst_ref
    if pos != n:
        raise E.CompressionError(f"cannot decode {what}: {n - pos} stray bytes after the LZ4 "
                                 "frame")
    if done != length:
        raise E.CompressionError(f"cannot decode {what}: LZ4 frame holds {done} bytes, "
                                 f"expected {length}")
    return memoryview(out)[:length]


def decode(frame: bytes | bytearray | memoryview, length: int, what: str) -> bytes:
    """Decompress one frame that must hold exactly ``length`` bytes (see :func:`decode_into`)."""
    return bytes(decode_into(frame, bytearray(length), length, what))


def _decode_python_lz4(frame: bytes | bytearray | memoryview, length: int, what: str) -> bytes:
    """:func:`decode_into` without :func:`_block_decoder`: python-lz4, bounded by ``length``."""
    try:
        info = lz4.frame.get_frame_info(frame)
    except (RuntimeError, ValueError) as err:
        raise E.CompressionError(f"cannot decode {what}: corrupt LZ4 frame ({err})") from err
    size = info.get("content_size") or None
    if size != length:
        held = f"{size} bytes" if size is not None else "no content size"
        raise E.CompressionError(f"cannot decode {what}: LZ4 frame holds {held}, expected {length}")
    decoder = lz4.frame.LZ4FrameDecompressor()
    try:
        data: bytes = decoder.decompress(frame, max_length=length)
    except (RuntimeError, ValueError) as err:
        raise E.CompressionError(f"cannot decode {what}: corrupt LZ4 frame ({err})") from err
    if not decoder.eof:
        problem = "blocks beyond its content size" if len(data) == length else "truncated"
        raise E.CompressionError(f"cannot decode {what}: corrupt LZ4 frame ({problem})")
    if decoder.unused_data:
        raise E.CompressionError(
            f"cannot decode {what}: {len(decoder.unused_data)} stray bytes after the LZ4 frame"
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


def is_zero_frame(frame: bytes | bytearray | memoryview, length: int) -> bool:
    """True if ``frame`` is exactly the cached zero frame of ``length`` (a memcmp)."""
    expected = zero_frame(length)
    if len(frame) != len(expected):
        return False
    if isinstance(frame, memoryview):  # memoryview == bytes compares item by item: slow
        frame = frame.tobytes()
    return frame == expected
