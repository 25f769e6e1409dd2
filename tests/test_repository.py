"""Backup repositories (ganeti_vol.repo): dedup export, verified import, commit order,
self-checking metadata, the lz4 recipe, golden fixtures.  Real files, real scripts, real lz4."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import needs_blake3

from ganeti_vol.cli import main
from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Instance
from ganeti_vol.engine import codec, hashing
from ganeti_vol.engine.parallel import Engine
from ganeti_vol.engine.targets import RawTarget
from ganeti_vol.ganeti import fields
from ganeti_vol.ops import operations, transfer
from ganeti_vol.repo import Repository, inspect, open_snapshot, prepare_export
from ganeti_vol.repo import format as F

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
KIB, MIB = 1 << 10, 1 << 20
CS = 64 * KIB
CAT_EXPORT = '#!/bin/sh\nexec cat "$EXPORT_DEVICE"\n'
DD_IMPORT = 'exec dd of="$IMPORT_DEVICE" bs=64k conv=notrunc status=none\n'


def make_disk(path: Path, size: int = 2 * MIB, seed: int = 1) -> Path:
    """A sparse disk: random data, text, written zeros and holes."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(64 * KIB)
        f.write(rng.randbytes(300 * KIB))
        f.seek(512 * KIB)
        f.write(b"".join(b"log line %d of the disk\n" % i for i in range(12000)))
        f.seek(size - 128 * KIB)
        f.write(bytes(64 * KIB) + rng.randbytes(64 * KIB))
    return path


def poke(path: Path, offset: int, data: bytes = b"changed!") -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def sha(path: Path, size: int | None = None) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[:size] if size is not None else data).hexdigest()


def instance(tmp_path: Path, name: str = "web1.example.com", disks=("d0.img",), os_name="",
             size: int = 2 * MIB) -> Instance:
    uuid = fields.instance_uuid_for(name)
    made = tuple(fields.make_disk(i, uuid, path=str(tmp_path / p), size=size)
                 for i, p in enumerate(disks))
    return Instance(name=name, os=os_name, uuid=uuid, ctime=1.0, mtime=1.0, disks=made)


@pytest.fixture
def ctx(node_config):
    return operations.OpContext(node=node_config.replace(stall_timeout=20))


@pytest.fixture
def repo(tmp_path) -> Repository:
    return Repository.init(str(tmp_path / "repo"), chunk_size=CS)


def export(ctx, repo: Repository | str, inst: Instance, tag: str | None = None) -> dict:
    path = repo if isinstance(repo, str) else repo.path
    rctx, into = prepare_export(ctx, path, tag=tag)
    return transfer.export_instance(rctx, inst, into=into).to_json()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def snapshots(repo: Repository) -> list[dict]:
    return [s for s in inspect.list_repo(repo) if s["valid"]]


def chunk_files(repo: Repository) -> list[Path]:
    return sorted(p for p in Path(repo.path, "chunks").rglob("*") if p.is_file())


# --- format and init --------------------------------------------------------------------


def test_init_creates_the_layout_with_a_sealed_config(repo):
    """init: the directories and a config whose checksum covers every field."""
    assert sorted(os.listdir(repo.path)) == sorted([*F.DIRS, "config.json"])
    config = json.loads(Path(repo.path, "config.json").read_text())
    assert (config["format"], config["chunk_hash"], config["chunk_size"]) == (
        "ganeti-vol-repository", F.default_digest(), CS)
    assert config["checksum"].startswith("sha256:")


def test_init_refuses_a_non_empty_directory_and_non_cryptographic_digests(tmp_path, capsys):
    """Bad input to repo init: exit 3 with a one-line error, nothing created."""
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    rc, _, err = run(capsys, "repo", "init", str(tmp_path / "full"))
    assert 3 == rc and "the directory is not empty" in err
    with pytest.raises(E.UsageError, match="cryptographic only"):
        Repository.init(str(tmp_path / "r2"), hash_algo="xxh3-128")
    rc, _, err = run(capsys, "repo", "init", str(tmp_path / "r3"), "--chunk-size", "3M")
    assert 3 == rc and "not a power of two" in err


