"""The snapshot lease every provider shares: lock and record per tag, identity checks, release.

:class:`Provider` takes a snapshot for the duration of a block: it holds a
lock per tag in ``<state_dir>/snapshots`` and a record there while the
snapshot exists, refuses the live origin of a running instance, checks the
snapshot before and after, and releases it in ``finally``.  The providers
themselves are in :mod:`ganeti_vol.system.snapshotproviders`.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import io
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ganeti_vol.core import errors as E
from ganeti_vol.core import signals
from ganeti_vol.core.model import NodeConfig
from ganeti_vol.core.records import RecordDir, owner

log = logging.getLogger(__name__)

CONSISTENCY_STOPPED = "stopped"  # the instance is stopped: the data cannot change
CONSISTENCY_CRASH = "crash-consistent"  # an atomic point-in-time image of a running disk
CONSISTENCY_FUZZY = "fuzzy"  # copied while running: not a single point in time

TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,47}$")
STATE_SUBDIR = "snapshots"


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot ready to be read; ``identity`` goes into the export manifest."""

    path: str
    identity: dict[str, Any]
    provider: str
    consistency: str
    origin: str
    #: raises SnapshotError if the snapshot became invalid (e.g. an LVM overflow)
    _check: Callable[[], None] = field(default=lambda: None, compare=False, repr=False)

    def check(self) -> None:
        """Raise :class:`~ganeti_vol.core.errors.SnapshotError` if the data can no longer be trusted."""
        self._check()

    def open(self) -> io.FileIO:
        """Open the snapshot for reading, verifying it is the recorded snapshot.

        The snapshot is checked first (an invalidated one is refused), then
        the opened file's device/inode must match the identity: the exporter
        cannot end up reading the origin (or anything else) by mistake.
        """
        self.check()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise E.SnapshotError(
                f"cannot read snapshot '{self.path}' of '{self.origin}': {err.strerror}"
            ) from err
        f = io.FileIO(fd, "rb", closefd=True)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode) or file_id(st) != self.identity.get("file_id"):
                raise E.SnapshotError(
                    f"cannot read snapshot '{self.path}' of '{self.origin}': "
                    "it is not the snapshot that was taken"
                )
        except BaseException:
            f.close()
            raise
        return f

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "identity": dict(self.identity),
            "provider": self.provider,
            "consistency": self.consistency,
            "origin": self.origin,
        }


def file_id(st: os.stat_result) -> str:
    """What makes a file or device unique on this node: 'b:MAJ:MIN' or 'f:DEV:INO'."""
    if stat.S_ISBLK(st.st_mode):
        return f"b:{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return f"f:{st.st_dev}:{st.st_ino}"


