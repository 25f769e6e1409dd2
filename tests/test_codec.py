"""LZ4 chunk frames (codec) and chunk hashes / disk digest (hashing)."""

from __future__ import annotations

import os
import subprocess

import pytest

from ganeti_vol.core import errors as E
from ganeti_vol.engine import codec, hashing

MIB = 1 << 20


def test_frame_round_trips_text_random_and_short_chunks():
    """encode/decode restore the exact bytes for every kind of chunk."""
    for data in (b"hello world\n" * 5000, os.urandom(MIB), bytes(12345), b"x"):
        assert data == codec.decode(codec.encode(data), len(data), "test chunk")


def test_encode_accepts_a_memoryview_of_a_recycled_bytearray():
    """The engine compresses a slice of its buffer without copying it first."""
    buf = bytearray(b"abc" * 1000)
    assert bytes(buf[:999]) == codec.decode(codec.encode(memoryview(buf)[:999]), 999, "x")


def test_concatenated_frames_decode_with_the_lz4_cli_alone(tmp_path):
    """A dump made of one frame per chunk is a valid .lz4 file for `lz4 -d`."""
    chunks = [os.urandom(100_000), bytes(MIB), b"text line\n" * 30_000, bytes(777)]
    dump = tmp_path / "disk.lz4"
    with open(dump, "wb") as f:
        for c in chunks:
            f.write(codec.zero_frame(len(c)) if not any(c) else codec.encode(c))
    out = tmp_path / "disk.raw"
    subprocess.run(["lz4", "-d", "-q", str(dump), str(out)], check=True)
    assert b"".join(chunks) == out.read_bytes()


def _sparse_content(size: int, runs, rng):
    """A buffer full of junk and the content it stands for when only ``runs`` are data."""
    buf = bytearray(rng.randbytes(size))  # junk between the runs: must never be read
    content = bytearray(size)
    for start, end in runs:
        if rng.random() < 0.5:
            buf[start:end] = (b"log line %d\n" % start * (end - start))[:end - start]
        content[start:end] = buf[start:end]
    return buf, bytes(content)


RUN_CASES = [
    (4 * MIB, [(0, 4 * MIB)]),
    (4 * MIB, [(4096, 8192), (MIB + 4096, 3 * MIB)]),
    (4 * MIB, [(3 * MIB, 4 * MIB)]),
    (4 * MIB, [(0, 1), (7, 4096 * 3 + 5)]),
    (3 * MIB + 777, [(100, 200), (2 * MIB, 3 * MIB + 777)]),
    (4 * MIB, []),
    (16 * MIB, [(5, 9 * MIB + 3), (12 * MIB, 16 * MIB)]),  # the largest chunk size
]


@pytest.mark.parametrize("size,runs", RUN_CASES)
def test_encode_runs_gives_one_frame_of_the_content_with_zeros_between_the_runs(size, runs):
    """Only the runs are read; python-lz4 decodes the frame to the content, holes as zeros."""
    import random

    buf, content = _sparse_content(size, runs, random.Random(size + len(runs)))
    frame = codec.encode_runs(memoryview(buf), runs)
    assert codec.decode(frame, size, "sparse chunk") == content
    assert codec.frame_content_size(frame) == size


