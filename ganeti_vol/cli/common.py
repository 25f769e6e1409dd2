"""Helpers shared by the CLI modules: output, node config, instances from files or flags."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ganeti_vol.core import errors as E
from ganeti_vol.core.lazy import lazy
from ganeti_vol.core.model import Instance, NodeConfig
from ganeti_vol.ganeti import config as cfgmod
from ganeti_vol.ganeti import fields

# the operations and the hooks runner load only when a command runs one
if TYPE_CHECKING:
    from ganeti_vol.ganeti import hooks as hooks_mod
    from ganeti_vol.ops import operations, results
else:
    hooks_mod = lazy("ganeti_vol.ganeti.hooks")
    operations = lazy("ganeti_vol.ops.operations")


def emit(text: str = "") -> None:
    """Write one line of command output to stdout (the only place that does)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


#: set once a command has printed its JSON result (main() then adds no JSON error after it)
json_emitted = False


def emit_json(obj: Any) -> None:
    global json_emitted
    emit(json.dumps(obj, indent=2, sort_keys=True, default=str))
    json_emitted = True


def emit_table(rows: Sequence[Sequence[Any]], headers: Sequence[str] | None = None) -> None:
    all_rows = [list(map(str, r)) for r in rows]
    if headers:
        all_rows.insert(0, list(headers))
    if not all_rows:
        return
    widths = [max(len(r[i]) for r in all_rows if i < len(r)) for i in range(len(all_rows[0]))]
    for row in all_rows:
        emit("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())


def node_config(args: argparse.Namespace) -> NodeConfig:
    node = cfgmod.load_node_config(getattr(args, "config", None))
    overrides = {}
    for attr, key in (("export_dir", "export_dir"), ("log_dir", "log_dir"), ("hooks_dir", "hooks_dir")):
        value = getattr(args, attr, None)
        if value:
            overrides[key] = os.path.abspath(value)
    return node.replace(**overrides) if overrides else node


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def add_search_path(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--search-path",
        metavar="DIR",
        action="append",
        default=[],
        help="look for OS definitions in DIR before the node's os_search_path (repeatable)",
    )


def add_debug_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug-level",
        type=int,
        default=0,
        choices=range(0, 10),
        metavar="N",
        help="DEBUG_LEVEL passed to the OS scripts (default 0)",
    )


