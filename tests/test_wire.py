"""The single export stream (export -o - | import -): round trips through real pipes and
processes, and every kind of truncation or corruption is detected."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from test_streams import CHUNK, MIB, engine, make_image, no_leaks  # noqa: F401 (fixture)

from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import Cancel
from ganeti_vol.core.model import Disk, Instance
from ganeti_vol.engine.parallel import Engine
from ganeti_vol.engine.targets import NullTarget, RawTarget
from ganeti_vol.formats import wire

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture
def images(tmp_path):
    return [make_image(tmp_path / "d0.img", 2 * MIB + 333, seed=5),
            make_image(tmp_path / "d1.img", MIB, seed=6)]


def make_instance(images) -> Instance:
    disks = tuple(Disk(path=str(p), size_mib=3, uuid=f"00000000-0000-4000-8000-00000000000{i}")
                  for i, p in enumerate(images))
    return Instance(name="web1", os="debootstrap+default", uuid="u", ctime=1.0, mtime=1.0,
                    disks=disks, osparams_private={"root_password": "HUSH-7"})


def write_stream(engine, fd: int, images, **kw) -> None:
    """Export every image, one disk after the other, into ``fd`` as one stream."""
    with wire.WireWriter(fd, make_instance(images), chunk_size=engine.chunk_size,
                         hash_algo=engine.hash_algo, **kw) as ww:
        for i, img in enumerate(images):
            src = os.open(img, os.O_RDONLY)
            try:
                engine.encode(src, ww.disk_sink(i), source_kind="file")
            finally:
                os.close(src)


def stream_file(engine, tmp_path, images, **kw) -> Path:
    path = tmp_path / "stream.gvs"
    with open(path, "wb") as f:
        write_stream(engine, f.fileno(), images, **kw)
    return path


def read_stream(engine, fd: int, tmp_path, cancel=None) -> dict[int, bytes]:
    """Import every disk of the stream on ``fd`` into files; their contents by index."""
    out = {}
    reader = wire.WireReader(fd, cancel=cancel)
    for disk in reader.disks():
        path = tmp_path / f"out{disk.index}"
        path.write_bytes(b"")
        os.truncate(path, disk.disk_size)
        engine.decode(disk, RawTarget(str(path), known_zero=True), cancel=cancel)
        out[disk.index] = path.read_bytes()[: disk.size]
    assert reader.trailer is not None
    return out


def read_bytes(engine, data: bytes, tmp_path) -> None:
    """Decode a whole stream given as bytes (verification only)."""
    path = tmp_path / "mangled.gvs"
    path.write_bytes(data)
    with open(path, "rb") as f, wire.WireReader(f.fileno()) as reader:
        for disk in reader.disks():
            engine.decode(disk, NullTarget())


def test_stream_round_trip_through_a_relay_process(tmp_path, images):
    """exporter | cat | importer (like ssh in between) restores every disk exactly."""
    with no_leaks(), Engine(workers=2, chunk_size=CHUNK) as engine:
        relay = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        writer = threading.Thread(target=lambda: (write_stream(engine, relay.stdin.fileno(), images),
                                                  relay.stdin.close()))
        writer.start()
        try:
            got = read_stream(engine, relay.stdout.fileno(), tmp_path)
        finally:
            writer.join()
            relay.stdout.close()
            relay.wait()
    assert {i: img.read_bytes() for i, img in enumerate(images)} == got


def test_stream_header_carries_the_instance_but_no_private_values(engine, tmp_path, images):
    """The header holds config.ini and metadata; private parameter values never travel."""
    path = stream_file(engine, tmp_path, images)
    assert b"HUSH-7" not in path.read_bytes()
    with open(path, "rb") as f, wire.WireReader(f.fileno()) as reader:
        assert "web1" == reader.instance.name
        assert [0, 1] == reader.announced
        assert ["root_password"] == reader.header["osparams_private_omitted"]
        assert "[export]\nversion = 0" in reader.config_ini


def test_zero_chunks_travel_without_a_frame(engine, tmp_path):
    """A mostly empty disk makes a tiny stream: zero chunks are only a record header."""
    img = make_image(tmp_path / "z.img", 8 * MIB, [(0, 100, "text")])
    path = stream_file(engine, tmp_path, [img])
    assert path.stat().st_size < 8 * MIB // 1000


@pytest.mark.parametrize("where", ["preamble", "header", "first-chunk", "mid-frame",
                                   "before-disk-end", "between-disks", "before-trailer",
                                   "last-byte"])
def test_truncated_stream_is_detected(engine, tmp_path, images, where):
    """A stream cut anywhere fails; it never imports as a shorter or fewer-disk export."""
    data = stream_file(engine, tmp_path, images).read_bytes()
    offsets = record_offsets(data)
    cut = {
        "preamble": 5,
        "header": offsets[1] - 10,
        "first-chunk": offsets[2] + 3,
        "mid-frame": offsets[3] + 200,
        "before-disk-end": offsets[type_index(data, wire.DISK_END, 0)],
        "between-disks": offsets[type_index(data, wire.DISK_BEGIN, 1)],
        "before-trailer": offsets[-1],
        "last-byte": len(data) - 1,
    }[where]
    with pytest.raises(E.StreamError, match="truncated"):
        read_bytes(engine, data[:cut], tmp_path)


@pytest.mark.parametrize("where", ["preamble", "record-header", "chunk-hash", "frame",
                                   "json-payload", "trailer"])
def test_flipped_byte_anywhere_is_detected(engine, tmp_path, images, where):
    """One flipped bit in any part of the stream makes the import fail."""
    data = bytearray(stream_file(engine, tmp_path, images).read_bytes())
    offsets = record_offsets(bytes(data))
    first_data = next(o for o in offsets[2:] if record_type(data, o) == wire.CHUNK
                      and not data[o + 3] & wire.FLAG_ZERO)
    pos = {
        "preamble": 2,
        "record-header": offsets[2] + 4,
        "chunk-hash": first_data + 20 + 16 + 3,
        "frame": first_data + 20 + 16 + 16 + 4 + 100,
        "json-payload": offsets[1] + 24 + 5,
        "trailer": offsets[-1] + 24 + 3,
    }[where]
    data[pos] ^= 0x10
    with pytest.raises((E.IntegrityError, E.ArchiveError, E.CompressionError)):
        read_bytes(engine, bytes(data), tmp_path)


def test_reordered_records_are_detected(engine, tmp_path, images):
    """Swapping two chunk records is caught by the sequence numbers."""
    data = stream_file(engine, tmp_path, images).read_bytes()
    o = record_offsets(data)
    a, b, c = o[2], o[3], o[4]
    swapped = data[:a] + data[b:c] + data[a:b] + data[c:]
    with pytest.raises(E.IntegrityError, match="lost or reordered"):
        read_bytes(engine, swapped, tmp_path)


def test_data_after_the_trailer_is_detected(engine, tmp_path, images):
    """A stream with extra bytes after its trailer is refused."""
    data = stream_file(engine, tmp_path, images).read_bytes()
    with pytest.raises(E.IntegrityError, match="data after the trailer"):
        read_bytes(engine, data + b"x", tmp_path)


def test_exporter_failure_is_reported_in_band(engine, tmp_path, images):
    """An exporter that fails mid-stream sends an ABORT record; the importer shows why."""
    path = tmp_path / "aborted.gvs"
    with open(path, "wb") as f, pytest.raises(E.ShortTransfer):
        with wire.WireWriter(f.fileno(), make_instance(images), chunk_size=CHUNK,
                             hash_algo="xxh3-128") as ww:
            src = os.open(images[0], os.O_RDONLY)
            try:
                engine.encode(src, ww.disk_sink(0), source_kind="file", expected_size=1)
            finally:
                os.close(src)
    with pytest.raises(E.StreamError, match="the exporter aborted: cannot export disk"):
        read_bytes(engine, path.read_bytes(), tmp_path)


def test_stream_must_send_every_announced_disk(engine, tmp_path, images):
    """Closing a stream before all announced disks were sent is an error, no trailer."""
    path = tmp_path / "short.gvs"
    with open(path, "wb") as f, pytest.raises(E.StreamError, match="announced"):
        with wire.WireWriter(f.fileno(), make_instance(images), chunk_size=CHUNK,
                             hash_algo="xxh3-128") as ww:
            src = os.open(images[0], os.O_RDONLY)
            engine.encode(src, ww.disk_sink(0), source_kind="file")
            os.close(src)
    with pytest.raises(E.StreamError, match="truncated"):
        read_bytes(engine, path.read_bytes(), tmp_path)


def test_disks_go_one_at_a_time_in_the_announced_order(engine, tmp_path, images):
    """Disks are sequential in a stream: a second open disk or a wrong order is refused."""
    with open(tmp_path / "s", "wb") as f:
        ww = wire.WireWriter(f.fileno(), make_instance(images), chunk_size=CHUNK,
                             hash_algo="xxh3-128")
        with pytest.raises(E.ProgrammerError, match="expects disk 0 next"):
            ww.disk_sink(1)
        ww.disk_sink(0)
        with pytest.raises(E.ProgrammerError, match="still open"):
            ww.disk_sink(1)


def test_newer_stream_version_needs_a_newer_reader(engine, tmp_path, images):
    """A stream header with a higher format version is an ArchiveFormatError."""
    data = stream_file(engine, tmp_path, images, extra={"format_version": 2}).read_bytes()
    with pytest.raises(E.ArchiveFormatError, match="format version 2 is newer"):
        read_bytes(engine, data, tmp_path)


def test_unknown_mandatory_stream_feature_is_refused(engine, tmp_path, images):
    """A stream needing an unknown feature is refused, naming it."""
    data = stream_file(engine, tmp_path, images,
                       extra={"mandatory_features": ["record-crc32", "resume"]}).read_bytes()
    with pytest.raises(E.ArchiveFormatError, match="needs feature.s. resume"):
        read_bytes(engine, data, tmp_path)


def test_garbage_is_not_a_stream(engine, tmp_path):
    """Random bytes on stdin are 'not a ganeti-vol stream'."""
    with pytest.raises(E.ArchiveError, match="not a ganeti-vol stream"):
        read_bytes(engine, b"#!/bin/sh\necho hello\n" * 10, tmp_path)


def test_import_waiting_on_a_silent_exporter_can_be_cancelled(engine, tmp_path):
    """A reader blocked on an empty pipe stops promptly on cancel, leaving no fd behind."""
    with no_leaks():
        proc = subprocess.Popen(["sleep", "30"], stdout=subprocess.PIPE)
        cancel = Cancel()
        timer = threading.Timer(0.3, cancel.abort,
                                [E.StallError(what="import", seconds=0.3, done=0)])
        timer.start()
        t0 = time.monotonic()
        try:
            with pytest.raises(E.StallError):
                read_stream(engine, proc.stdout.fileno(), tmp_path, cancel=cancel)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            timer.join()
        assert time.monotonic() - t0 < 3


def test_golden_streams_still_decode():
    """Every released stream format stays readable (tests/data/archive-v*/)."""
    for fixture in sorted(DATA.glob("archive-v*")):
        expected = json.loads((fixture / "expected.json").read_text())
        with Engine(workers=2, chunk_size=64 << 10) as eng, \
                open(fixture / expected["stream"], "rb") as f, \
                wire.WireReader(f.fileno()) as reader:
            for disk, want in zip(reader.disks(), expected["disks"], strict=True):
                digest = hashlib.sha256()

                class Hasher(NullTarget):
                    def write(self, offset, data):
                        digest.update(data)

                    def write_zero(self, offset, length):
                        digest.update(bytes(length))

                eng.decode(disk, Hasher())
                assert want["sha256"] == digest.hexdigest(), fixture.name


# --- helpers that walk a stream's records (test-only, independent of the reader) ------


def record_offsets(data: bytes) -> list[int]:
    """Start offset of every record in a complete stream."""
    pos, out, hlen = len(wire.PREAMBLE), [], None
    while pos < len(data):
        out.append(pos)
        _, rtype, _, plen, _, _ = struct.unpack_from("<2sBBIQI", data, pos)
        ext = 16 + hlen if rtype == wire.CHUNK else 0
        if rtype == wire.HEADER:
            payload = data[pos + 24:pos + 24 + plen]
            hlen = {"xxh3-128": 16, "sha256": 32}[json.loads(payload)["hash"]]
        pos += 20 + ext + 4 + plen
    return out


def record_type(data, offset: int) -> int:
    return data[offset + 2]


def type_index(data: bytes, rtype: int, nth: int) -> int:
    """Index (in record_offsets) of the nth record of a type."""
    found = [i for i, o in enumerate(record_offsets(data)) if record_type(data, o) == rtype]
    return found[nth]
