"""Hostile archives and streams (issue 11, B6-B10): an archive or stream may come from anyone.

Import and ``backup verify`` read only regular files directly inside the archive
(never a path out of it, a symlink, a FIFO or a device), allocate nothing an
archive's sizes or frames ask for beyond the format's limits (peak RSS of the
real CLI measured in a subprocess), refuse manifests that drop or repeat disks,
check manifest.json's own checksum, and answer every malformed input with a
named error and its exit code, never a traceback.  Hostile archives and
streams are made with ganeti-vol's own writers fed hostile chunks, or by
editing real archives.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import lz4.block
import peak_rss
import pytest
import xxhash
from test_streams import KIB, MIB, make_image

from ganeti_vol.cli import main
from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Instance
from ganeti_vol.engine import codec, hashing
from ganeti_vol.engine.chunks import Chunk, EncodeInfo, EncodeSummary
from ganeti_vol.engine.parallel import Engine
from ganeti_vol.formats import archive, wire
from ganeti_vol.ganeti import config as cfgmod
from ganeti_vol.ganeti import fields
from ganeti_vol.ops import operations, transfer

REPO = Path(__file__).resolve().parent.parent
CHUNK = 64 * KIB
#: the issue's bound on peak memory for any input
RSS_LIMIT_MIB = 200
#: address-space limit of the CLI subprocesses: it only protects the machine from a
#: runaway (the assertions are on the measured peak RSS)
AS_LIMIT = 1 << 30


# --- running the real CLI, measuring its peak memory -------------------------------------


@dataclass
class Run:
    rc: int
    out: str
    err: str
    #: peak resident set size of the ganeti-vol process, MiB
    rss_mib: float


def run_cli(conf: Path, *argv: str, stdin: Path | None = None, timeout: float = 60) -> Run:
    """``python -m ganeti_vol --config conf argv`` in a subprocess; its exit code, output, RSS.

    A run that does not end within ``timeout`` is killed and fails the test
    (a FIFO must never hang ganeti-vol).
    """
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))

    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile() as out, \
            tempfile.TemporaryFile() as err, open(stdin or os.devnull, "rb") as inp:
        rss = Path(tmp) / "rss"
        proc = subprocess.Popen(
            peak_rss.command(rss, [sys.executable, "-m", "ganeti_vol", "--config", str(conf),
                                   *argv]),
            stdin=inp, stdout=out, stderr=err, cwd=REPO, preexec_fn=limit,
            start_new_session=True,
        )
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"ganeti-vol {' '.join(argv)} still ran after {timeout}s (hung)")
        out.seek(0)
        err.seek(0)
        return Run(proc.returncode, out.read().decode(errors="replace"),
                   err.read().decode(errors="replace"), peak_rss.mib(rss))


def run_main(capsys, conf: Path, *argv: str) -> tuple[int, str]:
    """The CLI in this process: exit code and stderr (which must hold no traceback)."""
    rc = main(["--config", str(conf), *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    return rc, err


# --- real archives, streams and targets --------------------------------------------------


@pytest.fixture
def node(node_dirs):
    """The node config of the tests, with 64 KiB chunks (many chunks in small disks)."""
    cfgmod.write_node_config(str(node_dirs["conf"]), {
        "os_search_path": [str(node_dirs["os"])], "hooks_dir": str(node_dirs["hooks"]),
        "log_dir": str(node_dirs["log"]), "export_dir": str(node_dirs["export"]),
        "state_dir": str(node_dirs["state"]), "stall_timeout": "30", "chunk_size": "64K",
        "workers": "2",
    })
    return node_dirs


@pytest.fixture
def ctx(node):
    return operations.OpContext(node=cfgmod.load_node_config(str(node["conf"])))


def make_instance(name: str, paths, sizes=None) -> Instance:
    uuid = fields.instance_uuid_for(name)
    disks = tuple(fields.make_disk(i, uuid, path=str(p), size=None if sizes is None else sizes[i])
                  for i, p in enumerate(paths))
    return Instance(name=name, os="", uuid=uuid, ctime=1.0, mtime=1.0, disks=disks)


def source_images(tmp_path: Path) -> list[Path]:
    """Two small disks: text, random data, written zeros and holes (11 and 3 chunks)."""
    return [
        make_image(tmp_path / "src0.img", 640 * KIB + 1000,
                   [(0, 100 * KIB, "text"), (192 * KIB, 64 * KIB, "random"),
                    (320 * KIB, 64 * KIB, "zero"), (448 * KIB, 100 * KIB + 1000, "text")],
                   seed=11),
        make_image(tmp_path / "src1.img", 192 * KIB, [(0, 192 * KIB, "text")], seed=12),
    ]


def export_archive(ctx, tmp_path: Path, fmt: str = "native", name: str = "src") -> Path:
    """A real archive of the two source disks, exported raw."""
    imgs = source_images(tmp_path)
    out = transfer.export_instance(ctx, make_instance("src.example.com", imgs),
                                   output=str(tmp_path / "exports"), raw=True, fmt=fmt, name=name)
    return Path(out.to_json()["path"])


def export_stream(ctx, tmp_path: Path) -> bytes:
    imgs = source_images(tmp_path)
    path = tmp_path / "src.gvs"
    with open(path, "wb") as f:
        transfer.export_instance(ctx, make_instance("src.example.com", imgs), output="-",
                                 out_fd=f.fileno(), raw=True)
    return path.read_bytes()


class Targets:
    """The two disks of the import target, filled with a pattern so that any write shows."""

    def __init__(self, tmp_path: Path, size: int = MIB, count: int = 2) -> None:
        rnd = random.Random(99)
        self.paths = [tmp_path / f"target{i}.img" for i in range(count)]
        for p in self.paths:
            p.write_bytes(rnd.randbytes(size))
        self.before = [p.read_bytes() for p in self.paths]
        self.instance = make_instance("dst.example.com", self.paths)

    def untouched(self) -> bool:
        return [p.read_bytes() for p in self.paths] == self.before


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def write_manifest(path: Path, m: dict) -> None:
    """Write a manifest as ganeti-vol's writer does (consistent checksum): a forgery."""
    (path / "manifest.json").write_bytes(archive.render_manifest(m))


