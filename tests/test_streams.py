"""The streaming engine: real pipes, real subprocesses, real sparse files and loop devices."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import Cancel, PipeWriter, ReadAhead, enlarge_pipe, reopen_nonblocking
from ganeti_vol.core.holes import data_runs, extents, read_data
from ganeti_vol.engine import codec, hashing
from ganeti_vol.engine.chunks import Chunk
from ganeti_vol.engine.parallel import Engine
from ganeti_vol.engine.sources import RandomAccessReader
from ganeti_vol.engine.targets import NullTarget, RawTarget, StreamTarget
from ganeti_vol.engine.writers import AppendWriter

KIB, MIB = 1 << 10, 1 << 20
CHUNK = 256 * KIB

# --- helpers shared with the archive, wire and backup tests ---------------------------


def make_image(path: Path, size: int, extents=None, seed: int = 7) -> Path:
    """A sparse image: ``extents`` = [(offset, length, "text"|"random"|"zero")]; rest holes.

    "zero" extents are written zeros (allocated, not holes).  Default: a mix
    with holes, text, random data and written zeros, and a short tail.
    """
    rng = random.Random(seed)
    if extents is None:
        extents = [
            (0, 100 * KIB, "text"),
            (300 * KIB, 500 * KIB, "random"),
            (1 * MIB, 300 * KIB, "zero"),
            (2 * MIB + 5, 700 * KIB, "text"),
            (size - 50 * KIB, 50 * KIB, "random"),
        ]
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length, kind in extents:
            if off >= size:
                continue
            length = min(length, size - off)
            f.seek(off)
            if kind == "random":
                f.write(rng.randbytes(length))
            elif kind == "zero":
                f.write(bytes(length))
            else:
                line = b"Nov 25 12:00:00 node1 kernel: [ 1.234] block drbd0: resync done\n"
                f.write((line * (length // len(line) + 1))[:length])
    return path


class ListSink:
    """Keeps the encoded chunks in memory (copies raw data: buffers are recycled)."""

    def __init__(self, compress: bool = True, want_crc: bool = False) -> None:
        self.compress, self.want_crc = compress, want_crc
        self.chunks: list[Chunk] = []
        self.summary = None
        self.aborted = None

    def begin(self, info):
        self.info = info

    def write_chunk(self, chunk):
        if chunk.data is not None:
            chunk.data = bytes(chunk.data)
        self.chunks.append(chunk)

    def finish(self, summary):
        self.summary = summary

    def abort(self, error):
        self.aborted = error


class ListSource:
    """Feeds chunks kept by a ListSink back to the engine."""

    def __init__(self, sink: ListSink, chunks=None, what: str = "disk 0 of 'test'") -> None:
        self.what = what
        self.chunk_size = sink.info.chunk_size
        self.hash_algo = sink.info.hash_algo
        self.size = sink.summary.size
        self.disk_size = None
        self.expected_digest = sink.summary.digest
        self._chunks = list(sink.chunks if chunks is None else chunks)

    def chunks(self):
        return iter(self._chunks)

    def finish(self, summary):
        if summary.digest != self.expected_digest:
            raise E.IntegrityError(f"cannot read {self.what}: digest mismatch")


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def thread_count() -> int:
    """Threads, without the engine's own pool: it lives as long as the engine and starts
    its (at most ``workers``) threads lazily, so a busy machine may start one more later."""
    return sum(not t.name.startswith("ganeti-vol-lz4") for t in threading.enumerate())


@contextlib.contextmanager
def no_leaks():
    """Assert that the block leaves no fd and no thread behind."""
    fds, threads = fd_count(), thread_count()
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (fd_count(), thread_count()) != (fds, threads):
        time.sleep(0.05)
    assert (fds, threads) == (fd_count(), thread_count())


@pytest.fixture
def engine():
    with Engine(workers=2, chunk_size=CHUNK) as eng:
        yield eng


def encode_pipe(engine, path: Path, sink, **kw):
    """Export ``path`` through a real `cat` process and a pipe."""
    proc = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    try:
        return engine.encode(proc.stdout.fileno(), sink, source_kind="pipe", **kw)
    finally:
        proc.stdout.close()
        proc.wait()


def encode_file(engine, path: Path, sink, **kw):
    fd = os.open(path, os.O_RDONLY)
    try:
        return engine.encode(fd, sink, source_kind="file", **kw)
    finally:
        os.close(fd)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# --- export side -----------------------------------------------------------------------


def test_pipe_export_and_raw_import_round_trip_exactly(engine, tmp_path):
    """Bytes from a script's pipe come back identical, through compressed chunks."""
    img = make_image(tmp_path / "a.img", 3 * MIB + 12345)
    sink = ListSink()
    summary = encode_pipe(engine, img, sink)
    assert summary.size == img.stat().st_size
    assert summary.chunks == -(-summary.size // CHUNK)
    assert sink.summary is summary and sink.aborted is None
    out = tmp_path / "out.img"
    out.write_bytes(b"")
    os.truncate(out, summary.size)
    result = engine.decode(ListSource(sink), RawTarget(str(out), known_zero=True))
    assert img.read_bytes() == out.read_bytes()
    assert result.digest == summary.digest and result.read_back


def test_zero_chunks_are_detected_by_content_and_cost_one_cached_frame(engine, tmp_path):
    """Holes and written zeros read through a pipe become zero chunks with the zero frame."""
    img = make_image(tmp_path / "a.img", 4 * MIB)
    sink = ListSink()
    summary = encode_pipe(engine, img, sink)
    data = img.read_bytes()
    expected_zero = [c for c in range(16) if not any(data[c * CHUNK:(c + 1) * CHUNK])]
    assert expected_zero == [c.index for c in sink.chunks if c.zero]
    assert summary.zero_chunks == len(expected_zero)
    for c in sink.chunks:
        if c.zero:
            assert c.frame is codec.zero_frame(CHUNK)
            assert c.hash == hashing.zero_hash("xxh3-128", CHUNK)


def test_pipe_zero_test_sees_one_byte_in_any_piece_of_a_chunk(engine, tmp_path):
    """The pipe reader tests each piece as it arrives: a lone byte in a late or early piece
    of a chunk makes it a data chunk, and the pieces of an all-zero chunk add up to zero."""
    piece = 32 * KIB  # each chunk arrives in 8 separate writes, so in several reads
    chunks = [bytearray(CHUNK) for _ in range(4)]
    chunks[0][-1] = 1  # the last byte of the last piece
    chunks[2][0] = 7  # the first byte of the first piece
    data = b"".join(chunks)
    writer = (
        "import os, sys, time\n"
        f"data = open({str(tmp_path / 'src')!r}, 'rb').read()\n"
        f"for i in range(0, len(data), {piece}):\n"
        f"    os.write(1, data[i:i + {piece}])\n"
        "    time.sleep(0.002)\n"
    )
    (tmp_path / "src").write_bytes(data)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE)
    sink = ListSink()
    try:
        summary = engine.encode(proc.stdout.fileno(), sink, source_kind="pipe")
    finally:
        proc.stdout.close()
        assert proc.wait() == 0
    assert [c.zero for c in sink.chunks] == [False, True, False, True]
    assert summary.zero_chunks == 2 and summary.size == len(data)
    out = tmp_path / "out.img"
    out.write_bytes(b"")
    os.truncate(out, len(data))
    engine.decode(ListSource(sink), RawTarget(str(out), known_zero=True))
    assert out.read_bytes() == data


