"""Processes by identity: a pid and its start time, so a reused pid is never taken for the owner.

Records of what a process holds (locks, loop devices, snapshots, temporary
files, script cgroups) carry both; :func:`process_alive` tells whether that
process still runs.  Everything comes from ``/proc``.
"""

from __future__ import annotations

import os
import time


def _stat_fields(pid: int) -> list[bytes] | None:
    """Fields of /proc/PID/stat after the command name (state is [0]), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    """A process's start time in clock ticks (field 22 of /proc/PID/stat), or None if gone."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def process_alive(pid: int, start_time: int) -> bool:
    """True if ``pid`` still runs and is the same process (not a reused pid)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in (b"Z", b"X") and int(fields[19]) == start_time


def parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def ancestors(pid: int | None = None) -> list[int]:
    """The parent, grandparent, ... of ``pid`` (default: this process), up to init."""
    out: list[int] = []
    current = parent_pid(pid or os.getpid())
    while current and current not in out:
        out.append(current)
        current = parent_pid(current)
    return out


def _boot_time() -> float:
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def started_at(start_ticks: int) -> float:
    """Wall-clock time (epoch seconds) of a process start time in clock ticks."""
    return _boot_time() + start_ticks / os.sysconf("SC_CLK_TCK")


def format_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def proc_table() -> dict[int, tuple[int, int, int]]:
    """{pid: (ppid, pgid, sid)} of every live (not zombie) process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields: state ppid pgrp session ...
        if fields[0] not in (b"Z", b"X"):
            table[int(entry)] = (int(fields[1]), int(fields[2]), int(fields[3]))
    return table