def add_instance_args(
    parser: argparse.ArgumentParser, *, file_required: bool = False, disk_flag: str = "--disk"
) -> None:
    """INSTANCE_FILE, or the simple case from flags (--name/--os/--disk/-O)."""
    parser.add_argument(
        "instance_file",
        metavar="INSTANCE_FILE",
        nargs=None if file_required else "?",
        help="instance file (doc/instance-file.md)",
    )
    g = parser.add_argument_group("instance from flags (override the file)")
    g.add_argument("--name", help="instance name")
    g.add_argument("--os", dest="os_name", metavar="OS[+VARIANT]", help="OS definition")
    g.add_argument("--hypervisor", help="hypervisor name (default kvm)")
    g.add_argument(
        disk_flag,
        dest="disk",
        action="append",
        default=[],
        metavar="PATH[,size=SIZE]",
        help="a disk (repeat for more); size in MiB or with K/M/G/T; replaces the file's disks",
    )
    g.add_argument(
        "-O", "--os-parameters", action="append", default=[], metavar="KEY=VALUE",
        help="OS parameter (repeatable, or comma-separated)",
    )
    g.add_argument(
        "--os-parameters-private", action="append", default=[], metavar="KEY=VALUE",
        help="private OS parameter (never written in clear to exports)",
    )
    g.add_argument("-B", "--backend-parameters", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("-H", "--hypervisor-parameters", action="append", default=[], metavar="KEY=VALUE")


def instance_from_args(
    args: argparse.Namespace, *, os_required: bool = True, size_optional: bool = False
) -> Instance:
    """Build the instance from INSTANCE_FILE and/or flags."""
    base: Instance | None = None
    if args.instance_file:
        base = cfgmod.load_instance(args.instance_file, size_optional=size_optional)
    elif not args.name or (os_required and not args.os_name):
        raise E.UsageError(
            "give an INSTANCE_FILE, or at least --name" + (" and --os" if os_required else "")
        )
    name = args.name or (base.name if base else "")
    if args.name and not fields.HOSTNAME_RE.match(args.name):
        raise E.UsageError(f"invalid instance name '{args.name}'")
    inst_uuid = base.uuid if base else fields.instance_uuid_for(name)
    now = time.time()
    inst = base or Instance(name=name, os=args.os_name or "", uuid=inst_uuid, ctime=now, mtime=now,
                            primary_node=fields.this_node())
    changes: dict[str, Any] = {}
    if args.name:
        changes["name"] = args.name
    if args.os_name:
        changes["os"] = args.os_name
    if args.hypervisor:
        changes["hypervisor"] = args.hypervisor
    if args.disk:
        disks = []
        for i, text in enumerate(args.disk):
            values = fields.parse_disk_option(text)
            disks.append(fields.make_disk(i, inst_uuid, size_optional=size_optional, **values))
        changes["disks"] = tuple(disks)
    for attr, field, what in (
        ("os_parameters", "osparams", "OS parameter"),
        ("os_parameters_private", "osparams_private", "private OS parameter"),
        ("backend_parameters", "beparams", "backend parameter"),
        ("hypervisor_parameters", "hvparams", "hypervisor parameter"),
    ):
        values = fields.parse_key_values(getattr(args, attr), what)
        if values:
            changes[field] = {**getattr(inst, field), **values}
    if not changes:
        return inst
    # names and values checked as Ganeti checks -H/-B (a file's were checked on loading)
    return fields.checked_params(inst.replace(**changes))


def emit_env(env: dict[str, str], as_json: bool) -> None:
    """An environment as JSON, or as sorted KEY=VALUE lines."""
    if as_json:
        emit_json(env)
    else:
        for key in sorted(env):
            emit(f"{key}={env[key]}")


def print_result(args: argparse.Namespace, result: dict[str, Any], lines: Iterable[str]) -> None:
    if getattr(args, "json", False):
        emit_json(result)
    else:
        for line in lines:
            emit(line)


def make_context(args: argparse.Namespace, node: NodeConfig | None = None) -> Any:
    """The OpContext for an operation: node config, DEBUG_LEVEL, hooks, search path."""
    node = node or node_config(args)
    no_hooks = getattr(args, "no_hooks", False)
    hooks: Any = operations.NoHooks() if no_hooks else hooks_mod.OperationHooks(node)
    return operations.OpContext(
        node=node,
        debug_level=getattr(args, "debug_level", 0) or 0,
        hooks=hooks,
        search_path=tuple(os.path.abspath(p) for p in getattr(args, "search_path", []) or []),
    )


def finish(result: results.Result) -> int:
    """Exit status once an operation's result is printed, from its warnings: PostHookWarning
    (exit 11) raised if post hooks failed (it outranks every other warning), EXIT_WARNING
    for any other (a failed rename script after an import), else 0.  The operation itself
    succeeded either way."""
    for warning in result.warnings:
        if isinstance(warning, E.PostHookWarning):
            raise warning
    return E.EXIT_WARNING if result.warnings else E.EXIT_OK


def add_operation_args(p: argparse.ArgumentParser, *, progress: bool = False) -> None:
    """--json, --search-path, --debug-level, --no-hooks (and --progress for transfers)."""
    add_json(p)
    add_search_path(p)
    add_debug_level(p)
    p.add_argument("--no-hooks", action="store_true", help="do not run hooks")
    if progress:
        p.add_argument("--progress", choices=("auto", "bar", "json", "none"), default="auto",
                       help="progress on stderr: a bar on a terminal (auto), JSON lines, or none")