def edit_config(path: Path, old: str, new: str) -> None:
    """Edit config.ini and, for a native archive, its checksum in the manifest (a forgery)."""
    cfg = path / "config.ini"
    cfg.write_text(cfg.read_text().replace(old, new))
    if (path / "manifest.json").exists():
        m = manifest(path)
        m["config_sha256"] = hashlib.sha256(cfg.read_bytes()).hexdigest()
        write_manifest(path, m)


def dump_name(path: Path, disk: int) -> str:
    return archive.open_archive(str(path)).disk(disk).dump_path.rsplit("/", 1)[1]


# --- hostile frames and archives written by ganeti-vol's own writers ----------------------


def frame_header(content_size: int) -> bytes:
    descriptor = bytes((0x68, 0x70)) + content_size.to_bytes(8, "little")
    return (b"\x04\x22\x4d\x18" + descriptor
            + bytes((((xxhash.xxh32_intdigest(descriptor) >> 8) & 0xFF),)))


def bomb_frame(content_size: int, blocks: int) -> bytes:
    """A valid LZ4 frame claiming ``content_size`` bytes whose blocks hold 4 MiB of zeros each."""
    block = lz4.block.compress(bytes(4 * MIB), store_size=False)
    return (frame_header(content_size)
            + (len(block).to_bytes(4, "little") + block) * blocks + bytes(4))


def write_disk(sink, chunks, *, chunk_size: int, size: int, crc: bool = False) -> None:
    """Feed ``chunks`` ((frame, hash) pairs, in order) to a writer's disk sink, as the engine does.

    The whole-disk digest recorded is the one of the given hashes.
    """
    sink.begin(EncodeInfo("forged", chunk_size, "xxh3-128", "file", size, {}))
    digest = hashing.DiskDigest("xxh3-128", chunk_size)
    count = stored = 0
    for i, (frame, h) in enumerate(chunks):
        length = min(chunk_size, size - i * chunk_size)
        sink.write_chunk(Chunk(i, i * chunk_size, length, False, h, frame,
                                       crc=zlib.crc32(frame) if crc else None))
        digest.update(h)
        count, stored = count + 1, stored + len(frame)
    sink.finish(EncodeSummary(
        what="forged", source_kind="file", size=size, chunk_size=chunk_size, hash_algo="xxh3-128",
        compression=codec.COMPRESSION, chunks=count, zero_chunks=0, zero_bytes=0, hole_bytes=0,
        stored_bytes=stored, digest=digest.finish(size), started=time.time(), seconds=0.1))


def forge_archive(export_dir: Path, frames: list[bytes], *, chunk_size: int, size: int,
                  name: str = "forged") -> Path:
    """A one-disk native archive of the given frames, written by the real ArchiveWriter."""
    inst = make_instance("forged.example.com", ["/dev/null"], [size])
    with archive.ArchiveWriter(str(export_dir), inst, chunk_size=chunk_size,
                               hash_algo="xxh3-128", name=name) as aw:
        write_disk(aw.disk_sink(0), [(f, bytes(16)) for f in frames], chunk_size=chunk_size,
                   size=size)
    return Path(aw.path)


def forge_stream(path: Path, frames: list[bytes], *, chunk_size: int, size: int,
                 disks: list[int] | None = None, extra: dict | None = None) -> Path:
    """A stream of the given frames for each of ``disks``, written by the real WireWriter."""
    inst = make_instance("forged.example.com", ["/dev/null", "/dev/null"], [size, size])
    disks = [0] if disks is None else disks
    with open(path, "wb") as f, wire.WireWriter(f.fileno(), inst, chunk_size=chunk_size,
                                                hash_algo="xxh3-128", disks=disks,
                                                extra=extra) as ww:
        for index in disks:
            write_disk(ww.disk_sink(index), [(f, bytes(16)) for f in frames],
                       chunk_size=chunk_size, size=size, crc=True)
    return path


# --- B6: nothing outside the archive is read -----------------------------------------------


OUTSIDE = "is not the name of a file inside the archive"


def assert_refused(ctx, node, tmp_path, capsys, path: Path, message: str) -> None:
    """backup verify exits 15 with ``message``; an import fails the same way, writing nothing."""
    rc, err = run_main(capsys, node["conf"], "backup", "verify", str(path))
    assert 15 == rc and message in err, err
    targets = Targets(tmp_path)
    with pytest.raises(E.ArchiveError, match=re.escape(message)):
        transfer.import_instance(ctx, targets.instance, str(path), raw=True)
    assert targets.untouched()


