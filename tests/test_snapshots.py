"""Snapshot providers behind one interface: none, copy, reflink (real XFS), btrfs (real
btrfs), lvm and zfs (stand-in tools in tests/fakes that keep state on disk and fail
like the real ones).  Every provider is idempotent by tag, released on every path, and
never hands an export the live origin of a running instance (ganeti#1251)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO, sparse_file
from disk_helpers import MIB, foreign_loop, mounted, needs_loop, run, xfs_mount

from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Disk, Instance, NodeConfig
from ganeti_vol.system import snapshotlease, snapshotproviders, snapshots

FAKES = REPO / "tests" / "fakes"


@pytest.fixture
def node(tmp_path) -> NodeConfig:
    return NodeConfig(state_dir=str(tmp_path / "state"), snapshot_size_percent=20.0)


@pytest.fixture
def fake_tools(monkeypatch, tmp_path):
    """Put the stand-in lvm/zfs tools first on PATH, with their state under tmp_path."""
    # this interpreter's directory next: `env python3` then skips slow shims (pyenv)
    path = os.pathsep.join((str(FAKES), os.path.dirname(sys.executable), os.environ["PATH"]))
    monkeypatch.setenv("PATH", path)
    roots = {"lvm": tmp_path / "fake-lvm", "zfs": tmp_path / "fake-zfs"}
    monkeypatch.setenv("FAKE_LVM_ROOT", str(roots["lvm"]))
    monkeypatch.setenv("FAKE_ZFS_ROOT", str(roots["zfs"]))
    return roots


def tool(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and proc.returncode:
        raise AssertionError(f"{argv} failed: {proc.stderr}")
    return proc


def write_at(path: str | Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def hold_open(path: str) -> subprocess.Popen:
    """A child process that keeps ``path`` open (as its stdin) until killed."""
    with open(path, "rb") as f:
        return subprocess.Popen(["sleep", "30"], stdin=f)


def release_while_held(provider: snapshotlease.Provider, origin: str, match: str) -> None:
    """Snapshot ``origin`` as 't1' and keep it open in a child past the release timeout:
    the release must fail with a SnapshotError matching ``match``."""
    holder = None
    try:
        with pytest.raises(E.SnapshotError, match=match), provider.snapshot(origin, "t1") as info:
            holder = hold_open(info.path)
    finally:
        if holder:
            holder.kill()
            holder.wait()


def read_all(info: snapshotlease.SnapshotInfo) -> bytes:
    with info.open() as f:
        return f.read()


def data_disk(path: Path, size: int = 8 * MIB) -> Path:
    """A sparse disk with data at 0 and at 5 MiB, holes elsewhere."""
    sparse_file(path, size)
    write_at(path, 0, b"head" * 1024)
    write_at(path, 5 * MIB, b"tail" * 1024)
    return path


# --- choosing a provider -----------------------------------------------------------------


def test_instance_file_provider_overrides_the_node_default(node):
    """provider_for: the instance's snapshot_provider wins; '' falls back to the node's."""
    inst = Instance(name="web1", os="noop", uuid="0f3c-9a", ctime=0, mtime=0)
    assert snapshots.provider_for(inst, node.replace(snapshot_provider="copy")).name == "copy"
    inst2 = inst.replace(snapshot_provider="lvm")
    assert snapshots.provider_for(inst2, node.replace(snapshot_provider="copy")).name == "lvm"


def test_unknown_provider_is_a_usage_error(node):
    """get_provider('nfs') names the valid choices."""
    with pytest.raises(E.UsageError, match="unknown snapshot provider 'nfs'.*none, copy"):
        snapshots.get_provider("nfs", node)


def test_snapshot_tag_is_deterministic_per_instance_and_disk():
    """Same instance and disk: same tag (so a re-run finds a crashed run's snapshot)."""
    inst = Instance(name="web1", os="noop", uuid="7d0c1a2b-3c4d-5e6f", ctime=0, mtime=0)
    assert snapshots.snapshot_tag(inst, 1) == snapshots.snapshot_tag(inst.replace(), 1)
    assert snapshots.snapshot_tag(inst, 0) != snapshots.snapshot_tag(inst, 1)
    assert snapshotlease.TAG_RE.match(snapshots.snapshot_tag(inst, 1))


# --- none ----------------------------------------------------------------------------------


def test_none_provider_refuses_a_running_instance(node, tmp_path):
    """Provider 'none' reads the disk itself, so a running instance is a SnapshotError."""
    disk = data_disk(tmp_path / "disk.img")
    provider = snapshots.get_provider("none", node)
    with (
        pytest.raises(E.SnapshotError, match="running instance without a snapshot: stop"),
        provider.snapshot(str(disk), "t1", running=True),
    ):
        pass


def test_none_provider_reads_the_disk_of_a_stopped_instance(node, tmp_path):
    """Stopped instance: the disk itself, consistency 'stopped'."""
    disk = data_disk(tmp_path / "disk.img")
    with snapshots.get_provider("none", node).snapshot(str(disk), "t1", running=False) as info:
        assert info.path == str(disk) and info.consistency == "stopped"
        assert read_all(info)[:4] == b"head"


def test_export_never_reads_the_live_origin_of_a_running_instance_ganeti_1251(node, tmp_path):
    """A provider that hands back the origin itself is stopped by the guard (ganeti#1251)."""

    class Broken(snapshotproviders.NoneProvider):
        name = "broken"

        def _take(self, disk_path, tag, running):
            return snapshotlease.Taken(self._info(disk_path, disk_path, "crash-consistent"), lambda: 0)

    disk = data_disk(tmp_path / "disk.img")
    with (
        pytest.raises(E.SnapshotError, match="is the live origin of a running instance"),
        Broken(node).snapshot(str(disk), "t1", running=True),
    ):
        pass


def test_snapshot_info_open_refuses_a_file_that_is_not_the_snapshot(node, tmp_path):
    """If the snapshot path is swapped for another file, open() refuses to read it."""
    disk = data_disk(tmp_path / "disk.img")
    with snapshots.get_provider("copy", node).snapshot(str(disk), "t1", running=False) as info:
        os.unlink(info.path)
        os.link(disk, info.path)  # now the path leads to the origin
        with pytest.raises(E.SnapshotError, match="not the snapshot that was taken"):
            info.open()


# --- copy ----------------------------------------------------------------------------------


def test_copy_is_sparse_point_in_time_and_removed_afterwards(node, tmp_path):
    """The copy keeps holes, does not follow later writes to the origin, and is deleted."""
    disk = data_disk(tmp_path / "disk.img")
    with snapshots.get_provider("copy", node).snapshot(str(disk), "t1", running=False) as info:
        assert os.path.dirname(info.path) == os.path.join(node.state_dir, "snapshots")
        st = os.stat(info.path)
        assert st.st_size == 8 * MIB
        assert st.st_blocks * 512 <= 1 * MIB  # 8 KiB of data, not 8 MiB
        write_at(disk, 0, b"CHANGED!")
        data = read_all(info)
        assert data[:4] == b"head" and data[5 * MIB : 5 * MIB + 4] == b"tail"
        assert data[4096 : 5 * MIB] == bytes(5 * MIB - 4096)
        assert info.identity["file_id"] != snapshotlease.file_id(os.stat(disk))
    assert not os.path.exists(info.path)


def test_copy_of_a_running_instance_is_marked_fuzzy(node, tmp_path):
    """A copy is not atomic: for a running instance the consistency says 'fuzzy'."""
    disk = data_disk(tmp_path / "disk.img")
    with snapshots.get_provider("copy", node).snapshot(str(disk), "t1", running=True) as info:
        assert info.consistency == "fuzzy"
        assert info.identity["changed_during_copy"] is False


def test_copy_replaces_a_stale_copy_left_by_a_crashed_run(node, tmp_path):
    """Idempotent by tag: a leftover '<tag>.img' is replaced, not reused or fatal."""
    disk = data_disk(tmp_path / "disk.img")
    stale = Path(node.state_dir) / "snapshots" / "t1.img"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"stale data from a crashed run")
    with snapshots.get_provider("copy", node).snapshot(str(disk), "t1", running=False) as info:
        assert read_all(info)[:4] == b"head"