def test_encode_runs_of_one_whole_run_is_byte_identical_to_a_normal_frame():
    """The hand-built frame header and block match python-lz4's for a full 4 MiB chunk."""
    for data in (os.urandom(4 * MIB), b"text line\n" * (4 * MIB // 10) + b"1234"):
        assert codec.encode_runs(memoryview(data), [(0, len(data))]) == codec.encode(data)


def test_frames_of_partly_sparse_chunks_decode_with_the_lz4_cli_alone(tmp_path):
    """Multi-block frames, mixed with ordinary ones, are a valid .lz4 file for `lz4 -d`."""
    import random

    rng = random.Random(5)
    frames, expected = [], []
    for size, runs in RUN_CASES:
        buf, content = _sparse_content(size, runs, rng)
        frames.append(codec.encode_runs(memoryview(buf), runs))
        expected.append(content)
        frames.append(codec.encode(b"between\n" * 1000))
        expected.append(b"between\n" * 1000)
    dump = tmp_path / "dump.lz4"
    dump.write_bytes(b"".join(frames))
    subprocess.run(["lz4", "-d", "-q", "-f", str(dump), str(tmp_path / "raw")], check=True)
    assert (tmp_path / "raw").read_bytes() == b"".join(expected)


def test_zero_runs_inside_a_chunk_cost_under_one_percent():
    """A chunk with 64 KiB of data and the rest zeros stays small (zero blocks are cached)."""
    buf = bytearray(os.urandom(4 * MIB))
    frame = codec.encode_runs(memoryview(buf), [(MIB, MIB + 65536)])
    assert len(frame) - 65536 < 0.01 * (4 * MIB - 65536)


@pytest.mark.parametrize("algo", hashing.ALGORITHMS)
@pytest.mark.parametrize("size,runs", RUN_CASES)
def test_hash_runs_equals_the_chunk_hash_of_the_content(algo, size, runs):
    """The streaming hash over runs and zeros is the hash of the whole chunk."""
    import random

    buf, content = _sparse_content(size, runs, random.Random(size * 3 + len(runs)))
    assert hashing.hash_runs(algo, memoryview(buf), runs) == hashing.chunk_hash(algo, content)


def test_zero_frame_costs_under_one_percent_of_the_chunk():
    """Zero runs must cost at most 1 % of their size in the dump."""
    for length in (64 << 10, MIB, 4 * MIB):
        assert len(codec.zero_frame(length)) <= length // 100
        assert bytes(length) == codec.decode(codec.zero_frame(length), length, "zero")


def test_zero_frame_is_computed_once_per_length():
    """The zero frame is cached: the same object comes back."""
    assert codec.zero_frame(4 * MIB) is codec.zero_frame(4 * MIB)


def test_is_zero_frame_recognises_only_the_cached_zero_frame():
    """Zero chunks are recognised by comparing frame bytes, without decompressing."""
    z = codec.zero_frame(MIB)
    assert codec.is_zero_frame(z, MIB)
    assert codec.is_zero_frame(memoryview(z), MIB)
    assert not codec.is_zero_frame(z, MIB // 2)
    assert not codec.is_zero_frame(codec.encode(b"\1" + bytes(MIB - 1)), MIB)


def test_corrupt_frame_header_raises_compression_error_naming_the_chunk():
    """A flipped byte in a frame header is a CompressionError that says which chunk."""
    frame = bytearray(codec.encode(b"some text " * 10_000))
    frame[14] ^= 0xFF  # the header checksum byte (after magic, FLG, BD, 8-byte size)
    with pytest.raises(E.CompressionError, match="cannot decode disk 3 at offset 8: corrupt"):
        codec.decode(bytes(frame), 100_000, "disk 3 at offset 8")


@pytest.mark.parametrize("flg, bd", [(0x68, 0x70), (0x6C, 0x70), (0x68, 0x30), (0x60, 0x50),
                                     (0x64, 0x60), (0x78, 0x70)])
def test_frame_header_checksum_is_checked_as_xxh32_for_any_descriptor(flg, bd):
    """The codec checks a header's checksum byte without the xxhash package (its home is
    the hashing module): a header whose byte is XXH32's passes the checksum and is judged on
    its settings; the same header with another byte is corrupt."""
    import struct

    import xxhash

    for size in (1, 4096, 100_000, 4 * MIB - 3):
        descriptor = bytes((flg, bd)) + struct.pack("<Q", size)
        good = (xxhash.xxh32_intdigest(descriptor) >> 8) & 0xFF
        for byte, problem in ((good, "settings" if (flg, bd) != (0x68, 0x70) else "holds"),
                              ((good + 1) & 0xFF, "header checksum")):
            header = struct.pack("<I", 0x184D2204) + descriptor + bytes((byte,))
            with pytest.raises(E.CompressionError, match=problem):
                codec.decode(header + bytes(8), size + 1, "chunk 0")


def test_hand_built_frame_headers_carry_xxh32_for_any_content_size():
    """encode_runs writes its own frame header, with XXH32's checksum byte, and lz4 reads it."""
    import lz4.frame
    import xxhash

    for size in (1, 7, 4095, 65536, 65537, 1_000_003, 4 * MIB):
        data = b"\1" + bytes(size - 1)
        frame = codec.encode_runs(memoryview(data), [(0, 1)])
        assert frame[14] == (xxhash.xxh32_intdigest(frame[4:14]) >> 8) & 0xFF
        assert lz4.frame.decompress(frame) == data


def test_truncated_frame_raises_compression_error():
    """A frame cut short never decodes to a shorter chunk silently."""
    frame = codec.encode(os.urandom(50_000))
    for cut in (3, 10, len(frame) // 2, len(frame) - 1):
        with pytest.raises(E.CompressionError, match="cannot decode chunk 0"):
            codec.decode(frame[:cut], 50_000, "chunk 0")


def test_decode_rejects_a_frame_of_the_wrong_length_or_with_stray_bytes():
    """The length check and the no-trailing-bytes check catch swapped or glued frames."""
    frame = codec.encode(b"a" * 1000)
    with pytest.raises(E.CompressionError, match="holds 1000 bytes, expected 999"):
        codec.decode(frame, 999, "chunk 1")
    with pytest.raises(E.CompressionError, match="stray bytes"):
        codec.decode(frame + b"junk", 1000, "chunk 1")


def test_frame_header_carries_the_chunk_length():
    """The content size is stored, so a reader knows a chunk's length up front."""
    assert 4321 == codec.frame_content_size(codec.encode(os.urandom(4321)))
    assert codec.frame_content_size(b"not a frame") is None


def test_tune_malloc_is_applied_once_and_reports_success():
    """mallopt is available on glibc and calling it twice is harmless."""
    assert codec.tune_malloc() is True
    assert codec.tune_malloc() is True


# --- hashing ---------------------------------------------------------------------------


def test_chunk_hash_algorithms_have_their_documented_sizes():
    """xxh3-128 gives 16 bytes, sha256 gives 32."""
    assert 16 == len(hashing.chunk_hash("xxh3-128", b"abc")) == hashing.digest_size("xxh3-128")
    assert 32 == len(hashing.chunk_hash("sha256", b"abc")) == hashing.digest_size("sha256")


def test_chunk_hashes_match_reference_vectors():
    """The names map to the real algorithms (XXH3-128 of '' and SHA-256 of 'abc')."""
    assert "99aa06d3014798d86001c324468d497f" == hashing.chunk_hash("xxh3-128", b"").hex()
    assert hashing.chunk_hash("sha256", b"abc").hex().startswith("ba7816bf8f01cfea")


def test_zero_hash_equals_hashing_zero_bytes():
    """The precomputed zero-chunk hash is the hash of that many zero bytes."""
    for algo in hashing.ALGORITHMS:
        assert hashing.chunk_hash(algo, bytes(5000)) == hashing.zero_hash(algo, 5000)


def test_unknown_hash_algorithm_is_an_archive_format_error():
    """An archive naming an unknown hash is refused as needing a newer reader."""
    with pytest.raises(E.ArchiveFormatError, match="unsupported chunk hash algorithm 'md4'"):
        hashing.chunk_hash("md4", b"")


def test_disk_digest_definition_is_pinned():
    """Archives store the digest: its definition must never change silently."""
    hashes = [hashing.chunk_hash("xxh3-128", b"a" * 65536), hashing.zero_hash("xxh3-128", 100)]
    assert (
        "sha256:f48b1aa82a3cc1432e19ad389b992f66fd7d614ab508e40bb58c8b5a8a5947cc"
        == hashing.disk_digest("xxh3-128", 65536, hashes, 65636)
    )


def test_disk_digest_changes_with_order_size_and_chunk_size():
    """Reordered chunks, a different length or chunking give another digest."""
    a, b = hashing.chunk_hash("sha256", b"a"), hashing.chunk_hash("sha256", b"b")
    base = hashing.disk_digest("sha256", 1024, [a, b], 2048)
    assert base != hashing.disk_digest("sha256", 1024, [b, a], 2048)
    assert base != hashing.disk_digest("sha256", 1024, [a, b], 2047)
    assert base != hashing.disk_digest("sha256", 2048, [a, b], 2048)
    assert base != hashing.disk_digest("sha256", 1024, [a], 2048)


def test_libc_handle_is_the_process_libc_without_ldconfig():
    """libc.libc() resolves libc symbols through dlopen(NULL), once (no ldconfig run)."""
    from ganeti_vol.core import libc

    assert libc.libc() is libc.libc()
    assert libc.libc().getpid() == os.getpid()
