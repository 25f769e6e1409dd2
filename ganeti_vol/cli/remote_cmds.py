"""``ganeti-vol move INSTANCE_FILE ssh://node2/INSTANCE_FILE``: copy an instance's disks to
another node, sending only the chunks that differ (ganeti_vol/remote/move.py)."""

from __future__ import annotations

import argparse

from ganeti_vol.cli import common
from ganeti_vol.core import errors as E


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("move", help="copy an instance's disks into its existing disks on another "
                                    "node over ssh, sending only the chunks that differ")
    p.add_argument("instance_file", metavar="INSTANCE_FILE",
                   help="the instance here (with --receive: the instance on this node)")
    p.add_argument("destination", metavar="ssh://[user@]host[:port]/INSTANCE_FILE", nargs="?",
                   help="the same instance's file on the destination node; its disks exist")
    p.add_argument("--receive", action="store_true",
                   help="the destination's side, which ssh runs there (speaks the protocol "
                        "on stdin/stdout)")
    common.add_json(p)
    p.set_defaults(func=cmd_move)


def cmd_move(args: argparse.Namespace) -> int:
    from ganeti_vol.ganeti.config import load_instance
    from ganeti_vol.remote import move

    ctx = common.make_context(args)
    instance = load_instance(args.instance_file)
    if args.receive:
        if args.destination:
            raise E.UsageError("move --receive takes only the INSTANCE_FILE")
        move.receive(ctx, instance)
        return 0
    if not args.destination or not args.destination.startswith("ssh://"):
        raise E.UsageError("move needs a destination ssh://[user@]host[:port]/INSTANCE_FILE")
    result = move.move(ctx, instance, args.destination)
    lines = [f"moved instance '{result['instance']}' to {result['destination']}: "
             f"{result['sent_chunks']} chunk(s) differed, {result['sent_bytes'] / 1e6:.1f} MB "
             f"sent ({result['link_bytes_sent'] / 1e6:.1f} MB on the link) for "
             f"{result['size'] / 1e6:.1f} MB of disk in {result['seconds']:.2f}s; every "
             "written chunk verified"]
    lines += [f"disk {d['index']}: {d['written_chunks']} of {d['chunks']} chunk(s) written"
              for d in result["disks"]]
    common.print_result(args, result, lines)
    return 0
