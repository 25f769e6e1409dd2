"""What raw dump and restore share: the EXP_SIZE_FD protocol, the copy summary, disk checks."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import close_fd, open_readonly, write_all
from ganeti_vol.core.holes import all_hole

log = logging.getLogger(__name__)

#: bytes per read/write; also the O_DIRECT write size
CHUNK = 4 << 20
EXP_SIZE_FD = "EXP_SIZE_FD"


@dataclass
class CopySummary:
    """What a dump, restore or image copy did (sizes in bytes)."""

    what: str
    size: int = 0
    #: bytes moved as data
    data_bytes: int = 0
    #: bytes of holes or zero runs: not read (dump) or not written as data (restore)
    zero_bytes: int = 0
    seconds: float = 0.0
    #: restore: the zero runs were skipped because the target reads as zeros
    known_zero: bool = False
    #: the size announced on EXP_SIZE_FD, if any
    announced: int | None = None
    #: restore: everything written was read back from the target and matched
    verified: bool = False
    #: restore: seconds of the read-back (part of ``seconds``)
    verify_seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.size / self.seconds / 1e6 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mb_per_s"] = round(self.mb_per_s, 1)
        return out

    def describe(self, verb: str) -> str:
        text = (
            f"{verb} {self.what}: {self.size} bytes ({self.data_bytes} data, "
            f"{self.zero_bytes} zeros) in {self.seconds:.2f}s ({self.mb_per_s:.0f} MB/s)"
        )
        if self.verified:
            text += f", read back and verified in {self.verify_seconds:.2f}s"
        return text


# --- sizes and EXP_SIZE_FD ---------------------------------------------------------------


def size_fd_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """The fd number in ``EXP_SIZE_FD``, or None when it is not set (or empty)."""
    value = (os.environ if environ is None else environ).get(EXP_SIZE_FD, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise E.UsageError(f"{EXP_SIZE_FD}='{value}' is not a file descriptor number")
    return int(value)


def announce_size(size: int, fd: int, *, close: bool = True) -> None:
    """Write ``size`` and a newline to ``fd`` (Ganeti's ``EXP_SIZE_FD`` protocol).

    Any fd number works here (shells need bash for fds above 9; Python does
    not).  The fd is closed afterwards unless ``close`` is False, so a
    reader waiting for EOF is not kept waiting.
    """
    line = b"%d\n" % size
    try:
        write_all(fd, line, None, f"{EXP_SIZE_FD}={fd}")
    except E.StreamError as err:
        raise E.UsageError(
            f"cannot announce the size on {EXP_SIZE_FD}={fd}: {_cause(err)} "
            "(the fd must be open for writing in this process)"
        ) from err
    finally:
        if close:
            close_fd(fd)
    log.debug("announced %d bytes on %s=%d", size, EXP_SIZE_FD, fd)


def _cause(err: BaseException) -> str:
    return str(err).rsplit(": ", 1)[-1]


# --- disks -------------------------------------------------------------------------------


def is_all_hole_path(path: str) -> bool:
    """True if ``path`` is a regular file without any data (reads as zeros)."""
    fd = open_readonly(path)
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and all_hole(fd)
    finally:
        os.close(fd)


def sync_path(path: str) -> None:
    """fsync a disk written by another program (e.g. qemu-img)."""
    fd = open_readonly(path)
    try:
        os.fsync(fd)
    except OSError as err:
        raise E.DeviceError(f"cannot flush '{path}': {err.strerror}") from err
    finally:
        os.close(fd)
