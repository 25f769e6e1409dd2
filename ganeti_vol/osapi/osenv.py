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
from ganeti_vol.ganeti import environment as V
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


def _after_prefix(environ: Mapping[str, str], prefix: str) -> dict[str, str]:
    """The variables starting with ``prefix``, keyed by the rest of their name."""
    return {k[len(prefix):]: v for k, v in environ.items() if k.startswith(prefix)}


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
        if env.get(V.INSTANCE_NAME):
            instance = InstanceInfo(
                name=env[V.INSTANCE_NAME],
                os=env.get(V.INSTANCE_OS, env.get(V.OS_NAME, "")),
                uuid=env.get(V.INSTANCE_UUID, ""),
                hypervisor=env.get(V.HYPERVISOR, ""),
                primary_node=env.get(V.INSTANCE_PRIMARY_NODE, ""),
                secondary_nodes=tuple(env.get(V.INSTANCE_SECONDARY_NODES, "").split()),
                ctime=_env_float(env, V.INSTANCE_CTIME),
                mtime=_env_float(env, V.INSTANCE_MTIME),
                be=_after_prefix(env, V.INSTANCE_BE_PREFIX),
                hv=_after_prefix(env, V.INSTANCE_HV_PREFIX),
            )
        disks = []
        for i in range(_env_int(env, V.DISK_COUNT, 0) or 0):
            disks.append(DiskInfo(
                index=i, path=_opt(env, V.disk_var(i, "PATH")),
                size_mib=_env_int(env, V.disk_var(i, "SIZE")),
                uuid=env.get(V.disk_var(i, "UUID"), ""), name=_opt(env, V.disk_var(i, "NAME")),
                access=env.get(V.disk_var(i, "ACCESS"), "rw"),
                uri=_opt(env, V.disk_var(i, "URI")),
                backend_type=_opt(env, V.disk_var(i, "BACKEND_TYPE")),
                frontend_type=_opt(env, V.disk_var(i, "FRONTEND_TYPE")),
            ))
        nics = []
        for i in range(_env_int(env, V.NIC_COUNT, 0) or 0):
            nics.append(NicInfo(
                index=i, mac=env.get(V.nic_var(i, "MAC"), ""),
                uuid=env.get(V.nic_var(i, "UUID"), ""), name=_opt(env, V.nic_var(i, "NAME")),
                ip=_opt(env, V.nic_var(i, "IP")), mode=_opt(env, V.nic_var(i, "MODE")),
                link=_opt(env, V.nic_var(i, "LINK")), bridge=_opt(env, V.nic_var(i, "BRIDGE")),
                frontend_type=_opt(env, V.nic_var(i, "FRONTEND_TYPE")),
                network={k.lower(): v for k, v in
                         _after_prefix(env, V.nic_prefix(i) + V.NETWORK_PREFIX).items()},
            ))
        return cls(
            os_name=env.get(V.OS_NAME, ""),
            variant=env.get(V.OS_VARIANT, ""),
            api_version=_env_int(env, V.OS_API_VERSION),
            debug_level=_env_int(env, V.DEBUG_LEVEL, 0) or 0,
            params=OSParams.from_environ(env),
            instance=instance,
            disks=tuple(disks),
            nics=tuple(nics),
            reinstall=env.get(V.INSTANCE_REINSTALL, "") == "1",
            old_name=_opt(env, V.OLD_INSTANCE_NAME),
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
        index = _env_int(self.raw, V.transfer_var(prefix, "INDEX"))
        if index is None:
            raise E.UsageError(
                f"{prefix}_INDEX is not set: the {op} script runs once per disk, started by "
                f"Ganeti or 'ganeti-vol {op}'"
            )
        disk = self.disks[index] if 0 <= index < len(self.disks) else None
        if self.disks and disk is None:
            raise E.UsageError(f"{prefix}_INDEX={index} but DISK_COUNT={len(self.disks)}")
        device = (_opt(self.raw, V.transfer_var(prefix, "DEVICE"))
                  or _opt(self.raw, V.transfer_var(prefix, "DISK_PATH"))
                  or (disk.path if disk else None))
        if not device:
            raise E.UsageError(f"{prefix}_DEVICE is not set: no disk to {op}")
        return TransferDisk(op, index, device, disk,
                            _opt(self.raw, V.transfer_var(prefix, "DISK_URI")))

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