def test_a_directory_without_config_is_not_a_repository(tmp_path, capsys):
    """Opening something else: exit 15 naming the path and the fix."""
    rc, _, err = run(capsys, "repo", "list", str(tmp_path))
    assert 15 == rc and f"repository '{tmp_path}': not a repository" in err


def test_a_damaged_config_field_is_detected(repo, capsys):
    """Changing any config field, even the creation time, breaks its checksum (exit 17)."""
    path = Path(repo.path, "config.json")
    path.write_text(path.read_text().replace('"created": "2', '"created": "1'))
    rc, _, err = run(capsys, "repo", "list", repo.path)
    assert 17 == rc and "does not match its checksum" in err


def test_newer_format_version_needs_a_newer_ganeti_vol(repo):
    """A repository written by a newer layout is refused as needing a newer reader."""
    config = F.unseal(Path(repo.path, "config.json").read_bytes(), "x")
    config["format_version"] = F.FORMAT_VERSION + 1
    Path(repo.path, "config.json").write_bytes(F.seal(config))
    with pytest.raises(E.ArchiveFormatError, match="a newer ganeti-vol is required"):
        Repository.open(repo.path)


# --- export: dedup ----------------------------------------------------------------------


def test_export_stores_each_chunk_once_and_never_zero_chunks(tmp_path, ctx, repo):
    """First export: every distinct non-zero chunk stored once, zero chunks not at all."""
    make_disk(tmp_path / "d0.img")
    result = export(ctx, repo, instance(tmp_path))
    r = result["repository"]
    disk = result["disks"][0]
    data = (tmp_path / "d0.img").read_bytes()
    pieces = {data[i:i + CS] for i in range(0, len(data), CS)} - {bytes(CS)}
    assert len(pieces) == r["new_chunks"] == len(chunk_files(repo))
    assert r["zero_chunks"] == disk["zero_chunks"] > 0
    assert r["reused_chunks"] == 0
    names = {p.name for p in chunk_files(repo)}
    assert names == {hashing.chunk_hash(F.default_digest(), p).hex() for p in pieces}


def test_unchanged_export_stores_nothing_new_and_reports_reuse(tmp_path, ctx, repo):
    """Second export of the same disk: zero new chunks, every data chunk reused."""
    make_disk(tmp_path / "d0.img")
    first = export(ctx, repo, instance(tmp_path))["repository"]
    before = chunk_files(repo)
    second = export(ctx, repo, instance(tmp_path))["repository"]
    assert (0, 0) == (second["new_chunks"], second["new_stored_bytes"])
    assert second["reused_chunks"] == first["new_chunks"]
    assert second["reused_bytes"] == first["new_bytes"]
    assert before == chunk_files(repo)
    assert 2 == len(snapshots(repo))


def test_export_after_a_small_change_stores_only_the_changed_chunks(tmp_path, ctx, repo):
    """Two chunks touched (one of them a hole before): exactly two new chunks."""
    make_disk(tmp_path / "d0.img")
    export(ctx, repo, instance(tmp_path))
    poke(tmp_path / "d0.img", 100 * KIB)          # inside random data
    poke(tmp_path / "d0.img", 1536 * KIB)         # inside a hole
    r = export(ctx, repo, instance(tmp_path))["repository"]
    assert (2, 2 * CS) == (r["new_chunks"], r["new_bytes"])


def test_two_instances_with_the_same_data_share_chunks(tmp_path, ctx, repo):
    """Dedup is across instances: the second instance's export adds nothing."""
    make_disk(tmp_path / "d0.img")
    shutil.copy(tmp_path / "d0.img", tmp_path / "e0.img")
    export(ctx, repo, instance(tmp_path))
    r = export(ctx, repo, instance(tmp_path, "db1.example.com", disks=("e0.img",)))
    assert 0 == r["repository"]["new_chunks"]


