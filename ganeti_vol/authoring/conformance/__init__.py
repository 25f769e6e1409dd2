"""The conformance runner (``ganeti-vol os test``): run an OS definition the way a Ganeti node
would, without a cluster, and report what Ganeti cannot see but an operator pays for later.

Its parts: :mod:`.report` (options, checks, steps, the report), :mod:`.runner`
(the steps and :func:`run`), :mod:`.target` (which OS definition is tested),
:mod:`.scratch` (the scratch node and instances), :mod:`.leaks` (what a step may
leave behind), :mod:`.disks` (test data, digests, file trees, read-only mounts),
:mod:`.roundtrip` (the files inside a round trip's disks compared).
``doc/os-conformance.md`` says what each check means.
"""

from __future__ import annotations

from ganeti_vol.authoring.conformance.disks import loop_devices_usable
from ganeti_vol.authoring.conformance.report import (
    DEFAULT_DISK_SIZE,
    DEFAULT_DISKS,
    DISK_STEPS,
    FAIL,
    MAX_DISKS,
    PASS,
    PASS_STEPS,
    SKIP,
    WARN,
    Check,
    Options,
    Report,
    Step,
)
from ganeti_vol.authoring.conformance.runner import run
from ganeti_vol.authoring.conformance.target import disk_count, resolve

__all__ = [
    "DEFAULT_DISKS", "DEFAULT_DISK_SIZE", "DISK_STEPS", "FAIL", "MAX_DISKS", "PASS",
    "PASS_STEPS", "SKIP", "WARN", "Check", "Options", "Report", "Step", "disk_count",
    "loop_devices_usable", "resolve", "run",
]
