"""repo prune (borg rules), repo gc (mark and sweep, safe beside a running export),
backup remove of snapshots, and repo upgrade of the shipped older layout."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from test_repository import (  # noqa: F401 (ctx, repo: fixtures)
    CS,
    DATA,
    KIB,
    chunk_files,
    ctx,
    export,
    instance,
    make_disk,
    poke,
    repo,
    restore_disk,
    run,
    sha,
    snapshots,
)

from conftest import needs_blake3

from ganeti_vol.core import errors as E
from ganeti_vol.engine import hashing
from ganeti_vol.ops import transfer
from ganeti_vol.repo import Repository, open_snapshot
from ganeti_vol.repo import check as C
from ganeti_vol.repo import format as F
from ganeti_vol.repo import gc as G
from ganeti_vol.repo import prune as P
from ganeti_vol.repo.snapshot import SnapshotWriter
from ganeti_vol.repo.upgrade import upgrade

DAY = 86400.0


@pytest.fixture
def utc(monkeypatch):
    """Calendar periods are local time: pin it to UTC for the test."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def fake(ts: float, n: int) -> dict:
    return {"id": f"s{n:03d}", "timestamp": ts}


# --- prune rules ------------------------------------------------------------------------


def test_prune_rules_follow_borg(utc):
    """Daily/weekly/monthly keep the newest of each period not kept already; short rules keep
    the oldest too.  Snapshots every 6 hours for 60 days from 2026-01-01 00:00 UTC."""
    start = 1767225600.0  # 2026-01-01T00:00:00Z
    snaps = [fake(start + i * 6 * 3600, i) for i in range(240)]
    kept = P.plan(snaps, {"last": 2, "daily": 3, "weekly": 2, "monthly": 3})
    newest = [s["id"] for s in sorted(snaps, key=lambda s: -s["timestamp"])]
    assert kept[newest[0]] == "last #1" and kept[newest[1]] == "last #2"
    # days 58, 57, 56 by their 18:00 snapshots (day 59, the newest, was kept by last)
    assert ["daily #1", "daily #2", "daily #3"] == [kept[f"s{(d * 4 + 3):03d}"]
                                                    for d in (58, 57, 56)]
    # ISO week 9 (Mar 1 is a Sunday) is day 59's (kept by daily); then weeks 8 and 7 end
    # on Sundays Feb 22 and Feb 15 (days 52, 45)
    assert "weekly #1" == kept[f"s{(52 * 4 + 3):03d}"]
    assert "weekly #2" == kept[f"s{(45 * 4 + 3):03d}"]
    # months: March kept already (last), February's newest = Feb 28 18:00 (day 58, daily),
    # January's newest = Jan 31 18:00 (day 30); only 2 months exist -> the oldest too
    assert "monthly #1" == kept[f"s{(30 * 4 + 3):03d}"]
    assert "monthly[oldest] #2" == kept["s000"]
    assert 9 == len(kept)


def test_keep_last_counts_snapshots_not_seconds(utc):
    """Two snapshots in one second are two for --keep-last (restic), unlike borg's secondly."""
    snaps = [fake(1000.0, 0), fake(1000.2, 1), fake(1000.4, 2)]
    assert {"s002": "last #1", "s001": "last #2"} == P.plan(snaps, {"last": 2})


def exports_on_days(ctx, repo, tmp_path, days: int, inst_name="web1.example.com") -> list[str]:
    """One snapshot per day (timestamps rewritten into the past), each after a change."""
    ids = []
    make_disk(tmp_path / f"{inst_name}.img")
    inst = instance(tmp_path, inst_name, disks=(f"{inst_name}.img",))
    for d in range(days):
        poke(tmp_path / f"{inst_name}.img", 4 * CS, os.urandom(64))
        writer_ts = time.time() - (days - d) * DAY
        snap = export_at(ctx, repo, inst, writer_ts)
        ids.append(snap)
    return ids


