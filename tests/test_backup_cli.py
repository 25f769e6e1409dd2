"""``ganeti-vol backup list|info|verify|remove``: in-process through main(), plus a
subprocess smoke test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_streams import CHUNK, MIB, encode_file, engine, make_image  # noqa: F401 (fixture)

from ganeti_vol.cli import main
from ganeti_vol.core.model import Disk, Instance
from ganeti_vol.formats import archive

REPO = Path(__file__).resolve().parent.parent


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def make_archive(engine, export_dir: Path, name: str, images) -> Path:
    disks = tuple(Disk(path=str(p), size_mib=2, uuid=f"00000000-0000-4000-8000-00000000000{i}")
                  for i, p in enumerate(images))
    inst = Instance(name=name, os="debootstrap+default", uuid="u", ctime=1.0, mtime=1.0,
                    disks=disks)
    with archive.ArchiveWriter(str(export_dir), inst, chunk_size=CHUNK) as aw:
        for i, img in enumerate(images):
            encode_file(engine, img, aw.disk_sink(i))
    return Path(aw.path)


@pytest.fixture
def archives(engine, node_dirs, tmp_path):
    """Two archives in the node's export dir: web1 (2 disks) and web2 (1 disk)."""
    imgs = [make_image(tmp_path / "a.img", 2 * MIB, [(0, 2 * MIB, "random")], seed=1),
            make_image(tmp_path / "b.img", MIB, seed=2)]
    return {"web1": make_archive(engine, node_dirs["export"], "web1", imgs),
            "web2": make_archive(engine, node_dirs["export"], "web2", imgs[1:])}


def corrupt_data_chunk(path: Path, disk: int = 0, chunk: int = 2) -> None:
    """Flip a byte inside a stored (incompressible) frame: it decodes, to wrong data."""
    entry = archive.open_archive(str(path)).disk(disk).read_index()[chunk]
    dump = next(path.glob(f"*{disk}.lz4"))
    data = bytearray(dump.read_bytes())
    data[entry[2] + 1000] ^= 0x01
    dump.write_bytes(bytes(data))


def test_list_shows_every_archive_as_a_table_and_as_json(capsys, archives):
    """list: one row per archive; --json gives the same entries."""
    rc, out, _ = run(capsys, "backup", "list")
    assert 0 == rc
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "FORMAT", "INSTANCE", "DISKS", "SIZE", "STORED", "CREATED"]
    assert [line.split()[:4] for line in lines[1:]] == [["web1", "native", "web1", "2"],
                                                        ["web2", "native", "web2", "1"]]
    rc, out, _ = run(capsys, "backup", "list", "--json")
    assert ["web1", "web2"] == [a["name"] for a in json.loads(out)["archives"]]


def test_list_honours_export_dir_override(capsys, archives, tmp_path):
    """--export-dir points list at another directory (a missing one is an error: test_cli)."""
    (tmp_path / "empty").mkdir()
    rc, out, _ = run(capsys, "backup", "list", "--json", "--export-dir", str(tmp_path / "empty"))
    assert (0, []) == (rc, json.loads(out)["archives"])


def test_info_by_name_and_by_path(capsys, archives):
    """info takes a name in the export dir or a path, as text or JSON."""
    rc, out, _ = run(capsys, "backup", "info", "web1")
    assert 0 == rc and "instance: web1 (OS debootstrap+default)" in out
    assert "disk 1: 1.0 MB" in out
    rc, out, _ = run(capsys, "backup", "info", "--json", str(archives["web2"]))
    info = json.loads(out)
    assert ("web2", 1, "xxh3-128") == (info["instance"], len(info["disks"]),
                                       info["disks"][0]["hash"])


def test_verify_good_archives_exits_zero(capsys, archives):
    """verify re-hashes everything and says ok."""
    rc, out, _ = run(capsys, "backup", "verify", "--progress", "none", "web1", "web2")
    assert 0 == rc
    assert out.count(": ok, ") == 2


def test_verify_names_the_first_bad_disk_and_offset_and_exits_17(capsys, archives):
    """One corrupt archive: IntegrityError's exit code and a one-line message with disk/offset."""
    corrupt_data_chunk(archives["web1"])
    rc, out, err = run(capsys, "backup", "verify", "--progress", "none", "web1")
    assert 17 == rc and "" == out
    assert f"disk 0 of archive '{archives['web1']}' at offset {2 * CHUNK}" in err
    assert "chunk hash mismatch" in err


def test_verify_of_several_archives_reports_each_and_exits_1(capsys, archives):
    """A bad archive among several: every result printed, exit status 1."""
    corrupt_data_chunk(archives["web1"])
    rc, out, _ = run(capsys, "backup", "verify", "--progress", "none", "--json", "web1", "web2")
    assert 1 == rc
    result = json.loads(out)
    assert [False, True] == [a["ok"] for a in result["archives"]]
    assert (0, 2 * CHUNK) == (result["archives"][0]["disk"], result["archives"][0]["offset"])


def test_verify_json_progress_goes_to_stderr_only(capsys, archives):
    """--progress=json writes JSON lines on stderr; stdout keeps only the result."""
    rc, out, err = run(capsys, "backup", "verify", "--progress", "json", "--json", "web2")
    assert 0 == rc and json.loads(out)["ok"]
    events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
    assert "end" == events[-1]


def test_verify_of_a_missing_archive_is_exit_15(capsys, node_dirs):
    """A name that is no archive: ArchiveError, exit 15."""
    rc, _, err = run(capsys, "backup", "verify", "--progress", "none", "nothere")
    assert 15 == rc and "cannot open archive" in err


def test_remove_deletes_archives_and_refuses_other_directories(capsys, archives, node_dirs):
    """remove removes only archives; a plain directory is an ArchiveError."""
    (node_dirs["export"] / "keep").mkdir()
    rc, _, err = run(capsys, "backup", "remove", "keep")
    assert 15 == rc and "not an archive" in err
    rc, out, _ = run(capsys, "backup", "remove", "web1")
    assert 0 == rc and f"removed {archives['web1']}" in out
    assert ["keep", "web2"] == sorted(os.listdir(node_dirs["export"]))


def test_backup_list_json_through_the_real_command(archives, node_dirs):
    """python -m ganeti_vol backup list --json: only JSON on stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", "ganeti_vol", "--config", str(node_dirs["conf"]), "backup", "list",
         "--json"], capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )
    assert 0 == proc.returncode, proc.stderr
    assert ["web1", "web2"] == [a["name"] for a in json.loads(proc.stdout)["archives"]]
