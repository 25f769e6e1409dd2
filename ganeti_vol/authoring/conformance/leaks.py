"""What a conformance step may leave behind, and the checks that find it (and clean it up)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ganeti_vol.authoring.conformance.disks import unmount
from ganeti_vol.authoring.conformance.report import FAIL, WARN, Step
from ganeti_vol.core import errors as E
from ganeti_vol.ops import operations
from ganeti_vol.system import devices, loopleftovers, proctree, scriptlog

log = logging.getLogger(__name__)


# --- what a step may leave behind ------------------------------------------------------------


@dataclass(frozen=True)
class State:
    """Loop devices, partitions, mounts and temp entries at one moment."""

    devs: loopleftovers.LoopState
    mounts: frozenset[devices.Mount]
    temp: frozenset[str]


def snapshot(temp_dirs: Sequence[str]) -> State:
    temp: set[str] = set()
    for top in temp_dirs:
        with contextlib.suppress(OSError):
            temp.update(os.path.join(top, name) for name in os.listdir(top))
    return State(loopleftovers.loop_state(), frozenset(devices.read_mounts()), frozenset(temp))


def devnum(path: str) -> str | None:
    try:
        rdev = os.stat(path).st_rdev
    except OSError:
        return None
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def kill_group(pgid: int, timeout: float = 3.0) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while proctree.live_group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)


def not_in_use(paths: Sequence[str], mounts: frozenset[devices.Mount]) -> list[str]:
    """The paths no live process uses (cwd, root, open file) and nothing is mounted on.

    New temp entries that another process on the machine is still using are
    not the finished script's leftovers.
    """
    if not paths:
        return []
    used = {m.mount_point for m in mounts}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        links = [f"/proc/{pid}/cwd", f"/proc/{pid}/root"]
        with contextlib.suppress(OSError):
            links += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
        for link in links:
            with contextlib.suppress(OSError):
                used.add(os.readlink(link))
    return [p for p in paths
            if not any(u == p or u.startswith(p + os.sep) for u in used)]


def few(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def first_line(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read(4096)
    lines = data.decode("utf-8", "replace").strip().splitlines()
    return lines[0][:80] if lines else ""


class LeakCheck:
    """What a step may not leave behind: stdout outside export, changed disk sizes,
    processes, loop devices, partitions, mounts and temporary files."""

    def __init__(self, os_dir: str, real_work: str, temp_dirs: Sequence[str],
                 attached: set[str], disk_files: list[str]) -> None:
        self.os_dir, self.real_work, self.temp_dirs = os_dir, real_work, tuple(temp_dirs)
        #: the runner's own loop devices and scratch disk files (shared, kept up to date)
        self.attached, self.disk_files = attached, disk_files

    def after(self, step: Step, seen: scriptlog.Watch | None, before: State,
              sizes: Mapping[str, int | None]) -> None:
        """Check what the step left behind (each check runs even if another failed)."""
        scripts = seen.scripts if seen is not None else []
        checks: tuple[Callable[[], None], ...] = (
            lambda: self._check_stdout(step, scripts),
            lambda: self._check_sizes(step, sizes),
            lambda: self._check_processes(step, scripts),
            lambda: self._check_devices(step, before, snapshot(self.temp_dirs)),
        )
        for check in checks:
            try:
                check()
            except (E.GanetiVolError, OSError) as err:  # the next checks must still run
                step.add("checks", FAIL, f"cannot check what the step left behind: {err}")

    def _own_script(self, script: scriptlog.WatchedScript) -> bool:
        return script.argv[0].startswith(self.os_dir + os.sep)

    def _check_stdout(self, step: Step, scripts: Sequence[scriptlog.WatchedScript]) -> None:
        if step.name == "help":
            return  # usage on stdout is what --help is for
        for script in scripts:
            if script.stdout_path is None or not self._own_script(script):
                continue
            size = os.path.getsize(script.stdout_path)
            if size:
                step.add("stdout", WARN,
                         f"{script.op} wrote {size} bytes to stdout "
                         f"('{first_line(script.stdout_path)}'); only export's stdout is data")

    def _check_sizes(self, step: Step, sizes: Mapping[str, int | None]) -> None:
        for path, how in operations.size_changes(sizes):
            step.add("disk size", FAIL, f"'{path}' was {how}")

    def _check_processes(self, step: Step, scripts: Sequence[scriptlog.WatchedScript]) -> None:
        for script in scripts:
            members = proctree.live_group_members(script.pid)
            if not members:
                continue
            names = [f"pid {pid} ({comm(pid)})" for pid in members]
            kill_group(script.pid)
            step.add("processes", FAIL,
                     f"{script.op} script left {len(names)} process(es) running in its process "
                     f"group: {few(names)}; killed")

    def ours(self, backing: str | None) -> bool:
        """True for a backing file in the work dir or one of our own loop devices."""
        if not backing:
            return False
        real = os.path.realpath(backing)
        return real.startswith(self.real_work + os.sep) or backing in self.attached

    def _check_devices(self, step: Step, before: State, after: State) -> None:
        found = loopleftovers.find_leftovers(before.devs, after.devs, self.ours, keep=self.attached,
                                       disks=self.disk_files)
        loops = after.devs.loops
        ours = set(found.leaked) | self.attached | {
            dev for dev, backing in loops.items() if self.ours(backing)
        }
        devnums = {n for dev in ours for n in [devnum(dev)] if n}
        devnums |= {n for dev in ours for p in after.devs.partitions.get(dev, ())
                    for n in [devnum(p)] if n}
        new_mounts = [m for m in after.mounts - before.mounts
                      if m.mount_point.startswith(self.real_work + os.sep)]
        new_mounts += [m for m in devices.mounts_of(devnums, list(after.mounts - before.mounts))
                       if m not in new_mounts]
        for mount in new_mounts:
            problem = unmount(mount.mount_point, lazy=True)
            step.add("mounts", FAIL, f"left '{mount.source}' mounted at '{mount.mount_point}'; "
                     + (f"cannot unmount it: {problem}" if problem else "unmounted"))
        for check, message in loopleftovers.clear_leftovers(found, after.devs):
            step.add(check, FAIL, message)
        temp = []
        for path in sorted(after.temp - before.temp):
            with contextlib.suppress(OSError):
                if os.lstat(path).st_uid == os.geteuid():
                    temp.append(path)
        temp = not_in_use(temp, after.mounts)
        if temp:
            step.add("temp files", WARN, f"new in the temp dirs after the step: {few(temp)} "
                     "(not removed: another process may own it)")
