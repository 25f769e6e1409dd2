"""The loop and partition lifecycle: table parsing, attach, BLKPG partitions, detach
verification on every path (including Ctrl-C and crashes), and crash cleanup that
never touches foreign loop devices.  Real loop devices, real sfdisk tables."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, sparse_file
from disk_helpers import (
    GPT_SCRIPT,
    MBR_SCRIPT,
    MIB,
    force_detach_under,
    foreign_loop,
    is_bound,
    loops_backed_under,
    needs_loop,
    partitioned_image,
    run,
    sfdisk_partitions,
    stale_partitions,
    sysfs_partitions,
)

from ganeti_vol.cli import main
from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Disk
from ganeti_vol.system import loopctl, loopdev, loopleftovers


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path):
    """Fail a test that leaves a loop device behind, after detaching it anyway."""
    yield
    leftovers = force_detach_under(tmp_path)
    assert not leftovers, f"test left loop devices attached: {leftovers}"


def expected_table(image: Path) -> list[tuple[int, int, int]]:
    """(number, start, size) in bytes as sfdisk sees it; extended containers as the kernel."""
    out = []
    for p in sfdisk_partitions(image):
        number = int(p["node"][len(str(image)) :])
        size = p["size"] * 512
        if p["type"] in ("5", "f", "85"):
            size = 1024
        out.append((number, p["start"] * 512, size))
    return out


def parse(image: Path) -> list[loopdev.PartitionEntry]:
    with open(image, "rb") as f:
        return loopdev.read_partition_table(f, image.stat().st_size, what=str(image))


# --- the partition-table parser (plain files) -------------------------------------


def test_mbr_parser_finds_primary_extended_and_logical_partitions_like_sfdisk(tmp_path):
    """Primaries 1-2, extended 3 (1 KiB like the kernel), logical 5 and 6 at sfdisk's offsets."""
    image = partitioned_image(tmp_path / "mbr.img", MBR_SCRIPT)
    table = parse(image)
    assert [(p.number, p.start, p.size) for p in table] == expected_table(image)
    assert [p.scheme for p in table] == ["primary", "primary", "extended", "logical", "logical"]
    assert table[1].type == "0x82"


def test_gpt_parser_reads_entries_types_and_names_like_sfdisk(tmp_path):
    """A GPT behind its protective MBR: numbers, offsets, type GUIDs and names."""
    image = partitioned_image(tmp_path / "gpt.img", GPT_SCRIPT)
    table = parse(image)
    assert [(p.number, p.start, p.size) for p in table] == expected_table(image)
    assert table[0].name == "root"
    assert table[0].type == "0fc63daf-8483-4772-8e79-3d69d8477de4"
    assert {p.scheme for p in table} == {"gpt"}


def test_gpt_with_corrupt_primary_header_falls_back_to_the_backup(tmp_path):
    """A primary header failing its CRC is ignored; the backup header's entries are used."""
    image = partitioned_image(tmp_path / "gpt.img", GPT_SCRIPT)
    good = parse(image)
    with open(image, "r+b") as f:
        f.seek(512 + 40)  # inside the primary header (first usable LBA)
        f.write(b"\xff")
    assert parse(image) == good


def test_gpt_with_both_headers_corrupt_is_a_device_error(tmp_path):
    """If neither GPT header passes its checks, attaching must not guess: DeviceError."""
    image = partitioned_image(tmp_path / "gpt.img", GPT_SCRIPT)
    size = image.stat().st_size
    with open(image, "r+b") as f:
        for offset in (512 + 40, size - 512 + 40):
            f.seek(offset)
            f.write(b"\xff")
    with pytest.raises(E.DeviceError, match="cannot read partition table of .*CRC"):
        parse(image)


def test_gpt_entry_array_crc_mismatch_is_detected(tmp_path):
    """Corrupting one entry of both entry arrays fails their CRC (no silent bad offsets)."""
    image = partitioned_image(tmp_path / "gpt.img", GPT_SCRIPT)
    size = image.stat().st_size
    with open(image, "r+b") as f:
        for offset in (1024 + 32, size - 33 * 512 + 32):  # first_lba of entry 1, both arrays
            f.seek(offset)
            f.write(b"\x01")
    with pytest.raises(E.DeviceError, match="entry array fails its CRC"):
        parse(image)


