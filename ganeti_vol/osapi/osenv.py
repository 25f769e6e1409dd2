"""The environment an OS script gets, parsed once: :class:`OSEnv` with its instance,
disks, NICs and parameters."""

from __future__ import annotations

import logging
import os
import shlex
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field

from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.engine import rawio
from ganeti_vol.osapi.values import OSParams

log = logging.getLogger(__name__)



# --- the environment -------------------------------------------------------------------


def _env_int(environ: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    value = environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise E.UsageError(f"environment variable {name}='{value}' is not a whole number") from None


def _env_float(environ: Mapping[str, str], name: str) -> float | None:
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
        return rawio.disk_size(self.require_path())

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


def _opt(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name)
    return value if value else None


@dataclass(frozen=True)
class OSEnv:
    """The Ganeti OS environment, parsed (see :meth:`from_environ`)."""

    os_name: str
    variant: str
    api_version: int | None
    debug_level: int
    params: OSParams
    #: None for ``verify``, which gets only the core variables
    instance: InstanceInfo | None = None
    disks: tuple[DiskInfo, ...] = ()
    nics: tuple[NicInfo, ...] = ()
    #: create: INSTANCE_REINSTALL=1
    reinstall: bool = False
    #: rename: OLD_INSTANCE_NAME
    old_name: str | None = None
    #: the variables themselves
    raw: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> OSEnv:
        """Parse ``environ`` (default ``os.environ``); a malformed number is a UsageError."""
        env = dict(os.environ if environ is None else environ)
        instance = None
        if env.get("INSTANCE_NAME"):
            instance = InstanceInfo(
                name=env["INSTANCE_NAME"],
                os=env.get("INSTANCE_OS", env.get("OS_NAME", "")),
                uuid=env.get("INSTANCE_UUID", ""),
                hypervisor=env.get("HYPERVISOR", ""),
                primary_node=env.get("INSTANCE_PRIMARY_NODE", ""),
                secondary_nodes=tuple(env.get("INSTANCE_SECONDARY_NODES", "").split()),
                ctime=_env_float(env, "INSTANCE_CTIME"),
                mtime=_env_float(env, "INSTANCE_MTIME"),
                be={k[12:]: v for k, v in env.items() if k.startswith("INSTANCE_BE_")},
                hv={k[12:]: v for k, v in env.items() if k.startswith("INSTANCE_HV_")},
            )
        disks = []
        for i in range(_env_int(env, "DISK_COUNT", 0) or 0):
            p = f"DISK_{i}_"
            disks.append(DiskInfo(
                index=i, path=_opt(env, p + "PATH"), size_mib=_env_int(env, p + "SIZE"),
                uuid=env.get(p + "UUID", ""), name=_opt(env, p + "NAME"),
                access=env.get(p + "ACCESS", "rw"), uri=_opt(env, p + "URI"),
                backend_type=_opt(env, p + "BACKEND_TYPE"),
                frontend_type=_opt(env, p + "FRONTEND_TYPE"),
            ))
        nics = []
        for i in range(_env_int(env, "NIC_COUNT", 0) or 0):
            p = f"NIC_{i}_"
            nics.append(NicInfo(
                index=i, mac=env.get(p + "MAC", ""), uuid=env.get(p + "UUID", ""),
                name=_opt(env, p + "NAME"), ip=_opt(env, p + "IP"), mode=_opt(env, p + "MODE"),
                link=_opt(env, p + "LINK"), bridge=_opt(env, p + "BRIDGE"),
                frontend_type=_opt(env, p + "FRONTEND_TYPE"),
                network={k[len(p) + 8:].lower(): v for k, v in env.items()
                         if k.startswith(p + "NETWORK_")},
            ))
        return cls(
            os_name=env.get("OS_NAME", ""),
            variant=env.get("OS_VARIANT", ""),
            api_version=_env_int(env, "OS_API_VERSION"),
            debug_level=_env_int(env, "DEBUG_LEVEL", 0) or 0,
            params=OSParams.from_environ(env),
            instance=instance,
            disks=tuple(disks),
            nics=tuple(nics),
            reinstall=env.get("INSTANCE_REINSTALL", "") == "1",
            old_name=_opt(env, "OLD_INSTANCE_NAME"),
            raw=env,
        )

    def require_instance(self) -> InstanceInfo:
        if self.instance is None:
            raise E.UsageError(
                "INSTANCE_NAME is not set: run the script through Ganeti or ganeti-vol "
                "(see 'ganeti-vol instance env')"
            )
        return self.instance

    def disk(self, index: int) -> DiskInfo:
        if not 0 <= index < len(self.disks):
            raise E.UsageError(
                f"instance '{self.instance.name if self.instance else '?'}' has no disk {index} "
                f"(DISK_COUNT={len(self.disks)})"
            )
        return self.disks[index]

    def transfer_disk(self, op: str) -> TransferDisk:
        """The disk of an export (``op="export"``) or import: index, device, disk info.

        The device is ``<OP>_DEVICE`` (a snapshot or loop device on a real
        node), else ``<OP>_DISK_PATH``, else ``DISK_<index>_PATH``.
        """
        if op not in ("export", "import"):
            raise E.ProgrammerError(f"transfer_disk: op must be export or import, not {op!r}")
        prefix = op.upper()
        index = _env_int(self.raw, f"{prefix}_INDEX")
        if index is None:
            raise E.UsageError(
                f"{prefix}_INDEX is not set: the {op} script runs once per disk, started by "
                f"Ganeti or 'ganeti-vol {op}'"
            )
        disk = self.disks[index] if 0 <= index < len(self.disks) else None
        if self.disks and disk is None:
            raise E.UsageError(f"{prefix}_INDEX={index} but DISK_COUNT={len(self.disks)}")
        device = (_opt(self.raw, f"{prefix}_DEVICE") or _opt(self.raw, f"{prefix}_DISK_PATH")
                  or (disk.path if disk else None))
        if not device:
            raise E.UsageError(f"{prefix}_DEVICE is not set: no disk to {op}")
        return TransferDisk(op, index, device, disk, _opt(self.raw, f"{prefix}_DISK_URI"))

    def variant_config(self, os_dir: str) -> dict[str, str]:
        """``<os_dir>/variants/<variant>.conf`` as a dict ({} if there is no such file)."""
        if not self.variant:
            return {}
        if not C.EXT_PLUGIN_MASK.match(self.variant):
            raise E.OSDefinitionError(f"invalid variant name '{self.variant}'")
        path = os.path.join(os_dir, "variants", f"{self.variant}.conf")
        return read_config(path) if os.path.exists(path) else {}


def read_config(path: str) -> dict[str, str]:
    """``KEY=VALUE`` lines (shell quoting, ``#`` comments, optional ``export``) as a dict.

    The subset of shell that variant files of shell OS definitions use; no
    expansion is done.  A malformed line is a ConfigError naming file:line.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise E.ConfigError(f"cannot read '{path}': {err.strerror}") from err
    out: dict[str, str] = {}
    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.startswith("export "):
            text = text[7:].strip()
        key, sep, value = text.partition("=")
        if not sep or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise E.ConfigError(
                f"invalid line in '{path}':{lineno}: expected KEY=VALUE, got {line!r}"
            )
        try:
            words = shlex.split(value, comments=True)
        except ValueError as err:
            raise E.ConfigError(f"invalid value in '{path}':{lineno}: {err}") from None
        out[key] = " ".join(words)
    return out
