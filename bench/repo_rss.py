"""Peak RSS of every repository command on a repository of many small chunks.

Builds a sparse disk of N distinct 64 KiB chunks (an 8-byte counter and zeros: tiny
frames), a repository with 64 KiB chunks (the smallest), and runs each command as its own
process, reading its peak RSS from wait4(2).  The target (issue 14): at most
200 MiB at any repository size; doc/performance.md has the figures for
N = 100,000+.

    python3 bench/repo_rss.py --chunks 120000 --dir /var/tmp/x --repo-dir /mnt/tmpfs [--json]

Put ``--repo-dir`` on tmpfs to keep the run short (each new chunk is fsynced),
but not ``--dir``, which holds the disk image: on tmpfs, ``lseek(SEEK_HOLE)``
walks the file's pages, so the engine's hole probe costs O(file size) per
chunk there (2.1 ms per call on a 160 MB tmpfs file, 0.18 ms on ext4).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = 64 << 10  # the smallest chunk size


def run(env: dict[str, str], *argv: str) -> dict[str, object]:
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "ganeti_vol", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.stderr.close() if proc.stderr else None
    rc = os.waitstatus_to_exitcode(status)
    if rc not in (0, 1):
        raise SystemExit(f"{' '.join(argv)} failed ({rc}): {err}")
    return {"command": " ".join(argv[:2]), "seconds": round(time.monotonic() - t0, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=100_000)
    ap.add_argument("--dir", required=True, help="an empty work directory (tmpfs is fastest)")
    ap.add_argument("--repo-dir", help="where the repository goes (default: --dir)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    d = os.path.abspath(args.dir)
    img, out = (os.path.join(d, n) for n in ("disk.img", "out.img"))
    repo = os.path.join(os.path.abspath(args.repo_dir or d), "repo")
    with open(img, "wb") as f:  # sparse: 8 distinct bytes at the start of each chunk
        for i in range(args.chunks):
            f.seek(i * BLOCK)
            f.write(struct.pack("<Q", i + 1))
        f.truncate(args.chunks * BLOCK)
    conf = os.path.join(d, "node.conf")
    with open(conf, "w") as f:
        for key in ("log_dir", "export_dir", "state_dir"):
            os.makedirs(os.path.join(d, key), exist_ok=True)
            f.write(f"{key} = {os.path.join(d, key)}\n")
    env = {**os.environ, "PYTHONPATH": ROOT, "GANETI_VOL_CONFIG": conf}
    export = ["export", "--name", "big", "--disk", img, "--raw", "--repo", repo,
              "--progress", "none", "--no-hooks"]
    target = ["--name", "big", "--disk", f"{out},size={args.chunks * BLOCK // 1024}K"]
    results = [
        run(env, "repo", "init", repo, "--chunk-size", "64K"),
        run(env, *export),
    ]
    with open(img, "r+b") as f:  # change 1 % of the blocks
        for i in range(0, args.chunks, 100):
            f.seek(i * BLOCK + 8)
            f.write(b"changed")
    results += [
        run(env, *export),
        run(env, "repo", "list", repo),
        run(env, "repo", "info", f"{repo}::big"),
        run(env, "repo", "check", repo, "--read-data"),
        run(env, "import", *target, f"{repo}::big", "--raw", "--progress", "none",
            "--no-hooks"),
    ]
    snaps = sorted(os.listdir(os.path.join(repo, "snapshots")))
    results += [
        run(env, "repo", "diff", f"{repo}::{snaps[0]}", snaps[-1]),
        run(env, "import", *target, f"{repo}::{snaps[0]}", "--into-existing", "--progress",
            "none"),
        run(env, "repo", "prune", repo, "--keep-last", "1"),
        run(env, "repo", "gc", repo, "--grace", "0"),
    ]
    chunks = sum(len(files) for _, _, files in os.walk(os.path.join(repo, "chunks")))
    report = {"chunks_in_repository": chunks, "results": results,
              "max_peak_rss_mib": max(r["peak_rss_mib"] for r in results)}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for r in results:
            print(f"{r['command']:<16} {r['peak_rss_mib']:>7.1f} MiB {r['seconds']:>7.2f} s")
        print(f"max {report['max_peak_rss_mib']} MiB; {chunks} chunks left after prune+gc")
    return 0


if __name__ == "__main__":
    sys.exit(main())
