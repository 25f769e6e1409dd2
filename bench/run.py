#!/usr/bin/env python3
"""Time ganeti-vol export/import against lz4, gzip (Ganeti's pipeline) on the same machine.

    python bench/run.py [--dir /var/tmp/gvbench] [--runs 3] [--images mixed,sparse-90]
                        [--gzip-runs 1] [--json results.json]

Builds the 2 GiB images with bench/make_images.py if they are missing, then, for
each image, runs every contender ``--runs`` times, round robin (so drifting
machine load hits them all alike; the order rotates by one each round, so no
contender always follows the same one), and prints MB/s of logical bytes
(median and min-max, 1 MB = 10^6 B), CPU seconds, output sizes, peak RSS and the
issue-3 target ratios.  Every run is a whole process (fork to reap) timed
around ``/usr/bin/time``; outputs are removed, import targets recreated and
``sync`` run (untimed) before each run, so no run pays for the writeback of the
one before; the page cache holds the images (warm).

ganeti-vol runs through its real CLI (``python -m ganeti_vol``) with a
benchmark OS whose export script is ``cat "$EXPORT_DEVICE"`` and whose
import script is ``dd of="$IMPORT_DEVICE" bs=1M conv=notrunc``.  Extra rows
measure the engine with 1 worker (how far python-lz4 releases the GIL) and
with sha256 chunk hashes instead of xxh3-128.  Ceiling rows bound what any
Python tool could reach here in the same run: ``cat img | python floor.py``
(read the script's pipe, nothing else), ``python -c pass`` (the interpreter
start every ganeti-vol run pays), ``dd oflag=direct conv=fsync`` of a dump
(writing it durably, as an archive must be before it is published) and
``cat img | dd`` (the import script fed with no decompression at all); the
ratio table shows each target ratio at its ceiling and the share of it
ganeti-vol reaches.

Benchmarks are never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import make_images  # noqa: E402

GIB = 1 << 30
#: the ceilings measured in every run: what a Python reader of a `cat` script's pipe can reach
#: at best (bench/floor.py), and the interpreter start every ganeti-vol run pays
CEILING_EXPORT = "(ceiling of the script path) cat img | python floor.py"
PYTHON_START = "(fixed cost) python -c pass"
DURABLE_WRITE = "(fixed cost) durable write of the dump: dd oflag=direct conv=fsync"
IMPORT_CEILING = "(ceiling of the script path) cat img | dd conv=notrunc"
OS_NAME = "benchcat"
SCRIPTS = {
    "export": 'exec cat "$EXPORT_DEVICE"\n',
    "import": 'exec dd of="$IMPORT_DEVICE" bs=1M conv=notrunc status=none\n',
    "create": "exit 0\n",
    "rename": "exit 0\n",
    "verify": "exit 0\n",
}
CONFIGS = {  # node config variants: name -> extra settings
    "default": {},
    "w1": {"workers": "1"},
    "sha256": {"chunk_hash": "sha256"},
}


@dataclass
class Case:
    name: str
    cmd: list[str]
    kind: str  # export | import
    output: Path | None = None
    prepare: list[str] = field(default_factory=list)  # shell run untimed before each run
    runs: int | None = None
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)
    out_bytes: int | None = None


def sh(cmd: str) -> list[str]:
    return ["sh", "-c", cmd]


def gv(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "ganeti_vol", "--config", str(config), *args]


def setup_workspace(work: Path) -> dict[str, Path]:
    osdir = work / "os" / OS_NAME
    osdir.mkdir(parents=True, exist_ok=True)
    (osdir / "ganeti_api_version").write_text("20\n")
    (osdir / "parameters.list").write_text("")
    for name, body in SCRIPTS.items():
        path = osdir / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
    for sub in ("export", "state", "log", "hooks"):
        (work / sub).mkdir(exist_ok=True)
    configs = {}
    for name, extra in CONFIGS.items():
        conf = work / f"node-{name}.conf"
        lines = [f"os_search_path = {work / 'os'},", f"hooks_dir = {work / 'hooks'}",
                 f"log_dir = {work / 'log'}", f"export_dir = {work / 'export'}",
                 f"state_dir = {work / 'state'}", "stall_timeout = 600"]
        lines += [f"{k} = {v}" for k, v in extra.items()]
        conf.write_text("\n".join(lines) + "\n")
        configs[name] = conf
    return configs


def timed(case: Case, tfile: Path) -> None:
    for prep in case.prepare:
        subprocess.run(sh(prep), check=True)
    # flush the previous run's dirty pages: their writeback must not slow this run down
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", "-o", str(tfile), *case.cmd],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{case.name} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    user, system, rss = tfile.read_text().split()[-3:]
    case.walls.append(wall)
    case.cpus.append(float(user) + float(system))
    case.rss_kb.append(int(rss))
    if case.output is not None and case.kind == "export":
        case.out_bytes = dump_bytes(case.output)


def dump_bytes(path: Path) -> int:
    """Size of an lz4/gzip output file, or of the dumps in an archive directory."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.glob("*.lz4"))
    return path.stat().st_size


