#!/usr/bin/env python3
"""Backup repositories: ganeti-vol against borg 1.2 and restic 0.14 (issue 14, section 5).

    python bench/repo_bench.py [--dir /var/tmp/gvrepo-bench] [--runs 3] [--json out.json]

Needs the Debian packages borgbackup and restic.  On the 2 GiB mixed image
(bench/make_images.py), each run does, for each contender, in a fresh
repository: the first backup; a second backup of the unchanged disk; a
backup after 1 % of the disk changed (20 random 1 MiB writes at offsets
fixed per run); a restore of that last backup to a fresh file; and for
ganeti-vol ``import --into-existing`` of it into a copy of the disk before
the change.  Contenders: ganeti-vol raw (``export --raw``), ganeti-vol
through a ``cat`` export script, borg (``--chunker-params fixed,4194304
--compression lz4 --files-cache disabled``, restore with ``extract
--sparse``), restic (``--compression auto``, repository version 2).  Every
timed step is a whole process (fork to reap); ``sync`` runs (untimed) before
each, and restores of borg and restic end with ``sync FILE`` inside the timed
command (ganeti-vol's import fsyncs and reads back by itself).  The order of
the contenders rotates each run.  Prints MB/s of logical bytes (1 MB = 10^6
B; median, min-max), repository sizes and the issue's target ratios, and the
load average before and after (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
from run import gv, setup_workspace  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20
STEPS = ("first", "unchanged", "1% changed", "restore", "into-existing")


def sh(cmd: str, env: dict[str, str] | None = None, timed: bool = True) -> float:
    if timed:
        subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    proc = subprocess.run(["sh", "-c", cmd], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return wall


def q(*argv: object) -> str:
    import shlex

    return " ".join(shlex.quote(str(a)) for a in argv)


def change_one_percent(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for _ in range(20):
            f.seek(rng.randrange(0, size - MIB) // 4096 * 4096)
            f.write(rng.randbytes(MIB))


def du(path: Path) -> int:
    """Apparent bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Contender:
    name = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.repo = work / ("repo-" + "".join(c if c.isalnum() else "-" for c in self.name))

    def init(self) -> None: ...
    def backup(self, src: Path) -> str: ...
    def restore(self, out: Path) -> str: ...


class GV(Contender):
    def __init__(self, work: Path, conf: Path, script: bool) -> None:
        self.name = "ganeti-vol (cat script)" if script else "ganeti-vol raw"
        super().__init__(work)
        self.conf, self.script = conf, script

    def cmd(self, *args: str) -> str:
        return q(*gv(self.conf, *args))

    def init(self) -> None:
        sh(self.cmd("repo", "init", str(self.repo)), timed=False)

    def backup(self, src: Path) -> str:
        how = ["--os", "benchcat"] if self.script else ["--raw"]
        return self.cmd("export", "--name", "bench", *how, "--disk", str(src), "--repo",
                        str(self.repo), "--progress", "none", "--no-hooks")

    def restore(self, out: Path) -> str:
        return self.cmd("import", "--name", "bench", "--disk", f"{out},size=2G",
                        f"{self.repo}::bench", "--raw", "--progress", "none", "--no-hooks")

    def into_existing(self, out: Path) -> str:
        return self.cmd("import", "--name", "bench", "--disk", str(out), f"{self.repo}::bench",
                        "--into-existing", "--progress", "none", "--json")


