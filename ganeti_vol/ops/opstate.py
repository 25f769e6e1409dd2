"""What an operation leaves behind if it dies: its locks, and a durable "in progress" mark.

Every operation that writes an instance's disks (create, reinstall, rename,
import) runs inside :func:`operation`:

1. it takes the locks (:mod:`ganeti_vol.system.locks`): the instance, each disk;
2. just before the first write, :meth:`Operation.begin_writes` records
   ``<state_dir>/instances/<name>.json`` = "<op> in progress" (pid, start
   time, disks, source), fsynced with its directory;
3. on success the mark is removed; on failure it becomes "failed" with the
   error.  A process killed with -9 leaves "in progress" with a dead pid.

:func:`instance_status` reads the mark: an instance whose last writing
operation did not complete is **broken** until one completes (a rerun of the
import proceeds and clears it).  ``ganeti-vol instance status`` shows it,
``import`` says what it repaired and ``export`` refuses a broken instance
unless forced.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ganeti_vol.core import atomicfile
from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Instance
from ganeti_vol.core.procs import format_time
from ganeti_vol.system import locks, process

log = logging.getLogger(__name__)

MARK_DIR = "instances"
IN_PROGRESS = "in progress"
FAILED = "failed"


def mark_path(state_dir: str, name: str) -> str:
    return os.path.join(state_dir, MARK_DIR, f"{locks.safe_name(name)}.json")


def read_mark(state_dir: str, name: str) -> dict[str, Any] | None:
    """The mark of instance ``name`` (None if its last writing operation completed)."""
    path = mark_path(state_dir, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as err:
        return {"state": FAILED, "error": f"cannot read '{path}': {err.strerror or err}"}
    try:
        with os.fdopen(fd, "rb") as f:
            data = json.loads(f.read(1 << 20))
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except ValueError as err:
        return {"state": FAILED, "error": f"unreadable mark '{path}': {err}"}
    return data


def _write_mark(state_dir: str, name: str, mark: dict[str, Any]) -> None:
    path = mark_path(state_dir, name)
    try:
        atomicfile.private_dir(os.path.dirname(path))
        atomicfile.replace(path, (json.dumps(mark, indent=1, sort_keys=True) + "\n").encode())
    except OSError as err:
        raise E.ConfigError(f"cannot record the state of instance '{name}' in '{path}': "
                            f"{err.strerror or err} (set state_dir in the node config)") from err


def _remove_mark(state_dir: str, name: str) -> None:
    path = mark_path(state_dir, name)
    try:
        os.unlink(path)
        atomicfile.fsync_dir(os.path.dirname(path))
    except FileNotFoundError:
        pass
    except OSError as err:
        log.warning("cannot remove '%s': %s", path, err.strerror or err)


def describe_mark(mark: dict[str, Any]) -> str:
    """One line: why the instance is broken, or what runs on it."""
    op = mark.get("op", "operation")
    who = f" by pid {mark['pid']}" if mark.get("pid") else ""
    when = f", started {format_time(mark['started'])}" if mark.get("started") else ""
    source = f" from '{mark['source']}'" if mark.get("source") else ""
    if mark.get("state") == IN_PROGRESS:
        if _mark_owner_alive(mark):
            return f"{op}{source} running{who}{when}"
        return f"{op}{source}{who}{when} did not complete (the process died)"
    error = str(mark.get("error") or "unknown error").splitlines()[0]
    return f"{op}{source}{who}{when} failed: {error}"


def _mark_owner_alive(mark: dict[str, Any]) -> bool:
    owner = locks.Owner.from_json({**mark, "what": "", "op": mark.get("op", "")})
    return owner is not None and owner.alive


@dataclass
class Operation:
    """Handle of a running :func:`operation`."""

    state_dir: str
    instance: Instance
    owner: locks.Owner
    held: locks.Locks
    source: str | None = None
    #: the mark found when the operation started (a previous one that did not complete)
    previous: dict[str, Any] | None = None
    writing: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def lock_target(self, path: str, what: str | None = None) -> None:
        """Lock a disk created after the operation started."""
        self.held.target(path, what=what)

    def begin_writes(self) -> None:
        """Record durably that the disks are about to change (call before the first write)."""
        with self._lock:
            if not self.writing:
                self._begin_writes()

    def _begin_writes(self) -> None:
        mark = {
            **self.owner.to_json(),
            "instance": self.instance.name,
            "state": IN_PROGRESS,
            "disks": [{"index": i, "path": d.path} for i, d in enumerate(self.instance.disks)],
            "source": self.source,
            "error": None,
        }
        mark.pop("what", None)
        _write_mark(self.state_dir, self.instance.name, mark)
        self.writing = True

    def _end(self, error: BaseException | None) -> None:
        if not self.writing:
            return
        if error is None:
            _remove_mark(self.state_dir, self.instance.name)
            return
        mark = read_mark(self.state_dir, self.instance.name) or {}
        mark.update(state=FAILED, error=str(error) or type(error).__name__)
        try:
            _write_mark(self.state_dir, self.instance.name, mark)
        except E.GanetiVolError as err:
            log.error("%s", err)


def _verb(op: str) -> str:
    return {"import": "import into", "export": "export", "restore": "restore into"}.get(op, op)


@contextlib.contextmanager
def operation(
    state_dir: str,
    op: str,
    instance: Instance,
    *,
    also: Sequence[str] = (),
    source: str | None = None,
    read_only: bool = False,
    destination: str | None = None,
) -> Iterator[Operation]:
    """Lock ``instance`` (and the instance names in ``also``), its existing disks
    (shared if ``read_only``) and ``destination``; mark and unmark (see the module doc).

    A read-only operation (export) never marks the instance.
    """
    owner = locks.Owner.current(op, f"instance '{instance.name}'"
                                + (f" to '{destination}'" if destination else ""))
    verb = _verb(op)
    with locks.Locks(state_dir, owner, verb) as held:
        if destination is not None:
            held.destination(destination)
        for name in dict.fromkeys((instance.name, *also)):
            held.instance(name)
        for i, disk in enumerate(instance.disks):
            if disk.path:
                held.target(disk.path, shared=read_only,
                            what=f"disk {i} of instance '{instance.name}' ('{disk.path}')")
        handle = Operation(state_dir, instance, owner, held, source,
                           previous=read_mark(state_dir, instance.name))
        if not read_only and handle.previous is not None:
            _reap(handle.previous)
        try:
            yield handle
        except BaseException as err:
            handle._end(err)
            raise
        handle._end(None)


def _reap(mark: dict[str, Any]) -> list[int]:
    """Kill what the scripts of a killed operation left running (see process.reap_orphans)."""
    if mark.get("state") != IN_PROGRESS or _mark_owner_alive(mark):
        return []
    try:
        return process.reap_orphans(int(mark["pid"]), int(mark["start"]))
    except (KeyError, TypeError, ValueError):
        return []


def reap_killed_operations(state_dir: str, dry_run: bool = False) -> list[dict[str, Any]]:
    """For ``cleanup``: the operations killed while in progress, each with the pids its
    scripts left running (killed unless ``dry_run``).  Their instances stay broken."""
    try:
        names = sorted(os.listdir(os.path.join(state_dir, MARK_DIR)))
    except OSError:
        return []
    out = []
    for name in names:
        if not name.endswith(".json"):
            continue
        mark = read_mark(state_dir, name[: -len(".json")])
        if mark is None or mark.get("state") != IN_PROGRESS or _mark_owner_alive(mark):
            continue
        killed = [] if dry_run else _reap(mark)
        out.append({"instance": mark.get("instance"), "op": mark.get("op"),
                    "pid": mark.get("pid"), "killed": killed})
    return out


# --- status --------------------------------------------------------------------------------


def _broken(mark: dict[str, Any] | None) -> bool:
    return mark is not None and not (mark.get("state") == IN_PROGRESS and _mark_owner_alive(mark))


def instance_status(state_dir: str, instance: Instance) -> dict[str, Any]:
    """``ok``, ``busy`` (an operation holds the instance) or ``broken`` (see the module doc)."""
    mark = read_mark(state_dir, instance.name)
    holder = locks.instance_holder(state_dir, instance.name)
    out: dict[str, Any] = {"instance": instance.name, "state": "ok", "operation": mark,
                           "holder": holder, "reason": None}
    if _broken(mark):
        assert mark is not None
        out["state"] = "broken"
        out["reason"] = describe_mark(mark)
        out["broken_disks"] = [d.get("index") for d in mark.get("disks") or []]
    elif holder is not None:
        out["state"] = "busy"
        out["reason"] = f"in use by {holder}"
    elif mark is not None:
        out["state"] = "busy"
        out["reason"] = describe_mark(mark)
    return out


def check_not_broken(state_dir: str, instance: Instance, verb: str) -> None:
    """Refuse to read a broken instance's disks as if they were good (DeviceError)."""
    mark = read_mark(state_dir, instance.name)
    if _broken(mark):
        assert mark is not None
        raise E.DeviceError(
            f"cannot {verb} instance '{instance.name}': it is broken ({describe_mark(mark)}); "
            "run the operation again, or use --force to proceed anyway"
        )
