"""Hidden work directories next to archives, named after their owner so that a dead owner's can be reclaimed."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from typing import Any

from ganeti_vol.core import atomicfile
from ganeti_vol.core.procs import process_alive, process_start_time

log = logging.getLogger(__name__)

#: kinds of hidden work directories next to archives: a staged export, a replaced
#: archive on its way out, an archive being removed
WORK_KINDS = ("new", "old", "remove")


def _host_id() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def owned_tempdir(parent: str, name: str, kind: str) -> str:
    """A new hidden directory ``.<name>.<kind>-<host>-<pid>-<start>-XXXXXXXX`` in ``parent``.

    Its name records the owner (a hash of the host name, the pid and the
    process start time) at the moment it exists, so a process killed with -9
    leaves a directory that :func:`reclaim_work_dirs` can tell from a live
    one's.  Mode 0700 until published.
    """
    pid = os.getpid()
    start = process_start_time(pid) or 0
    return tempfile.mkdtemp(dir=parent, prefix=f".{name[:100]}.{kind}-{_host_id()}-{pid}-{start}-")


@dataclass(frozen=True)
class WorkDir:
    """A hidden work directory in an export directory, and who owns it."""

    path: str
    kind: str
    #: owner's host id, pid and start time (None: not recorded, e.g. made by an older version)
    host: str | None
    pid: int | None
    start: int | None

    @property
    def owner_alive(self) -> bool | None:
        """True/False for an owner on this host; None if unknown or on another host."""
        if self.pid is None or self.host != _host_id():
            return None
        return process_alive(self.pid, self.start or 0)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "pid": self.pid, "start": self.start,
                "owner_alive": self.owner_alive}


def parse_work_dir(parent: str, entry: str) -> WorkDir | None:
    """The :class:`WorkDir` named ``entry`` in ``parent``, or None if it is not one."""
    if not entry.startswith("."):
        return None
    for kind in WORK_KINDS:
        head, sep, rest = entry.rpartition(f".{kind}-")
        if not sep or not head:
            continue
        parts = rest.split("-")
        if len(parts) == 4 and all(p.isdigit() for p in parts[1:3]):
            return WorkDir(os.path.join(parent, entry), kind, parts[0], int(parts[1]),
                           int(parts[2]))
        if len(parts) == 1:
            return WorkDir(os.path.join(parent, entry), kind, None, None, None)
    return None


def reclaim_work_dirs(export_dir: str, dry_run: bool = False) -> list[WorkDir]:
    """Remove the work directories of dead owners in ``export_dir``; never a live one's,
    another host's, or one whose owner is unknown.  Returns those removed (or that would be)."""
    try:
        entries = os.listdir(export_dir)
    except OSError:
        return []
    out = []
    for entry in sorted(entries):
        work = parse_work_dir(export_dir, entry)
        if work is None or work.owner_alive is not False:
            continue
        if not os.path.isdir(work.path) or os.path.islink(work.path):
            continue
        out.append(work)
        if not dry_run:
            shutil.rmtree(work.path, ignore_errors=True)
            log.info("removed '%s', left by pid %d (no longer running)", work.path, work.pid)
    return out


def publish(staging: str, final: str) -> None:
    """Move ``staging`` to ``final``, replacing an existing archive atomically."""
    parent, name = os.path.split(final)
    atomicfile.replace_dir(staging, final, old_dir=lambda: owned_tempdir(parent, name, "old"))