def test_image_without_a_table_has_no_partitions(tmp_path):
    """No 0x55AA signature: no partitions, no error."""
    image = sparse_file(tmp_path / "raw.img", 4 * MIB)
    assert parse(image) == []


def test_partitions_beyond_the_end_of_a_truncated_image_are_skipped(tmp_path):
    """An image cut short keeps only the partitions that still fit."""
    image = partitioned_image(tmp_path / "mbr.img", MBR_SCRIPT)
    os.truncate(image, 12 * MIB)  # 1, 2 and the extended container fit; logical 5 and 6 do not
    assert [p.number for p in parse(image)] == [1, 2, 3]


# --- attach and detach ------------------------------------------------------------


def assert_gone(device: str, tmp_path: Path) -> None:
    """Detached from this test's file, and if still unbound, without partitions or nodes.

    (Another test session may reuse the loop device number at once.)
    """
    deadline = time.monotonic() + 2
    while (backing_file(device) or "").startswith(f"{tmp_path}/"):
        assert time.monotonic() < deadline, f"{device} still attached"
        time.sleep(0.02)
    if backing_file(device) is None:
        assert sysfs_partitions(device) == [], f"{device} still has partitions"
        name = os.path.basename(device)
        assert not [n for n in os.listdir("/dev") if n.startswith(name + "p")]


def backing_file(device: str) -> str | None:
    try:
        return Path(f"/sys/block/{os.path.basename(device)}/loop/backing_file").read_text().strip()
    except OSError:
        return None


@needs_loop
def test_attach_read_only_exposes_mbr_partitions_including_logical_ones(tmp_path):
    """Read-only attach: ro loop device, loopNp1..p6 nodes with sfdisk's sizes; all gone after."""
    image = partitioned_image(tmp_path / "mbr.img", MBR_SCRIPT)
    with loopdev.attached(str(image), read_only=True, tag="t") as att:
        name = os.path.basename(att.device)
        assert Path(f"/sys/block/{name}/ro").read_text().strip() == "1"
        assert Path(f"/sys/block/{name}/loop/backing_file").read_text().strip() == str(image)
        assert att.partitions == [f"{att.device}p{n}" for n in (1, 2, 3, 5, 6)]
        for number, _start, size in expected_table(image):
            node = f"{att.device}p{number}"
            assert stat.S_ISBLK(os.stat(node).st_mode)
            sectors = int(Path(f"/sys/block/{name}/{name}p{number}/size").read_text())
            assert sectors * 512 == size
        fd = os.open(att.device, os.O_WRONLY)
        try:
            with pytest.raises(OSError):
                os.write(fd, bytes(512))
        finally:
            os.close(fd)
    assert_gone(att.device, tmp_path)


@needs_loop
def test_attach_gpt_partitions_and_data_written_through_them_lands_in_the_file(tmp_path):
    """Writes to loopNp2 appear in the image file at the partition's offset."""
    image = partitioned_image(tmp_path / "gpt.img", GPT_SCRIPT)
    with loopdev.attached(str(image), read_only=False) as att:
        assert att.partitions == [f"{att.device}p{n}" for n in (1, 2, 3)]
        fd = os.open(f"{att.device}p2", os.O_WRONLY)
        try:
            os.write(fd, b"partition two".ljust(4096, b"\0"))
            os.fsync(fd)
        finally:
            os.close(fd)
    assert_gone(att.device, tmp_path)
    with open(image, "rb") as f:
        f.seek(10240 * 512)
        assert f.read(13) == b"partition two"


@needs_loop
def test_attach_without_partitions_adds_none(tmp_path):
    """partitions=False leaves the table alone: the loop device has no loopNpM."""
    image = partitioned_image(tmp_path / "mbr.img", MBR_SCRIPT)
    with loopdev.attached(str(image), read_only=True, partitions=False) as att:
        assert att.partitions == [] and sysfs_partitions(att.device) == []
    assert_gone(att.device, tmp_path)


