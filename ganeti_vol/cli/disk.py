"""``ganeti-vol disk info PATH`` and ``ganeti-vol cleanup`` (what a crashed run left behind)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from ganeti_vol.cli import common
from ganeti_vol.core import errors as E
from ganeti_vol.core.lazy import lazy

archive = lazy("ganeti_vol.formats.archive")
atomicfile = lazy("ganeti_vol.core.atomicfile")
devices = lazy("ganeti_vol.system.devices")
locks = lazy("ganeti_vol.system.locks")
loopdev = lazy("ganeti_vol.system.loopdev")
opstate = lazy("ganeti_vol.ops.opstate")
process = lazy("ganeti_vol.system.process")
progress = lazy("ganeti_vol.engine.progress")
snapshots = lazy("ganeti_vol.system.snapshots")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p_disk = sub.add_parser("disk", help="facts about disks (files and block devices)")
    dsub = p_disk.add_subparsers(dest="disk_command", metavar="ACTION")
    dsub.required = True
    p = dsub.add_parser(
        "info",
        help="kind, size, device number, partitions, holders, mounts and loop devices of a disk",
    )
    p.add_argument("path", metavar="PATH", help="a file disk or a block device")
    common.add_json(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "cleanup",
        help="detach loop devices, delete partitions, release snapshots and remove staging "
        "directories, status files, locks and script cgroups that a crashed ganeti-vol "
        "left behind (never anyone else's, never a running one's)",
    )
    p.add_argument("--dry-run", action="store_true", help="only say what would be done")
    p.add_argument(
        "--under",
        metavar="DIR",
        help="only look at loop devices backed by files below DIR (default: all)",
    )
    p.add_argument("--export-dir", metavar="DIR",
                   help="export directory to reclaim staging directories in "
                        "(default: the node config's export_dir)")
    common.add_json(p)
    p.set_defaults(func=cmd_cleanup)


def cmd_info(args: argparse.Namespace) -> int:
    facts = devices.describe(args.path)
    if args.json:
        common.emit_json(facts.to_json())
        return 0
    rows: list[list[Any]] = [
        ["path", facts.path],
        ["kind", facts.kind],
        ["size", f"{facts.size} bytes"],
    ]
    if facts.devnum:
        rows += [["device", facts.devnum], ["logical block size", facts.logical_block_size]]
    rows.append(["read-only", "yes" if facts.read_only else "no"])
    for label, value in (
        ("parent", facts.parent),
        ("backing file", facts.backing_file),
        ("partitions", " ".join(facts.partitions)),
        ("holders", " ".join(facts.holders)),
        ("loop devices", " ".join(facts.loop_devices)),
    ):
        if value:
            rows.append([label, value])
    for mount in facts.mounts:
        rows.append(["mounted", f"{mount.mount_point} ({mount.fstype}, {mount.source})"])
    common.emit_table([[f"{label}:", value] for label, value in rows])
    return 0


def _leftovers(node: Any, dry_run: bool) -> dict[str, list[Any]]:
    """What dead ganeti-vol processes left besides devices: by kind, JSON-able."""
    return {
        "staging": [w.to_json() for w in archive.reclaim_work_dirs(node.export_dir, dry_run)],
        "status_files": progress.cleanup_status_files(node.state_dir, dry_run),
        "temp_files": [p for sub in (opstate.MARK_DIR, loopdev.RECORD_DIR,
                                     snapshots.STATE_SUBDIR)
                       for p in atomicfile.reclaim_temp_files(os.path.join(node.state_dir, sub),
                                                              dry_run)],
        "locks": [lk.to_json() for lk in locks.cleanup(node.state_dir, dry_run)],
        "killed_operations": opstate.reap_killed_operations(node.state_dir, dry_run),
        "cgroups": process.cleanup_cgroups(dry_run),
    }


_LEFTOVER_TEXT: dict[str, Callable[[Any, str], str]] = {  # kind -> (item, "would ") -> line
    "staging": lambda w, would: (
        f"{w['path']}: {would}remove (left by pid {w['pid']}, not running)"),
    "status_files": lambda p, would: (
        f"{p}: {would}remove (status of a process no longer running)"),
    "temp_files": lambda p, would: (
        f"{p}: {would}remove (temporary file of a writer no longer running)"),
    "locks": lambda lk, would: f"{lk['path']}: {would}remove (lock file nobody holds)",
    "killed_operations": lambda o, would: (
        f"instance '{o['instance']}': {o['op']} by pid {o['pid']} was killed; it stays "
        "broken until run again"
        + (f"; killed what its scripts left: {o['killed']}" if o["killed"] else "")),
    "cgroups": lambda p, would: f"{p}: {would}remove (empty script cgroup of a process gone)",
}


def cmd_cleanup(args: argparse.Namespace) -> int:
    node = common.node_config(args)
    loops = loopdev.cleanup(node.state_dir, args.dry_run, under=args.under)
    snaps = snapshots.cleanup(node, args.dry_run)
    leftovers = _leftovers(node, args.dry_run)
    if args.json:
        common.emit_json(
            {
                "dry_run": args.dry_run,
                "loop_devices": [a.to_json() for a in loops],
                "snapshots": [s.to_json() for s in snaps],
                **leftovers,
            }
        )
    else:
        would = "would " if args.dry_run else ""
        for a in loops:
            state = "failed: " + a.error if a.error else ("done" if a.done else "not done")
            common.emit(f"{a.device}: {would}{a.action} ({a.reason}): {state}")
        for s in snaps:
            state = "failed: " + s.error if s.error else ("done" if s.done else "not done")
            common.emit(f"{s.provider} snapshot {s.tag} of {s.disk_path}: {would}release: {state}")
        for kind, items in leftovers.items():
            for item in items:
                common.emit(_LEFTOVER_TEXT[kind](item, would))
        if not loops and not snaps and not any(leftovers.values()):
            common.emit("nothing to clean up")
    failed = [a.device for a in loops if a.error] + [s.tag for s in snaps if s.error]
    if failed:
        raise E.BusyError(f"cannot clean up {', '.join(failed)}: still in use")
    return 0
