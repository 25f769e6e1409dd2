"""``ganeti-vol demo``: the main job on a built-in sample, with no root and no system paths."""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from typing import Any

from ganeti_vol.cli import common
from ganeti_vol.core import errors as E
from ganeti_vol.core import paths
from ganeti_vol.core.lazy import lazy
from ganeti_vol.core.model import NodeConfig
from ganeti_vol.ganeti import config as cfgmod
from ganeti_vol.ganeti import fields

archive = lazy("ganeti_vol.formats.archive")
operations = lazy("ganeti_vol.ops.operations")
transfer = lazy("ganeti_vol.ops.transfer")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run the main job on a built-in sample instance (sparse file disks, no root)",
        description=(
            "Create a sample instance with the shipped 'sample' OS definition on sparse "
            "file disks in a temporary directory, then run the main job on it and print "
            "a summary.  Nothing outside that directory is written."
        ),
    )
    p.add_argument("--dir", help="work directory (default: a new temporary directory)")
    p.add_argument("--size", default="64M", help="size of disk 0 (default 64M)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    common.add_json(p)
    p.set_defaults(func=cmd_demo)


def demo_node(work: str) -> NodeConfig:
    shipped = paths.shipped_dir("os-definitions")
    if shipped is None:
        raise E.ConfigError("cannot find the shipped os-definitions directory (broken install?)")
    dirs = {k: os.path.join(work, k) for k in ("hooks", "log", "export", "state")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    return NodeConfig(
        os_search_path=(shipped,),
        hooks_dir=dirs["hooks"],
        log_dir=dirs["log"],
        export_dir=dirs["export"],
        state_dir=dirs["state"],
        source="(demo)",
    )


def write_demo_instance(work: str, name: str, size: str) -> str:
    path = os.path.join(work, f"{name}.ini")
    with open(path, "w") as f:
        f.write(
            "# A sample instance for ganeti-vol (see doc/instance-file.md)\n"
            f"[instance]\nname = {name}\nos = sample+default\nhypervisor = kvm\n"
            f"[disks]\n[[0]]\npath = {name}-disk0.img\nsize = {size}\n"
            f"[[1]]\npath = {name}-disk1.img\nsize = 16M\n"
            "[nics]\n[[0]]\nmac = aa:00:00:00:00:01\nlink = br0\n"
            "[osparams]\nmessage = hello from ganeti-vol\npayload_mib = 4\n"
        )
    return path


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        fields.parse_size(args.size, default_unit="M")
    except ValueError as err:
        raise E.UsageError(f"invalid --size: {err}") from None
    work = os.path.abspath(args.dir) if args.dir else tempfile.mkdtemp(prefix="ganeti-vol-demo-")
    os.makedirs(work, exist_ok=True)
    keep = args.keep or bool(args.dir)
    try:
        summary = run_demo(work, args)
    except BaseException:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
        summary["work_dir"] = None
    if args.json:
        common.emit_json(summary)
    else:
        for line in summary["lines"]:
            common.emit(line)
        common.emit(f"work directory: {work}" if keep else "work directory removed (use --keep)")
    return 0


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _mib(size: int, digits: int = 1) -> str:
    """Sizes in MiB, the unit the sizes were given in (``--size 64M``)."""
    return f"{size / (1 << 20):.{digits}f} MiB"


def _mib_per_s(res: dict[str, Any]) -> str:
    return f"{res['size'] / (1 << 20) / res['seconds']:.1f} MiB/s" if res["seconds"] else "-"


def run_demo(work: str, args: argparse.Namespace) -> dict[str, Any]:
    """create -> export -> import into a new instance -> verify, on the sample OS."""
    node = demo_node(work)
    ctx = common.make_context(args, node)
    inst_file = write_demo_instance(work, "demo1.example.com", args.size)
    inst = cfgmod.load_instance(inst_file)
    steps: list[dict[str, Any]] = []
    lines: list[str] = []
    started = time.monotonic()

    res = operations.create(ctx, inst).to_json()
    steps.append(res)
    lines.append(f"create   {inst.name} ({inst.os}), {len(inst.disks)} sparse disks: "
                 f"ok in {res['duration']:.2f}s")

    res = transfer.export_instance(ctx, inst).to_json()
    steps.append(res)
    lines.append(
        f"export   {_mib(res['size'])} -> {_mib(res['stored_bytes'], 2)} "
        f"(x{res['ratio']}) in {res['seconds']:.2f}s, {_mib_per_s(res)} -> {res['path']}"
    )

    copy_file = os.path.join(work, "demo2.example.com.ini")
    with open(copy_file, "w") as f:
        f.write("# the imported copy (sizes and OS come from the export)\n"
                "[instance]\nname = demo2.example.com\n[disks]\n"
                "[[0]]\npath = demo2.example.com-disk0.img\n"
                "[[1]]\npath = demo2.example.com-disk1.img\n")
    copy = cfgmod.load_instance(copy_file, size_optional=True)
    res = transfer.import_instance(ctx, copy, inst.name, os_given=False).to_json()
    steps.append(res)
    lines.append(
        f"import   into {copy.name}: {_mib(res['size'])} in {res['seconds']:.2f}s, "
        f"{_mib_per_s(res)}, every chunk verified"
        + (f"; rename script {res['rename']['old_name']} -> {copy.name}: {res['rename']['status']}"
           if res.get("rename") else "")
    )

    rep = archive.verify(res["source"])
    same = [
        _digest(a.path) == _digest(b)  # type: ignore[arg-type]
        for a, b in zip(inst.disks, (d["target"] for d in res["disks"]), strict=True)
    ]
    ok = all(same)
    steps.append({"operation": "verify", "archive": rep, "disks_identical": same,
                  "status": "ok" if ok else "failed"})
    lines.append(f"verify   archive re-hashed ({len(rep['disks'])} disks): ok; imported disks "
                 + ("identical to the originals" if ok else "DIFFER from the originals"))
    if not ok:
        raise E.IntegrityError("the imported disks differ from the originals")
    lines.append(f"total    {time.monotonic() - started:.2f}s; logs in {node.log_dir}")
    return {"work_dir": work, "instance_file": inst_file, "steps": steps, "lines": lines}
