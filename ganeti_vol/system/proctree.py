"""What a child script started: its process tree and, where cgroup v2 works, its cgroup.

Every child runs in its own session and process group and, where cgroup v2
can be used, its own cgroup (:class:`Cgroup`); what a killed ganeti-vol's
scripts left running is found and killed here (:func:`reap_orphans`).
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import signal
import threading
import time
from typing import Any

from ganeti_vol.core import errors as E
from ganeti_vol.core import libc
from ganeti_vol.core.procs import proc_table, process_alive, process_start_time

log = logging.getLogger(__name__)


# --- child processes -----------------------------------------------------------


def live_group_members(pgid: int) -> list[int]:
    """PIDs of the processes in process group ``pgid`` that are not zombies."""
    return sorted(pid for pid, (_, group, _) in proc_table().items() if group == pgid)


def descendants(pid: int, *, alive: bool = True) -> list[int]:
    """The live processes of a child started in its own session: its process group, its
    session and (while it is ``alive``, not yet reaped) itself and all its descendants,
    those that called setsid included."""
    table = proc_table()
    found = {p for p, (_, group, sid) in table.items() if pid in (group, sid)}
    if alive and pid in table:
        found.add(pid)
    children: dict[int, list[int]] = {}
    for p, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(p)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return sorted(found)


# --- one cgroup per script, where cgroup v2 can be used -----------------------------

CGROUP_PREFIX = "ganeti-vol-"


def _own_cgroup_dir() -> str | None:
    """The cgroup v2 directory this process is in, if cgroup v2 is mounted."""
    try:
        with open("/proc/self/cgroup") as f:
            rel = next((line.split("::", 1)[1].strip() for line in f
                        if line.startswith("0::")), None)
        with open("/proc/self/mountinfo") as f:
            mount = next((line.split()[4] for line in f
                          if " - cgroup2 " in line), None)
    except OSError:
        return None
    if rel is None or mount is None:
        return None
    return os.path.join(mount, rel.lstrip("/"))


class Cgroup:
    """A cgroup v2 holding one script and everything it starts, setsid or double fork
    included: ``cgroup.kill`` stops them all.  :meth:`create` returns None where
    cgroup v2 cannot be used (not mounted, not ours to write, too old a kernel):
    then the process tree is walked instead (:func:`descendants`)."""

    _seq = 0
    _seq_lock = threading.Lock()
    #: False once creating one failed: do not try again in this process
    usable: bool | None = None

    def __init__(self, path: str, enter_fd: int | None) -> None:
        self.path = path
        self._enter_fd = enter_fd

    @classmethod
    def create(cls) -> Cgroup | None:
        if cls.usable is False or os.environ.get("GANETI_VOL_NO_CGROUP"):
            return None
        parent = _own_cgroup_dir()
        if parent is None or not os.path.exists(os.path.join(parent, "cgroup.procs")):
            cls.usable = False
            return None
        with cls._seq_lock:
            cls._seq += 1
            seq = cls._seq
        pid = os.getpid()
        path = os.path.join(parent, f"{CGROUP_PREFIX}{pid}-{process_start_time(pid)}-{seq}")
        try:
            os.mkdir(path)
        except OSError as err:
            log.debug("no cgroup for scripts (%s): walking the process tree instead", err)
            cls.usable = False
            return None
        try:
            if not os.path.exists(os.path.join(path, "cgroup.kill")):  # Linux < 5.14
                raise OSError(errno.ENOSYS, "no cgroup.kill")
            fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            os.rmdir(path)
            cls.usable = False
            return None
        if cls.usable is None:  # first one: at exit, remove those left empty by then
            atexit.register(_remove_own_cgroups)
        cls.usable = True
        return cls(path, fd)

    def enter(self) -> None:
        """Run in the child between fork and exec: move it into the cgroup."""
        try:
            os.write(self._enter_fd, b"0")  # type: ignore[arg-type]
        except OSError:
            pass  # not allowed here: the tree walk still finds it

    def close_enter_fd(self) -> None:
        if self._enter_fd is not None:
            os.close(self._enter_fd)
            self._enter_fd = None

    def members(self) -> list[int]:
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                return [int(line) for line in f if line.strip()]
        except (OSError, ValueError):
            return []

    def kill(self) -> None:
        try:
            with open(os.path.join(self.path, "cgroup.kill"), "w") as f:
                f.write("1")
        except OSError as err:
            log.debug("cannot kill cgroup '%s': %s", self.path, err)

    def remove(self) -> bool:
        """Remove the cgroup if it is empty; True if gone."""
        self.close_enter_fd()
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True


def child_setup(group: Cgroup | None) -> Any:
    """What the child runs between fork and exec: join its cgroup, and die with us.

    ``PR_SET_PDEATHSIG``: if ganeti-vol dies, even by SIGKILL, the script gets
    SIGKILL (a stream script would otherwise read EOF or write into a pipe
    nobody reads, and an import script could still be writing the disk when
    the import is run again).  Everything here is resolved before the fork.
    """
    die_with_parent = libc.pdeathsig(signal.SIGKILL)
    parent = os.getpid()

    def setup() -> None:
        if group is not None:
            group.enter()
        die_with_parent()
        if os.getppid() != parent:  # we died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return setup


def _owned_cgroups(pid: int | None = None, start: int | None = None) -> list[tuple[str, int, int]]:
    """(path, owner pid, owner start) of the script cgroups beside this process's
    (only those of owner ``pid``/``start`` if given)."""
    parent = _own_cgroup_dir()
    try:
        names = os.listdir(parent) if parent is not None else []
    except OSError:
        return []
    out = []
    for name in sorted(names):
        parts = name[len(CGROUP_PREFIX):].split("-") if name.startswith(CGROUP_PREFIX) else []
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            continue
        owner, owner_start = int(parts[0]), int(parts[1])
        if pid is None or (owner, owner_start) == (pid, start):
            out.append((os.path.join(str(parent), name), owner, owner_start))
    return out


def _remove_own_cgroups() -> None:
    """At exit: remove this process's script cgroups that are empty (a script that left
    a process running keeps its own until that ends; then ``cleanup`` removes it)."""
    for path, _, _ in _owned_cgroups(os.getpid(), process_start_time(os.getpid())):
        Cgroup(path, None).remove()


def reap_orphans(pid: int, start: int, wait: float = 5.0) -> list[int]:
    """Kill what the scripts of the dead ganeti-vol process ``pid`` (started at
    ``start``) left running and remove their cgroups; returns the pids killed.

    Run before an operation writes the disks a killed one was writing: a
    leftover ``dd`` of the killed import must not write after the rerun began.
    Only where scripts ran in cgroups; elsewhere PDEATHSIG killed the scripts
    themselves, and what they started is not found.
    """
    if process_alive(pid, start):
        raise E.ProgrammerError(f"pid {pid} still runs: its scripts are not orphans")
    killed: list[int] = []
    for path, _, _ in _owned_cgroups(pid, start):
        group = Cgroup(path, None)
        members = group.members()
        if members:
            log.warning("killing %d process(es) left by the killed ganeti-vol pid %d: %s",
                        len(members), pid, ", ".join(map(str, members)))
            killed += members
            group.kill()
            deadline = time.monotonic() + wait
            while group.members() and time.monotonic() < deadline:
                time.sleep(0.02)
        group.remove()
    return killed


def cleanup_cgroups(dry_run: bool = False) -> list[str]:
    """Remove the empty script cgroups (beside this process's) that dead ganeti-vol
    processes left; never one that still holds a process."""
    removed = []
    for path, pid, start in _owned_cgroups():
        if process_alive(pid, start) or Cgroup(path, None).members():
            continue
        if dry_run or Cgroup(path, None).remove():
            removed.append(path)
    return removed
