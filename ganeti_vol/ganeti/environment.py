"""The Ganeti environment contract of OS scripts: its variable names, builders and parser.

The builders are Ganeti's ``OSCoreEnv``/``OSEnvironment``; the hooks' own
environment (``BuildInstanceHookEnv``, ``HooksMaster._BuildEnv``) is in
:mod:`ganeti_vol.ganeti.hookenv`.  The parser (:func:`parse_instance`,
:func:`parse_disks`, :func:`parse_nics`, :func:`parse_transfer`) reads back
what the builders build, into the model OS scripts get through
:class:`ganeti_vol.osapi.OSEnv`; ``tests/test_environment_contract.py``
round-trips ``parse(build(instance))``.

Every builder returns a new ``dict[str, str]``; nothing is inherited from
the caller's environment.  The per-operation builders add what Ganeti adds in
``InstanceOsAdd``, ``RunRenameInstance`` and ``_GetImportExportIoCommand``
(and, for import and export, what Ganeti's import-export daemon adds:
``LC_ALL=C``; ``EXP_SIZE_FD`` is added by :mod:`ganeti_vol.system.process`, which
owns the fd).  Hypervisor and backend parameters are filled with Ganeti's
defaults (:mod:`ganeti_vol.ganeti.params`), as the RPC layer fills them.

A value or name with a NUL byte cannot be put into an environment: the
builders refuse it with a UsageError naming the variable.  A malformed number
is a UsageError of the parser naming the variable.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import disk_size
from ganeti_vol.core.model import (
    Instance,
    OSDefinition,
    printable,
    split_os_name,
)
from ganeti_vol.ganeti import params as ganeti_params

# --- the names: every variable of the OS script contract, once --------------------------------
# (used by the builders and by the parser below; ganeti_vol.osapi.osenv parses with it)

OS_API_VERSION = "OS_API_VERSION"
OS_NAME = "OS_NAME"
OS_VARIANT = "OS_VARIANT"
DEBUG_LEVEL = "DEBUG_LEVEL"
INSTANCE_NAME = "INSTANCE_NAME"
INSTANCE_OS = "INSTANCE_OS"
INSTANCE_UUID = "INSTANCE_UUID"
INSTANCE_CTIME = "INSTANCE_CTIME"
INSTANCE_MTIME = "INSTANCE_MTIME"
INSTANCE_PRIMARY_NODE = "INSTANCE_PRIMARY_NODE"
INSTANCE_SECONDARY_NODES = "INSTANCE_SECONDARY_NODES"
INSTANCE_REINSTALL = "INSTANCE_REINSTALL"
OLD_INSTANCE_NAME = "OLD_INSTANCE_NAME"
HYPERVISOR = "HYPERVISOR"
DISK_COUNT = "DISK_COUNT"
NIC_COUNT = "NIC_COUNT"
#: followed by a backend / hypervisor parameter's name
INSTANCE_BE_PREFIX = "INSTANCE_BE_"
INSTANCE_HV_PREFIX = "INSTANCE_HV_"
#: the fields of DISK_<n>_* and NIC_<n>_*
DISK_FIELDS = ("ACCESS", "UUID", "PATH", "URI", "NAME", "FRONTEND_TYPE", "BACKEND_TYPE", "SIZE")
NIC_FIELDS = ("MAC", "UUID", "NAME", "IP", "MODE", "BRIDGE", "LINK", "FRONTEND_TYPE")
#: followed by a gnt-network field (NIC_<n>_NETWORK_SUBNET, ...)
NETWORK_PREFIX = "NETWORK_"
#: the kinds of transfer: <kind>_INDEX, <kind>_DEVICE, <kind>_DISK_PATH, <kind>_DISK_URI
TRANSFER_KINDS = ("EXPORT", "IMPORT")
TRANSFER_FIELDS = ("INDEX", "DEVICE", "DISK_PATH", "DISK_URI")


def disk_var(index: int, name: str) -> str:
    """``DISK_<index>_<name>`` (one of :data:`DISK_FIELDS`)."""
    if name not in DISK_FIELDS:
        raise E.ProgrammerError(f"unknown disk variable field {name!r}")
    return f"DISK_{index}_{name}"


def nic_prefix(index: int) -> str:
    return f"NIC_{index}_"


def nic_var(index: int, name: str) -> str:
    """``NIC_<index>_<name>`` (one of :data:`NIC_FIELDS`)."""
    if name not in NIC_FIELDS:
        raise E.ProgrammerError(f"unknown NIC variable field {name!r}")
    return nic_prefix(index) + name


def transfer_var(kind: str, name: str) -> str:
    """``EXPORT_DEVICE``, ``IMPORT_INDEX``, ...: ``kind`` in :data:`TRANSFER_KINDS`."""
    if kind not in TRANSFER_KINDS or name not in TRANSFER_FIELDS:
        raise E.ProgrammerError(f"unknown transfer variable {kind}_{name}")
    return f"{kind}_{name}"


def osp_name(param: str) -> str:
    """``OSP_`` + upper case, ``-`` to ``_`` (Ganeti ``OSCoreEnv``)."""
    return C.OSP_PREFIX + param.upper().replace("-", "_")


def resolve_variant(os_def: OSDefinition, full_name: str) -> str:
    """``OS_VARIANT``: given variant, else the first of variants.list, else ""."""
    if os_def.api_version >= C.OS_API_V15 and os_def.variants:
        return split_os_name(full_name)[1] or os_def.variants[0]
    return ""


def core_env(
    os_def: OSDefinition, full_name: str, osparams: Mapping[str, str], debug: int = 0
) -> dict[str, str]:
    """Ganeti ``OSCoreEnv``: what every script, ``verify`` included, gets."""
    env = {
        OS_API_VERSION: "%d" % os_def.api_version,
        OS_NAME: os_def.name,
        DEBUG_LEVEL: "%d" % debug,
        OS_VARIANT: resolve_variant(os_def, full_name),
        "PATH": C.SCRIPT_PATH,
    }
    for name, value in osparams.items():
        env[osp_name(name)] = str(value)
    return checked(env)


def checked(env: dict[str, str]) -> dict[str, str]:
    """``env`` itself, or UsageError if a name or value cannot be passed to a process."""
    for key, value in env.items():
        if "\0" in key or "\0" in value or "=" in key or not key:
            raise E.UsageError(f"cannot pass the variable '{printable(key)}' to a script: "
                               + ("its name is empty or has '=' or a NUL byte"
                                  if "\0" in key or "=" in key or not key
                                  else "its value contains a NUL byte"))
    return env


def all_osparams(instance: Instance) -> dict[str, str]:
    """Public parameters with private ones merged over them."""
    merged = dict(instance.osparams)
    merged.update(instance.osparams_private)
    return merged


def instance_env(os_def: OSDefinition, instance: Instance, debug: int = 0) -> dict[str, str]:
    """Ganeti ``OSEnvironment``: the core env plus instance, disk and NIC variables."""
    env = core_env(os_def, instance.os, all_osparams(instance), debug)
    env.update(
        {
            INSTANCE_NAME: instance.name,
            INSTANCE_OS: instance.os,
            INSTANCE_UUID: instance.uuid,
            INSTANCE_CTIME: str(instance.ctime),
            INSTANCE_MTIME: str(instance.mtime),
            INSTANCE_PRIMARY_NODE: instance.primary_node,
            INSTANCE_SECONDARY_NODES: " ".join(instance.secondary_nodes),
            HYPERVISOR: instance.hypervisor,
            DISK_COUNT: "%d" % len(instance.disks),
            NIC_COUNT: "%d" % len(instance.nics),
        }
    )
    hvparams = ganeti_params.filled_hv(instance.hypervisor, instance.hvparams)
    beparams = ganeti_params.filled_be(instance.beparams)
    disk_type = hvparams.get("disk_type")
    for idx, disk in enumerate(instance.disks):
        env[disk_var(idx, "ACCESS")] = disk.access
        env[disk_var(idx, "UUID")] = disk.uuid
        if disk.path:
            env[disk_var(idx, "PATH")] = disk.path
        if disk.uri:
            env[disk_var(idx, "URI")] = disk.uri
        if disk.name:
            env[disk_var(idx, "NAME")] = disk.name
        if disk_type is not None:
            env[disk_var(idx, "FRONTEND_TYPE")] = str(disk_type)
        env[disk_var(idx, "BACKEND_TYPE")] = disk.backend_type
        env[disk_var(idx, "SIZE")] = str(disk.size_mib)
    nic_type = hvparams.get("nic_type")
    for idx, nic in enumerate(instance.nics):
        env[nic_var(idx, "MAC")] = nic.mac
        env[nic_var(idx, "UUID")] = nic.uuid
        if nic.name:
            env[nic_var(idx, "NAME")] = nic.name
        if nic.ip:
            env[nic_var(idx, "IP")] = nic.ip
        env[nic_var(idx, "MODE")] = nic.mode
        if nic.mode == "bridged":
            env[nic_var(idx, "BRIDGE")] = nic.link or ""
        if nic.link:
            env[nic_var(idx, "LINK")] = nic.link
        env.update(network_env(nic_prefix(idx), nic.network))
        if nic_type is not None:
            env[nic_var(idx, "FRONTEND_TYPE")] = str(nic_type)
    for key, value in beparams.items():
        env[INSTANCE_BE_PREFIX + key] = value
    for key, value in hvparams.items():
        env[INSTANCE_HV_PREFIX + key] = value
    return checked(env)


def network_env(prefix: str, network: Mapping[str, str]) -> dict[str, str]:
    """Ganeti ``objects.Network.HooksDict``: name, uuid, tags always; the rest if set."""
    if not network:
        return {}
    out = {
        prefix + NETWORK_PREFIX + "NAME": network.get("name", ""),
        prefix + NETWORK_PREFIX + "UUID": network.get("uuid", ""),
        prefix + NETWORK_PREFIX + "TAGS": " ".join(network.get("tags", "").split()),
    }
    for key in ("subnet", "gateway", "subnet6", "gateway6", "mac_prefix"):
        if network.get(key):
            out[prefix + NETWORK_PREFIX + key.upper()] = network[key]
    return out


def create_env(
    os_def: OSDefinition, instance: Instance, *, reinstall: bool = False, debug: int = 0
) -> dict[str, str]:
    env = instance_env(os_def, instance, debug)
    if reinstall:
        env[INSTANCE_REINSTALL] = "1"
    return env


def rename_env(
    os_def: OSDefinition, instance: Instance, old_name: str, debug: int = 0
) -> dict[str, str]:
    """``instance`` carries the new name; ``OLD_INSTANCE_NAME`` the old one."""
    env = instance_env(os_def, instance, debug)
    env[OLD_INSTANCE_NAME] = old_name
    return env


def _transfer_env(
    kind: str,
    os_def: OSDefinition,
    instance: Instance,
    index: int,
    device: str | None,
    debug: int,
) -> dict[str, str]:
    env = instance_env(os_def, instance, debug)
    disk = instance.disks[index]
    path = device if device is not None else disk.path
    if path:
        env[transfer_var(kind, "DEVICE")] = path
        env[transfer_var(kind, "DISK_PATH")] = path
    if disk.uri:
        env[transfer_var(kind, "DISK_URI")] = disk.uri
    env[transfer_var(kind, "INDEX")] = "%d" % index
    env["LC_ALL"] = "C"  # Ganeti's import-export daemon (utils.StartDaemon)
    return env


def export_env(
    os_def: OSDefinition,
    instance: Instance,
    index: int,
    *,
    device: str | None = None,
    debug: int = 0,
) -> dict[str, str]:
    """Export of disk ``index``; ``device`` is the snapshot (or loop device) to read."""
    return _transfer_env("EXPORT", os_def, instance, index, device, debug)


def import_env(
    os_def: OSDefinition,
    instance: Instance,
    index: int,
    *,
    device: str | None = None,
    debug: int = 0,
) -> dict[str, str]:
    return _transfer_env("IMPORT", os_def, instance, index, device, debug)


def verify_env(
    os_def: OSDefinition, full_name: str, osparams: Mapping[str, str], debug: int = 0
) -> dict[str, str]:
    """``verify`` gets only the core env (Ganeti ``ValidateOS``)."""
    return core_env(os_def, full_name, osparams, debug)


def with_devices(instance: Instance, devices: Mapping[int, str]) -> Instance:
    """The instance with ``DISK_<n>_PATH`` pointing at attached block devices.

    A disk whose path changes (a file attached as a loop device) gets
    ``DISK_<n>_BACKEND_TYPE=block``, Ganeti's value for a block device.
    """
    if not devices:
        return instance
    from dataclasses import replace

    disks = tuple(
        replace(d, path=devices[i], backend_type="block") if devices.get(i, d.path) != d.path
        else d
        for i, d in enumerate(instance.disks)
    )
    return instance.replace(disks=disks)


# --- the parser: what an OS script reads back (the inverse of the builders) ------------------


def env_int(environ: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    """The whole number in ``name`` (``default`` if unset or empty); UsageError if malformed."""
    value = environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise E.UsageError(f"environment variable {name}='{value}' is not a whole number") from None


def env_float(environ: Mapping[str, str], name: str) -> float | None:
    """The number in ``name`` (None if unset or empty); UsageError if malformed."""
    value = environ.get(name, "").strip()
    try:
        return float(value) if value else None
    except ValueError:
        raise E.UsageError(f"environment variable {name}='{value}' is not a number") from None


@dataclass(frozen=True)
class DiskInfo:
    """One instance disk (``DISK_<n>_*``)."""

    index: int
    path: str | None
    #: DISK_<n>_SIZE in MiB (Ganeti 3.0+); None if not given
    size_mib: int | None
    uuid: str = ""
    name: str | None = None
    access: str = "rw"
    uri: str | None = None
    backend_type: str | None = None
    frontend_type: str | None = None

    @property
    def size_bytes(self) -> int | None:
        return None if self.size_mib is None else self.size_mib << 20

    def require_path(self) -> str:
        if not self.path:
            raise E.UsageError(f"disk {self.index} has no path (DISK_{self.index}_PATH is not set)")
        return self.path

    def actual_size(self) -> int:
        """The size of the file or block device in bytes (what really fits)."""
        return disk_size(self.require_path())

    def is_block_device(self) -> bool:
        try:
            return stat.S_ISBLK(os.stat(self.require_path()).st_mode)
        except OSError as err:
            raise E.DeviceError(
                f"cannot use disk {self.index} '{self.path}': {err.strerror}"
            ) from err


@dataclass(frozen=True)
class NicInfo:
    """One NIC (``NIC_<n>_*``)."""

    index: int
    mac: str
    uuid: str = ""
    name: str | None = None
    ip: str | None = None
    mode: str | None = None
    link: str | None = None
    bridge: str | None = None
    frontend_type: str | None = None
    #: NIC_<n>_NETWORK_* with the prefix removed and lower-cased (subnet, gateway, ...)
    network: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class InstanceInfo:
    """The instance (``INSTANCE_*``, ``HYPERVISOR``)."""

    name: str
    os: str
    uuid: str = ""
    hypervisor: str = ""
    primary_node: str = ""
    secondary_nodes: tuple[str, ...] = ()
    ctime: float | None = None
    mtime: float | None = None
    #: INSTANCE_BE_* and INSTANCE_HV_*, keys as given after the prefix
    be: dict[str, str] = field(default_factory=dict)
    hv: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TransferDisk:
    """The disk an export or import script works on."""

    op: str
    index: int
    #: what to read (export) or write (import): EXPORT_DEVICE / IMPORT_DEVICE
    device: str
    disk: DiskInfo | None
    uri: str | None = None


def after_prefix(environ: Mapping[str, str], prefix: str) -> dict[str, str]:
    """The variables starting with ``prefix``, keyed by the rest of their name."""
    return {k[len(prefix):]: v for k, v in environ.items() if k.startswith(prefix)}


def optional(environ: Mapping[str, str], name: str) -> str | None:
    """The value of ``name``, None if unset or empty."""
    value = environ.get(name)
    return value if value else None


def parse_instance(env: Mapping[str, str]) -> InstanceInfo | None:
    """``INSTANCE_*`` and ``HYPERVISOR``; None without ``INSTANCE_NAME`` (``verify``)."""
    if not env.get(INSTANCE_NAME):
        return None
    return InstanceInfo(
        name=env[INSTANCE_NAME],
        os=env.get(INSTANCE_OS, env.get(OS_NAME, "")),
        uuid=env.get(INSTANCE_UUID, ""),
        hypervisor=env.get(HYPERVISOR, ""),
        primary_node=env.get(INSTANCE_PRIMARY_NODE, ""),
        secondary_nodes=tuple(env.get(INSTANCE_SECONDARY_NODES, "").split()),
        ctime=env_float(env, INSTANCE_CTIME),
        mtime=env_float(env, INSTANCE_MTIME),
        be=after_prefix(env, INSTANCE_BE_PREFIX),
        hv=after_prefix(env, INSTANCE_HV_PREFIX),
    )


def parse_disks(env: Mapping[str, str]) -> tuple[DiskInfo, ...]:
    """``DISK_COUNT`` disks from ``DISK_<n>_*``."""
    disks = []
    for i in range(env_int(env, DISK_COUNT, 0) or 0):
        disks.append(DiskInfo(
            index=i, path=optional(env, disk_var(i, "PATH")),
            size_mib=env_int(env, disk_var(i, "SIZE")),
            uuid=env.get(disk_var(i, "UUID"), ""), name=optional(env, disk_var(i, "NAME")),
            access=env.get(disk_var(i, "ACCESS"), "rw"),
            uri=optional(env, disk_var(i, "URI")),
            backend_type=optional(env, disk_var(i, "BACKEND_TYPE")),
            frontend_type=optional(env, disk_var(i, "FRONTEND_TYPE")),
        ))
    return tuple(disks)


def parse_nics(env: Mapping[str, str]) -> tuple[NicInfo, ...]:
    """``NIC_COUNT`` NICs from ``NIC_<n>_*`` (their gnt-network fields lower-cased)."""
    nics = []
    for i in range(env_int(env, NIC_COUNT, 0) or 0):
        nics.append(NicInfo(
            index=i, mac=env.get(nic_var(i, "MAC"), ""),
            uuid=env.get(nic_var(i, "UUID"), ""), name=optional(env, nic_var(i, "NAME")),
            ip=optional(env, nic_var(i, "IP")), mode=optional(env, nic_var(i, "MODE")),
            link=optional(env, nic_var(i, "LINK")), bridge=optional(env, nic_var(i, "BRIDGE")),
            frontend_type=optional(env, nic_var(i, "FRONTEND_TYPE")),
            network={k.lower(): v for k, v in
                     after_prefix(env, nic_prefix(i) + NETWORK_PREFIX).items()},
        ))
    return tuple(nics)


def parse_transfer(environ: Mapping[str, str], op: str,
                   disks: Sequence[DiskInfo]) -> TransferDisk:
    """The disk of an export (``op="export"``) or import among ``disks``: index, device, disk info.

    The device is ``<OP>_DEVICE`` (a snapshot or loop device on a real
    node), else ``<OP>_DISK_PATH``, else ``DISK_<index>_PATH``.
    """
    if op not in ("export", "import"):
        raise E.ProgrammerError(f"transfer_disk: op must be export or import, not {op!r}")
    prefix = op.upper()
    index = env_int(environ, transfer_var(prefix, "INDEX"))
    if index is None:
        raise E.UsageError(
            f"{prefix}_INDEX is not set: the {op} script runs once per disk, started by "
            f"Ganeti or 'ganeti-vol {op}'"
        )
    disk = disks[index] if 0 <= index < len(disks) else None
    if disks and disk is None:
        raise E.UsageError(f"{prefix}_INDEX={index} but DISK_COUNT={len(disks)}")
    device = (optional(environ, transfer_var(prefix, "DEVICE"))
              or optional(environ, transfer_var(prefix, "DISK_PATH"))
              or (disk.path if disk else None))
    if not device:
        raise E.UsageError(f"{prefix}_DEVICE is not set: no disk to {op}")
    return TransferDisk(op, index, device, disk,
                        optional(environ, transfer_var(prefix, "DISK_URI")))