@needs_loop
def test_keyboard_interrupt_inside_attached_still_detaches_and_deletes_partitions(
    tmp_path, default_sigint
):
    """Ctrl-C (a real SIGINT) in the block: KeyboardInterrupt propagates, nothing is left."""
    image = partitioned_image(tmp_path / "mbr.img", MBR_SCRIPT)
    with pytest.raises(KeyboardInterrupt), loopdev.attached(str(image), read_only=True) as att:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the signal interrupts this
    assert_gone(att.device, tmp_path)


@needs_loop
def test_exception_inside_attached_propagates_after_cleanup(tmp_path):
    """An error in the block is not masked; the device is detached first."""
    image = partitioned_image(tmp_path / "gpt.img", GPT_SCRIPT)
    with (
        pytest.raises(ValueError, match="boom"),
        loopdev.attached(str(image), read_only=False) as att,
    ):
        raise ValueError("boom")
    assert_gone(att.device, tmp_path)


@needs_loop
def test_partitions_added_by_a_script_are_deleted_too(tmp_path):
    """A script that adds partitions itself (partx/addpart) does not leak them."""
    image = sparse_file(tmp_path / "blank.img", 32 * MIB)
    with loopdev.attached(str(image), read_only=False) as att:
        assert att.partitions == []
        run("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", att.device, input=MBR_SCRIPT)
        run("partx", "-a", att.device)
        assert len(sysfs_partitions(att.device)) == 5
    assert_gone(att.device, tmp_path)


@needs_loop
def test_mounted_partition_at_exit_raises_busy_naming_device_and_mount_point(tmp_path):
    """A partition still mounted at exit: BusyError names the device and the mount;
    the other partitions are deleted, and the kernel detaches it once unmounted."""
    image = partitioned_image(tmp_path / "mbr.img", MBR_SCRIPT)
    mnt = tmp_path / "mnt"
    with (
        pytest.raises(E.BusyError) as info,
        loopdev.attached(str(image), read_only=False, timeout=0.3) as att,
    ):
        run("mkfs.ext4", "-q", f"{att.device}p1")
        run("mount", f"{att.device}p1", str(mnt.mkdir() or mnt))
    try:
        message = str(info.value)
        assert message.startswith(f"cannot detach '{att.device}' ({image}): ")
        assert f"partition '{att.device}p1' is busy: mounted at '{mnt}'" in message
        assert sysfs_partitions(att.device) == [os.path.basename(att.device) + "p1"]
    finally:
        run("umount", str(mnt))
    assert_gone(att.device, tmp_path)  # autoclear + partscan finish the job on the last close


@needs_loop
def test_process_holding_the_device_is_named_in_the_busy_error(tmp_path):
    """A child that keeps the loop device open is reported as 'open by pid N (sleep)'."""
    image = sparse_file(tmp_path / "disk.img", 4 * MIB)
    holder = None
    try:
        with (
            pytest.raises(E.BusyError, match=r"open by pid \d+ \(sleep\)"),
            loopdev.attached(str(image), read_only=True, timeout=0.3) as att,
            open(att.device, "rb") as dev,
        ):
            holder = subprocess.Popen(["sleep", "30"], stdin=dev)
    finally:
        if holder:
            holder.kill()
            holder.wait()
    assert_gone(att.device, tmp_path)


@needs_loop
def test_concurrent_attaches_get_distinct_devices(tmp_path):
    """Threads racing for LOOP_CTL_GET_FREE each end up with their own device."""
    images = [sparse_file(tmp_path / f"d{i}.img", MIB) for i in range(4)]
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(images))

    def worker(i: int) -> None:
        try:
            barrier.wait()
            with loopdev.attached(str(images[i]), read_only=True, partitions=False) as att:
                results[i] = att.device
                backing = Path(f"/sys/block/{os.path.basename(att.device)}/loop/backing_file")
                assert backing.read_text().strip() == str(images[i])
                barrier.wait()
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(set(results.values())) == len(images)
    for device in results.values():
        assert_gone(device, tmp_path)


