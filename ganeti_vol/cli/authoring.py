"""The authoring kit: ``ganeti-vol dump|restore`` (and, next, ``ganeti-vol os new|install``).

``dump`` and ``restore`` are what OS scripts call instead of ``dd``
(doc/os-authors.md); their stdout/stdin carry disk data only, every message
goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

from ganeti_vol import config as cfgmod
from ganeti_vol import errors as E
from ganeti_vol import rawio


def register(sub: argparse._SubParsersAction) -> None:
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
            "fsynced at the end.  Replaces 'dd of=$DEV conv=nocreat,notrunc oflag=dsync'."
        ),
    )
    p.add_argument("device", metavar="DEVICE", help="existing file disk or block device")
    p.add_argument("--target-is-zero", action="store_true",
                   help="the target reads as zeros already (fresh thin volume): skip zero runs")
    p.add_argument("--size", metavar="SIZE",
                   help="the input's size (bytes, or with K/M/G/T): checked before and after")
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
            size = cfgmod.parse_size(args.size)
        except ValueError as err:
            raise E.UsageError(f"invalid --size: {err}") from None
    rawio.restore(inp, args.device, known_zero=True if args.target_is_zero else None,
                  size=size)
    return 0


def register_os(os_sub: argparse._SubParsersAction) -> None:
    """``os new`` and ``os install`` (added to ``ganeti-vol os``): the scaffold comes next."""
