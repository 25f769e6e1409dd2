"""``ganeti-vol dump`` and ``ganeti-vol restore`` (ganeti_vol.engine.rawio): real files, pipes,
loop devices and processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import losetup_works, sparse_file

from ganeti_vol.core import errors as E
from ganeti_vol.engine import rawio

MiB = 1 << 20
GV = [sys.executable, "-m", "ganeti_vol"]
needs_loop = pytest.mark.skipif(not losetup_works(), reason="needs root and loop devices")


def make_disk(path: Path, size: int = 8 * MiB) -> Path:
    """A sparse file: text at 0, random bytes at 3 MiB, a tail block; holes elsewhere."""
    sparse_file(path, size)
    with open(path, "r+b") as f:
        f.write(b"".join(b"line %d of the dump test\n" % i for i in range(4000)))
        f.seek(3 * MiB)
        f.write(os.urandom(MiB))
        f.seek(size - 4096)
        f.write(b"tail" * 1024)
    return path


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def run(argv, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdout", subprocess.PIPE)
    return subprocess.run(argv, stderr=subprocess.PIPE, timeout=60, **kw)


def sh(script: str, **kw) -> subprocess.CompletedProcess:
    """Run a bash script with ganeti-vol's interpreter first on PATH."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + ":" + os.environ["PATH"],
               GV=" ".join(GV))
    return run(["bash", "-c", script], env=env, **kw)


