#!/usr/bin/env python3
"""Ganeti's own transfer pipeline with ganeti-vol-lz4 against the same pipeline with gzip.

    python bench/ganeti_tool.py [--dir /var/tmp/gvbench] [--rounds 3] [--image mixed]
                                [--size-gib 2] [--json results.json]

Needs Debian's ganeti-3.0 (its Python modules build the commands: tests/ganeti_impexp.py),
socat, dd, gzip, lz4, taskset and /usr/bin/time.  Each run moves the 2 GiB image from one file
"disk" to another exactly as ``gnt-instance move`` does between two nodes: the
export pipeline ``dd if=DISK iflag=direct | { echo M=magic; dd; } | COMPRESS |
socat OPENSSL:...`` and the import pipeline ``socat OPENSSL-LISTEN:... | DECOMPRESS |
{ read magic; dd; } | dd of=DISK oflag=direct conv=notrunc``, built by Ganeti's
``impexpd.CommandBuilder`` and run with Ganeti's fixed PATH, over TLS on loopback.
Both sides share this machine's CPUs (on a cluster each node has its own), so the
CPU seconds of each side are given too.

Contenders (round robin, the order rotating each round): ``gzip`` (what Ganeti
runs for ``--compress=gzip``: ``gzip -1 -c`` / ``gzip -d -c``), the ``lz4`` CLI
(which works as a Ganeti tool as it is: ``lz4`` / ``lz4 -d``), ``ganeti-vol-lz4``
(default threads) and ``ganeti-vol-lz4 -T1``, and ``none`` (no compression: the
ceiling the pipeline itself sets); each once as it is and once with the export
side pinned to CPU 0 and the import side to CPU 1 (``taskset``: two one-CPU
nodes); and, to see the compressors alone, ``dd iflag=direct | gzip -1 -c`` and
``dd iflag=direct | ganeti-vol-lz4`` into /dev/null.  MB/s are logical bytes
(1 MB = 10^6 B) over the wall time from the start of the export to the end of
both sides; the import side is started and listening first (untimed).  Peak
RSS is each compression process's own (``/usr/bin/time`` around it).  The target
is a fresh sparse file and ``sync`` is run before every run (untimed); after
it, the target is compared with the image.  Every run records the load average.
Benchmarks are never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import make_images  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20
TOOL = "ganeti-vol-lz4"
GANETI_PATH = "/sbin:/bin:/usr/sbin:/usr/bin"
GANETI_PYTHON = os.environ.get("GANETI_REFERENCE_PYTHON", "/usr/bin/python3")
IMPEXP = REPO / "tests" / "ganeti_impexp.py"
LISTENING = re.compile(r"listening on\s+AF=\d+\s+\S+:(\d+)")
MAGIC = "0123456789abcdef0123456789abcdef01234567"  # sha1-hex sized, as Ganeti's
#: variant -> (compress value given to Ganeti, extra tool arguments, one CPU per side)
PIPELINES = {
    f"Ganeti, {side}{what}": (compress, args, pinned)
    for pinned, side in ((False, ""), (True, "one CPU per side, "))
    for what, compress, args in (("none (ceiling: the pipeline alone)", "none", ""),
                                 ("gzip", "gzip", ""), ("lz4 (the lz4 CLI as the tool)", "lz4", ""),
                                 (TOOL, TOOL, ""),
                                 (f"{TOOL} -T1", TOOL, "-T1"))
}
ALONE = {
    "(compressor alone) dd iflag=direct | gzip -1 -c": "gzip -1 -c",
    f"(compressor alone) dd iflag=direct | {TOOL}": TOOL,
}


def ganeti_dir() -> str:
    for candidate in (os.environ.get("GANETI_REFERENCE_DIR"), "/usr/share/ganeti/3.0",
                      "/usr/share/ganeti/default"):
        if candidate and os.path.isfile(os.path.join(candidate, "ganeti", "impexpd",
                                                     "__init__.py")):
            return candidate
    raise SystemExit("Ganeti's Python modules are not here (apt-get install ganeti-3.0)")


def impexp(*args: str, stdin: str | None = None) -> str:
    res = subprocess.run([GANETI_PYTHON, str(IMPEXP), ganeti_dir(), *args], input=stdin,
                         capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"tests/ganeti_impexp.py failed: {res.stderr[-2000:]}")
    return res.stdout


def write_bin(bindir: Path, rss_dir: Path, tool_args: str) -> None:
    """ganeti-vol-lz4 and gzip as Ganeti finds them, each under /usr/bin/time (peak RSS)."""
    bindir.mkdir(parents=True, exist_ok=True)
    real = bindir / f".{TOOL}"
    real.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
                    "from ganeti_vol.cli.lz4tool import main\nsys.exit(main())\n")
    wrappers = {TOOL: f"{real} {tool_args}", "gzip": shutil.which("gzip", path=GANETI_PATH),
                "lz4": shutil.which("lz4", path=GANETI_PATH)}
    for name, target in wrappers.items():
        path = bindir / name
        path.write_text(f'#!/bin/sh\nexec /usr/bin/time -f "%M %U %S" '
                        f'-o "{rss_dir}/{name}$1-$$" {target} "$@"\n')
    for path in bindir.iterdir():
        path.chmod(0o755)


class Run:
    def __init__(self, wall: float, cpu: dict[str, float], rss: dict[str, int],
                 load: tuple[float, float, float]) -> None:
        self.wall, self.cpu, self.rss, self.load = wall, cpu, rss, load


def rusage_of(proc: subprocess.Popen) -> tuple[int, float]:
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def collect_rss(rss_dir: Path) -> dict[str, int]:
    out = {}
    for path in rss_dir.iterdir():
        side = "decompress" if "-d" in path.name else "compress"
        kb = int(path.read_text().split()[-3])
        out[side] = max(out.get(side, 0), kb * 1024)
        path.unlink()
    return out


def pipeline_run(work: Path, image: Path, target: Path, pem: Path, compress: str,
                 bindir: Path, rss_dir: Path, pinned: bool = False) -> Run:
    target.unlink(missing_ok=True)
    with open(target, "wb") as f:
        f.truncate(image.stat().st_size)
    subprocess.run(["sync"], check=True)
    env = {"PATH": f"{bindir}:{GANETI_PATH}", "LC_ALL": "C"}
    sides = {}
    for mode, disk in (("import", target), ("export", image)):
        logs = [work / f"{mode}.{n}" for n in ("socat", "dd", "pid")]
        fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) for p in logs]
        port = None
        if mode == "export":
            port = int(LISTENING.search((work / "import.socat").read_text()).group(1))
        req = {"mode": mode, "compress": compress, "magic": MAGIC, "disk": str(disk),
               "size_mib": disk.stat().st_size // MIB, "pem": str(pem), "host": "127.0.0.1",
               "port": port, "bind": "127.0.0.1", "fds": fds}
        argv = json.loads(impexp("pipeline", stdin=json.dumps(req)))["argv"]
        if pinned:
            argv = ["taskset", "-c", "0" if mode == "export" else "1", *argv]
        if mode == "export":
            load = os.getloadavg()
            t0 = time.perf_counter()
        with open(work / f"{mode}.stderr", "wb") as err:
            sides[mode] = subprocess.Popen(argv, pass_fds=fds, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=err, env=env)
        for fd in fds:
            os.close(fd)
        if mode == "import":
            deadline = time.monotonic() + 30
            while not LISTENING.search((work / "import.socat").read_text()):
                if time.monotonic() > deadline or sides[mode].poll() is not None:
                    raise SystemExit(f"the import side did not listen: "
                                     f"{(work / 'import.stderr').read_text()}")
                time.sleep(0.01)
    cpu = {}
    for mode in ("export", "import"):
        rc, cpu[mode] = rusage_of(sides[mode])
        if rc:
            raise SystemExit(f"{compress}: the {mode} side failed ({rc}): "
                             f"{(work / f'{mode}.stderr').read_text()[-2000:]}")
    wall = time.perf_counter() - t0
    if subprocess.run(["cmp", "-s", str(image), str(target)]).returncode:
        raise SystemExit(f"{compress}: the target differs from the image")
    return Run(wall, cpu, collect_rss(rss_dir), load)


def alone_run(image: Path, compressor: str, bindir: Path, rss_dir: Path) -> Run:
    env = {"PATH": f"{bindir}:{GANETI_PATH}", "LC_ALL": "C"}
    cmd = (f"dd if={image} bs=1048576 iflag=direct status=none | {compressor} > /dev/null")
    load = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen(["bash", "-o", "pipefail", "-c", cmd], env=env)
    rc, cpu = rusage_of(proc)
    wall = time.perf_counter() - t0
    if rc:
        raise SystemExit(f"{cmd} failed ({rc})")
    return Run(wall, {"export": cpu}, collect_rss(rss_dir), load)


def stream_size(image: Path, compressor: str, bindir: Path) -> int:
    """Bytes that cross the network for this image (the magic value included)."""
    env = {"PATH": f"{bindir}:{GANETI_PATH}"}
    out = subprocess.run(["bash", "-o", "pipefail", "-c",
                          f"{{ printf M={MAGIC}; cat {image}; }} | {compressor} | wc -c"],
                         capture_output=True, text=True, env=env, check=True)
    return int(out.stdout)


def summarize(size: int, runs: dict[str, list[Run]], sizes: dict[str, int]) -> dict:
    rows = {}
    for name, rs in runs.items():
        speeds = [size / r.wall / 1e6 for r in rs]
        rows[name] = {
            "mb_s": statistics.median(speeds), "min": min(speeds), "max": max(speeds),
            "wall_s": statistics.median(r.wall for r in rs),
            "cpu_export_s": statistics.median(r.cpu.get("export", 0) for r in rs),
            "cpu_import_s": statistics.median(r.cpu.get("import", 0) for r in rs),
            "rss_compress_mib": max(r.rss.get("compress", 0) for r in rs) / MIB,
            "rss_decompress_mib": max(r.rss.get("decompress", 0) for r in rs) / MIB,
            "load": [r.load for r in rs], "runs": len(rs),
            "out_bytes": sizes.get(name),
        }
    return rows


def report(rows: dict, size: int) -> str:
    lines = ["| contender | MB/s median (min–max) | wall s | CPU s export / import side "
             "| bytes sent (ratio) | peak RSS compress / decompress |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        sent = (f"{r['out_bytes']:,} (×{size / r['out_bytes']:.2f})"
                if r["out_bytes"] else "")
        rss = (f"{r['rss_compress_mib']:.0f} / {r['rss_decompress_mib']:.0f} MiB"
               if r["rss_decompress_mib"] else
               f"{r['rss_compress_mib']:.0f} MiB" if r["rss_compress_mib"] else "")
        cpu = f"{r['cpu_export_s']:.1f} / {r['cpu_import_s']:.1f}" if r["cpu_import_s"] \
            else f"{r['cpu_export_s']:.1f}"
        label = name.replace("|", "&#124;")
        lines.append(f"| {label} | {r['mb_s']:.0f} ({r['min']:.0f}–{r['max']:.0f}) | "
                     f"{r['wall_s']:.2f} | {cpu} | {sent} | {rss} |")
    lines.append("")
    for side in ("", "one CPU per side, "):
        gz = rows[f"Ganeti, {side}gzip"]
        none = rows[f"Ganeti, {side}none (ceiling: the pipeline alone)"]
        for tool in (TOOL, f"{TOOL} -T1"):
            ours = rows[f"Ganeti, {side}{tool}"]
            lines.append(f"{side or 'as it is, '}{tool}: {ours['mb_s'] / gz['mb_s']:.1f}x "
                         f"gzip's throughput (target >= 8), {ours['mb_s'] / none['mb_s']:.2f} "
                         f"of the pipeline's ceiling ({none['mb_s'] / gz['mb_s']:.1f}x gzip)")
    gz, ours = rows["Ganeti, gzip"], rows[f"Ganeti, {TOOL}"]
    alone_gz = rows["(compressor alone) dd iflag=direct | gzip -1 -c"]
    alone = rows[f"(compressor alone) dd iflag=direct | {TOOL}"]
    lines += [f"compressors alone: {alone['mb_s'] / alone_gz['mb_s']:.1f}x gzip -1",
              f"bytes sent {TOOL} / gzip: {ours['out_bytes'] / gz['out_bytes']:.3f}x "
              "(target <= 1.1)"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/var/tmp/gvbench", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image", default="mixed", choices=sorted(make_images.PROFILES))
    ap.add_argument("--size-gib", type=float, default=2, help="size of a new image")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "ganeti_vol")],
                   check=True)
    args.dir.mkdir(parents=True, exist_ok=True)
    image = args.dir / (f"{args.image}.img" if args.size_gib == 2 else
                        f"{args.image}-{args.size_gib:g}g.img")
    if not image.exists():
        make_images.make(str(image), args.image, int(args.size_gib * GIB))
    work = args.dir / "ganeti-tool"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    pem = work / "server.pem"
    impexp("cert", str(pem))
    rss_dir = work / "rss"
    rss_dir.mkdir()
    bins = {name: work / f"bin{i}" for i, name in enumerate(list(PIPELINES) + list(ALONE))}
    for name, binpath in bins.items():
        write_bin(binpath, rss_dir, PIPELINES.get(name, ("", "", False))[1])
    size = image.stat().st_size
    sizes = {}
    for name, (compress, _, _) in PIPELINES.items():
        if compress != "none":
            sizes[name] = stream_size(image, {"gzip": "gzip -1 -c"}.get(compress, compress),
                                      bins[name])
    collect_rss(rss_dir)  # the size runs' own
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"{image} ({size} bytes); before: {uptime}", flush=True)
    names = list(PIPELINES) + list(ALONE)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for rnd in range(args.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            if name in PIPELINES:
                compress, _, pinned = PIPELINES[name]
                run = pipeline_run(work, image, work / "target.img", pem, compress,
                                   bins[name], rss_dir, pinned)
            else:
                run = alone_run(image, ALONE[name], bins[name], rss_dir)
            runs[name].append(run)
            print(f"round {rnd + 1}: {name}: {size / run.wall / 1e6:.0f} MB/s "
                  f"({run.wall:.2f} s, load {run.load[0]:.2f})", flush=True)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"after: {uptime}\n")
    rows = summarize(size, runs, sizes)
    print(report(rows, size))
    if args.json:
        args.json.write_text(json.dumps({"image": str(image), "size": size, "rows": rows},
                                        indent=1))
    (work / "target.img").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
