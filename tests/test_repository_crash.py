"""Repository robustness: kill -9 at any point of export, import, prune, gc and upgrade; a full
disk; two exports at once.  Real processes (python -m ganeti_vol with this tree's code), real
SIGKILL, a real small tmpfs.  After each: no snapshot is listed unless all its data is there,
and nothing a snapshot names was deleted."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_repository import CS, MIB, ROOT, sha

from ganeti_vol.core.model import Instance
from ganeti_vol.ganeti import fields
from ganeti_vol.ops import operations, transfer
from ganeti_vol.repo import Repository, inspect, prepare_export
from ganeti_vol.repo import check as C
from ganeti_vol.repo import format as F
from ganeti_vol.repo.gc import gc


@pytest.fixture
def env(node_dirs):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("GANETI_", "PYTHONPATH"))}
    e.update(PYTHONPATH=str(ROOT), GANETI_VOL_CONFIG=str(node_dirs["conf"]))
    return e


def gv(env, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ganeti_vol", *argv], env=env,
                          capture_output=True, text=True, timeout=120)
    if check and proc.returncode:
        raise AssertionError(f"{argv} failed ({proc.returncode}): {proc.stderr}")
    return proc


def kill_when(env, argv: list[str], ready, delay: float = 0.0) -> bool:
    """Start ganeti-vol, SIGKILL it once ``ready()`` (then ``delay``); True if it was killed."""
    proc = subprocess.Popen([sys.executable, "-m", "ganeti_vol", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                if delay:
                    time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.0005)
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
        proc.wait()
    return proc.returncode == -signal.SIGKILL


def random_disk(path: Path, size: int, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def assert_sound(repo_path: str) -> dict:
    """Every listed snapshot is valid and ok with --read-data; nothing is quarantined."""
    repo = Repository.open(repo_path)
    assert all(s["valid"] for s in inspect.list_repo(repo)), inspect.list_repo(repo)
    report = C.check(repo, read_data=True)
    assert [] == report["quarantined"]
    assert all(s["health"] == "ok" for s in report["snapshots"]), report["snapshots"]
    return report


def collect(env, repo_path: str) -> None:
    """gc cleans a dead writer's leftovers; afterwards tmp/ and trash/ are empty."""
    gc(Repository.open(repo_path, write=True), grace=0)
    assert [] == os.listdir(Path(repo_path, "tmp"))
    assert [] == os.listdir(Path(repo_path, "trash"))
    assert [] == [n for n in os.listdir(Path(repo_path, "locks")) if n.startswith("writer.")]


@pytest.fixture
def setup(tmp_path, env):
    repo = str(tmp_path / "repo")
    Repository.init(repo, chunk_size=64 << 10)
    disk = random_disk(tmp_path / "d0.img", 6 * MIB, 1)
    return repo, disk


@pytest.fixture
def export_here(node_config):
    """Export in this process (setup only: the processes under test are the killed ones)."""
    def export(repo: str, disk: Path, name: str = "web1") -> str:
        uuid = fields.instance_uuid_for(name)
        inst = Instance(name=name, os="", uuid=uuid, ctime=1.0, mtime=1.0,
                        disks=(fields.make_disk(0, uuid, path=str(disk)),))
        ctx, into = prepare_export(operations.OpContext(node=node_config), repo)
        return transfer.export_instance(ctx, inst, into=into).to_json()["repository"]["snapshot"]

    return export


def export_argv(repo: str, disk: Path, name: str = "web1") -> list[str]:
    return ["export", "--name", name, "--disk", str(disk), "--raw", "--repo", repo,
            "--progress", "none", "--no-hooks"]


EXPORT_POINTS = {
    "first chunk stored": lambda r: bool(glob.glob(f"{r}/chunks/*/*")),
    "index written": lambda r: bool(glob.glob(f"{r}/tmp/*/snapshot-*/disk0.idx")),
    "manifest staged": lambda r: bool(glob.glob(f"{r}/tmp/*/snapshot-*/manifest.json")),
    "snapshot published": lambda r: bool(os.listdir(f"{r}/snapshots")),
}


