"""The authoring kit: ``ganeti-vol dump|restore`` and ``ganeti-vol os new|install``.

``dump`` and ``restore`` are what OS scripts call instead of ``dd``
(doc/os-authors.md); their stdout/stdin carry disk data only, every message
goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

from ganeti_vol.cli import common
from ganeti_vol.core import errors as E
from ganeti_vol.core.lazy import lazy

fields = lazy("ganeti_vol.ganeti.fields")
rawio = lazy("ganeti_vol.engine.rawio")
scaffold = lazy("ganeti_vol.authoring.scaffold")

#: the scaffold templates (ganeti_vol/templates/<name>); the scaffold and jinja2 are
#: imported only by 'os new' and 'os install', so dump and restore start faster
TEMPLATES = ("raw", "image", "image-sh", "python")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dump",
        help="write a disk (file or block device) raw to stdout, fast (for export scripts)",
        description=(
            "Write DEVICE raw to stdout: holes of a file disk are not read, data moves "
            "with sendfile.  The size is announced first on EXP_SIZE_FD when that is "
            "set (Ganeti sets it for export scripts).  Replaces 'dd if=$DEV bs=1M'."
        ),
    )
    p.add_argument("device", metavar="DEVICE", help="file disk or block device")
    p.add_argument("--size-fd", type=int, metavar="FD",
                   help="announce the size on FD (default: $EXP_SIZE_FD, if set)")
    p.set_defaults(func=cmd_dump)

    p = sub.add_parser(
        "restore",
        help="write stdin into a disk without truncating it, skipping zeros (for import scripts)",
        description=(
            "Write stdin into the existing DEVICE: a file disk is never truncated or "
            "extended, a block device is claimed (O_EXCL); O_DIRECT where possible.  "
            "Mounted or held targets, and targets smaller than a known input size, are "
            "refused.  Zero runs are skipped when the target reads as zeros (a file disk "
            "without data, or --target-is-zero) and zeroed otherwise.  The target is "
            "fsynced at the end; with --verify it is then read back and compared.  "
            "Replaces 'dd of=$DEV conv=nocreat,notrunc oflag=dsync'."
        ),
    )
    p.add_argument("device", metavar="DEVICE", help="existing file disk or block device")
    p.add_argument("--target-is-zero", action="store_true",
                   help="the target reads as zeros already (fresh thin volume): skip zero runs")
    p.add_argument("--size", metavar="SIZE",
                   help="the input's size (bytes, or with K/M/G/T): checked before and after")
    p.add_argument("--verify", action="store_true",
                   help="after the fsync, read everything written back from the disk "
                        "(O_DIRECT where possible) and compare it with what was meant to "
                        "land, 4 MiB at a time; a mismatch fails with exit code 17")
    p.set_defaults(func=cmd_restore)


def _is_tty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def cmd_dump(args: argparse.Namespace) -> int:
    out = sys.stdout.fileno()
    if _is_tty(out):
        raise E.UsageError("refusing to write disk data to a terminal: redirect stdout")
    sys.stdout.flush()
    rawio.dump(args.device, out, size_fd=args.size_fd)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    inp = sys.stdin.fileno()
    if _is_tty(inp):
        raise E.UsageError("refusing to read disk data from a terminal: redirect stdin")
    size = None
    if args.size is not None:
        try:
            size = fields.parse_size(args.size)
        except ValueError as err:
            raise E.UsageError(f"invalid --size: {err}") from None
    rawio.restore(inp, args.device, known_zero=True if args.target_is_zero else None,
                  size=size, verify=args.verify)
    return 0


def register_os(os_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``os new`` and ``os install`` (added to ``ganeti-vol os``)."""
    p = os_sub.add_parser(
        "new",
        help="create a new OS definition from a template (raw, image, image-sh or python)",
        description=(
            "Render a complete OS definition into DIR/NAME: ganeti_api_version (20, 15, "
            "10), variants.list, parameters.list, the five scripts (each prints its "
            "usage on --help), a verify that checks the declared parameters, and a "
            "README.  It passes 'ganeti-vol os diagnose' and 'ganeti-vol os test' as it is."
        ),
    )
    p.add_argument("name", metavar="NAME", help="OS name (letters, digits, _ and -)")
    p.add_argument("--template", required=True, choices=TEMPLATES,
                   help="raw: dump/restore shell scripts; image: install an image file "
                        "(Python); image-sh: the same image OS as POSIX shell scripts; "
                        "python: a Python skeleton using ganeti_vol.osapi")
    p.add_argument("--variants", action="append", default=[], metavar="A,B",
                   help="variant names (the first is the default; default: 'default')")
    p.add_argument("--param", action="append", default=[], metavar="NAME:[TYPE:]DESCRIPTION",
                   help="declare an OS parameter (TYPE: str, bool, int or list; default str); "
                        "repeatable")
    p.add_argument("--dir", default=".", metavar="DIR",
                   help="where to create NAME/ (default: the current directory)")
    p.add_argument("--python", metavar="PATH",
                   help="the Python with ganeti_vol that the scripts use, recorded in "
                        "NAME/ganeti-vol.python (default: the one running this command)")
    p.add_argument("--force", action="store_true", help="replace an existing DIR/NAME")
    common.add_json(p)
    p.set_defaults(func=cmd_os_new)

    p = os_sub.add_parser(
        "install",
        help="copy an OS definition into the OS search path, recording this Python",
        description=(
            "Copy SOURCE (an OS definition directory, or the name of one shipped with "
            "ganeti-vol: raw, image, sample) into DEST/NAME and record the Python that "
            "has ganeti_vol in DEST/NAME/ganeti-vol.python, so the scripts find it under "
            "Ganeti's fixed PATH.  An invalid OS definition is refused."
        ),
    )
    p.add_argument("source", metavar="SOURCE", help="OS definition directory or shipped OS name")
    p.add_argument("--dest", metavar="DIR",
                   help="OS directory (default: the first of the node's os_search_path, "
                        "/srv/ganeti/os)")
    p.add_argument("--name", help="install under this name (default: SOURCE's)")
    p.add_argument("--python", metavar="PATH",
                   help="the Python with ganeti_vol (default: the one running this command)")
    p.add_argument("--force", action="store_true", help="replace an existing installation")
    common.add_json(p)
    p.set_defaults(func=cmd_os_install)


