"""``ganeti-vol disk info PATH`` and ``ganeti-vol cleanup`` (devices and snapshots)."""

from __future__ import annotations

import argparse
from typing import Any

from ganeti_vol import errors as E
from ganeti_vol.cli import common
from ganeti_vol.lazy import lazy

devices = lazy("ganeti_vol.devices")
loopdev = lazy("ganeti_vol.loopdev")
snapshots = lazy("ganeti_vol.snapshots")


def register(sub: argparse._SubParsersAction) -> None:
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
        help="detach loop devices, delete partitions and release snapshots that a crashed "
        "ganeti-vol left behind (never anyone else's)",
    )
    p.add_argument("--dry-run", action="store_true", help="only say what would be done")
    p.add_argument(
        "--under",
        metavar="DIR",
        help="only look at loop devices backed by files below DIR (default: all)",
    )
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


def cmd_cleanup(args: argparse.Namespace) -> int:
    node = common.node_config(args)
    loops = loopdev.cleanup(node.state_dir, args.dry_run, under=args.under)
    snaps = snapshots.cleanup(node, args.dry_run)
    if args.json:
        common.emit_json(
            {
                "dry_run": args.dry_run,
                "loop_devices": [a.to_json() for a in loops],
                "snapshots": [s.to_json() for s in snaps],
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
        if not loops and not snaps:
            common.emit("nothing to clean up")
    failed = [a.device for a in loops if a.error] + [s.tag for s in snaps if s.error]
    if failed:
        raise E.BusyError(f"cannot clean up {', '.join(failed)}: still in use")
    return 0