def stat_disk(path: str, what: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as err:
        raise E.SnapshotError(f"cannot snapshot '{what}': {err.strerror}") from err


@dataclass
class Taken:
    """What a provider's ``_take`` returns: the info and how to let go of it."""

    info: SnapshotInfo
    release: Callable[[], None]


class Provider(abc.ABC):
    """A way of taking point-in-time snapshots of instance disks."""

    name: ClassVar[str]

    def __init__(self, node_config: NodeConfig) -> None:
        self.node_config = node_config

    @property
    def state_dir(self) -> str:
        return os.path.join(self.node_config.state_dir, STATE_SUBDIR)

    @contextlib.contextmanager
    def snapshot(self, disk_path: str, tag: str, *, running: bool = True) -> Iterator[SnapshotInfo]:
        """Snapshot ``disk_path`` for the duration of the block.

        ``tag`` names the snapshot deterministically (same disk, same tag);
        ``running`` says whether the instance may be writing to the disk.
        """
        if not TAG_RE.match(tag):
            raise E.UsageError(f"invalid snapshot tag '{tag}': use letters, digits and _.+-")
        disk_path = os.path.abspath(disk_path)
        origin_id = file_id(stat_disk(disk_path, disk_path))
        with self._locked(disk_path, tag):
            self._remove_stale(disk_path, tag)
            # recorded before it exists: a crash at any point leaves a record for cleanup
            self._write_record(disk_path, tag)
            try:
                taken = self._take(disk_path, tag, running)
            except BaseException:
                self._remove_record(tag)
                raise
            raised: BaseException | None = None
            try:
                info = taken.info
                if running and info.identity["file_id"] == origin_id:
                    raise E.SnapshotError(
                        f"cannot export '{disk_path}': the {self.name} snapshot "
                        f"'{info.path}' is the live origin of a running instance"
                    )
                info.check()
                log.info("snapshot %s of %s: %s (%s)", tag, disk_path, info.path, self.name)
                yield info
                info.check()
            except BaseException as err:
                raised = err
                raise
            finally:
                self._finish(taken, disk_path, tag, raised)

    def _finish(
        self, taken: Taken, disk_path: str, tag: str, raised: BaseException | None
    ) -> None:
        with signals.deferred():
            try:
                taken.release()
            except E.GanetiVolError as err:
                if raised is None:
                    raise
                log.error("%s", err)
                raised.add_note(str(err))
                return
            self._remove_record(tag)
        log.info("released snapshot %s of %s", tag, disk_path)

    # --- locking and records ------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, disk_path: str, tag: str) -> Iterator[None]:
        try:
            os.makedirs(self.state_dir, exist_ok=True)
            lock = os.fdopen(os.open(os.path.join(self.state_dir, f"{tag}.lock"),  # noqa: SIM115
                                     os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                                     0o600), "a")
        except OSError as err:
            raise E.SnapshotError(
                f"cannot snapshot '{disk_path}': cannot use '{self.state_dir}': {err.strerror}"
            ) from err
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise E.BusyError(
                    f"cannot snapshot '{disk_path}': snapshot '{tag}' is in use by another export"
                ) from None
            yield

    def release_stale(self, disk_path: str, tag: str) -> None:
        """Release the snapshot ``tag`` of ``disk_path`` that a dead run left, and its record."""
        with self._locked(disk_path, tag):
            self._remove_stale(disk_path, tag)
            self._remove_record(tag)

    @property
    def records(self) -> RecordDir:
        return RecordDir(self.state_dir, "snapshot")

    def _write_record(self, disk_path: str, tag: str) -> None:
        record = {"provider": self.name, "disk_path": disk_path, "tag": tag, **owner()}
        try:
            self.records.write(tag, record)
        except OSError as err:
            raise E.SnapshotError(
                f"cannot snapshot '{disk_path}': cannot record it in '{self.state_dir}': "
                f"{err.strerror}"
            ) from err

    def _remove_record(self, tag: str) -> None:
        self.records.remove(tag)

    # --- what each provider implements --------------------------------------------

    @abc.abstractmethod
    def _take(self, disk_path: str, tag: str, running: bool) -> Taken:
        """Create the snapshot (nothing with this tag exists now)."""

    @abc.abstractmethod
    def _remove_stale(self, disk_path: str, tag: str) -> None:
        """Remove a snapshot with this tag left behind by a crashed run, if any."""

    def _info(
        self,
        disk_path: str,
        path: str,
        consistency: str,
        check: Callable[[], None] | None = None,
        **extra: Any,
    ) -> SnapshotInfo:
        identity = {
            "provider": self.name,
            "origin": disk_path,
            "path": path,
            "file_id": file_id(stat_disk(path, disk_path)),
            "taken_at": time.time(),
            **extra,
        }
        return SnapshotInfo(
            path, identity, self.name, consistency, disk_path, check or (lambda: None)
        )


def consistency_of(running: bool) -> str:
    return CONSISTENCY_CRASH if running else CONSISTENCY_STOPPED


def unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def require_file(disk_path: str, provider: str) -> os.stat_result:
    st = stat_disk(disk_path, disk_path)
    if not stat.S_ISREG(st.st_mode):
        raise E.SnapshotError(
            f"cannot snapshot '{disk_path}': the {provider} provider works on file disks only"
        )
    return st