def cmd_os_new(args: argparse.Namespace) -> int:
    params = [scaffold.parse_param(text) for text in args.param]
    result = scaffold.new_os(
        args.name, args.template, parent=args.dir, variants=scaffold.parse_variants(args.variants),
        params=params, python=args.python, force=args.force,
    )
    common.print_result(args, result, [
        f"created OS definition '{result['name']}' in {result['path']} "
        f"(template {result['template']}, variants: {', '.join(result['variants'])}, "
        f"parameters: {', '.join(result['parameters']) or 'none'})",
        "next: edit it, then try it without a cluster (see its README.md):",
        f"  ganeti-vol os diagnose --search-path {os.path.dirname(result['path'])}",
        f"  ganeti-vol os test {result['path']}",
        f"  ganeti-vol os install {result['path']}",
    ])
    return 0


def cmd_os_install(args: argparse.Namespace) -> int:
    dest = args.dest
    if not dest:
        search = common.node_config(args).os_search_path
        if not search:
            raise E.UsageError("the node config has no os_search_path: give --dest")
        dest = search[0]
    result = scaffold.install_os(args.source, dest, name=args.name, python=args.python,
                                 force=args.force)
    common.print_result(args, result, [
        f"installed OS definition '{result['name']}' in {result['path']} "
        f"(from {result['source']}; Python: {result['python']})",
    ])
    return 0