@pytest.mark.parametrize("where", ["absolute", "parent", "subdir"])
def test_ganeti_export_naming_a_dump_outside_itself_is_refused(ctx, node, tmp_path, capsys, where):
    """config.ini's disk0_dump = /etc/passwd, ../x or sub/x: verify and import refuse it."""
    path = export_archive(ctx, tmp_path, fmt="ganeti")
    dump = dump_name(path, 0)
    outside = tmp_path / "outside"
    shutil.copy(path / dump, outside)  # a copy of the real dump: reading it would "work"
    (path / "sub").mkdir()
    shutil.copy(path / dump, path / "sub" / "x")
    name = {"absolute": str(outside), "parent": "../../outside", "subdir": "sub/x"}[where]
    edit_config(path, f"disk0_dump = {dump}", f"disk0_dump = {name}")
    assert_refused(ctx, node, tmp_path, capsys, path, OUTSIDE)


@pytest.mark.parametrize("key", ["dump", "index_file", "config"])
def test_native_manifest_naming_a_file_outside_the_archive_is_refused(ctx, node, tmp_path, capsys,
                                                                       key):
    """A manifest naming ../x for a dump, index or config.ini is refused, even if it is there."""
    path = export_archive(ctx, tmp_path)
    m = manifest(path)
    name = m["config"] if key == "config" else m["disks"][0][key]
    shutil.copy(path / name, tmp_path / "exports" / name)  # the same file, next to the archive
    if key == "config":
        m["config"] = f"../{name}"
    else:
        m["disks"][0][key] = f"../{name}"
    write_manifest(path, m)
    assert_refused(ctx, node, tmp_path, capsys, path, OUTSIDE)


MEMBERS = {"native": ["manifest.json", "config.ini", "dump", "index"],
           "ganeti": ["config.ini", "dump"]}


def member_path(path: Path, member: str) -> Path:
    if member in ("dump", "index"):
        disk = archive.open_archive(str(path)).disk(0)
        return Path(disk.dump_path if member == "dump" else disk.index_path)
    return path / member


@pytest.mark.parametrize("fmt,member", [(f, m) for f in MEMBERS for m in MEMBERS[f]])
def test_symlink_or_device_in_an_archive_is_refused(ctx, node, tmp_path, capsys, fmt, member):
    """A member replaced by a symlink (to an identical copy) or a device is never read."""
    path = export_archive(ctx, tmp_path, fmt=fmt)
    target = member_path(path, member)
    os.rename(target, path / "real-copy")
    target.symlink_to("real-copy")
    assert_refused(ctx, node, tmp_path, capsys, path,
                   f"'{target}' is a symbolic link, not a regular file")
    target.unlink()
    os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's device
    assert_refused(ctx, node, tmp_path, capsys, path, f"'{target}' is a device, not a regular file")


@pytest.mark.parametrize("fmt,member", [(f, m) for f in MEMBERS for m in MEMBERS[f]])
def test_fifo_in_an_archive_never_hangs_verify_or_import(ctx, node, tmp_path, fmt, member):
    """A FIFO in place of any file: verify and import fail at once (real CLI, 30 s limit)."""
    path = export_archive(ctx, tmp_path, fmt=fmt)
    target = member_path(path, member)
    target.unlink()
    os.mkfifo(target)
    run = run_cli(node["conf"], "backup", "verify", str(path), timeout=30)
    assert 15 == run.rc and f"'{target}' is a FIFO, not a regular file" in run.err, run.err
    targets = Targets(tmp_path)
    run = run_cli(node["conf"], "import", "--name", "dst", "--disk", str(targets.paths[0]),
                  "--disk", str(targets.paths[1]), "--raw", str(path), timeout=30)
    assert 15 == run.rc and "is a FIFO" in run.err and "Traceback" not in run.err, run.err
    assert targets.untouched()


# --- B7: bounded allocation: decompression bombs and impossible sizes ----------------------


def test_decompression_bomb_archive_is_refused_in_bounded_memory(node, tmp_path):
    """A 12 MB archive of frames that each claim 4 MiB but unpack to 1 GiB: RSS stays small.

    Today's main took ``backup verify`` of such an archive to gigabytes.
    """
    cs = 4 * MIB
    frame = bomb_frame(cs, 256)  # just within the frame-length limit of a 4 MiB chunk
    assert len(frame) <= codec.max_frame(cs)
    path = forge_archive(node["export"], [frame] * 3, chunk_size=cs, size=3 * cs)
    run = run_cli(node["conf"], "backup", "verify", str(path))
    assert 12 == run.rc and "blocks beyond its content size" in run.err, run.err
    assert run.rss_mib <= RSS_LIMIT_MIB
    target = tmp_path / "t.img"
    target.write_bytes(b"\x55" * (16 * MIB))
    run = run_cli(node["conf"], "import", "--name", "t", "--disk", str(target), "--raw",
                  str(path))
    assert 12 == run.rc and "Traceback" not in run.err, run.err
    assert run.rss_mib <= RSS_LIMIT_MIB
    assert target.read_bytes() == b"\x55" * (16 * MIB)  # the first chunk failed: nothing written