class Borg(Contender):
    name = "borg 1.2"

    def env(self) -> dict[str, str]:
        return {**os.environ, "BORG_BASE_DIR": str(self.work / "borg-base"),
                "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}

    def init(self) -> None:
        self.n = 0
        sh(q("borg", "init", "-e", "none", self.repo), self.env(), timed=False)

    def backup(self, src: Path) -> str:
        self.n += 1
        return (f"cd {q(src.parent)} && " + q(
            "borg", "create", "--chunker-params", "fixed,4194304", "--compression", "lz4",
            "--files-cache", "disabled", f"{self.repo}::b{self.n}", src.name))

    def restore(self, out: Path) -> str:
        return (f"mkdir -p {q(out)}.d && cd {q(out)}.d && "
                + q("borg", "extract", "--sparse", f"{self.repo}::b{self.n}")
                + f" && mv src.img {q(out)} && sync {q(out)}")


class Restic(Contender):
    name = "restic 0.14"

    def env(self) -> dict[str, str]:
        return {**os.environ, "RESTIC_PASSWORD": "bench", "RESTIC_REPOSITORY": str(self.repo),
                "RESTIC_CACHE_DIR": str(self.work / "restic-cache")}

    def init(self) -> None:
        sh(q("restic", "init", "--repository-version", "2"), self.env(), timed=False)

    def backup(self, src: Path) -> str:
        return f"cd {q(src.parent)} && " + q("restic", "backup", "--compression", "auto",
                                             src.name)

    def restore(self, out: Path) -> str:
        return (q("restic", "restore", "latest", "--target", f"{out}.d")
                + f" && mv {q(out)}.d/src.img {q(out)} && sync {q(out)}")


def one_run(c: Contender, image: Path, work: Path, seed: int, results: dict) -> None:
    src, before, out = work / "src.img", work / "before.img", work / "out.img"
    for p in (src, before, out):
        p.unlink(missing_ok=True)
    shutil.rmtree(f"{out}.d", ignore_errors=True)
    shutil.rmtree(c.repo, ignore_errors=True)
    subprocess.run(["cp", "--sparse=always", str(image), str(src)], check=True)
    c.init()
    env = c.env() if isinstance(c, Borg | Restic) else None
    r = results.setdefault(c.name, {s: [] for s in STEPS} | {"size": [], "written": []})
    r["first"].append(sh(c.backup(src), env))
    r["size"].append(du(c.repo))
    r["unchanged"].append(sh(c.backup(src), env))
    subprocess.run(["cp", "--sparse=always", str(src), str(before)], check=True)
    change_one_percent(src, seed)
    r["1% changed"].append(sh(c.backup(src), env))
    r["restore"].append(sh(c.restore(out), env))
    if subprocess.run(["cmp", "-s", str(src), str(out)]).returncode:
        raise SystemExit(f"{c.name}: the restored image differs from the source")
    if isinstance(c, GV):
        subprocess.run(["sync"], check=True)
        t0 = time.perf_counter()
        proc = subprocess.run(["sh", "-c", c.into_existing(before)], capture_output=True,
                              text=True, check=True)
        r["into-existing"].append(time.perf_counter() - t0)
        r["written"].append(json.loads(proc.stdout)["written_bytes"])
        if subprocess.run(["cmp", "-s", str(src), str(before)]).returncode:
            raise SystemExit(f"{c.name}: --into-existing left a different image")
    for p in (src, before, out):
        p.unlink(missing_ok=True)
    shutil.rmtree(f"{out}.d", ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/var/tmp/gvrepo-bench")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "ganeti_vol")],
                   check=True)
    image = base / "mixed.img"
    if not image.exists() or image.stat().st_size != 2 * GIB:
        make_images.make(str(image), "mixed", 2 * GIB)
    work = base / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    configs = setup_workspace(work)
    flat = work / "flat"
    subprocess.run(gv(configs["default"], "export", "--name", "bench", "--disk", str(image),
                      "--raw", "-o", str(flat), "--progress", "none", "--no-hooks"), check=True,
                   stdout=subprocess.DEVNULL)
    flat_dump = sum(p.stat().st_size for p in flat.rglob("*.lz4"))
    shutil.rmtree(flat)
    load_before = os.getloadavg()
    contenders: list[Contender] = [GV(work, configs["default"], False),
                                   GV(work, configs["default"], True), Borg(work), Restic(work)]
    results: dict[str, dict] = {}
    for run in range(args.runs):
        shift = run % len(contenders)
        for c in contenders[shift:] + contenders[:shift]:
            one_run(c, image, work, 1000 + run, results)
        print(f"run {run + 1}/{args.runs} done", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    shutil.rmtree(work, ignore_errors=True)
    size = image.stat().st_size
    table = {}
    for name, r in results.items():
        row = {}
        for step in STEPS:
            if r[step]:
                speeds = sorted(size / w / 1e6 for w in r[step])
                row[step] = {"mb_s": round(statistics.median(speeds)),
                             "min": round(speeds[0]), "max": round(speeds[-1])}
        row["repo_bytes"] = int(statistics.median(r["size"]))
        if r["written"]:
            row["into_existing_written"] = int(statistics.median(r["written"]))
        table[name] = row
    print(f"# repository benchmark, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
          f"{args.runs} runs; load average before {load_before[0]:.2f} "
          f"(5 min {load_before[1]:.2f}), after {load_after[0]:.2f} ({load_after[1]:.2f})")
    print(f"\n| MB/s (median, min-max) | {' | '.join(table)} |")
    print("|---|" + "---|" * len(table))
    for step in STEPS:
        cells = [f"{t[step]['mb_s']} ({t[step]['min']}-{t[step]['max']})" if step in t else "-"
                 for t in table.values()]
        print(f"| {step} | {' | '.join(cells)} |")
    sizes = " | ".join(f"{t['repo_bytes'] / 1e6:.1f}" for t in table.values())
    print(f"| repository after the first backup, MB | {sizes} |")
    raw, script = table["ganeti-vol raw"], table["ganeti-vol (cat script)"]
    borg, restic = table["borg 1.2"], table["restic 0.14"]

    def ratio(a: dict, b: dict, step: str) -> str:
        return f"{a[step]['mb_s'] / b[step]['mb_s']:.2f}x"

    print(f"\nflat archive dump bytes: {flat_dump / 1e6:.1f} MB; ganeti-vol repository / flat: "
          f"{raw['repo_bytes'] / flat_dump:.4f}")
    print("\n| target | measured |\n|---|---|")
    print(f"| first >= 2.5x borg (raw / script) | {ratio(raw, borg, 'first')} / "
          f"{ratio(script, borg, 'first')} |")
    print(f"| first >= 4x restic (raw / script) | {ratio(raw, restic, 'first')} / "
          f"{ratio(script, restic, 'first')} |")
    for step in ("unchanged", "1% changed"):
        print(f"| {step} >= 2x borg raw, >= 1.5x borg script | {ratio(raw, borg, step)} / "
              f"{ratio(script, borg, step)} |")
    print(f"| restore >= 2x borg | {ratio(raw, borg, 'restore')} |")
    print(f"| --into-existing writes <= 2 % of the disk | "
          f"{raw['into_existing_written'] / size * 100:.2f} % |")
    faster = raw["into-existing"]["mb_s"] / raw["restore"]["mb_s"]
    print(f"| --into-existing >= 3x a full restore | {faster:.2f}x (ganeti-vol's restore) |")
    print(f"| repository size <= 1.02x flat dump bytes | "
          f"{raw['repo_bytes'] / flat_dump:.3f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"table": table, "flat_dump": flat_dump,
                                               "load": [load_before, load_after]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
