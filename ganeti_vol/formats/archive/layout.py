"""The archive's layout on disk: member names, limits, the index records, and the pinned directory members are opened through."""

from __future__ import annotations

import os
import stat
import struct
import time

from ganeti_vol.core import atomicfile
from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import io_error, read_full
from ganeti_vol.formats import ganeti_export as G

FORMAT = "ganeti-vol-archive"
FORMAT_VERSION = 1
#: features this reader implements; an archive may require any subset of them
SUPPORTED_FEATURES = frozenset({"lz4-frame-chunks", "chunk-index-v1"})
#: what this writer puts in every archive's mandatory_features
WRITTEN_FEATURES = ("lz4-frame-chunks", "chunk-index-v1")
#: optional feature: manifest.json carries its own checksum (readers that know it check it)
FEATURE_MANIFEST_SUM = "manifest-sha256"
WRITTEN_OPTIONAL_FEATURES = (FEATURE_MANIFEST_SUM,)
MANIFEST = "manifest.json"
CONFIG = "config.ini"
DUMP_SUFFIX = ".lz4"
INDEX_SUFFIX = ".idx"
#: the manifest's own checksum (see render_manifest)
MANIFEST_SUM = "manifest_sha256"
#: the most bytes read from a manifest.json: a valid one has at most 16 disks of at most
#: ZERO_MAP_MAX zero-map runs (well under 1 MiB); more is refused before it is parsed
MAX_MANIFEST = 2 << 20
#: the most bytes read from a config.ini (Ganeti's are a few KiB)
MAX_CONFIG = G.MAX_CONFIG_BYTES
#: the most zero-map runs the writer records per disk (see _ZeroMap)
ZERO_MAP_MAX = 1024

#: index file: magic, version, hash length, reserved, chunk size
IDX_HEADER = struct.Struct("<8sHHIQ")
IDX_MAGIC = b"GVIDX\x00\r\n"
IDX_VERSION = 1
#: index entry (followed by the chunk hash): flags, reserved, frame length, frame offset
IDX_ENTRY = struct.Struct("<B3xIQ")
FLAG_ZERO = 0x01
KNOWN_FLAGS = FLAG_ZERO


def write_file(path: str, data: bytes, what: str) -> None:
    """Create ``path`` with ``data``, fsynced (never through a symlink, never an existing file)."""
    try:
        atomicfile.create(path, data, 0o640)
    except OSError as err:
        raise io_error("write", what, err) from err


def check_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or name in ("..",):
        raise E.UsageError(f"cannot use '{name}' as an archive name")


def iso_time(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def quote(value: object, limit: int = 60) -> str:
    """``value`` for an error message: repr (control characters escaped), shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def member_name(name: object, what: str) -> str:
    """``name`` if an archive may name it: a plain file name (no directory, not ``..``)."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise E.ArchiveError(f"cannot open {what}: {quote(name)} is not the name of a file "
                             "inside the archive (no directories, no '..', no absolute paths)")
    return name


class ArchiveDir:
    """An archive directory, pinned by its identity: its files are opened through it.

    The path may lead through a symbolic link (the operator's choice); what
    it leads to is remembered (device and inode), and every later open checks
    that the directory is still that one, so swapping it for another (say
    ``/etc``) between two opens is refused.
    """

    def __init__(self, path: str, what: str) -> None:
        self.path = os.path.abspath(path)
        try:
            st = os.stat(self.path)
        except OSError as err:
            raise E.ArchiveError(f"cannot open {what}: no such directory") from err
        if not stat.S_ISDIR(st.st_mode):
            raise E.ArchiveError(f"cannot open {what}: not a directory")
        self.identity = (st.st_dev, st.st_ino)

    def open(self, name: str, what: str) -> int:
        """A read-only fd of the regular file ``name`` directly inside the directory.

        ``name`` must be a plain name (:func:`member_name`).  It is opened
        relative to the directory's fd with ``O_NOFOLLOW``, after an ``lstat``
        that refuses anything but a regular file, so a symbolic link is never
        followed and a FIFO, device or socket is never opened (nothing
        blocks, no driver runs); the fd is checked again to be that same file.
        """
        member_name(name, what)
        path = os.path.join(self.path, name)
        try:
            dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise E.ArchiveError(f"cannot open {what}: '{self.path}': "
                                 f"{err.strerror or err}") from err
        try:
            here = os.fstat(dfd)
            if (here.st_dev, here.st_ino) != self.identity:
                raise E.ArchiveError(f"cannot open {what}: '{self.path}' was replaced by "
                                     "another directory while being read")
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise E.ArchiveError(f"cannot open {what}: '{path}' is {_kind(st.st_mode)}, "
                                     "not a regular file")
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                         | os.O_CLOEXEC, dir_fd=dfd)
        except FileNotFoundError:
            raise E.ArchiveError(f"cannot open {what}: '{path}' does not exist") from None
        except OSError as err:
            raise E.ArchiveError(f"cannot open {what}: '{path}': {err.strerror or err}") from err
        finally:
            os.close(dfd)
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            raise E.ArchiveError(f"cannot open {what}: '{path}' was replaced while being opened")
        os.set_blocking(fd, True)
        return fd

    def read(self, name: str, what: str, limit: int) -> bytes:
        """The bytes of the file ``name`` (see :meth:`open`), refused if over ``limit``."""
        path = os.path.join(self.path, name)
        fd = self.open(name, what)
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                raise E.ArchiveError(f"cannot open {what}: '{path}' has {size} bytes, more than "
                                     f"the {limit} allowed")
            buf = bytearray(size + 1)
            n = read_full(fd, memoryview(buf), None, f"'{path}'")
        finally:
            os.close(fd)
        if n != size:
            raise E.ArchiveError(f"cannot open {what}: '{path}' changed while being read")
        return bytes(buf[:n])

    def config(self, name: str, what: str) -> tuple[bytes, G.GanetiExport]:
        """config.ini (named ``name``): its bytes and what it says."""
        data = self.read(name, what, MAX_CONFIG)
        return data, G.parse_config(data, os.path.join(self.path, name))  # checks UTF-8