def test_frames_longer_than_the_spec_allows_are_refused_before_reading(node):
    """An index entry claiming an 8 MB frame for a 4 MiB chunk is refused before it is read."""
    cs = 4 * MIB
    path = forge_archive(node["export"], [bomb_frame(cs, 512)] * 2, chunk_size=cs, size=2 * cs)
    run = run_cli(node["conf"], "backup", "verify", str(path))
    assert 17 == run.rc and "contiguous frames of possible lengths" in run.err, run.err
    assert run.rss_mib <= RSS_LIMIT_MIB


def test_decompression_bomb_stream_is_refused_in_bounded_memory(node, tmp_path):
    """One 8 MB stream record that unpacks to 2 GiB: refused, RSS small, the disk untouched.

    Today's main took the import of such a record to over a gigabyte.
    """
    cs = 4 * MIB
    stream = forge_stream(tmp_path / "bomb.gvs", [bomb_frame(cs, 512), bomb_frame(cs, 256)],
                          chunk_size=cs, size=2 * cs)
    target = tmp_path / "t.img"
    target.write_bytes(b"\x55" * (16 * MIB))
    run = run_cli(node["conf"], "import", "--name", "t", "--disk", str(target), "--raw", "-",
                  stdin=stream)
    assert 17 == run.rc and "payload bytes for a chunk" in run.err, run.err
    assert run.rss_mib <= RSS_LIMIT_MIB
    assert target.read_bytes() == b"\x55" * (16 * MIB)
    stream = forge_stream(tmp_path / "bomb2.gvs", [bomb_frame(cs, 256)], chunk_size=cs, size=cs)
    run = run_cli(node["conf"], "import", "--name", "t", "--disk", str(target), "--raw", "-",
                  stdin=stream)
    assert 12 == run.rc and "blocks beyond its content size" in run.err, run.err
    assert run.rss_mib <= RSS_LIMIT_MIB
    assert target.read_bytes() == b"\x55" * (16 * MIB)


def test_huge_json_manifest_and_stream_header_are_refused_in_bounded_memory(ctx, node, tmp_path):
    """A 64 MiB manifest.json or an 8 MiB stream header is refused before it is parsed."""
    path = export_archive(ctx, tmp_path)
    (path / "manifest.json").write_text("[" + "{}," * (22 << 20) + "{}]")
    run = run_cli(node["conf"], "backup", "verify", str(path))
    assert 15 == run.rc and "more than the 2097152 allowed" in run.err, run.err
    assert run.rss_mib <= RSS_LIMIT_MIB
    big = forge_stream(tmp_path / "big.gvs", [codec.encode(b"x" * CHUNK)], chunk_size=CHUNK,
                       size=CHUNK, extra={"padding": "x" * (8 << 20)})
    target = tmp_path / "t.img"
    target.write_bytes(bytes(MIB))
    run = run_cli(node["conf"], "import", "--name", "t", "--disk", str(target), "--raw", "-",
                  stdin=big)
    assert 17 == run.rc and "claims" in run.err, run.err
    assert run.rss_mib <= RSS_LIMIT_MIB


def test_deeply_nested_json_is_a_named_error(ctx, node, tmp_path, capsys):
    """A manifest of a million '[' is 'not an archive', not a RecursionError."""
    path = export_archive(ctx, tmp_path)
    (path / "manifest.json").write_text("[" * 1_000_000)
    rc, err = run_main(capsys, node["conf"], "backup", "verify", str(path))
    assert 15 == rc and "incomplete or invalid manifest.json" in err


def test_largest_chunks_with_incompressible_data_import_in_bounded_memory(node, tmp_path):
    """16 MiB chunks of random data (the format's largest): verify and import stay under 200 MiB."""
    cs, count = 16 * MIB, 8
    rnd = random.Random(5)
    whole = hashlib.sha256()

    def chunks():
        for _ in range(count):
            data = rnd.randbytes(cs)
            whole.update(data)
            yield codec.encode(data), hashing.chunk_hash("xxh3-128", data)

    inst = make_instance("big.example.com", ["/dev/null"], [count * cs])
    with archive.ArchiveWriter(str(node["export"]), inst, chunk_size=cs, name="big") as aw:
        write_disk(aw.disk_sink(0), chunks(), chunk_size=cs, size=count * cs)
    run = run_cli(node["conf"], "backup", "verify", "big")
    assert 0 == run.rc, run.err
    assert run.rss_mib <= RSS_LIMIT_MIB
    target = tmp_path / "t.img"
    with open(target, "wb") as f:
        f.truncate(count * cs)
    run = run_cli(node["conf"], "import", "--name", "t", "--disk", str(target), "--raw", "big")
    assert 0 == run.rc, run.err
    assert run.rss_mib <= RSS_LIMIT_MIB
    got = hashlib.sha256()
    with open(target, "rb") as f:
        while block := f.read(cs):
            got.update(block)
    assert got.digest() == whole.digest()


