"""repo check (health, quarantine, repair) and import --into-existing (write only what differs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_repository import (  # noqa: F401 (ctx, repo: fixtures)
    CS,
    KIB,
    MIB,
    chunk_files,
    corrupt_chunk,
    ctx,
    export,
    instance,
    make_disk,
    poke,
    repo,
    run,
    sha,
)

from ganeti_vol.core import errors as E
from ganeti_vol.engine import hashing
from ganeti_vol.ganeti import config as cfgmod
from ganeti_vol.ops import opstate, transfer
from ganeti_vol.repo import Repository, open_snapshot
from ganeti_vol.repo import check as C
from ganeti_vol.repo import format as F
from ganeti_vol.repo.restore import import_into_existing


def healths(report) -> dict[str, str]:
    return {s["id"]: s["health"] for s in report["snapshots"]}


def chunk_of(disk: Path, offset: int) -> bytes:
    data = disk.read_bytes()[offset // CS * CS:][:CS]
    return hashing.chunk_hash(F.default_digest(), data)


@pytest.fixture
def two(tmp_path, ctx, repo):
    """Two snapshots of web1 (the second after a small change)."""
    make_disk(tmp_path / "d0.img")
    a = export(ctx, repo, instance(tmp_path))["repository"]["snapshot"]
    poke(tmp_path / "d0.img", 1800 * KIB)
    b = export(ctx, repo, instance(tmp_path))["repository"]["snapshot"]
    return a, b


def test_check_of_a_sound_repository_is_ok_and_exits_zero(tmp_path, repo, two, capsys, node_dirs):
    """Every snapshot ok, with and without --read-data; JSON carries the same."""
    rc, out, _ = run(capsys, "repo", "check", repo.path, "--read-data", "--json")
    report = json.loads(out)
    assert 0 == rc and report["ok"]
    assert {two[0]: "ok", two[1]: "ok"} == healths(report)
    assert len(chunk_files(repo)) == report["chunks_checked"]
    rc, out, _ = run(capsys, "repo", "check", repo.path)
    assert 0 == rc and "all snapshots ok" in out


def test_read_data_finds_a_bit_flip_quarantines_it_and_names_the_offset(
        tmp_path, repo, two, capsys, node_dirs):
    """A flipped bit only --read-data can see: both snapshots broken, chunk kept in quarantine."""
    bad = corrupt_chunk(repo, 128 * KIB, tmp_path / "d0.img")
    content = bad.read_bytes()
    assert C.check(repo)["ok"], "structure alone cannot see a flipped bit"
    rc, out, _ = run(capsys, "repo", "check", repo.path, "--read-data", "--json")
    report = json.loads(out)
    assert 1 == rc and not report["ok"]
    assert {two[0]: "broken", two[1]: "broken"} == healths(report)
    first = report["snapshots"][0]["first_bad"]
    assert (0, 2 * CS, bad.name, "digest mismatch") == (
        first["disk"], first["offset"], first["chunk"], first["reason"])
    assert not bad.exists()
    [kept] = list(Path(repo.path, "quarantine").glob(f"{bad.name}.*.bad"))
    assert content == kept.read_bytes()


def test_missing_and_truncated_chunks_are_found_without_reading_data(tmp_path, repo, two):
    """Structure check: a missing chunk and one of the wrong size make snapshots broken."""
    os.unlink(repo.chunk_path(chunk_of(tmp_path / "d0.img", 1800 * KIB)))  # only in b
    trunc = Path(repo.chunk_path(chunk_of(tmp_path / "d0.img", 64 * KIB)))
    trunc.write_bytes(trunc.read_bytes()[:-1])
    report = C.check(repo)
    assert {two[0]: "broken", two[1]: "broken"} == healths(report)
    b = report["snapshots"][1]
    assert "2 chunk(s) damaged or missing" in b["reason"]
    assert [trunc.name] == [q["chunk"] for q in report["quarantined"]]


def test_damaged_metadata_makes_a_snapshot_broken(tmp_path, repo, two):
    """A manifest edit is reported as broken metadata; the other snapshot stays ok."""
    m = Path(repo.snapshot_dir(two[0]), "manifest.json")
    m.write_text(m.read_text().replace('"kind": "export"', '"kind": "exportx"'))
    report = C.check(repo)
    assert {two[0]: "broken", two[1]: "ok"} == healths(report)
    assert report["snapshots"][0]["reason"].startswith("metadata: ")


def test_repair_from_another_repository_makes_degraded_snapshots_ok(
        tmp_path, ctx, repo, two, capsys, node_dirs):
    """A second repository holding the same data re-supplies the damaged chunk."""
    other = Repository.init(str(tmp_path / "other"), chunk_size=CS)
    export(ctx, other, instance(tmp_path))
    bad = corrupt_chunk(repo, 128 * KIB, tmp_path / "d0.img")
    rc, out, _ = run(capsys, "repo", "check", repo.path, "--read-data", "--repair-from",
                     other.path, "--json")
    report = json.loads(out)
    assert 0 == rc and report["ok"] and 1 == report["repaired_chunks"]
    assert {two[0]: "degraded", two[1]: "degraded"} == healths(report)
    assert ["ok", "ok"] == [s["after_repair"] for s in report["snapshots"]]
    assert bad.exists() and C.check(repo, read_data=True)["ok"]


def test_repair_from_the_live_instance_verifies_what_it_reads(tmp_path, ctx, repo, two,
                                                              capsys, node_dirs):
    """--repair-from INSTANCE_FILE: the live disk supplies a chunk only if it still matches."""
    inst_file = tmp_path / "web1.conf"
    inst_file.write_text(cfgmod.instance_to_text(instance(tmp_path)))
    os.unlink(repo.chunk_path(chunk_of(tmp_path / "d0.img", 64 * KIB)))   # live disk has it
    old = chunk_of(tmp_path / "d0.img", 1800 * KIB)
    poke(tmp_path / "d0.img", 1800 * KIB, b"newer")                       # live disk moved on
    os.unlink(repo.chunk_path(old))
    rc, out, _ = run(capsys, "repo", "check", repo.path, "--repair-from", str(inst_file),
                     "--json")
    report = json.loads(out)
    assert 1 == rc and 1 == report["repaired_chunks"]
    a, b = report["snapshots"]
    assert ("degraded", "ok") == (a["health"], a["after_repair"])
    assert ("broken", "broken", 1) == (b["health"], b["after_repair"], b["repaired"])


def test_next_export_stores_a_quarantined_chunk_again(tmp_path, ctx, repo, two):
    """Quarantine then export of the same disk: the chunk is back and every snapshot ok."""
    corrupt_chunk(repo, 1800 * KIB, tmp_path / "d0.img")
    assert not C.check(repo, read_data=True)["ok"]
    r = export(ctx, repo, instance(tmp_path))["repository"]
    assert 1 == r["new_chunks"]
    assert C.check(repo, read_data=True)["ok"]


# --- import --into-existing ---------------------------------------------------------------


def restore_to(ctx, repo, snap_id: str, tmp_path: Path, name: str) -> Path:
    dst = instance(tmp_path, "copy.example.com", disks=(name,))
    transfer.import_instance(ctx, dst, open_snapshot(f"{repo.path}::{snap_id}"), raw=True)
    return tmp_path / name


def test_into_existing_writes_only_the_chunks_that_differ(tmp_path, ctx, repo, two, capsys,
                                                          node_dirs):
    """Roll a disk at state B back to A: only the changed chunk is written; bytes equal A's."""
    a, b = two
    out = restore_to(ctx, repo, b, tmp_path, "o.img")
    expected = restore_to(ctx, repo, a, tmp_path, "a.img")
    rc, text, _ = run(capsys, "import", "--name", "copy", "--disk", str(out),
                      f"{repo.path}::{a}", "--into-existing", "--progress", "none", "--json")
    result = json.loads(text)
    assert 0 == rc
    disk = result["disks"][0]
    assert (1, CS) == (disk["written_chunks"], disk["written_bytes"])
    assert disk["chunks"] - 1 == disk["same_chunks"]
    assert sha(expected) == sha(out)


