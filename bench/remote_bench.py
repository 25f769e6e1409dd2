#!/usr/bin/env python3
"""Repositories over ssh and moves with haves (issue 15, section 5: the ssh and move rows).

    python bench/remote_bench.py [--dir /var/tmp/gvremote-bench] [--size-gib 2] [--json F]

Runs as root: it builds two network namespaces joined by a veth pair, with a
real ``sshd`` on 10.231.1.2 (tests/sshnet.py), and runs every client command
so that its ``ssh`` goes over that link.  Bytes sent are the client side's
veth transmit counter (everything the client put on the wire, ssh framing
and encryption included).  Peak RSS: the client's and the far side's own
(each wrapped in a fork-and-wait4 probe, tests/peak_rss.py).

The disk lives on a loop-mounted XFS with reflinks and the node config says
``snapshot_provider = reflink``, as a node that wants fast incremental backups
is set up: each export reads a clone, and a backup after a change reads only
the chunks the change map names (doc/snapshots.md).  The package is byte-
compiled first, as an installed one is.  node2's shell does not read this
machine's ``~/.bashrc`` (its ``pyenv init`` adds 0.1 s to every ssh command;
``--keep-bashrc`` keeps it); ``ssh node2 true`` is timed and printed.

On the mixed image (bench/make_images.py), in order:

* ``ssh first``: ``export --raw --repo ssh://node2/REPO`` into an empty repository;
* ``ssh 1% changed``: the same after 20 random 1 MiB writes (1 % of 2 GiB), three
  times (``--runs``), each after another change: the median run;
* ``full stream``: ``export --raw -o - | ssh node2 ganeti-vol import --raw -``
  (the median of three runs),
  what operators do today (every byte, every time);
* ``borg first`` / ``borg 1% changed``: ``borg create`` to ``ssh://node2/...``
  (``--chunker-params fixed,4194304 --compression lz4 --files-cache disabled``),
  if borg is installed on this machine;
* ``move first``: ``move`` into a fresh (sparse) disk on node2;
* ``move 1% changed``: ``move`` again after another 1 % change (the median of three).

Targets: ssh 1 %-changed bytes sent <= 3 % of the disk and wall time >= 5x
faster than the full stream; move 1 %-changed bytes sent <= 3 % of the disk;
peak RSS <= 200 MiB on both sides.  The machine may be shared: the load
average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))
import make_images  # noqa: E402
from conftest import sparse_file  # noqa: E402
import peak_rss  # noqa: E402
from disk_helpers import foreign_loop, mounted  # noqa: E402
from run import gv, setup_workspace  # noqa: E402
from sshnet import SshNet  # noqa: E402

GIB, MIB = 1 << 30, 1 << 20


def change_one_percent(path: Path, seed: int) -> None:
    """20 random 1 MiB writes per 2 GiB (1 % of the disk), as bench/repo_bench.py."""
    rng = random.Random(seed)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for _ in range(max(1, size // (100 * MIB))):
            f.seek(rng.randrange(0, size - MIB) // 4096 * 4096)
            f.write(rng.randbytes(MIB))


class Bench:
    def __init__(self, base: Path, size: int, runs: int = 3) -> None:
        self.base, self.size, self.runs = base, size, runs
        self.work = base / "work"
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.conf = setup_workspace(self.work)["default"]
        # the disk lives on XFS with reflinks: its snapshots are clones, and the change map
        # of a clone against the last backup's (ganeti_vol.system.changemap) is what lets a
        # 1 %-changed backup skip reading the rest
        with open(self.conf, "a") as f:
            f.write("snapshot_provider = reflink\n")
        self.dst = self.work / "node2"
        (self.dst / "state").mkdir(parents=True)
        self.dst_conf = self.dst / "node.conf"
        self.dst_conf.write_text(self.conf.read_text().replace(
            str(self.work / "state"), str(self.dst / "state")))
        self.net = SshNet(self.work / "net", servers=1)
        self.rows: dict[str, dict] = {}

    def remote(self, rss: Path) -> str:
        """GANETI_VOL_REMOTE_COMMAND: node2's ganeti-vol, its peak RSS written to ``rss``."""
        return shlex.join(peak_rss.command(rss, ["env", f"PYTHONPATH={ROOT}", sys.executable,
                                                 "-m", "ganeti_vol", "--config",
                                                 str(self.dst_conf)]))

    def median(self, name: str, runs: int, prepare: Callable[[int], object],
               argv: list[str] | str, rss: Path) -> dict:
        """``runs`` runs of a step (each after ``prepare(run)``); the row of the median wall
        time is kept, with every run's wall time."""
        rows = []
        for n in range(runs):
            prepare(n)
            rows.append(self.run(name, argv, env=self.env(rss), server_rss=rss))
        row = sorted(rows, key=lambda r: r["wall"])[runs // 2]
        row["walls"] = [r["wall"] for r in rows]
        self.rows[name] = row
        return row

    def run(self, name: str, argv: list[str] | str, *, env: dict[str, str] | None = None,
            server_rss: Path | None = None) -> dict:
        subprocess.run(["sync"], check=True)
        client_rss = self.work / f"rss-{len(self.rows)}"
        if isinstance(argv, str):
            argv = ["sh", "-c", argv]
        before = self.net.tx_bytes(1)
        t0 = time.perf_counter()
        proc = subprocess.run(peak_rss.command(client_rss, argv), env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(f"{name} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        row = {"wall": round(wall, 3), "mb_s": round(self.size / wall / 1e6, 1),
               "sent": self.net.tx_bytes(1) - before,
               "client_rss_mib": round(peak_rss.mib(client_rss), 1),
               "server_rss_mib": round(peak_rss.mib(server_rss), 1)
               if server_rss and server_rss.exists() else None}
        row["sent_pct"] = round(row["sent"] / self.size * 100, 2)
        self.rows[name] = row
        print(f"{name}: {row}", file=sys.stderr, flush=True)
        return row

    def env(self, rss: Path) -> dict[str, str]:
        return {**self.net.env(), "PYTHONPATH": str(ROOT),
                "GANETI_VOL_REMOTE_COMMAND": self.remote(rss)}

    def hide_bashrc(self) -> None:
        """node2 runs the shell of a fresh node: this development machine's ~/.bashrc
        (``pyenv init``: 0.1 s per ssh command) is hidden in node2's mount namespace."""
        home_rc = Path.home() / ".bashrc"
        if home_rc.exists():
            for host in self.net.hosts:
                host.sh(f"mount --bind /dev/null {shlex.quote(str(home_rc))}")

    def ssh_true(self) -> float:
        """The fixed cost of one ssh command here: the median of 5 ``ssh node2 true``."""
        argv = [*shlex.split(self.net.ssh_command()), "node2", "true"]
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            subprocess.run(argv, check=True)
            times.append(time.perf_counter() - t0)
        return sorted(times)[2]

    def main(self, image: Path, fs: Path) -> None:
        self.ssh_true_s = round(self.ssh_true(), 3)
        print(f"ssh node2 true: {self.ssh_true_s} s", file=sys.stderr, flush=True)
        src = fs / "src.img"
        subprocess.run(["cp", "--sparse=always", str(image), str(src)], check=True)
        repo = self.work / "repo"
        subprocess.run(gv(self.conf, "repo", "init", str(repo)), check=True,
                       stdout=subprocess.DEVNULL)
        export = [*gv(self.conf, "export", "--name", "bench", "--disk", str(src), "--raw",
                      "--repo", f"ssh://node2{repo}", "--progress", "none", "--no-hooks")]
        rss = self.work / "srv-ssh-first"
        self.run("ssh first", export, env=self.env(rss), server_rss=rss)
        self.median("ssh 1% changed", self.runs, lambda n: change_one_percent(src, 1 + 10 * n),
                    export, self.work / "srv-ssh-1pct")
        # the same with 1 MiB chunks (a 1 % change of scattered 1 MiB writes costs less)
        repo1m = self.work / "repo-1m"
        subprocess.run(gv(self.conf, "repo", "init", str(repo1m), "--chunk-size", "1M"),
                       check=True, stdout=subprocess.DEVNULL)
        export1m = [*export[:-4], f"ssh://node2{repo1m}", *export[-3:]]
        rss = self.work / "srv-ssh1m-first"
        self.run("ssh first, 1M chunks", export1m, env=self.env(rss), server_rss=rss)
        change_one_percent(src, 4)
        rss = self.work / "srv-ssh1m-1pct"
        self.run("ssh 1% changed, 1M chunks", export1m, env=self.env(rss), server_rss=rss)

        out = self.work / "stream-out.img"
        rss = self.work / "srv-stream"
        env = self.env(rss)
        stream = (shlex.join(gv(self.conf, "export", "--name", "bench", "--disk", str(src),
                                "--raw", "-o", "-", "--progress", "none", "--no-hooks"))
                  + " | " + env["GANETI_VOL_SSH"] + " node2 " + shlex.quote(
                      env["GANETI_VOL_REMOTE_COMMAND"] + " " + shlex.join([
                          "import", "--name", "bench", "--disk",
                          f"{out},size={self.size // MIB}M", "--raw", "-", "--progress",
                          "none", "--no-hooks"])))
        self.median("full stream", self.runs, lambda n: out.unlink(missing_ok=True), stream,
                    rss)
        out.unlink()

        if shutil.which("borg"):
            self.borg(src)

        # move reads its source itself (no snapshot, no change map): a copy on the work
        # directory's filesystem, as in the runs before the disk moved to XFS
        src = self.work / "move-src.img"
        subprocess.run(["cp", "--sparse=always", str(fs / "src.img"), str(src)], check=True)
        dst_disk = self.dst / "disk0.img"
        with open(dst_disk, "wb") as f:
            f.truncate(self.size)
        for ini, disk in ((self.work / "src.ini", src), (self.dst / "dst.ini", dst_disk)):
            ini.write_text(f"[instance]\nname = bench\n[disks]\n[[0]]\npath = {disk}\n"
                           f"size = {self.size // MIB}M\n")
        move = gv(self.conf, "move", str(self.work / "src.ini"),
                  f"ssh://node2{self.dst / 'dst.ini'}")
        rss = self.work / "srv-move-first"
        self.run("move first", move, env=self.env(rss), server_rss=rss)
        self.median("move 1% changed", self.runs, lambda n: change_one_percent(src, 2 + 10 * n),
                    move, self.work / "srv-move-1pct")
        if src.read_bytes() != dst_disk.read_bytes():
            raise SystemExit("move: the destination differs from the source")

    def borg(self, src: Path) -> None:
        rss = self.work / "srv-borg"
        base = self.work / "borg-base"
        env = {**os.environ, "BORG_BASE_DIR": str(base),
               "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
               "BORG_RSH": self.net.ssh_command(),
               "BORG_REMOTE_PATH": f"env BORG_BASE_DIR={base}-remote "
                                   + shlex.join(peak_rss.command(rss, ["borg"]))}
        url = f"ssh://node2{self.work / 'borg-repo'}"
        subprocess.run(["borg", "init", "-e", "none", url], env=env, check=True,
                       capture_output=True)
        for n, name in enumerate(("borg first", "borg 1% changed")):
            if n:
                change_one_percent(src, 3)  # a 1 % change after borg's first backup
            self.run(name, f"cd {shlex.quote(str(src.parent))} && " + shlex.join([
                "borg", "create", "--chunker-params", "fixed,4194304", "--compression", "lz4",
                "--files-cache", "disabled", f"{url}::b{n}", src.name]), env=env,
                server_rss=rss)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/var/tmp/gvremote-bench")
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--runs", type=int, default=3,
                    help="runs of the ssh 1%%-changed backup and of the full stream (median)")
    ap.add_argument("--keep-bashrc", action="store_true",
                    help="let node2's shell read this machine's ~/.bashrc")
    args = ap.parse_args()
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    size = int(args.size_gib * GIB) // MIB * MIB
    image = base / f"mixed-{size}.img"
    if not image.exists():
        make_images.make(str(image), "mixed", size)
    # as installed packages are: PYTHONDONTWRITEBYTECODE=1 (as on these machines) would
    # otherwise compile every module at each start, on both sides of every ssh command
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "ganeti_vol")],
                   check=True, stdout=subprocess.DEVNULL)
    bench = Bench(base, size, args.runs)
    xfs = sparse_file(base / "xfs.img", 3 * size + GIB)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(xfs)], check=True)
    load_before = os.getloadavg()
    with foreign_loop(xfs) as dev, mounted(dev, base / "xfs") as fs:
        bench.net.start()
        try:
            if not args.keep_bashrc:
                bench.hide_bashrc()
            bench.main(image, fs)
        finally:
            bench.net.stop()
    load_after = os.getloadavg()
    rows = bench.rows
    print(f"# remote benchmark, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
          f"{size / GIB:.2f} GiB mixed image; load average before {load_before[0]:.2f}, "
          f"after {load_after[0]:.2f}")
    print(f"\n`ssh node2 true` (the fixed cost of any ssh command here, median of 5): "
          f"{bench.ssh_true_s} s")
    print("\n| step | wall s | MB/s | sent MB | sent % of disk | client RSS MiB | "
          "server RSS MiB |\n|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        runs = f" (runs: {', '.join(map(str, r['walls']))})" if "walls" in r else ""
        print(f"| {name} | {r['wall']}{runs} | {r['mb_s']} | {r['sent'] / 1e6:.1f} | "
              f"{r['sent_pct']} | {r['client_rss_mib']} | {r['server_rss_mib']} |")
    ssh1, full, mv1 = rows["ssh 1% changed"], rows["full stream"], rows["move 1% changed"]
    rss = max(max(r["client_rss_mib"], r["server_rss_mib"] or 0)
              for n, r in rows.items() if not n.startswith("borg"))
    print("\n| target | measured |\n|---|---|")
    print(f"| ssh 1 % changed: bytes sent <= 3 % of the disk | {ssh1['sent_pct']} % "
          f"({rows['ssh 1% changed, 1M chunks']['sent_pct']} % with 1 MiB chunks) |")
    print(f"| ssh 1 % changed: >= 5x faster than the full stream | "
          f"{full['wall'] / ssh1['wall']:.1f}x |")
    print(f"| move 1 % changed: bytes sent <= 3 % of the disk | {mv1['sent_pct']} % |")
    print(f"| peak RSS <= 200 MiB, both sides (ganeti-vol) | {rss} MiB |")
    if "borg first" in rows:
        print(f"| ssh first against borg create ssh:// | "
              f"{rows['borg first']['wall'] / rows['ssh first']['wall']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "size": size,
                                               "load": [load_before, load_after],
                                               "ssh_true_s": bench.ssh_true_s}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