@needs_loop
def test_copy_refuses_a_block_device(node, tmp_path):
    """The copy provider is for file disks; a block device gets a clear SnapshotError."""
    with (
        foreign_loop(sparse_file(tmp_path / "d.img", MIB)) as dev,
        pytest.raises(E.SnapshotError, match="works on file disks only"),
        snapshots.get_provider("copy", node).snapshot(dev, "t1", running=False),
    ):
        pass


def test_copy_without_room_is_a_no_space_error_leaving_nothing(node, tmp_path):
    """A state_dir on a full filesystem: NoSpaceError before anything is written."""
    disk = sparse_file(tmp_path / "disk.img", 8 * MIB)
    write_at(disk, 0, os.urandom(2 * MIB))
    small = Path(node.state_dir)
    small.mkdir()
    with mounted("tmpfs", small, "-t", "tmpfs", "-o", "size=1m"):
        with (
            pytest.raises(E.NoSpaceError, match="2097152 bytes needed"),
            snapshots.get_provider("copy", node).snapshot(str(disk), "t1", running=False),
        ):
            pass
        assert sorted(os.listdir(small / "snapshots")) == ["t1.lock"]


def test_same_tag_in_use_by_another_export_is_busy(node, tmp_path):
    """Two exports of the same disk at once: the second gets BusyError, the first is intact."""
    disk = data_disk(tmp_path / "disk.img")
    provider = snapshots.get_provider("copy", node)
    with provider.snapshot(str(disk), "t1", running=False) as info:
        with (
            pytest.raises(E.BusyError, match="snapshot 't1' is in use by another export"),
            snapshots.get_provider("copy", node).snapshot(str(disk), "t1", running=False),
        ):
            pass
        assert read_all(info)[:4] == b"head"


