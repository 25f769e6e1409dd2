"""The snapshot providers: none, copy, reflink, btrfs, lvm and zfs (see doc/snapshots.md).

Each implements how to take a snapshot and how to remove one a crashed run
left; the lease around it is :class:`~ganeti_vol.system.snapshotlease.Provider`.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ganeti_vol.core import atomicfile
from ganeti_vol.core import errors as E
from ganeti_vol.core.holes import extents
from ganeti_vol.core.lazy import lazy
from ganeti_vol.core.retry import retry_busy
from ganeti_vol.system import process
from ganeti_vol.system.snapshotlease import (
    CONSISTENCY_FUZZY,
    CONSISTENCY_STOPPED,
    Provider,
    Taken,
    consistency_of,
    require_file,
    unlink_quietly,
)

# pyudev loads only when a disk is looked at
if TYPE_CHECKING:
    from ganeti_vol.system import devices
else:
    devices = lazy("ganeti_vol.system.devices")

log = logging.getLogger(__name__)

#: FICLONE = _IOW(0x94, 9, int)
FICLONE = 0x40049409
#: the inode number of every btrfs subvolume's root directory
BTRFS_SUBVOL_INO = 256
BTRFS_SNAP_DIR = ".ganeti-vol-snapshots"
ZFS_HOLD_TAG = "ganeti-vol"
#: seconds to keep retrying a busy release (lvremove, zfs destroy)
RELEASE_TIMEOUT = 10.0
TOOL_TIMEOUT = 300.0
COPY_BLOCK = 4 << 20


# --- none ---------------------------------------------------------------------------


class NoneProvider(Provider):
    """No snapshot: the disk itself is read, so the instance must be stopped."""

    name = "none"

    def _take(self, disk_path: str, tag: str, running: bool) -> Taken:
        if running:
            raise E.SnapshotError(
                f"cannot export '{disk_path}' of a running instance without a snapshot: "
                "stop the instance or set snapshot_provider (node config or instance file)"
            )
        return Taken(self._info(disk_path, disk_path, CONSISTENCY_STOPPED), lambda: None)

    def _remove_stale(self, disk_path: str, tag: str) -> None:
        return None


# --- copy ---------------------------------------------------------------------------


#: copy_file_range cannot copy between these two files: read and write instead
_NO_COPY_RANGE = (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def sparse_copy(src_fd: int, dst_fd: int, size: int) -> int:
    """Copy the data extents of ``src_fd`` to ``dst_fd`` (holes stay holes); bytes copied."""
    copied = 0
    in_kernel = True  # copy_file_range, until it refuses (another filesystem: EXDEV)
    for start, end, is_data in extents(src_fd, size):
        pos = start
        while is_data and pos < end:
            want = min(end - pos, COPY_BLOCK)
            n = -1
            if in_kernel:
                try:
                    n = os.copy_file_range(src_fd, dst_fd, want, pos, pos)
                except OSError as err:
                    if err.errno not in _NO_COPY_RANGE:
                        raise
                    in_kernel = False
            if n < 0:
                data = os.pread(src_fd, want, pos)
                n = len(data)
                view = memoryview(data)
                done = 0
                while done < n:
                    done += os.pwrite(dst_fd, view[done:], pos + done)
            if n == 0:  # the source shrank under us
                return copied
            pos += n
            copied += n
    os.ftruncate(dst_fd, size)
    return copied


class CopyProvider(Provider):
    """A sparse copy of a file disk into ``<state_dir>/snapshots``.

    Only a stopped instance gives a point-in-time copy; a running one gives
    ``fuzzy`` data (logged as a warning, recorded in the identity).
    """

    name = "copy"

    def _dest(self, tag: str) -> str:
        return os.path.join(self.state_dir, f"{tag}.img")

    def _remove_stale(self, disk_path: str, tag: str) -> None:
        if os.path.exists(self._dest(tag)):
            log.warning("removing stale copy snapshot %s", self._dest(tag))
            unlink_quietly(self._dest(tag))

    def _take(self, disk_path: str, tag: str, running: bool) -> Taken:
        st = require_file(disk_path, self.name)
        dest = self._dest(tag)
        if os.path.realpath(dest) == os.path.realpath(disk_path):
            raise E.SnapshotError(f"cannot copy '{disk_path}' onto itself")
        free = os.statvfs(self.state_dir)
        needed = st.st_blocks * 512
        if free.f_bavail * free.f_frsize < needed:
            raise E.NoSpaceError(
                f"cannot copy '{disk_path}' to '{dest}': {needed} bytes needed, "
                f"{free.f_bavail * free.f_frsize} free"
            )
        try:
            with open(disk_path, "rb") as src, os.fdopen(atomicfile.create_fd(dest, 0o600), "wb") as dst:
                if (os.fstat(dst.fileno()).st_dev, os.fstat(dst.fileno()).st_ino) == (
                    st.st_dev,
                    st.st_ino,
                ):
                    raise E.SnapshotError(f"cannot copy '{disk_path}' onto itself")
                before = os.fstat(src.fileno())
                sparse_copy(src.fileno(), dst.fileno(), before.st_size)
                after = os.fstat(src.fileno())
        except BaseException as err:
            unlink_quietly(dest)
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                raise E.NoSpaceError(what=f"snapshot copy '{dest}'") from err
            if isinstance(err, OSError):
                raise E.SnapshotError(f"cannot copy '{disk_path}' to '{dest}': {err}") from err
            raise
        changed = (before.st_mtime_ns, before.st_size) != (after.st_mtime_ns, after.st_size)
        consistency = CONSISTENCY_FUZZY if running else CONSISTENCY_STOPPED
        if running:
            log.warning(
                "copy of running instance disk %s is not a point-in-time snapshot%s",
                disk_path,
                " (it changed during the copy)" if changed else "",
            )
        info = self._info(disk_path, dest, consistency, changed_during_copy=changed)
        return Taken(info, lambda: unlink_quietly(dest))


# --- reflink ------------------------------------------------------------------------


def _fs_of(path: str) -> devices.Mount | None:
    """The mount holding ``path`` (longest mount point prefix)."""
    real = os.path.realpath(path)
    best = None
    for mount in devices.read_mounts():
        mp = mount.mount_point.rstrip("/") or "/"
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and (
            best is None or len(mp) >= len(best.mount_point)
        ):
            best = mount
    return best


class ReflinkProvider(Provider):
    """A reflink (FICLONE) clone next to the file disk: instant, shares blocks (XFS, btrfs)."""

    name = "reflink"

    @staticmethod
    def _dest(disk_path: str, tag: str) -> str:
        head, tail = os.path.split(disk_path)
        return os.path.join(head, f".{tail}.snap-{tag}")

    def _remove_stale(self, disk_path: str, tag: str) -> None:
        if os.path.lexists(self._dest(disk_path, tag)):
            log.warning("removing stale reflink snapshot %s", self._dest(disk_path, tag))
            unlink_quietly(self._dest(disk_path, tag))

    def _take(self, disk_path: str, tag: str, running: bool) -> Taken:
        require_file(disk_path, self.name)
        dest = self._dest(disk_path, tag)
        try:
            with open(disk_path, "rb") as src, os.fdopen(atomicfile.create_fd(dest, 0o600), "wb") as dst:
                fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        except OSError as err:
            unlink_quietly(dest)
            if err.errno == errno.ENOSPC:
                raise E.NoSpaceError(what=f"reflink snapshot '{dest}'") from err
            if err.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV):
                mount = _fs_of(disk_path)
                where = f"{mount.fstype} at '{mount.mount_point}'" if mount else "unknown"
                raise E.SnapshotError(
                    f"cannot reflink '{disk_path}': its filesystem ({where}) does not support "
                    "reflinks; use XFS (reflink=1) or btrfs, or another snapshot provider"
                ) from err
            raise E.SnapshotError(f"cannot reflink '{disk_path}': {err.strerror}") from err
        info = self._info(disk_path, dest, consistency_of(running))
        return Taken(info, lambda: unlink_quietly(dest))


# --- external tools (btrfs, lvm, zfs) -------------------------------------------------


def run_tool(argv: list[str], *, what: str) -> process.ToolResult:
    """Run an LVM/ZFS/btrfs tool with a C locale; a missing tool is a SnapshotError."""
    env = dict(os.environ, LC_ALL="C", LANG="C", LVM_SUPPRESS_FD_WARNINGS="1")
    try:
        proc = process.run_tool(argv, env, timeout=TOOL_TIMEOUT)
    except FileNotFoundError:
        raise E.SnapshotError(f"cannot {what}: '{argv[0]}' is not installed") from None
    if proc.timed_out:
        raise E.SnapshotError(f"cannot {what}: '{argv[0]}' timed out")
    log.debug("%s -> %d %s", " ".join(argv), proc.returncode, proc.stderr.strip())
    return proc


def _check_tool(argv: list[str], *, what: str) -> str:
    proc = run_tool(argv, what=what)
    if proc.returncode:
        detail = " ".join(line.strip() for line in proc.stderr.strip().splitlines()) or (
            f"'{argv[0]}' exited with {proc.returncode}"
        )
        raise E.SnapshotError(f"cannot {what}: {detail}")
    return proc.stdout


def _release_busy(action: Callable[[], Any], what: str) -> None:
    """Run a release command, retrying while the tool reports the object busy."""
    retry_busy(
        action,
        is_busy=lambda err: (
            isinstance(err, E.SnapshotError) and ("busy" in str(err) or "in use" in str(err))
        ),
        timeout=RELEASE_TIMEOUT,
        what=what,
    )


# --- btrfs --------------------------------------------------------------------------


class BtrfsProvider(Provider):
    """A read-only snapshot of the btrfs subvolume holding the file disk."""

    name = "btrfs"

    @staticmethod
    def _subvolume(disk_path: str) -> str:
        mount = _fs_of(disk_path)
        if mount is None or mount.fstype != "btrfs":
            fstype = mount.fstype if mount else "unknown"
            raise E.SnapshotError(f"cannot snapshot '{disk_path}': it is on {fstype}, not btrfs")
        d = os.path.dirname(os.path.realpath(disk_path))
        while os.stat(d).st_ino != BTRFS_SUBVOL_INO:
            parent = os.path.dirname(d)
            if parent == d:  # pragma: no cover - a btrfs mount root is a subvolume
                raise E.SnapshotError(f"cannot find the btrfs subvolume of '{disk_path}'")
            d = parent
        return d

    def _dest(self, disk_path: str, tag: str) -> tuple[str, str]:
        subvol = self._subvolume(disk_path)
        return subvol, os.path.join(subvol, BTRFS_SNAP_DIR, tag)

    def _delete(self, dest: str) -> None:
        _release_busy(
            lambda: _check_tool(
                ["btrfs", "subvolume", "delete", dest], what=f"delete btrfs snapshot '{dest}'"
            ),
            f"delete {dest}",
        )

    def _remove_stale(self, disk_path: str, tag: str) -> None:
        _, dest = self._dest(disk_path, tag)
        if os.path.lexists(dest):
            log.warning("removing stale btrfs snapshot %s", dest)
            self._delete(dest)

    def _take(self, disk_path: str, tag: str, running: bool) -> Taken:
        require_file(disk_path, self.name)
        subvol, dest = self._dest(disk_path, tag)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        _check_tool(
            ["btrfs", "subvolume", "snapshot", "-r", subvol, dest],
            what=f"snapshot btrfs subvolume '{subvol}'",
        )
        try:
            show = _check_tool(["btrfs", "subvolume", "show", dest], what=f"inspect '{dest}'")
            fields = dict(
                (k.strip(), v.strip())
                for k, _, v in (line.partition(":") for line in show.splitlines()[1:])
            )
            path = os.path.join(dest, os.path.relpath(os.path.realpath(disk_path), subvol))
            info = self._info(
                disk_path,
                path,
                consistency_of(running),
                subvolume=subvol,
                snapshot=dest,
                snapshot_uuid=fields.get("UUID", ""),
                snapshot_id=fields.get("Subvolume ID", ""),
            )
        except BaseException:
            self._delete(dest)
            raise
        return Taken(info, lambda: self._delete(dest))


# --- lvm ----------------------------------------------------------------------------

LVS_FIELDS = "vg_name,lv_name,lv_attr,lv_size,origin,snap_percent,lv_path,lv_uuid"
REPORT_ARGS = ["--noheadings", "--units", "b", "--nosuffix", "--separator", "|"]


def _report(lines: str, fields: str, what: str) -> list[dict[str, str]]:
    """Parse ``lvs``/``vgs`` output made with REPORT_ARGS into one dict per row."""
    names = fields.split(",")
    rows = []
    for line in lines.splitlines():
        values = line.strip().split("|")
        if not line.strip():
            continue
        if len(values) != len(names):
            raise E.SnapshotError(f"cannot {what}: unexpected output {line.strip()!r}")
        rows.append(dict(zip(names, values, strict=True)))
    return rows


class LvmProvider(Provider):
    """A classic LVM snapshot sized as a percentage of the origin (``snapshot_size_percent``).

    Ganeti sizes snapshots at 100 % of the origin (ganeti#915); here the size
    is a policy with a free-space check.  A snapshot that overflows is
    invalidated by LVM; that is checked before and after reading.
    """

    name = "lvm"

    def _lv(self, target: str, what: str) -> dict[str, str] | None:
        proc = run_tool(["lvs", *REPORT_ARGS, "-o", LVS_FIELDS, target], what=what)
        if proc.returncode:
            if "Failed to find" in proc.stderr or "not found" in proc.stderr:
                return None
            raise E.SnapshotError(f"cannot {what}: {proc.stderr.strip()}")
        rows = _report(proc.stdout, LVS_FIELDS, what)
        return rows[0] if rows else None

    def _origin(self, disk_path: str) -> dict[str, str]:
        lv = self._lv(disk_path, f"snapshot '{disk_path}'")
        if lv is None:
            raise E.SnapshotError(f"cannot snapshot '{disk_path}': it is not an LVM logical volume")
        if lv["lv_attr"][:1] in ("s", "S"):
            raise E.SnapshotError(f"cannot snapshot '{disk_path}': it is itself a snapshot")
        return lv

    @staticmethod
    def _snap_name(lv: dict[str, str], tag: str) -> str:
        return f"{lv['lv_name']}-snap-{tag}"

    def _remove(self, vg_snap: str) -> None:
        _release_busy(
            lambda: _check_tool(["lvremove", "-f", vg_snap], what=f"remove snapshot '{vg_snap}'"),
            f"lvremove {vg_snap}",
        )

    def _remove_stale(self, disk_path: str, tag: str) -> None:
        origin = self._origin(disk_path)
        vg_snap = f"{origin['vg_name']}/{self._snap_name(origin, tag)}"
        stale = self._lv(vg_snap, f"look for stale snapshot '{vg_snap}'")
        if stale is None:
            return
        if stale["origin"] != origin["lv_name"]:
            raise E.SnapshotError(
                f"cannot snapshot '{disk_path}': '{vg_snap}' exists and is not a snapshot of it"
            )
        log.warning("removing stale LVM snapshot %s", vg_snap)
        self._remove(vg_snap)

    def _size(self, origin: dict[str, str]) -> tuple[int, int, int]:
        """(snapshot size, VG free, extent size) in bytes."""
        fields = "vg_free,vg_extent_size"
        out = _check_tool(
            ["vgs", *REPORT_ARGS, "-o", fields, origin["vg_name"]],
            what=f"query volume group '{origin['vg_name']}'",
        )
        vg = _report(out, fields, f"query volume group '{origin['vg_name']}'")[0]
        free, extent = int(vg["vg_free"]), int(vg["vg_extent_size"])
        wanted = math.ceil(int(origin["lv_size"]) * self.node_config.snapshot_size_percent / 100)
        size = max(1, math.ceil(wanted / extent)) * extent
        return size, free, extent

    def _take(self, disk_path: str, tag: str, running: bool) -> Taken:
        origin = self._origin(disk_path)
        vg, snap = origin["vg_name"], self._snap_name(origin, tag)
        size, free, _ = self._size(origin)
        percent = self.node_config.snapshot_size_percent
        if size > free:
            raise E.NoSpaceError(
                f"cannot snapshot '{vg}/{origin['lv_name']}': volume group '{vg}' has {free} "
                f"bytes free, the snapshot needs {size} ({percent:g}% of the origin)"
            )
        proc = run_tool(
            ["lvcreate", "-s", "-L", f"{size}b", "-n", snap, f"{vg}/{origin['lv_name']}"],
            what=f"snapshot '{vg}/{origin['lv_name']}'",
        )
        if proc.returncode:
            message = " ".join(line.strip() for line in proc.stderr.strip().splitlines())
            cls = E.NoSpaceError if "insufficient free space" in message else E.SnapshotError
            raise cls(f"cannot snapshot '{vg}/{origin['lv_name']}': {message}")
        vg_snap = f"{vg}/{snap}"
        try:
            lv = self._lv(vg_snap, f"inspect snapshot '{vg_snap}'")
            if lv is None:
                raise E.SnapshotError(f"cannot find snapshot '{vg_snap}' after creating it")
            info = self._info(
                disk_path,
                lv["lv_path"],
                consistency_of(running),
                check=lambda: self._validate(vg_snap),
                vg=vg,
                lv=origin["lv_name"],
                snapshot=snap,
                lv_uuid=lv["lv_uuid"],
                origin_uuid=origin["lv_uuid"],
                snapshot_size=size,
                size_percent=percent,
            )
        except BaseException:
            self._remove(vg_snap)
            raise
        return Taken(info, lambda: self._remove(vg_snap))

    def _validate(self, vg_snap: str) -> None:
        lv = self._lv(vg_snap, f"check snapshot '{vg_snap}'")
        if lv is None:
            raise E.SnapshotError(f"cannot read snapshot '{vg_snap}': it disappeared")
        attr, used = lv["lv_attr"], lv["snap_percent"]
        invalid = attr[:1] == "S" or attr[4:5] in ("I", "S")
        if invalid or (used and float(used) >= 100.0):
            raise E.SnapshotError(
                f"cannot read snapshot '{vg_snap}': it overflowed and was invalidated "
                f"(lv_attr {attr}, {used or '?'}% used); the data read from it is unusable; "
                "raise snapshot_size_percent or export with the instance stopped"
            )


# --- zfs ----------------------------------------------------------------------------


class ZfsProvider(Provider):
    """``zfs snapshot`` + ``zfs hold`` of a zvol, read through ``/dev/zvol/<vol>@<tag>``.

    The snapshot device exists only while the volume's ``snapdev`` is
    ``visible``; if it is ``hidden`` it is made visible for the duration and
    restored afterwards.
    """

    name = "zfs"
    #: seconds to wait for the snapshot device node
    DEVICE_TIMEOUT = 10.0

    @staticmethod
    def _volume(disk_path: str) -> tuple[str, str]:
        """(zvol device directory, dataset) of a disk path like /dev/zvol/pool/vol."""
        marker = "/zvol/"
        if marker not in disk_path:
            real = os.path.realpath(disk_path)
            for dirpath, _dirs, files in os.walk("/dev/zvol"):
                for name in files:
                    candidate = os.path.join(dirpath, name)
                    if os.path.realpath(candidate) == real:
                        disk_path = candidate
                        break
        if marker not in disk_path:
            raise E.SnapshotError(f"cannot snapshot '{disk_path}': it is not a ZFS volume")
        head, _, dataset = disk_path.rpartition(marker)
        return head + marker.rstrip("/"), dataset

    def _zfs(self, *args: str, what: str) -> str:
        return _check_tool(["zfs", *args], what=what)

    def _exists(self, name: str) -> bool:
        proc = run_tool(["zfs", "list", "-H", "-o", "name", "-t", "all", name], what="list")
        return proc.returncode == 0

    def _destroy(self, snap: str) -> None:
        proc = run_tool(["zfs", "release", ZFS_HOLD_TAG, snap], what=f"release '{snap}'")
        if proc.returncode and "no such tag" not in proc.stderr:
            raise E.SnapshotError(f"cannot release '{snap}': {proc.stderr.strip()}")
        _release_busy(
            lambda: self._zfs("destroy", snap, what=f"destroy '{snap}'"), f"destroy {snap}"
        )

    def _remove_stale(self, disk_path: str, tag: str) -> None:
        _, dataset = self._volume(disk_path)
        snap = f"{dataset}@{tag}"
        if self._exists(snap):
            log.warning("removing stale ZFS snapshot %s", snap)
            self._destroy(snap)

    def _take(self, disk_path: str, tag: str, running: bool) -> Taken:
        zvol_dir, dataset = self._volume(disk_path)
        snap = f"{dataset}@{tag}"
        snapdev, source = self._zfs(
            "get", "-H", "-o", "value,source", "snapdev", dataset, what=f"snapshot '{dataset}'"
        ).split()
        self._zfs("snapshot", snap, what=f"snapshot '{dataset}'")
        made_visible = False

        def release() -> None:
            try:
                self._destroy(snap)
            finally:
                if made_visible and source == "local":
                    self._zfs("set", f"snapdev={snapdev}", dataset, what="restore snapdev")
                elif made_visible:
                    self._zfs("inherit", "snapdev", dataset, what="restore snapdev")

        try:
            self._zfs("hold", ZFS_HOLD_TAG, snap, what=f"hold '{snap}'")
            if snapdev != "visible":
                self._zfs("set", "snapdev=visible", dataset, what=f"expose '{snap}'")
                made_visible = True
            path = os.path.join(zvol_dir, snap)
            deadline = time.monotonic() + self.DEVICE_TIMEOUT
            while not os.path.exists(path):
                if time.monotonic() > deadline:
                    raise E.SnapshotError(
                        f"cannot find snapshot device '{path}': it did not appear"
                    )
                time.sleep(0.05)
            guid, txg = self._zfs(
                "get", "-H", "-p", "-o", "value", "guid,createtxg", snap, what=f"inspect '{snap}'"
            ).split()
            info = self._info(
                disk_path,
                path,
                consistency_of(running),
                dataset=dataset,
                snapshot=snap,
                guid=guid,
                createtxg=txg,
            )
        except BaseException:
            release()
            raise
        return Taken(info, release)
