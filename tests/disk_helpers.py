"""Helpers for the device, loop and snapshot tests: real images, real tables, real mounts.

Everything here uses the Debian tools directly (sfdisk, losetup, partx,
mkfs.*, mount) so that the tests check ganeti-vol against an independent
implementation, and every helper undoes what it did on every path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import losetup_works, sparse_file

MIB = 1 << 20

needs_loop = pytest.mark.skipif(
    not losetup_works(), reason="needs root and working loop devices (losetup -f failed)"
)

#: MBR: two primaries, an extended partition with two logical partitions
MBR_SCRIPT = """label: dos
start=2048, size=8192, type=83
start=10240, size=4096, type=82
start=16384, size=40960, type=5
start=18432, size=8192, type=83
start=28672, size=12288, type=83
"""

#: GPT: three partitions, one with a name
GPT_SCRIPT = """label: gpt
start=2048, size=8192, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="root"
start=10240, size=4096, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F
start=16384, size=16384, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4
"""


def run(*argv: str, input: str | None = None) -> str:
    """Run a tool, failing the test with its stderr if it fails."""
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=60)
    if proc.returncode:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def partitioned_image(path: Path, script: str, size: int = 32 * MIB) -> Path:
    """A sparse image with a partition table written by sfdisk."""
    sparse_file(path, size)
    run("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path), input=script)
    return path


def sfdisk_partitions(path: Path) -> list[dict]:
    """sfdisk's own view of the table: [{node, start, size, type}] in sectors."""
    table = json.loads(run("sfdisk", "--json", str(path)))["partitiontable"]
    return table["partitions"]


def loop_name(device: str) -> str:
    return os.path.basename(device)


def sysfs_partitions(device: str) -> list[str]:
    name = loop_name(device)
    return sorted(e for e in os.listdir(f"/sys/block/{name}") if e.startswith(name + "p"))


def is_bound(device: str) -> bool:
    return os.path.exists(f"/sys/block/{loop_name(device)}/loop/backing_file")


def wait_unbound(device: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while is_bound(device):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def drop_partitions(device: str) -> None:
    """Delete every partition of a loop device (partx -d), ignoring errors."""
    if sysfs_partitions(device):
        subprocess.run(["partx", "-d", device], capture_output=True, timeout=30)


@contextlib.contextmanager
def foreign_loop(
    image: Path, *, partitions: bool = False, read_only: bool = False
) -> Iterator[str]:
    """A loop device attached by losetup (not by ganeti-vol); removed on exit."""
    argv = ["losetup", "-f", "--show"] + (["-r"] if read_only else []) + [str(image)]
    device = run(*argv).strip()
    try:
        if partitions:
            run("partx", "-a", device)
        yield device
    finally:
        drop_partitions(device)
        subprocess.run(["losetup", "-d", device], capture_output=True, timeout=30)
        wait_unbound(device)


@contextlib.contextmanager
def stale_partitions(image: Path) -> Iterator[str]:
    """An unbound loop device left with the partitions of ``image``, as a crashed run can
    leave one.  It is a new device numbered from 200 up: another user of loop devices on
    the host (``losetup -f``) takes the lowest free one, so it does not bind this one while
    the test looks at it (a recycled low number did).  Its partitions and the device go on
    exit."""
    taken = set(os.listdir("/sys/block"))
    device = f"/dev/loop{next(n for n in range(200, 1 << 20) if f'loop{n}' not in taken)}"
    run("losetup", device, str(image))
    try:
        run("partx", "-a", device)
        run("losetup", "-d", device)  # partitions survive the detach on this kernel
        assert wait_unbound(device), f"{device} still bound"
        yield device
    finally:
        drop_partitions(device)
        subprocess.run(["losetup", "-d", device], capture_output=True, timeout=30)
        if wait_unbound(device):
            fd = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, LOOP_CTL_REMOVE, int(device[len("/dev/loop"):]))
            except OSError:
                pass  # opened by someone else meanwhile: an unbound device is harmless
            finally:
                os.close(fd)


#: ioctl on /dev/loop-control: remove loop device N
LOOP_CTL_REMOVE = 0x4C81


@contextlib.contextmanager
def mounted(device: str, mount_point: Path, *options: str) -> Iterator[Path]:
    """Mount ``device`` at ``mount_point`` for the block; lazily unmount on exit."""
    mount_point.mkdir(parents=True, exist_ok=True)
    run("mount", *options, device, str(mount_point))
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@contextlib.contextmanager
def xfs_mount(base: Path, size: int = 320 * MIB) -> Iterator[Path]:
    """A real XFS filesystem with reflinks (reflink=1) on a loop device, mounted under
    ``base`` for the block."""
    image = base / "xfs.img"
    with open(image, "wb") as f:
        f.truncate(size)
    run("mkfs.xfs", "-q", "-m", "reflink=1", str(image))
    with foreign_loop(image) as dev, mounted(dev, base / "mnt") as mnt:
        yield mnt


def loops_backed_under(directory: Path) -> list[str]:
    """Loop devices (bound) whose backing file lives under ``directory``."""
    found = []
    for name in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                backing = f.read().strip()
        except OSError:
            continue
        if backing.startswith(str(directory) + "/"):
            found.append(f"/dev/{name}")
    return found


def force_detach_under(directory: Path) -> list[str]:
    """Safety net for fixtures: detach whatever a failed test left under ``directory``."""
    leftovers = loops_backed_under(directory)
    for device in leftovers:
        drop_partitions(device)
        subprocess.run(["losetup", "-d", device], capture_output=True, timeout=30)
        wait_unbound(device)
    return leftovers


# --- image files in every format the image OS definitions take -----------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def with_sidecar(path: Path, digest: str | None = None) -> Path:
    Path(f"{path}.sha256").write_text(f"{digest or sha256(path)}  {path.name}\n")
    return path


def make_format(raw: Path, fmt: str) -> Path:
    """The raw image in ``fmt``, made with the real CLI."""
    if fmt == "raw":
        return raw
    if fmt == "qcow2":
        if not shutil.which("qemu-img"):
            pytest.skip("qemu-img is not installed (apt-get install qemu-utils)")
        out = raw.with_suffix(".qcow2")
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                        str(out)], check=True)
        return out
    if fmt == "lz4":  # lz4 writes to stdout unless told the output name
        subprocess.run(["lz4", "-q", "-f", str(raw), f"{raw}.lz4"], check=True)
        return Path(f"{raw}.lz4")
    tool, ext = {"gz": ("gzip", ".gz"), "xz": ("xz", ".xz")}[fmt]
    subprocess.run([tool, "-q", "-k", "-f", str(raw)], check=True)
    return Path(str(raw) + ext)