def test_keyboard_interrupt_inside_a_snapshot_still_releases_it(node, tmp_path, default_sigint):
    """Ctrl-C while reading: the snapshot and its record are gone afterwards."""
    disk = data_disk(tmp_path / "disk.img")
    with (
        pytest.raises(KeyboardInterrupt),
        snapshots.get_provider("copy", node).snapshot(str(disk), "t1", running=False) as info,
    ):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    assert not os.path.exists(info.path)
    assert not (Path(node.state_dir) / "snapshots" / "t1.json").exists()


def test_cleanup_releases_the_snapshot_of_a_crashed_export(node, tmp_path):
    """SIGKILL while a copy snapshot exists: cleanup() finds its record and removes it."""
    disk = data_disk(tmp_path / "disk.img")
    code = textwrap.dedent(
        f"""
        import time
        from ganeti_vol.system import snapshots
        from ganeti_vol.core.model import NodeConfig
        node = NodeConfig(state_dir={node.state_dir!r})
        with snapshots.get_provider("copy", node).snapshot({str(disk)!r}, "t1") as info:
            print(info.path, flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        path = proc.stdout.readline().strip()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert os.path.exists(path)
    assert [(c.provider, c.tag, c.done) for c in snapshots.cleanup(node, dry_run=True)] == [
        ("copy", "t1", False)
    ]
    assert os.path.exists(path)
    assert [(c.provider, c.tag, c.done) for c in snapshots.cleanup(node)] == [("copy", "t1", True)]
    assert not os.path.exists(path)
    assert snapshots.cleanup(node) == []


# --- reflink (real XFS) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def xfs(tmp_path_factory):
    """A real XFS filesystem (reflink=1) on a loop device, mounted for this module."""
    with xfs_mount(tmp_path_factory.mktemp("xfs")) as mnt:
        yield mnt


@needs_loop
def test_reflink_on_xfs_is_an_instant_frozen_clone(node, xfs):
    """FICLONE on XFS: a separate file sharing blocks; later origin writes don't show."""
    disk = data_disk(xfs / "disk.img")
    with snapshots.get_provider("reflink", node).snapshot(str(disk), "t1", running=True) as info:
        assert info.consistency == "crash-consistent"
        assert os.path.dirname(info.path) == str(xfs)
        write_at(disk, 0, b"CHANGED!")
        assert read_all(info)[:4] == b"head"
    assert not os.path.exists(info.path)
    assert os.listdir(xfs) == ["disk.img"]


@needs_loop
def test_copy_snapshot_of_a_disk_on_another_filesystem_than_the_state_dir(node, xfs):
    """copy_file_range refuses to copy between filesystems (EXDEV): the copy reads and
    writes instead, and keeps the holes."""
    disk = data_disk(xfs / "other-fs.img")
    try:
        with snapshots.get_provider("copy", node).snapshot(str(disk), "t1",
                                                            running=False) as info:
            assert os.stat(info.path).st_dev != os.stat(disk).st_dev
            assert read_all(info) == disk.read_bytes()
            assert os.stat(info.path).st_blocks < os.stat(info.path).st_size // 512
    finally:
        disk.unlink()


def test_reflink_on_ext4_is_a_clear_error(node, tmp_path):
    """On a filesystem without reflinks the error says which one and what to use."""
    mount = snapshotproviders._fs_of(str(tmp_path))
    assert mount is not None and mount.fstype not in ("xfs", "btrfs")
    disk = data_disk(tmp_path / "disk.img")
    with (
        pytest.raises(E.SnapshotError, match=rf"\({mount.fstype} at .*use XFS .*or btrfs"),
        snapshots.get_provider("reflink", node).snapshot(str(disk), "t1"),
    ):
        pass
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".disk.img.snap")]


