"""Locks on instances, disks and export destinations, and the processes that hold them.

Before it touches anything, every operation that writes takes:

- the lock of each instance it changes: ``<state_dir>/locks/instance-<name>.lock``;
- the lock of each disk it writes: a BSD lock (``flock``) on a file disk
  itself, and for a block device on ``/run/ganeti-vol/locks/blockdev-MAJ-MIN.lock``
  (as root; else in the state directory).  A block device is never held open
  by the lock: an open descriptor would keep the kernel from writing back and
  dropping the device's page cache when a script closes it, so what a script
  wrote through the disk would be invisible through its partitions (and the
  other way round).  Neither needs the node's state directory, so ``ganeti-vol
  restore``, started by an import script with a default configuration, sees
  the import's lock; a lock held by one of its own ancestors (the import that
  runs the script) lets it through;
- for an export into a directory, the lock of the destination archive.

Exports take the instance lock too (one operation per instance at a time, as
on a Ganeti node), and a shared lock on each disk they read.  The loser fails
at once with a :class:`~ganeti_vol.core.errors.BusyError` naming the holder: its
pid, its operation and when it started.

A lock file holds its holder's :class:`Owner` record.  The kernel drops a lock
when its holder dies, kill -9 included, so a lock is never stale.  The lock
files a killed holder leaves behind are taken over by the next holder and
removed by ``ganeti-vol cleanup`` (:func:`cleanup`).  A holder removes its file
while it still holds the lock; a taker checks, once it holds a lock, that the
path still names the file it locked, and retries if it does not.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from ganeti_vol.core import atomicfile
from ganeti_vol.core import errors as E
from ganeti_vol.core.procs import (
    ancestors,
    format_time,
    process_alive,
    process_start_time,
    started_at,
)

log = logging.getLogger(__name__)

LOCK_DIR = "locks"
#: the block devices' locks (root only: /run is root's)
BLOCK_LOCK_DIR = "/run/ganeti-vol/locks"
SUFFIX = ".lock"


@dataclass(frozen=True)
class Owner:
    """Who holds a lock or owns an operation: enough to name it and to tell if it still runs."""

    pid: int
    #: process start time in clock ticks (tells a reused pid from the owner)
    start: int
    #: the operation: create, reinstall, rename, import, export, restore
    op: str
    #: what it works on, e.g. "instance 'web1'"
    what: str
    #: when the operation started (epoch seconds)
    started: float
    host: str = ""

    @classmethod
    def current(cls, op: str, what: str) -> Owner:
        pid = os.getpid()
        return cls(pid, process_start_time(pid) or 0, op, what, time.time(), socket.gethostname())

    @property
    def alive(self) -> bool:
        """Still running (only judged on this host: another host's owner counts as alive)."""
        if self.host and self.host != socket.gethostname():
            return True
        return process_alive(self.pid, self.start)

    def describe(self) -> str:
        return f"pid {self.pid} ({self.op} of {self.what}, started {format_time(self.started)})"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Owner | None:
        try:
            return cls(int(data["pid"]), int(data["start"]), str(data["op"]), str(data["what"]),
                       float(data["started"]), str(data.get("host") or ""))
        except (KeyError, TypeError, ValueError):
            return None


def _read_owner(path: str) -> Owner | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        data = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    try:
        return Owner.from_json(json.loads(data))
    except ValueError:
        return None


# --- who holds a lock --------------------------------------------------------------------


def flock_holders(st: os.stat_result) -> list[int]:
    """PIDs holding a BSD lock on the file of ``st`` (from /proc/locks)."""
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == key:
                    pids.append(int(fields[4]))
    except (OSError, ValueError):
        pass
    return pids


def describe_pid(pid: int, lock_dirs: Iterable[str] = ()) -> str:
    """The holder ``pid`` named by its lock record in ``lock_dirs``, else by /proc."""
    start = process_start_time(pid)
    for directory in lock_dirs:
        for owner in _owners_in(directory):
            if owner.pid == pid and owner.start == start:
                return owner.describe()
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        comm = "?"
    when = f", started {format_time(started_at(start))}" if start is not None else ""
    return f"pid {pid} ({comm}{when})"


def _owners_in(directory: str) -> Iterator[Owner]:
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if name.endswith(SUFFIX):
            owner = _read_owner(os.path.join(directory, name))
            if owner is not None:
                yield owner


def _holders_text(st: os.stat_result, recorded: Owner | None, lock_dirs: Iterable[str]) -> str:
    pids = [p for p in flock_holders(st) if p != os.getpid()]
    if recorded is not None and recorded.alive and (not pids or recorded.pid in pids):
        return recorded.describe()
    if not pids:
        return "another process"
    return ", ".join(describe_pid(p, lock_dirs) for p in dict.fromkeys(pids))


# --- lock files and disk locks -----------------------------------------------------------


def lock_dir(state_dir: str) -> str:
    return os.path.join(state_dir, LOCK_DIR)


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:120] or "_"


def block_lock_dir(state_dir: str) -> str:
    """Where block devices' locks live: one place for every ganeti-vol on the node (as root)."""
    return BLOCK_LOCK_DIR if os.geteuid() == 0 else lock_dir(state_dir)


def instance_lock_path(state_dir: str, name: str) -> str:
    return os.path.join(lock_dir(state_dir), f"instance-{safe_name(name)}{SUFFIX}")


def destination_lock_path(state_dir: str, path: str) -> str:
    path = os.path.abspath(path)
    digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:16]
    return os.path.join(lock_dir(state_dir),
                        f"export-{safe_name(os.path.basename(path))}-{digest}{SUFFIX}")