def cases_for(image: Path, work: Path, configs: dict[str, Path], gzip_runs: int) -> list[Case]:
    size = image.stat().st_size
    out = work / "out"
    exp = work / "export"
    target = work / "target.img"
    fresh = [f"rm -f {target}", f"truncate -s {size} {target}"]
    gv_disk = str(image)
    src_archive = exp / "bench-src"
    cases = [
        Case("ganeti-vol export (cat script)", gv(configs["default"], "export", "--name", "bench",
             "--os", OS_NAME, "--disk", gv_disk, "-o", str(exp), "--progress", "none",
             "--no-hooks"), "export", exp / "bench", [f"rm -rf {exp}/bench"]),
        Case("ganeti-vol export --raw", gv(configs["default"], "export", "--name", "bench",
             "--os", OS_NAME, "--disk", gv_disk, "-o", str(exp), "--raw", "--progress", "none",
             "--no-hooks"), "export", exp / "bench", [f"rm -rf {exp}/bench"]),
        Case("cat img | lz4 -1 > out", sh(f"cat {image} | lz4 -1 > {out}.lz4"), "export",
             Path(f"{out}.lz4"), [f"rm -f {out}.lz4"]),
        Case("lz4 -1 img out", ["lz4", "-q", "-1", str(image), f"{out}.f.lz4"], "export",
             Path(f"{out}.f.lz4"), [f"rm -f {out}.f.lz4"]),
        Case("Ganeti: dd | gzip -1 | dd", sh(f"dd if={image} bs=1M status=none | gzip -1 | "
             f"dd of={out}.gz bs=1M status=none"), "export", Path(f"{out}.gz"),
             [f"rm -f {out}.gz"], runs=gzip_runs),
        Case(CEILING_EXPORT, sh(f"cat {image} | {sys.executable} {HERE / 'floor.py'}"),
             "export"),
        Case(PYTHON_START, [sys.executable, "-c", "pass"], "export"),
        Case(DURABLE_WRITE, sh(f"dd if=\"$(ls {src_archive}/*.lz4)\" of={out}.dw bs=8M "
                               "oflag=direct conv=fsync status=none"), "export",
             prepare=[f"rm -f {out}.dw"]),
        Case("ganeti-vol export, 1 worker", gv(configs["w1"], "export", "--name", "bench",
             "--os", OS_NAME, "--disk", gv_disk, "-o", str(exp), "--progress", "none",
             "--no-hooks"), "export", exp / "bench", [f"rm -rf {exp}/bench"]),
        Case("ganeti-vol export, sha256", gv(configs["sha256"], "export", "--name", "bench",
             "--os", OS_NAME, "--disk", gv_disk, "-o", str(exp), "--progress", "none",
             "--no-hooks"), "export", exp / "bench", [f"rm -rf {exp}/bench"]),
        Case("ganeti-vol import (dd script)", gv(configs["default"], "import", "--name", "bench",
             "--os", OS_NAME, "--disk", str(target), str(src_archive), "--script",
             "--progress", "none", "--no-hooks"), "import", prepare=fresh),
        Case("ganeti-vol import --raw", gv(configs["default"], "import", "--name", "bench",
             "--os", OS_NAME, "--disk", str(target), str(src_archive), "--raw",
             "--progress", "none", "--no-hooks"), "import", prepare=fresh),
        Case("lz4 -dc dump | dd conv=notrunc", sh(f"lz4 -dc {out}.src.lz4 | dd of={target} bs=1M "
             "conv=notrunc status=none"), "import", prepare=fresh),
        Case(IMPORT_CEILING,
             sh(f"cat {image} | dd of={target} bs=1M conv=notrunc status=none"), "import",
             prepare=fresh),
    ]
    return cases


