"""Holes and zeros: where a file holds no data, and where a buffer is all zero.

The one walk over a file's hole map is :func:`extents` (``lseek`` with
``SEEK_DATA``/``SEEK_HOLE``); :func:`is_hole`, :func:`all_hole` and
:func:`read_data` (a range's bytes, its holes not read) ask it, after
:func:`settle` has made a file's delayed writes show in the map.
A hole reads as zeros by definition; a map that cannot be read makes
everything data, which costs only speed.

The one zero-run scan is :func:`data_runs`: the runs of a buffer that are
not made of zero granules.  Zero tests compare with shared zero buffers
(:func:`zero_bytes`), at memcmp speed.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview
#: [start, end) byte ranges
Runs = list[tuple[int, int]]


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


# --- the hole map of a file ---------------------------------------------------------------


def extents(fd: int, size: int, start: int = 0) -> Iterator[tuple[int, int, bool]]:
    """``(start, end, is_data)`` ranges covering ``[start, size)`` from SEEK_DATA/SEEK_HOLE.

    Where the map is not available (block devices, some filesystems)
    everything is one data range.  A hole reads as zeros by definition.
    """
    offset = start
    while offset < size:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # nothing but a hole up to the end
                yield offset, size, False
                return
            yield offset, size, True  # no hole map: all data
            return
        data = min(data, size)
        if data > offset:
            yield offset, data, False
        if data == size:  # the range ends in that hole (the data is beyond it)
            return
        try:
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        except OSError:
            hole = size
        if hole <= data:  # cannot happen on a sane filesystem: treat the rest as data
            hole = size
        yield data, hole, True
        offset = hole


def is_hole(fd: int, offset: int, length: int) -> bool:
    """True if ``[offset, offset + length)`` of a file holds no data (it reads as zeros)."""
    for _, end, is_data in extents(fd, offset + length, offset):
        return not is_data and end == offset + length
    return True


def read_data(fd: int, offset: int, length: int, *, sparse: bool) -> bytes | bytearray | None:
    """The bytes at ``[offset, offset + length)`` (fewer at the end of the file), or None if
    that range of a ``sparse`` (regular) file is one hole.

    Of a sparse file only the data extents are read and the rest is zeros:
    reading a hole makes the kernel fill a page cache page with zeros and
    copy it, which costs more than anything done with the bytes afterwards.
    """
    if not sparse:
        return os.pread(fd, length, offset)
    length = max(0, min(length, os.fstat(fd).st_size - offset))
    runs = [(a - offset, b - offset) for a, b, is_data in extents(fd, offset + length, offset)
            if is_data]
    if not runs:
        return None if length else b""
    if runs == [(0, length)]:
        return os.pread(fd, length, offset)
    buf = bytearray(length)
    view = memoryview(buf)
    for a, b in runs:
        if os.preadv(fd, [view[a:b]], offset + a) < b - a:  # the file shrank meanwhile
            return os.pread(fd, length, offset)
    return buf


def settle(fd: int, what: str = "the file") -> bool:
    """fsync a file before its hole map is read, so that delayed allocation cannot make
    dirty data look like a hole; False if the fsync failed (the map may then be wrong)."""
    try:
        os.fsync(fd)
    except OSError as err:
        log.debug("cannot fsync %s before mapping its holes: %s", what, err)
        return False
    return True


def all_hole(fd: int, *, sync: bool = False) -> bool:
    """True if a regular file has no data at all (a fresh sparse file reads as zeros).

    ``sync``: :func:`settle` it first (a failed fsync: not known to be a hole).
    """
    if sync and not settle(fd):
        return False
    return is_hole(fd, 0, os.fstat(fd).st_size)


# --- zeros in a buffer --------------------------------------------------------------------


def is_zero(buf: Any, length: int, zero_full: bytes) -> bool:
    """memcmp-speed zero test of the first ``length`` bytes of a bytearray or mmap buffer.

    ``zero_full`` is :func:`zero_bytes` of the buffer's usual length: a whole
    buffer is compared with it without slicing.
    """
    if not length or buf[0] != 0:
        return not length
    if length == len(zero_full) == len(buf) and isinstance(buf, (bytes, bytearray)):
        return bool(buf == zero_full)
    return bool(buf[:length] == zero_bytes(length))


def runs_are_zero(buf: Any, runs: Runs) -> bool:
    """True if every ``[start, end)`` run of ``buf`` is zero."""
    if any(buf[start] for start, _ in runs):  # the usual case: data at once
        return False
    return all(buf[start:end] == zero_bytes(end - start) for start, end in runs)


def data_runs(data: Any, granule: int, size: int | None = None) -> Runs | None:
    """The [start, end) runs of ``data[:size]`` not made of zero granules; None: no zero granule.

    A granule whose first or last byte is not zero is data at once, so text
    and random data cost a byte test or two per granule; only zero-looking
    granules are compared (a copy and a memcmp).
    """
    size = len(data) if size is None else size
    runs: Runs = []
    start: int | None = None
    found = False
    for a in range(0, size, granule):
        b = min(a + granule, size)
        if data[a] == 0 and data[b - 1] == 0 and data[a:b] == zero_bytes(b - a):
            found = True
            if start is not None:
                runs.append((start, a))
                start = None
        elif start is None:
            start = a
    if not found:
        return None
    if start is not None:
        runs.append((start, size))
    return runs