def export_at(ctx, repo, inst, ts: float) -> str:
    """An export whose snapshot says it was made at ``ts`` (SnapshotWriter's start)."""
    from ganeti_vol.repo import prepare_export

    rctx, _ = prepare_export(ctx, repo.path)

    def factory(instance):
        w = SnapshotWriter(Repository.open(repo.path, write=True), instance)
        w.started = ts
        from ganeti_vol.repo.snapshot import new_id

        w.id = new_id(ts)
        w.path = f"{repo.path}::{w.id}"
        return w

    return transfer.export_instance(rctx, inst, into=factory).to_json()["repository"]["snapshot"]


def test_prune_removes_per_instance_and_dry_run_changes_nothing(tmp_path, ctx, repo, capsys,
                                                                node_dirs, utc):
    """--keep-daily 2 over 4 daily snapshots of two instances: 2 kept for each."""
    a = exports_on_days(ctx, repo, tmp_path, 4)
    b = exports_on_days(ctx, repo, tmp_path, 4, "db1.example.com")
    rc, out, _ = run(capsys, "repo", "prune", repo.path, "--keep-daily", "2", "--dry-run",
                     "--json")
    report = json.loads(out)
    assert 0 == rc and (4, 4) == (report["kept"], report["removed"])
    assert 8 == len(snapshots(repo))
    rc, out, _ = run(capsys, "repo", "prune", repo.path, "--keep-daily", "2")
    assert 0 == rc and "kept 4, removed 4" in out
    assert sorted(a[2:] + b[2:]) == sorted(s["id"] for s in snapshots(repo))


def test_prune_without_rules_is_refused(repo, capsys, node_dirs):
    """No --keep-* would remove everything: exit 3."""
    rc, _, err = run(capsys, "repo", "prune", repo.path)
    assert 3 == rc and "at least one --keep-*" in err


# --- gc ---------------------------------------------------------------------------------


def test_gc_frees_only_what_no_snapshot_names_and_reports_bytes(tmp_path, ctx, repo, capsys,
                                                                node_dirs):
    """After removing a snapshot, gc frees its unshared chunks only; the rest imports."""
    make_disk(tmp_path / "d0.img")
    inst = instance(tmp_path)
    a = export(ctx, repo, inst)["repository"]["snapshot"]
    poke(tmp_path / "d0.img", 1800 * KIB, os.urandom(100))
    b = export(ctx, repo, inst)["repository"]["snapshot"]
    rc, out, _ = run(capsys, "repo", "gc", repo.path, "--grace", "0", "--json")
    assert 0 == rc and 0 == json.loads(out)["chunks_freed"]
    before = {p.name: p.stat().st_size for p in chunk_files(repo)}
    run(capsys, "repo", "remove", f"{repo.path}::{b}")
    rc, out, _ = run(capsys, "repo", "gc", repo.path, "--grace", "0", "--json")
    report = json.loads(out)
    after = {p.name for p in chunk_files(repo)}
    assert 1 == report["chunks_freed"]
    [gone] = set(before) - after
    assert before[gone] == report["bytes_freed"]
    assert C.check(repo, read_data=True)["ok"]
    dst = instance(tmp_path, "copy.example.com", disks=("c0.img",))
    transfer.import_instance(ctx, dst, open_snapshot(f"{repo.path}::{a}"), raw=True)


def test_gc_grace_keeps_recently_touched_chunks(tmp_path, ctx, repo):
    """With the default grace, a chunk unreferenced a moment ago is kept (dry run first)."""
    make_disk(tmp_path / "d0.img")
    snap = export(ctx, repo, instance(tmp_path))["repository"]["snapshot"]
    with repo.writer() as w:
        from ganeti_vol.repo.snapshot import remove_snapshot

        remove_snapshot(repo, snap, w.tmpdir)
    n = len(chunk_files(repo))
    assert 0 == G.gc(repo)["chunks_freed"]
    assert n == G.gc(repo, grace=0, dry_run=True)["chunks_freed"] == len(chunk_files(repo))
    assert n == G.gc(repo, grace=0)["chunks_freed"]
    assert [] == chunk_files(repo)


