"""What OS scripts write through loop devices reaches the disk, and they see it (issues 11, 12).

Issue 11 A1/A2: an OS with ``[disks] access = block`` gets each file disk as a
loop device (with its MBR partitions, added with BLKPG on this kernel).  What
its scripts write through the device or a partition must land in the disk
file, reads through any node must see writes through any other, and a write
that fails must fail the operation.  Issue 11 A5: ``instance create`` fails a
script that truncates a disk or leaves a partition behind.  Issue 12 A9: a
script that gets a block device sees ``DISK_n_BACKEND_TYPE=block``.

Real loop devices, real sfdisk tables, real shell scripts, a real full tmpfs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from disk_helpers import MIB, force_detach_under, needs_loop, run

from ganeti_vol.core import errors as E
from ganeti_vol.core import libc
from ganeti_vol.core.model import Instance
from ganeti_vol.ganeti import fields
from ganeti_vol.ops import operations, transfer
from ganeti_vol.system import devices, loopctl, loopdev, loopleftovers

pytestmark = needs_loop

DISK_SIZE = 16 * MIB
#: one Linux partition from sector 2048 (1 MiB) over 8 MiB
TABLE = "label: dos\nstart=2048, size=16384, type=83\n"
P1 = 2048 * 512
FAIL = 'fail() { echo "$*" >&2; exit 1; }\n'


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path):
    """Nothing these tests attach may stay attached (detached anyway on failure)."""
    yield
    assert [] == force_detach_under(tmp_path), "a test left loop devices attached"


@pytest.fixture
def ctx(node_config):
    return operations.OpContext(node=node_config)


def block_os(os_factory, name="blockos", **scripts):
    """An OS definition that asks for block devices with partitions (ganeti_vol.conf)."""
    d = os_factory(name, scripts=scripts)
    (d / "ganeti_vol.conf").write_text("[disks]\naccess = block\npartitions = yes\n")
    return d


def partitioned_disk(path: Path, size: int = DISK_SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    run("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path), input=TABLE)
    return path


def instance(disk: Path, os_name="blockos+default", name="inst1.example.com",
             size: int = DISK_SIZE) -> Instance:
    uuid = fields.instance_uuid_for(name)
    return Instance(name=name, os=os_name, uuid=uuid, ctime=1.0, mtime=1.0,
                    disks=(fields.make_disk(0, uuid, path=str(disk), size=size),))


def read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


@pytest.fixture
def payload(tmp_path) -> Path:
    path = tmp_path / "payload.bin"
    path.write_bytes(os.urandom(2 * MIB))
    return path


# --- A1: writes through the loop device reach the file ------------------------------------

#: where each script writes the payload (no fsync, no conv=fsync), and the file offset it lands at
WRITES = {
    "whole device": ('dd if={payload} of="$DISK_0_PATH" bs=1M seek=4 conv=notrunc status=none',
                     4 * MIB),
    "partition": ('dd if={payload} of="$DISK_0_PATH"p1 bs=1M seek=1 conv=notrunc status=none',
                  P1 + MIB),
}


@pytest.mark.parametrize("operation", ["create", "reinstall", "rename"])
@pytest.mark.parametrize("where", sorted(WRITES))
def test_writes_without_fsync_through_the_loop_device_reach_the_disk_file(
    tmp_path, ctx, os_factory, payload, operation, where
):
    """A script's plain `dd of=$DISK_0_PATH` (no fsync) lands in the file, it is not lost
    when the loop device is detached (it was: the kernel logged I/O errors, create exited 0)."""
    command, offset = WRITES[where]
    script = command.format(payload=payload) + "\n"
    block_os(os_factory, **{"create" if operation != "rename" else "rename": script})
    disk = partitioned_disk(tmp_path / "d0.img")
    inst = instance(disk)
    if operation == "rename":
        operations.rename(ctx, inst, "inst2.example.com")
    else:
        operations.create(ctx, inst, reinstall=operation == "reinstall")
    assert payload.read_bytes() == read_at(disk, offset, 2 * MIB)
    assert () == devices.loop_devices_backed_by(str(disk))


def test_import_script_writing_without_fsync_leaves_the_data_in_the_disk(
    tmp_path, ctx, os_factory, payload
):
    """`exec dd of=$IMPORT_DEVICE` without fsync: every imported byte is in the target file."""
    block_os(os_factory, **{"import": 'exec dd of="$IMPORT_DEVICE" bs=1M iflag=fullblock '
                                      'conv=notrunc status=none\n'})
    source = partitioned_disk(tmp_path / "src.img")
    with open(source, "r+b") as f:
        f.seek(3 * MIB)
        f.write(payload.read_bytes())
    transfer.export_instance(ctx, instance(source), raw=True)
    target = tmp_path / "dst.img"
    result = transfer.import_instance(ctx, instance(target), "inst1.example.com", raw=False)
    assert ["script"] == [d["mode"] for d in result.to_json()["disks"]]
    assert source.read_bytes() == target.read_bytes()


@pytest.fixture
def full_fs(tmp_path):
    """A 4 MiB tmpfs: a 16 MiB sparse disk file in it cannot take 8 MiB of data."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point))
    try:
        yield mount_point
    finally:
        force_detach_under(mount_point)
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.mark.parametrize("where", ["", "p1"])
def test_writes_the_loop_device_could_not_store_fail_the_create(
    tmp_path, ctx, os_factory, full_fs, where
):
    """The disk file's filesystem fills up under a script's dd: create fails naming the file
    and the cause (exit 19), instead of exiting 0 with the data gone."""
    block_os(os_factory, create=f'head -c 8388608 /dev/zero | tr "\\0" x | '
                                f'dd of="$DISK_0_PATH"{where} bs=1M status=none\n')
    disk = partitioned_disk(full_fs / "d0.img")
    with pytest.raises(E.NoSpaceError) as err:
        operations.create(ctx, instance(disk))
    message = str(err.value)
    assert f"cannot write '{disk}' through '/dev/loop" in message, message
    assert "(the file's filesystem is full)" in message
    assert "data written through the loop device was lost" in message
    assert 19 == err.value.exit_code
    assert () == devices.loop_devices_backed_by(str(disk))


