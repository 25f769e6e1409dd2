"""The worker queue of the engine: chunks in flight in disk order, their buffers, the work on each.

The engine reads or receives chunks in order, hands the work on each (hash,
compress; decompress, verify) to its thread pool, and consumes the results
in the same order (:class:`InFlight`).  Buffers are recycled, and at most a
bounded number exist, so memory stays bounded whatever the disk size.  The
functions at the end run in the pool's threads: python-lz4, xxhash and
hashlib release the GIL, so the workers really run in parallel.
"""

from __future__ import annotations

import mmap
import threading
import zlib
from collections import deque
from collections.abc import Callable
from concurrent import futures
from typing import Any, Protocol

from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import POLL_MS, Buffer, check_cancel
from ganeti_vol.core.holes import Runs, data_runs, is_zero, zero_bytes
from ganeti_vol.engine import codec, hashing
from ganeti_vol.engine.chunks import Chunk


class InFlight:
    """Chunks in disk order: each is ready or a future of a worker; consumed in order."""

    def __init__(self, cancel: threading.Event | None, what: str) -> None:
        self._q: deque[tuple[Any, futures.Future[Any] | None, Any]] = deque()
        self.cancel = cancel
        self.what = what

    def __len__(self) -> int:
        return len(self._q)

    def add(self, item: Any, fut: futures.Future[Any] | None, ready: Any = None) -> None:
        self._q.append((item, fut, ready))

    def pop(self, block: bool) -> tuple[Any, Any] | None:
        """The oldest entry and its result, or None (queue empty, or head busy and not block)."""
        if not self._q:
            return None
        item, fut, result = self._q[0]
        if fut is not None:
            if not block and not fut.done():
                return None
            while True:
                try:
                    result = fut.result(timeout=POLL_MS / 1000)
                    break
                except futures.TimeoutError:
                    check_cancel(self.cancel, self.what)
        self._q.popleft()
        return item, result

    def abort(self) -> None:
        """Cancel what has not started and wait for what runs (so no worker holds our buffers)."""
        running = [fut for _, fut, _ in self._q if fut is not None and not fut.cancel()]
        self._q.clear()
        futures.wait(running)


class Buffers:
    """Recycled chunk buffers; at most ``limit`` exist, so memory stays bounded.

    ``aligned`` buffers are anonymous mmaps (page-aligned, as O_DIRECT wants).
    """

    def __init__(self, size: int, limit: int, aligned: bool = False) -> None:
        self.size, self.limit, self.aligned = size, limit, aligned
        self.free: list[Any] = []
        self.allocated = 0

    def get(self, inflight: InFlight, consume: Callable[[Any], None]) -> Any:
        """A free buffer; consumes the oldest in-flight chunks until one is returned."""
        while not self.free and self.allocated >= self.limit:
            consume(inflight.pop(block=True))
        if self.free:
            return self.free.pop()
        self.allocated += 1
        return mmap.mmap(-1, self.size) if self.aligned else bytearray(self.size)

    def put(self, buf: Any) -> None:
        self.free.append(buf)


#: bytes of chunks (frames, decoded data, read-back buffers) one decode keeps in flight
#: (see Engine.in_flight)
DECODE_BUDGET = 64 << 20


class Hashes:
    """The chunk hashes of one decode, packed into one buffer (for the read-back).

    16 or 32 bytes per chunk instead of a bytes object each (about 65 bytes).
    """

    def __init__(self, algo: str) -> None:
        self.size = hashing.digest_size(algo)
        self.buf = bytearray()

    def append(self, digest: bytes) -> None:
        self.buf += digest

    def __len__(self) -> int:
        return len(self.buf) // self.size

    def __getitem__(self, index: int) -> bytes:
        return bytes(self.buf[index * self.size:(index + 1) * self.size])


# --- worker functions (run in the pool) ------------------------------------------------


def encode_one(
    buf: bytearray, length: int, hash_fn: Callable[[Buffer], bytes], compress: bool, crc: bool,
    known: Callable[[bytes], bool] | None = None,
) -> tuple[bytes, bytes | None, int | None]:
    with memoryview(buf)[:length] as mv:
        digest = hash_fn(mv)
        frame = codec.encode(mv) if compress and not (known and known(digest)) else None
    return digest, frame, (zlib.crc32(frame) if crc and frame is not None else None)


def encode_runs(
    buf: bytearray, length: int, runs: Runs, algo: str, crc: bool,
    known: Callable[[bytes], bool] | None = None,
) -> tuple[bytes, bytes | None, int | None]:
    """Hash and compress a partly-sparse chunk whose bytes outside ``runs`` are zero."""
    with memoryview(buf)[:length] as mv:
        digest = hashing.hash_runs(algo, mv, runs)
        if known and known(digest):
            return digest, None, None
        frame = codec.encode_runs(mv, runs)
    return digest, frame, (zlib.crc32(frame) if crc else None)


