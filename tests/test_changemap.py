"""Change maps (ganeti_vol.system.changemap): a raw export of a file disk on real XFS into
a repository keeps its reflink snapshot as the base of the next one, whose unchanged
chunks are then not read.  Every test checks the result against the disk itself."""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import shutil
from pathlib import Path

import pytest
from disk_helpers import needs_loop, xfs_mount

from ganeti_vol.core.model import Instance
from ganeti_vol.ganeti import fields
from ganeti_vol.ops import operations, transfer
from ganeti_vol.repo import Repository, open_snapshot, prepare_export
from ganeti_vol.system import changemap

KIB, MIB = 1 << 10, 1 << 20
CS = 64 * KIB
SIZE = 4 * MIB
FICLONE = 0x40049409

pytestmark = needs_loop


@pytest.fixture(scope="module")
def xfs(tmp_path_factory):
    with xfs_mount(tmp_path_factory.mktemp("xfs")) as mnt:
        yield mnt


@pytest.fixture
def disk(xfs):
    """A 4 MiB disk on XFS: random data with holes between (a fresh one per test)."""
    path = xfs / "disk.img"
    rng = random.Random(7)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset in range(0, SIZE, 256 * KIB):
            f.seek(offset)
            f.write(rng.randbytes(192 * KIB))
    yield path
    for leftover in xfs.iterdir():
        leftover.unlink()


@pytest.fixture
def ctx(node_config):
    return operations.OpContext(node=node_config.replace(stall_timeout=20,
                                                         snapshot_provider="reflink"))


def instance(path: Path) -> Instance:
    uuid = fields.instance_uuid_for("web1.example.com")
    size = path.stat().st_size if path.exists() else SIZE
    return Instance(name="web1.example.com", os="", uuid=uuid, ctime=1.0, mtime=1.0,
                    disks=(fields.make_disk(0, uuid, path=str(path), size=size),))


def export(ctx, repo: str, path: Path) -> dict:
    rctx, into = prepare_export(ctx, repo)
    return transfer.export_instance(rctx, instance(path), into=into).to_json()


def restored(ctx, repo: str, snap_id: str, out: Path) -> str:
    """The sha256 of the snapshot's disk, imported into a fresh file."""
    with open(out, "wb") as f:
        f.truncate(SIZE)
    source = open_snapshot(f"{repo}::{snap_id}")
    inst = instance(out)
    transfer.import_instance(ctx, inst, source, raw=True)
    return sha(out)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        os.fsync(f.fileno())


def clone(src: Path, dst: Path) -> Path:
    with open(src, "rb") as s, open(dst, "wb") as d:
        fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
    return dst


def bases(xfs: Path) -> list[str]:
    return sorted(p.name for p in xfs.iterdir() if ".gvbase-" in p.name)


def test_fiemap_change_map_names_the_chunks_whose_blocks_were_rewritten(disk, xfs):
    base = clone(disk, xfs / "base.img")
    poke(disk, 3 * CS + 100, b"x" * 10)            # data in chunk 3
    poke(disk, 13 * CS, b"y" * 4096)               # chunk 13 lies in a hole: now allocated
    with open(disk, "r+b") as f:                   # chunk 20: part of its data punched out
        fcntl_punch(f.fileno(), 20 * CS, 8 * KIB)
    new = clone(disk, xfs / "new.img")
    with open(base, "rb") as b, open(new, "rb") as n:
        changed = changemap.changed_chunks(changemap.fiemap(b.fileno(), SIZE),
                                           changemap.fiemap(n.fileno(), SIZE), SIZE, CS)
    assert changed == {3, 13, 20}
    with open(base, "rb") as b:  # a file against itself: nothing changed
        same = changemap.fiemap(b.fileno(), SIZE)
    assert changemap.changed_chunks(same, same, SIZE, CS) == set()