def test_a_write_that_lands_after_the_final_flush_is_reported_as_lost(tmp_path):
    """The check teardown makes after LOOP_CLR_FD: once the detach has begun (we were the
    last user), a page dirtied after the flush cannot be written, and that is an error."""
    import fcntl

    image = partitioned_disk(tmp_path / "d0.img")
    device = run("losetup", "-f", "--show", str(image)).strip()
    try:
        fd = os.open(device, os.O_RDWR)
        try:
            os.pwrite(fd, b"late", 0)  # in the cache only, as if written after the flush
            fcntl.ioctl(fd, loopctl.LOOP_CLR_FD)
            with pytest.raises(OSError) as err:
                libc.sync_file_range(fd)
            assert 5 == err.value.errno  # EIO
        finally:
            os.close(fd)
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True)
    assert bytes(4) == read_at(image, 0, 4)  # indeed lost


def test_writes_through_a_held_loop_device_reach_the_file_at_detach(tmp_path):
    """ganeti-vol's own writes (or an osapi script's) through a device it holds, no fsync:
    the detach writes them back (they were lost) and, with nothing lost, raises nothing."""
    image = partitioned_disk(tmp_path / "d0.img")
    with loopdev.attached(str(image), read_only=False) as att, \
            open(att.device, "r+b", buffering=0) as f:
        f.seek(5 * MIB)
        f.write(b"kept")
    assert b"kept" == read_at(image, 5 * MIB, 4)


# --- A2: reads through one node see writes through another ----------------------------------

COHERENT = FAIL + f"""
printf OLD | dd of="$DISK_0_PATH" bs=512 seek={P1 // 512} conv=notrunc status=none
[ "$(head -c 3 "$DISK_0_PATH"p1)" = OLD ] || fail "p1 does not see the write through the disk"
printf NEW | dd of="$DISK_0_PATH"p1 conv=notrunc status=none
seen=$(dd if="$DISK_0_PATH" bs=512 skip={P1 // 512} count=1 status=none | head -c 3)
[ "$seen" = NEW ] || fail "the disk does not see the write through p1: '$seen'"
"""


