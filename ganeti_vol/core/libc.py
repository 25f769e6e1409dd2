"""The C library calls Python does not offer: the one module that uses :mod:`ctypes` on libc.

Each call is bound once (argument types set on the shared handle) and reports
failure the way its callers need: as ``OSError`` or as False.  Nothing here
is specific to ganeti-vol's data; the callers decide what a failure means.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import mmap
import os
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: the largest pipe an unprivileged process may ask for; also the zero mapping's size
PIPE_SIZE = 1 << 20

SPLICE_F_NONBLOCK = 0x02
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
#: sync_file_range(2) flags
SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4
#: wait for writeback in flight, start it for every dirty page, wait again
SYNC_FILE_RANGE_ALL = 1 | 2 | 4
RENAME_EXCHANGE = 2
AT_FDCWD = -100
PR_SET_PDEATHSIG = 1
#: glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


@functools.lru_cache(maxsize=1)
def libc() -> ctypes.CDLL:
    """The C library, through the process's own symbols.

    ``ctypes.util.find_library("c")`` runs ``ldconfig -p`` (~3 ms per call);
    ``dlopen(NULL)`` finds the libc the interpreter is linked with for free.
    """
    return ctypes.CDLL(None, use_errno=True)


#: argument and result types of the functions bound here (a symbol's types are set once)
_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "vmsplice": ([ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint],
                 ctypes.c_ssize_t),
    "fallocate": ([ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64], ctypes.c_int),
    "sync_file_range": ([ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint],
                        ctypes.c_int),
    "renameat2": ([ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint],
                  ctypes.c_int),
    "prctl": ([ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong],
              ctypes.c_int),
    "mallopt": ([ctypes.c_int, ctypes.c_int], ctypes.c_int),
    "malloc_trim": ([ctypes.c_size_t], ctypes.c_int),
}


@functools.lru_cache(maxsize=None)
def function(name: str) -> Any:
    """libc's ``name`` with its types set; AttributeError where this libc lacks it."""
    fn = getattr(libc(), name)
    fn.argtypes, fn.restype = _SIGNATURES[name]
    return fn


def _symbol(name: str) -> Any:
    """:func:`function` ``name``, or None where this libc lacks it (not glibc)."""
    try:
        return function(name)
    except (OSError, AttributeError) as err:
        log.debug("%s not available: %s", name, err)
        return None


def _raise_errno() -> None:
    code = ctypes.get_errno()
    raise OSError(code, os.strerror(code))


# --- zeros into a pipe by reference ------------------------------------------------------


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_zero_lock = threading.Lock()
_zero_state: tuple[mmap.mmap, int] | None = None


def _zero_address() -> int:
    """The address of a PIPE_SIZE mapping that is never written (its pages stay the zero page)."""
    global _zero_state
    with _zero_lock:
        if _zero_state is None:
            zeros = mmap.mmap(-1, PIPE_SIZE)
            _zero_state = (zeros, ctypes.addressof(ctypes.c_char.from_buffer(zeros)))
        return _zero_state[1]


def vmsplice_zeros(fd: int, length: int, nonblock: bool = False) -> int:
    """Queue up to ``length`` (at most PIPE_SIZE) zero bytes into pipe ``fd`` without copying.

    The pipe references pages of a mapping that is never written, so the
    reader gets zeros and nothing is copied on this side.  Returns the bytes
    queued; raises OSError as write(2) would (EAGAIN with ``nonblock`` when
    the pipe is full, EPIPE when the reader is gone, others where vmsplice
    is unavailable).  EINTR is retried (a signal handler runs first).
    """
    fn = function("vmsplice")
    iov = _IOVec(_zero_address(), min(length, PIPE_SIZE))
    flags = SPLICE_F_NONBLOCK if nonblock else 0
    while True:
        n = fn(fd, ctypes.byref(iov), 1, flags)
        if n >= 0:
            return int(n)
        if ctypes.get_errno() != errno.EINTR:
            _raise_errno()


# --- files --------------------------------------------------------------------------------


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """``fallocate(PUNCH_HOLE|KEEP_SIZE)``: the range reads as zeros; False if refused."""
    if function("fallocate")(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    log.debug("punching a hole failed (%s): writing zeros", os.strerror(ctypes.get_errno()))
    return False


def sync_file_range(fd: int, offset: int = 0, nbytes: int = 0,
                    flags: int = SYNC_FILE_RANGE_ALL) -> None:
    """``sync_file_range(2)`` (``nbytes`` 0: to the end of the file); OSError on failure."""
    if function("sync_file_range")(fd, offset, nbytes, flags) != 0:
        _raise_errno()


def renameat2_exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    fn = _symbol("renameat2")
    if fn is None:
        return False
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


# --- processes ----------------------------------------------------------------------------


def pdeathsig(signum: int) -> Callable[[], None]:
    """A function that makes the calling process get ``signum`` when its parent dies
    (``prctl(PR_SET_PDEATHSIG)``); resolved now, so a child can call it between fork and
    exec without loading anything."""
    prctl = function("prctl")

    def set_pdeathsig() -> None:
        prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)

    return set_pdeathsig


# --- malloc -------------------------------------------------------------------------------


def mallopt(param: int, value: int) -> bool:
    """glibc ``mallopt``; True if applied (False where this libc has none)."""
    fn = _symbol("mallopt")
    if fn is None:
        return False
    return bool(fn(param, value) == 1)


def malloc_trim() -> None:
    """glibc ``malloc_trim(0)``: give freed heap memory back to the system now."""
    fn = _symbol("malloc_trim")
    if fn is not None:
        fn(0)