def test_script_export_goes_through_the_os_script_into_the_repository(
        tmp_path, ctx, repo, os_factory):
    """Script mode (what Ganeti uses): the export script's stdout is what gets stored."""
    os_factory("catos", scripts={"export": CAT_EXPORT, "import": DD_IMPORT})
    make_disk(tmp_path / "d0.img")
    make_disk(tmp_path / "d1.img", seed=2)
    src = instance(tmp_path, disks=("d0.img", "d1.img"), os_name="catos+default")
    result = export(ctx, repo, src, tag="nightly")
    assert ["script", "script"] == [d["mode"] for d in result["disks"]]
    dst = instance(tmp_path, "web2.example.com", disks=("o0.img", "o1.img"),
                   os_name="catos+default")
    snap = open_snapshot(f"{repo.path}::{src.name}@nightly")
    transfer.import_instance(ctx, dst, snap)
    assert sha(tmp_path / "o0.img") == sha(tmp_path / "d0.img")
    assert sha(tmp_path / "o1.img") == sha(tmp_path / "d1.img")


def test_engine_skips_compressing_chunks_the_sink_already_knows(tmp_path):
    """The `known` hook: known chunks reach the sink without a frame and store no bytes."""
    make_disk(tmp_path / "d0.img")
    seen = []

    class Sink:
        compress, want_crc = True, False

        def known(self, digest):
            return True

        def begin(self, info):
            pass

        def write_chunk(self, chunk):
            seen.append((chunk.zero, chunk.frame))

        def finish(self, summary):
            self.summary = summary

        def abort(self, error):
            pass

    sink = Sink()
    fd = os.open(tmp_path / "d0.img", os.O_RDONLY)
    try:
        with Engine(workers=2, chunk_size=CS, hash_algo=F.default_digest()) as eng:
            summary = eng.encode(fd, sink, source_kind="file")
    finally:
        os.close(fd)
    assert all(frame is None for zero, frame in seen if not zero)
    assert summary.stored_bytes == sum(len(f) for z, f in seen if z)


# --- import -----------------------------------------------------------------------------


def test_import_from_the_repository_restores_every_disk_exactly(tmp_path, ctx, repo, capsys):
    """CLI round trip: export --repo, then import PATH::ID; identical bytes."""
    make_disk(tmp_path / "d0.img")
    rc, out, _ = run(capsys, "export", "--name", "web1", "--disk", str(tmp_path / "d0.img"),
                     "--raw", "--repo", repo.path, "--tag", "t1", "--progress", "none",
                     "--no-hooks", "--json")
    assert 0 == rc
    result = json.loads(out)
    snap = result["repository"]["snapshot"]
    assert f"{repo.path}::{snap}" == result["path"]
    rc, out, _ = run(capsys, "import", "--name", "web1", "--disk",
                     f"{tmp_path / 'out.img'},size=2M", f"{repo.path}::{snap}", "--raw",
                     "--progress", "none", "--no-hooks")
    assert 0 == rc, out
    assert sha(tmp_path / "out.img") == sha(tmp_path / "d0.img")


def test_snapshots_are_named_by_id_instance_or_instance_at_tag(tmp_path, ctx, repo):
    """PATH::INSTANCE is its latest snapshot, PATH::INSTANCE@TAG the latest with that tag."""
    make_disk(tmp_path / "d0.img")
    inst = instance(tmp_path)
    a = export(ctx, repo, inst, tag="weekly")["repository"]["snapshot"]
    poke(tmp_path / "d0.img", 0)
    b = export(ctx, repo, inst)["repository"]["snapshot"]
    assert b == open_snapshot(f"{repo.path}::{inst.name}").id
    assert a == open_snapshot(f"{repo.path}::{inst.name}@weekly").id
    assert a == open_snapshot(f"{repo.path}::{a}").id
    with pytest.raises(E.ArchiveError, match="cannot find snapshot 'nope'"):
        open_snapshot(f"{repo.path}::nope")