def fcntl_punch(fd: int, offset: int, length: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    falloc_fl_keep_size, falloc_fl_punch_hole = 0x01, 0x02
    rc = libc.fallocate(fd, falloc_fl_keep_size | falloc_fl_punch_hole,
                        ctypes.c_long(offset), ctypes.c_long(length))
    assert rc == 0, os.strerror(ctypes.get_errno())


def test_second_export_reads_only_the_changed_chunks_and_restores_the_disk(
        ctx, disk, xfs, tmp_path):
    repo = str(Repository.init(str(tmp_path / "repo"), chunk_size=CS).path)
    first = export(ctx, repo, disk)["disks"][0]
    assert first["unchanged_bytes"] == 0
    assert len(bases(xfs)) == 2  # the base (read-only) and its map
    base_file = next(xfs / n for n in bases(xfs) if not n.endswith(".map"))
    assert base_file.stat().st_mode & 0o777 == 0o400
    poke(disk, 5 * CS + 7, b"changed")
    poke(disk, 40 * CS, b"z" * 100)
    second = export(ctx, repo, disk)
    d = second["disks"][0]
    data_chunks = sum(1 for i in range(SIZE // CS) if (i * CS) % (256 * KIB) < 192 * KIB)
    assert d["unchanged_bytes"] == (data_chunks - 2) * CS
    assert second["repository"]["new_chunks"] == 2
    snap_id = second["path"].split("::")[1]
    assert restored(ctx, repo, snap_id, tmp_path / "out.img") == sha(disk)
    # the same disk without a change map gives the same disk digest, chunk for chunk
    plain = export(operations.OpContext(node=ctx.node.replace(change_map=False)), repo, disk)
    assert plain["disks"][0]["unchanged_bytes"] == 0
    assert plain["disks"][0]["digest"] == d["digest"]


def test_a_rewritten_chunk_the_repository_already_has_is_not_stored_twice(
        ctx, disk, xfs, tmp_path):
    """Chunks a change map reads are stored without asking first: one whose data the
    repository holds already (here chunk 0's, copied over chunk 1) is kept once."""
    repo = str(Repository.init(str(tmp_path / "repo"), chunk_size=CS).path)
    export(ctx, repo, disk)
    with open(disk, "r+b") as f:
        chunk0 = f.read(CS)
        f.seek(CS)
        f.write(chunk0)
    second = export(ctx, repo, disk)
    assert second["disks"][0]["unchanged_bytes"] > 0
    assert second["repository"]["new_chunks"] == 0
    assert second["repository"]["reused_chunks"] >= 1
    snap_id = second["path"].split("::")[1]
    assert restored(ctx, repo, snap_id, tmp_path / "out.img") == sha(disk)


def test_a_disk_whose_size_is_not_whole_chunks_skips_its_last_chunk_too_until_it_grows(
        ctx, disk, xfs, tmp_path):
    """The last, shorter chunk is skipped like the others; after the disk grew, nothing
    is skipped (another size), and the export after that skips again."""
    repo = str(Repository.init(str(tmp_path / "repo"), chunk_size=CS).path)
    with open(disk, "r+b") as f:  # 10 KiB more, with data: a last chunk of 10 KiB
        f.seek(SIZE)
        f.write(os.urandom(10 * KIB))
    export(ctx, repo, disk)
    poke(disk, 2 * CS, b"changed")  # a data chunk (chunk 3 of every 4 is a hole)
    d = export(ctx, repo, disk)["disks"][0]
    data_chunks = sum(1 for i in range(SIZE // CS) if (i * CS) % (256 * KIB) < 192 * KIB)
    assert d["unchanged_bytes"] == (data_chunks - 1) * CS + 10 * KIB
    with open(disk, "r+b") as f:
        f.truncate(SIZE + MIB)
    grown = export(ctx, repo, disk)
    assert grown["disks"][0]["unchanged_bytes"] == 0
    poke(disk, 7 * CS, b"changed")
    again = export(ctx, repo, disk)
    assert again["disks"][0]["unchanged_bytes"] > 0
    snap_id = again["path"].split("::")[1]
    out = tmp_path / "out.img"
    with open(out, "wb") as f:
        f.truncate(SIZE + MIB)
    transfer.import_instance(ctx, instance(out), open_snapshot(f"{repo}::{snap_id}"), raw=True)
    assert sha(out) == sha(disk)


def test_a_base_that_was_written_to_is_not_trusted(ctx, disk, xfs, tmp_path):
    repo = str(Repository.init(str(tmp_path / "repo"), chunk_size=CS).path)
    export(ctx, repo, disk)
    base_file = next(xfs / n for n in bases(xfs) if not n.endswith(".map"))
    base_file.chmod(0o600)
    poke(base_file, 0, b"tampered")
    base_file.chmod(0o400)
    poke(disk, 2 * CS, b"changed")
    second = export(ctx, repo, disk)
    assert second["disks"][0]["unchanged_bytes"] == 0
    snap_id = second["path"].split("::")[1]
    assert restored(ctx, repo, snap_id, tmp_path / "out.img") == sha(disk)


def test_chunks_the_repository_does_not_have_are_read_and_stored(ctx, disk, xfs, tmp_path):
    repo_path = tmp_path / "repo"
    repo = str(Repository.init(str(repo_path), chunk_size=CS).path)
    export(ctx, repo, disk)
    shutil.rmtree(repo_path)  # a new repository where the old one was: no chunk is there
    Repository.init(str(repo_path), chunk_size=CS)
    second = export(ctx, repo, disk)
    d = second["disks"][0]
    assert d["unchanged_bytes"] == 0 and second["repository"]["reused_chunks"] == 0
    snap_id = second["path"].split("::")[1]
    assert restored(ctx, repo, snap_id, tmp_path / "out.img") == sha(disk)


def test_without_change_map_or_reflink_no_base_is_kept(ctx, disk, xfs, tmp_path):
    repo = str(Repository.init(str(tmp_path / "repo"), chunk_size=CS).path)
    export(operations.OpContext(node=ctx.node.replace(change_map=False)), repo, disk)
    export(operations.OpContext(node=ctx.node.replace(snapshot_provider="copy")), repo, disk)
    assert bases(xfs) == []
    assert sorted(p.name for p in xfs.iterdir()) == ["disk.img"]