# --- btrfs (real btrfs) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def btrfs(tmp_path_factory):
    """A real btrfs filesystem on a loop device with a subvolume 'vms' holding disks."""
    base = tmp_path_factory.mktemp("btrfs")
    image = sparse_file(base / "btrfs.img", 256 * MIB)
    run("mkfs.btrfs", "-q", str(image))
    with foreign_loop(image) as dev, mounted(dev, base / "mnt") as mnt:
        run("btrfs", "subvolume", "create", str(mnt / "vms"))
        yield mnt / "vms"


@needs_loop
def test_btrfs_snapshot_is_read_only_and_frozen_and_deleted_after(node, btrfs):
    """A read-only subvolume snapshot holds the disk as it was; it is deleted on exit."""
    disk = data_disk(btrfs / "disk.img")
    with snapshots.get_provider("btrfs", node).snapshot(str(disk), "t1", running=True) as info:
        assert info.path == str(btrfs / ".ganeti-vol-snapshots" / "t1" / "disk.img")
        assert info.identity["snapshot_uuid"] and info.identity["subvolume"] == str(btrfs)
        write_at(disk, 0, b"CHANGED!")
        assert read_all(info)[:4] == b"head"
        with pytest.raises(OSError):
            write_at(info.path, 0, b"x")
    assert not os.path.exists(btrfs / ".ganeti-vol-snapshots" / "t1")


@needs_loop
def test_btrfs_replaces_a_stale_snapshot_with_the_same_tag(node, btrfs):
    """A snapshot left by a crashed run under the same tag is deleted and taken anew."""
    disk = data_disk(btrfs / "disk2.img")
    stale = btrfs / ".ganeti-vol-snapshots" / "t2"
    stale.parent.mkdir(exist_ok=True)
    run("btrfs", "subvolume", "snapshot", "-r", str(btrfs), str(stale))
    write_at(disk, 0, b"NEWDATA!")
    with snapshots.get_provider("btrfs", node).snapshot(str(disk), "t2") as info:
        assert read_all(info)[:8] == b"NEWDATA!"
    assert not stale.exists()


def test_btrfs_provider_refuses_a_disk_on_another_filesystem(node, tmp_path):
    """A file disk that is not on btrfs is a clear SnapshotError."""
    disk = data_disk(tmp_path / "disk.img")
    with (
        pytest.raises(E.SnapshotError, match="not btrfs"),
        snapshots.get_provider("btrfs", node).snapshot(str(disk), "t1"),
    ):
        pass


