"""Export archives: atomic publish, Ganeti-readable config.ini, lz4-CLI-decodable dumps,
verification, format versioning, Ganeti interop, and the golden fixtures."""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from test_streams import (  # noqa: F401 (engine, small_fs: fixtures)
    CHUNK,
    KIB,
    MIB,
    cold_fd,
    encode_file,
    encode_pipe,
    engine,
    make_image,
    needs_fincore,
    no_leaks,
    small_fs,
    wait_resident,
)

from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Disk, Instance
from ganeti_vol.engine.targets import RawTarget, StreamTarget
from ganeti_vol.formats import archive

DATA = Path(__file__).resolve().parent / "data"
UUIDS = ("3f2a7a4c-0d5c-4f5e-9d8e-1a2b3c4d5e6f", "9e1b1c9e-93c0-4d9b-a1d3-6f1f2a0c0b11")


def make_instance(images, name="web1") -> Instance:
    disks = tuple(
        Disk(path=str(img), size_mib=-(-img.stat().st_size // MIB), uuid=UUIDS[i],
             backend_type="file:loop")
        for i, img in enumerate(images)
    )
    return Instance(name=name, os="debootstrap+default", uuid="u-1", ctime=1.0, mtime=1.0,
                    disks=disks, osparams={"dhcp": "yes"},
                    osparams_private={"root_password": "TOPSECRET-42"})


@pytest.fixture
def images(tmp_path):
    return [make_image(tmp_path / "d0.img", 3 * MIB + 4 * KIB, seed=1),
            make_image(tmp_path / "d1.img", 2 * MIB, seed=2)]


def export(engine, export_dir, images, *, fmt="native", name=None, via="pipe"):
    inst = make_instance(images, name or "web1")
    with archive.ArchiveWriter(str(export_dir), inst, chunk_size=engine.chunk_size,
                               hash_algo=engine.hash_algo, format=fmt) as aw:
        for i, img in enumerate(images):
            enc = encode_pipe if via == "pipe" else encode_file
            enc(engine, img, aw.disk_sink(i), what=f"disk {i} of 'web1'")
    return Path(aw.path)


def import_raw(engine, source, tmp_path, name="out"):
    out = tmp_path / name
    out.write_bytes(b"")
    os.truncate(out, source.disk_size or source.size)
    engine.decode(source, RawTarget(str(out), known_zero=True))
    return out


def entries(export_dir) -> list[str]:
    return sorted(os.listdir(export_dir))


# --- writing ---------------------------------------------------------------------------


def test_archive_round_trip_restores_every_disk_exactly(engine, tmp_path, images):
    """Export two disks through pipes, open the archive, import each: identical bytes."""
    path = export(engine, tmp_path / "exp", images)
    arc = archive.open_archive(str(path))
    assert "native" == arc.format and "web1" == arc.instance.name
    for i, img in enumerate(images):
        out = import_raw(engine, arc.disk(i), tmp_path, f"out{i}")
        assert img.read_bytes() == out.read_bytes()[: img.stat().st_size]
    assert ["web1"] == entries(tmp_path / "exp")  # no staging directory left


def test_every_dump_decodes_with_the_lz4_cli_alone(engine, tmp_path, images):
    """Operators can recover without ganeti-vol: `lz4 -d -m *.lz4` gives the raw dumps."""
    path = export(engine, tmp_path / "exp", images)
    dumps = sorted(str(p) for p in path.glob("*.lz4"))
    subprocess.run(["lz4", "-d", "-m", "-q", *dumps], check=True, cwd=path)
    for i, img in enumerate(images):
        assert img.read_bytes() == (path / UUIDS[i]).read_bytes()


def test_config_ini_names_the_dumps_lz4_restores_and_ganeti_can_parse_it(engine, tmp_path, images):
    """config.ini is a v0 export whose disk<i>_dump is the name `lz4 -d` gives back."""
    path = export(engine, tmp_path / "exp", images)
    cp = configparser.ConfigParser()
    cp.read(path / "config.ini")
    assert "0" == cp["export"]["version"]
    assert UUIDS[0] == cp["instance"]["disk0_dump"]
    assert (path / f"{UUIDS[0]}.lz4").exists()


def test_private_parameters_appear_in_no_file_of_the_archive(engine, tmp_path, images):
    """The private OS parameter value is in no file; the manifest lists its name."""
    path = export(engine, tmp_path / "exp", images)
    for f in path.iterdir():
        assert b"TOPSECRET-42" not in f.read_bytes(), f.name
    assert ["root_password"] == json.loads((path / "manifest.json").read_text())[
        "osparams_private_omitted"]


def test_manifest_records_format_features_and_per_disk_facts(engine, tmp_path, images):
    """The manifest carries what the format spec promises for every disk."""
    path = export(engine, tmp_path / "exp", images, via="file")
    m = json.loads((path / "manifest.json").read_text())
    assert ("ganeti-vol-archive", 1) == (m["format"], m["format_version"])
    assert set(m["mandatory_features"]) <= archive.SUPPORTED_FEATURES
    d0 = m["disks"][0]
    assert (0, UUIDS[0], f"{UUIDS[0]}.lz4", f"{UUIDS[0]}.idx") == (
        d0["index"], d0["uuid"], d0["dump"], d0["index_file"])
    assert (images[0].stat().st_size, CHUNK, "lz4-frame", "xxh3-128") == (
        d0["size"], d0["chunk_size"], d0["compression"], d0["hash"])
    assert d0["digest"].startswith("sha256:") and d0["zero_chunks"] > 0
    assert d0["zero_bytes"] == d0["zero_chunks"] * CHUNK
    assert sum(n for _, n in d0["zero_map"]) == d0["zero_chunks"]
    assert d0["dump_bytes"] == (path / d0["dump"]).stat().st_size
    assert ("file", "script") == (d0["source"]["kind"], d0["source"]["mode"])
    assert d0["hole_bytes"] > 0 and d0["timings"]["seconds"] >= 0
    assert d0["base"] is None


@needs_fincore
def test_import_reads_the_dump_ahead_of_the_frame_it_decodes(engine, tmp_path):
    """A cold dump: taking the first chunk brings the next frames (32 MiB) into the cache."""
    img = tmp_path / "d0.img"
    img.write_bytes(os.urandom(48 * MIB))  # incompressible: the dump is as large
    path = export(engine, tmp_path / "exp", [img], via="file")
    disk = archive.open_archive(str(path)).disks[0]
    with cold_fd(Path(disk.dump_path)):
        chunks = disk.chunks()
        try:
            first = next(chunks)
            resident = wait_resident(Path(disk.dump_path), 16 * MIB)
        finally:
            chunks.close()
    assert len(first.frame) < 1 * MIB and 16 * MIB <= resident <= 40 * MIB


def test_zero_chunks_cost_under_one_percent_in_the_dump(engine, tmp_path):
    """A mostly empty disk gives a dump of well under 1 % of its zero bytes."""
    img = make_image(tmp_path / "empty.img", 8 * MIB, [(0, 10, "text")])
    path = export(engine, tmp_path / "exp", [img])
    dump = path / f"{UUIDS[0]}.lz4"
    assert dump.stat().st_size < 8 * MIB // 100


def test_new_archive_replaces_the_old_one_atomically(engine, tmp_path, images):
    """Exporting again replaces the archive; nothing else is left in the export dir."""
    exp = tmp_path / "exp"
    first = json.loads((export(engine, exp, images) / "manifest.json").read_text())
    second = json.loads((export(engine, exp, images[:1]) / "manifest.json").read_text())
    assert first["export_id"] != second["export_id"]
    assert 1 == len(second["disks"])
    assert ["web1"] == entries(exp)


def test_failed_export_publishes_nothing_and_keeps_the_old_archive(engine, tmp_path, images):
    """An error during a later export leaves the previous archive intact, no staging dir."""
    exp = tmp_path / "exp"
    old = json.loads((export(engine, exp, images) / "manifest.json").read_text())
    inst = make_instance(images)
    with no_leaks(), pytest.raises(E.ShortTransfer):
        with archive.ArchiveWriter(str(exp), inst, chunk_size=CHUNK) as aw:
            encode_pipe(engine, images[0], aw.disk_sink(0), size_hint=lambda: 1)
    assert old == json.loads((exp / "web1" / "manifest.json").read_text())
    assert ["web1"] == entries(exp)


def test_ctrl_c_during_export_removes_the_staging_directory(engine, tmp_path, images):
    """KeyboardInterrupt (a BaseException) also aborts: nothing published, nothing left."""
    exp = tmp_path / "exp"
    with pytest.raises(KeyboardInterrupt):
        with archive.ArchiveWriter(str(exp), make_instance(images), chunk_size=CHUNK) as aw:
            encode_pipe(engine, images[0], aw.disk_sink(0))
            raise KeyboardInterrupt
    assert [] == entries(exp)


def test_unfinished_disk_blocks_publishing(engine, tmp_path, images):
    """A disk sink that was opened but never finished makes the commit fail."""
    exp = tmp_path / "exp"
    with pytest.raises(E.ArchiveError, match=r"disk\(s\) 1 not exported"):
        with archive.ArchiveWriter(str(exp), make_instance(images), chunk_size=CHUNK) as aw:
            encode_pipe(engine, images[0], aw.disk_sink(0))
            aw.disk_sink(1)
    assert [] == entries(exp)


def test_sink_that_cannot_create_its_files_fails_cleanly(engine, tmp_path, images):
    """A dump file that cannot be created is a one-line error; no fd or thread is left."""
    exp = tmp_path / "exp"
    with no_leaks(), pytest.raises(E.StreamError, match="cannot create '.*lz4'"):
        with archive.ArchiveWriter(str(exp), make_instance(images), chunk_size=CHUNK) as aw:
            sink = aw.disk_sink(0)
            os.rmdir(aw.staging)
            encode_pipe(engine, images[0], sink)
    assert [] == entries(exp)


def test_full_disk_is_a_no_space_error_and_nothing_is_published(engine, tmp_path, small_fs):
    """ENOSPC while writing the archive: NoSpaceError, staging removed, no archive."""
    img = make_image(tmp_path / "big.img", 4 * MIB, [(0, 4 * MIB, "random")])
    with pytest.raises(E.NoSpaceError, match="no space left on device"):
        export(engine, small_fs, [img])
    assert [] == entries(small_fs)


def test_ganeti_format_writes_sparse_uncompressed_dumps_named_by_uuid(engine, tmp_path, images):
    """--format ganeti: raw dumps named by disk uuid plus config.ini, importable by Ganeti."""
    path = export(engine, tmp_path / "exp", images, fmt="ganeti")
    assert sorted(["config.ini", *UUIDS]) == entries(path)
    for i, img in enumerate(images):
        assert img.read_bytes() == (path / UUIDS[i]).read_bytes()
    dump0 = path / UUIDS[0]
    assert dump0.stat().st_blocks * 512 < dump0.stat().st_size
    cp = configparser.ConfigParser()
    cp.read(path / "config.ini")
    assert UUIDS[1] == cp["instance"]["disk1_dump"]


# --- reading ---------------------------------------------------------------------------


def test_ganeti_v0_export_is_imported(engine, tmp_path, images):
    """A Ganeti-written export (config.ini + raw dumps) opens and imports exactly."""
    path = export(engine, tmp_path / "exp", images, fmt="ganeti")
    arc = archive.open_archive(str(path))
    assert "ganeti" == arc.format and "web1" == arc.instance.name
    for i, img in enumerate(images):
        out = import_raw(engine, arc.disk(i), tmp_path, f"o{i}").read_bytes()
        assert img.read_bytes() == out[: img.stat().st_size]


def test_directory_without_manifest_is_not_an_archive(engine, tmp_path, images):
    """A missing manifest (and no Ganeti dumps) means 'not an archive'."""
    path = export(engine, tmp_path / "exp", images)
    (path / "manifest.json").unlink()
    with pytest.raises(E.ArchiveError, match="not an archive"):
        archive.open_archive(str(path))


def test_partial_manifest_is_not_an_archive(engine, tmp_path, images):
    """A manifest cut short is 'not an archive', not a half-read one."""
    path = export(engine, tmp_path / "exp", images)
    m = path / "manifest.json"
    m.write_bytes(m.read_bytes()[: m.stat().st_size // 2])
    with pytest.raises(E.ArchiveError, match="not an archive .incomplete or invalid"):
        archive.open_archive(str(path))


def _edit_manifest(path: Path, **changes) -> None:
    """Change manifest fields as a newer ganeti-vol would write them (checksum updated)."""
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_bytes(archive.render_manifest(m))


def test_newer_format_version_needs_a_newer_reader(engine, tmp_path, images):
    """format_version 2 is refused by this version-1 reader."""
    path = export(engine, tmp_path / "exp", images)
    _edit_manifest(path, format_version=2)
    with pytest.raises(E.ArchiveFormatError, match="format version 2 is newer than 1"):
        archive.open_archive(str(path))


def test_unknown_mandatory_feature_needs_a_newer_reader(engine, tmp_path, images):
    """An archive needing a feature this reader lacks is refused, naming the feature."""
    path = export(engine, tmp_path / "exp", images)
    _edit_manifest(path, mandatory_features=["lz4-frame-chunks", "base-refs"])
    with pytest.raises(E.ArchiveFormatError, match="needs feature.s. base-refs"):
        archive.open_archive(str(path))


def test_unknown_optional_feature_is_ignored(engine, tmp_path, images):
    """Optional features may be added without breaking older readers."""
    path = export(engine, tmp_path / "exp", images)
    _edit_manifest(path, optional_features=["progress-checkpoints"])
    assert archive.verify(str(path))["ok"]


def test_tampered_config_ini_is_detected(engine, tmp_path, images):
    """config.ini is covered by a checksum in the manifest."""
    path = export(engine, tmp_path / "exp", images)
    with open(path / "config.ini", "a") as f:
        f.write("# edited\n")
    with pytest.raises(E.IntegrityError, match="config.ini does not match"):
        archive.open_archive(str(path))


# --- verify ----------------------------------------------------------------------------


def test_verify_passes_a_good_archive(engine, tmp_path, images):
    """verify re-hashes every chunk of every disk and reports them."""
    path = export(engine, tmp_path / "exp", images)
    report = archive.verify(str(path), engine)
    assert report["ok"] and [0, 1] == [d["index"] for d in report["disks"]]
    assert all(d["verified"] for d in report["disks"])


def _frame_offset(path: Path, disk: int, chunk: int) -> int:
    entries = archive.open_archive(str(path)).disk(disk).read_index()
    return entries[chunk][2]


def test_verify_reports_the_first_bad_disk_and_offset(engine, tmp_path):
    """Two corrupt chunks in disk 1: the error names disk 1 and the earlier offset."""
    imgs = [make_image(tmp_path / "a.img", MIB, seed=3),
            make_image(tmp_path / "b.img", 2 * MIB, [(0, 2 * MIB, "text")], seed=4)]
    path = export(engine, tmp_path / "exp", imgs)
    dump = path / f"{UUIDS[1]}.lz4"
    data = bytearray(dump.read_bytes())
    for chunk in (5, 3):
        data[_frame_offset(path, 1, chunk) + 40] ^= 0x55
    dump.write_bytes(bytes(data))
    with pytest.raises((E.IntegrityError, E.CompressionError)) as info:
        archive.verify(str(path), engine)
    assert 1 == info.value.disk
    assert f"disk 1 of archive '{path}' at offset {3 * CHUNK}" in str(info.value)


def test_verify_detects_a_truncated_dump(engine, tmp_path, images):
    """A dump cut short is reported, never decoded as a shorter disk."""
    path = export(engine, tmp_path / "exp", images)
    dump = path / f"{UUIDS[0]}.lz4"
    os.truncate(dump, dump.stat().st_size - 100)
    with pytest.raises(E.IntegrityError, match="truncated|has .* bytes"):
        archive.verify(str(path), engine)


def test_verify_detects_a_tampered_index(engine, tmp_path, images):
    """The chunk index is covered by its checksum in the manifest."""
    path = export(engine, tmp_path / "exp", images)
    idx = path / f"{UUIDS[0]}.idx"
    data = bytearray(idx.read_bytes())
    data[-1] ^= 1
    idx.write_bytes(bytes(data))
    with pytest.raises(E.IntegrityError, match="index .* does not match its checksum"):
        archive.verify(str(path), engine)


def test_verify_detects_a_consistent_forgery_by_the_whole_disk_digest(engine, tmp_path, images):
    """Index and dump swapped between disks still fail: the digest in the manifest differs."""
    path = export(engine, tmp_path / "exp", images)
    m = json.loads((path / "manifest.json").read_text())
    m["disks"][0]["digest"] = m["disks"][1]["digest"]
    (path / "manifest.json").write_bytes(archive.render_manifest(m))  # a consistent forgery
    with pytest.raises(E.IntegrityError, match="the manifest says"):
        archive.verify(str(path), engine)


def test_import_of_a_corrupt_archive_never_writes_the_bad_chunk(engine, tmp_path, images):
    """The chunk hash is checked before the chunk reaches the target."""
    path = export(engine, tmp_path / "exp", images)
    dump = path / f"{UUIDS[0]}.lz4"
    data = bytearray(dump.read_bytes())
    data[_frame_offset(path, 0, 1) + 100] ^= 0xFF
    dump.write_bytes(bytes(data))
    out = tmp_path / "out"
    proc = subprocess.Popen(["sh", "-c", f"cat > '{out}'"], stdin=subprocess.PIPE)
    try:
        with pytest.raises((E.IntegrityError, E.CompressionError)):
            engine.decode(archive.open_archive(str(path)).disk(0),
                          StreamTarget(proc.stdin.fileno()))
    finally:
        proc.stdin.close()
        proc.wait()
    assert CHUNK == out.stat().st_size


# --- list / info / remove ---------------------------------------------------------------


def test_list_shows_archives_and_flags_broken_directories(engine, tmp_path, images):
    """list: valid archives with their info, other directories as invalid, staging hidden."""
    exp = tmp_path / "exp"
    export(engine, exp, images)
    export(engine, exp, images[:1], fmt="ganeti", name="web2")
    (exp / "junk").mkdir()
    (exp / ".web3.new-abc").mkdir()
    listing = archive.list_archives(str(exp))
    assert [("junk", False), ("web1", True), ("web2", True)] == [
        (e["name"], e["valid"]) for e in listing]
    assert ["native", "ganeti"] == [e["format"] for e in listing[1:]]
    assert "not an archive" in listing[0]["error"]


def test_info_sums_sizes_and_lists_disks(engine, tmp_path, images):
    """info gives instance, disks and the logical/stored byte counts."""
    path = export(engine, tmp_path / "exp", images)
    info = archive.open_archive(str(path)).info()
    assert "web1" == info["instance"] and 2 == len(info["disks"])
    assert sum(i.stat().st_size for i in images) == info["size"]
    assert 0 < info["stored_bytes"] < info["size"]


def test_remove_deletes_an_archive_but_refuses_other_directories(engine, tmp_path, images):
    """remove only removes archives, and leaves no trash behind."""
    exp = tmp_path / "exp"
    path = export(engine, exp, images)
    (exp / "notes").mkdir()
    with pytest.raises(E.ArchiveError, match="not an archive"):
        archive.remove(str(exp / "notes"))
    archive.remove(str(path))
    assert ["notes"] == entries(exp)


# --- golden fixtures -------------------------------------------------------------------


def golden_dirs():
    return sorted(DATA.glob("archive-v*"))


@pytest.mark.parametrize("fixture", golden_dirs(), ids=lambda p: p.name)
def test_golden_archives_still_read_verify_and_decode(fixture, engine, tmp_path):
    """Every archive format ever released stays readable (tests/data/archive-v*)."""
    expected = json.loads((fixture / "expected.json").read_text())
    arc = archive.open_archive(str(fixture / expected["archive"]))
    assert expected["instance"] == arc.instance.name
    assert archive.verify(arc.path, engine)["ok"]
    for disk in expected["disks"]:
        out = import_raw(engine, arc.disk(disk["index"]), tmp_path, f"g{disk['index']}")
        data = out.read_bytes()[: disk["size"]]
        assert disk["sha256"] == hashlib.sha256(data).hexdigest()


def test_there_is_a_golden_fixture_for_the_current_format_version():
    """Releasing a new format version needs a new tests/data/archive-vN fixture."""
    assert f"archive-v{archive.FORMAT_VERSION}" in [p.name for p in golden_dirs()]
