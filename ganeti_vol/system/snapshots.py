"""Snapshots of instance disks: choosing the provider, and releasing what crashed runs left.

``get_provider(name, node_config).snapshot(disk_path, tag, running=...)`` is a
context manager yielding a :class:`SnapshotInfo`: the path to read, the
snapshot's identity (recorded in the export manifest), the provider and the
consistency of the data.  Every provider

* is idempotent by the deterministic ``tag`` (see :func:`snapshot_tag`): a
  snapshot left over by a crashed run with the same tag is removed and taken
  again, never reused and never a reason to fail;
* holds a lock per tag in ``<state_dir>/snapshots`` while the snapshot
  exists, and a record there so ``ganeti-vol cleanup`` can release snapshots
  of crashed runs (:func:`cleanup`);
* releases the snapshot in ``finally`` (signals deferred meanwhile);
* refuses to hand out the live origin of a running instance (ganeti#1251):
  the snapshot's identity is compared with the origin's, and
  :meth:`SnapshotInfo.open` checks the opened file again;
* checks the snapshot is still valid before yielding and again on normal
  exit (an overflowed LVM snapshot fails the export instead of publishing
  bad data).  Publish an archive only after the ``with`` block has exited
  (or after calling :meth:`SnapshotInfo.check`).

Providers: ``none``, ``copy``, ``reflink``, ``btrfs``, ``lvm``, ``zfs``; see
doc/snapshots.md.  The node config's ``snapshot_provider`` is the default; an
instance file's ``snapshot_provider`` overrides it (:func:`provider_for`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Instance, NodeConfig
from ganeti_vol.core.records import RecordDir, owner_alive
from ganeti_vol.system.snapshotlease import (
    STATE_SUBDIR as STATE_SUBDIR,  # cli/ uses it through snapshots
    Provider,
    SnapshotInfo,
)
from ganeti_vol.system.snapshotproviders import (
    BtrfsProvider,
    CopyProvider,
    LvmProvider,
    NoneProvider,
    ReflinkProvider,
    ZfsProvider,
)


# --- choosing a provider --------------------------------------------------------------

PROVIDERS: dict[str, type[Provider]] = {
    cls.name: cls
    for cls in (
        NoneProvider,
        CopyProvider,
        ReflinkProvider,
        BtrfsProvider,
        LvmProvider,
        ZfsProvider,
    )
}


def get_provider(name: str, node_config: NodeConfig) -> Provider:
    """The provider called ``name`` (none, copy, reflink, btrfs, lvm, zfs)."""
    try:
        return PROVIDERS[name](node_config)
    except KeyError:
        raise E.UsageError(
            f"unknown snapshot provider '{name}': expected one of {', '.join(PROVIDERS)}"
        ) from None


def provider_for(instance: Instance, node_config: NodeConfig) -> Provider:
    """The instance file's provider if it names one, else the node config's."""
    return get_provider(instance.snapshot_provider or node_config.snapshot_provider, node_config)


def snapshot_tag(instance: Instance, disk_index: int) -> str:
    """The deterministic tag of an instance disk's snapshot: ``gv-<uuid12>-d<N>``."""
    return f"gv-{instance.uuid.replace('-', '')[:12]}-d{disk_index}"


@contextlib.contextmanager
def instance_snapshot(
    instance: Instance, disk_index: int, node_config: NodeConfig
) -> Iterator[SnapshotInfo]:
    """Snapshot disk ``disk_index`` of ``instance`` with the provider chosen for it."""
    disk = instance.disks[disk_index]
    if not disk.path:
        raise E.UsageError(f"cannot snapshot disk {disk_index} of '{instance.name}': no path")
    provider = provider_for(instance, node_config)
    with provider.snapshot(
        disk.path, snapshot_tag(instance, disk_index), running=instance.running
    ) as info:
        yield info


# --- reconcile after a crash ------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotCleanup:
    """One leftover snapshot :func:`cleanup` released (or would release)."""

    provider: str
    tag: str
    disk_path: str
    done: bool
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def cleanup(node_config: NodeConfig, dry_run: bool = False) -> list[SnapshotCleanup]:
    """Release snapshots whose exporting process died (found by their records)."""
    records = RecordDir(os.path.join(node_config.state_dir, STATE_SUBDIR), "snapshot")
    done = []
    for record in records.read_all().values():
        if owner_alive(record):
            continue
        item = SnapshotCleanup(record["provider"], record["tag"], record["disk_path"], False)
        if not dry_run:
            provider = get_provider(record["provider"], node_config)
            try:
                provider.release_stale(record["disk_path"], record["tag"])
                item = SnapshotCleanup(**{**item.__dict__, "done": True})
            except E.GanetiVolError as err:
                item = SnapshotCleanup(**{**item.__dict__, "error": str(err)})
        done.append(item)
    return done
