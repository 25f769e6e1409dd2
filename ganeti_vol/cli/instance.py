"""``ganeti-vol instance env|create|reinstall|rename|verify-params``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ganeti_vol.cli import common
from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.core.lazy import lazy

env_mod = lazy("ganeti_vol.ganeti.environment")
operations = lazy("ganeti_vol.ops.operations")
opstate = lazy("ganeti_vol.ops.opstate")
transfer = lazy("ganeti_vol.ops.transfer")
if TYPE_CHECKING:
    from ganeti_vol.ops import results

OPS = ("create", "reinstall", "rename", "export", "import", "verify")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p_inst = sub.add_parser("instance", help="run an instance's OS scripts as Ganeti would")
    isub = p_inst.add_subparsers(dest="instance_command", metavar="ACTION")
    isub.required = True

    p = isub.add_parser(
        "env", help="print the exact environment a script would get (replaces env -i ...)"
    )
    common.add_instance_args(p, disk_flag="--disk-spec")
    p.add_argument("--op", choices=OPS, default="create", help="operation (default create)")
    p.add_argument("--disk", dest="disk_index", type=int, default=0, metavar="N",
                   help="disk index for --op export/import (default 0)")
    p.add_argument("--new-name", help="new name, for --op rename")
    p.add_argument("--archive", metavar="ARCHIVE",
                   help="for --op import: the archive (name under export_dir, or path; a "
                        "Ganeti export too) whose OS, parameters and disk sizes a real import "
                        "merges in")
    common.add_operation_args(p)
    p.set_defaults(func=cmd_env)

    for name, helptext, func in (
        ("create", "run the OS create script (Ganeti instance add)", cmd_create),
        ("reinstall", "run create again with INSTANCE_REINSTALL=1", cmd_reinstall),
        ("verify-params", "check the variant and OS parameters, then run 'verify parameters'",
         cmd_verify_params),
    ):
        p = isub.add_parser(name, help=helptext)
        common.add_instance_args(p)
        common.add_operation_args(p)
        p.set_defaults(func=func)
    p = isub.choices["create"]
    p.add_argument("--reinstall", action="store_true", help="same as the reinstall action")

    p = isub.add_parser(
        "status",
        help="ok, busy (an operation runs on it) or broken (its last create, import or "
             "rename did not complete); exit 1 if broken",
    )
    common.add_instance_args(p)
    common.add_json(p)
    p.set_defaults(func=cmd_status)

    p = isub.add_parser("rename", help="run the OS rename script with OLD_INSTANCE_NAME")
    common.add_instance_args(p)
    p.add_argument("new_name", metavar="NEW_NAME")
    common.add_operation_args(p)
    p.set_defaults(func=cmd_rename)


def _merged_with_archive(ctx: Any, args: argparse.Namespace) -> Any:
    """The instance as ``ganeti-vol import`` sees it: merged with the archive's."""
    if args.archive == transfer.STREAM:
        raise E.UsageError("instance env --archive needs an archive, not a stream ('-')")
    inst = common.instance_from_args(args, os_required=False, size_optional=True)
    src = transfer.open_source(ctx, args.archive, None, None)
    try:
        return transfer.merge_from_export(
            inst, src.instance, os_given=bool(args.os_name or (args.instance_file and inst.os)))
    finally:
        src.close()


def cmd_env(args: argparse.Namespace) -> int:
    ctx = common.make_context(args)
    if args.archive and args.op != "import":
        raise E.UsageError("--archive goes with --op import")
    inst = _merged_with_archive(ctx, args) if args.archive else common.instance_from_args(args)
    os_def = ctx.load_os(inst.os)
    debug = ctx.debug_level
    if args.op in ("export", "import"):
        if not 0 <= args.disk_index < len(inst.disks):
            raise E.UsageError(
                f"instance '{inst.name}' has no disk {args.disk_index} "
                f"(it has {len(inst.disks)})"
            )
        builder = env_mod.export_env if args.op == "export" else env_mod.import_env
        env = builder(os_def, inst, args.disk_index, debug=debug)
        env["EXP_SIZE_FD"] = str(C.EXP_SIZE_FD_NUMBER)  # both ways, as Ganeti's daemon
    elif args.op == "rename":
        if not args.new_name:
            raise E.UsageError("--op rename needs --new-name")
        env = env_mod.rename_env(os_def, inst.replace(name=args.new_name), inst.name, debug)
    elif args.op == "verify":
        env = env_mod.verify_env(os_def, inst.os, env_mod.all_osparams(inst), debug)
    else:
        env = env_mod.create_env(os_def, inst, reinstall=args.op == "reinstall", debug=debug)
    common.emit_env(env, args.json)
    return 0


def _run(args: argparse.Namespace,
         func: Callable[..., results.CreateResult | results.RenameResult], *extra: Any) -> int:
    ctx = common.make_context(args)
    inst = common.instance_from_args(args)
    result = func(ctx, inst, *extra)
    out = result.to_json()
    lines = [f"{out['operation']} of instance '{result.instance}' ({result.os}): ok",
             f"log: {result.log}"]
    lines += [f"created sparse disk '{path}'" for path in out.get("disks_created", [])]
    common.print_result(args, out, lines)
    return common.finish(result)


def cmd_create(args: argparse.Namespace) -> int:
    if args.reinstall:
        return cmd_reinstall(args)
    return _run(args, operations.create)


def cmd_reinstall(args: argparse.Namespace) -> int:
    return _run(args, lambda ctx, inst: operations.create(ctx, inst, reinstall=True))


def cmd_rename(args: argparse.Namespace) -> int:
    return _run(args, operations.rename, args.new_name)


def cmd_verify_params(args: argparse.Namespace) -> int:
    ctx = common.make_context(args)
    inst = common.instance_from_args(args)
    result = operations.verify_params(ctx, inst)
    msg = (f"parameters of instance '{inst.name}' are valid for OS '{inst.os}'"
           + ("" if result["checked"] else " (API < 20: no parameter check, as in Ganeti)"))
    common.print_result(args, result, [msg])
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    node = common.node_config(args)
    inst = common.instance_from_args(args, os_required=False, size_optional=True)
    status = opstate.instance_status(node.state_dir, inst)
    line = f"instance '{inst.name}': {status['state']}"
    if status["reason"]:
        line += f": {status['reason']}"
    lines = [line]
    if status["state"] == "broken":
        lines.append("its disks may hold a mix of old and new data until the operation "
                     "is run again and completes")
    common.print_result(args, status, lines)
    return E.EXIT_WARNING if status["state"] == "broken" else 0
