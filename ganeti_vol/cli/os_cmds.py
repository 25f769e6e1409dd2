"""``ganeti-vol os list|diagnose|info`` (gnt-os's verbs for one node)."""

from __future__ import annotations

import argparse
from typing import Any

from ganeti_vol.cli import authoring, common, conformance
from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.core.lazy import lazy
from ganeti_vol.core.model import OSDefinition, OSEntry, printable

discovery = lazy("ganeti_vol.ganeti.discovery")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p_os = sub.add_parser("os", help="list, diagnose and describe OS definitions")
    os_sub = p_os.add_subparsers(dest="os_command", metavar="ACTION")
    os_sub.required = True

    p = os_sub.add_parser("list", help="valid OS names, one name+variant per line (gnt-os list)")
    common.add_json(p)
    common.add_search_path(p)
    p.add_argument("--no-headers", action="store_true", help="do not print the header line")
    p.set_defaults(func=cmd_list)

    p = os_sub.add_parser(
        "diagnose", help="every OS entry with its validity and reason; exit 1 if any is invalid"
    )
    common.add_json(p)
    common.add_search_path(p)
    p.set_defaults(func=cmd_diagnose)

    p = os_sub.add_parser("info", help="details of one OS definition")
    p.add_argument("name", metavar="NAME", help="OS name (a +variant suffix is accepted)")
    common.add_json(p)
    common.add_search_path(p)
    p.set_defaults(func=cmd_info)

    # `os new` (authoring kit) and `os test` (conformance runner) live in their own modules
    authoring.register_os(os_sub)
    conformance.register_os(os_sub)


def _search_path(args: argparse.Namespace) -> tuple[str, ...]:
    search_path: tuple[str, ...] = common.make_context(args).os_search_path
    return search_path


def os_to_json(os_def: OSDefinition) -> dict[str, Any]:
    return {
        "name": os_def.name,
        "path": os_def.path,
        "api_versions": list(os_def.api_versions),
        "api_version": os_def.api_version,
        "variants": list(os_def.variants),
        "parameters": [{"name": n, "description": d} for n, d in os_def.parameters],
        "trusted": os_def.trusted,
        "scripts": dict(sorted(os_def.scripts.items())),
        "wants_block_devices": os_def.wants_block_devices,
    }


def entry_to_json(entry: OSEntry) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": entry.name,
        "path": entry.path,
        "valid": entry.valid,
        "diagnose": entry.diagnose,
    }
    if entry.os:
        out["os"] = os_to_json(entry.os)
    out["shadowed"] = [entry_to_json(s) for s in entry.shadowed]
    return out


def cmd_list(args: argparse.Namespace) -> int:
    entries = discovery.diagnose(_search_path(args))
    names = [n for e in entries if e.valid and e.os for n in e.os.full_names()]
    if args.json:
        common.emit_json(names)
        return 0
    if not args.no_headers:
        common.emit("Name")
    for name in names:
        common.emit(name)
    return 0


def describe(entry: OSEntry) -> str:
    """One line like ``gnt-os diagnose``."""
    if not entry.valid or entry.os is None:
        return f"invalid - {entry.diagnose} (path: {printable(entry.path)})"
    o = entry.os
    parts = [f"valid (path: {printable(o.path)})",
             f"[API versions: {', '.join(map(str, o.api_versions))}]"]
    if o.max_api >= C.OS_API_V15:
        parts.append(f"[variants: {', '.join(o.variants)}]" if o.variants else "[no variants]")
    if o.max_api >= C.OS_API_V20:
        names = ", ".join(o.parameter_names)
        parts.append(f"[parameters: {names}]" if names else "[no parameters]")
    parts.append("[trusted]" if o.trusted else "[untrusted]")
    return " ".join(parts)


def _shown(name: str) -> str:
    """An OS name as it can be one; any other directory name quoted (and escaped)."""
    return name if C.EXT_PLUGIN_MASK.match(name) else repr(name)


def cmd_diagnose(args: argparse.Namespace) -> int:
    search = _search_path(args)
    entries = discovery.diagnose(search)
    invalid = [e for e in entries if not e.valid]
    if args.json:
        common.emit_json(
            {"search_path": list(search), "entries": [entry_to_json(e) for e in entries]}
        )
    else:
        if not entries:
            common.emit(f"no OS definitions found in {', '.join(search) or '(empty search path)'}")
        for e in entries:  # names and paths escaped: one line per entry whatever they hold
            common.emit(f"{_shown(e.name)}: {describe(e)}")
            for s in e.shadowed:
                status = "valid" if s.valid else f"invalid - {s.diagnose}"
                common.emit(f"    [hidden] path: {printable(s.path)}, status: {status}")
    return E.EXIT_WARNING if invalid else 0


def cmd_info(args: argparse.Namespace) -> int:
    os_def = discovery.load_os(args.name, _search_path(args))
    data = os_to_json(os_def)
    if args.json:
        common.emit_json(data)
        return 0
    common.emit(f"OS: {os_def.name}")
    common.emit(f"  path: {os_def.path}")
    common.emit(f"  API versions: {', '.join(map(str, os_def.api_versions))} "
                f"(negotiated: {os_def.api_version})")
    common.emit(f"  trusted: {'yes' if os_def.trusted else 'no'}")
    if os_def.variants:
        common.emit(f"  variants: {', '.join(os_def.variants)} (default: {os_def.variants[0]})")
    else:
        common.emit("  variants: (none)")
    if os_def.parameters:
        common.emit("  parameters:")
        for name, desc in os_def.parameters:
            common.emit(f"    {name}: {desc}" if desc else f"    {name}")
    else:
        common.emit("  parameters: (none)")
    common.emit(f"  scripts: {', '.join(sorted(os_def.scripts))}")
    if os_def.wants_block_devices:
        common.emit("  disks: attached as block devices (ganeti_vol.conf)")
    return 0
