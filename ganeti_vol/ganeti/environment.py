"""Pure builders of the environment OS scripts get (Ganeti ``OSCoreEnv``/``OSEnvironment``).

Every function returns a new ``dict[str, str]``; nothing is inherited from
the caller's environment.  The per-operation builders add what Ganeti adds in
``InstanceOsAdd``, ``RunRenameInstance`` and ``_GetImportExportIoCommand``
(and, for import and export, what Ganeti's import-export daemon adds:
``LC_ALL=C``; ``EXP_SIZE_FD`` is added by :mod:`ganeti_vol.system.process`, which
owns the fd).  Hypervisor and backend parameters are filled with Ganeti's
defaults (:mod:`ganeti_vol.ganeti.params`), as the RPC layer fills them.

A value or name with a NUL byte cannot be put into an environment: the
builders refuse it with a UsageError naming the variable.
"""

from __future__ import annotations

from collections.abc import Mapping

from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Instance, OSDefinition, printable, split_os_name
from ganeti_vol.ganeti import params as ganeti_params


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
        "OS_API_VERSION": "%d" % os_def.api_version,
        "OS_NAME": os_def.name,
        "DEBUG_LEVEL": "%d" % debug,
        "OS_VARIANT": resolve_variant(os_def, full_name),
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
            "INSTANCE_NAME": instance.name,
            "INSTANCE_OS": instance.os,
            "INSTANCE_UUID": instance.uuid,
            "INSTANCE_CTIME": str(instance.ctime),
            "INSTANCE_MTIME": str(instance.mtime),
            "INSTANCE_PRIMARY_NODE": instance.primary_node,
            "INSTANCE_SECONDARY_NODES": " ".join(instance.secondary_nodes),
            "HYPERVISOR": instance.hypervisor,
            "DISK_COUNT": "%d" % len(instance.disks),
            "NIC_COUNT": "%d" % len(instance.nics),
        }
    )
    hvparams = ganeti_params.filled_hv(instance.hypervisor, instance.hvparams)
    beparams = ganeti_params.filled_be(instance.beparams)
    disk_type = hvparams.get("disk_type")
    for idx, disk in enumerate(instance.disks):
        prefix = f"DISK_{idx}_"
        env[prefix + "ACCESS"] = disk.access
        env[prefix + "UUID"] = disk.uuid
        if disk.path:
            env[prefix + "PATH"] = disk.path
        if disk.uri:
            env[prefix + "URI"] = disk.uri
        if disk.name:
            env[prefix + "NAME"] = disk.name
        if disk_type is not None:
            env[prefix + "FRONTEND_TYPE"] = str(disk_type)
        env[prefix + "BACKEND_TYPE"] = disk.backend_type
        env[prefix + "SIZE"] = str(disk.size_mib)
    nic_type = hvparams.get("nic_type")
    for idx, nic in enumerate(instance.nics):
        prefix = f"NIC_{idx}_"
        env[prefix + "MAC"] = nic.mac
        env[prefix + "UUID"] = nic.uuid
        if nic.name:
            env[prefix + "NAME"] = nic.name
        if nic.ip:
            env[prefix + "IP"] = nic.ip
        env[prefix + "MODE"] = nic.mode
        if nic.mode == "bridged":
            env[prefix + "BRIDGE"] = nic.link or ""
        if nic.link:
            env[prefix + "LINK"] = nic.link
        env.update(network_env(prefix, nic.network))
        if nic_type is not None:
            env[prefix + "FRONTEND_TYPE"] = str(nic_type)
    for key, value in beparams.items():
        env[f"INSTANCE_BE_{key}"] = value
    for key, value in hvparams.items():
        env[f"INSTANCE_HV_{key}"] = value
    return checked(env)


def network_env(prefix: str, network: Mapping[str, str]) -> dict[str, str]:
    """Ganeti ``objects.Network.HooksDict``: name, uuid, tags always; the rest if set."""
    if not network:
        return {}
    out = {
        prefix + "NETWORK_NAME": network.get("name", ""),
        prefix + "NETWORK_UUID": network.get("uuid", ""),
        prefix + "NETWORK_TAGS": " ".join(network.get("tags", "").split()),
    }
    for key in ("subnet", "gateway", "subnet6", "gateway6", "mac_prefix"):
        if network.get(key):
            out[prefix + "NETWORK_" + key.upper()] = network[key]
    return out


def create_env(
    os_def: OSDefinition, instance: Instance, *, reinstall: bool = False, debug: int = 0
) -> dict[str, str]:
    env = instance_env(os_def, instance, debug)
    if reinstall:
        env["INSTANCE_REINSTALL"] = "1"
    return env


def rename_env(
    os_def: OSDefinition, instance: Instance, old_name: str, debug: int = 0
) -> dict[str, str]:
    """``instance`` carries the new name; ``OLD_INSTANCE_NAME`` the old one."""
    env = instance_env(os_def, instance, debug)
    env["OLD_INSTANCE_NAME"] = old_name
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
        env[f"{kind}_DEVICE"] = path
        env[f"{kind}_DISK_PATH"] = path
    if disk.uri:
        env[f"{kind}_DISK_URI"] = disk.uri
    env[f"{kind}_INDEX"] = "%d" % index
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
