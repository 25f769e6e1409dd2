"""Small stdlib helpers on file descriptors shared by the process runner and the engine."""

from __future__ import annotations

import errno
import fcntl

PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def enlarge_pipe(fd: int, size: int = PIPE_SIZE) -> int:
    """Grow a pipe's buffer to ``size`` (default 1 MiB); the size obtained, 0 if not a pipe.

    A 64 KiB pipe between two vCPUs caps a stream near 0.9 GB/s on this
    machine kind; 1 MiB (the unprivileged maximum) lifts that to ~2.5 GB/s.
    """
    try:
        return fcntl.fcntl(fd, F_SETPIPE_SZ, size)
    except OSError as err:
        if err.errno != errno.EPERM:
            return 0
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            limit = int(f.read())
        return fcntl.fcntl(fd, F_SETPIPE_SZ, min(size, limit))
    except (OSError, ValueError):
        return 0