# --- lvm (stand-in tools) ------------------------------------------------------------------


def make_vg(tmp_path: Path, size: int, lv_size: int = 64 * MIB) -> str:
    """A VG of ``size`` bytes with one LV 'disk0'; returns the LV's path."""
    pv = sparse_file(tmp_path / "pv.img", size)
    tool("vgcreate", "vg", str(pv))
    tool("lvcreate", "-L", f"{lv_size}b", "-n", "disk0", "vg")
    path = tool("lvs", "--noheadings", "-o", "lv_path", "vg/disk0").stdout.strip()
    write_at(path, 0, b"head" * 1024)
    return path


def lv_names() -> list[str]:
    return tool("lvs", "--noheadings", "-o", "lv_name", "vg").stdout.split()


def test_fake_lvcreate_fails_like_lvm_when_the_vg_is_full(fake_tools, tmp_path):
    """The stand-in answers like LVM: exit 5 and 'insufficient free space (N extents)'."""
    make_vg(tmp_path, 100 * MIB)
    proc = tool("lvcreate", "-s", "-L", "64m", "-n", "s", "vg/disk0", check=False)
    assert proc.returncode == 5
    assert 'Volume group "vg" has insufficient free space (9 extents): 16 required.' in proc.stderr


def test_lvm_snapshot_is_sized_by_policy_not_100_percent_ganeti_915(fake_tools, tmp_path, node):
    """20 % of a 64 MiB LV rounds up to 16 MiB: it fits where Ganeti's 100 % would not."""
    origin = make_vg(tmp_path, 100 * MIB)  # 36 MiB free after the 64 MiB LV
    with snapshots.get_provider("lvm", node).snapshot(origin, "t1") as info:
        assert info.identity["snapshot_size"] == 16 * MIB
        assert info.identity["snapshot"] == "disk0-snap-t1"
        assert info.identity["vg"] == "vg" and info.identity["lv_uuid"]
        assert lv_names() == ["disk0", "disk0-snap-t1"]
        write_at(origin, 0, b"CHANGED!")
        assert read_all(info)[:4] == b"head"
    assert lv_names() == ["disk0"]


def test_lvm_refuses_when_the_vg_lacks_room_for_the_policy_size(fake_tools, tmp_path, node):
    """Free space is checked first: NoSpaceError names free and needed bytes; nothing made."""
    origin = make_vg(tmp_path, 72 * MIB)  # 8 MiB free, 16 MiB needed
    with (
        pytest.raises(E.NoSpaceError, match=r"has 8388608 bytes free, the snapshot needs 16777216"),
        snapshots.get_provider("lvm", node).snapshot(origin, "t1"),
    ):
        pass
    assert lv_names() == ["disk0"]


def test_lvm_overflow_during_the_read_fails_the_export(fake_tools, tmp_path, node):
    """Writes beyond the snapshot size invalidate it: the exit check raises, reads fail,
    and the snapshot is still removed."""
    origin = make_vg(tmp_path, 200 * MIB)
    small = node.replace(snapshot_size_percent=5)  # 3.2 MiB -> one 4 MiB extent
    with (
        pytest.raises(E.SnapshotError, match="overflowed and was invalidated"),
        snapshots.get_provider("lvm", small).snapshot(origin, "t1") as info,
    ):
        with info.open() as f:
            assert f.read(4) == b"head"
        write_at(origin, 0, os.urandom(5 * MIB))  # more than the 4 MiB copy-on-write store
    attr = tool("lvs", "--noheadings", "-o", "lv_attr", "vg").stdout.split()
    assert attr == ["-wi-a-----"]