class OutputBuffers:
    """Recycled buffers the workers decompress chunks into (thread-safe).

    A buffer is taken by a worker and given back once its chunk is written,
    so there are never more than chunks in flight.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.free: list[bytearray] = []

    def take(self) -> bytearray:
        try:
            return self.free.pop()  # atomic under the GIL
        except IndexError:
            return bytearray(self.size)

    def give(self, buf: bytearray | None) -> None:
        if buf is not None:
            self.free.append(buf)


def decode_one(
    chunk: Chunk, hash_fn: Callable[[Buffer], bytes], zero: bytes, what: str, granule: int,
    outputs: OutputBuffers,
) -> tuple[Buffer, bytes, bool, Runs | None, bytearray | None]:
    """Decompress and check one chunk: (data, hash, all zero, data runs, buffer to give back)."""
    where = f"{what} at offset {chunk.offset}"
    buf: bytearray | None = None
    if chunk.frame is not None:
        if chunk.crc is not None and zlib.crc32(chunk.frame) != chunk.crc:
            raise E.IntegrityError(
                f"cannot read {where}: record checksum mismatch (corrupt data)",
                offset=chunk.offset,
            )
        buf = outputs.take()
        data: Buffer = codec.decode_into(chunk.frame, buf, chunk.length, where)
        chunk.frame = None  # only the decoded bytes wait in flight
        if not isinstance(data, memoryview):  # decoded elsewhere (python-lz4)
            outputs.give(buf)
            buf = None
    elif chunk.data is not None:
        data = chunk.data
    else:
        raise E.ProgrammerError(f"{where}: chunk has neither frame nor data")
    digest = hash_fn(data)
    if chunk.hash is not None and digest != chunk.hash:
        raise E.IntegrityError(
            f"cannot read {where}: chunk hash mismatch (corrupt data): "
            f"calculated {digest.hex()}, should be {chunk.hash.hex()}",
            offset=chunk.offset,
        )
    length = chunk.length
    whole = buf if buf is not None else data  # memcmp-speed tests need the bytearray itself
    zero_chunk = is_zero(whole, length, zero)
    runs = data_runs(whole, granule, length) if granule and not zero_chunk else None
    return data, digest, zero_chunk, runs, buf


def hash_into(buf: Any, length: int, hash_fn: Callable[[Buffer], bytes]) -> bytes:
    with memoryview(buf)[:length] as mv:
        return hash_fn(mv)


# --- reading a target back ------------------------------------------------------------------


class Digests(Protocol):
    """The chunk digests a read-back compares with: a list, or :class:`Hashes`."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> bytes: ...


class ReadBack(Protocol):
    """What :func:`read_back` reads: a target whose writes were made durable."""

    what: str

    def read_into(self, offset: int, mv: memoryview) -> int: ...


def read_back(
    target: ReadBack,
    hashes: Digests,
    chunk_size: int,
    size: int,
    algo: str,
    pool: futures.Executor,
    in_flight: int,
    *,
    aligned: bool = False,
    progress: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
    hint: str = "",
    what: str | None = None,
) -> None:
    """Re-read ``[0, size)`` of ``target`` chunk by chunk and compare each with ``hashes``.

    Read after its caches were dropped (or with ``O_DIRECT``), so what comes
    back is what the device holds.  The reads run here, the hashing in
    ``pool``, ``in_flight`` chunks at a time (``aligned``: page-aligned
    buffers, for ``O_DIRECT``); a chunk recorded as zeros that reads as zeros
    is not hashed.  ``progress(nbytes)`` is told of each verified chunk.  The
    first chunk that differs, or a target that ends early, is an
    :class:`~ganeti_vol.core.errors.IntegrityError` with its ``offset``;
    ``hint`` is added to the mismatch's explanation; ``what`` names the data
    (default: the target's ``what``).
    """
    what = what or target.what
    hash_fn = hashing.hash_function(algo)
    zero_full = zero_bytes(chunk_size)
    buffers = Buffers(chunk_size, in_flight, aligned)
    inflight = InFlight(cancel, f"cannot verify {what}")

    def check(entry: tuple[Any, Any]) -> None:
        (index, length, buf), digest = entry
        if digest != hashes[index]:
            raise E.IntegrityError(
                f"cannot verify {what}: the {length} bytes of the read-back at offset "
                f"{index * chunk_size} differ from what was written (the target's data is "
                f"wrong{hint})", offset=index * chunk_size,
            )
        buffers.put(buf)
        if progress is not None:
            progress(length)

    try:
        for index in range(len(hashes)):
            check_cancel(cancel, f"cannot verify {what}")
            buf = buffers.get(inflight, check)
            offset = index * chunk_size
            length = min(chunk_size, size - offset)
            n = target.read_into(offset, memoryview(buf)[:length])
            if n != length:
                raise E.IntegrityError(
                    f"cannot verify {what}: the read-back ends at offset {offset + n}, before "
                    f"the {size} bytes written", offset=offset + n,
                )
            zh = hashing.zero_hash(algo, length)
            if hashes[index] == zh and is_zero(buf, length, zero_full):
                inflight.add((index, length, buf), None, zh)
            else:
                inflight.add((index, length, buf), pool.submit(hash_into, buf, length, hash_fn))
            while (entry := inflight.pop(block=False)):
                check(entry)
        while (entry := inflight.pop(block=True)):
            check(entry)
    except BaseException:
        inflight.abort()
        raise