@needs_loop
def test_state_record_lists_device_and_partitions_while_attached_and_goes_away(tmp_path):
    """With a state_dir, a JSON record names the device, backing file and partitions."""
    image = partitioned_image(tmp_path / "gpt.img", GPT_SCRIPT)
    state = tmp_path / "state"
    with loopdev.attached(str(image), read_only=True, tag="web1:disk0", state_dir=str(state)) as a:
        records = loopctl.records(str(state)).read_all()
        record = records[os.path.basename(a.device)]
        assert record["backing_file"] == str(image)
        assert record["partitions"] == a.partitions
        assert record["tag"] == "web1:disk0"
        assert loopctl.Marker.parse(f"ganeti-vol:{record['pid']}:{record['start_time']}:x")
    assert loopctl.records(str(state)).read_all() == {}


def test_ensure_node_creates_a_missing_node_with_mknod(tmp_path):
    """When devtmpfs does not provide a node in time, it is made from the device number."""
    devnum = os.makedev(7, 250)
    node = tmp_path / "loop250"
    assert loopctl.ensure_node(str(node), devnum, timeout=0.1) is True
    st = os.stat(node)
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == devnum
    assert loopctl.ensure_node(str(node), devnum, timeout=0.1) is False


# --- block devices for OS scripts ---------------------------------------------------


@needs_loop
def test_block_devices_for_attaches_file_disks_and_passes_block_devices_through(tmp_path):
    """File disks become loop devices (ro as asked); block devices and pathless disks stay."""
    d0 = sparse_file(tmp_path / "d0.img", 4 * MIB)
    d2 = sparse_file(tmp_path / "d2.img", 4 * MIB)
    other = sparse_file(tmp_path / "other.img", 4 * MIB)
    with foreign_loop(other) as blockdev:
        disks = [
            Disk(path=str(d0), size_mib=4, uuid="u0"),
            Disk(path=blockdev, size_mib=4, uuid="u1"),
            Disk(path=str(d2), size_mib=4, uuid="u2", access="ro"),
            Disk(path=None, size_mib=4, uuid="u3"),
        ]
        with loopdev.block_devices_for(disks, read_only=False) as mapping:
            assert sorted(mapping) == [0, 1, 2]
            assert mapping[1] == blockdev
            for index, image in ((0, d0), (2, d2)):
                name = os.path.basename(mapping[index])
                backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
                assert backing == str(image)
            ro = {
                i: Path(f"/sys/block/{os.path.basename(mapping[i])}/ro").read_text().strip()
                for i in (0, 2)
            }
            assert ro == {0: "0", 2: "1"}
        assert_gone(mapping[0], tmp_path)
        assert_gone(mapping[2], tmp_path)
        assert is_bound(blockdev)


@needs_loop
def test_block_devices_for_detaches_earlier_disks_when_a_later_one_fails(tmp_path):
    """A missing second disk: DeviceError, and the first disk's loop device is gone."""
    d0 = sparse_file(tmp_path / "d0.img", 4 * MIB)
    disks = [
        Disk(path=str(d0), size_mib=4, uuid="u0"),
        Disk(path=str(tmp_path / "missing.img"), size_mib=4, uuid="u1"),
    ]
    with (
        pytest.raises(E.DeviceError, match="cannot use disk 1"),
        loopdev.block_devices_for(disks, read_only=True),
    ):
        pass
    assert loops_backed_under(tmp_path) == []


# --- crashes and cleanup --------------------------------------------------------------

CRASHER = textwrap.dedent(
    """
    import subprocess, sys, time
    from ganeti_vol.system import loopdev
    image, state, hold = sys.argv[1], sys.argv[2], sys.argv[3] == "hold"
    with loopdev.attached(image, read_only=False, state_dir=state, tag="crash") as att:
        holder = None
        if hold:
            holder = subprocess.Popen(["sleep", "60"], stdin=open(att.device, "rb"))
        print(att.device, holder.pid if holder else 0, flush=True)
        time.sleep(60)
    """
)


