#!/usr/bin/env python3
"""Time ``ganeti-vol dump`` / ``ganeti-vol restore`` against the peers' dd lines.

    python bench/dumprestore.py [--dir /var/tmp/gvbench-dr] [--runs 5] [--size-gib 1]
                                [--images mixed,sparse-90,full-random] [--no-loop]
                                [--json results.json]

Export side (the disk to a pipe, read by ``dd of=/dev/null bs=1M``):
  ``dd if=$DEV bs=1M`` (ganeti-os-noop), ``dd if=$DEV bs=4M iflag=direct``
  (snf-image) and ``ganeti-vol dump $DEV``; from the sparse image file and
  from a loop device over it.
Import side (the image through a pipe, ``cat img |``, into an existing disk):
  ``dd of=$DEV bs=1M conv=nocreat,notrunc oflag=dsync`` (Debian's
  ganeti-os-noop), ``dd of=$DEV bs=4M iflag=fullblock oflag=direct
  conv=nocreat,notrunc`` (the fast dd; not durable: no flush at the end),
  the same ``+ conv=fsync`` (durable, the fair comparison) and
  ``ganeti-vol restore $DEV`` (durable: fsync at the end); into a fresh
  sparse file (recreated before each run) and into a loop device over one
  (``blkdiscard``-ed before each run).  Every tool's result is compared with
  the image once, untimed; the allocated size of the file target is reported.

Every run is a whole pipeline (fork to reap) timed around ``/usr/bin/time``
(CPU = user+sys of every process), ``--runs`` times round robin after one
untimed warm-up, after an untimed ``sync``, page cache warm; MB/s of logical bytes (1 MB = 10^6 B),
median (min-max).  ganeti-vol runs through its real CLI
(``python -m ganeti_vol``), so its ~0.3 s interpreter start is included.

Benchmarks are never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_images  # noqa: E402

GIB = 1 << 30
GV = f"{sys.executable} -m ganeti_vol"
SINK = "dd of=/dev/null bs=1M status=none"


@dataclass
class Case:
    group: str  # "dump file", "dump loop", "restore file", "restore loop"
    name: str
    cmd: str
    prepare: str = ""
    target: str = ""
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    allocated: int | None = None


def sh(cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", cmd], check=True, **kw)


def timed(case: Case, tfile: Path, record: bool) -> None:
    sh(f"{case.prepare + ' && ' if case.prepare else ''}sync")  # earlier runs' dirty pages
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%U %S", "-o", str(tfile), "sh", "-c",
                           case.cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{case.name} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    if record:
        user, system = tfile.read_text().split()[-2:]
        case.walls.append(wall)
        case.cpus.append(float(user) + float(system))


def losetup(path: Path) -> str:
    return subprocess.run(["losetup", "-f", "--show", str(path)], check=True, capture_output=True,
                          text=True).stdout.strip()


def cases_for(image: Path, work: Path, loop_src: str | None, loop_dst: str | None,
              dst_file: Path) -> list[Case]:
    size = image.stat().st_size
    fresh = f"rm -f {dst_file} && truncate -s {size} {dst_file}"
    cases = []
    sources = [("dump file", str(image))] + ([("dump loop", loop_src)] if loop_src else [])
    for group, src in sources:
        cases += [
            Case(group, "dd if=$DEV bs=1M (ganeti-os-noop)",
                 f"dd if={src} bs=1M status=none | {SINK}"),
            Case(group, "dd if=$DEV bs=4M iflag=direct (snf-image)",
                 f"dd if={src} bs=4M iflag=direct status=none | {SINK}"),
            Case(group, "ganeti-vol dump $DEV", f"{GV} dump {src} | {SINK}"),
        ]
    targets = [("restore file", str(dst_file), fresh)]
    if loop_dst:
        targets.append(("restore loop", loop_dst, f"blkdiscard {loop_dst}"))
    for group, dst, prep in targets:
        cases += [
            Case(group, "dd bs=1M conv=nocreat,notrunc oflag=dsync (Debian noop)",
                 f"cat {image} | dd of={dst} bs=1M conv=nocreat,notrunc oflag=dsync status=none",
                 prep, dst),
            Case(group, "dd bs=4M oflag=direct (no flush)",
                 f"cat {image} | dd of={dst} bs=4M iflag=fullblock oflag=direct "
                 f"conv=nocreat,notrunc status=none", prep, dst),
            Case(group, "dd bs=4M oflag=direct conv=fsync",
                 f"cat {image} | dd of={dst} bs=4M iflag=fullblock oflag=direct "
                 f"conv=nocreat,notrunc,fsync status=none", prep, dst),
            Case(group, "ganeti-vol restore $DEV", f"cat {image} | {GV} restore {dst}", prep, dst),
        ]
    return cases


def check(case: Case, image: Path, dst_file: Path, tfile: Path) -> None:
    """Run a restore once and compare the target with the image (untimed)."""
    timed(case, tfile, record=False)
    size = image.stat().st_size
    sh(f"cmp -n {size} {image} {case.target}")
    if case.target == str(dst_file):
        case.allocated = dst_file.stat().st_blocks * 512


def summarize(size: int, cases: list[Case]) -> list[dict]:
    rows = []
    for c in cases:
        speeds = [size / w / 1e6 for w in c.walls]
        rows.append({"group": c.group, "name": c.name, "mb_s": statistics.median(speeds),
                     "min": min(speeds), "max": max(speeds), "cpu_s": statistics.median(c.cpus),
                     "runs": len(c.walls), "allocated": c.allocated})
    return rows


def report(results: dict[str, list[dict]], size: int) -> str:
    out = []
    for image, rows in results.items():
        out.append(f"\n### {image} ({size / GIB:g} GiB)\n")
        out.append("| | command | MB/s median (min-max) | CPU s | file target allocated |")
        out.append("|---|---|---|---|---|")
        for r in rows:
            alloc = f"{r['allocated'] / 1e6:.0f} MB" if r["allocated"] is not None else ""
            out.append(f"| {r['group']} | `{r['name']}` | **{r['mb_s']:.0f}** "
                       f"({r['min']:.0f}-{r['max']:.0f}) | {r['cpu_s']:.2f} | {alloc} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/var/tmp/gvbench-dr", help="images and scratch space")
    ap.add_argument("--images", default="mixed,sparse-90,full-random")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size-gib", type=float, default=1)
    ap.add_argument("--no-loop", action="store_true", help="skip the loop device rows")
    ap.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    args = ap.parse_args()
    # a kill (SIGTERM) unwinds like Ctrl-C, so the loop devices below are detached
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    size = int(args.size_gib * GIB)
    use_loop = not args.no_loop and os.geteuid() == 0 and shutil.which("losetup")
    results: dict[str, list[dict]] = {}
    for name in args.images.split(","):
        image = base / f"{name}.img"
        if not image.exists() or image.stat().st_size != size:
            make_images.make(str(image), name, size)
        work = Path(tempfile.mkdtemp(dir=base, prefix="work-"))
        loops: list[str] = []
        try:
            dst_file = work / "target.img"
            sh(f"truncate -s {size} {dst_file}")
            loop_src = loop_dst = None
            if use_loop:
                loop_src = losetup(image)
                loops.append(loop_src)
                backing = work / "loop-target.img"
                sh(f"truncate -s {size} {backing}")
                loop_dst = losetup(backing)
                loops.append(loop_dst)
            cases = cases_for(image, work, loop_src, loop_dst, dst_file)
            tfile = work / "time.txt"
            for case in cases:
                if case.target:
                    check(case, image, dst_file, tfile)
                else:
                    timed(case, tfile, record=False)  # warm-up
            for rep in range(args.runs):
                for case in cases:
                    timed(case, tfile, record=True)
                print(f"{name}: round {rep + 1}/{args.runs} done", file=sys.stderr, flush=True)
            results[name] = summarize(size, cases)
        finally:
            for dev in loops:
                subprocess.run(["losetup", "-d", dev], check=False)
            shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    print(f"# dump/restore benchmark, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
          f"{args.runs} runs, load average at the end {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")
    print(report(results, size))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
