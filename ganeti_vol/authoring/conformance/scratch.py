"""The scratch node and instances of a conformance run: its directories, disks and one NIC."""

from __future__ import annotations

import os
import socket
import time
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass

from ganeti_vol.authoring.conformance.report import EXTRA_DISK_SIZE, INSTANCE_NAME, Options
from ganeti_vol.core.model import Instance, NodeConfig, OSDefinition
from ganeti_vol.ganeti import fields


@dataclass
class Disks:
    """The scratch disks of one pass: the original (a) and the import target (b)."""

    kind: str
    a: Instance
    b: Instance
    #: the files behind the disks (the disks themselves on the file pass)
    files_a: list[str]
    files_b: list[str]

    @property
    def watched(self) -> list[str]:
        """Paths whose size must not change: the disks and, on the loop pass, their files."""
        paths = [d.path for d in (*self.a.disks, *self.b.disks) if d.path]
        return list(dict.fromkeys(paths + self.files_a + self.files_b))


def scratch_node(os_def: OSDefinition, work: str, options: Options) -> NodeConfig:
    dirs = {k: os.path.join(work, k) for k in ("hooks", "log", "export", "state")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    timeouts = {k: options.timeout for k in ("create", "rename", "verify", "export", "import",
                                               "hook")}
    return NodeConfig(
        os_search_path=(os.path.dirname(os_def.path),), hooks_dir=dirs["hooks"],
        log_dir=dirs["log"], export_dir=dirs["export"], state_dir=dirs["state"],
        timeouts=timeouts, stall_timeout=min(60.0, options.timeout), parallel_disks=1,
        snapshot_provider="none", source="(os test)",
    )


def scratch_disk_size(options: Options, index: int) -> int:
    """--disk-size for disk 0; the others are small (EXTRA_DISK_SIZE at most)."""
    size = options.disk_size
    return size if index == 0 else min(size, EXTRA_DISK_SIZE)


def scratch_instance(full_name: str, options: Options, paths: Sequence[str]) -> Instance:
    """The scratch instance of OS ``full_name`` on ``paths`` (files or block devices), one NIC."""
    inst_uuid = fields.instance_uuid_for(INSTANCE_NAME)
    disks = tuple(
        fields.make_disk(i, inst_uuid, path=p, size=scratch_disk_size(options, i))
        for i, p in enumerate(paths)
    )
    now = time.time()
    node = socket.getfqdn()
    return Instance(
        name=INSTANCE_NAME, os=full_name, uuid=inst_uuid, ctime=now, mtime=now,
        hypervisor="kvm", primary_node=str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, node)),
        disks=disks, nics=(fields.make_nic(0, inst_uuid, {"link": "br0"}),),
        osparams=dict(options.osparams),
        beparams={"maxmem": "512", "minmem": "512", "vcpus": "1", "auto_balance": "True",
                  **options.beparams},
        hvparams={"kernel_path": "", "serial_console": "True", **options.hvparams},
    )