IMPOSSIBLE = {
    "chunk_size 2^40": ({"chunk_size": 1 << 40}, "chunk_size' must be a power of two"),
    "chunk_size not a power of two": ({"chunk_size": 3 * MIB}, "must be a power of two"),
    "chunk_size 4 KiB": ({"chunk_size": 4096}, "must be a power of two"),
    "size 2^62": ({"size": 1 << 62}, "'disks\\[0\\].chunks' must be"),
    "size and chunks 2^62": ({"size": 1 << 62, "chunks": (1 << 62) // CHUNK},
                             "index '.*' has .* bytes, .* expected for"),
    "negative size": ({"size": -1}, "'disks\\[0\\].size' must be a byte count"),
    "size as text": ({"size": "640"}, "'disks\\[0\\].size' must be a byte count"),
    "size true": ({"size": True}, "'disks\\[0\\].size' must be a byte count"),
    "dump_bytes 2^62": ({"dump_bytes": 1 << 62}, "has .* bytes, the manifest says"),
    "disk index 99": ({"index": 99}, "'disks\\[0\\].index' must be a number from 0 to 15"),
    "unknown hash": ({"hash": "md5"}, "unsupported chunk hash algorithm 'md5'"),
    "digest not a digest": ({"digest": 5}, "'disks\\[0\\].digest' must be"),
}


@pytest.mark.parametrize("case", IMPOSSIBLE, ids=list(IMPOSSIBLE))
def test_impossible_sizes_in_a_manifest_are_named_errors(ctx, node, tmp_path, capsys, case):
    """Sizes and counts out of the spec's range are refused before anything is allocated."""
    changes, message = IMPOSSIBLE[case]
    path = export_archive(ctx, tmp_path)
    m = manifest(path)
    m["disks"][0].update(changes)
    write_manifest(path, m)
    rc, err = run_main(capsys, node["conf"], "backup", "verify", str(path))
    assert rc in (15, 16, 17)
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_index_frame_length_of_4_gib_is_refused_before_reading(ctx, node, tmp_path, capsys):
    """An index entry (checksum updated) claiming a 4 GiB frame is refused, nothing allocated."""
    path = export_archive(ctx, tmp_path)
    m = manifest(path)
    idx = path / m["disks"][0]["index_file"]
    data = bytearray(idx.read_bytes())
    data[24 + 4:24 + 8] = (0xFFFFFFFF).to_bytes(4, "little")  # first entry's frame length
    idx.write_bytes(bytes(data))
    m["disks"][0]["index_sha256"] = hashlib.sha256(data).hexdigest()
    write_manifest(path, m)
    rc, err = run_main(capsys, node["conf"], "backup", "verify", str(path))
    assert 17 == rc and "chunk 0: 4294967295 bytes at 0" in err


STREAM_HEADERS = {
    "chunk_size 2^40": ({"chunk_size": 1 << 40}, "header field 'chunk_size' must be"),
    "chunk_size as text": ({"chunk_size": "65536"}, "header field 'chunk_size' must be"),
    "no disks": ({"disks": []}, r"the header has disks \[\], config.ini has disks \[0\]"),
    "disk 0 twice": ({"disks": [0, 0]}, "header field 'disks' must be"),
    "disk index 40": ({"disks": [40]}, "header field 'disks' must be"),
    "hash as list": ({"hash": ["sha256"]}, "header field 'hash' must be"),
}


@pytest.mark.parametrize("case", STREAM_HEADERS, ids=list(STREAM_HEADERS))
def test_impossible_stream_headers_are_named_errors(node, tmp_path, case):
    """Header fields out of range are refused before any allocation or write."""
    changes, message = STREAM_HEADERS[case]
    stream = forge_stream(tmp_path / "s.gvs", [codec.encode(b"y" * CHUNK)], chunk_size=CHUNK,
                          size=CHUNK, extra=changes)
    target = tmp_path / "t.img"
    target.write_bytes(b"\x55" * MIB)
    run = run_cli(node["conf"], "import", "--name", "t", "--disk", str(target), "--raw", "-",
                  stdin=stream)
    assert 15 == run.rc and re.search(message, run.err) and "Traceback" not in run.err, run.err
    assert target.read_bytes() == b"\x55" * MIB


def test_stream_chunk_longer_than_the_chunk_size_is_refused(node, tmp_path):
    """A CHUNK record claiming 4 GiB of chunk (u32 max) is refused before its payload is read."""
    stream = forge_stream(tmp_path / "s.gvs", [codec.encode(b"y" * CHUNK)], chunk_size=CHUNK,
                          size=CHUNK)
    data = bytearray(stream.read_bytes())
    chunk = next(r for r in parse_records(bytes(data)) if r.type == wire.CHUNK)
    length_at = chunk.start + wire._FIXED.size + 8  # the extension: index u64, length u32
    data[length_at:length_at + 4] = (0xFFFFFFFF).to_bytes(4, "little")
    crc_at = chunk.header_end - 4
    data[crc_at:crc_at + 4] = zlib.crc32(bytes(data[chunk.start:crc_at])).to_bytes(4, "little")
    stream.write_bytes(bytes(data))
    target = tmp_path / "t.img"
    target.write_bytes(b"\x55" * MIB)
    run = run_cli(node["conf"], "import", "--name", "t", "--disk", str(target), "--raw", "-",
                  stdin=stream)
    assert 17 == run.rc and "claims a chunk of 4294967295 bytes" in run.err, run.err
    assert target.read_bytes() == b"\x55" * MIB


# --- B8: manifests and streams that drop or repeat disks -----------------------------------


DROPS = {
    "duplicate": lambda d: [d[0], d[0]],
    "empty": lambda d: [],
    "first only": lambda d: [d[0]],
}


@pytest.mark.parametrize("case", DROPS, ids=list(DROPS))
def test_manifest_dropping_or_repeating_disks_is_refused_and_no_disk_is_written(
    ctx, tmp_path, case
):
    """"disks": [] or a repeated entry never imports with success leaving a disk untouched."""
    path = export_archive(ctx, tmp_path)
    m = manifest(path)
    m["disks"] = DROPS[case](m["disks"])
    write_manifest(path, m)
    targets = Targets(tmp_path)
    with pytest.raises(E.ArchiveError, match="disks"):
        transfer.import_instance(ctx, targets.instance, str(path), raw=True)
    assert targets.untouched()


def test_archive_of_a_diskless_instance_has_no_disks_in_both_files_and_is_valid(tmp_path):
    """"disks": [] is refused only where config.ini has disks: a diskless export stays readable."""
    inst = make_instance("diskless.example.com", [])
    with archive.ArchiveWriter(str(tmp_path), inst) as aw:
        pass
    assert [] == manifest(Path(aw.path))["disks"]
    assert archive.verify(aw.path)["ok"]


def test_manifest_disk_index_and_dump_must_match_config_ini(ctx, tmp_path):
    """Disk 1's entry relabelled as disk 2, or pointing at disk 0's dump, is refused."""
    path = export_archive(ctx, tmp_path)
    m = manifest(path)
    m["disks"][1]["index"] = 2
    write_manifest(path, m)
    with pytest.raises(E.ArchiveError, match=r"manifest.json has disks \[0, 2\], config.ini has "
                                             r"disks \[0, 1\]"):
        archive.open_archive(str(path))
    m["disks"][1]["index"] = 1
    m["disks"][1]["dump"], m["disks"][0]["dump"] = m["disks"][0]["dump"], m["disks"][1]["dump"]
    write_manifest(path, m)
    with pytest.raises(E.ArchiveError, match="names .* for disk 0, config.ini names"):
        archive.open_archive(str(path))


@pytest.mark.parametrize("case", ["repeated", "none announced"])
def test_stream_dropping_or_repeating_disks_is_refused_and_no_disk_is_written(
    node, tmp_path, case
):
    """A stream sending disk 0 twice, or announcing none but sending disk 0, is refused."""
    disks, extra = ([0, 0], None) if case == "repeated" else ([0], {"disks": []})
    stream = forge_stream(tmp_path / "s.gvs", [codec.encode(b"z" * CHUNK)], chunk_size=CHUNK,
                          size=CHUNK, disks=disks, extra=extra)
    targets = Targets(tmp_path)
    run = run_cli(node["conf"], "import", "--name", "t", "--disk", str(targets.paths[0]),
                  "--disk", str(targets.paths[1]), "--raw", "-", stdin=stream)
    assert 15 == run.rc and ("header field 'disks' must be" in run.err
                             or "the header has disks [], config.ini has disks [0]" in run.err)
    assert targets.untouched()


def test_stream_disk_out_of_the_announced_order_is_refused_before_it_is_written(
    ctx, tmp_path
):
    """DISK_BEGIN of a disk other than the next announced one stops the import at once."""
    data = export_stream(ctx, tmp_path)
    records = parse_records(data)
    begins = [r for r in records if r.type == wire.DISK_BEGIN]
    first = json.loads(begins[0].payload)
    first["index"] = 1
    data = replace_payload(data, begins[0], json.dumps(first).encode())
    targets = Targets(tmp_path)
    with open(tmp_path / "s.gvs", "wb") as f:
        f.write(data)
    with open(tmp_path / "s.gvs", "rb") as f, \
            pytest.raises(E.IntegrityError, match="DISK_BEGIN of disk 1 where disk 0 was due"):
        transfer.import_instance(ctx, targets.instance, "-", in_fd=f.fileno(), raw=True)
    assert targets.untouched()


@dataclass
class Record:
    type: int
    start: int  # offset of the fixed header
    header_end: int  # offset of the payload
    payload: bytes


def parse_records(data: bytes) -> list[Record]:
    """The records of a stream (payload crc and sequence untouched)."""
    out, pos, hash_len = [], len(wire.PREAMBLE), 16
    while pos < len(data):
        marker, rtype, _, plen, _, _ = wire._FIXED.unpack_from(data, pos)
        assert marker == b"GR"
        head = wire._FIXED.size + (wire._CHUNK_EXT.size + hash_len if rtype == wire.CHUNK else 0)
        end = pos + head + 4
        out.append(Record(rtype, pos, end, data[end:end + plen]))
        pos = end + plen
    return out


def replace_payload(data: bytes, rec: Record, payload: bytes) -> bytes:
    """The stream with one record's payload replaced and its crcs recomputed (a forgery)."""
    marker, rtype, flags, _, seq, _ = wire._FIXED.unpack_from(data, rec.start)
    head = wire._FIXED.pack(marker, rtype, flags, len(payload), seq, zlib.crc32(payload))
    head += data[rec.start + wire._FIXED.size:rec.header_end - 4]
    return (data[:rec.start] + head + zlib.crc32(head).to_bytes(4, "little") + payload
            + data[rec.header_end + len(rec.payload):])


# --- B9: manifest.json has its own checksum ------------------------------------------------


MANIFEST_FIELDS = ["created", "finished", "export_id", "created_by", "path", "kind", "mode",
                   "started", "seconds"]


@pytest.mark.parametrize("field", MANIFEST_FIELDS)
def test_a_changed_character_in_any_manifest_field_is_detected(ctx, tmp_path, field):
    """Time stamps, paths, origin and ids are covered by manifest_sha256 like everything else."""
    path = export_archive(ctx, tmp_path)
    text = (path / "manifest.json").read_bytes()
    at = text.index(f'"{field}": '.encode()) + len(field) + 5
    while not chr(text[at]).isalnum():
        at += 1
    flipped = text[:at] + bytes([text[at] ^ 0x01]) + text[at + 1:]
    (path / "manifest.json").write_bytes(flipped)
    with pytest.raises(E.IntegrityError, match="manifest.json does not match its checksum"):
        archive.verify(str(path))


def test_random_bit_flips_in_the_manifest_are_all_detected(ctx, tmp_path):
    """200 random single-bit flips of manifest.json (seeded): none opens as a valid archive."""
    path = export_archive(ctx, tmp_path)
    good = (path / "manifest.json").read_bytes()
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    for _ in range(200):
        bit = rnd.randrange(len(good) * 8)
        data = bytearray(good)
        data[bit // 8] ^= 1 << (bit % 8)
        (path / "manifest.json").write_bytes(bytes(data))
        with pytest.raises(E.ArchiveError):
            archive.open_archive(str(path))
            pytest.fail(f"seed {seed}: flipping bit {bit} of manifest.json went unnoticed")


def test_manifests_carry_the_checksum_as_an_optional_feature(ctx, tmp_path):
    """Older readers (which ignore unknown optional features) still read new archives."""
    m = manifest(export_archive(ctx, tmp_path))
    assert "manifest-sha256" in m["optional_features"]
    assert "manifest-sha256" not in m["mandatory_features"]
    assert list(m)[-1] == "manifest_sha256"


def test_checksum_removed_or_unlisted_is_damage_not_an_old_manifest(ctx, tmp_path):
    """Dropping the field while the feature is listed, or unlisting it, does not skip the check."""
    path = export_archive(ctx, tmp_path)
    good = (path / "manifest.json").read_text()
    m = json.loads(good)
    del m["manifest_sha256"]
    (path / "manifest.json").write_text(json.dumps(m, indent=1))
    with pytest.raises(E.IntegrityError, match="has no valid checksum"):
        archive.open_archive(str(path))
    (path / "manifest.json").write_text(good.replace('  "manifest-sha256"\n', ""))
    with pytest.raises(E.IntegrityError, match="does not match its checksum"):
        archive.open_archive(str(path))


def test_golden_v1_manifest_without_checksum_is_read_and_said_to_be_unchecked(node, capsys):
    """tests/data/archive-v1 predates the checksum: it verifies, and verify says it is unchecked."""
    golden = REPO / "tests" / "data" / "archive-v1" / "golden1.example.com"
    arc = archive.open_archive(str(golden))
    assert arc.manifest_checked is False and arc.info()["manifest_checked"] is False
    rc = main(["--config", str(node["conf"]), "backup", "verify", str(golden)])
    out = capsys.readouterr().out
    assert 0 == rc and "ok, 2 disk(s)" in out and "manifest.json predates its own checksum" in out
    assert 0 == main(["--config", str(node["conf"]), "backup", "info", str(golden)])
    assert "manifest not checked: it predates its own checksum" in capsys.readouterr().out


# --- B10: named errors, never a traceback --------------------------------------------------


REQUIRED = ["format", "format_version", "mandatory_features", "export_id", "created", "instance",
            "instance.name", "instance.os", "config", "config_sha256", "disks", "disks.index",
            "disks.uuid", "disks.dump", "disks.dump_bytes", "disks.index_file",
            "disks.index_sha256", "disks.size", "disks.chunk_size", "disks.chunks",
            "disks.compression", "disks.hash", "disks.digest"]


@pytest.mark.parametrize("key", REQUIRED)
def test_missing_manifest_key_is_a_named_error(ctx, node, tmp_path, capsys, key):
    """Every key a reader needs: missing, it is named in a one-line error (exit 15)."""
    path = export_archive(ctx, tmp_path)
    m = manifest(path)
    parent, _, name = key.rpartition(".")
    obj = {"": m, "instance": m["instance"], "disks": m["disks"][1]}[parent]
    del obj[name]
    write_manifest(path, m)
    for argv in (("backup", "verify", str(path)), ("backup", "info", str(path))):
        rc, err = run_main(capsys, node["conf"], *argv)
        assert rc == 15, err
        assert name in err and "manifest.json" in err, err


def test_backup_list_shows_a_broken_archive_with_its_reason_and_all_the_others(
    ctx, node, tmp_path, capsys
):
    """A manifest without 'instance' is listed as broken; the good archives are still listed."""
    for name in ("a-good", "b-bad", "c-good"):
        export_archive(ctx, tmp_path, name=name)
    for name in ("a-good", "b-bad", "c-good"):
        shutil.move(tmp_path / "exports" / name, node["export"] / name)
    m = manifest(node["export"] / "b-bad")
    del m["instance"]
    write_manifest(node["export"] / "b-bad", m)
    rc = main(["--config", str(node["conf"]), "backup", "list", "--json"])
    listing = json.loads(capsys.readouterr().out)
    assert 0 == rc
    assert [("a-good", True), ("b-bad", False), ("c-good", True)] == [
        (e["name"], e["valid"]) for e in listing["archives"]]
    assert "'instance' is missing" in listing["archives"][1]["error"]
    rc = main(["--config", str(node["conf"]), "backup", "list"])
    out = capsys.readouterr().out
    assert 0 == rc and "b-bad" in out and "broken" in out and "c-good" in out


@pytest.mark.parametrize("fmt", ["native", "ganeti", "stream"])
def test_disk_index_5_into_a_2_disk_instance_is_a_usage_error(ctx, node, tmp_path, capsys, fmt):
    """An export of disk 5 only, imported into 2 disks: exit 3 naming the disk, nothing written."""
    imgs = source_images(tmp_path)
    five = make_instance("five.example.com", imgs[1:] * 6)
    five = five.replace(disks=tuple(dataclasses.replace(d, path=None) if i != 5 else d
                                    for i, d in enumerate(five.disks)))
    targets = Targets(tmp_path)
    if fmt == "stream":
        stream = tmp_path / "five.gvs"
        with open(stream, "wb") as f, \
                wire.WireWriter(f.fileno(), five, chunk_size=CHUNK, hash_algo="xxh3-128",
                                disks=[5]) as ww, \
                Engine(workers=1, chunk_size=CHUNK) as eng:
            fd = os.open(imgs[1], os.O_RDONLY)
            eng.encode(fd, ww.disk_sink(5), source_kind="file")
            os.close(fd)
        run = run_cli(node["conf"], "import", "--name", "dst", "--disk", str(targets.paths[0]),
                      "--disk", str(targets.paths[1]), "--raw", "-", stdin=stream)
        rc, err = run.rc, run.err
    else:
        with archive.ArchiveWriter(str(tmp_path / "exports"), five, chunk_size=CHUNK,
                                   format=fmt) as aw, \
                Engine(workers=1, chunk_size=CHUNK) as eng:
            fd = os.open(imgs[1], os.O_RDONLY)
            eng.encode(fd, aw.disk_sink(5), source_kind="file")
            os.close(fd)
        rc, err = run_main(capsys, node["conf"], "import", "--name", "dst", "--disk",
                           str(targets.paths[0]), "--disk", str(targets.paths[1]), "--raw",
                           aw.path)
    assert 3 == rc and "the export has 1 disk (5), instance 'dst' has 2" in err, err
    assert "Traceback" not in err
    assert targets.untouched()


def test_index_file_shorter_than_its_header_is_an_integrity_error(ctx, node, tmp_path, capsys):
    """A 5-byte index (checksum updated) is exit 17 naming the index, not a struct.error."""
    path = export_archive(ctx, tmp_path)
    m = manifest(path)
    (path / m["disks"][0]["index_file"]).write_bytes(b"GVIDX")
    m["disks"][0]["index_sha256"] = hashlib.sha256(b"GVIDX").hexdigest()
    write_manifest(path, m)
    rc, err = run_main(capsys, node["conf"], "backup", "verify", str(path))
    assert 17 == rc and "has 5 bytes" in err and m["disks"][0]["index_file"] in err


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_raw_export_of_a_disk_that_is_a_directory_or_fifo_is_a_device_error(
    node, tmp_path, capsys, kind
):
    """export --raw of a directory (or FIFO) disk: exit 7 naming it, nothing published."""
    disk = tmp_path / "disk"
    if kind == "directory":
        disk.mkdir()
    else:
        os.mkfifo(disk)
    rc, err = run_main(capsys, node["conf"], "export", "--name", "d", "--disk",
                       f"{disk},size=1M", "--raw")
    assert 7 == rc and f"'{disk}' is not a regular file or block device" in err
    assert [] == os.listdir(node["export"])


def test_archive_directory_swapped_while_being_read_is_refused(ctx, tmp_path):
    """An archive reached through a symlink that is repointed after opening: nothing is read."""
    path = export_archive(ctx, tmp_path)
    other = tmp_path / "other"
    shutil.copytree(path, other)
    link = tmp_path / "link"
    link.symlink_to(path)
    arc = archive.open_archive(str(link))
    link.unlink()
    link.symlink_to(other)  # same names, another directory (it could be /etc)
    with pytest.raises(E.ArchiveError, match="was replaced by another directory"):
        list(arc.disk(0).chunks())


def test_exporter_abort_reason_cannot_write_control_characters_to_the_terminal(node, tmp_path):
    """An ABORT record's text is printed escaped: no terminal escape or forged line passes."""
    path = tmp_path / "abort.gvs"
    inst = make_instance("forged.example.com", ["/dev/null"], [CHUNK])
    with open(path, "wb") as f:
        ww = wire.WireWriter(f.fileno(), inst, chunk_size=CHUNK, hash_algo="xxh3-128")
        ww.abort(RuntimeError("\x1b[2J\x1b[31mall good\nganeti-vol: import ok"))
    target = tmp_path / "t.img"
    target.write_bytes(bytes(MIB))
    run = run_cli(node["conf"], "import", "--name", "t", "--disk", str(target), "--raw", "-",
                  stdin=path)
    assert 12 == run.rc and "the exporter aborted" in run.err, run.err
    assert "\x1b" not in run.err and "\nganeti-vol: import ok" not in run.err