def prepare_sources(image: Path, work: Path, configs: dict[str, Path]) -> None:
    """The archive and lz4 dump the import cases read (made once, untimed)."""
    exp = work / "export"
    shutil.rmtree(exp / "bench-src", ignore_errors=True)
    subprocess.run(gv(configs["default"], "export", "--name", "bench", "--os", OS_NAME,
                      "--disk", str(image), "-o", str(exp), "--archive-name",
                      "bench-src", "--progress", "none", "--no-hooks"),
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["lz4", "-q", "-f", "-1", str(image), str(work / "out.src.lz4")], check=True)
    subprocess.run(["cat", str(image)], check=True, stdout=subprocess.DEVNULL)  # warm the cache


def check_import(image: Path, work: Path, configs: dict[str, Path]) -> None:
    """Untimed sanity check: an import reproduces the image byte for byte."""
    target = work / "target.img"
    subprocess.run(sh(f"rm -f {target}; truncate -s {image.stat().st_size} {target}"), check=True)
    subprocess.run(gv(configs["default"], "import", "--name", "bench", "--os", OS_NAME, "--disk",
                      str(target), str(work / "export" / "bench-src"), "--raw", "--progress",
                      "none", "--no-hooks"), check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmp", str(image), str(target)], check=True)


def compute_probe(image: Path, nbytes: int = 512 << 20) -> dict[str, float]:
    """In-process GB/s of the chunk work on the image's data: 1 vs 2 threads, xxh3 vs sha256."""
    from concurrent.futures import ThreadPoolExecutor

    from ganeti_vol.engine import codec, hashing

    codec.tune_malloc()
    chunk = 4 << 20
    chunks, fd = [], os.open(image, os.O_RDONLY)
    try:
        offset = 0
        while len(chunks) * chunk < nbytes:
            try:
                offset = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            data = os.pread(fd, chunk, offset)
            if len(data) < chunk:
                break
            chunks.append(data)
            offset += chunk
    finally:
        os.close(fd)
    total = len(chunks) * chunk
    out = engine_probe(image)
    for name, fn in (("lz4", codec.encode), ("xxh3-128", hashing.hash_function("xxh3-128")),
                     ("sha256", hashing.hash_function("sha256"))):
        for threads in (1, 2):
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(fn, chunks[:threads]))  # warm up
                t0 = time.perf_counter()
                list(pool.map(fn, chunks))
                out[f"{name} x{threads}"] = total / (time.perf_counter() - t0) / 1e9
    return out


class _Discard:
    """A sink that keeps nothing (the engine alone, without archive writes)."""

    compress, want_crc = True, False

    def begin(self, info):
        pass

    def write_chunk(self, chunk):
        pass

    def finish(self, summary):
        pass

    def abort(self, error):
        pass


def engine_probe(image: Path) -> dict[str, float]:
    """MB/s of the engine in this process (no startup, no archive): median of 3."""
    from ganeti_vol.engine.parallel import Engine

    size = image.stat().st_size
    out = {}
    with Engine() as engine:
        for kind in ("pipe", "file"):
            speeds = []
            for _ in range(3):
                t0 = time.perf_counter()
                if kind == "pipe":
                    proc = subprocess.Popen(["cat", str(image)], stdout=subprocess.PIPE)
                    engine.encode(proc.stdout.fileno(), _Discard())
                    proc.stdout.close()
                    proc.wait()
                else:
                    fd = os.open(image, os.O_RDONLY)
                    engine.encode(fd, _Discard(), source_kind="file")
                    os.close(fd)
                speeds.append(mbps(size, time.perf_counter() - t0))
            out[f"engine {kind}"] = statistics.median(speeds)
    return out


