"""What a conformance run is given and what it finds: options, checks, steps, the report."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ganeti_vol.core import errors as E

log = logging.getLogger(__name__)


PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
RANK = {SKIP: 0, PASS: 1, WARN: 2, FAIL: 3}

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
        return max((c.status for c in self.checks), key=RANK.__getitem__)

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