def test_file_export_skips_holes_without_reading_and_matches_the_pipe_export(engine, tmp_path):
    """SEEK_DATA hole skipping gives the same chunks and digest as reading everything."""
    img = make_image(tmp_path / "a.img", 4 * MIB)
    piped, filed = ListSink(), ListSink()
    s1 = encode_pipe(engine, img, piped)
    s2 = encode_file(engine, img, filed)
    assert s1.digest == s2.digest
    assert s2.hole_bytes > 0 and s1.hole_bytes == 0
    assert [c.hash for c in piped.chunks] == [c.hash for c in filed.chunks]
    assert [c.zero for c in piped.chunks] == [c.zero for c in filed.chunks]
    for p, f in zip(piped.chunks, filed.chunks):
        assert codec.decode(f.frame, f.length, "filed") == codec.decode(p.frame, p.length, "piped")


def test_partly_sparse_chunks_never_leak_stale_buffer_bytes_into_their_holes(engine, tmp_path):
    """Holes inside a chunk are not read: the recycled buffer's old bytes must not show."""
    extents = [(c * CHUNK, CHUNK, "random") for c in range(8)]  # fill every buffer with junk
    for c in range(8, 24):  # then chunks that are partly holes, at odd places
        extents.append((c * CHUNK + (c % 5) * 8 * KIB, 4 * KIB * (1 + c % 7), "random"))
        extents.append((c * CHUNK + CHUNK // 2 + 4 * KIB * (c % 3), 12 * KIB, "text"))
    img = make_image(tmp_path / "a.img", 24 * CHUNK + 5000, extents)
    sink = ListSink()
    summary = encode_file(engine, img, sink)
    dump = tmp_path / "dump.lz4"
    dump.write_bytes(b"".join(c.frame for c in sink.chunks))
    subprocess.run(["lz4", "-d", "-q", "-f", str(dump), str(tmp_path / "raw")], check=True)
    assert (tmp_path / "raw").read_bytes() == img.read_bytes()
    assert summary.digest == encode_pipe(engine, img, ListSink()).digest
    # every byte not allocated is counted as a hole, the partial ones included
    assert summary.hole_bytes >= summary.size - allocated(img)
    assert summary.hole_bytes > (24 - 8 - 1) * CHUNK // 2


def test_data_runs_follow_seek_data_and_a_fragmented_chunk_is_read_whole(tmp_path):
    """The reader splits a chunk at its extents, but not into more than MAX_RUNS pieces."""
    img = make_image(tmp_path / "a.img", 2 * CHUNK, [(8 * KIB, 8 * KIB, "text"),
                                                     (64 * KIB, 4 * KIB, "random")]
                     + [(CHUNK + i * 8 * KIB, 4 * KIB, "text") for i in range(30)])
    fd = os.open(img, os.O_RDONLY)
    try:
        reader = RandomAccessReader(fd, "img", "file", False, sparse_runs=True)
        buf = bytearray(CHUNK)
        n, hole, runs, _ = reader.read_chunk(buf, 0, CHUNK)
        assert (n, hole, runs) == (CHUNK, False, [(8 * KIB, 16 * KIB), (64 * KIB, 68 * KIB)])
        n, hole, runs, _ = reader.read_chunk(buf, CHUNK, CHUNK)
        assert (n, hole, runs) == (CHUNK, False, None)  # 30 runs: read whole
        assert bytes(buf) == img.read_bytes()[CHUNK:]
    finally:
        os.close(fd)


def _resident(path: Path) -> int:
    out = subprocess.run(["fincore", "-b", "-n", "-o", "RES", str(path)], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.split()[0])


#: the page-cache tests count a file's cached pages with fincore
needs_fincore = pytest.mark.skipif(
    not shutil.which("fincore"),
    reason="needs fincore (util-linux) to count the pages of a file in the page cache",
)


@contextlib.contextmanager
def cold_fd(path: Path):
    """A read-only fd on ``path`` once none of its pages is in the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert _resident(path) == 0
        yield fd
    finally:
        os.close(fd)


def wait_resident(path: Path, want: int, timeout: float = 5.0) -> int:
    """The bytes of ``path`` in the page cache once ``want`` are there (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while _resident(path) < want and time.monotonic() < deadline:
        time.sleep(0.02)
    return _resident(path)


@needs_fincore
def test_read_ahead_brings_the_next_window_of_a_dump_into_the_cache_and_no_further(tmp_path):
    """An archive dump read frame by frame has its next 32 MiB read ahead, not the whole file."""
    dump = tmp_path / "d.lz4"
    dump.write_bytes(os.urandom(64 * MIB))
    with cold_fd(dump) as fd:
        ahead = ReadAhead(fd, window=32 * MIB)
        ahead.reached(1 * MIB)  # the first frame: [1, 33) MiB announced
        assert 32 * MIB <= wait_resident(dump, 32 * MIB) < 40 * MIB
        ahead.reached(2 * MIB)  # still inside the first half: nothing new announced
        assert ahead.announced == 33 * MIB
        ahead.reached(20 * MIB)  # past half the window: the next piece up to 52 MiB
        assert ahead.announced == 52 * MIB


@needs_fincore
def test_reader_prefetches_all_of_a_data_extent_larger_than_one_device_request(tmp_path):
    """One WILLNEED reads at most the device's largest request (8 MiB here): a 20 MiB
    extent inside the window is announced in pieces and comes into the cache whole."""
    img = make_image(tmp_path / "a.img", 64 * MIB, [(1 * MIB, 20 * MIB, "random")])
    with cold_fd(img) as fd:
        reader = RandomAccessReader(fd, "img", "file", False, sparse_runs=True)
        assert reader.read_chunk(bytearray(CHUNK), 0, CHUNK) == (CHUNK, True, None, None)
        assert wait_resident(img, 20 * MIB) == 20 * MIB


@needs_fincore
def test_reader_prefetches_the_data_extents_ahead_and_never_the_holes(tmp_path):
    """Cold sparse files: data extents in the window are read ahead; holes get no pages."""
    # the second extent lies beyond the 32 MiB window
    img = make_image(tmp_path / "a.img", 64 * MIB,
                     [(1 * MIB, 3 * MIB, "random"), (40 * MIB, 1 * MIB, "random")])
    with cold_fd(img) as fd:
        reader = RandomAccessReader(fd, "img", "file", False, sparse_runs=True)
        assert reader.read_chunk(bytearray(CHUNK), 0, CHUNK) == (CHUNK, True, None, None)  # a hole
        assert wait_resident(img, 3 * MIB) == 3 * MIB


@needs_fincore
def test_read_data_reads_only_the_data_extents_of_a_range_and_gives_zeros_for_its_holes(
        tmp_path):
    """What --into-existing and move hash: the bytes of a range; its holes get no pages."""
    size = 8 * MIB + 5000
    img = make_image(tmp_path / "a.img", size, [(1 * MIB + 4 * KIB, 64 * KIB, "random"),
                                                 (2 * MIB - 8 * KIB, 16 * KIB, "text"),
                                                 (size - 904, 904, "random")])
    content = img.read_bytes()
    with cold_fd(img) as fd:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead: count our reads only
        assert list(extents(fd, 6 * MIB, 4 * MIB)) == [(4 * MIB, 6 * MIB, False)]
        assert read_data(fd, 4 * MIB, 2 * MIB, sparse=True) is None  # one hole: nothing read
        assert read_data(fd, 1 * MIB, 2 * MIB, sparse=True) == content[1 * MIB:3 * MIB]
        assert _resident(img) == 64 * KIB + 16 * KIB  # the two data extents, not the holes
        tail = read_data(fd, 8 * MIB, 1 * MIB, sparse=True)  # the file ends inside the range
        assert tail == content[8 * MIB:] and len(tail) == 5000
    with open(img, "rb") as f:  # not sparse (a block device): every byte is read
        assert read_data(f.fileno(), 4 * MIB, MIB, sparse=False) == bytes(MIB)


def test_file_export_with_verify_holes_reads_holes_too(engine, tmp_path):
    """Paranoid mode reads hole chunks and checks them: same result, nothing skipped."""
    img = make_image(tmp_path / "a.img", 4 * MIB)
    sink = ListSink()
    summary = encode_file(engine, img, sink, verify_holes=True)
    assert summary.digest == encode_pipe(engine, img, ListSink()).digest
    assert summary.zero_chunks > 0


def test_file_export_fails_when_the_source_changes_while_read(engine, tmp_path):
    """Hole maps are hints: a source that changes during export is an error, not a dump."""
    img = make_image(tmp_path / "a.img", 2 * MIB)

    class GrowingSink(ListSink):
        def write_chunk(self, chunk):
            super().write_chunk(chunk)
            if chunk.index == 0:
                with open(img, "ab") as f:
                    f.write(b"written by a running instance")

    sink = GrowingSink()
    with pytest.raises(E.StreamError, match="source file changed while it was read"):
        encode_file(engine, img, sink, what="disk 0 of 'web1'")
    assert isinstance(sink.aborted, E.StreamError) and sink.summary is None


def test_short_last_chunk_round_trips_and_lz4_cli_decodes_the_frames(engine, tmp_path):
    """A disk that is not a multiple of the chunk size keeps its exact length."""
    img = make_image(tmp_path / "a.img", CHUNK * 3 + 1000,
                     [(0, 10, "text"), (CHUNK * 3, 1000, "random")])
    sink = ListSink()
    encode_pipe(engine, img, sink)
    dump = tmp_path / "dump.lz4"
    dump.write_bytes(b"".join(c.frame for c in sink.chunks))
    subprocess.run(["lz4", "-d", "-q", "-f", str(dump), str(tmp_path / "raw")], check=True)
    assert img.read_bytes() == (tmp_path / "raw").read_bytes()


def test_raw_sink_gets_uncompressed_data(engine, tmp_path):
    """A sink with compress=False receives raw bytes and no frames."""
    img = make_image(tmp_path / "a.img", MIB)
    sink = ListSink(compress=False)
    summary = encode_pipe(engine, img, sink)
    assert summary.compression is None
    assert all(c.frame is None for c in sink.chunks)
    assert img.read_bytes() == b"".join(bytes(c.data) for c in sink.chunks)


def test_want_crc_gives_the_crc32_of_every_frame(engine, tmp_path):
    """The wire sink's per-record crc is computed by the workers."""
    import zlib

    img = make_image(tmp_path / "a.img", MIB)
    sink = ListSink(want_crc=True)
    encode_pipe(engine, img, sink)
    assert all(c.crc == zlib.crc32(c.frame) for c in sink.chunks)


def test_sha256_chunk_hash_is_used_when_configured(tmp_path):
    """The engine hashes with the configured algorithm."""
    img = make_image(tmp_path / "a.img", MIB)
    with Engine(workers=1, chunk_size=CHUNK, hash_algo="sha256") as eng:
        sink = ListSink()
        encode_pipe(eng, img, sink)
    data = img.read_bytes()
    assert sink.chunks[0].hash == hashing.chunk_hash("sha256", data[:CHUNK])


def test_empty_export_is_a_short_transfer(engine, tmp_path):
    """An export script that prints nothing fails with a named error."""
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    sink = ListSink()
    with pytest.raises(E.ShortTransfer, match="cannot export disk 1 of 'web1': the export"):
        encode_pipe(engine, empty, sink, what="disk 1 of 'web1'")
    assert sink.aborted is not None


def test_dump_shorter_than_announced_is_a_short_transfer(engine, tmp_path):
    """Less data than announced on EXP_SIZE_FD fails, and the sink is aborted."""
    img = make_image(tmp_path / "a.img", MIB)
    sink = ListSink()
    with pytest.raises(E.ShortTransfer, match=f"expected {2 * MIB} bytes, got {MIB}"):
        encode_pipe(engine, img, sink, size_hint=lambda: 2 * MIB)
    assert sink.summary is None and sink.aborted is not None


def test_dump_of_the_announced_size_passes_and_records_the_hint(engine, tmp_path):
    """The announced size is kept in the summary."""
    img = make_image(tmp_path / "a.img", MIB)
    summary = encode_pipe(engine, img, ListSink(), size_hint=lambda: MIB)
    assert MIB == summary.size_hint


def test_export_script_killed_mid_stream_gives_a_short_transfer(engine, tmp_path):
    """A script killed after part of its output cannot pass as a complete export."""
    script = tmp_path / "export.sh"
    script.write_text("#!/bin/sh\nhead -c 600000 /dev/urandom\nkill -9 $$\n")
    script.chmod(0o755)
    proc = subprocess.Popen([str(script)], stdout=subprocess.PIPE)
    try:
        with pytest.raises(E.ShortTransfer, match="got 600000"):
            engine.encode(proc.stdout.fileno(), ListSink(), size_hint=lambda: MIB)
    finally:
        proc.stdout.close()
        proc.wait()
    assert proc.returncode == -9


def test_parallel_disks_share_one_engine(engine, tmp_path):
    """Several disks encoded from several threads at once all come out right."""
    imgs = [make_image(tmp_path / f"d{i}.img", 2 * MIB + i * 1000, seed=i) for i in range(4)]
    results = {}

    def run(i):
        results[i] = encode_pipe(engine, imgs[i], ListSink()).digest

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, img in enumerate(imgs):
        assert results[i] == encode_file(engine, img, ListSink()).digest


# --- cancellation ----------------------------------------------------------------------


def test_cancel_stops_an_export_waiting_on_a_silent_script(tmp_path):
    """A stalled source is aborted promptly with the watchdog's error; no fd or thread leaks."""
    with no_leaks():
        with Engine(workers=2, chunk_size=CHUNK) as eng:
            proc = subprocess.Popen(["sleep", "30"], stdout=subprocess.PIPE)
            cancel = Cancel()
            timer = threading.Timer(0.3, cancel.abort,
                                    [E.StallError(what="export", seconds=0.3, done=0)])
            timer.start()
            sink = ListSink()
            t0 = time.monotonic()
            try:
                with pytest.raises(E.StallError):
                    eng.encode(proc.stdout.fileno(), sink, cancel=cancel)
            finally:
                proc.kill()
                proc.wait()
                proc.stdout.close()
                timer.join()
            assert time.monotonic() - t0 < 3
            assert sink.aborted is not None


def test_cancel_stops_an_import_blocked_on_a_script_that_does_not_read(engine, tmp_path):
    """A writer blocked on a full pipe notices cancellation; the reopened fd is closed."""
    img = make_image(tmp_path / "a.img", 4 * MIB, [(0, 4 * MIB, "random")])
    sink = ListSink()
    encode_file(engine, img, sink)
    with no_leaks():
        proc = subprocess.Popen(["sleep", "30"], stdin=subprocess.PIPE)
        cancel = Cancel()
        timer = threading.Timer(0.3, cancel.abort)
        timer.start()
        try:
            with pytest.raises(E.StreamError, match="cancelled"):
                engine.decode(ListSource(sink), StreamTarget(proc.stdin.fileno()),
                              cancel=cancel)
        finally:
            proc.kill()
            proc.wait()
            proc.stdin.close()
            timer.join()


def test_failed_encode_leaves_no_thread_or_fd_behind(tmp_path):
    """An error in the sink aborts cleanly: no fd, no thread left after the engine closes."""
    img = make_image(tmp_path / "a.img", 4 * MIB)

    class FailingSink(ListSink):
        def write_chunk(self, chunk):
            if chunk.index == 3:
                raise E.NoSpaceError(what="test sink")
            super().write_chunk(chunk)

    with no_leaks():
        with Engine(workers=2, chunk_size=CHUNK) as eng:
            sink = FailingSink()
            with pytest.raises(E.NoSpaceError):
                encode_pipe(eng, img, sink)
            assert isinstance(sink.aborted, E.NoSpaceError)


# --- import side -----------------------------------------------------------------------


def test_stream_target_feeds_every_byte_to_an_import_script(engine, tmp_path):
    """Import through a real script's stdin writes the exact image, zeros included."""
    img = make_image(tmp_path / "a.img", 3 * MIB + 77)
    sink = ListSink()
    encode_file(engine, img, sink)
    out = tmp_path / "out.img"
    proc = subprocess.Popen(["sh", "-c", f"cat > '{out}'"], stdin=subprocess.PIPE)
    try:
        engine.decode(ListSource(sink), StreamTarget(proc.stdin.fileno()))
    finally:
        proc.stdin.close()
        proc.wait()
    assert img.read_bytes() == out.read_bytes()


def test_corrupt_chunk_never_reaches_the_import_script(engine, tmp_path):
    """A chunk whose hash does not match is refused before any of its bytes are written."""
    img = make_image(tmp_path / "a.img", 2 * MIB, [(0, 2 * MIB, "text")])
    sink = ListSink()
    encode_file(engine, img, sink)
    bad = list(sink.chunks)
    victim = bad[5]
    data = bytearray(codec.decode(victim.frame, victim.length, "x"))
    data[100] ^= 1
    bad[5] = Chunk(victim.index, victim.offset, victim.length, False, victim.hash,
                           codec.encode(bytes(data)))
    out = tmp_path / "out.img"
    proc = subprocess.Popen(["sh", "-c", f"cat > '{out}'"], stdin=subprocess.PIPE)
    try:
        with pytest.raises(E.IntegrityError, match=f"at offset {5 * CHUNK}: chunk hash mismatch"):
            engine.decode(ListSource(sink, bad), StreamTarget(proc.stdin.fileno()))
    finally:
        proc.stdin.close()
        proc.wait()
    assert 5 * CHUNK == out.stat().st_size
    assert img.read_bytes()[: 5 * CHUNK] == out.read_bytes()


def test_zero_chunks_are_recognised_without_decompressing(engine, tmp_path, monkeypatch):
    """Only data chunks are decompressed; zero chunks are checked by their frame bytes."""
    img = make_image(tmp_path / "a.img", 4 * MIB)
    sink = ListSink()
    encode_file(engine, img, sink)
    calls = []
    real = codec.decode_into
    monkeypatch.setattr(codec, "decode_into", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    out = tmp_path / "out"
    out.write_bytes(b"")
    os.truncate(out, img.stat().st_size)
    summary = engine.decode(ListSource(sink), RawTarget(str(out), known_zero=True))
    assert summary.zero_chunks > 0
    assert len(calls) == summary.chunks - summary.zero_chunks


def test_zero_flagged_chunk_with_a_foreign_frame_is_corrupt(engine, tmp_path):
    """A chunk flagged zero whose frame is not the zero frame is refused."""
    img = make_image(tmp_path / "a.img", MIB)
    sink = ListSink()
    encode_file(engine, img, sink)
    first = sink.chunks[0]
    forged = [Chunk(0, 0, first.length, True, first.hash, first.frame), *sink.chunks[1:]]
    with pytest.raises(E.IntegrityError, match="zero chunk does not match the zero frame"):
        engine.decode(ListSource(sink, forged), NullTarget())


def test_missing_chunk_is_detected(engine, tmp_path):
    """A dropped chunk cannot shift the rest of the disk silently."""
    img = make_image(tmp_path / "a.img", MIB)
    sink = ListSink()
    encode_file(engine, img, sink)
    with pytest.raises(E.IntegrityError, match="out of order"):
        engine.decode(ListSource(sink, sink.chunks[:1] + sink.chunks[2:]), NullTarget())


def test_raw_target_punches_zero_runs_into_a_dirty_file(engine, tmp_path):
    """A target that is not known to be zero gets its zero runs cleared, holes punched."""
    img = make_image(tmp_path / "a.img", 4 * MIB)
    sink = ListSink()
    encode_file(engine, img, sink)
    out = tmp_path / "out"
    out.write_bytes(os.urandom(4 * MIB))
    summary = engine.decode(ListSource(sink), RawTarget(str(out), known_zero=False))
    assert img.read_bytes() == out.read_bytes()
    assert summary.read_back
    assert allocated(out) < 4 * MIB


def test_raw_target_known_zero_keeps_a_fresh_file_sparse(engine, tmp_path):
    """Zero chunks are skipped on a fresh sparse target: it stays sparse."""
    img = make_image(tmp_path / "a.img", 4 * MIB)
    sink = ListSink()
    encode_file(engine, img, sink)
    out = tmp_path / "out"
    out.write_bytes(b"")
    os.truncate(out, 4 * MIB)
    summary = engine.decode(ListSource(sink), RawTarget(str(out), known_zero=True))
    assert img.read_bytes() == out.read_bytes()
    assert summary.zero_chunks > 0
    assert allocated(out) <= (summary.chunks - summary.zero_chunks) * CHUNK


def test_raw_import_skips_zero_granules_inside_data_chunks(engine, tmp_path):
    """A known-zero target gets only the 64 KiB granules that hold data (like lz4 --sparse)."""
    g = RawTarget.SPARSE_GRANULE
    img = make_image(tmp_path / "a.img", 2 * MIB,
                     [(0, 10, "text"), (3 * g, g, "random"), (CHUNK + 5 * g, 2 * g, "zero"),
                      (CHUNK + 7 * g + 1, 100, "text")])
    sink = ListSink()
    encode_file(engine, img, sink)
    out = tmp_path / "out"
    out.write_bytes(b"")
    os.truncate(out, 2 * MIB)
    engine.decode(ListSource(sink), RawTarget(str(out), known_zero=True))
    assert img.read_bytes() == out.read_bytes()
    data = img.read_bytes()
    granules = sum(1 for a in range(0, len(data), g) if any(data[a:a + g]))
    assert 3 == granules
    assert allocated(out) <= granules * g


def test_data_runs_lists_the_non_zero_granules():
    """Runs of data between zero granules, the last one possibly short; None if no zeros."""
    g = 4
    data = b"ab\0\0" + bytes(4) + bytes(4) + b"\0\0\0x" + b"zz"
    assert [(0, 4), (12, 18)] == data_runs(data, g)
    assert data_runs(b"abcdefgh", g) is None
    assert [(0, 4)] == data_runs(bytearray(data), g, 8)  # a longer, recycled buffer


def test_raw_target_detects_a_file_that_is_one_hole_as_known_zero(engine, tmp_path):
    """An existing, never-written sparse file is treated as zero without being told."""
    img = make_image(tmp_path / "a.img", 4 * MIB)
    sink = ListSink()
    encode_file(engine, img, sink)
    out = tmp_path / "out"
    out.write_bytes(b"")
    os.truncate(out, 4 * MIB)
    target = RawTarget(str(out), known_zero=False)
    engine.decode(ListSource(sink), target)
    assert img.read_bytes() == out.read_bytes()
    assert target.known_zero and target.skipped_bytes > 0
    assert allocated(out) <= allocated(img) + 4 * RawTarget.SPARSE_GRANULE


def test_read_back_catches_a_target_wrongly_declared_zero(engine, tmp_path):
    """If a 'known zero' target holds old data, the read-back reports it broken."""
    img = make_image(tmp_path / "a.img", 2 * MIB)
    sink = ListSink()
    encode_file(engine, img, sink)
    out = tmp_path / "out"
    out.write_bytes(b"\xff" * (2 * MIB))
    with pytest.raises(E.IntegrityError, match="read-back at offset .*broken"):
        engine.decode(ListSource(sink), RawTarget(str(out), known_zero=True))


def test_raw_target_refuses_a_target_smaller_than_the_disk(engine, tmp_path):
    """A too-small target is refused before anything is written."""
    img = make_image(tmp_path / "a.img", 2 * MIB)
    sink = ListSink()
    encode_file(engine, img, sink)
    out = tmp_path / "small"
    out.write_bytes(b"old" * 1000)
    with pytest.raises(E.DeviceError, match="fewer than the disk's"):
        engine.decode(ListSource(sink), RawTarget(str(out)))
    assert b"old" * 1000 == out.read_bytes()


def test_raw_target_never_truncates_a_larger_file(engine, tmp_path):
    """Importing into a bigger file disk keeps its size and its tail."""
    img = make_image(tmp_path / "a.img", MIB)
    sink = ListSink()
    encode_file(engine, img, sink)
    out = tmp_path / "big"
    out.write_bytes(b"T" * (2 * MIB))
    engine.decode(ListSource(sink), RawTarget(str(out)))
    data = out.read_bytes()
    assert 2 * MIB == len(data)
    assert img.read_bytes() == data[:MIB] and b"T" * MIB == data[MIB:]


def test_partially_written_raw_target_is_reported_broken(engine, tmp_path):
    """A failure after the first write names the target as broken, never good."""
    img = make_image(tmp_path / "a.img", 2 * MIB, [(0, 2 * MIB, "random")])
    sink = ListSink()
    encode_file(engine, img, sink)
    bad = list(sink.chunks)
    bad[4] = Chunk(4, 4 * CHUNK, CHUNK, False, bad[4].hash, codec.encode(bytes(CHUNK - 1)
                                                                                 + b"x"))
    out = tmp_path / "out"
    out.write_bytes(bytes(2 * MIB))
    with pytest.raises(E.IntegrityError, match="partial or wrong data and must not be used"):
        engine.decode(ListSource(sink, bad), RawTarget(str(out)))


def test_raw_target_on_a_full_filesystem_is_a_no_space_error(engine, tmp_path, small_fs):
    """ENOSPC while writing a raw file target is a NoSpaceError and marks it broken."""
    img = make_image(tmp_path / "a.img", 4 * MIB, [(0, 4 * MIB, "random")])
    sink = ListSink()
    encode_file(engine, img, sink)
    out = small_fs / "disk"
    out.write_bytes(b"")
    os.truncate(out, 4 * MIB)  # sparse: the size fits, the data does not
    with pytest.raises(E.NoSpaceError, match="broken"):
        engine.decode(ListSource(sink), RawTarget(str(out), known_zero=True))


@pytest.mark.parametrize("kind", ["pipe", "file"])
def test_pipe_writer_zero_runs_arrive_in_order_between_data(tmp_path, kind):
    """Zeros go into a pipe by reference (vmsplice), into anything else by write: same bytes."""
    out = tmp_path / "out"
    expected = b"head" + bytes(3 * MIB + 5) + b"tail" + bytes(10) + b"end"
    with open(out, "wb") as sink:
        if kind == "pipe":
            r, w = os.pipe()
            reader = subprocess.Popen(["cat"], stdin=r, stdout=sink)
            os.close(r)
            enlarge_pipe(w)
        else:
            w, reader = os.dup(sink.fileno()), None
        try:
            pw = PipeWriter(w, "test output", None)
            assert bool(pw.size) == (kind == "pipe")
            pw.write(b"head")
            pw.write_zeros(3 * MIB + 5)
            pw.write(b"tail")
            pw.write_zeros(10)
            pw.write(b"end")
        finally:
            os.close(w)
            if reader is not None:
                assert reader.wait() == 0
    assert out.read_bytes() == expected


def test_append_writer_writes_exact_bytes_through_o_direct_and_the_tail(tmp_path):
    """Odd-sized appends across buffer boundaries land exactly; the helper thread stops."""
    path = tmp_path / "dump"
    pieces = [os.urandom(n) for n in (1, 4095, 10_000, 70_000, 3, 65_536 * 3 + 17)]
    with no_leaks():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            out = AppendWriter(fd, str(path), "test dump", buffer_size=64 << 10)
            assert out.direct is not None  # ext4 under /tmp takes O_DIRECT
            for p in pieces:
                out.append(p)
            out.finish()
        finally:
            os.close(fd)
    assert b"".join(pieces) == path.read_bytes()


# --- pipes -----------------------------------------------------------------------------


def test_enlarge_pipe_grows_pipes_and_ignores_files(tmp_path):
    """F_SETPIPE_SZ gives 1 MiB on a pipe; a regular file is left alone."""
    r, w = os.pipe()
    try:
        assert MIB == enlarge_pipe(r)
    finally:
        os.close(r)
        os.close(w)
    with open(tmp_path / "f", "wb") as f:
        assert 0 == enlarge_pipe(f.fileno())


def test_reopen_nonblocking_leaves_the_shared_fd_blocking():
    """The non-blocking twin does not change the flags of the fd others hold."""
    r, w = os.pipe()
    twin = reopen_nonblocking(w, write=True)
    try:
        assert twin is not None
        assert os.get_blocking(w) and not os.get_blocking(twin)
    finally:
        for fd in (r, w, twin):
            os.close(fd)


# --- block devices (root + loop) ---------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs mounted under tmp_path (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def loop_device(tmp_path):
    """A loop device over a 4 MiB file of 0xAA bytes (root only), detached afterwards."""
    from conftest import losetup_works

    if not losetup_works():
        pytest.skip("needs root and working loop devices")
    backing = tmp_path / "loop.img"
    backing.write_bytes(b"\xaa" * (4 * MIB))
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.root
def test_block_device_export_and_import_with_blkzeroout(engine, tmp_path, loop_device):
    """pread from a block device; import zeroes runs on a dirty device, reads back equal."""
    img = make_image(tmp_path / "a.img", 4 * MIB)
    sink = ListSink()
    encode_file(engine, img, sink)
    summary = engine.decode(ListSource(sink), RawTarget(loop_device, known_zero=False))
    assert summary.read_back and summary.zero_chunks > 0
    back = ListSink()
    fd = os.open(loop_device, os.O_RDONLY)
    try:
        again = engine.encode(fd, back, source_kind="block")
    finally:
        os.close(fd)
    assert again.digest == sink.summary.digest
    with open(loop_device, "rb") as f:
        assert img.read_bytes() == f.read()