@contextlib.contextmanager
def loop_device(path: Path):
    dev = subprocess.run(["losetup", "-f", "--show", str(path)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def dump_in_process(path: str, **kw) -> tuple[bytes, rawio.CopySummary]:
    """rawio.dump into a real pipe, read by a thread."""
    r, w = os.pipe()
    chunks: list[bytes] = []

    def reader() -> None:
        while data := os.read(r, 1 << 20):
            chunks.append(data)

    t = threading.Thread(target=reader)
    t.start()
    try:
        summary = rawio.dump(path, w, environ={}, **kw)
    finally:
        os.close(w)
        t.join()
        os.close(r)
    return b"".join(chunks), summary


# --- dump ------------------------------------------------------------------------------


def test_dump_of_a_sparse_file_is_byte_identical_and_skips_the_holes(tmp_path):
    """The stream equals the file; the holes were not read (counted as zeros)."""
    disk = make_disk(tmp_path / "d.img")
    data, summary = dump_in_process(str(disk))
    assert disk.read_bytes() == data
    assert summary.size == disk.stat().st_size
    assert summary.zero_bytes >= 3 * MiB  # the holes were emitted, not read
    assert summary.data_bytes + summary.zero_bytes == summary.size


def test_dump_and_restore_round_trip_through_a_pipe_between_processes(tmp_path):
    """ganeti-vol dump | ganeti-vol restore gives the same bytes; the copy stays sparse."""
    disk = make_disk(tmp_path / "d.img")
    copy = sparse_file(tmp_path / "copy.img", disk.stat().st_size)
    res = sh(f'$GV dump "{disk}" | $GV restore "{copy}"')
    assert res.returncode == 0, res.stderr
    assert disk.read_bytes() == copy.read_bytes()
    assert allocated(copy) < 3 * MiB  # zero runs were skipped on the fresh sparse file


def test_dump_to_a_regular_file_keeps_it_sparse(tmp_path):
    """Redirected into a new file, holes become holes again (seeked over, not written)."""
    disk = make_disk(tmp_path / "d.img")
    out = tmp_path / "out.img"
    with open(out, "wb") as f:
        res = run([*GV, "dump", str(disk)], stdout=f)
    assert res.returncode == 0, res.stderr
    assert disk.read_bytes() == out.read_bytes()
    assert allocated(out) < 3 * MiB


def test_dump_announces_the_size_of_a_file_on_exp_size_fd_above_9(tmp_path):
    """A bash export script hands fd 11 to dump: the size line arrives there, stdout is data."""
    disk = make_disk(tmp_path / "d.img")
    res = sh(f'exec 11>"{tmp_path}/size"; EXP_SIZE_FD=11 $GV dump "{disk}" | sha256sum')
    assert res.returncode == 0, res.stderr
    assert f"{disk.stat().st_size}\n" == (tmp_path / "size").read_text()
    import hashlib

    assert hashlib.sha256(disk.read_bytes()).hexdigest() == res.stdout.split()[0].decode()


@needs_loop
def test_dump_announces_the_size_of_a_block_device(tmp_path):
    """EXP_SIZE_FD carries the block device's size (not 0, as stat would say)."""
    disk = make_disk(tmp_path / "d.img")
    with loop_device(disk) as dev:
        res = sh(f'exec 11>"{tmp_path}/size"; EXP_SIZE_FD=11 $GV dump {dev} | cmp - "{disk}"')
    assert res.returncode == 0, res.stderr
    assert f"{disk.stat().st_size}\n" == (tmp_path / "size").read_text()


def test_dump_with_a_closed_exp_size_fd_is_a_one_line_usage_error(tmp_path):
    """EXP_SIZE_FD naming a closed fd: exit 3, one line naming the fd, no traceback."""
    disk = make_disk(tmp_path / "d.img", MiB)
    res = run([*GV, "dump", str(disk)], env=dict(os.environ, EXP_SIZE_FD="57"),
              stdout=subprocess.DEVNULL)
    assert 3 == res.returncode
    assert b"EXP_SIZE_FD=57" in res.stderr and b"Traceback" not in res.stderr


def test_dump_of_a_missing_device_is_a_one_line_device_error(tmp_path):
    """A missing source: exit 7, the path and the cause on one line, nothing on stdout."""
    res = run([*GV, "dump", str(tmp_path / "nope.img")])
    assert 7 == res.returncode
    assert b"" == res.stdout
    assert [f"ganeti-vol: error: cannot open '{tmp_path}/nope.img': No such file or directory"] \
        == res.stderr.decode().splitlines()


# --- restore ---------------------------------------------------------------------------


def test_restore_never_truncates_a_larger_file_disk(tmp_path):
    """Restoring 1 MiB into an 8 MiB disk leaves its size and its tail alone."""
    disk = make_disk(tmp_path / "d.img")  # tail block at the end
    src = tmp_path / "src.img"
    src.write_bytes(b"x" * MiB)
    before = disk.read_bytes()
    with open(src, "rb") as f:
        res = run([*GV, "restore", str(disk)], stdin=f)
    assert res.returncode == 0, res.stderr
    assert 8 * MiB == disk.stat().st_size
    after = disk.read_bytes()
    assert b"x" * MiB == after[:MiB]
    assert before[MiB:] == after[MiB:]


def test_restore_refuses_a_target_smaller_than_a_known_input_before_writing(tmp_path):
    """An input file larger than the target: exit 7 and the target is untouched."""
    target = sparse_file(tmp_path / "small.img", MiB)
    src = make_disk(tmp_path / "d.img")
    with open(src, "rb") as f:
        res = run([*GV, "restore", str(target)], stdin=f)
    assert 7 == res.returncode
    assert b"too small" in res.stderr
    assert 0 == allocated(target) and MiB == target.stat().st_size


def test_restore_stops_a_streamed_input_at_the_end_of_the_target(tmp_path):
    """A pipe with more bytes than the target: exit 7, the size unchanged, partial data said."""
    target = sparse_file(tmp_path / "small.img", MiB)
    src = make_disk(tmp_path / "d.img")
    res = sh(f'cat "{src}" | $GV restore "{target}"')
    assert 7 == res.returncode
    assert b"past the end of the target" in res.stderr and b"partial data" in res.stderr
    assert MiB == target.stat().st_size


def test_restore_refuses_an_empty_input(tmp_path):
    """An export that produced nothing must not pass for an empty disk: exit 14."""
    target = sparse_file(tmp_path / "t.img", MiB)
    res = run([*GV, "restore", str(target)], stdin=subprocess.DEVNULL)
    assert 14 == res.returncode
    assert b"the input is empty" in res.stderr


def test_restore_checks_the_announced_size(tmp_path):
    """--size that does not match the input is a ShortTransfer (exit 14)."""
    target = sparse_file(tmp_path / "t.img", 4 * MiB)
    res = sh(f'head -c 1000 /dev/zero | $GV restore --size 2000 "{target}"')
    assert 14 == res.returncode


def test_restore_never_creates_a_missing_disk(tmp_path):
    """A missing target is an error (dd conv=nocreat), not a new file."""
    res = run([*GV, "restore", str(tmp_path / "new.img")], stdin=subprocess.DEVNULL)
    assert 7 == res.returncode
    assert not (tmp_path / "new.img").exists()


def test_restore_skips_zero_runs_only_on_a_target_that_reads_as_zeros(tmp_path):
    """A fresh sparse file stays sparse; a file with data gets its zero runs zeroed (punched)."""
    fresh = sparse_file(tmp_path / "fresh.img", 8 * MiB)
    summary = rawio.restore(_zeros_then_text_fd(tmp_path), str(fresh))
    assert summary.known_zero
    assert allocated(fresh) <= MiB + (64 << 10)  # only the text was written
    used = tmp_path / "used.img"
    used.write_bytes(b"\xff" * (8 * MiB))
    summary = rawio.restore(_zeros_then_text_fd(tmp_path), str(used))
    assert not summary.known_zero
    data = used.read_bytes()
    assert bytes(7 * MiB) == data[: 7 * MiB]
    assert data[7 * MiB:].startswith(b"text")
    assert allocated(used) <= MiB + (64 << 10)  # the zero range was punched, not written


def _zeros_then_text_fd(tmp_path: Path) -> int:
    src = tmp_path / "zt.img"
    src.write_bytes(bytes(7 * MiB) + b"text" * (MiB // 4))
    return os.open(src, os.O_RDONLY)


@needs_loop
def test_restore_into_a_loop_device_round_trips_with_an_unaligned_tail(tmp_path):
    """O_DIRECT writes to a block device, and a tail that is not 4 KiB aligned, both arrive."""
    backing = sparse_file(tmp_path / "b.img", 4 * MiB)
    payload = os.urandom(MiB) + bytes(MiB) + b"end" * 33
    src = tmp_path / "p.bin"
    src.write_bytes(payload)
    with loop_device(backing) as dev:
        res = sh(f'cat "{src}" | $GV restore {dev}')
        assert res.returncode == 0, res.stderr
        with open(dev, "rb") as f:
            assert payload == f.read(len(payload))


@needs_loop
def test_restore_refuses_a_mounted_target(tmp_path):
    """A loop device with a mounted filesystem, and the file behind it, are refused (exit 7)."""
    backing = sparse_file(tmp_path / "fs.img", 16 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(backing)], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_device(backing) as dev:
        subprocess.run(["mount", dev, str(mnt)], check=True, capture_output=True)
        try:
            for target in (dev, str(backing)):
                res = run([*GV, "restore", target], stdin=subprocess.DEVNULL)
                assert 7 == res.returncode, res.stderr
                assert f"mounted at '{mnt}'" in res.stderr.decode()
        finally:
            subprocess.run(["umount", str(mnt)], check=True)


@needs_loop
def test_restore_claims_a_block_device_exclusively(tmp_path):
    """Another exclusive opener (O_EXCL) makes restore fail with BusyError, before writing."""
    backing = sparse_file(tmp_path / "b.img", 8 * MiB)
    with loop_device(backing) as dev:
        fd = os.open(dev, os.O_RDONLY | os.O_EXCL)
        try:
            with pytest.raises(E.BusyError, match="in use"):
                rawio.restore(_zeros_then_text_fd(tmp_path), dev)
        finally:
            os.close(fd)
    assert 0 == allocated(backing)


def test_copy_image_refuses_an_image_larger_than_the_disk(tmp_path):
    """The sparse copy helper checks the size before writing anything."""
    image = make_disk(tmp_path / "img.raw")
    disk = sparse_file(tmp_path / "disk.img", 4 * MiB)
    with pytest.raises(E.DeviceError, match="the disk only"):
        rawio.copy_image(str(image), str(disk))
    assert 0 == allocated(disk)


def test_copy_image_skips_holes_and_keeps_the_rest_of_the_disk(tmp_path):
    """A sparse image lands byte for byte, its holes stay holes, the disk keeps its size."""
    image = make_disk(tmp_path / "img.raw")
    disk = sparse_file(tmp_path / "disk.img", 32 * MiB)
    summary = rawio.copy_image(str(image), str(disk))
    assert image.read_bytes() == disk.read_bytes()[: image.stat().st_size]
    assert 32 * MiB == disk.stat().st_size
    assert summary.zero_bytes >= 3 * MiB
    assert allocated(disk) < 3 * MiB


def test_restore_stops_random_data_past_the_end_with_a_device_error(tmp_path):
    """Data (not zeros) past the end of the target: exit 7 naming the offset, no internal error.

    A buffer slice held by the error's traceback once made the cleanup raise
    BufferError over the real error.
    """
    target = sparse_file(tmp_path / "small.img", MiB)
    src = tmp_path / "r.bin"
    src.write_bytes(os.urandom(8 * MiB))
    res = sh(f'cat "{src}" | $GV restore "{target}"')
    assert res.returncode == 7, res.stderr
    assert b"past the end of the target" in res.stderr and b"internal error" not in res.stderr
    assert target.stat().st_size == MiB


# --- restore --verify ------------------------------------------------------------------


def _verify_image(tmp_path: Path) -> Path:
    """9 MiB + 3 bytes: random data across chunk edges, zero runs, holes, an unaligned tail."""
    image = sparse_file(tmp_path / "v.img", 9 * MiB + 3)
    with open(image, "r+b") as f:
        f.write(os.urandom(MiB + 4096))
        f.seek(4 * MiB - 8192)
        f.write(os.urandom(16384) + bytes(128 << 10) + os.urandom(4096))
        f.seek(9 * MiB - 5000)
        f.write(os.urandom(5003))
    return image


def test_restore_verify_through_the_cli_into_a_fresh_sparse_file(tmp_path):
    """< file (unaligned hole-map pieces) and | pipe (4 MiB pieces) both verify and land exactly."""
    image = _verify_image(tmp_path)
    for how in ("file", "pipe"):
        target = sparse_file(tmp_path / f"t-{how}.img", 16 * MiB)
        feed = f'< "{image}"' if how == "file" else f'< <(cat "{image}")'
        res = sh(f'$GV -v restore --verify "{target}" {feed}')
        assert res.returncode == 0, (how, res.stderr)
        assert b"read back and verified" in res.stderr, how
        assert image.read_bytes() == target.read_bytes()[: image.stat().st_size], how
        assert allocated(target) < 3 * MiB, how  # zero runs still skipped


@needs_loop
def test_restore_verify_through_the_cli_into_a_loop_device(tmp_path):
    """A block device with old data: O_DIRECT writes and read-back, zeroed runs, unaligned tail."""
    image = _verify_image(tmp_path)
    backing = tmp_path / "b.img"
    backing.write_bytes(b"\xa5" * (16 * MiB))  # not zero: the zero runs must be written
    with loop_device(backing) as dev:
        res = sh(f'$GV -v restore --verify {dev} < "{image}"')
        assert res.returncode == 0, res.stderr
        assert b"read back and verified" in res.stderr
        with open(dev, "rb") as f:
            assert image.read_bytes() == f.read(image.stat().st_size)


def _zero_image_and_a_dirty_target(tmp_path: Path) -> tuple[Path, Path]:
    """An image of data then zeros; a target whose bytes at 6 MiB are not zero."""
    image = tmp_path / "z.img"
    image.write_bytes(os.urandom(MiB) + bytes(9 * MiB))
    target = sparse_file(tmp_path / "dirty.img", 16 * MiB)
    with open(target, "r+b") as f:
        f.seek(6 * MiB)
        f.write(b"old data" * 512)
    return image, target


def test_restore_verify_catches_a_target_that_was_wrongly_said_to_be_zero(tmp_path):
    """--target-is-zero on a disk with old data: the skipped zeros do not read back as zeros.

    The read-back is the only thing that can notice: exit 17, one line naming
    the device and the offset of the bad 4 MiB chunk.
    """
    image, target = _zero_image_and_a_dirty_target(tmp_path)
    with open(image, "rb") as f:
        res = run([*GV, "restore", "--verify", "--target-is-zero", str(target)], stdin=f)
    assert res.returncode == 17, res.stderr
    lines = res.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert f"cannot verify '{target}'" in lines[0]
    assert "at offset 4194304 differ" in lines[0] and "did not read as zeros" in lines[0]


def test_restore_without_verify_reads_nothing_back(tmp_path):
    """The same lie without --verify passes unnoticed: no read-back, the old data stays."""
    image, target = _zero_image_and_a_dirty_target(tmp_path)
    with open(image, "rb") as f:
        res = run([*GV, "restore", "--target-is-zero", str(target)], stdin=f)
    assert res.returncode == 0, res.stderr
    assert b"old data" in target.read_bytes()[6 * MiB:7 * MiB]


class FlippingWriter(rawio.DiskWriter):
    """A disk that stores one byte wrong: the write at ``bad`` really lands altered."""

    def __init__(self, path: str, bad: int, **kw) -> None:
        super().__init__(path, **kw)
        self.bad = bad

    def write(self, offset: int, data: memoryview) -> None:
        if offset <= self.bad < offset + len(data):
            wrong = bytearray(data)
            wrong[self.bad - offset] ^= 0x01
            data = memoryview(wrong)
        super().write(offset, data)


def _read_bytes_of_this_process() -> int:
    """Bytes read by all threads of this process so far (/proc/self/io rchar)."""
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["rchar"])


def _copy_with_flipping_writer(image: Path, target: str, bad: int, verify: bool):
    fd = os.open(image, os.O_RDONLY)
    try:
        with FlippingWriter(target, bad, min_size=image.stat().st_size) as writer:
            return rawio.copy_into(fd, writer, size=image.stat().st_size, verify=verify)
    finally:
        os.close(fd)


def test_restore_verify_detects_a_wrong_byte_written_to_a_file(tmp_path):
    """One flipped byte at 4 MiB + 123 fails the chunk at 4 MiB; without verify it lands."""
    image = _verify_image(tmp_path)
    bad = 4 * MiB + 123  # in the data run that straddles 4 MiB
    target = sparse_file(tmp_path / "t.img", 16 * MiB)
    with pytest.raises(E.IntegrityError) as info:
        _copy_with_flipping_writer(image, str(target), bad, verify=True)
    assert info.value.offset == 4 * MiB
    assert f"cannot verify '{target}'" in str(info.value)
    assert "at offset 4194304 differ" in str(info.value) and "\n" not in str(info.value)
    assert "partial data" not in str(info.value)  # everything was written: it is wrong
    data = target.read_bytes()
    assert data[bad] != image.read_bytes()[bad]  # the simulated bad disk really wrote it

    target = sparse_file(tmp_path / "t2.img", 16 * MiB)
    before = _read_bytes_of_this_process()
    summary = _copy_with_flipping_writer(image, str(target), bad, verify=False)
    read_off = _read_bytes_of_this_process() - before
    assert not summary.verified and summary.verify_seconds == 0
    assert "verified" not in summary.describe("restored")
    target = sparse_file(tmp_path / "t3.img", 16 * MiB)
    before = _read_bytes_of_this_process()
    with pytest.raises(E.IntegrityError):
        _copy_with_flipping_writer(image, str(target), bad, verify=True)
    read_on = _read_bytes_of_this_process() - before
    # the read-back reads the written range once more; without verify it is not read at all
    assert read_on - read_off >= 4 * MiB + (5 * MiB + 3) - 8192
    assert read_off < image.stat().st_size


@needs_loop
def test_restore_verify_detects_a_wrong_byte_written_to_a_loop_device(tmp_path):
    """The same bad disk as a block device: the O_DIRECT read-back finds the flipped byte."""
    image = _verify_image(tmp_path)
    backing = sparse_file(tmp_path / "b.img", 16 * MiB)
    bad = 9 * MiB - 10  # in the unaligned last chunk (8 MiB .. 9 MiB + 3)
    with loop_device(backing) as dev, pytest.raises(
        E.IntegrityError, match=f"cannot verify '{dev}'.*at offset 8388608 "
    ):
        _copy_with_flipping_writer(image, dev, bad, verify=True)
    assert backing.read_bytes()[bad] != image.read_bytes()[bad]


def test_restore_verify_summary_says_verified(tmp_path):
    """rawio.restore(verify=True) records the read-back in its summary."""
    image = _verify_image(tmp_path)
    target = sparse_file(tmp_path / "t.img", 16 * MiB)
    fd = os.open(image, os.O_RDONLY)
    try:
        summary = rawio.restore(fd, str(target), verify=True)
    finally:
        os.close(fd)
    assert summary.verified and summary.as_dict()["verified"]
    assert "read back and verified" in summary.describe("restored")
    assert image.read_bytes() == target.read_bytes()[: image.stat().st_size]