def test_lvm_overflow_before_the_read_is_refused_at_open(fake_tools, tmp_path, node):
    """An invalidated snapshot is detected before reading (open() raises) and again at exit."""
    origin = make_vg(tmp_path, 200 * MIB)
    small = node.replace(snapshot_size_percent=5)
    with (
        pytest.raises(E.SnapshotError, match="overflowed"),
        snapshots.get_provider("lvm", small).snapshot(origin, "t1") as info,
    ):
        write_at(origin, 0, os.urandom(5 * MIB))
        with pytest.raises(E.SnapshotError, match="overflowed"):
            info.open()
        with pytest.raises(OSError):  # the "device" itself fails reads, like EIO
            Path(info.path).read_bytes()
    assert lv_names() == ["disk0"]


def test_lvm_replaces_a_stale_snapshot_left_by_a_crashed_run(fake_tools, tmp_path, node):
    """Idempotent by tag: an existing '<lv>-snap-<tag>' of the same origin is replaced."""
    origin = make_vg(tmp_path, 200 * MIB)
    tool("lvcreate", "-s", "-L", "8m", "-n", "disk0-snap-t1", "vg/disk0")
    old = tool("lvs", "--noheadings", "-o", "lv_uuid", "vg/disk0-snap-t1").stdout.strip()
    with snapshots.get_provider("lvm", node).snapshot(origin, "t1") as info:
        assert info.identity["lv_uuid"] != old
    assert lv_names() == ["disk0"]


def test_lvm_never_removes_a_foreign_lv_that_has_the_snapshot_name(fake_tools, tmp_path, node):
    """An LV named like our snapshot but not a snapshot of the origin is left alone."""
    origin = make_vg(tmp_path, 200 * MIB)
    tool("lvcreate", "-L", "4m", "-n", "disk0-snap-t1", "vg")
    with (
        pytest.raises(E.SnapshotError, match="exists and is not a snapshot of it"),
        snapshots.get_provider("lvm", node).snapshot(origin, "t1"),
    ):
        pass
    assert lv_names() == ["disk0", "disk0-snap-t1"]


def test_lvm_busy_snapshot_is_retried_then_reported(fake_tools, tmp_path, node, monkeypatch):
    """lvremove 'in use' is retried with backoff; still in use -> SnapshotError, kept."""
    monkeypatch.setattr(snapshotproviders, "RELEASE_TIMEOUT", 0.5)
    origin = make_vg(tmp_path, 200 * MIB)
    release_while_held(
        snapshots.get_provider("lvm", node), origin, r"Logical volume vg/disk0-snap-t1 in use"
    )
    assert lv_names() == ["disk0", "disk0-snap-t1"]
    with snapshots.get_provider("lvm", node).snapshot(origin, "t1"):  # re-run cleans up
        pass
    assert lv_names() == ["disk0"]


# --- zfs (stand-in tool) -------------------------------------------------------------------


def make_zvol(fake_tools) -> str:
    tool("zfs", "create", "-V", "16M", "tank/vm1")
    path = str(fake_tools["zfs"] / "dev" / "zvol" / "tank" / "vm1")
    write_at(path, 0, b"head" * 1024)
    return path


def zfs_names() -> list[str]:
    return tool("zfs", "list", "-H", "-o", "name", "-t", "all").stdout.split()


def test_zfs_snapshot_is_held_read_through_its_device_and_destroyed(fake_tools, node):
    """snapshot + hold, read via /dev/zvol/<vol>@<tag> (snapdev made visible, then restored)."""
    origin = make_zvol(fake_tools)
    with snapshots.get_provider("zfs", node).snapshot(origin, "t1") as info:
        assert info.path == f"{origin}@t1"
        assert info.identity["snapshot"] == "tank/vm1@t1" and info.identity["guid"]
        holds = tool("zfs", "holds", "-H", "tank/vm1@t1").stdout
        assert "\tganeti-vol\t" in holds
        write_at(origin, 0, b"CHANGED!")
        assert read_all(info)[:4] == b"head"
    assert zfs_names() == ["tank/vm1"]
    assert tool("zfs", "get", "-H", "-o", "value", "snapdev", "tank/vm1").stdout.strip() == "hidden"
    assert not os.path.exists(f"{origin}@t1")