def corrupt_chunk(repo: Repository, offset_in_disk: int, disk_path: Path) -> Path:
    """Flip a byte inside the stored frame of the chunk at ``offset_in_disk``."""
    data = disk_path.read_bytes()[offset_in_disk // CS * CS:][:CS]
    path = Path(repo.chunk_path(hashing.chunk_hash(repo.hash_algo, data)))
    frame = bytearray(path.read_bytes())
    frame[len(frame) // 2] ^= 0x01
    path.write_bytes(bytes(frame))
    return path


def test_import_of_a_damaged_chunk_never_writes_it_and_names_the_offset(
        tmp_path, ctx, repo, capsys):
    """A bit flip in a stored chunk: exit 17 with disk and offset; that chunk is not written."""
    make_disk(tmp_path / "d0.img")
    snap = export(ctx, repo, instance(tmp_path))["repository"]["snapshot"]
    corrupt_chunk(repo, 128 * KIB, tmp_path / "d0.img")
    out = tmp_path / "out.img"
    rc, _, err = run(capsys, "import", "--name", "web1", "--disk", f"{out},size=2M",
                     f"{repo.path}::{snap}", "--raw", "--progress", "none", "--no-hooks")
    assert 17 == rc
    assert "at offset 131072" in err and "broken" in err
    assert bytes(CS) == out.read_bytes()[128 * KIB:128 * KIB + CS]


def test_import_of_a_missing_chunk_names_it(tmp_path, ctx, repo):
    """A chunk file deleted behind our back: IntegrityError naming the chunk and offset."""
    make_disk(tmp_path / "d0.img")
    snap = export(ctx, repo, instance(tmp_path))["repository"]["snapshot"]
    data = (tmp_path / "d0.img").read_bytes()[64 * KIB:128 * KIB]
    os.unlink(repo.chunk_path(hashing.chunk_hash(F.default_digest(), data)))
    dst = instance(tmp_path, "copy.example.com", disks=("c0.img",))
    with pytest.raises(E.IntegrityError, match="at offset 65536: chunk [0-9a-f]{64} is missing"):
        transfer.import_instance(ctx, dst, open_snapshot(f"{repo.path}::{snap}"))


@pytest.mark.parametrize("edit", ["timestamp", "tag", "index", "config"])
def test_any_damaged_metadata_field_is_detected(tmp_path, ctx, repo, edit):
    """Manifest fields (even a timestamp), the index and config.ini all carry checksums."""
    make_disk(tmp_path / "d0.img")
    snap = export(ctx, repo, instance(tmp_path), tag="t")["repository"]["snapshot"]
    sdir = Path(repo.snapshot_dir(snap))
    manifest = sdir / "manifest.json"
    if edit == "timestamp":
        manifest.write_text(re.sub(r'"created": "\d', '"created": "9', manifest.read_text()))
    elif edit == "tag":
        manifest.write_text(manifest.read_text().replace('"tag": "t"', '"tag": "u"'))
    elif edit == "index":
        idx = bytearray((sdir / "disk0.idx").read_bytes())
        idx[F.IDX_HEADER.size + 10] ^= 0x40
        (sdir / "disk0.idx").write_bytes(bytes(idx))
    else:
        (sdir / "config.ini").write_text((sdir / "config.ini").read_text() + "\n")
    with pytest.raises(E.IntegrityError, match="(checksum|damaged)"):
        snap_obj = open_snapshot(f"{repo.path}::{snap}")
        list(snap_obj.disks[0].chunks())
    if edit in ("timestamp", "tag"):
        assert [False] == [s["valid"] for s in inspect.list_repo(repo)]


def test_index_checksum_also_guards_a_reader_that_skips_the_manifest(tmp_path, ctx, repo):
    """The index's own trailer checksum catches a flipped byte on its own."""
    make_disk(tmp_path / "d0.img")
    snap = export(ctx, repo, instance(tmp_path))["repository"]["snapshot"]
    path = Path(repo.snapshot_dir(snap), "disk0.idx")
    idx = bytearray(path.read_bytes())
    idx[F.IDX_HEADER.size + 40 + 12] ^= 0x01
    path.write_bytes(bytes(idx))
    with pytest.raises(E.IntegrityError, match="does not match its checksum"):
        F.Index(str(path), repo.hash_algo, "index").verify()


# --- commit order -----------------------------------------------------------------------


def test_a_failed_export_publishes_no_snapshot_and_leaves_no_staging(
        tmp_path, ctx, repo, os_factory):
    """The export script dies half-way: no snapshot, no temp files; chunks stay (gc frees)."""
    os_factory("halfos", scripts={"export": 'head -c 700000 "$EXPORT_DEVICE"; exit 3\n'})
    make_disk(tmp_path / "d0.img")
    with pytest.raises(E.GanetiVolError):
        export(ctx, repo, instance(tmp_path, os_name="halfos+default"))
    assert [] == os.listdir(Path(repo.path, "snapshots"))
    assert [] == os.listdir(Path(repo.path, "tmp"))
    assert [] == [n for n in os.listdir(Path(repo.path, "locks")) if n != "repository"]


def test_every_published_snapshot_names_only_chunks_that_exist(tmp_path, ctx, repo):
    """The invariant behind the commit order, checked over a few exports."""
    make_disk(tmp_path / "d0.img")
    for n in range(3):
        poke(tmp_path / "d0.img", n * 300 * KIB, os.urandom(5000))
        export(ctx, repo, instance(tmp_path))
    for s in snapshots(repo):
        snap = open_snapshot(f"{repo.path}::{s['id']}")
        for disk in snap.disks:
            for _, zero, flen, digest in disk.open_index().entries():
                assert zero or os.path.getsize(repo.chunk_path(digest)) == flen


# --- list, info, diff -------------------------------------------------------------------


def test_list_info_and_diff_show_what_changed(tmp_path, ctx, repo, capsys):
    """list (table and JSON), info (new vs reused), diff (changed ranges and bytes)."""
    make_disk(tmp_path / "d0.img")
    inst = instance(tmp_path)
    a = export(ctx, repo, inst, tag="base")["repository"]["snapshot"]
    poke(tmp_path / "d0.img", 200 * KIB)
    poke(tmp_path / "d0.img", 270 * KIB)
    poke(tmp_path / "d0.img", 1800 * KIB)
    b = export(ctx, repo, inst)["repository"]["snapshot"]
    rc, out, _ = run(capsys, "repo", "list", repo.path)
    lines = out.splitlines()
    assert 0 == rc and lines[0].split()[:4] == ["ID", "INSTANCE", "TAG", "KIND"]
    assert [a, b] == [line.split()[0] for line in lines[1:]]
    rc, out, _ = run(capsys, "repo", "info", f"{repo.path}::{inst.name}", "--json")
    info = json.loads(out)
    assert (b, 3, 3 * CS) == (info["id"], info["disks"][0]["new_chunks"],
                              info["disks"][0]["new_bytes"])
    rc, out, _ = run(capsys, "repo", "diff", f"{repo.path}::{a}", b, "--json")
    d = json.loads(out)["disks"][0]
    assert [{"offset": 3 * CS, "length": 2 * CS},
            {"offset": 28 * CS, "length": CS}] == d["ranges"]
    assert 3 * CS == d["changed_bytes"]
    rc, out, _ = run(capsys, "repo", "diff", f"{repo.path}::{a}", b)
    assert f"{3 * CS}+{2 * CS}" in out


def test_remove_deletes_the_snapshot_but_never_data_another_one_uses(tmp_path, ctx, repo, capsys):
    """repo remove drops metadata only; the other snapshot still imports."""
    make_disk(tmp_path / "d0.img")
    inst = instance(tmp_path)
    a = export(ctx, repo, inst)["repository"]["snapshot"]
    b = export(ctx, repo, inst)["repository"]["snapshot"]
    chunks = chunk_files(repo)
    rc, _, _ = run(capsys, "repo", "remove", f"{repo.path}::{a}")
    assert 0 == rc and [b] == [s["id"] for s in snapshots(repo)]
    assert chunks == chunk_files(repo)
    dst = instance(tmp_path, "copy.example.com", disks=("c0.img",))
    transfer.import_instance(ctx, dst, open_snapshot(f"{repo.path}::{b}"))
    assert sha(tmp_path / "c0.img") == sha(tmp_path / "d0.img")


# --- decoding without ganeti-vol --------------------------------------------------------


def doc_recipe() -> str:
    """The one-line recipe exactly as doc/repository-format.md gives it."""
    text = (ROOT / "doc" / "repository-format.md").read_text()
    block = text.split("<!-- recipe -->\n```sh\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert 1 == len(lines), "the recipe is one line"
    return lines[0]


def test_the_documented_lz4_recipe_rebuilds_the_disk_without_ganeti_vol(tmp_path, ctx, repo):
    """sh + od + lz4 -d + truncate rebuild the exact image from an index and the chunk store."""
    make_disk(tmp_path / "d0.img", size=2 * MIB + 5000)
    snap = export(ctx, repo, instance(tmp_path, size=3 * MIB))["repository"]["snapshot"]
    index = Path(repo.snapshot_dir(snap), "disk0.idx")
    recipe = doc_recipe().replace("REPO/snapshots/ID/disk0.idx", str(index)).replace(
        "R=REPO", f"R={repo.path}")
    subprocess.run(["sh", "-c", recipe], cwd=tmp_path, check=True, timeout=60)
    assert sha(tmp_path / "disk0.img") == sha(tmp_path / "d0.img")


# --- golden fixtures --------------------------------------------------------------------


def golden_dirs() -> list[Path]:
    return sorted(DATA.glob("repo-v*"))


@needs_blake3
@pytest.mark.parametrize("fixture", golden_dirs(), ids=lambda p: p.name)
def test_golden_repositories_still_read_verify_and_import(fixture, tmp_path, ctx):
    """Every repository layout ever released stays readable (tests/data/repo-v*)."""
    expected = json.loads((fixture / "expected.json").read_text())
    copy = tmp_path / "repo"
    shutil.copytree(fixture / "repo", copy)
    repo = Repository.open(str(copy))
    assert expected["format_version"] == repo.version
    ids = [s["id"] for s in snapshots(repo)]
    assert [s["id"] for s in expected["snapshots"]] == ids
    for s in expected["snapshots"]:
        snap = open_snapshot(f"{copy}::{s['id']}")
        assert s["instance"] == snap.instance.name
        for d in s["disks"]:
            out = restore_disk(snap, d["index"], tmp_path / f"{s['id']}-{d['index']}.img")
            assert d["sha256"] == sha(out, d["size"])


def restore_disk(snap, index: int, out: Path) -> Path:
    """Decode one disk of a snapshot into a new file through the engine (verified)."""
    disk = snap.disk(index)
    out.write_bytes(b"")
    os.truncate(out, max(disk.size, disk.disk_size or 0))
    with Engine(workers=2, chunk_size=snap.repo.chunk_size,
                        hash_algo=snap.repo.hash_algo) as eng:
        eng.decode(disk, RawTarget(str(out)))
    return out


def test_there_is_a_golden_fixture_for_the_current_format_version():
    """Releasing a new repository layout needs a new tests/data/repo-vN fixture."""
    assert f"repo-v{F.FORMAT_VERSION}" in [p.name for p in golden_dirs()]


def test_chunks_are_standalone_lz4_frames_named_by_their_digest(tmp_path, ctx, repo):
    """Each stored chunk decodes with `lz4 -dc` alone, to bytes whose BLAKE3 is its name."""
    make_disk(tmp_path / "d0.img")
    export(ctx, repo, instance(tmp_path))
    for path in chunk_files(repo)[:5]:
        data = subprocess.run(["lz4", "-dc", str(path)], check=True, capture_output=True).stdout
        assert path.name == hashing.chunk_hash(F.default_digest(), data).hex()
        assert len(data) == codec.frame_content_size(path.read_bytes())


def test_export_options_that_do_not_fit_a_repository_are_refused(tmp_path, repo, capsys,
                                                                 node_dirs):
    """--tag needs --repo; --repo takes no -o; a bad tag is named: all exit 3."""
    make_disk(tmp_path / "d0.img")
    base = ["export", "--name", "web1", "--disk", str(tmp_path / "d0.img"), "--raw",
            "--progress", "none", "--no-hooks"]
    rc, _, err = run(capsys, *base, "--tag", "x")
    assert 3 == rc and "--tag labels a repository snapshot" in err
    rc, _, err = run(capsys, *base, "--repo", repo.path, "-o", str(tmp_path))
    assert 3 == rc and "--repo stores a snapshot" in err
    rc, _, err = run(capsys, *base, "--repo", repo.path, "--tag", "a/b")
    assert 3 == rc and "invalid tag 'a/b'" in err
    assert [] == os.listdir(Path(repo.path, "snapshots"))


def test_chunk_files_written_through_o_direct_hold_exactly_the_frame(tmp_path):
    """Odd-sized frames, padded to whole blocks for O_DIRECT, are stored at their exact length."""
    repo = Repository.init(str(tmp_path / "r"), chunk_size=CS)
    rng = random.Random(3)
    for n in (1, 4095, 4096, 4097, 60000):
        data = rng.randbytes(n) + bytes(CS - n)
        frame = codec.encode(data)
        digest = hashing.chunk_hash(F.default_digest(), data)
        assert repo.store(digest, frame, repo.join("tmp"))
        assert frame == Path(repo.chunk_path(digest)).read_bytes()
    assert [] == os.listdir(repo.join("tmp"))


#: runs ganeti-vol's CLI as on a node without the blake3 package (Debian 12 has none)
_NO_BLAKE3 = """import sys
sys.modules["blake3"] = None  # 'import blake3' raises ImportError, as without the package
from ganeti_vol.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_node_without_blake3_uses_sha256_and_says_why_blake3_fails(tmp_path, node_dirs):
    """Without the blake3 package, export and import still work, `repo init` picks sha256,
    and asking for blake3 is a one-line config error (exit 4), not a traceback."""
    import sys

    def cli(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _NO_BLAKE3, "--config",
                               str(node_dirs["conf"]), *argv],
                              capture_output=True, text=True, timeout=60)

    disk = tmp_path / "d0.img"
    disk.write_bytes(random.Random(3).randbytes(MIB))
    res = cli("repo", "init", str(tmp_path / "r"), "--json")
    assert 0 == res.returncode, res.stderr
    assert "sha256" == json.loads(res.stdout)["chunk_hash"]
    res = cli("export", "--name", "web1", "--disk", str(disk), "--raw",
              "--repo", str(tmp_path / "r"), "--progress", "none")
    assert 0 == res.returncode, res.stderr
    res = cli("repo", "init", str(tmp_path / "r2"), "--hash", "blake3")
    assert (4, 1) == (res.returncode, len(res.stderr.strip().splitlines())), res.stderr
    assert "blake3 is not installed" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "r2").exists()