def test_into_existing_never_reads_a_damaged_chunk_it_does_not_need(tmp_path, ctx, repo, two):
    """Damage in an unchanged chunk does not matter; damage in a needed one stops the import."""
    a, b = two
    out = restore_to(ctx, repo, b, tmp_path, "o.img")
    corrupt_chunk(repo, 128 * KIB, tmp_path / "d0.img")           # same in A and B
    snap_a = open_snapshot(f"{repo.path}::{a}")
    state = ctx.node.state_dir
    import_into_existing(snap_a, instance(tmp_path, disks=("o.img",)), state_dir=state)
    poke(out, 128 * KIB, b"needs rewriting")
    with pytest.raises(E.IntegrityError, match="at offset 131072: corrupt LZ4|chunk hash"):
        import_into_existing(snap_a, instance(tmp_path, disks=("o.img",)), state_dir=state)
    assert b"needs rewriting" == out.read_bytes()[128 * KIB:128 * KIB + 15]
    assert opstate.FAILED == opstate.read_mark(state, "web1.example.com")["state"]


def test_into_existing_is_locked_and_marked_like_every_import(tmp_path, ctx, repo, two):
    """A second writer of the instance is refused at once; a failed run leaves the instance
    broken, and the rerun that completes makes it good again."""
    a, _ = two
    restore_to(ctx, repo, a, tmp_path, "o.img")
    dst = instance(tmp_path, "copy.example.com", disks=("o.img",))
    snap = open_snapshot(f"{repo.path}::{a}")
    state = ctx.node.state_dir
    with opstate.operation(state, "import", dst):
        with pytest.raises(E.BusyError, match="copy.example.com"):
            import_into_existing(snap, dst, state_dir=state)
    os.unlink(tmp_path / "o.img")
    with pytest.raises(E.UsageError):
        import_into_existing(snap, dst, state_dir=state)  # refused before anything is marked
    assert opstate.read_mark(state, "copy.example.com") is None
    restore_to(ctx, repo, a, tmp_path, "o.img")
    poke(tmp_path / "o.img", 1800 * KIB, b"stale")
    import_into_existing(snap, dst, state_dir=state)
    assert opstate.read_mark(state, "copy.example.com") is None