def test_script_reads_through_the_disk_and_its_partitions_see_each_others_writes(
    tmp_path, ctx, os_factory
):
    """Written through the whole device, read through p1, and back: each read sees the last
    write, as on a real disk (the held loop device kept a stale cache), and p1's wins."""
    block_os(os_factory, create=COHERENT)
    disk = partitioned_disk(tmp_path / "d0.img")
    operations.create(ctx, instance(disk))
    assert b"NEW" == read_at(disk, P1, 3)


def test_each_script_of_an_operation_sees_what_the_one_before_wrote(tmp_path, ctx, os_factory):
    """The import script writes through the disk, the rename after it reads through p1."""
    rename = FAIL + '[ "$(head -c 4 "$DISK_0_PATH"p1)" = DATA ] || fail "rename: stale p1"\n'
    block_os(os_factory, rename=rename, **{"import": "exec dd of=\"$IMPORT_DEVICE\" bs=1M "
                                                      "iflag=fullblock conv=notrunc status=none\n"})
    source = partitioned_disk(tmp_path / "src.img")
    with open(source, "r+b") as f:
        f.seek(P1)
        f.write(b"DATA")
    transfer.export_instance(ctx, instance(source, name="old.example.com"), raw=True)
    target = tmp_path / "dst.img"
    result = transfer.import_instance(ctx, instance(target), "old.example.com", raw=False)
    assert "ok" == result.to_json()["rename"]["status"], result.to_json()["rename"]
    assert b"DATA" == read_at(target, P1, 4)


# --- A5: instance create checks what the script did to the disks -----------------------------


@pytest.mark.parametrize(("command", "how"), [
    ('truncate -s 8M "$DISK_0_PATH"', "truncated from 16777216 to 8388608 bytes"),
    ('truncate -s 0 "$DISK_0_PATH"; echo x > "$DISK_0_PATH"', "truncated from 16777216 to 2"),
    ('truncate -s 32M "$DISK_0_PATH"', "grown from 16777216 to 33554432 bytes"),
])
def test_instance_create_fails_when_the_script_changes_a_disk_size(
    tmp_path, ctx, os_factory, command, how
):
    """qemu-img convert onto a file disk, `> $DISK_0_PATH`: the disk shrinks under the
    instance.  create exits non-zero naming the disk (it said ok)."""
    os_factory("fileos", scripts={"create": command + "\n"})
    disk = tmp_path / "d0.img"
    with pytest.raises(E.DeviceError) as err:
        operations.create(ctx, instance(disk, os_name="fileos+default"))
    assert f"disk 0 of instance 'inst1.example.com' ('{disk}') was {how}" in str(err.value)


def test_instance_create_fails_on_a_stale_partition_and_removes_it(tmp_path, ctx, os_factory):
    """cloudimage's create: losetup, partx -a, losetup -d leaves loopNp1 on an unbound
    device (BLKPG partitions outlive the detach here).  create fails naming it, and deletes it."""
    create = """
dev=$(losetup -f --show "$DISK_0_PATH")
partx -a "$dev"
echo "$dev" > "$RECORD"
losetup -d "$dev"
"""
    rec = tmp_path / "dev.txt"
    os_factory("fileos", scripts={"create": f"RECORD={rec}\n" + create})
    disk = partitioned_disk(tmp_path / "d0.img")
    with pytest.raises(E.DeviceError) as err:
        operations.create(ctx, instance(disk, os_name="fileos+default"))
    dev = rec.read_text().strip()
    assert f"left partition(s) {dev}p1 on {dev}; deleted" in str(err.value)
    assert frozenset() == devices.partition_paths(dev)


def test_instance_create_fails_on_a_loop_device_left_attached_to_a_disk(
    tmp_path, ctx, os_factory
):
    """A create that attaches the disk and forgets it: the disk stays held; create fails."""
    rec = tmp_path / "dev.txt"
    os_factory("fileos", scripts={"create": f'losetup -f --show "$DISK_0_PATH" > {rec}\n'})
    disk = tmp_path / "d0.img"
    with pytest.raises(E.DeviceError) as err:
        operations.create(ctx, instance(disk, os_name="fileos+default"))
    dev = rec.read_text().strip()
    assert f"left {dev} attached (backing '{disk}'); detached" in str(err.value)
    assert () == devices.loop_devices_backed_by(str(disk))


# --- issue 12 A9: DISK_n_BACKEND_TYPE follows DISK_n_PATH ------------------------------------

