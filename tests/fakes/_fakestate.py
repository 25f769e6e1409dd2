"""Shared plumbing of the stand-in lvm and zfs tools (see README.md in this directory).

State lives in one JSON file under the tool's root directory, guarded by an
flock so concurrent invocations behave; volume data lives in real sparse
files.  Nothing here is imported by ganeti_vol: only the stand-ins use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
import sys
import uuid

SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)([bBsSkKmMgGtT]?)$")
UNITS = {"b": 1, "s": 512, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def root_dir(env_var: str, tool: str, fail_code: int) -> str:
    root = os.environ.get(env_var)
    if not root:
        sys.stderr.write(f"  {tool} (stand-in): {env_var} is not set\n")
        sys.exit(fail_code)
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    return root


@contextlib.contextmanager
def locked_state(root: str, empty: dict):
    """Load state.json under an exclusive lock; save it when the block ends normally."""
    lock = open(os.path.join(root, "state.lock"), "a")  # noqa: SIM115
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = os.path.join(root, "state.json")
        try:
            with open(path) as f:
                state = json.load(f)
        except FileNotFoundError:
            state = json.loads(json.dumps(empty))
        yield state
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    finally:
        lock.close()


def parse_size(text: str, default_unit: str) -> int:
    m = SIZE_RE.match(text)
    if not m:
        raise ValueError(text)
    unit = (m.group(2) or default_unit).lower()
    return int(float(m.group(1)) * UNITS[unit])


def new_data_file(root: str, size: int) -> str:
    """A new sparse data file of ``size`` bytes; returns its path."""
    path = os.path.join(root, "data", uuid.uuid4().hex)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def sparse_copy(src: str, dst: str) -> None:
    """Copy ``src`` to a new file ``dst`` keeping holes (SEEK_DATA/SEEK_HOLE)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            fin.seek(start)
            fout.seek(start)
            left = end - start
            while left:
                block = fin.read(min(left, 1 << 20))
                fout.write(block)
                left -= len(block)
            offset = end
        fout.truncate(size)


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of the data extents of a sparse file (SEEK_DATA/SEEK_HOLE)."""
    ranges, offset = [], 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        ranges.append((start, end))
        offset = end
    return ranges


def changed_chunks(a: str, b: str, chunk: int) -> set[int]:
    """Indexes of ``chunk``-sized blocks whose content differs between two files.

    Only ranges where either file has data are read (holes on both sides are equal).
    """
    changed = set()
    big = chunk * 256
    with open(a, "rb") as fa, open(b, "rb") as fb:
        size = max(os.fstat(fa.fileno()).st_size, os.fstat(fb.fileno()).st_size)
        ranges = sorted(data_ranges(fa.fileno(), size) + data_ranges(fb.fileno(), size))
        done = 0  # everything below this offset has been compared
        for start, end in ranges:
            pos = max(start // chunk * chunk, done)
            while pos < end:
                n = min(big, end - pos + chunk)
                x, y = os.pread(fa.fileno(), n, pos), os.pread(fb.fileno(), n, pos)
                if x != y:
                    for i in range(0, max(len(x), len(y)), chunk):
                        if x[i : i + chunk] != y[i : i + chunk]:
                            changed.add((pos + i) // chunk)
                pos += n
            done = max(done, pos)
    return changed


def open_by_someone(path: str) -> bool:
    """True if any process has the file (or its symlink target) open."""
    try:
        target = os.stat(path)
    except OSError:
        return False
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (
                target.st_dev,
                target.st_ino,
            ):
                return True
    return False


def symlink(target: str, link: str) -> None:
    os.makedirs(os.path.dirname(link), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(link)
    os.symlink(target, link)


def unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
