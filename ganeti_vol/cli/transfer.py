"""``ganeti-vol export`` and ``ganeti-vol import``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ganeti_vol.cli import common
from ganeti_vol.core import errors as E
from ganeti_vol.core.lazy import lazy

# the transfer code loads only when a command runs one
if TYPE_CHECKING:
    from ganeti_vol.ops import transfer
    from ganeti_vol.ops.results import DiskExport, DiskImport
else:
    transfer = lazy("ganeti_vol.ops.transfer")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "export",
        help="export every disk of an instance into a verified archive (or one stream with -o -)",
    )
    common.add_instance_args(p)
    p.add_argument("-o", "--output", metavar="DIR|-",
                   help="export directory (default: the node's export_dir), or - for one "
                        "self-describing stream on stdout")
    p.add_argument("--raw", action="store_true",
                   help="read the disks directly instead of running the OS export script")
    p.add_argument("--format", choices=("native", "ganeti"), default="native",
                   help="native: lz4 dumps + manifest (default); ganeti: what Ganeti writes "
                        "(uncompressed dumps + config.ini), importable by Ganeti")
    p.add_argument("--archive-name", metavar="NAME",
                   help="archive directory name (default: the instance name)")
    p.add_argument("--force", action="store_true",
                   help="also replace an archive of another instance or a damaged one, and "
                        "export a broken instance (never replaces what is not an archive)")
    p.add_argument("--repo", metavar="PATH",
                   help="store a snapshot in this backup repository instead (only the chunks "
                        "it lacks; see 'ganeti-vol repo')")
    p.add_argument("--tag", metavar="TAG", help="with --repo: label the snapshot")
    common.add_operation_args(p, progress=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import",
        help="import an archive, a Ganeti export or a stream (-) into an instance's disks",
    )
    common.add_instance_args(p)
    p.add_argument("source", metavar="ARCHIVE|-|REPO::SNAPSHOT",
                   help="archive name (under export_dir) or path, a Ganeti export dir, - "
                        "for a stream on stdin, or a repository snapshot")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--raw", dest="raw", action="store_const", const=True, default=None,
                      help="write the disks directly (only right if the dumps are raw images)")
    mode.add_argument("--script", dest="raw", action="store_const", const=False,
                      help="always feed the OS import script")
    p.add_argument("--from-image", metavar="URL_OR_PATH",
                   help="create disk 0 from a raw image through the repository given as the "
                        "source (stored once as an origin that instances share)")
    p.add_argument("--sha256", metavar="HEX", help="with --from-image: the image's SHA-256")
    p.add_argument("--into-existing", action="store_true",
                   help="from a repository snapshot: the disks exist and hold an older state; "
                        "write only the chunks that differ (also resumes an interrupted import)")
    common.add_operation_args(p, progress=True)
    p.set_defaults(func=cmd_import)


def _summary_lines(disks: Sequence[DiskExport | DiskImport]) -> list[str]:
    lines = []
    for d in disks:
        s, stored = d.summary, d.stored_bytes
        ratio = f", x{s.size / stored:.2f}" if stored else ""
        lines.append(
            f"disk {d.index}: {s.size / 1e6:.1f} MB ({d.mode}"
            + (f" -> {stored / 1e6:.1f} MB{ratio}" if stored else "")
            + f", {s.zero_chunks} zero chunks) in {s.seconds:.2f}s"
        )
    return lines


def cmd_export(args: argparse.Namespace) -> int:
    ctx = common.make_context(args)
    inst = common.instance_from_args(args, os_required=False)
    to_stream = args.output == transfer.STREAM
    if to_stream and os.isatty(1):
        raise E.UsageError("refusing to write an export stream to a terminal (redirect stdout)")
    into = None
    if args.repo:
        if args.output or args.format != "native" or args.archive_name:
            raise E.UsageError("--repo stores a snapshot: it takes no -o, --format or "
                               "--archive-name")
        from ganeti_vol import remote, repo

        ctx, into = repo.prepare_export(ctx, remote.open_repository(args.repo, write=True),
                                        tag=args.tag)
    elif args.tag:
        raise E.UsageError("--tag labels a repository snapshot: it needs --repo")
    result = transfer.export_instance(
        ctx, inst, output=args.output, out_fd=1 if to_stream else None, raw=args.raw,
        fmt=args.format, name=args.archive_name, progress=args.progress, force=args.force,
        into=into,
    )
    out = result.to_json()
    lines = [
        f"exported instance '{result.instance}' to {result.path}: "
        f"{result.size / 1e6:.1f} MB in {out['seconds']:.2f}s "
        f"({out['mb_per_s']} MB/s)" + (f", stored x{out['ratio']}" if out["ratio"] else ""),
        *_summary_lines(result.disks),
    ]
    if "repository" in result.extra:
        r = result.extra["repository"]
        lines.append(f"repository: {r['new_chunks']} new chunk(s), {r['new_bytes'] / 1e6:.1f} MB "
                     f"({r['new_stored_bytes'] / 1e6:.1f} MB stored); {r['reused_chunks']} "
                     f"reused, {r['reused_bytes'] / 1e6:.1f} MB; {r['zero_chunks']} zero")
    if to_stream:  # stdout carries the stream: the summary goes to stderr
        sys.stderr.write((json.dumps(out, default=str) if args.json else "\n".join(lines)) + "\n")
    else:
        common.print_result(args, out, lines)
    return common.finish(result)


def cmd_import(args: argparse.Namespace) -> int:
    ctx = common.make_context(args)
    inst = common.instance_from_args(args, os_required=False, size_optional=True)
    from_stream = args.source == transfer.STREAM
    if from_stream and os.isatty(0):
        raise E.UsageError("refusing to read an import stream from a terminal (redirect stdin)")
    source: Any = args.source
    if args.from_image or args.sha256:
        from ganeti_vol.cli import repo_cmds

        return repo_cmds.import_from_image(args, ctx, inst)
    if not from_stream and "::" in source:
        from ganeti_vol import remote

        source = remote.open_snapshot(source)
        if args.into_existing:
            from ganeti_vol.cli import repo_cmds

            return repo_cmds.import_into_existing(args, ctx, inst, source)
    if args.into_existing:
        raise E.UsageError("--into-existing needs a repository snapshot (REPO::SNAPSHOT)")
    result = transfer.import_instance(
        ctx, inst, source, in_fd=0 if from_stream else None, raw=args.raw,
        os_given=bool(args.os_name or (args.instance_file and inst.os)), progress=args.progress,
    )
    out = result.to_json()
    lines = [
        f"imported instance '{result.instance}' from {result.source}: "
        f"{result.size / 1e6:.1f} MB in {out['seconds']:.2f}s ({out['mb_per_s']} MB/s); "
        + ("not verified: a Ganeti export records no checksums"
           if result.source_format == "ganeti" else "every chunk verified"),
        *_summary_lines(result.disks),
    ]
    if result.repaired:
        lines.append(f"instance '{result.instance}' was broken ({result.repaired}); "
                     "it is good again")
    rename = result.rename
    if rename is not None:
        error = "" if rename.failure is None else str(rename.failure)
        lines.append(f"rename script ({rename.old_name} -> {result.instance}): "
                     f"{'ok' if rename.ok else 'failed'}" + (f": {error}" if error else ""))
    common.print_result(args, out, lines)
    return common.finish(result)  # a failed post hook (exit 11) outranks the rename warning