def about(actions: list[loopleftovers.CleanupAction], *devices: str) -> list[loopleftovers.CleanupAction]:
    """The cleanup actions concerning ``devices`` (other sessions may share the machine)."""
    return [a for a in actions if a.device in devices]


def crash_inside_attached(image: Path, state: Path, hold: bool) -> tuple[str, int]:
    """Run a ganeti-vol process that attaches ``image`` and SIGKILL it mid-block."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHER, str(image), str(state), "hold" if hold else "-"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        device, holder = proc.stdout.readline().split()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    return device, int(holder)


@needs_loop
def test_crash_without_other_users_leaves_nothing_attached_and_cleanup_forgets_it(tmp_path):
    """SIGKILL inside attached(): autoclear+partscan detach it; cleanup drops the record."""
    image = partitioned_image(tmp_path / "mbr.img", MBR_SCRIPT)
    state = tmp_path / "state"
    device, _ = crash_inside_attached(image, state, hold=False)
    assert_gone(device, tmp_path)
    actions = about(loopleftovers.cleanup(str(state), under=str(tmp_path)), device)
    assert [(a.device, a.action, a.done) for a in actions] == [(device, "forget-record", True)]
    assert loopctl.records(str(state)).read_all() == {}


@needs_loop
def test_cleanup_detaches_a_leaked_device_and_never_touches_foreign_ones(tmp_path):
    """A crashed run's device (held by an orphan) is reconciled; losetup's devices,
    attached and with partitions, or unbound with stale partitions, are left alone."""
    image = partitioned_image(tmp_path / "mbr.img", MBR_SCRIPT)
    foreign_image = partitioned_image(tmp_path / "foreign.img", GPT_SCRIPT)
    stale_image = partitioned_image(tmp_path / "stale.img", GPT_SCRIPT)
    state = tmp_path / "state"
    with foreign_loop(foreign_image, partitions=True) as foreign, \
            stale_partitions(stale_image) as stale:
        holder_pid = 0
        try:
            device, holder_pid = crash_inside_attached(image, state, hold=True)
            assert is_bound(device) and len(sysfs_partitions(device)) == 5
            assert len(sysfs_partitions(stale)) == 3

            def reconcile(dry_run: bool = False) -> list[loopleftovers.CleanupAction]:
                actions = loopleftovers.cleanup(str(state), dry_run, timeout=0.3, under=str(tmp_path))
                return about(actions, device, foreign, stale)

            dry = reconcile(dry_run=True)
            assert [(a.device, a.action, a.done) for a in dry] == [(device, "detach", False)]
            assert is_bound(device) and len(sysfs_partitions(device)) == 5

            busy = reconcile()
            assert [(a.device, a.action, a.done) for a in busy] == [(device, "detach", False)]
            assert f"open by pid {holder_pid} (sleep)" in busy[0].error
            assert sysfs_partitions(device) == []

            os.kill(holder_pid, signal.SIGKILL)
            holder_pid = 0
            assert_gone(device, tmp_path)
            final = reconcile()
            assert [(a.device, a.action, a.done) for a in final] == [
                (device, "forget-record", True)
            ]

            assert is_bound(foreign) and len(sysfs_partitions(foreign)) == 3
            assert not is_bound(stale) and len(sysfs_partitions(stale)) == 3
        finally:
            if holder_pid:
                os.kill(holder_pid, signal.SIGKILL)


@needs_loop
def test_cleanup_deletes_stale_partitions_it_has_a_record_for(tmp_path):
    """Partitions left on an unbound loop device by a dead ganeti-vol (per its record) go."""
    image = partitioned_image(tmp_path / "mbr.img", MBR_SCRIPT)
    state = tmp_path / "state"
    with stale_partitions(image) as stale:
        assert len(sysfs_partitions(stale)) == 5
        dead_pid = 2**22 + 1  # above pid_max: no such process
        loopctl.write_record(
            str(state), stale, {"device": stale, "pid": dead_pid, "start_time": 1, "tag": "x"}
        )
        actions = about(loopleftovers.cleanup(str(state), under=str(tmp_path)), stale)
        assert [(a.device, a.action, a.done) for a in actions] == [
            (stale, "delete-partitions", True)
        ]
        assert sysfs_partitions(stale) == []
        assert loopctl.records(str(state)).read_all() == {}


# --- the suite's own leak check ---------------------------------------------------------


@needs_loop
def test_suite_leak_check_fails_a_session_that_leaks_a_loop_device(tmp_path):
    """The conftest leak check turns a leaked loop device into a failed run."""
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (inner / "test_leak.py").write_text(
        textwrap.dedent(
            """
            import subprocess

            def test_leaks(tmp_path):
                image = tmp_path / "leak.img"
                image.write_bytes(bytes(1 << 20))
                subprocess.run(["losetup", "-f", str(image)], check=True)
            """
        )
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'bt'}",
            str(inner),
        ],
        capture_output=True,
        text=True,
        cwd=inner,
        timeout=120,
    )
    leftovers = force_detach_under(tmp_path / "bt")
    assert len(leftovers) == 1
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "LEAKED loop devices/partitions after the test session" in proc.stdout
    assert "1 passed" in proc.stdout


@needs_loop
def test_cli_cleanup_reports_what_it_did_and_dry_run_changes_nothing(tmp_path, node_dirs, capsys):
    """`ganeti-vol cleanup [--dry-run] [--json]` uses the node's state_dir and says what it did."""
    image = partitioned_image(tmp_path / "mbr.img", MBR_SCRIPT)
    device, _ = crash_inside_attached(image, node_dirs["state"], hold=False)
    assert_gone(device, tmp_path)  # autoclear waits for the last opener (udev, on a busy host)
    assert main(["cleanup", "--dry-run", "--json", "--under", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] is True
    # the number may be bound by another user of loop devices meanwhile: then the reason says so
    (dry,) = about([loopleftovers.CleanupAction(**a) for a in report["loop_devices"]], device)
    assert (dry.action, dry.done) == ("forget-record", False)
    assert dry.reason == "not attached any more" or dry.reason.startswith("now used by ")
    assert main(["cleanup", "--under", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (done,) = [line for line in out.splitlines() if line.startswith(f"{device}: ")]
    assert done.startswith(f"{device}: forget-record (") and done.endswith("): done")
    assert main(["cleanup", "--dry-run", "--under", str(tmp_path)]) == 0
    assert f"{device}:" not in capsys.readouterr().out


@needs_loop
def test_attach_never_takes_an_unbound_device_left_with_partitions(tmp_path):
    """Regression (a flaky cleanup test): when every lower loop device is bound, the
    kernel's "free" device is one a crashed run left unbound with its partitions; taking
    it showed that other disk's partitions as ours.  ganeti-vol adds a new device instead."""
    image = partitioned_image(tmp_path / "mbr.img", MBR_SCRIPT)
    stale_image = partitioned_image(tmp_path / "stale.img", GPT_SCRIPT)
    filler = sparse_file(tmp_path / "filler.img", MIB)
    bound: list[str] = []
    with stale_partitions(stale_image) as stale:
        stale_parts = sysfs_partitions(stale)
        try:
            # bind every unbound device numbered below the stale one: it is then the
            # kernel's answer to LOOP_CTL_GET_FREE
            number = int(stale[len("/dev/loop"):])
            for name in sorted(os.listdir("/sys/block")):
                if (name.startswith("loop") and name[4:].isdigit() and int(name[4:]) < number
                        and not is_bound(f"/dev/{name}")):
                    if subprocess.run(["losetup", f"/dev/{name}", str(filler)],
                                      capture_output=True).returncode == 0:
                        bound.append(f"/dev/{name}")
            with loopdev.attached(str(image), read_only=True, tag="t") as att:
                assert att.device != stale
                assert len(att.partitions) == 5
            assert sysfs_partitions(stale) == stale_parts and not is_bound(stale)
        finally:
            for dev in bound:
                subprocess.run(["losetup", "-d", dev], capture_output=True)
