"""The scratch disks of a conformance run: test data, digests, file trees, read-only mounts."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ganeti_vol.authoring.conformance.report import SEED_BLOCKS
from ganeti_vol.core import constants as C
from ganeti_vol.core.holes import extents
from ganeti_vol.core.model import Instance
from ganeti_vol.engine.chunks import Chunk, EncodeInfo, EncodeSummary
from ganeti_vol.system import loopctl, process, scriptlog

log = logging.getLogger(__name__)


# --- digests and file trees ----------------------------------------------------------------


class DigestSink:
    """A chunk sink that keeps nothing: the engine only hashes (whole-disk digest, zeros)."""

    compress = False
    want_crc = False

    def begin(self, info: EncodeInfo) -> None:
        pass

    def write_chunk(self, chunk: Chunk) -> None:
        pass

    def finish(self, summary: EncodeSummary) -> None:
        pass

    def abort(self, error: BaseException) -> None:
        pass


@dataclass(frozen=True)
class DiskFacts:
    size: int
    digest: str
    holds_data: bool


def tree(root: str) -> dict[str, tuple[Any, ...]]:
    """Every entry below ``root`` on its filesystem: type, mode, owner, size and content hash."""
    out: dict[str, tuple[Any, ...]] = {}
    root_dev = os.lstat(root).st_dev
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode) and st.st_dev != root_dev and name in dirnames:
                dirnames.remove(name)  # another filesystem mounted below
            content: Any = ""
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                content = h.hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                content = st.st_rdev
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            out["/" + os.path.relpath(path, root)] = (
                stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                size, content,
            )
    return out


class CannotCompare(Exception):
    """The files inside the disks could not be compared (reason in the message)."""


class NoLoop(Exception):
    """The loop-device pass cannot run (reason in the message)."""


def disk_paths(instance: Instance) -> list[str]:
    return [d.path for d in instance.disks if d.path]


def seed(path: str, index: int) -> None:
    """Write test data (1 MiB at the start, middle and end) into a disk; never resize it.

    The data differs from disk to disk, so a mix-up of disks shows in their bytes.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        block = min(1 << 20, size)
        offsets = {0, (size // 2) & ~4095, size - block}
        for n, offset in enumerate(sorted(offsets)[:SEED_BLOCKS]):
            data = hashlib.shake_256(f"ganeti-vol os test {n} disk {index}".encode()).digest(block)
            os.pwrite(fd, data, max(0, min(offset, size - block)))
        os.fsync(fd)
    finally:
        os.close(fd)


def holds_data(path: str) -> bool:
    """True if the file has a non-zero byte (only its data extents are read, up to the first)."""
    with open(path, "rb", buffering=0) as f:
        for start, end, is_data in extents(f.fileno(), os.fstat(f.fileno()).st_size):
            offset = start
            while is_data and offset < end:
                f.seek(offset)
                block = f.read(min(1 << 20, end - offset))
                if not block:
                    return False
                if block.strip(b"\0"):
                    return True
                offset += len(block)
    return False


def tool(argv: Sequence[str]) -> str | None:
    """Run a util-linux tool; None on success, else its reason and last output line."""
    tool = shutil.which(argv[0], path=C.SCRIPT_PATH)
    if tool is None:
        return f"'{argv[0]}' not found in {C.SCRIPT_PATH}"
    proc, rc, output = process.run_collect(
        [tool, *argv[1:]], {"PATH": C.SCRIPT_PATH, "LC_ALL": "C"}, cwd="/", op=argv[0],
        capture=True, capture_limit=4096, timeout=60,
    )
    if rc == 0 and not proc.timed_out:
        return None
    last = (output or "").strip().splitlines()
    return scriptlog.exit_reason(rc) + (f": {last[-1]}" if last else "")


def mount_ro(device: str, target: str) -> str | None:
    problem = tool(["mount", "-o", "ro,nosuid,nodev,noexec", device, target])
    # an ext* journal that needs recovery cannot be replayed read-only: skip it
    if problem and tool(["mount", "-o", "ro,noload,nosuid,nodev,noexec", device, target]) is None:
        return None
    return problem


def unmount(target: str, *, lazy: bool) -> str | None:
    return tool(["umount", "-l", target] if lazy else ["umount", target])


def loop_devices_usable() -> bool:
    """Root and a loop-control device: the loop pass and the file comparison can run."""
    return os.geteuid() == 0 and os.path.exists(loopctl.LOOP_CONTROL)