#: every script checks every disk: a block device must be "block", a file "file:..."
CONSISTENT = FAIL + """
i=0
while [ "$i" -lt "$DISK_COUNT" ]; do
  eval "path=\\$DISK_${i}_PATH type=\\$DISK_${i}_BACKEND_TYPE"
  if [ -b "$path" ]; then want=block; else want=file:loop; fi
  [ "$type" = "$want" ] || fail "DISK_${i}_PATH=$path but DISK_${i}_BACKEND_TYPE=$type"
  echo "$0 $path $type" >> "$RECORD"
  i=$((i + 1))
done
"""


def test_scripts_given_a_loop_device_see_backend_type_block(tmp_path, ctx, os_factory):
    """create, rename, export and import of an access=block OS: DISK_0_PATH is /dev/loopN
    and DISK_0_BACKEND_TYPE says block (it said file:loop, so size checks took the file path)."""
    rec = tmp_path / "seen.txt"
    body = f"RECORD={rec}\n" + CONSISTENT
    block_os(os_factory, create=body, rename=body,
             export="#!/bin/bash\n" + body + 'exec cat "$EXPORT_DEVICE"\n',
             **{"import": body + 'exec dd of="$IMPORT_DEVICE" bs=1M iflag=fullblock '
                                 'conv=notrunc status=none\n'})
    disk = partitioned_disk(tmp_path / "d0.img")
    inst = instance(disk)
    operations.create(ctx, inst)
    operations.rename(ctx, inst, "inst2.example.com")
    transfer.export_instance(ctx, inst)
    transfer.import_instance(ctx, instance(tmp_path / "d1.img", name="inst3.example.com"),
                             "inst1.example.com")
    lines = [line.split() for line in rec.read_text().splitlines()]
    scripts = {os.path.basename(script) for script, _, _ in lines}
    assert {"create", "rename", "export", "import"} <= scripts
    assert {(os.path.basename(s), t) for s, p, t in lines if p.startswith("/dev/loop")} >= \
        {("create", "block"), ("rename", "block"), ("import", "block")}



# --- letting go of the device: a killed ganeti-vol, another one at work ----------------------

RELEASER = """
import sys, time
from ganeti_vol.system import loopdev
with loopdev.attached(sys.argv[1], read_only=False, state_dir=sys.argv[2], hold=False) as att:
    print(att.device, flush=True)
    time.sleep(60)
"""


@pytest.fixture
def releaser(tmp_path):
    """A ganeti-vol process that attached d0.img and let go of it for its scripts."""
    from conftest import REPO

    image = partitioned_disk(tmp_path / "d0.img")
    proc = subprocess.Popen([sys.executable, "-c", RELEASER, str(image), str(tmp_path)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        device = proc.stdout.readline().strip()
        yield proc, image, device
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        loopleftovers.cleanup(str(tmp_path), under=str(tmp_path))  # what an operator would run


def test_a_device_let_go_of_by_a_killed_ganeti_vol_is_reclaimed_by_the_next_attach(
    tmp_path, releaser
):
    """kill -9 while the scripts had the device: it stays attached (autoclear was off),
    and the next attach of the same file detaches it before taking a new one."""
    proc, image, device = releaser
    proc.kill()
    proc.wait()
    assert (device,) == devices.loop_devices_backed_by(str(image))
    with loopdev.attached(str(image), read_only=True, state_dir=str(tmp_path)) as att:
        assert (att.device,) == devices.loop_devices_backed_by(str(image))
    assert () == devices.loop_devices_backed_by(str(image))


def test_a_device_another_running_ganeti_vol_attached_is_never_a_leftover(tmp_path, releaser):
    """create's post-check must not detach a concurrent operation's device from under it;
    a device the script attached with losetup is one."""
    before = loopleftovers.loop_state()
    proc, image, device = releaser
    foreign = run("losetup", "-f", "--show", str(image)).strip()
    after = loopleftovers.loop_state()
    found = loopleftovers.find_leftovers(before, after, lambda backing: backing == str(image),
                                   disks=[str(image)])
    assert [foreign] == found.leaked
    assert [("loop devices", f"left {foreign} attached (backing '{image}'); detached")] == \
        loopleftovers.clear_leftovers(found, after)
    assert (device,) == devices.loop_devices_backed_by(str(image))
