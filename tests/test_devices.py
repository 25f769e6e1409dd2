"""Device facts (pyudev + sysfs + mountinfo), import-target checks and O_EXCL opens,
on real sparse files, real loop devices and real partition tables."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import sparse_file
from disk_helpers import (
    MBR_SCRIPT,
    MIB,
    foreign_loop,
    mounted,
    needs_loop,
    partitioned_image,
    run,
    sfdisk_partitions,
)

from ganeti_vol.cli import main
from ganeti_vol.core import errors as E
from ganeti_vol.system import devices


@contextlib.contextmanager
def ext4_on_partition_1(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(image, loop device) of an MBR image, attached by losetup, with ext4 on p1."""
    image = partitioned_image(tmp_path / "mbr.img", MBR_SCRIPT)
    with foreign_loop(image, partitions=True) as dev:
        run("mkfs.ext4", "-q", f"{dev}p1")
        yield image, dev


def test_regular_file_facts_report_kind_size_and_no_device_number(tmp_path):
    """A sparse file disk is kind 'file' with its apparent size and no major:minor."""
    disk = sparse_file(tmp_path / "disk.img", 10 * MIB)
    facts = devices.describe(str(disk))
    assert facts.kind == "file"
    assert facts.size == 10 * MIB
    assert facts.devnum == ""
    assert not facts.read_only
    assert facts.loop_devices == () and facts.mounts == ()


def test_missing_path_is_a_device_error_naming_the_path(tmp_path):
    """describe() of a missing path raises DeviceError 'cannot describe ...'."""
    with pytest.raises(E.DeviceError, match=r"cannot describe '.*nope': no such file"):
        devices.describe(str(tmp_path / "nope"))


def test_character_device_is_refused():
    """/dev/null is neither a regular file nor a block device."""
    with pytest.raises(E.DeviceError, match="not a regular file or block device"):
        devices.describe("/dev/null")


def test_facts_serialise_to_json(tmp_path):
    """to_json() gives plain JSON types (lists, not tuples or dataclasses)."""
    disk = sparse_file(tmp_path / "disk.img", MIB)
    data = devices.describe(str(disk)).to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["kind"] == "file" and data["mounts"] == []


def test_mountinfo_parser_unescapes_octal_and_skips_optional_fields():
    """Mount points with spaces (\\040) and optional 'shared:' fields parse right."""
    text = (
        "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 shared:3 - ext3 /dev/root rw\n"
        "40 35 0:52 / /srv/b rw - btrfs /dev/loop3 rw,space_cache=v2\n"
    )
    mounts = devices.parse_mountinfo(text)
    assert mounts[0] == devices.Mount("/mnt/with space", "ext3", "/dev/root", "98:0")
    assert mounts[1].device == "0:52" and mounts[1].source == "/dev/loop3"


@needs_loop
def test_loop_device_facts_name_backing_file_block_size_and_read_only(tmp_path):
    """A read-only loop device: kind 'loop', 7:N, backing file, 512-byte blocks, ro."""
    disk = sparse_file(tmp_path / "disk.img", 8 * MIB)
    with foreign_loop(disk, read_only=True) as dev:
        facts = devices.describe(dev)
        assert facts.kind == "loop"
        assert facts.devnum.startswith("7:")
        rdev = os.stat(dev).st_rdev
        assert facts.devnum == f"{os.major(rdev)}:{os.minor(rdev)}"
        assert facts.size == 8 * MIB
        assert facts.backing_file == str(disk)
        assert facts.logical_block_size == 512
        assert facts.read_only
        assert devices.describe(str(disk)).loop_devices == (dev,)


@needs_loop
def test_partitions_of_a_loop_device_match_sfdisk(tmp_path):
    """Whole-disk facts list loopNpM; each partition knows its parent and sfdisk's size."""
    image = partitioned_image(tmp_path / "mbr.img", MBR_SCRIPT)
    expected = {p["node"][len(str(image)) :]: p["size"] * 512 for p in sfdisk_partitions(image)}
    with foreign_loop(image, partitions=True) as dev:
        facts = devices.describe(dev)
        assert [p[len(dev) + 1 :] for p in facts.partitions] == list(expected)
        part5 = devices.describe(f"{dev}p5")
        assert part5.kind == "partition"
        assert part5.parent == dev
        assert part5.size == expected["5"]
        assert part5.logical_block_size == 512
        numbers = [n for n, _, _ in devices.partition_devices(dev)]
        assert numbers == [1, 2, 3, 5, 6]
        # the sysfs shortcut the conformance runner's leak checks use agrees with udev
        assert devices.partition_paths(dev) == {p for _, p, _ in devices.partition_devices(dev)}
    assert devices.partition_paths(dev) == frozenset()  # detached: none


@needs_loop
def test_mount_of_a_partition_shows_on_disk_partition_and_backing_file(tmp_path):
    """Mounting loopNp1 makes the partition, the whole loop disk and the file 'mounted'."""
    with (
        ext4_on_partition_1(tmp_path) as (image, dev),
        mounted(f"{dev}p1", tmp_path / "mnt") as mnt,
    ):
        for path in (f"{dev}p1", dev, str(image)):
            mounts = devices.describe(path).mounts
            assert [m.mount_point for m in mounts] == [str(mnt)], path
            assert mounts[0].fstype == "ext4"