@pytest.mark.parametrize("point", [*EXPORT_POINTS, "random"])
def test_kill_9_during_export_leaves_no_snapshot_without_its_data(setup, env, point,
                                                                 export_here):
    """Whatever the moment of the kill, listed snapshots are whole; a rerun and gc clean up."""
    repo, disk = setup
    existing = len(os.listdir(f"{repo}/snapshots"))
    if point == "random":  # spread over the export once it has registered as a writer
        for delay in (0.01, 0.06):
            kill_when(env, export_argv(repo, disk),
                      lambda: bool(glob.glob(f"{repo}/locks/writer.*")), delay)
            assert_sound(repo)
            collect(env, repo)  # also removes the dead writer's lock file
    else:
        test = EXPORT_POINTS[point]
        kill_when(env, export_argv(repo, disk), lambda: test(repo))
        assert_sound(repo)
    assert len(os.listdir(f"{repo}/snapshots")) >= existing
    export_here(repo, disk)   # the same export, run again, works
    collect(env, repo)
    report = assert_sound(repo)
    assert report["snapshots"], "the rerun published a snapshot"


def test_kill_9_during_import_then_into_existing_finishes_it(setup, env, tmp_path, export_here):
    """An import killed half-way is finished by --into-existing, byte for byte."""
    repo, disk = setup
    export_here(repo, disk)
    target = tmp_path / "out.img"
    argv = ["import", "--name", "web1", "--disk", f"{target},size=6M", f"{repo}::web1", "--raw",
            "--progress", "none", "--no-hooks"]
    killed = kill_when(env, argv, lambda: target.exists() and target.stat().st_blocks > 0)
    result = json.loads(gv(env, *argv, "--into-existing", "--json").stdout)
    assert sha(target) == sha(disk)
    if killed:
        assert result["disks"][0]["same_chunks"] + result["disks"][0]["written_chunks"] == 96
    assert_sound(repo)


def test_kill_9_during_prune_removes_whole_snapshots_only(setup, env, export_here):
    """Prune killed while removing: each snapshot is there whole or gone; a rerun finishes."""
    repo, disk = setup
    small = disk.with_name("small.img")
    random_disk(small, 256 * 1024, 2)
    for i in range(12):
        with open(small, "r+b") as f:
            f.write(os.urandom(16))
        export_here(repo, small, f"vm{i % 3}")
    before = len(os.listdir(f"{repo}/snapshots"))
    argv = ["repo", "prune", repo, "--keep-last", "1"]
    kill_when(env, argv, lambda: len(os.listdir(f"{repo}/snapshots")) < before)
    assert_sound(repo)
    gv(env, *argv)
    assert 3 == len(os.listdir(f"{repo}/snapshots"))
    collect(env, repo)
    assert_sound(repo)


@pytest.mark.parametrize("when", ["trash in use", "chunks freed"])
def test_kill_9_during_gc_deletes_nothing_a_snapshot_names(setup, env, tmp_path, when,
                                                            export_here):
    """gc killed mid-sweep: the kept snapshot reads fine (trash/ is a fallback); rerun frees."""
    repo, disk = setup
    export_here(repo, disk)
    keep = random_disk(tmp_path / "k.img", 1 * MIB, 3)
    export_here(repo, keep, "keep")
    gv(env, "repo", "remove", f"{repo}::web1")
    n = len(glob.glob(f"{repo}/chunks/*/*"))
    ready = {"trash in use": lambda: bool(os.listdir(f"{repo}/trash")),
             "chunks freed": lambda: len(glob.glob(f"{repo}/chunks/*/*")) < n - 20}[when]
    kill_when(env, ["repo", "gc", repo, "--grace", "0"], ready)
    out = tmp_path / "keep-out.img"
    gv(env, "import", "--name", "keep", "--disk", f"{out},size=1M", f"{repo}::keep", "--raw",
       "--progress", "none", "--no-hooks")
    assert sha(out) == sha(keep)
    assert_sound(repo)
    collect(env, repo)
    assert 16 == len(glob.glob(f"{repo}/chunks/*/*"))


def make_v1_copy(src: str, dst: str) -> int:
    """The same repository in layout version 1 (every chunk in chunks/): its chunk count."""
    shutil.copytree(src, dst)
    n = 0
    for path in glob.glob(f"{dst}/chunks/*/*"):
        os.rename(path, f"{dst}/chunks/{os.path.basename(path)}")
        n += 1
    for d in glob.glob(f"{dst}/chunks/*/"):
        os.rmdir(d)
    config = F.unseal(Path(dst, "config.json").read_bytes(), "config")
    config["format_version"] = 1
    Path(dst, "config.json").write_bytes(F.seal(config))
    return n