def mbps(size: int, wall: float) -> float:
    return size / wall / 1e6


def summarize(image: Path, cases: list[Case]) -> dict:
    size = image.stat().st_size
    rows = {}
    for c in cases:
        speeds = [mbps(size, w) for w in c.walls]
        rows[c.name] = {
            "mb_s": statistics.median(speeds), "min": min(speeds), "max": max(speeds),
            "cpu_s": statistics.median(c.cpus), "rss_mib": max(c.rss_kb) / 1024,
            "out_bytes": c.out_bytes, "runs": len(c.walls), "wall_s": statistics.median(c.walls),
        }
    return rows


#: numerator case -> how to get the best it could reach in this run (MB/s), from rows and probe
CEILINGS = {
    "ganeti-vol export (cat script)": lambda rows, probe, size: rows[CEILING_EXPORT]["mb_s"],
    # the engine's own in-process speed from the file or writing the dump durably, whichever
    # is slower (they overlap at best), plus an interpreter start
    "ganeti-vol export --raw": lambda rows, probe, size: size / (
        max(size / (probe["engine file"] * 1e6), rows[DURABLE_WRITE]["wall_s"])
        + rows[PYTHON_START]["wall_s"]) / 1e6,
    "ganeti-vol import (dd script)": lambda rows, probe, size: rows[IMPORT_CEILING]["mb_s"],
}

RATIOS = [  # (label, numerator case, denominator case, target, images)
    ("export (cat script) / cat|lz4 -1", "ganeti-vol export (cat script)", "cat img | lz4 -1 > out",
     2.0, None),
    ("export (cat script) / lz4 -1 img out", "ganeti-vol export (cat script)", "lz4 -1 img out",
     1.0, None),
    ("export (cat script) / Ganeti dd|gzip|dd", "ganeti-vol export (cat script)",
     "Ganeti: dd | gzip -1 | dd", 10.0, None),
    ("raw export / lz4 -1 img out (mixed)", "ganeti-vol export --raw", "lz4 -1 img out", 1.5,
     {"mixed"}),
    ("raw export / lz4 -1 img out (sparse-90)", "ganeti-vol export --raw", "lz4 -1 img out", 5.0,
     {"sparse-90"}),
    ("import (dd script) / lz4 -dc|dd", "ganeti-vol import (dd script)",
     "lz4 -dc dump | dd conv=notrunc", 1.5, None),
    ("import --raw / lz4 -dc|dd", "ganeti-vol import --raw", "lz4 -dc dump | dd conv=notrunc",
     1.5, None),
]


