"""``ganeti-vol backup list|info|verify|remove`` (gnt-backup's verbs) on export archives.

An archive is named by its directory under the node's ``export_dir``
(``--export-dir`` overrides it), or given as a path (anything with a ``/``).
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from ganeti_vol.cli import common
from ganeti_vol.core import errors as E
from ganeti_vol.core.lazy import lazy

archive = lazy("ganeti_vol.formats.archive")
P = lazy("ganeti_vol.engine.progress")
parallel = lazy("ganeti_vol.engine.parallel")

if TYPE_CHECKING:
    from ganeti_vol.engine.parallel import Engine


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p_backup = sub.add_parser("backup", help="list, show, verify and remove export archives")
    bsub = p_backup.add_subparsers(dest="backup_command", metavar="ACTION")
    bsub.required = True

    p = bsub.add_parser("list", help="list the archives in the export directory")
    p.add_argument("--no-headers", action="store_true", help="no header line (gnt-backup list)")
    p.add_argument("--separator", metavar="SEP",
                   help="separate the fields with SEP instead of aligning them in columns")
    p.add_argument("-o", dest="fields", metavar="[+]FIELD,...",
                   help=f"the fields to show (default: {','.join(LIST_DEFAULT)}; +FIELD,... adds "
                        f"to these); fields: {', '.join(LIST_FIELDS)}")
    _common(p)
    p.set_defaults(func=cmd_list)

    p = bsub.add_parser("info", help="show an archive's instance, disks and sizes")
    p.add_argument("archive", metavar="NAME|PATH")
    _common(p)
    p.set_defaults(func=cmd_info)

    p = bsub.add_parser(
        "verify", help="re-hash every chunk; report the first bad disk and offset"
    )
    p.add_argument("archives", metavar="NAME|PATH", nargs="+")
    p.add_argument("--progress", choices=P.MODES, default="auto",
                   help="progress on stderr: a bar on a terminal (auto), JSON lines, or none")
    _common(p)
    p.set_defaults(func=cmd_verify)

    p = bsub.add_parser("remove", help="remove archives (only directories that are archives)")
    p.add_argument("archives", metavar="NAME|PATH", nargs="+")
    _common(p)
    p.set_defaults(func=cmd_remove)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--export-dir", metavar="DIR",
                   help="export directory (default: the node config's export_dir)")
    common.add_json(p)


def _path(args: argparse.Namespace, name: str) -> str:
    path: str = archive.resolve(name, common.node_config(args).export_dir)
    return path


def _size(n: int | None) -> str:
    return "-" if n is None else P.format_bytes(n)


#: ``backup list -o`` fields: how each is shown for a valid archive (an invalid one shows
#: its name, path, "broken" as format and the error under CREATED and ERROR, "-" elsewhere)
LIST_FIELDS: dict[str, Any] = {
    "name": lambda e: e["name"],
    "format": lambda e: e["format"],
    "instance": lambda e: e["instance"],
    "os": lambda e: e.get("os") or "-",
    "disks": lambda e: len(e["disks"]),
    "size": lambda e: _size(e["size"]),
    "stored": lambda e: _size(e["stored_bytes"]),
    "created": lambda e: e.get("created") or "-",
    "path": lambda e: e["path"],
    "valid": lambda e: "Y",
    "error": lambda e: "-",
}
LIST_DEFAULT = ("name", "format", "instance", "disks", "size", "stored", "created")


def _list_fields(text: str | None) -> list[str]:
    """``-o`` as gnt-backup takes it: ``a,b`` replaces the default fields, ``+a,b`` adds."""
    if not text:
        return list(LIST_DEFAULT)
    extra = text.startswith("+")
    fields = [f.strip().lower() for f in text.removeprefix("+").split(",") if f.strip()]
    unknown = [f for f in fields if f not in LIST_FIELDS]
    if unknown or not fields:
        raise E.UsageError(f"invalid -o '{text}': unknown field(s) {', '.join(unknown) or '(none)'}"
                           f" (fields: {', '.join(LIST_FIELDS)})")
    return list(LIST_DEFAULT) + fields if extra else fields


def _list_cell(entry: dict[str, Any], field: str) -> str:
    if entry["valid"]:
        return str(LIST_FIELDS[field](entry))
    broken: dict[str, str] = {"name": entry["name"], "path": entry["path"], "format": "broken",
                              "valid": "N", "created": entry["error"], "error": entry["error"]}
    return broken.get(field, "-")


def cmd_list(args: argparse.Namespace) -> int:
    fields = _list_fields(args.fields)
    if args.export_dir and not os.path.isdir(args.export_dir):
        raise E.UsageError(f"cannot list exports in '{args.export_dir}' (--export-dir): "
                           "no such directory")
    export_dir = common.node_config(args).export_dir
    entries = archive.list_archives(export_dir)
    if args.json:
        common.emit_json({"export_dir": export_dir, "archives": entries})
        return 0
    rows = [[_list_cell(e, f) for f in fields] for e in entries]
    headers = None if args.no_headers else [f.upper() for f in fields]
    if args.separator is not None:
        for row in ([headers] if headers else []) + rows:
            common.emit(args.separator.join(row))
    else:
        common.emit_table(rows, headers)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    info = archive.open_archive(_path(args, args.archive)).info()
    lines = [
        f"archive:  {info['path']}",
        f"format:   {info['format']} (version {info['format_version']}"
        + ("; manifest not checked: it predates its own checksum)"
           if info.get("manifest_checked") is False else ")"),
        f"instance: {info['instance']} (OS {info['os']})",
        f"created:  {info.get('created') or '-'}",
        f"size:     {_size(info['size'])} in {len(info['disks'])} disk(s), "
        f"stored {_size(info['stored_bytes'])}",
    ]
    for d in info["disks"]:
        extra = ""
        if "digest" in d:
            extra = (f", {d['chunks']} chunks of {_size(d['chunk_size'])}, {d['zero_chunks']} zero, "
                     f"{d['hash']}, {d['digest']}")
        lines.append(f"disk {d['index']}: {_size(d['size'])}{extra}")
    common.print_result(args, info, lines)
    return 0


def _verify_one(path: str, engine: Engine, mode: str) -> dict[str, Any]:
    prog = P.Progress("verify", name=path)
    with P.ProgressMonitor(prog, renderer=P.make_renderer(mode)):
        result: dict[str, Any] = archive.verify(path, engine, progress=prog)
    return result


def cmd_verify(args: argparse.Namespace) -> int:
    node = common.node_config(args)
    paths = [_path(args, name) for name in args.archives]
    results: list[dict[str, Any]] = []
    first_error: E.GanetiVolError | None = None
    with parallel.Engine.from_config(node) as engine:
        for path in paths:
            try:
                results.append(_verify_one(path, engine, args.progress))
            except E.GanetiVolError as err:
                first_error = first_error or err
                results.append({"path": path, "ok": False, "error": str(err),
                                "disk": getattr(err, "disk", None),
                                "offset": getattr(err, "offset", None)})
    if len(paths) == 1 and first_error is not None and not args.json:
        raise first_error
    lines = []
    for r in results:
        if r["ok"]:
            size = sum(d["size"] for d in r["disks"])
            if not all(d["verified"] for d in r["disks"]):
                note = " (no checksums: read only)"
            elif not r.get("manifest_checked", True):
                note = " (manifest.json predates its own checksum: not checked)"
            else:
                note = ""
            lines.append(f"{r['path']}: ok, {len(r['disks'])} disk(s), {_size(size)}{note}")
        else:
            lines.append(f"{r['path']}: BROKEN: {r['error']}")
    common.print_result(args, {"archives": results, "ok": first_error is None}, lines)
    if first_error is None:
        return 0
    return first_error.exit_code if len(paths) == 1 else E.EXIT_WARNING


def cmd_remove(args: argparse.Namespace) -> int:
    if any("::" in name for name in args.archives):  # repository snapshots
        from ganeti_vol.cli import repo_cmds

        args.snapshots = args.archives
        return repo_cmds.cmd_remove(args)
    removed = []
    for name in args.archives:
        path = _path(args, name)
        archive.remove(path)
        removed.append(path)
    common.print_result(args, {"removed": removed}, [f"removed {p}" for p in removed])
    return 0
