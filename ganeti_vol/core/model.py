"""Plain data objects shared by every layer.  Pure: no I/O, no third-party imports."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ganeti_vol.core import constants as C


@dataclass(frozen=True)
class NodeConfig:
    """The node configuration (``/etc/ganeti-vol/ganeti-vol.conf``)."""

    os_search_path: tuple[str, ...] = C.DEFAULT_OS_SEARCH_PATH
    hooks_dir: str = C.DEFAULT_HOOKS_DIR
    log_dir: str = C.DEFAULT_LOG_DIR
    export_dir: str = C.DEFAULT_EXPORT_DIR
    state_dir: str = C.DEFAULT_STATE_DIR
    #: seconds per script kind (create, rename, verify, export, import, hook); 0 = none
    timeouts: dict[str, float] = field(default_factory=lambda: dict(C.DEFAULT_TIMEOUTS))
    #: seconds without progress before a transfer is aborted (0 = never)
    stall_timeout: float = 60.0
    #: compression worker threads (0 = one per CPU)
    workers: int = 0
    #: disks exported or imported at the same time
    parallel_disks: int = 2
    chunk_size: int = 4 << 20
    #: per-chunk hash algorithm of new archives
    chunk_hash: str = "xxh3-128"
    #: snapshot provider used for exports of running instances
    snapshot_provider: str = "none"
    #: snapshot policy knobs (percent of origin size for lvm; free-space reserve)
    snapshot_size_percent: float = 20.0
    #: keep a reflink snapshot as the base of the next raw export into the same repository,
    #: whose unchanged chunks are then not read (ganeti_vol.system.changemap)
    change_map: bool = True
    #: S3 repositories: endpoint, region, profile, access_key_id, secret_access_key,
    #: retries, lease_ttl (doc/remote.md; the AWS environment variables win)
    s3: dict[str, str] = field(default_factory=dict)
    #: where the configuration came from ("" = built-in defaults)
    source: str = ""

    def timeout(self, kind: str) -> float | None:
        """The timeout in seconds for a script kind, or None for no limit."""
        value = self.timeouts.get(kind, 0.0)
        return value if value and value > 0 else None

    def replace(self, **changes: Any) -> NodeConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class OSDefinition:
    """A valid OS definition found on disk (Ganeti ``objects.OS``)."""

    name: str
    path: str
    api_versions: tuple[int, ...]
    scripts: dict[str, str]  # script name -> absolute path (only those present)
    variants: tuple[str, ...] = ()
    parameters: tuple[tuple[str, str], ...] = ()
    #: ganeti-vol extension: the OS wants block devices instead of file disks
    wants_block_devices: bool = False
    #: with block devices: also add the partitions found in each disk's table
    block_partitions: bool = True
    #: create installs nothing (raw, noop): ``os test`` accepts an empty disk 0
    empty_after_create: bool = False

    @property
    def trusted(self) -> bool:
        return C.OS_SCRIPT_CREATE_UNTRUSTED not in self.scripts

    @property
    def max_api(self) -> int:
        return max(self.api_versions)

    @property
    def api_version(self) -> int:
        """The negotiated API version: the highest one both sides support."""
        return max(set(self.api_versions) & C.OS_API_VERSIONS)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.parameters)

    def script(self, name: str) -> str | None:
        return self.scripts.get(name)

    def full_names(self) -> list[str]:
        """``name+variant`` for each variant, or the bare name (``gnt-os list``)."""
        if self.variants and self.max_api >= C.OS_API_V15:
            return [f"{self.name}{C.VARIANT_DELIM}{v}" for v in self.variants]
        return [self.name]


@dataclass(frozen=True)
class OSEntry:
    """One directory entry of the OS search path, valid or not (Ganeti DiagnoseOS)."""

    name: str
    path: str
    valid: bool
    diagnose: str  # "" when valid
    os: OSDefinition | None = None
    #: later entries with the same name in the search path, hidden by this one
    shadowed: tuple[OSEntry, ...] = ()


@dataclass(frozen=True)
class Disk:
    """One instance disk, with the fields Ganeti passes in ``DISK_<n>_*``."""

    path: str | None
    size_mib: int
    uuid: str
    access: str = "rw"
    name: str | None = None
    backend_type: str = "block"
    uri: str | None = None
    frontend_type: str | None = None

    @property
    def size_bytes(self) -> int:
        return self.size_mib << 20

    @property
    def dev_type(self) -> str:
        """Ganeti's dev_type: ``file`` (``file:<driver>``) or ``blockdev`` (``block``)."""
        if self.backend_type.startswith("file"):
            return "file"
        if self.backend_type == "block":
            return "blockdev"
        return self.backend_type


def disk_template(disks: tuple[Disk, ...] | list[Disk]) -> str:
    """Ganeti ``utils.GetDiskTemplate``: the disks' common type, ``diskless`` or ``mixed``."""
    kinds = {d.dev_type for d in disks}
    if not kinds:
        return "diskless"
    return kinds.pop() if len(kinds) == 1 else "mixed"


@dataclass(frozen=True)
class Nic:
    """One NIC, with the fields Ganeti passes in ``NIC_<n>_*``."""

    mac: str
    uuid: str
    mode: str = "bridged"
    link: str | None = None
    ip: str | None = None
    name: str | None = None
    vlan: str | None = None
    frontend_type: str | None = None
    #: gnt-network fields (name, uuid, subnet, gateway, subnet6, gateway6, mac_prefix, tags)
    network: dict[str, str] = field(default_factory=dict)

    @property
    def bridge(self) -> str | None:
        return self.link if self.mode == "bridged" else None


@dataclass(frozen=True)
class Instance:
    """What Ganeti holds about an instance, as far as OS scripts see it."""

    name: str
    os: str  # full name, possibly with +variant
    uuid: str
    ctime: float
    mtime: float
    hypervisor: str = "kvm"
    primary_node: str = ""
    secondary_nodes: tuple[str, ...] = ()
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    osparams: dict[str, str] = field(default_factory=dict)
    osparams_private: dict[str, str] = field(default_factory=dict)
    beparams: dict[str, str] = field(default_factory=dict)
    hvparams: dict[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    #: admin state: True if the instance is (supposed to be) running
    running: bool = False
    #: snapshot provider chosen for this instance ("" = node default)
    snapshot_provider: str = ""
    #: where the instance was read from ("" = built from flags)
    source: str = ""

    @property
    def os_name(self) -> str:
        return split_os_name(self.os)[0]

    @property
    def os_variant(self) -> str:
        return split_os_name(self.os)[1]

    def replace(self, **changes: Any) -> Instance:
        return dataclasses.replace(self, **changes)


def printable(text: str) -> str:
    """``text`` for a one-line message: unprintable characters (newlines, NUL) escaped."""
    return text if text.isprintable() else repr(text)[1:-1]


def split_os_name(full: str) -> tuple[str, str]:
    """Split ``name+variant`` at the first ``+`` (Ganeti ``SplitNameVariant``)."""
    name, _, variant = full.partition(C.VARIANT_DELIM)
    return name, variant


@dataclass(frozen=True)
class RunResult:
    """Outcome of one script run."""

    argv: tuple[str, ...]
    returncode: int
    duration: float
    log_path: str | None = None
    output: str = ""

    @property
    def signal(self) -> int | None:
        return -self.returncode if self.returncode < 0 else None