def test_an_interrupted_import_resumes_with_into_existing(tmp_path, ctx, repo, two):
    """An import stopped half-way (a damaged chunk), then repaired: the rerun writes the rest."""
    a, b = two
    disk = tmp_path / "d0.img"
    bad = chunk_of(disk, 640 * KIB)
    corrupt_chunk(repo, 640 * KIB, disk)
    dst = instance(tmp_path, "copy.example.com", disks=("o.img",))
    with pytest.raises(E.IntegrityError):
        transfer.import_instance(ctx, dst, open_snapshot(f"{repo.path}::{b}"), raw=True)
    other = Repository.init(str(tmp_path / "other"), chunk_size=CS)
    export(ctx, other, instance(tmp_path))
    assert C.check(repo, read_data=True, source=C.RepoSource(repo, other))["ok"]
    assert Path(repo.chunk_path(bad)).exists()
    result = import_into_existing(open_snapshot(f"{repo.path}::{b}"), dst,
                                  state_dir=ctx.node.state_dir)
    d = result["disks"][0]
    data = disk.read_bytes()
    data_chunks = sum(1 for i in range(0, len(data), CS) if data[i:i + CS] != bytes(CS))
    assert 0 < d["written_chunks"] < data_chunks, "the chunks written before the stop stay"
    assert sha(tmp_path / "o.img", 2 * MIB) == sha(disk)


def test_into_existing_needs_existing_disks_and_a_repository_snapshot(
        tmp_path, repo, two, capsys, node_dirs):
    """Bad input: a missing target, or an archive source: exit 3, nothing written."""
    rc, _, err = run(capsys, "import", "--name", "copy", "--disk", str(tmp_path / "none.img"),
                     f"{repo.path}::{two[0]}", "--into-existing", "--progress", "none")
    assert 3 == rc and "does not exist" in err
    assert not (tmp_path / "none.img").exists()
    rc, _, err = run(capsys, "import", "--name", "copy", "--disk", str(tmp_path / "d0.img"),
                     "somearchive", "--into-existing", "--progress", "none")
    assert 3 == rc and "--into-existing needs a repository snapshot" in err


def test_into_existing_writes_only_the_granules_that_differ_inside_a_chunk(tmp_path, ctx):
    """1 MiB chunks, 3 small changes in one chunk (one of them into a hole): one chunk differs,
    but only its differing 64 KiB granules are written; the image is exact."""
    repo = Repository.init(str(tmp_path / "big"), chunk_size=MIB)
    make_disk(tmp_path / "d0.img")
    snap = export(ctx, repo, instance(tmp_path))["repository"]["snapshot"]
    copy = tmp_path / "o.img"
    copy.write_bytes((tmp_path / "d0.img").read_bytes())
    for off in (100 * KIB, 200 * KIB, 1000 * KIB):
        poke(copy, off, b"stale data")
    result = import_into_existing(open_snapshot(f"{repo.path}::{snap}"),
                                  instance(tmp_path, disks=("o.img",)),
                                  state_dir=ctx.node.state_dir)
    d = result["disks"][0]
    assert (1, 3 * 64 * KIB) == (d["written_chunks"], d["written_bytes"])
    assert sha(copy) == sha(tmp_path / "d0.img")
