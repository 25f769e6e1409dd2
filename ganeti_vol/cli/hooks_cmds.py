"""``ganeti-vol hooks list|env|run|install``: see, try and install hooks (doc/hooks.md)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from ganeti_vol.cli import common
from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.core import paths
from ganeti_vol.core.lazy import lazy
from ganeti_vol.ganeti import config as cfgmod
from ganeti_vol.ganeti import hookenv as env_mod

hooks = lazy("ganeti_vol.ganeti.hooks")
hooks_install = lazy("ganeti_vol.ganeti.hooks_install")

if TYPE_CHECKING:
    from ganeti_vol.ganeti.hooks import OperationHooks

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p_hooks = sub.add_parser("hooks", help="list, try and install Ganeti hooks")
    hsub = p_hooks.add_subparsers(dest="hooks_command", metavar="ACTION")
    hsub.required = True

    p = hsub.add_parser("list", help="what would run or be skipped, and why, for pre and post")
    p.add_argument("hpath", metavar="HPATH", nargs="?",
                   help="hook path, e.g. instance-add (default: every one)")
    _hooks_dir(p)
    p.set_defaults(func=cmd_list)

    for name, helptext, func in (
        ("run", "run the hooks of HPATH and PHASE without the operation "
                "(exit 10 if a pre hook fails, 11 if a post hook fails)", cmd_run),
        ("env", "print the exact environment the hooks of HPATH and PHASE get", cmd_env),
    ):
        p = hsub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("hpath", metavar="HPATH", choices=sorted(C.HOOK_OP_CODES),
                       help=f"one of: {', '.join(sorted(C.HOOK_OP_CODES))}")
        p.add_argument("phase", metavar="PHASE", choices=C.HOOKS_PHASES, help="pre or post")
        p.add_argument("--instance", metavar="FILE", required=True,
                       help="instance file (doc/instance-file.md)")
        p.add_argument("-e", "--env", dest="extra", action="append", default=[],
                       metavar="KEY=VALUE",
                       help="an operation variable, without the GANETI_ prefix (repeatable), "
                            "e.g. -e ADD_MODE=import")
        _hooks_dir(p)
        p.set_defaults(func=func)
    hsub.choices["run"].add_argument(
        "--log", metavar="FILE", help="append the hooks' output to FILE too")

    p = hsub.add_parser(
        "install", help="install the hooks shipped with ganeti-vol into a hooks directory",
        description="Install the hooks shipped with ganeti-vol into a Ganeti node's hooks "
                    "directory.  Idempotent; a file of the same name that ganeti-vol did "
                    "not install (or that was changed since) is never overwritten.")
    p.add_argument("--target", metavar="DIR",
                   help="hooks directory (default: hooks_dir of the node config)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be done")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 if a foreign file was left alone")
    common.add_json(p)
    p.set_defaults(func=cmd_install)


def _hooks_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hooks-dir", metavar="DIR",
                   help="hooks directory (default: hooks_dir of the node config)")
    common.add_json(p)


# --- list ----------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    node = common.node_config(args)
    base = node.hooks_dir
    hpaths = [args.hpath] if args.hpath else sorted(
        set(hooks.OP_CODES) | set(hooks.hook_paths_present(base)))
    listing = []
    for hpath in hpaths:
        if not C.EXT_PLUGIN_MASK.match(hpath):
            raise E.UsageError(f"invalid hook path '{hpath}'")
        for phase in hooks.PHASES:
            dpath = os.path.join(base, hooks.phase_dir_name(hpath, phase))
            listing.append({
                "hpath": hpath,
                "phase": phase,
                "dir": dpath,
                "exists": os.path.isdir(dpath),
                "run_by_ganeti_vol": hpath in hooks.OP_CODES,
                "entries": [
                    {"hook": e.hook, "path": e.path, "action": "run" if e.runnable else "skip",
                     "reason": e.reason}
                    for e in hooks.scan(base, hpath, phase)
                ],
            })
    if args.json:
        common.emit_json({"hooks_dir": base, "paths": listing})
        return 0
    common.emit(f"hooks directory: {base}")
    for item in listing:
        name = os.path.basename(item["dir"])
        note = "" if item["run_by_ganeti_vol"] else " (not run by ganeti-vol)"
        if not item["exists"]:
            common.emit(f"{name}: no directory{note}")
            continue
        if not item["entries"]:
            common.emit(f"{name}: empty{note}")
            continue
        common.emit(f"{name}:{note}")
        for e in item["entries"]:
            tail = f"  ({e['reason']})" if e["reason"] else ""
            common.emit(f"  {e['action']:<4}  {os.path.basename(e['path'])}{tail}")
    return 0


# --- env / run -----------------------------------------------------------------------------


def _parse_extra(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise E.UsageError(f"invalid -e '{item}': expected KEY=VALUE")
        out[key] = value
    return out


def _prepare(args: argparse.Namespace) -> tuple[OperationHooks, Any, dict[str, str]]:
    """The runner, the instance, and the environment of HPATH/PHASE."""
    runner = hooks.OperationHooks(common.node_config(args))
    inst = cfgmod.load_instance(args.instance)
    base = env_mod.instance_hook_env(args.hpath, inst, runner.node_name)
    extra = _parse_extra(args.extra)
    env_mod.check_extra(base, extra)
    extra = {**env_mod.default_extra(args.hpath, runner.node_name), **extra}
    if args.hpath == "instance-rename" and "INSTANCE_NEW_NAME" not in extra:
        raise E.UsageError("instance-rename hooks need -e INSTANCE_NEW_NAME=NAME")
    lu_env = runner.lu_env(args.hpath, inst, extra)
    return runner, inst, runner.env(args.hpath, args.phase, lu_env)


def cmd_env(args: argparse.Namespace) -> int:
    _, _, env = _prepare(args)
    common.emit_env(env, args.json)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    runner, inst, env = _prepare(args)
    log_path = os.path.abspath(args.log) if args.log else None
    results = runner.run_phase(args.hpath, args.phase, env, log_path)
    dname = hooks.phase_dir_name(args.hpath, args.phase)
    if args.json:
        common.emit_json({
            "hpath": args.hpath, "phase": args.phase, "instance": inst.name,
            "dir": os.path.join(runner.node.hooks_dir, dname),
            "results": [r.to_json() for r in results],
        })
    else:
        common.emit(f"{dname} for instance '{inst.name}': "
                    + (f"{len(results)} entr{'y' if len(results) == 1 else 'ies'}"
                       if results else "no hooks"))
        for r in results:
            detail = f": {r.reason}" if r.reason else f" ({r.duration:.2f}s)"
            common.emit(f"  {r.status.name.lower():<10} {r.hook}{detail}")
            for line in r.output.splitlines() if r.output != r.reason else ():
                common.emit(f"      {line}")
    failed = [r for r in results if r.failed]
    if failed and args.phase == C.HOOKS_PHASE_PRE:
        raise hooks.veto_error(args.hpath, inst.name, failed)
    if failed:
        raise hooks.post_warning(failed, ran_operation=False)
    return 0


# --- install -------------------------------------------------------------------------------


def ganeti_vol_command() -> str:
    """How the installed hooks should run this ganeti-vol (their PATH lacks /usr/local/bin)."""
    script = os.path.join(os.path.dirname(sys.executable), "ganeti-vol")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return script
    return f"{sys.executable} -m ganeti_vol"


def cmd_install(args: argparse.Namespace) -> int:
    node = common.node_config(args)
    source = paths.shipped_dir("hooks")
    if source is None:
        raise E.ConfigError("cannot find the shipped hooks directory (broken install?)")
    target = os.path.abspath(args.target or node.hooks_dir)
    settings = {"GANETI_VOL": ganeti_vol_command(), "GANETI_VOL_CONFIG": node.source,
                "EXPORT_DIR": node.export_dir}
    actions = hooks_install.install(source, target, settings, dry_run=args.dry_run)
    foreign = [a for a in actions if a.action == "skipped"]
    if args.json:
        common.emit_json({"source": source, "target": target, "dry_run": args.dry_run,
                          "actions": [a.to_json() for a in actions]})
    else:
        prefix = "would be " if args.dry_run else ""
        common.emit(f"hooks from '{source}' into '{target}'"
                    + (" (dry run)" if args.dry_run else "") + ":")
        for a in actions:
            what = a.action if a.action in ("unchanged", "kept", "skipped") else prefix + a.action
            common.emit(f"  {what:<10} {a.file}" + (f": {a.detail}" if a.detail else ""))
    if foreign:
        names = ", ".join(f"'{os.path.join(target, a.file)}'" for a in foreign)
        log.warning("left foreign file(s) alone: %s", names)
        if args.strict:
            return E.EXIT_WARNING
    return 0