def test_kill_9_during_upgrade_is_finished_by_running_it_again(setup, env, tmp_path,
                                                               export_here):
    """Upgrade killed after some chunks moved: the repository refuses other commands until
    the rerun, which completes it; every snapshot then reads with --read-data."""
    repo, disk = setup
    export_here(repo, disk)
    old = str(tmp_path / "v1")
    n = make_v1_copy(repo, old)
    assert 1 == Repository.open(old).version
    moved = lambda: bool(glob.glob(f"{old}/chunks/*/*"))  # noqa: E731
    killed = kill_when(env, ["repo", "upgrade", old], moved)
    if killed and len(glob.glob(f"{old}/chunks/*/*")) < n:
        proc = gv(env, "repo", "list", old, check=False)
        assert 16 == proc.returncode and "was interrupted" in proc.stderr
    gv(env, "repo", "upgrade", old)
    assert n == len(glob.glob(f"{old}/chunks/*/*"))
    assert_sound(old)


# --- full disk, concurrency -------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(where: Path, size: str):
    """A tmpfs of ``size`` mounted at ``where`` (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def tiny_fs(tmp_path):
    """A 3 MiB tmpfs: a disk that fills up."""
    with tmpfs(tmp_path / "tiny", "3m") as mnt:
        yield mnt


def test_a_full_disk_fails_cleanly_and_gc_recovers_the_space(tiny_fs, env, tmp_path):
    """ENOSPC: exit 19, no snapshot, no temp files; gc frees the orphans; a smaller one fits."""
    repo = str(tiny_fs / "repo")
    gv(env, "repo", "init", repo, "--chunk-size", "64K")
    big = random_disk(tmp_path / "big.img", 6 * MIB, 4)
    proc = gv(env, *export_argv(repo, big), check=False)
    assert 19 == proc.returncode and "no space left on device" in proc.stderr
    assert [] == os.listdir(f"{repo}/snapshots")
    assert [] == os.listdir(f"{repo}/tmp")
    assert_sound(repo)
    collect(env, repo)
    assert [] == glob.glob(f"{repo}/chunks/*/*")
    small = random_disk(tmp_path / "small.img", 1 * MIB, 5)
    gv(env, *export_argv(repo, small))
    assert_sound(repo)


def concurrent_exports(env, repo: str, disks: list[Path], names: list[str]) -> list:
    procs = [subprocess.Popen([sys.executable, "-m", "ganeti_vol", *export_argv(repo, d, n),
                               "--json"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for d, n in zip(disks, names, strict=True)]
    outs = [p.communicate(timeout=120) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs, strict=True)]


def test_two_exports_of_the_same_instance_at_once(setup, env):
    """Both run: each either publishes its own whole snapshot or, if the other holds the
    instance (or its disk snapshot), stops at once with exit 20 naming the holder; never a
    partial snapshot."""
    repo, disk = setup
    results = concurrent_exports(env, repo, [disk, disk], ["web1", "web1"])
    published = [json.loads(out)["repository"]["snapshot"] for rc, out, _ in results if rc == 0]
    assert sorted(published) == sorted(os.listdir(f"{repo}/snapshots")) and published
    for rc, _, err in results:
        assert rc == 0 or (rc == 20 and re.search(r"in use by (pid \d+ \(export of instance "
                                                  r"'web1'|another export)", err)), err
    assert_sound(repo)
    collect(env, repo)
    assert 96 == len(glob.glob(f"{repo}/chunks/*/*"))


def test_two_instances_with_the_same_data_export_at_once(setup, env, tmp_path):
    """Two instances, same content, exported at the same time: both snapshots, chunks once."""
    repo, disk = setup
    twin = tmp_path / "twin.img"
    shutil.copy(disk, twin)
    results = concurrent_exports(env, repo, [disk, twin], ["web1", "web2"])
    assert [0, 0] == [rc for rc, _, _ in results], results
    ids = {json.loads(out)["repository"]["snapshot"] for _, out, _ in results}
    assert 2 == len(ids)
    assert 6 * MIB // CS == len(glob.glob(f"{repo}/chunks/*/*"))
    assert_sound(repo)


# --- memory -----------------------------------------------------------------------------


def test_every_command_stays_under_200_mib_on_a_repository_of_small_chunks(tmp_path):
    """bench/repo_rss.py at CI size (2,000 chunks; doc/performance.md has 120,000): every
    command's peak RSS, from wait4(2), is at most 200 MiB."""
    with tmpfs(tmp_path / "repo", "64m") as repo:  # fsync costs nothing there: a short run
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "repo_rss.py"), "--chunks",
                               "2000", "--dir", str(tmp_path), "--repo-dir", str(repo),
                               "--json"], capture_output=True, text=True, timeout=300)
    assert 0 == proc.returncode, proc.stderr
    report = json.loads(proc.stdout)
    assert 11 == len(report["results"])
    assert 2000 == report["chunks_in_repository"]
    assert report["max_peak_rss_mib"] <= 200, report["results"]
