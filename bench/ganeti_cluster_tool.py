#!/usr/bin/env python3
"""A real Ganeti cluster's export and import through ganeti-vol-lz4, against gzip and none.

    python bench/ganeti_cluster_tool.py [--dir /tmp/gvbench-cluster] [--rounds 3]
                                        [--size-gib 1] [--image mixed] [--json results.json]
    python bench/ganeti_cluster_tool.py --table results.json   # the table again

Brings up the one-node Ganeti 3.0 cluster of tests/ganeti_cluster.py (root, namespaces and
Debian's ganeti package), installs ganeti-vol on its node as doc/ganeti-integration.md and
doc/remote.md say (node config, the ``image`` OS definition, ganeti-vol-lz4 on Ganeti's
PATH, ``gnt-cluster modify --compression-tools=gzip,gzip-fast,gzip-slow,ganeti-vol-lz4``),
and adds one instance whose 1 GiB file disk holds the mixed test image (bench/make_images.py).
Then, each round, for each transport compression (the order rotating each round):

- ``gnt-backup export -n NODE --transport-compression=X INSTANCE`` into the node's export
  directory: the instance's OS export script (ours, ``image``), Ganeti's magic value, the
  compressor and socat with TLS on the sending side; socat, the decompressor and ``dd``
  into the dump on the receiving side;
- ``gnt-backup import --compress=X --src-dir=THAT EXPORT`` into a new instance: the same
  pipeline the other way, ending in our OS import script.

X is ``ganeti-vol-lz4``, ``gzip`` (Ganeti's default tool: ``gzip -1 -c`` / ``gzip -d -c``)
and ``none`` (no compression at all: what the rest of the job costs).  Each time is the
wall time of the whole ``gnt-backup`` command, as an operator waits for it (Ganeti's job
overhead included: a few seconds); MB/s are the disk's logical bytes (1 MB = 10^6 B) over
it.  Both sides of every transfer run on the one node, sharing this machine's CPUs (on a
real cluster an export to another node has a node for each side).  CPU seconds are those
of the whole cluster during the job (every process of its pid namespace, Ganeti's daemons
included: a cpuacct cgroup), and "host busy" the share of all of the machine's CPUs that
were busy meanwhile (other users included), from /proc/stat; the 1-minute load average is
recorded before every job.  Every dump and every imported disk is compared with the image
(sha256, untimed), and ``sync`` runs before every job (untimed).  Benchmarks are never part
of the test suite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import ganeti_cluster as gc  # noqa: E402
import make_images  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20
CONTENDERS = (gc.LZ4_TOOL, "gzip", "none")
#: the instance of the image, and one of a 4 MiB disk: what a job costs besides the data
SOURCE, TINY = gc.INSTANCE_NAMES[:2]


class CpuAccount:
    """CPU time of every process moved into a cgroup of its own (cgroup v1 cpuacct or v2)."""

    def __init__(self) -> None:
        name = f"ganeti-vol-bench-{os.getpid()}"
        v1, v2 = Path("/sys/fs/cgroup/cpuacct"), Path("/sys/fs/cgroup")
        if (v1 / "cpuacct.usage").exists():
            self.path, self.v2 = v1 / name, False
        elif (v2 / "cgroup.controllers").exists():
            self.path, self.v2 = v2 / name, True
        else:
            raise SystemExit("no cpuacct cgroup (v1) or cgroup v2 to account the cluster's CPU")
        self.path.mkdir()

    def adopt(self, pids: list[int]) -> None:
        for pid in pids:
            try:
                (self.path / "cgroup.procs").write_text(f"{pid}\n")
            except (ProcessLookupError, OSError):
                pass  # gone meanwhile

    def seconds(self) -> float:
        if self.v2:
            stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
            return int(stat["usage_usec"]) / 1e6
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def remove(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    print(f"warning: could not remove {self.path}", file=sys.stderr)
                    return
                time.sleep(0.1)


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return sum(values) - idle, sum(values)


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * MIB):
            h.update(block)
    return h.hexdigest()


class Bench:
    def __init__(self, cluster: gc.GanetiCluster, cpu: CpuAccount, image: Path,
                 tiny: Path) -> None:
        self.c, self.cpu = cluster, cpu
        self.images = {SOURCE: image, TINY: tiny}
        self.shas = {name: sha256(path) for name, path in self.images.items()}
        self.names = iter(gc.INSTANCE_NAMES[2:])

    def timed(self, argv: list[str], size: int) -> dict:
        self.c.run(["sync"])
        load = os.getloadavg()[0]
        cpu0, (busy0, total0) = self.cpu.seconds(), host_cpu()
        t0 = time.perf_counter()
        r = self.c.run(argv, check=False, timeout=3600)
        wall = time.perf_counter() - t0
        cpu1, (busy1, total1) = self.cpu.seconds(), host_cpu()
        if r.returncode or "WARNING" in r.output:
            raise SystemExit(f"{' '.join(argv)} failed:\n{r.output[-3000:]}")
        return {"wall": wall, "mb_s": size / 1e6 / wall, "cluster_cpu": cpu1 - cpu0,
                "host_busy": (busy1 - busy0) / max(1, total1 - total0), "load": load}

    def setup(self) -> None:
        self.c.install_ganeti_vol("image")
        self.c.install_lz4_tool()
        for name, image in self.images.items():
            self.c.run(["gnt-instance", "add", "-n", gc.NODE, "-t", "file", "--disk",
                        f"0:size={image.stat().st_size // MIB}M", "-B", "memory=64M",
                        "--no-start", "--no-name-check", "--no-ip-check", "-o",
                        "image+default", "-O", f"image={image},image_sha256={self.shas[name]}",
                        name], timeout=1800)

    def export(self, compress: str, source: str) -> dict:
        run = self.timed(["gnt-backup", "export", "-n", gc.NODE,
                          f"--transport-compression={compress}", source],
                         self.images[source].stat().st_size)
        dumps = self.c.run(["find", f"{gc.EXPORT_DIR}/{source}", "-type", "f", "!", "-name",
                            "config.ini"]).stdout.split()
        if len(dumps) != 1 or self.c.sha256(dumps[0]) != self.shas[source]:
            raise SystemExit(f"{compress}: the dump of {source} differs from its image")
        return run

    def import_(self, compress: str, source: str) -> dict:
        name = next(self.names)
        run = self.timed(["gnt-backup", "import", "-n", gc.NODE, "-t", "file",
                          f"--src-node={gc.NODE}", f"--src-dir={gc.EXPORT_DIR}/{source}",
                          f"--compress={compress}", "--net", "0:mac=generate",
                          "--no-name-check", "--no-ip-check", name],
                         self.images[source].stat().st_size)
        conf = self.c.config()
        inst = next(i for i in conf["instances"].values() if i["name"] == name)
        disk = conf["disks"][inst["disks"][0]]["logical_id"][1]
        if self.c.sha256(disk) != self.shas[source]:
            raise SystemExit(f"{compress}: {name} (from {source}) differs from its image")
        self.c.run(["gnt-instance", "remove", "-f", name])
        return run


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    med = fmt.format(statistics.median(values))
    if len(values) == 1:
        return med
    return f"{med} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def report(runs: dict) -> str:
    """The table of doc/performance.md: medians (min-max) over the rounds.  (No "data
    alone" column, big disk minus small: Ganeti's master looks at a connected transfer
    every 5 s, so a job's fixed part is not additive.)"""
    lines = ["| transport compression | export MB/s (s) | import MB/s (s) | a 4 MiB disk: "
             "export / import s | cluster CPU s: export / import | host busy | "
             "load (1 min) |",
             "|---|---|---|---|---|---|---|"]

    def med(rs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rs)

    for name in CONTENDERS:
        ex, im = runs[name]["export"], runs[name]["import"]
        tex, tim = runs[name]["tiny export"], runs[name]["tiny import"]
        lines.append(
            f"| `{name}` | {spread([r['mb_s'] for r in ex])} ({med(ex, 'wall'):.1f}) | "
            f"{spread([r['mb_s'] for r in im])} ({med(im, 'wall'):.1f}) | "
            f"{spread([r['wall'] for r in tex], '{:.1f}')} / "
            f"{spread([r['wall'] for r in tim], '{:.1f}')} | "
            f"{med(ex, 'cluster_cpu'):.1f} / {med(im, 'cluster_cpu'):.1f} | "
            f"{spread([100 * r['host_busy'] for r in ex + im])} % | "
            f"{spread([r['load'] for r in ex + im], '{:.1f}')} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/gvbench-cluster",
                        help="the image and the cluster's state (not under /etc, /var, /srv, "
                             "/root or /usr, which the cluster overlays)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--image", default="mixed", choices=sorted(make_images.PROFILES))
    parser.add_argument("--json", help="write every run here")
    parser.add_argument("--table", metavar="JSON", help="only print the table of a run "
                        "saved with --json")
    args = parser.parse_args(argv)
    if args.table:
        print(report(json.loads(Path(args.table).read_text())["runs"]))
        return 0
    reason = gc.missing_prerequisite()
    if reason:
        print(f"cannot run a cluster here: {reason}", file=sys.stderr)
        return 1
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    size = int(args.size_gib * GIB) // MIB * MIB
    image = work / f"{args.image}-{size // MIB}M.img"
    if not image.exists() or image.stat().st_size != size:
        make_images.make(str(image), args.image, size)
    tiny = work / f"{args.image}-4M.img"
    with open(image, "rb") as src, open(tiny, "wb") as dst:
        dst.write(src.read(4 * MIB))

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    state = Path(tempfile.mkdtemp(prefix="cluster-", dir=work))
    cluster = gc.GanetiCluster(state)
    cpu = CpuAccount()
    runs: dict[str, dict[str, list[dict]]] = {
        n: {k: [] for k in ("export", "import", "tiny export", "tiny import")}
        for n in CONTENDERS}
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    uptime_before = Path("/proc/loadavg").read_text().split()[:3]
    try:
        cluster.start()
        cpu.adopt(cluster.pids())
        bench = Bench(cluster, cpu, image, tiny)
        bench.setup()
        for rnd in range(args.rounds):
            order = CONTENDERS[rnd % len(CONTENDERS):] + CONTENDERS[:rnd % len(CONTENDERS)]
            for name in order:
                ex = bench.export(name, SOURCE)
                im = bench.import_(name, SOURCE)
                runs[name]["export"].append(ex)
                runs[name]["import"].append(im)
                runs[name]["tiny export"].append(bench.export(name, TINY))
                runs[name]["tiny import"].append(bench.import_(name, TINY))
                print(f"round {rnd + 1} {name}: export {ex['mb_s']:.0f} MB/s "
                      f"({ex['wall']:.2f} s, cluster CPU {ex['cluster_cpu']:.1f} s, load "
                      f"{ex['load']:.1f}), import {im['mb_s']:.0f} MB/s ({im['wall']:.2f} s, "
                      f"cluster CPU {im['cluster_cpu']:.1f} s, load {im['load']:.1f})",
                      flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        cluster.stop()
        cpu.remove()
        left = cluster.leftovers()
        if left:
            print("the cluster left:\n" + "\n".join(left), file=sys.stderr)
        shutil.rmtree(state, ignore_errors=True)
    uptime_after = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\n{started} to {time.strftime('%H:%M:%S')}, {args.rounds} rounds, "
          f"{image.name} ({size / 1e6:.0f} MB); load average before "
          f"{', '.join(uptime_before)}, after {', '.join(uptime_after)}; "
          f"{os.cpu_count()} CPUs; bring-up {cluster.timings.get('bring_up', 0):.1f} s\n")
    print(report(runs))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"started": started, "image": image.name, "size": size, "rounds": args.rounds,
             "load_before": uptime_before, "load_after": uptime_after, "runs": runs},
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