def test_gc_while_an_export_runs_never_frees_what_it_reuses(tmp_path, ctx, repo, os_factory):
    """An export reuses chunks of a removed snapshot while gc runs: its snapshot stays whole.

    The export script pauses half-way (a FIFO it waits on), so gc runs exactly while the
    export has touched chunks that no published snapshot names."""
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    os_factory("slowos", scripts={"export": f'head -c 1048576 "$EXPORT_DEVICE"; read x < {fifo}; '
                                            'tail -c +1048577 "$EXPORT_DEVICE"\n'})
    make_disk(tmp_path / "d0.img")
    inst = instance(tmp_path, os_name="slowos+default")
    first = export(ctx, repo, instance(tmp_path))["repository"]["snapshot"]  # raw: no pause
    with repo.writer() as w:
        from ganeti_vol.repo.snapshot import remove_snapshot

        remove_snapshot(repo, first, w.tmpdir)   # every chunk is now unreferenced
    result: dict = {}

    def run_export():
        try:
            result["ok"] = export(ctx, repo, inst)
        except BaseException as err:  # reported below
            result["error"] = err

    t = threading.Thread(target=run_export)
    t.start()
    deadline = time.monotonic() + 20
    while not any(n.startswith("writer.") for n in os.listdir(Path(repo.path, "locks"))):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.5)                               # the first MiB is hashed and touched
    before = {p.name for p in chunk_files(repo)}
    report = G.gc(repo, grace=0)
    freed = before - {p.name for p in chunk_files(repo)}
    with open(fifo, "w") as f:
        f.write("go\n")
    t.join(30)
    assert "error" not in result, result.get("error")
    data = (tmp_path / "d0.img").read_bytes()
    head = {hashing.chunk_hash(F.default_digest(), data[i:i + CS]).hex() for i in range(0, 1 << 20, CS)}
    tail = {hashing.chunk_hash(F.default_digest(), data[i:i + CS]).hex()
            for i in range(1 << 20, len(data), CS)}
    assert 1 == report["live_writers"]
    assert not freed & head, "gc freed chunks the running export had already reused"
    assert freed <= tail and len(freed) == report["chunks_freed"]
    second = result["ok"]["repository"]
    assert (len(head & before), len(freed)) == (second["reused_chunks"], second["new_chunks"])
    assert C.check(repo, read_data=True)["ok"]
    assert 0 == G.gc(repo, grace=0)["chunks_freed"]


def test_gc_puts_back_a_chunk_an_interrupted_gc_left_in_trash(tmp_path, ctx, repo):
    """A chunk in trash/ (gc killed between rename and unlink) is read from there and restored."""
    make_disk(tmp_path / "d0.img")
    snap = export(ctx, repo, instance(tmp_path))["repository"]["snapshot"]
    victim = chunk_files(repo)[0]
    os.rename(victim, Path(repo.path, "trash", victim.name))
    dst = instance(tmp_path, "copy.example.com", disks=("c0.img",))
    transfer.import_instance(ctx, dst, open_snapshot(f"{repo.path}::{snap}"), raw=True)
    assert sha(tmp_path / "c0.img") == sha(tmp_path / "d0.img")
    assert 1 == G.gc(repo, grace=0)["restored_from_trash"]
    assert victim.exists() and C.check(repo, read_data=True)["ok"]


def test_gc_stops_at_a_snapshot_it_cannot_read(tmp_path, ctx, repo):
    """A snapshot whose metadata and indexes are damaged: gc frees nothing and says why."""
    make_disk(tmp_path / "d0.img")
    snap = export(ctx, repo, instance(tmp_path))["repository"]["snapshot"]
    sdir = Path(repo.snapshot_dir(snap))
    (sdir / "manifest.json").write_text("{")
    (sdir / "disk0.idx").write_bytes(b"junk")
    n = len(chunk_files(repo))
    with pytest.raises(E.ArchiveError, match=f"snapshot {snap} is unreadable"):
        G.gc(repo, grace=0)
    assert n == len(chunk_files(repo))


def test_gc_uses_the_indexes_of_a_snapshot_whose_manifest_is_damaged(tmp_path, ctx, repo):
    """Damaged manifest, sound index: its chunks are still marked, nothing is freed."""
    make_disk(tmp_path / "d0.img")
    snap = export(ctx, repo, instance(tmp_path))["repository"]["snapshot"]
    (Path(repo.snapshot_dir(snap)) / "manifest.json").write_text("{")
    assert 0 == G.gc(repo, grace=0)["chunks_freed"]


