"""Records of what a process holds (a loop device, a snapshot), kept so that a later run can
release what a killed one left behind.

A :class:`RecordDir` is a directory of small JSON files, one per held
resource, each written atomically and carrying its owner's pid and start
time (:func:`owner`), so that :func:`owner_alive` never takes a reused pid for
the owner.  Reading skips (with a warning) a record that cannot be read:
cleanup goes on with the others.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from ganeti_vol.core import atomicfile
from ganeti_vol.core.procs import process_alive, process_start_time

log = logging.getLogger(__name__)

SUFFIX = ".json"


def owner() -> dict[str, Any]:
    """The fields that name this process as a record's owner."""
    pid = os.getpid()
    return {"pid": pid, "start_time": process_start_time(pid)}


def owner_alive(record: Mapping[str, Any]) -> bool:
    """True if the process that wrote ``record`` still runs (the same process, not its pid
    reused); a record without a readable owner has none alive."""
    try:
        pid, start = int(record.get("pid") or 0), int(record.get("start_time") or -1)
    except (TypeError, ValueError):
        return False
    return pid > 0 and process_alive(pid, start)


class RecordDir:
    """The records of one kind of resource (``what``: "loop", "snapshot") in ``directory``."""

    def __init__(self, directory: str, what: str) -> None:
        self.directory, self.what = directory, what

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name + SUFFIX)

    def write(self, name: str, record: Mapping[str, Any]) -> None:
        """Record ``name`` (atomically; the directory is made if needed).  OSError on failure."""
        os.makedirs(self.directory, exist_ok=True)
        atomicfile.replace(self.path(name), json.dumps(record, sort_keys=True).encode())

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(name))

    def read_all(self) -> dict[str, dict[str, Any]]:
        """{name: record} of every readable record, in name order."""
        try:
            names = sorted(n for n in os.listdir(self.directory) if n.endswith(SUFFIX))
        except FileNotFoundError:
            return {}
        records: dict[str, dict[str, Any]] = {}
        for file_name in names:
            try:
                with open(os.path.join(self.directory, file_name), encoding="utf-8") as f:
                    record = json.load(f)
            except (OSError, ValueError) as err:
                log.warning("ignoring unreadable %s record %s: %s", self.what, file_name, err)
                continue
            if isinstance(record, dict):
                records[file_name[: -len(SUFFIX)]] = record
            else:
                log.warning("ignoring unreadable %s record %s: not an object", self.what,
                            file_name)
        return records
