"""Judging the files inside a round trip's disks: volumes mounted read-only, trees compared."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from ganeti_vol.authoring.conformance.disks import CannotCompare, mount_ro, tree, unmount
from ganeti_vol.authoring.conformance.leaks import few
from ganeti_vol.authoring.conformance.report import FAIL, PASS, WARN, Step
from ganeti_vol.system.loopdev import LoopAttachment

log = logging.getLogger(__name__)


def compare_volumes(step: Step, index: int, la: LoopAttachment, lb: LoopAttachment, work: str,
                    allow_change: Collection[str]) -> None:
    """Mount each volume of the original (``la``) and the imported disk (``lb``) read-only
    and judge their file trees (:func:`judge_trees`)."""
    vols_a, vols_b = la.partitions or [la.device], lb.partitions or [lb.device]
    if len(vols_a) != len(vols_b):
        step.add("round trip", FAIL, f"disk {index}: {len(vols_a)} volume(s) exported, "
                 f"{len(vols_b)} imported")
        return
    for n, (va, vb) in enumerate(zip(vols_a, vols_b, strict=True)):
        with mounted(va, work, f"a{index}-{n}") as ma, mounted(vb, work, f"b{index}-{n}") as mb:
            ta, tb = tree(ma), tree(mb)
        judge_trees(step, f"disk {index}" + (f" volume {n}" if n else ""), ta, tb, allow_change)


def judge_trees(step: Step, what: str, ta: Mapping[str, Any], tb: Mapping[str, Any],
                allow_change: Collection[str]) -> None:
    """Add the round trip's verdict on the file trees ``ta`` (original) and ``tb`` (imported)."""
    lost = sorted(set(ta) - set(tb))
    added = sorted(set(tb) - set(ta))
    changed = sorted(p for p in set(ta) & set(tb) if ta[p] != tb[p])
    unexpected = [p for p in changed if p not in allow_change]
    if lost:
        step.add("round trip", FAIL, f"{what}: the import lost {len(lost)} of {len(ta)} "
                 f"files: {few(lost)}")
    elif unexpected:
        step.add("round trip", FAIL, f"{what}: the import changed {len(unexpected)} of "
                 f"{len(ta)} files: {few(unexpected)} (if the import adapts them on "
                 "purpose, say so with --allow-change)")
    elif added or changed:
        step.add("round trip", WARN, f"{what}: files compared ({len(ta)}): "
                 f"{len(changed)} changed as allowed ({few(changed) or '-'}), {len(added)} "
                 f"added ({few(added) or '-'})")
    else:
        step.add("round trip", PASS, f"{what}: the same {len(ta)} files (type, mode, owner, "
                 "size, content); the bytes differ (a filesystem-level export)")


@contextlib.contextmanager
def mounted(device: str, work: str, label: str) -> Iterator[str]:
    """``device`` mounted read-only under the work dir ``work``."""
    target = os.path.join(work, "mnt", label)
    os.makedirs(target, exist_ok=True)
    problem = mount_ro(device, target)
    if problem:
        os.rmdir(target)
        raise CannotCompare(f"cannot mount {device}: {problem}")
    try:
        yield target
    finally:
        problem = unmount(target, lazy=False) and unmount(target, lazy=True)
        if problem:
            log.error("cannot unmount '%s': %s", target, problem)
        else:
            os.rmdir(target)
