"""The conformance runner: run an OS definition the way a Ganeti node would, without a cluster.

:func:`run` validates the OS definition, builds a scratch instance with
several disks (two by default) on sparse files in a private work directory
(and, as root, a second one on loop devices), and runs the OS scripts through
the same code paths as the real operations: ``verify`` with good and bad
parameters, ``create``, the export -> import round trip of every disk into
fresh disks (one step per disk and operation), ``rename`` and a reinstall.
After every step it checks what Ganeti cannot see but an operator pays for
later:

- the script's exit status (with the last log lines on failure);
- stdout outside export (it is data only for ``export``);
- file disks not truncated (sizes before and after every step);
- ``EXP_SIZE_FD`` equal to the size of the dump when it is announced;
- an export that is not empty;
- no loop device, partition, mount or process left behind (they are cleaned
  up and the step fails), and no new temporary file (a warning).

Each step ends as pass, warn, fail or skip; a :class:`Report` collects them.
The library never prints: ``ganeti_vol.cli.conformance`` renders the report.
What each check means and how the round trip is judged is in
``doc/os-conformance.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import socket
import stat
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.core.holes import extents
from ganeti_vol.core.model import Instance, NodeConfig, OSDefinition, OSEntry, split_os_name
from ganeti_vol.engine.chunks import Chunk, EncodeInfo, EncodeSummary
from ganeti_vol.engine.parallel import Engine
from ganeti_vol.ganeti import config as cfgmod
from ganeti_vol.ganeti import discovery
from ganeti_vol.ops import operations, transfer
from ganeti_vol.system import devices, loopdev, process

log = logging.getLogger(__name__)

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
_RANK = {SKIP: 0, PASS: 1, WARN: 2, FAIL: 3}

DEFAULT_DISK_SIZE = 512 << 20  # debootstrap refuses disks below 511 MiB
#: disks of the scratch instance: real instances often have more than one
DEFAULT_DISKS = 2
MAX_DISKS = 4
#: size of every disk after disk 0 (at most --disk-size): small, to keep the run short
EXTRA_DISK_SIZE = 64 << 20
#: a parameter name no OS declares: Ganeti rejects it before running verify
UNKNOWN_PARAM = "ganeti_vol_test_unknown"
INSTANCE_NAME = "ostest1.example.com"
RENAMED_NAME = "ostest2.example.com"
#: where scripts leave temporary files (Ganeti gives them no TMPDIR)
TEMP_DIRS = ("/tmp", "/var/tmp")
#: steps of one pass over a set of disks, in order
PASS_STEPS = ("create", "export", "import", "compare", "rename", "reinstall")
#: the steps of a pass that run once per disk (each disk in its own step)
DISK_STEPS = ("export", "import", "compare")
#: 1 MiB blocks of test data written into a disk that create left all zeros
SEED_BLOCKS = 3


# --- results ----------------------------------------------------------------------------


@dataclass
class Check:
    """One verdict inside a step."""

    name: str
    status: str
    detail: str = ""

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail}


@dataclass
class Step:
    """One row of the report: an operation on the scratch instance and its checks."""

    name: str
    #: "file", "loop", or "-" for steps that touch no disk
    disks: str = "-"
    #: the index of the one disk a per-disk step (DISK_STEPS) handled, else None
    disk: int | None = None
    seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)
    #: last lines of the failing script's log (Ganeti shows 20)
    log_tail: list[str] = field(default_factory=list)
    #: the operation itself failed (not only a check after it)
    aborted: bool = False

    def add(self, name: str, status: str, detail: str = "") -> None:
        self.checks.append(Check(name, status, detail))

    def fail_from(self, err: E.GanetiVolError, check: str = "exit code") -> None:
        """Record an error: its first line as the detail, its indented block as the log tail."""
        lines = str(err).splitlines()
        self.add(check, FAIL, lines[0] if lines else type(err).__name__)
        tail = [line.strip() for line in lines[1:] if line.startswith("    ")]
        self.log_tail = tail or self.log_tail

    @property
    def label(self) -> str:
        """The DISKS column: ``file``, ``loop``, ``-``, or ``file 1`` for disk 1 alone."""
        return self.disks if self.disk is None else f"{self.disks} {self.disk}"

    @property
    def status(self) -> str:
        if not self.checks:
            return PASS
        return max((c.status for c in self.checks), key=_RANK.__getitem__)

    @property
    def detail(self) -> str:
        """The details of the checks that decided the status."""
        status = self.status
        return "; ".join(c.detail for c in self.checks if c.status == status and c.detail)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "disks": self.disks,
            "disk": self.disk,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "detail": self.detail,
            "checks": [c.to_json() for c in self.checks],
            "log_tail": self.log_tail,
        }


@dataclass
class Report:
    """Everything :func:`run` found; ``passed`` is False if any step failed."""

    target: str
    os_name: str
    os_path: str
    full_name: str = ""
    api_version: int | None = None
    steps: list[Step] = field(default_factory=list)
    seconds: float = 0.0
    #: the scratch directory if it was kept (--keep), else None
    work_dir: str | None = None

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys((PASS, WARN, FAIL, SKIP), 0)
        for step in self.steps:
            out[step.status] += 1
        return out

    @property
    def passed(self) -> bool:
        return not any(step.status == FAIL for step in self.steps)

    def step(self, name: str, disks: str = "-", disk: int | None = None) -> Step:
        """The step called ``name`` on ``disks`` (KeyError if it did not run).

        ``disk`` picks the step of one disk; None the first step of that name
        (disk 0's, for the per-disk steps).
        """
        for step in self.steps:
            if step.name == name and step.disks == disks and disk in (None, step.disk):
                return step
        raise KeyError(f"{name} ({disks}{'' if disk is None else f' {disk}'})")

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "os": self.os_name,
            "path": self.os_path,
            "full_name": self.full_name,
            "api_version": self.api_version,
            "status": "passed" if self.passed else "failed",
            "counts": self.counts(),
            "seconds": round(self.seconds, 3),
            "work_dir": self.work_dir,
            "steps": [s.to_json() for s in self.steps],
        }


@dataclass(frozen=True)
class Options:
    """What ``ganeti-vol os test`` was asked to do."""

    #: size of disk 0; the other disks get EXTRA_DISK_SIZE, at most this
    disk_size: int = DEFAULT_DISK_SIZE
    #: how many disks the scratch instance has (1 to MAX_DISKS)
    disks: int = DEFAULT_DISKS
    variant: str = ""
    #: good OS parameters (must pass verify; given to every script)
    osparams: Mapping[str, str] = field(default_factory=dict)
    #: declared parameters with values the OS must reject
    bad_params: Mapping[str, str] = field(default_factory=dict)
    #: also run the pass on loop devices (needs root)
    loop: bool = True
    keep: bool = False
    #: the OS installs nothing (noop, PXE boot): disk 0 may stay empty after create
    allow_empty_create: bool = False
    #: files (paths inside a volume, "/etc/fstab") the import may change on purpose
    allow_change: frozenset[str] = frozenset()
    #: parent of the scratch directory (default: the system temp dir)
    work_dir: str | None = None
    #: seconds each script may run
    timeout: float = 600.0
    help_timeout: float = 10.0
    debug_level: int = 0
    #: -H/-B of the scratch instance (kvm), over Ganeti's defaults
    hvparams: Mapping[str, str] = field(default_factory=dict)
    beparams: Mapping[str, str] = field(default_factory=dict)


# --- resolving the target ------------------------------------------------------------------


def resolve(target: str, search_path: Sequence[str]) -> tuple[OSEntry, str]:
    """The OS entry for a path (anything with a '/') or a NAME[+VARIANT], and the variant named."""
    if "/" in target:
        os_dir = os.path.abspath(target)
        if not os.path.isdir(os_dir):
            raise E.OSDefinitionError(f"cannot test '{target}': not a directory")
        return discovery.probe_os(os.path.basename(os.path.normpath(os_dir)), os_dir), ""
    base, variant = split_os_name(target)
    found = discovery.find_os_dir(base, search_path)
    if found is None:
        hint = ""
        if os.path.isdir(target):
            hint = f" (to test the directory '{target}', write ./{target})"
        raise E.OSDefinitionError(
            f"Directory for OS {base} not found in search path "
            f"({', '.join(search_path) or '(empty)'}){hint}", os_name=base,
        )
    return discovery.probe_os(base, found), variant


def _full_name(os_def: OSDefinition, variant: str) -> str:
    """``name+variant`` (the first variant by default) or the bare name, checked like Ganeti."""
    if os_def.variants and os_def.max_api >= C.OS_API_V15:
        full = f"{os_def.name}{C.VARIANT_DELIM}{variant or os_def.variants[0]}"
    else:
        full = f"{os_def.name}{C.VARIANT_DELIM}{variant}" if variant else os_def.name
    discovery.check_variant(os_def, full)
    return full


def disk_count(value: str | int) -> int:
    """The number of scratch disks ``--disks`` asks for (UsageError unless 1 to MAX_DISKS)."""
    try:
        count = int(str(value).strip())
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_DISKS:
        raise E.UsageError(f"invalid --disks '{value}': give a number of disks from 1 to "
                           f"{MAX_DISKS}")
    return count


def _check_bad_params(os_def: OSDefinition, bad: Mapping[str, str]) -> None:
    if not bad:
        return
    if os_def.max_api < C.OS_API_V20:
        raise E.UsageError(
            f"--bad-param: OS '{os_def.name}' declares API {os_def.max_api} < 20, "
            "so Ganeti runs no verify script"
        )
    for name in bad:
        if name not in os_def.parameter_names:
            raise E.UsageError(
                f"--bad-param {name}: '{name}' is not in parameters.list of OS "
                f"'{os_def.name}' (an undeclared name is always rejected; give a declared "
                "parameter with a bad value)"
            )


# --- what a step may leave behind ------------------------------------------------------------


@dataclass(frozen=True)
class _State:
    """Loop devices, partitions, mounts and temp entries at one moment."""

    devs: loopdev.LoopState
    mounts: frozenset[devices.Mount]
    temp: frozenset[str]


def _snapshot(temp_dirs: Sequence[str]) -> _State:
    temp: set[str] = set()
    for top in temp_dirs:
        with contextlib.suppress(OSError):
            temp.update(os.path.join(top, name) for name in os.listdir(top))
    return _State(loopdev.loop_state(), frozenset(devices.read_mounts()), frozenset(temp))


def _devnum(path: str) -> str | None:
    try:
        rdev = os.stat(path).st_rdev
    except OSError:
        return None
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _kill_group(pgid: int, timeout: float = 3.0) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while process.live_group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _not_in_use(paths: Sequence[str], mounts: frozenset[devices.Mount]) -> list[str]:
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


def _few(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _first_line(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read(4096)
    lines = data.decode("utf-8", "replace").strip().splitlines()
    return lines[0][:80] if lines else ""


# --- digests and file trees ----------------------------------------------------------------


class _DigestSink:
    """A chunk sink that keeps nothing: the engine only hashes (whole-disk digest, zeros)."""

    compress = False
    want_crc = False

    def begin(self, info: EncodeInfo) -> None:
        pass

    def write_chunk(self, chunk: Chunk) -> None:
        pass

    def finish(self, summary: EncodeSummary) -> None:
        pass

    def abort(self, error: BaseException) -> None:
        pass


@dataclass(frozen=True)
class _DiskFacts:
    size: int
    digest: str
    holds_data: bool


def _tree(root: str) -> dict[str, tuple[Any, ...]]:
    """Every entry below ``root`` on its filesystem: type, mode, owner, size and content hash."""
    out: dict[str, tuple[Any, ...]] = {}
    root_dev = os.lstat(root).st_dev
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode) and st.st_dev != root_dev and name in dirnames:
                dirnames.remove(name)  # another filesystem mounted below
            content: Any = ""
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                content = h.hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                content = st.st_rdev
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            out["/" + os.path.relpath(path, root)] = (
                stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                size, content,
            )
    return out


class _CannotCompare(Exception):
    """The files inside the disks could not be compared (reason in the message)."""


class _NoLoop(Exception):
    """The loop-device pass cannot run (reason in the message)."""


def _paths(instance: Instance) -> list[str]:
    return [d.path for d in instance.disks if d.path]


# --- the runner -----------------------------------------------------------------------------


@dataclass
class _Disks:
    """The scratch disks of one pass: the original (a) and the import target (b)."""

    kind: str
    a: Instance
    b: Instance
    #: the files behind the disks (the disks themselves on the file pass)
    files_a: list[str]
    files_b: list[str]

    @property
    def watched(self) -> list[str]:
        """Paths whose size must not change: the disks and, on the loop pass, their files."""
        paths = [d.path for d in (*self.a.disks, *self.b.disks) if d.path]
        return list(dict.fromkeys(paths + self.files_a + self.files_b))


class _Runner:
    def __init__(self, os_def: OSDefinition, full_name: str, options: Options, work: str,
                 report: Report) -> None:
        self.os_def = os_def
        self.full_name = full_name
        self.options = options
        self.work = work
        self.real_work = os.path.realpath(work)
        self.report = report
        self.node = _scratch_node(os_def, work, options)
        #: hashes disks like the export does (same chunk size and hash), so digests compare
        self.engine = Engine.from_config(self.node)
        self.ctx = operations.OpContext(node=self.node, debug_level=options.debug_level)
        self.temp_dirs = tuple(dict.fromkeys(
            d for d in (*TEMP_DIRS, tempfile.gettempdir()) if os.path.isdir(d)
        ))
        #: loop devices this runner attached (their backing files are in the work dir)
        self.attached: set[str] = set()
        #: every scratch disk file
        self.disk_files: list[str] = []
        #: per pass and disk index: the original disk when it was exported
        self.facts_a: dict[str, dict[int, _DiskFacts]] = {}
        #: per pass and disk index: the archive path and the export's result for that disk
        self.exports: dict[str, dict[int, dict[str, Any]]] = {}
        #: what the running step's children did (see process.watch)
        self.watch: process.Watch | None = None

    # -- the step frame ---------------------------------------------------------------------

    def step(self, name: str, disks: str, body: Callable[[Step], None],
             watched: Sequence[str] = (), disk: int | None = None) -> Step:
        """Run ``body`` as one step: catch its error, then check stdout, sizes and leaks."""
        step = Step(name, disks, disk)
        self.report.steps.append(step)
        stdout_dir = os.path.join(
            self.work, "stdout",
            f"{len(self.report.steps):02d}-{name}-{step.label}".replace(" ", "-"),
        )
        os.makedirs(stdout_dir, exist_ok=True)
        before = _snapshot(self.temp_dirs)
        sizes = {p: cfgmod.existing_size(p) for p in watched}
        started = time.monotonic()
        seen: process.Watch | None = None
        try:
            with process.watch(stdout_dir) as seen:
                self.watch = seen
                try:
                    body(step)
                except E.GanetiVolError as err:
                    step.fail_from(err)
                    step.aborted = True
                except OSError as err:  # e.g. a disk the scripts removed
                    step.add("error", FAIL, f"{err.strerror}: '{err.filename}'")
                    step.aborted = True
        finally:  # also on Ctrl-C: nothing may stay behind
            step.seconds = time.monotonic() - started
            self._after(step, seen, before, sizes)
        return step

    def skip(self, name: str, disks: str, reason: str, disk: int | None = None) -> None:
        step = Step(name, disks, disk)
        step.add("skipped", SKIP, reason)
        self.report.steps.append(step)

    def _after(self, step: Step, seen: process.Watch | None, before: _State,
               sizes: Mapping[str, int | None]) -> None:
        scripts = seen.scripts if seen is not None else []
        checks: tuple[Callable[[], None], ...] = (
            lambda: self._check_stdout(step, scripts),
            lambda: self._check_sizes(step, sizes),
            lambda: self._check_processes(step, scripts),
            lambda: self._check_devices(step, before, _snapshot(self.temp_dirs)),
        )
        for check in checks:
            try:
                check()
            except (E.GanetiVolError, OSError) as err:  # the next checks must still run
                step.add("checks", FAIL, f"cannot check what the step left behind: {err}")

    def _own_script(self, script: process.WatchedScript) -> bool:
        return script.argv[0].startswith(self.os_def.path + os.sep)

    def _check_stdout(self, step: Step, scripts: Sequence[process.WatchedScript]) -> None:
        if step.name == "help":
            return  # usage on stdout is what --help is for
        for script in scripts:
            if script.stdout_path is None or not self._own_script(script):
                continue
            size = os.path.getsize(script.stdout_path)
            if size:
                step.add("stdout", WARN,
                         f"{script.op} wrote {size} bytes to stdout "
                         f"('{_first_line(script.stdout_path)}'); only export's stdout is data")

    def _check_sizes(self, step: Step, sizes: Mapping[str, int | None]) -> None:
        for path, how in operations.size_changes(sizes):
            step.add("disk size", FAIL, f"'{path}' was {how}")

    def _check_processes(self, step: Step, scripts: Sequence[process.WatchedScript]) -> None:
        for script in scripts:
            members = process.live_group_members(script.pid)
            if not members:
                continue
            names = [f"pid {pid} ({_comm(pid)})" for pid in members]
            _kill_group(script.pid)
            step.add("processes", FAIL,
                     f"{script.op} script left {len(names)} process(es) running in its process "
                     f"group: {_few(names)}; killed")

    def _ours(self, backing: str | None) -> bool:
        """True for a backing file in the work dir or one of our own loop devices."""
        if not backing:
            return False
        real = os.path.realpath(backing)
        return real.startswith(self.real_work + os.sep) or backing in self.attached

    def _check_devices(self, step: Step, before: _State, after: _State) -> None:
        found = loopdev.find_leftovers(before.devs, after.devs, self._ours, keep=self.attached,
                                       disks=self.disk_files)
        loops = after.devs.loops
        ours = set(found.leaked) | self.attached | {
            dev for dev, backing in loops.items() if self._ours(backing)
        }
        devnums = {n for dev in ours for n in [_devnum(dev)] if n}
        devnums |= {n for dev in ours for p in after.devs.partitions.get(dev, ())
                    for n in [_devnum(p)] if n}
        new_mounts = [m for m in after.mounts - before.mounts
                      if m.mount_point.startswith(self.real_work + os.sep)]
        new_mounts += [m for m in devices.mounts_of(devnums, list(after.mounts - before.mounts))
                       if m not in new_mounts]
        for mount in new_mounts:
            problem = _unmount(mount.mount_point, lazy=True)
            step.add("mounts", FAIL, f"left '{mount.source}' mounted at '{mount.mount_point}'; "
                     + (f"cannot unmount it: {problem}" if problem else "unmounted"))
        for check, message in loopdev.clear_leftovers(found, after.devs):
            step.add(check, FAIL, message)
        temp = []
        for path in sorted(after.temp - before.temp):
            with contextlib.suppress(OSError):
                if os.lstat(path).st_uid == os.geteuid():
                    temp.append(path)
        temp = _not_in_use(temp, after.mounts)
        if temp:
            step.add("temp files", WARN, f"new in the temp dirs after the step: {_few(temp)} "
                     "(not removed: another process may own it)")

    # -- disk facts --------------------------------------------------------------------------

    def disk_facts(self, path: str) -> _DiskFacts:
        """Size, whole-disk digest and whether it holds any non-zero byte (holes skipped)."""
        size = cfgmod.existing_size(path) or 0
        if size == 0:
            return _DiskFacts(0, "", False)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            summary = self.engine.encode(fd, _DigestSink(), source_kind="auto", what=f"'{path}'")
        finally:
            os.close(fd)
        return _DiskFacts(summary.size, summary.digest, summary.zero_bytes < summary.size)

    def file_facts(self, disks: _Disks, which: str, index: int) -> _DiskFacts:
        """Facts of the file behind disk ``index`` of a or b (flushing its loop device first)."""
        instance, files = (disks.a, disks.files_a) if which == "a" else (disks.b, disks.files_b)
        if disks.kind == "loop":
            loopdev.flush(instance.disks[index].path or "")
        return self.disk_facts(files[index])

    # -- the steps ---------------------------------------------------------------------------

    def validate(self, entry: OSEntry) -> Step:
        def body(step: Step) -> None:
            if not entry.valid or entry.os is None:
                step.add("diagnose", FAIL, entry.diagnose)
                return
            o = entry.os
            parts = [f"API {', '.join(map(str, o.api_versions))}"]
            if o.variants:
                parts.append(f"variants {', '.join(o.variants)}")
            if o.parameters:
                parts.append(f"parameters {', '.join(o.parameter_names)}")
            step.add("diagnose", PASS, "valid: " + "; ".join(parts))

        return self.step("validate", "-", body)

    def help(self) -> Step:
        """``--help`` of every script, with an empty environment and no disk in sight."""
        log_dir = os.path.join(self.work, "log")

        def body(step: Step) -> None:
            for name in C.OS_SCRIPTS:
                path = self.os_def.scripts.get(name)
                if path is None:
                    continue
                proc, rc, output = process.run_collect(
                    [path, "--help"], {}, cwd=self.os_def.path, op=f"help-{name}",
                    log_path=os.path.join(log_dir, f"help-{name}.log"), capture=True,
                    capture_limit=65536, timeout=self.options.help_timeout, kill_grace=1.0,
                )
                text = (output or "") + self._stdout_of(proc.pid)
                first = text.strip().splitlines()[0][:60] if text.strip() else ""
                if proc.timed_out:
                    step.add(name, WARN, f"{name} --help did not end within "
                             f"{self.options.help_timeout:g}s (killed)")
                elif rc == 0 and first:
                    step.add(name, PASS, f"{name}: '{first}'")
                else:
                    said = f"'{first}'" if first else "no output"
                    step.add(name, WARN, f"{name} --help: {process.exit_reason(rc)}, {said}")

        return self.step("help", "-", body)

    def _stdout_of(self, pid: int) -> str:
        """What the child ``pid`` of the running step wrote to stdout (kept apart from the log)."""
        for script in self.watch.scripts if self.watch else ():
            if script.pid == pid and script.stdout_path:
                with open(script.stdout_path, "rb") as f:
                    return f.read(65536).decode("utf-8", "replace")
        return ""

    def verify_good(self) -> Step:
        params = dict(self.options.osparams)

        def body(step: Step) -> None:
            operations.validate_os_params(self.ctx, self.os_def, self.full_name, params)
            shown = ", ".join(f"{k}={v}" for k, v in params.items()) or "no parameters"
            step.add("exit code", PASS, f"verify accepted {shown}")

        return self.step("verify", "-", body)

    def verify_rejects(self, label: str, bad: Mapping[str, str], who: str) -> Step:
        params = {**self.options.osparams, **bad}
        shown = ", ".join(f"{k}={v}" for k, v in bad.items())

        def body(step: Step) -> None:
            try:
                operations.validate_os_params(self.ctx, self.os_def, self.full_name, params)
            except E.OSDefinitionError as err:
                said = str(err).splitlines()[-1].strip()
                step.add("rejected", PASS, f"{who} rejected {shown}: {said}")
            else:
                step.add("rejected", FAIL, f"{who} accepted the bad parameter {shown}")

        return self.step(label, "-", body)

    def run_pass(self, disks: _Disks) -> None:
        """create; export, import and compare of each disk (a step per disk); rename; reinstall.

        Every disk is exported before the first import, as Ganeti exports a
        whole instance, so the compare of one disk knows the others' exports.
        """
        kind = disks.kind
        watched = disks.watched
        create = self.step("create", kind, lambda s: self._create(s, disks), watched)
        if create.aborted:  # a failed check alone (an empty disk, a partition left) goes on
            for name in PASS_STEPS[1:]:
                self.skip(name, kind, "create failed")
            return
        indexes = range(len(disks.a.disks))

        def on_disk(name: str, body: Callable[..., None], index: int) -> Step:
            return self.step(name, kind, partial(body, disks=disks, index=index), watched, index)

        exported = {i for i in indexes if on_disk("export", self._export, i).status != FAIL}
        imported: set[int] = set()
        for i in indexes:
            if i not in exported:
                self.skip("import", kind, "export failed", i)
            elif on_disk("import", self._import, i).status != FAIL:
                imported.add(i)
        for i in indexes:
            if i in imported:
                on_disk("compare", self._compare, i)
            else:
                self.skip("compare", kind, "import failed" if i in exported else "export failed",
                          i)
        renamed = self.step("rename", kind, lambda s: self._rename(s, disks), watched)
        inst = disks.a.replace(name=RENAMED_NAME) if renamed.status != FAIL else disks.a
        self.step("reinstall", kind, lambda s: self._create(s, disks, inst, reinstall=True),
                  watched)

    def _create(self, step: Step, disks: _Disks, inst: Instance | None = None,
                reinstall: bool = False) -> None:
        inst = inst or disks.a
        # the runner checks sizes and leftovers after every step itself
        res = operations.create(self.ctx, inst, reinstall=reinstall, post_checks=False)
        what = "reinstall (INSTANCE_REINSTALL=1)" if reinstall else "create"
        step.add("exit code", PASS, f"{what} of {inst.name} ended with exit code 0 "
                 f"in {res['script_duration']:.2f}s")
        if disks.kind == "loop":
            loopdev.flush(inst.disks[0].path or "")
        if _holds_data(disks.files_a[0]):
            step.add("disk 0", PASS, f"disk 0 holds data after {what}")
        elif self.os_def.empty_after_create or self.options.allow_empty_create:
            why = ("ganeti_vol.conf says" if self.os_def.empty_after_create
                   else "--allow-empty-create says")
            step.add("disk 0", PASS, f"{what} left disk 0 empty, as {why} it may")
        else:
            step.add("disk 0", FAIL, f"{what} left disk 0 empty (all zeros): what it wrote was "
                     "lost, or it installs nothing (then say so: 'empty_after_create = yes' in "
                     "[disks] of its ganeti_vol.conf, or --allow-empty-create)")

    def _export(self, step: Step, disks: _Disks, index: int) -> None:
        facts = self.file_facts(disks, "a", index)
        if not facts.holds_data:  # zeros would prove nothing (disk 0: create's step failed)
            _seed(disks.a.disks[index].path or "", index)
            step.add("test data", PASS, f"disk {index} was empty: wrote {SEED_BLOCKS} "
                     "blocks of test data into it, as a running instance would")
            facts = self.file_facts(disks, "a", index)
        self.facts_a.setdefault(disks.kind, {})[index] = facts
        out = os.path.join(self.work, f"export-{disks.kind}-disk{index}")
        try:
            res = transfer.export_one_disk(self.ctx, disks.a, index, out)
        except E.ShortTransfer as err:
            self._short_export(step, err, facts)
            return
        self.exports.setdefault(disks.kind, {})[index] = res
        size, hint = res["disk"]["size"], res["disk"]["size_hint"]
        step.add("exit code", PASS, f"disk {index}: {size} bytes exported")
        if hint is None:
            step.add("EXP_SIZE_FD", PASS, f"disk {index}: no size announced (optional)")
        else:
            step.add("EXP_SIZE_FD", PASS, f"disk {index}: announced {hint} bytes = the dump")
        if self.file_facts(disks, "a", index).digest != facts.digest:
            step.add("read only", WARN, f"the export changed the data of disk {index}; it "
                     "should only read it (e.g. mount -o ro)")

    def _short_export(self, step: Step, err: E.ShortTransfer, facts: _DiskFacts) -> None:
        actual = getattr(err, "actual", None)
        if actual == 0:
            if facts.holds_data:
                step.add("export size", FAIL, "the export wrote nothing although the disk holds "
                         "data (an 'exit 0' exporter?)")
            else:
                step.add("export size", FAIL, "the export wrote nothing (and the disk holds no "
                         "data either: did create write anything?)")
        elif "EXP_SIZE_FD" in str(err):
            step.add("EXP_SIZE_FD", FAIL, f"announced {getattr(err, 'expected', '?')} bytes on "
                     f"EXP_SIZE_FD, but the export wrote {actual}")
        else:
            step.fail_from(err)

    def _import(self, step: Step, disks: _Disks, index: int) -> None:
        res = transfer.import_instance(self.ctx, disks.b, self.exports[disks.kind][index]["path"],
                                       os_given=True)
        for disk in res["disks"]:
            step.add("exit code", PASS, f"disk {disk['index']}: {disk['size']} bytes through "
                     f"the {disk['mode']} import")

    def _compare(self, step: Step, disks: _Disks, index: int) -> None:
        """Byte equality, else a second export, else the files inside (doc/os-conformance.md)."""
        what = f"disk {index}"
        a = self.facts_a[disks.kind][index]
        if self.file_facts(disks, "b", index).digest == a.digest:
            step.add("round trip", PASS, f"{what}: the imported disk is byte-identical to the "
                     "original")
            return
        exports = self.exports[disks.kind]
        first = exports[index]["disk"]["digest"]
        if first == a.digest:  # the export is a raw image: bytes must match
            step.add("round trip", FAIL, f"{what}: the export is the disk's bytes, but the "
                     "imported disk differs from the original")
            return
        # the other disks, where they differ from this one (an export that ignores EXPORT_INDEX)
        others = {j: f for j, f in self.facts_a[disks.kind].items()
                  if j != index and f.digest != a.digest}
        for j, other in others.items():
            if first == other.digest:
                step.add("round trip", FAIL, f"{what}: the export wrote the bytes of disk {j}, "
                         f"not of disk {index}: does the export script read EXPORT_DEVICE "
                         f"(EXPORT_INDEX={index})?")
                return
        same = [j for j in others if j in exports and exports[j]["disk"]["digest"] == first]
        if same:  # then a second export that matches proves nothing
            why = (f"the export of {what} is the same stream as that of disk {same[0]} although "
                   "the disks differ (does the export script read EXPORT_DEVICE?)")
        else:
            why = "neither the bytes nor a second export match (a filesystem-level export?)"
            out = os.path.join(self.work, f"export-{disks.kind}-disk{index}-again")
            if first == transfer.export_one_disk(self.ctx, disks.b, index, out)["disk"]["digest"]:
                step.add("round trip", PASS, f"{what}: the disks differ, but a second export of "
                         "the imported disk is identical to the first export")
                return
        try:
            self._compare_files(step, index, disks.files_a[index], disks.files_b[index])
        except _CannotCompare as err:  # nothing shows that the data survived the round trip
            step.add("round trip", FAIL, f"{what}: {why}, and the files inside cannot be "
                     f"compared: {err}")

    def _compare_files(self, step: Step, index: int, file_a: str, file_b: str) -> None:
        if not loop_devices_usable():
            raise _CannotCompare("that needs root and working loop devices")
        with self._attach(file_a, True) as la, self._attach(file_b, True) as lb:
            vols_a, vols_b = la.partitions or [la.device], lb.partitions or [lb.device]
            if len(vols_a) != len(vols_b):
                step.add("round trip", FAIL, f"disk {index}: {len(vols_a)} volume(s) exported, "
                         f"{len(vols_b)} imported")
                return
            for n, (va, vb) in enumerate(zip(vols_a, vols_b, strict=True)):
                with self._mounted(va, f"a{index}-{n}") as ma, \
                        self._mounted(vb, f"b{index}-{n}") as mb:
                    ta, tb = _tree(ma), _tree(mb)
                self._judge_trees(step, f"disk {index}" + (f" volume {n}" if n else ""), ta, tb)

    def _judge_trees(self, step: Step, what: str, ta: Mapping[str, Any],
                     tb: Mapping[str, Any]) -> None:
        lost = sorted(set(ta) - set(tb))
        added = sorted(set(tb) - set(ta))
        changed = sorted(p for p in set(ta) & set(tb) if ta[p] != tb[p])
        unexpected = [p for p in changed if p not in self.options.allow_change]
        if lost:
            step.add("round trip", FAIL, f"{what}: the import lost {len(lost)} of {len(ta)} "
                     f"files: {_few(lost)}")
        elif unexpected:
            step.add("round trip", FAIL, f"{what}: the import changed {len(unexpected)} of "
                     f"{len(ta)} files: {_few(unexpected)} (if the import adapts them on "
                     "purpose, say so with --allow-change)")
        elif added or changed:
            step.add("round trip", WARN, f"{what}: files compared ({len(ta)}): "
                     f"{len(changed)} changed as allowed ({_few(changed) or '-'}), {len(added)} "
                     f"added ({_few(added) or '-'})")
        else:
            step.add("round trip", PASS, f"{what}: the same {len(ta)} files (type, mode, owner, "
                     "size, content); the bytes differ (a filesystem-level export)")

    @contextlib.contextmanager
    def _attach(self, path: str, read_only: bool,
                hold: bool = True) -> Iterator[loopdev.LoopAttachment]:
        with loopdev.attached(path, read_only=read_only, partitions=True,
                              state_dir=self.node.state_dir, tag="ostest", hold=hold) as att:
            self.attached.add(att.device)
            try:
                yield att
            finally:
                self.attached.discard(att.device)

    @contextlib.contextmanager
    def _mounted(self, device: str, label: str) -> Iterator[str]:
        """``device`` mounted read-only under the work dir."""
        target = os.path.join(self.work, "mnt", label)
        os.makedirs(target, exist_ok=True)
        problem = _mount_ro(device, target)
        if problem:
            os.rmdir(target)
            raise _CannotCompare(f"cannot mount {device}: {problem}")
        try:
            yield target
        finally:
            problem = _unmount(target, lazy=False) and _unmount(target, lazy=True)
            if problem:
                log.error("cannot unmount '%s': %s", target, problem)
            else:
                os.rmdir(target)

    def _rename(self, step: Step, disks: _Disks) -> None:
        operations.rename(self.ctx, disks.a, RENAMED_NAME)
        step.add("exit code", PASS, f"renamed {disks.a.name} to {RENAMED_NAME} "
                 "(OLD_INSTANCE_NAME set)")

    # -- scratch instances -------------------------------------------------------------------

    def disk_size(self, index: int) -> int:
        """--disk-size for disk 0; the others are small (EXTRA_DISK_SIZE at most)."""
        size = self.options.disk_size
        return size if index == 0 else min(size, EXTRA_DISK_SIZE)

    def instance(self, paths: Sequence[str]) -> Instance:
        """The scratch instance on ``paths`` (files or block devices), with one NIC."""
        inst_uuid = cfgmod.instance_uuid_for(INSTANCE_NAME)
        disks = tuple(
            cfgmod.make_disk(i, inst_uuid, path=p, size=self.disk_size(i))
            for i, p in enumerate(paths)
        )
        now = time.time()
        node = socket.getfqdn()
        return Instance(
            name=INSTANCE_NAME, os=self.full_name, uuid=inst_uuid, ctime=now, mtime=now,
            hypervisor="kvm", primary_node=str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, node)),
            disks=disks, nics=(cfgmod.make_nic(0, inst_uuid, {"link": "br0"}),),
            osparams=dict(self.options.osparams),
            beparams={"maxmem": "512", "minmem": "512", "vcpus": "1", "auto_balance": "True",
                      **self.options.beparams},
            hvparams={"kernel_path": "", "serial_console": "True", **self.options.hvparams},
        )

    def file_disks(self, kind: str) -> tuple[Instance, Instance]:
        """Fresh sparse files for the original and the import target of a pass."""
        count = range(self.options.disks)
        a = self.instance([os.path.join(self.work, f"{kind}-a-disk{i}.img") for i in count])
        b = self.instance([os.path.join(self.work, f"{kind}-b-disk{i}.img") for i in count])
        operations.ensure_file_disks(a)
        operations.ensure_file_disks(b)
        self.disk_files += _paths(a) + _paths(b)
        return a, b

    @contextlib.contextmanager
    def loop_disks(self) -> Iterator[_Disks]:
        """Fresh files attached as loop devices (raises _NoLoop if that is impossible)."""
        fa, fb = self.file_disks("loop")
        files_a, files_b = _paths(fa), _paths(fb)
        with contextlib.ExitStack() as stack:
            try:
                # not held: the scripts are the only users, as of a disk on an LVM node
                devs_a = [stack.enter_context(self._attach(p, False, False)).device
                          for p in files_a]
                devs_b = [stack.enter_context(self._attach(p, False, False)).device
                          for p in files_b]
            except E.DeviceError as err:
                raise _NoLoop(f"cannot attach loop devices: {err}") from err
            yield _Disks("loop", self.instance(devs_a), self.instance(devs_b), files_a, files_b)

    def sweep(self) -> None:
        """Last resort before the work dir goes: anything still attached to our files."""
        try:
            for dev, backing in devices.iter_loop_devices():
                if backing and self._ours(backing) and dev not in self.attached:
                    for mount in devices.mounts_of({n for n in [_devnum(dev)] if n}):
                        _unmount(mount.mount_point, lazy=True)
                    problems = loopdev.teardown(dev)
                    log.error("detached leftover %s (%s)%s", dev, backing,
                              f": {'; '.join(problems)}" if problems else "")
        except E.GanetiVolError as err:  # must not hide why we are here
            log.error("cannot check for leftover loop devices: %s", err)


def _seed(path: str, index: int) -> None:
    """Write test data (1 MiB at the start, middle and end) into a disk; never resize it.

    The data differs from disk to disk, so a mix-up of disks shows in their bytes.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        block = min(1 << 20, size)
        offsets = {0, (size // 2) & ~4095, size - block}
        for n, offset in enumerate(sorted(offsets)[:SEED_BLOCKS]):
            data = hashlib.shake_256(f"ganeti-vol os test {n} disk {index}".encode()).digest(block)
            os.pwrite(fd, data, max(0, min(offset, size - block)))
        os.fsync(fd)
    finally:
        os.close(fd)


def _holds_data(path: str) -> bool:
    """True if the file has a non-zero byte (only its data extents are read, up to the first)."""
    with open(path, "rb", buffering=0) as f:
        for start, end, is_data in extents(f.fileno(), os.fstat(f.fileno()).st_size):
            offset = start
            while is_data and offset < end:
                f.seek(offset)
                block = f.read(min(1 << 20, end - offset))
                if not block:
                    return False
                if block.strip(b"\0"):
                    return True
                offset += len(block)
    return False


def _tool(argv: Sequence[str]) -> str | None:
    """Run a util-linux tool; None on success, else its reason and last output line."""
    tool = shutil.which(argv[0], path=C.SCRIPT_PATH)
    if tool is None:
        return f"'{argv[0]}' not found in {C.SCRIPT_PATH}"
    proc, rc, output = process.run_collect(
        [tool, *argv[1:]], {"PATH": C.SCRIPT_PATH, "LC_ALL": "C"}, cwd="/", op=argv[0],
        capture=True, capture_limit=4096, timeout=60,
    )
    if rc == 0 and not proc.timed_out:
        return None
    last = (output or "").strip().splitlines()
    return process.exit_reason(rc) + (f": {last[-1]}" if last else "")


def _mount_ro(device: str, target: str) -> str | None:
    problem = _tool(["mount", "-o", "ro,nosuid,nodev,noexec", device, target])
    # an ext* journal that needs recovery cannot be replayed read-only: skip it
    if problem and _tool(["mount", "-o", "ro,noload,nosuid,nodev,noexec", device, target]) is None:
        return None
    return problem


def _unmount(target: str, *, lazy: bool) -> str | None:
    return _tool(["umount", "-l", target] if lazy else ["umount", target])


def loop_devices_usable() -> bool:
    """Root and a loop-control device: the loop pass and the file comparison can run."""
    return os.geteuid() == 0 and os.path.exists(loopdev.LOOP_CONTROL)


def _scratch_node(os_def: OSDefinition, work: str, options: Options) -> NodeConfig:
    dirs = {k: os.path.join(work, k) for k in ("hooks", "log", "export", "state")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    timeouts = {k: options.timeout for k in ("create", "rename", "verify", "export", "import",
                                               "hook")}
    return NodeConfig(
        os_search_path=(os.path.dirname(os_def.path),), hooks_dir=dirs["hooks"],
        log_dir=dirs["log"], export_dir=dirs["export"], state_dir=dirs["state"],
        timeouts=timeouts, stall_timeout=min(60.0, options.timeout), parallel_disks=1,
        snapshot_provider="none", source="(os test)",
    )


# --- entry point ----------------------------------------------------------------------------


def run(target: str, options: Options | None = None, *,
        search_path: Sequence[str] = ()) -> Report:
    """Test the OS definition ``target`` (a path, or a NAME[+VARIANT] in ``search_path``).

    Raises OSDefinitionError if it cannot be found and UsageError for a bad
    variant, ``--bad-param`` or ``--disks``; everything else ends up in the report.  The
    scratch directory is removed at the end (also on Ctrl-C) unless
    ``options.keep``.
    """
    options = options or Options()
    disk_count(options.disks)
    started = time.monotonic()
    entry, named_variant = resolve(target, search_path)
    report = Report(target, entry.name, entry.path)
    os_def = entry.os
    full_name = ""
    if os_def is not None:
        full_name = _full_name(os_def, options.variant or named_variant)
        _check_bad_params(os_def, options.bad_params)
        report.full_name, report.api_version = full_name, os_def.api_version
    parent = options.work_dir or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix="ganeti-vol-ostest-", dir=parent)
    runner = None
    try:
        placeholder = os_def or OSDefinition(entry.name, entry.path, (), {})
        runner = _Runner(placeholder, full_name, options, work, report)
        with runner.engine:
            if runner.validate(entry).status == FAIL or os_def is None:
                for name in ("help", "verify", *PASS_STEPS):
                    runner.skip(name, "-", "the OS definition is invalid")
                return report
            _run_all(runner, os_def, options)
    finally:
        if runner is not None:
            runner.sweep()
        report.seconds = time.monotonic() - started
        if options.keep:
            report.work_dir = work
        else:
            shutil.rmtree(work, ignore_errors=True)
    return report


def _run_all(runner: _Runner, os_def: OSDefinition, options: Options) -> None:
    runner.help()
    if os_def.max_api < C.OS_API_V20:
        runner.skip("verify", "-", f"API {os_def.api_version} < 20: Ganeti runs no verify")
    else:
        runner.verify_good()
        runner.verify_rejects("verify unknown", {UNKNOWN_PARAM: "1"}, "ganeti-vol's own check")
        for name, value in options.bad_params.items():
            runner.verify_rejects(f"verify {name}", {name: value}, "verify")
    a, b = runner.file_disks("file")
    runner.run_pass(_Disks("file", a, b, _paths(a), _paths(b)))
    reason = ""
    if not options.loop:
        reason = "--no-loop given"
    elif not loop_devices_usable():
        reason = "not root (or no /dev/loop-control): the loop-device pass needs root"
    else:
        try:
            with runner.loop_disks() as disks:
                runner.run_pass(disks)
        except _NoLoop as err:
            reason = str(err)
        except E.BusyError as err:  # our own loop devices would not detach
            step = Step("detach", "loop")
            step.add("loop devices", FAIL, str(err).splitlines()[0])
            runner.report.steps.append(step)
    if reason:
        for name in PASS_STEPS:
            runner.skip(name, "loop", reason)