def test_backup_remove_takes_repository_snapshots_and_frees_no_data(tmp_path, ctx, repo, capsys,
                                                                     node_dirs):
    """`backup remove REPO::SNAP` removes the snapshot; shared chunks survive gc."""
    make_disk(tmp_path / "d0.img")
    inst = instance(tmp_path)
    a = export(ctx, repo, inst)["repository"]["snapshot"]
    b = export(ctx, repo, inst)["repository"]["snapshot"]
    rc, out, _ = run(capsys, "backup", "remove", f"{repo.path}::{a}")
    assert 0 == rc and f"removed {repo.path}::{a}" in out
    assert 0 == G.gc(repo, grace=0)["chunks_freed"]
    assert [b] == [s["id"] for s in snapshots(repo)]
    assert C.check(repo, read_data=True)["ok"]


# --- upgrade ----------------------------------------------------------------------------


@needs_blake3
def test_upgrade_migrates_a_copy_of_the_v1_fixture(tmp_path, ctx, capsys, node_dirs):
    """repo upgrade: v1 -> current; every snapshot still imports to the same bytes."""
    copy = tmp_path / "repo"
    shutil.copytree(DATA / "repo-v1" / "repo", copy)
    expected = json.loads((DATA / "repo-v1" / "expected.json").read_text())
    with pytest.raises(E.ArchiveFormatError, match="run 'ganeti-vol repo upgrade"):
        Repository.open(str(copy), write=True)
    rc, out, _ = run(capsys, "repo", "upgrade", str(copy), "--json")
    report = json.loads(out)
    assert 0 == rc and (1, F.FORMAT_VERSION, 13) == (report["from"], report["to"],
                                                     report["moved_chunks"])
    repo = Repository.open(str(copy), write=True)
    assert [] == [n for n in os.listdir(copy / "chunks") if len(n) > 2]
    assert C.check(repo, read_data=True)["ok"]
    for s in expected["snapshots"]:
        snap = open_snapshot(f"{copy}::{s['id']}")
        for d in s["disks"]:
            out_img = restore_disk(snap, d["index"], tmp_path / f"{s['id']}-{d['index']}.img")
            assert d["sha256"] == sha(out_img, d["size"])
    rc, out, _ = run(capsys, "repo", "upgrade", str(copy))
    assert 0 == rc and "already" in out


@needs_blake3
def test_an_interrupted_upgrade_is_refused_until_finished(tmp_path):
    """Marker written, half the chunks moved: other commands refuse; a rerun finishes."""
    copy = tmp_path / "repo"
    shutil.copytree(DATA / "repo-v1" / "repo", copy)
    repo = Repository.open(str(copy))
    config = {k: v for k, v in repo.config.items() if k != "checksum"}
    config.update(format_version=F.FORMAT_VERSION, upgrade={"from": 1})
    (copy / "config.json").write_bytes(F.seal(config))
    flat = sorted(p for p in (copy / "chunks").iterdir() if p.is_file())
    for p in flat[:5]:
        (copy / "chunks" / p.name[:2]).mkdir(exist_ok=True)
        p.rename(copy / "chunks" / p.name[:2] / p.name)
    with pytest.raises(E.ArchiveFormatError, match="was interrupted"):
        Repository.open(str(copy))
    assert len(flat) - 5 == upgrade(str(copy))["moved_chunks"]
    assert C.check(Repository.open(str(copy)), read_data=True)["ok"]


def test_upgrade_refuses_while_another_operation_holds_the_repository(tmp_path):
    """An upgrade needs the repository to itself: BusyError (exit 20) otherwise."""
    copy = tmp_path / "repo"
    shutil.copytree(DATA / "repo-v1" / "repo", copy)
    repo = Repository.open(str(copy))
    with repo.shared(), pytest.raises(E.BusyError, match="another operation is using it"):
        upgrade(str(copy))
    assert 1 == Repository.open(str(copy)).version