def report(results: dict[str, dict]) -> str:
    out = []
    for image, rows in results.items():
        rows = dict(rows)
        probe = rows.pop("_probe")
        size = rows.pop("_size")
        out.append(f"\n### {image}.img (2 GiB logical)\n")
        out.append("| run | MB/s median (min–max) | cpu s | output bytes | peak RSS MiB |")
        out.append("|---|---|---|---|---|")
        for name, r in rows.items():
            nbytes = f"{r['out_bytes']:,}" if r["out_bytes"] else ""
            speed = (f"({r['wall_s']:.3f} s)" if name in (PYTHON_START, DURABLE_WRITE) else
                     f"**{r['mb_s']:.0f}** ({r['min']:.0f}–{r['max']:.0f})")
            out.append(f"| {name} | {speed} | {r['cpu_s']:.1f} | {nbytes} | {r['rss_mib']:.0f} |")
        gv_size = rows["ganeti-vol export (cat script)"]["out_bytes"]
        lz4_size = rows["lz4 -1 img out"]["out_bytes"]
        out.append(f"\ndump size / lz4 -1 size: **{gv_size / lz4_size:.4f}** (target ≤ 1.02)\n")
        out.append("| ratio (same run) | value | target | | at the ceiling | share of it |")
        out.append("|---|---|---|---|---|---|")
        for label, num, den, target, only in RATIOS:
            if only is not None and image not in only:
                continue
            value = rows[num]["mb_s"] / rows[den]["mb_s"]
            ceiling = CEILINGS[num](rows, probe, size) / rows[den]["mb_s"] if num in CEILINGS \
                else None
            best = f"{ceiling:.2f}×" if ceiling else "–"
            share = f"{value / ceiling:.0%}" if ceiling else "–"
            out.append(f"| {label} | {value:.2f}× | ≥ {target}× | "
                       f"{'ok' if value >= target else 'MISSED'} | {best} | {share} |")
        out.append(f"\nCeilings: the `cat` script path at most reaches `{CEILING_EXPORT}` "
                   "(interpreter start and reading the pipe, nothing else); raw export at most "
                   "the slower of the engine's in-process speed from the file and the durable "
                   f"write of its dump ({rows[DURABLE_WRITE]['wall_s']:.3f} s), plus an "
                   f"interpreter start ({rows[PYTHON_START]['wall_s']:.3f} s); the script import "
                   f"at most `{IMPORT_CEILING}`.")
        w1 = rows["ganeti-vol export, 1 worker"]["mb_s"]
        w2 = rows["ganeti-vol export (cat script)"]["mb_s"]
        sha = rows["ganeti-vol export, sha256"]["mb_s"]
        out.append(f"\n2 workers / 1 worker: {w2 / w1:.2f}×; xxh3-128 / sha256: {w2 / sha:.2f}×; "
                   f"peak RSS of ganeti-vol: "
                   f"{max(r['rss_mib'] for n, r in rows.items() if 'ganeti-vol' in n):.0f} MiB")
        out.append(f"\nThe engine alone, in-process (no interpreter start, no archive writes): "
                   f"export through a `cat` pipe {probe['engine pipe']:.0f} MB/s, from the file "
                   f"{probe['engine file']:.0f} MB/s.")
        out.append("\nIn-process GB/s on 4 MiB chunks of the image's data extents (1 → 2 threads): "
                   + "; ".join(f"{k} {probe[k + ' x1']:.2f} → {probe[k + ' x2']:.2f} "
                               f"(×{probe[k + ' x2'] / probe[k + ' x1']:.2f})"
                               for k in ("lz4", "xxh3-128", "sha256")))
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/var/tmp/gvbench", help="images and scratch space")
    ap.add_argument("--images", default="mixed,sparse-90")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gzip-runs", type=int, default=1)
    ap.add_argument("--size-gib", type=float, default=2)
    ap.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    args = ap.parse_args()
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    # An installed package has its bytecode compiled at install time; a checkout run with
    # PYTHONDONTWRITEBYTECODE=1 (as on these machines) would otherwise compile every
    # module on every timed run (~60 ms measured).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "ganeti_vol")],
                   check=True)
    results: dict[str, dict] = {}
    for name in args.images.split(","):
        image = base / f"{name}.img"
        if not image.exists() or image.stat().st_size != int(args.size_gib * GIB):
            make_images.make(str(image), name, int(args.size_gib * GIB))
        work = Path(tempfile.mkdtemp(dir=base, prefix="work-"))
        try:
            configs = setup_workspace(work)
            prepare_sources(image, work, configs)
            check_import(image, work, configs)
            cases = cases_for(image, work, configs, args.gzip_runs)
            tfile = work / "time.txt"
            for rep in range(args.runs):
                # rotate the order each round: the case after a 2 GiB import pays for the
                # page cache it freed (fresh pages are slow here), so no case keeps one slot
                shift = rep % len(cases)
                for case in cases[shift:] + cases[:shift]:
                    if case.runs is None or rep < case.runs:
                        timed(case, tfile)
                print(f"{name}: round {rep + 1}/{args.runs} done", file=sys.stderr, flush=True)
            results[name] = summarize(image, cases)
            results[name]["_probe"] = compute_probe(image)
            results[name]["_size"] = image.stat().st_size
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"# ganeti-vol benchmark, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{os.cpu_count()} CPUs, {args.runs} runs (gzip {args.gzip_runs})")
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