@needs_loop
def test_import_target_that_is_mounted_is_refused_naming_the_mount_point(tmp_path):
    """check_import_target refuses a disk whose partition is mounted, saying where."""
    with ext4_on_partition_1(tmp_path) as (image, dev):
        with mounted(f"{dev}p1", tmp_path / "mnt") as mnt:
            with pytest.raises(E.DeviceError, match=f"mounted at '{mnt}'"):
                devices.check_import_target(dev, MIB)
            with pytest.raises(E.DeviceError, match=f"cannot import into '{image}'"):
                devices.check_import_target(str(image), MIB)
        assert devices.check_import_target(dev, MIB).kind == "loop"


def test_import_target_too_small_names_both_sizes(tmp_path):
    """A target smaller than the image: 'too small: N < M bytes'."""
    disk = sparse_file(tmp_path / "disk.img", 4 * MIB)
    with pytest.raises(E.DeviceError, match=rf"too small: {4 * MIB} < {4 * MIB + 1} bytes"):
        devices.check_import_target(str(disk), 4 * MIB + 1)
    assert devices.check_import_target(str(disk), 4 * MIB).size == 4 * MIB


@needs_loop
def test_import_target_read_only_loop_device_is_refused(tmp_path):
    """A loop device attached read-only cannot be an import target."""
    disk = sparse_file(tmp_path / "disk.img", 4 * MIB)
    with foreign_loop(disk, read_only=True) as dev, pytest.raises(E.DeviceError, match="read-only"):
        devices.check_import_target(dev, MIB)


def test_import_target_held_by_a_stacked_device_is_refused(tmp_path):
    """Holders (sysfs) make a target unusable; this kernel has no dm/md to stack one,
    so the rule is checked on facts as describe() would return them."""
    facts = devices.DeviceFacts(
        path="/dev/loop9",
        resolved="/dev/loop9",
        kind="loop",
        size=8 * MIB,
        devnum="7:9",
        read_only=False,
        logical_block_size=512,
        holders=("/dev/dm-0",),
    )
    assert devices.import_target_refusal(facts, MIB) == "it is held by /dev/dm-0"
    assert (
        devices.import_target_refusal(facts.__class__(**{**facts.__dict__, "holders": ()}), MIB)
        is None
    )


@needs_loop
def test_open_block_device_is_exclusive_and_busy_when_mounted(tmp_path):
    """O_EXCL: a mounted partition and its disk are busy; a second claim is busy too."""
    with ext4_on_partition_1(tmp_path) as (image, dev):
        with mounted(f"{dev}p1", tmp_path / "mnt"):
            for path in (f"{dev}p1", dev):
                with pytest.raises(E.BusyError, match=f"cannot open '{path}': device is in use"):
                    devices.open_block_device(path)
        with devices.open_block_device(f"{dev}p2") as first:
            first.write(b"x" * 512)
            with pytest.raises(E.BusyError):
                devices.open_block_device(f"{dev}p2", write=False)
        with devices.open_block_device(f"{dev}p2", write=False) as again:
            assert again.read(1) == b"x"


def test_open_block_device_opens_regular_files_without_exclusion(tmp_path):
    """Regular file disks are opened normally (O_EXCL means nothing for them)."""
    disk = sparse_file(tmp_path / "disk.img", MIB)
    with devices.open_block_device(str(disk)) as a, devices.open_block_device(str(disk)) as b:
        a.write(b"abc")
        assert b.read(3) == b"abc"


def test_cli_disk_info_json_matches_describe(tmp_path, capsys):
    """`ganeti-vol disk info PATH --json` prints describe(PATH).to_json()."""
    disk = sparse_file(tmp_path / "disk.img", 3 * MIB)
    assert main(["disk", "info", str(disk), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == devices.describe(str(disk)).to_json()


@needs_loop
def test_cli_disk_info_text_lists_partitions_and_backing_file(tmp_path, capsys):
    """The text form names kind, device number, backing file and partitions."""
    image = partitioned_image(tmp_path / "mbr.img", MBR_SCRIPT)
    with foreign_loop(image, partitions=True) as dev:
        assert main(["disk", "info", dev]) == 0
        lines = [line.partition(":") for line in capsys.readouterr().out.splitlines()]
        info = {key: value.strip() for key, _, value in lines}
        assert info["kind"] == "loop"
        assert info["backing file"] == str(image)
        assert info["partitions"].split()[-1] == f"{dev}p6"


def test_cli_disk_info_of_a_missing_path_exits_with_the_device_error_code(tmp_path, capsys):
    """A missing disk: exit code 7 (DeviceError) and a one-line error on stderr."""
    assert main(["disk", "info", str(tmp_path / "nope")]) == E.DeviceError.exit_code
    err = capsys.readouterr().err
    assert f"error: cannot describe '{tmp_path / 'nope'}': no such file or device" in err


@needs_loop
def test_import_target_claimed_exclusively_by_another_process_is_refused(tmp_path):
    """Another process holding the device O_EXCL (e.g. a second import) is named."""
    disk = sparse_file(tmp_path / "disk.img", 4 * MIB)
    with foreign_loop(disk) as dev:
        code = (
            f"import os, time; os.open({dev!r}, os.O_RDONLY | os.O_EXCL); "
            "print(1, flush=True); time.sleep(30)"
        )
        holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "1"
            with pytest.raises(E.DeviceError, match=rf"it is in use by pid {holder.pid} \(python"):
                devices.check_import_target(dev, MIB)
        finally:
            holder.kill()
            holder.wait()
            holder.stdout.close()
        assert devices.check_import_target(dev, MIB).kind == "loop"