def instance_holder(state_dir: str, name: str) -> str | None:
    """Who holds instance ``name`` now (None if nobody); looks without taking the lock."""
    path = instance_lock_path(state_dir, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not flock_holders(st):
        return None
    return _holders_text(st, _read_owner(path), [lock_dir(state_dir)])


@dataclass
class _Held:
    fd: int
    path: str | None  # the lock file to remove on release (None: a lock on a disk)
    ident: tuple[int, int]


class Locks:
    """The locks of one operation, released (in reverse order) on exit or by :meth:`release`.

    ``owner`` is written into each lock file; ``verb`` starts the BusyError
    message ("cannot import into").
    """

    def __init__(self, state_dir: str, owner: Owner, verb: str) -> None:
        self.state_dir = state_dir
        self.owner = owner
        self.verb = verb
        self._held: list[_Held] = []

    # lock files --------------------------------------------------------------------------

    def instance(self, name: str) -> None:
        """Lock instance ``name`` (exclusively)."""
        self._lock_file(instance_lock_path(self.state_dir, name), f"instance '{name}'")

    def destination(self, path: str) -> None:
        """Lock the export destination ``path`` (an archive directory)."""
        self._lock_file(destination_lock_path(self.state_dir, path), f"'{path}'")

    def _lock_file(self, path: str, what: str) -> None:
        try:
            atomicfile.private_dir(os.path.dirname(path))
        except OSError as err:
            raise E.ConfigError(f"cannot use the lock directory '{os.path.dirname(path)}': "
                                f"{err.strerror or err} (set state_dir in the node config)"
                                ) from err
        for _ in range(100):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as err:
                raise E.BusyError(f"cannot {self.verb} {what}: cannot open its lock "
                                  f"'{path}': {err.strerror or err}") from err
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    raise E.BusyError(f"cannot {self.verb} {what}: its lock '{path}' is not "
                                      "a regular file of ours")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holders_text(st, _read_owner(path), [os.path.dirname(path)])
                    raise E.BusyError(
                        f"cannot {self.verb} {what}: it is in use by {holder}", holder=holder
                    ) from None
                try:
                    now = os.stat(path, follow_symlinks=False)
                except FileNotFoundError:
                    now = None
                if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    os.close(fd)  # its holder removed it as we took it: take the new one
                    continue
                record = json.dumps(self.owner.to_json(), sort_keys=True).encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, record, 0)
            except BaseException:
                os.close(fd)
                raise
            self._held.append(_Held(fd, path, (st.st_dev, st.st_ino)))
            return
        raise E.BusyError(f"cannot {self.verb} {what}: its lock '{path}' keeps changing")

    # disks ---------------------------------------------------------------------------------

    def target(self, path: str, *, shared: bool = False, what: str | None = None,
               allow_ancestors: bool = False) -> bool:
        """Lock the disk ``path`` itself (shared for reading); False if it does not exist.

        With ``allow_ancestors`` a lock held by an ancestor of this process
        (the operation that started it) lets it through unlocked.
        """
        what = what or f"'{path}'"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return False
        except OSError as err:
            raise E.DeviceError(f"cannot {self.verb} {what}: {err.strerror or err}") from err
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                os.close(fd)
                return False  # not a disk: the operation itself refuses it
            if any(h.ident == (st.st_dev, st.st_ino) for h in self._held):
                os.close(fd)
                return True
            ident = (st.st_dev, st.st_ino)
            if stat.S_ISBLK(st.st_mode):  # lock a file named by the device, not the device
                os.close(fd)
                fd = self._block_lock_fd(st.st_rdev, what)
                st = os.fstat(fd)
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                pids = flock_holders(st)
                if allow_ancestors and set(pids) & set(ancestors()):
                    os.close(fd)
                    return True
                holder = _holders_text(st, None, [lock_dir(self.state_dir)])
                raise E.BusyError(f"cannot {self.verb} {what}: it is in use by {holder}",
                                  holder=holder) from None
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        self._held.append(_Held(fd, None, ident))
        return True

    def _block_lock_fd(self, rdev: int, what: str) -> int:
        directory = block_lock_dir(self.state_dir)
        path = os.path.join(directory,
                            f"blockdev-{os.major(rdev)}-{os.minor(rdev)}{SUFFIX}")
        try:
            atomicfile.private_dir(directory)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise E.BusyError(f"cannot {self.verb} {what}: cannot open its lock '{path}': "
                              f"{err.strerror or err}") from err
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise E.BusyError(f"cannot {self.verb} {what}: its lock '{path}' is not a file")
        return fd  # kept (never removed): shared holders may hold it at the same time

    # release -------------------------------------------------------------------------------

    def release(self) -> None:
        while self._held:
            held = self._held.pop()
            if held.path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(held.path)  # still ours: nobody removes a file they do not hold
            with contextlib.suppress(OSError):
                os.close(held.fd)

    def __enter__(self) -> Locks:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# --- cleanup -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StaleLock:
    path: str
    owner: Owner | None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "owner": self.owner.to_json() if self.owner else None}


def cleanup(state_dir: str, dry_run: bool = False) -> list[StaleLock]:
    """Remove the lock files nobody holds (their holders died); never a held one."""
    directory = lock_dir(state_dir)
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    out = []
    for name in names:
        if not name.endswith(SUFFIX):
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue  # held: its owner runs
                raise
            st, now = os.fstat(fd), os.stat(path, follow_symlinks=False)
            if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
                continue
            out.append(StaleLock(path, _read_owner(path)))
            if not dry_run:
                os.unlink(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return out
