"""Files written safely, also in directories that others may write: the one home for it.

Every file ganeti-vol writes outside a disk goes through here:

- :func:`create` makes a *new* file (``O_CREAT|O_EXCL|O_NOFOLLOW``): archive
  members in a staging directory, log files;
- :func:`replace` writes a file whole and atomically: a temporary file with an
  unpredictable name is created exclusively (never through a symlink) in the
  target's directory, filled, given its exact mode (not the umask's), fsynced,
  then renamed over the target; the rename replaces a symlink planted at the
  target instead of writing through it.  State records, status files, the
  instance file, hook settings;
- :func:`open_append` reopens a log for appending without following a
  symlink, and only if it is still a plain file of ours with one link;
- :func:`replace_dir` publishes a directory filled under a temporary name
  (an export archive, a new OS definition), replacing the previous one in one
  ``renameat2(RENAME_EXCHANGE)`` where the kernel offers it;
- :func:`private_dir` makes a directory of ours (state subdirectories) and
  refuses one that is a symlink or belongs to someone else;
- :func:`private_temp_dir` makes a private directory in the system's temp dir;
- :func:`reclaim_temp_files` is the one way what killed processes left is
  removed: the temporary files of writers killed before their rename, and the
  private temporary directories of processes killed before they removed them
  (both names carry the pid and start time of their maker).

Nothing is ever reopened through a path that another user could have pointed
elsewhere.  Errors are plain ``OSError``: callers name the object.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING

from ganeti_vol.core.lazy import lazy
from ganeti_vol.core.procs import process_alive, process_start_time

# every command writes a file now and then, few replace a directory: the CLI starts
# without ctypes, shutil and tempfile
if TYPE_CHECKING:
    import shutil
    import tempfile

    from ganeti_vol.core import libc
else:
    libc = lazy("ganeti_vol.core.libc")
    shutil = lazy("shutil")
    tempfile = lazy("tempfile")

#: flags of every file we create: never through a symlink, never an existing file
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` durable."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_fd(path: str, mode: int = 0o600, *, dir_fd: int | None = None) -> int:
    """A new file opened for writing, with exactly ``mode``; refuses existing names and symlinks."""
    fd = os.open(path, CREATE_FLAGS, mode, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away (never added any)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def create(path: str, data: bytes, mode: int = 0o600, *, durable: bool = True) -> None:
    """Create the new file ``path`` holding ``data`` (fsynced unless not ``durable``)."""
    fd = create_fd(path, mode)
    try:
        _write_all(fd, data)
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(path)
        raise
    os.close(fd)


def _unlink_quietly(path: str, dir_fd: int | None = None) -> None:
    try:
        os.unlink(path, dir_fd=dir_fd)
    except OSError:
        pass


def replace(
    path: str,
    data: bytes,
    mode: int | None = 0o600,
    *,
    durable: bool = True,
    tmp_dir: str | None = None,
) -> None:
    """Atomically make ``path`` hold ``data`` with ``mode``.

    ``mode=None`` keeps the mode (and, as root, the owner) of the regular file
    being replaced, 0600 otherwise.  ``durable``: fsync the file and the
    directory, so the new content survives a crash (status files, rewritten
    every second, skip it).  A symlink at ``path`` is replaced, never followed.
    ``tmp_dir``: where the temporary file is made (on the same filesystem),
    instead of next to ``path`` (a repository writer's own directory, which
    its garbage collection removes when the writer died).
    """
    if tmp_dir is not None:
        _replace_from(tmp_dir, path, data, mode or 0o600, durable)
        return
    dirname, base = os.path.split(os.path.abspath(path))
    dfd = os.open(dirname, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        owner = None
        if mode is None:
            mode = 0o600
            try:
                st = os.stat(base, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if stat.S_ISREG(st.st_mode):
                    mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
        tmp = _temp_name(base)
        fd = create_fd(tmp, mode, dir_fd=dfd)
        try:
            try:
                if owner is not None and os.geteuid() == 0 and owner != (0, 0):
                    os.fchown(fd, *owner)
                _write_all(fd, data)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, base, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            _unlink_quietly(tmp, dfd)
            raise
        if durable:
            os.fsync(dfd)
        # what a writer of this file killed before its rename left
        reclaim_temp_files(dirname, prefix=f".{base[:150]}.tmp-")
    finally:
        os.close(dfd)


def _temp_name(base: str) -> str:
    return f".{base[:150]}.tmp-{_owner_tag()}-{os.urandom(6).hex()}"


def _replace_from(tmp_dir: str, path: str, data: bytes, mode: int, durable: bool) -> None:
    """:func:`replace` through a temporary file in ``tmp_dir``."""
    tmp = os.path.join(tmp_dir, _temp_name(os.path.basename(path)))
    fd = create_fd(tmp, mode)
    try:
        try:
            _write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def replace_dir(staging: str, final: str, *, old_dir: Callable[[], str] | None = None) -> None:
    """Publish the directory ``staging`` as ``final``, replacing what is there, and fsync
    the parent directory.

    Where the kernel offers ``renameat2(RENAME_EXCHANGE)`` the swap is atomic:
    ``final`` names the previous entry until it names the new directory, and
    the previous one, left at ``staging``, is removed.  Elsewhere the
    previous entry is first moved into ``old_dir()`` (default: a new hidden
    directory next to ``final``): a short window without ``final``.
    """
    parent, base = os.path.split(os.path.abspath(final))
    try:
        os.rename(staging, final)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        if libc.renameat2_exchange(staging, final):
            _remove(staging)  # now the previous entry
        else:
            old = old_dir() if old_dir is not None else tempfile.mkdtemp(
                prefix=f".{base[:100]}.old-", dir=parent)
            previous = os.path.join(old, "previous")
            os.rename(final, previous)
            try:
                os.rename(staging, final)
            except OSError:
                os.rename(previous, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
    fsync_dir(parent)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        _unlink_quietly(path)


#: every temporary name of ours: ``<stem>-<pid>-<start time>-<random>``, the pid and start
#: time of the process that made it (:func:`_owner_tag`), so a dead one's can be told
_TEMP_NAME = re.compile(r"^(.+)-(\d+)-(\d+)-([a-z0-9_]+)$")
#: the stem and random part of :func:`replace`'s temporary files
_TEMP_FILE_STEM = re.compile(r"^\..+\.tmp$")
_TEMP_FILE_RANDOM = re.compile(r"^[0-9a-f]{12}$")


def _owner_tag() -> str:
    pid = os.getpid()
    return f"{pid}-{process_start_time(pid) or 0}"


def reclaim_temp_files(directory: str, dry_run: bool = False, *, prefix: str = ".",
                       stem: str | None = None) -> list[str]:
    """Remove what processes of ours killed before they were done left in ``directory``
    (the names carry the pid and start time of their maker); never a live one's.

    Without ``stem``: the temporary files of :func:`replace` (those starting with
    ``prefix``) whose writer died before renaming them; :func:`replace` does it for
    its own file.  With ``stem``: the directories of :func:`private_temp_dir` named
    after ``stem`` that are ours.  Returns the paths removed (or, ``dry_run``, to remove).
    """
    try:
        names = sorted(n for n in os.listdir(directory) if n.startswith(prefix))
    except OSError:
        return []
    removed = []
    for name in names:
        match = _TEMP_NAME.match(name)
        if match is None:
            continue
        if stem is None:
            if not (_TEMP_FILE_STEM.match(match[1]) and _TEMP_FILE_RANDOM.match(match[4])):
                continue
        elif match[1] != stem:
            continue
        if process_alive(int(match[2]), int(match[3])):
            continue
        path = os.path.join(directory, name)
        if stem is None:
            removed.append(path)
            if not dry_run:
                _unlink_quietly(path)
            continue
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
            removed.append(path)
            if not dry_run:
                shutil.rmtree(path, ignore_errors=True)
    return removed


def private_temp_dir(prefix: str) -> str:
    """A new private directory in the system's temp dir, named ``PREFIX-PID-START-XXXX``
    (this process's pid and start time); first removes the ones of that ``prefix`` whose
    process died without removing its own (kill -9, :func:`reclaim_temp_files`), never a
    live one's."""
    parent = tempfile.gettempdir()
    reclaim_temp_files(parent, prefix=prefix + "-", stem=prefix)
    return tempfile.mkdtemp(prefix=f"{prefix}-{_owner_tag()}-")


def open_append(path: str, *, create_missing: bool = True) -> int:
    """Open a log of ours for appending; never through a symlink, never someone else's file.

    The file must be a regular file owned by this user with a single link (a
    hard link planted in a shared directory is refused); a missing one is
    created 0600 (exclusively) if ``create_missing``.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    while True:
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            if not create_missing:
                raise
            try:
                return create_fd(path, 0o600)
            except FileExistsError:
                continue  # created meanwhile: open that one (and check it)
        break
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"'{path}' is not a regular file")
        if st.st_uid != os.geteuid():
            raise PermissionError(f"'{path}' belongs to uid {st.st_uid}, not to us")
        if st.st_nlink != 1:
            raise PermissionError(f"'{path}' has {st.st_nlink} links (a planted hard link?)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def private_dir(path: str, mode: int = 0o700) -> str:
    """Make directory ``path`` (and its parents) if missing; refuse it if it is a symlink
    or someone else's.  Returns ``path``."""
    try:
        os.mkdir(path, mode)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path) or ".", 0o750, exist_ok=True)
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            pass
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"'{path}' is not a directory (a symlink or a file)")
    if st.st_uid != os.geteuid():
        raise PermissionError(f"'{path}' belongs to uid {st.st_uid}, not to us")
    return path