def test_zfs_snapdev_set_locally_is_left_as_the_admin_set_it(fake_tools, node):
    """A volume whose snapdev is locally 'visible' keeps it; nothing is inherited or reset."""
    origin = make_zvol(fake_tools)
    tool("zfs", "set", "snapdev=visible", "tank/vm1")
    with snapshots.get_provider("zfs", node).snapshot(origin, "t1") as info:
        assert read_all(info)[:4] == b"head"
    out = tool("zfs", "get", "-H", "-o", "value,source", "snapdev", "tank/vm1").stdout.split()
    assert out == ["visible", "local"]


def test_zfs_dataset_busy_is_retried_and_then_reported(fake_tools, node, monkeypatch):
    """'dataset is busy' on destroy: retried; a brief holder is waited out, a lasting one
    is reported, and the next run with the same tag replaces the stale snapshot."""
    monkeypatch.setattr(snapshotproviders, "RELEASE_TIMEOUT", 0.6)
    origin = make_zvol(fake_tools)
    with snapshots.get_provider("zfs", node).snapshot(origin, "t1") as info:
        brief = subprocess.Popen(["sh", "-c", f"exec 3<'{info.path}'; sleep 0.2"])
        time.sleep(0.05)
    brief.wait()
    assert zfs_names() == ["tank/vm1"]

    release_while_held(
        snapshots.get_provider("zfs", node),
        origin,
        r"cannot destroy 'tank/vm1@t1': dataset is busy",
    )
    assert zfs_names() == ["tank/vm1", "tank/vm1@t1"]
    with snapshots.get_provider("zfs", node).snapshot(origin, "t1") as info:
        assert read_all(info)[:4] == b"head"
    assert zfs_names() == ["tank/vm1"]


def test_zfs_stale_held_snapshot_from_a_crash_is_replaced(fake_tools, node):
    """A held snapshot with our tag (a crashed run) is released, destroyed and retaken."""
    origin = make_zvol(fake_tools)
    tool("zfs", "snapshot", "tank/vm1@t1")
    tool("zfs", "hold", "ganeti-vol", "tank/vm1@t1")
    old = tool("zfs", "get", "-H", "-p", "-o", "value", "guid", "tank/vm1@t1").stdout.strip()
    with snapshots.get_provider("zfs", node).snapshot(origin, "t1") as info:
        assert info.identity["guid"] != old
    assert zfs_names() == ["tank/vm1"]


def test_instance_snapshot_uses_the_instance_disk_and_running_state(fake_tools, node, tmp_path):
    """instance_snapshot(): the instance's provider, tag and running flag are applied."""
    disk = data_disk(tmp_path / "disk.img")
    inst = Instance(
        name="web1",
        os="noop",
        uuid="7d0c1a2b-3c4d",
        ctime=0,
        mtime=0,
        running=True,
        disks=(Disk(path=str(disk), size_mib=8, uuid="d0"),),
        snapshot_provider="copy",
    )
    with snapshots.instance_snapshot(inst, 0, node) as info:
        assert info.provider == "copy" and info.consistency == "fuzzy"
        assert os.path.basename(info.path) == snapshots.snapshot_tag(inst, 0) + ".img"
    with (
        pytest.raises(E.SnapshotError, match="running instance"),
        snapshots.instance_snapshot(inst.replace(snapshot_provider="none"), 0, node),
    ):
        pass


def test_snapshot_tools_run_through_the_process_runner_with_output_apart(tmp_path):
    """lvm/zfs/btrfs run like every child (process.run_tool): exit code, stdout and stderr
    apart; a tool that is not installed is a one-line SnapshotError naming it."""
    tool = tmp_path / "fake-tool"
    tool.write_text("#!/bin/sh\necho \"out $LC_ALL $*\"\necho err >&2\nexit 5\n")
    tool.chmod(0o755)
    res = snapshotproviders.run_tool([str(tool), "a", "b"], what="list")
    assert (res.returncode, res.stdout, res.stderr) == (5, "out C a b\n", "err\n")
    with pytest.raises(E.SnapshotError, match="cannot list: 'gv-no-such-tool' is not installed"):
        snapshotproviders.run_tool(["gv-no-such-tool"], what="list")
