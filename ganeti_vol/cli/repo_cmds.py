"""``ganeti-vol repo init|list|info|diff|remove|check|prune|gc|upgrade``: backup repositories.

Exports go in with ``ganeti-vol export INSTANCE --repo PATH [--tag T]`` and
come back with ``ganeti-vol import INSTANCE PATH::SNAPSHOT`` (cli/transfer.py).
A SNAPSHOT is an id, an instance name (its latest snapshot) or INSTANCE@TAG.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ganeti_vol.cli import common
from ganeti_vol.core import errors as E
from ganeti_vol.core.lazy import lazy

R = lazy("ganeti_vol.repo")
remote = lazy("ganeti_vol.remote")
snapshot = lazy("ganeti_vol.repo.snapshot")
P = lazy("ganeti_vol.engine.progress")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p_repo = sub.add_parser("repo", help="backup repositories: deduplicated snapshots of "
                                         "instances, with check, retention and gc")
    rsub = p_repo.add_subparsers(dest="repo_command", metavar="ACTION")
    rsub.required = True

    p = rsub.add_parser("init", help="create an empty repository")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--hash", choices=("blake3", "sha256"),
                   help="chunk digest (default: blake3, cryptographic and about 3x faster, "
                        "where the Python package blake3 is installed; else sha256)")
    p.add_argument("--chunk-size", default="4M", metavar="SIZE",
                   help="chunk size, a power of two from 64K to 4M (default 4M)")
    common.add_json(p)
    p.set_defaults(func=cmd_init)

    p = rsub.add_parser("list", help="list the snapshots")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--instance", metavar="NAME", help="only this instance's snapshots")
    common.add_json(p)
    p.set_defaults(func=cmd_list)

    p = rsub.add_parser("info", help="show a snapshot: disks, sizes, new and reused bytes, "
                                     "origin")
    p.add_argument("snapshot", metavar="PATH::SNAPSHOT")
    common.add_json(p)
    p.set_defaults(func=cmd_info)

    p = rsub.add_parser("diff", help="list the chunk ranges that changed between two snapshots")
    p.add_argument("a", metavar="PATH::SNAP_A")
    p.add_argument("b", metavar="[PATH::]SNAP_B")
    common.add_json(p)
    p.set_defaults(func=cmd_diff)

    p = rsub.add_parser("check", help="check every snapshot: health ok, degraded or broken; "
                                      "quarantine damaged chunks; repair from a source")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--read-data", action="store_true",
                   help="also decode and re-hash every stored chunk (reads the whole store)")
    p.add_argument("--repair-from", metavar="INSTANCE_FILE|REPO",
                   help="re-supply damaged or missing chunks from another repository or from "
                        "the disks of an instance (each verified against its digest)")
    common.add_json(p)
    p.set_defaults(func=cmd_check)

    p = rsub.add_parser("prune", help="remove snapshots by calendar rules, per instance "
                                      "(borg's semantics); data is freed by gc")
    p.add_argument("path", metavar="PATH")
    for rule in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        p.add_argument(f"--keep-{rule}", type=int, default=0, metavar="N",
                       help=f"keep the newest snapshot of each of the last N {rule} periods"
                       if rule != "last" else "keep the N newest snapshots")
    p.add_argument("--instance", metavar="NAME", help="only this instance's snapshots")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    common.add_json(p)
    p.set_defaults(func=cmd_prune)

    p = rsub.add_parser("gc", help="free the chunks no snapshot names (safe while exports run)")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--grace", type=float, default=300.0, metavar="SECONDS",
                   help="also keep chunks touched this long before the oldest running writer "
                        "started (clock skew of remote writers; default 300)")
    p.add_argument("--dry-run", action="store_true", help="only count what would be freed")
    common.add_json(p)
    p.set_defaults(func=cmd_gc)

    p = rsub.add_parser("serve", help="serve repositories on stdin/stdout: what 'ssh' runs "
                                      "on the far side of an ssh:// repository (doc/remote.md)")
    p.add_argument("path", metavar="PATH", nargs="?",
                   help="serve only this repository (without it, a forced command reads the "
                        "path from SSH_ORIGINAL_COMMAND)")
    p.add_argument("--restrict-to-path", action="append", default=[], metavar="P",
                   help="serve only repositories at or under P (repeatable)")
    p.add_argument("--append-only", action="store_true",
                   help="refuse remove, prune, gc and repairing checks: clients can only add")
    p.set_defaults(func=cmd_serve)

    p = rsub.add_parser("upgrade", help="migrate an older repository layout in place")
    p.add_argument("path", metavar="PATH")
    common.add_json(p)
    p.set_defaults(func=cmd_upgrade)

    p = rsub.add_parser("remove", help="remove snapshots (their data is freed by gc, once no "
                                       "snapshot names it)")
    p.add_argument("snapshots", metavar="PATH::SNAPSHOT", nargs="+")
    common.add_json(p)
    p.set_defaults(func=cmd_remove)


def _size(n: int | None) -> str:
    return "-" if n is None else P.format_bytes(n)


def cmd_init(args: argparse.Namespace) -> int:
    from ganeti_vol.ganeti.fields import parse_size

    info = remote.init_repository(args.path, hash_algo=args.hash,
                                  chunk_size=parse_size(args.chunk_size))
    common.print_result(args, info, [
        f"created repository {info['path']} ({info['chunk_hash']}, "
        f"{_size(info['chunk_size'])} chunks, format version {info['format_version']})"])
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    result = remote.run(args.path, "list", instance=args.instance)
    snaps = result["snapshots"]
    if args.json:
        common.emit_json(result)
        return 0
    rows = []
    for s in snaps:
        if s["valid"]:
            rows.append([s["id"], s["instance"], s["tag"] or "-", s["kind"], s["disks"],
                         _size(s["size"]), _size(s["new_bytes"]), s["created"]])
        else:
            rows.append([s["id"], "invalid", "-", "-", "-", "-", "-", s["error"]])
    common.emit_table(rows, ["ID", "INSTANCE", "TAG", "KIND", "DISKS", "SIZE", "ADDED",
                             "CREATED"])
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    path, snap = snapshot.split_spec(args.snapshot)
    info = remote.run(path, "info", snapshot=snap)
    lines = [
        f"snapshot: {info['path']}",
        f"instance: {info['instance']} (OS {info['os'] or '-'}), tag {info['tag'] or '-'}",
        f"created:  {info['created']} (finished {info['finished']})",
        f"size:     {_size(info['size'])} in {len(info['disks'])} disk(s); stored "
        f"{_size(info['stored_bytes'])}, of which this export added {_size(info['new_bytes'])}",
    ]
    for d in info["disks"]:
        lines.append(
            f"disk {d['index']}: {_size(d['size'])}, {d['chunks']} chunks ({d['zero_chunks']} "
            f"zero, {d['new_chunks']} new, {d['reused_chunks']} reused), {d['digest']}")
    origin = info.get("origin")
    if origin:
        shared = origin.get("shared_bytes")
        lines.append(f"origin:   {origin.get('name') or origin['id']} "
                     f"(sha256 {origin.get('sha256')}), shares {_size(shared)}")
    common.print_result(args, info, lines)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    path, a = snapshot.split_spec(args.a)
    b = args.b
    if "::" in b:
        path_b, b = snapshot.split_spec(b)
        if os.path.abspath(path_b) != os.path.abspath(path):
            raise E.UsageError("repo diff compares two snapshots of the same repository")
    result = remote.run(path, "diff", a=a, b=b)
    lines = [f"{result['a']} -> {result['b']}: {_size(result['changed_bytes'])} changed"]
    for d in result["disks"]:
        if "only_in" in d:
            lines.append(f"disk {d['index']}: only in {d['only_in']} ({_size(d['size'])})")
            continue
        lines.append(f"disk {d['index']}: {d['chunks_changed']} chunk(s), "
                     f"{_size(d['changed_bytes'])} changed")
        lines.extend(f"  {r['offset']}+{r['length']}" for r in d["ranges"])
    common.print_result(args, result, lines)
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    removed = []
    for spec in args.snapshots:
        path, snap = snapshot.split_spec(spec)
        removed.append(remote.run(path, "remove", snapshot=snap)["removed"])
    common.print_result(args, {"removed": removed},
                        [f"removed {s} (run 'repo gc' to free its unshared data)"
                         for s in removed])
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    node = common.node_config(args)
    report = remote.run(args.path, "check", read_data=args.read_data,
                        repair_from=args.repair_from, workers=node.workers)
    lines = []
    if args.read_data:
        lines.append(f"{report['chunks_checked']} chunk(s) re-hashed "
                     f"({_size(report['bytes_checked'])})")
    for q in report["quarantined"]:
        lines.append(f"quarantined damaged chunk {q['chunk']} ({q['reason']})")
    for s in report["snapshots"]:
        line = f"{s['id']} {s['instance'] or '?'}: {s['health']}"
        if s["reason"]:
            line += f": {s['reason']}"
        if s["repaired"]:
            line += f"; repaired {s['repaired']} chunk(s), now {s['after_repair']}"
        lines.append(line)
    lines.append("all snapshots ok" if report["ok"] else "some snapshots are not ok")
    common.print_result(args, report, lines)
    return 0 if report["ok"] else E.EXIT_WARNING


def import_into_existing(args: argparse.Namespace, ctx: Any, inst: Any, snap: Any) -> int:
    """``import INSTANCE REPO::SNAPSHOT --into-existing`` (called by cli/transfer.py)."""
    from ganeti_vol.ops.transfer import merge_from_export
    from ganeti_vol.repo import restore

    inst = merge_from_export(inst, snap.instance, os_given=True)
    prog = P.Progress("import", name=inst.name)
    with P.ProgressMonitor(prog, renderer=P.make_renderer(args.progress)):
        result = restore.import_into_existing(snap, inst, state_dir=ctx.node.state_dir,
                                              workers=ctx.node.workers,
                                              progress=prog)
    lines = [f"imported instance '{result['instance']}' from {result['source']} into its "
             f"existing disks: wrote {result['written_bytes'] / 1e6:.1f} of "
             f"{result['size'] / 1e6:.1f} MB in {result['seconds']:.2f}s; every written chunk "
             "verified"]
    lines += [f"disk {d['index']}: {d['written_chunks']} of {d['chunks']} chunk(s) differed"
              for d in result["disks"]]
    common.print_result(args, result, lines)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    prune = lazy("ganeti_vol.repo.prune")
    keep = {rule: getattr(args, f"keep_{rule}") for rule, _ in prune.RULES}
    if any(n < 0 for n in keep.values()):
        raise E.UsageError("--keep-* values must not be negative")
    report = remote.run(args.path, "prune", keep=keep, instance=args.instance,
                        dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    lines = [f"{'keep  ' if d['keep'] else 'remove'} {d['id']} {d['instance']} "
             f"{d['tag'] or '-'}" + (f" ({d['reason']})" if d["keep"] else "")
             for d in report["snapshots"]]
    lines.append(f"kept {report['kept']}, {verb} {report['removed']} snapshot(s)"
                 + ("" if args.dry_run else "; run 'repo gc' to free their unshared data"))
    common.print_result(args, report, lines)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    if args.grace < 0:
        raise E.UsageError("--grace must not be negative")
    report = remote.run(args.path, "gc", grace=args.grace, dry_run=args.dry_run)
    verb = "would free" if args.dry_run else "freed"
    common.print_result(args, report, [
        f"{verb} {report['chunks_freed']} chunk(s), {_size(report['bytes_freed'])}; kept "
        f"{report['chunks_kept']} ({report['snapshots']} snapshot(s), "
        f"{report['live_writers']} running writer(s))"])
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """``repo serve``: the protocol on stdin/stdout, logs on stderr; prints nothing."""
    serve = lazy("ganeti_vol.remote.serve")
    path, append_only = args.path, args.append_only
    original = os.environ.get("SSH_ORIGINAL_COMMAND")
    if original is not None and path is None:  # a forced command (authorized_keys command=)
        path, client_append_only = serve.from_original_command(original)
        append_only = append_only or client_append_only
    session = serve.Session(path=path, restrict=args.restrict_to_path,
                            append_only=append_only)
    serve.serve(session)
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    upgrade = lazy("ganeti_vol.repo.upgrade")
    if remote.is_remote(args.path):
        raise E.UsageError(f"repo upgrade runs on the host that holds the repository (e.g. "
                           f"'ssh HOST ganeti-vol repo upgrade PATH'), not on '{args.path}'")
    report = upgrade.upgrade(args.path)
    common.print_result(args, report, [
        f"upgraded {report['repository']} from format version {report['from']} to "
        f"{report['to']} ({report['moved_chunks']} chunk(s) moved)" if report["upgraded"]
        else f"{report['repository']} is at format version {report['to']} already"])
    return 0


def import_from_image(args: argparse.Namespace, ctx: Any, inst: Any) -> int:
    """``import INSTANCE REPO --from-image URL_OR_PATH --sha256 HEX`` (from cli/transfer.py)."""
    from ganeti_vol.repo import origin

    if not (args.from_image and args.sha256) or "::" in args.source or args.into_existing:
        raise E.UsageError("--from-image URL_OR_PATH needs --sha256 HEX and a repository "
                           "(not a snapshot) as the source")
    result = origin.import_from_image(ctx, inst, args.source, args.from_image, args.sha256,
                                      progress=args.progress)
    o = result.extra["origin"]
    lines = [f"created disk 0 of instance '{result.instance}' from image "
             f"{args.from_image} ({'stored now' if o['stored'] else 'already in the repository'}"
             f" as origin {o['id']}): {result.size / 1e6:.1f} MB, every chunk verified"]
    common.print_result(args, result.to_json(), lines)
    return common.finish(result)
