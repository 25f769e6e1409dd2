"""The Ganeti environment contract: pure builders of what OS scripts and hooks get.

OS scripts: Ganeti ``OSCoreEnv``/``OSEnvironment``; hooks: Ganeti
``BuildInstanceHookEnv`` and ``HooksMaster._BuildEnv`` (run by
:mod:`ganeti_vol.ganeti.hooks`).

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

import os
import re
from collections.abc import Mapping
from typing import Any

from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.core.model import (
    Disk,
    Instance,
    OSDefinition,
    disk_template,
    printable,
    split_os_name,
)
from ganeti_vol.ganeti import params as ganeti_params

# --- the names: every variable of the OS script contract, once --------------------------------
# (used by the builders below and by the parser OS scripts use, ganeti_vol.osapi.osenv)

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


# --- hooks (Ganeti ``BuildInstanceHookEnv``, ``HooksMaster._BuildEnv``) ---------------------

#: Ganeti's HTYPE for all of them
OBJECT_TYPE = "INSTANCE"
_KEY_RE = re.compile(r"^[A-Za-z0-9_]+$")
_PHASE_PREFIX = {C.HOOKS_PHASE_PRE: "GANETI_", C.HOOKS_PHASE_POST: "GANETI_POST_"}


def check_phase(phase: str) -> None:
    if phase not in C.HOOKS_PHASES:
        raise E.ProgrammerError(f"Unknown hooks phase '{phase}'")


def read_ssconf(data_dir: str, key: str) -> str | None:
    """One line of Ganeti's ``<data_dir>/ssconf_<key>`` (present on a Ganeti node), or None."""
    try:
        with open(os.path.join(data_dir, f"ssconf_{key}"), encoding="utf-8") as f:
            value = f.readline().strip()
    except OSError:
        return None
    return value or None


def _disk_env(idx: int, disk: Disk, objects: bool) -> dict[str, str]:
    """Ganeti ``BuildDiskEnv`` (+ ``BuildDiskLogicalIDEnv`` for disk objects)."""
    p = f"INSTANCE_DISK{idx}_"
    env = {}
    if objects:
        dev_type = disk.dev_type
        if dev_type == "file":
            _, _, driver = disk.backend_type.partition(":")
            env[p + "DRIVER"] = driver or "loop"
        elif dev_type == "blockdev":
            env[p + "DRIVER"] = "manual"
        env[p + "ID"] = str(disk.path or disk.uri)
        env[p + "DEV_TYPE"] = dev_type
    if disk.name:
        env[p + "NAME"] = disk.name
    env[p + "UUID"] = disk.uuid
    env[p + "SIZE"] = str(disk.size_mib)
    env[p + "MODE"] = disk.access
    return env


def instance_hook_env(hpath: str, instance: Instance, primary: str) -> dict[str, str]:
    """Ganeti ``BuildInstanceHookEnv`` for ``instance`` (keys without the ``GANETI_`` prefix).

    For ``instance-add`` Ganeti passes the disks as dicts (no dev type or
    logical id) and ``INSTANCE_STATUS`` is the boolean "start" flag; for the
    other paths the disks are objects and the status is ``up``/``down``.
    """
    creating = hpath == "instance-add"
    be = ganeti_params.filled_be(instance.beparams)
    hv = ganeti_params.filled_hv(instance.hypervisor, instance.hvparams)
    env: dict[str, Any] = {
        "OP_TARGET": instance.name,
        "INSTANCE_NAME": instance.name,
        "INSTANCE_PRIMARY": instance.primary_node or primary,
        "INSTANCE_SECONDARIES": " ".join(instance.secondary_nodes),
        "INSTANCE_OS_TYPE": instance.os,
        "INSTANCE_STATUS": instance.running if creating else
        ("up" if instance.running else "down"),
        "INSTANCE_MINMEM": be["minmem"],
        "INSTANCE_MAXMEM": be["maxmem"],
        "INSTANCE_MEMORY": be["maxmem"],
        "INSTANCE_VCPUS": be["vcpus"],
        "INSTANCE_DISK_TEMPLATE": disk_template(instance.disks),
        "INSTANCE_HYPERVISOR": instance.hypervisor,
    }
    for idx, nic in enumerate(instance.nics):
        p = f"INSTANCE_NIC{idx}_"
        if nic.name:
            env[p + "NAME"] = nic.name
        env[p + "UUID"] = nic.uuid
        env[p + "IP"] = nic.ip or ""
        env[p + "MAC"] = nic.mac
        env[p + "MODE"] = nic.mode
        env[p + "LINK"] = nic.link or ""
        env[p + "VLAN"] = nic.vlan or ""
        env.update(network_env(p, nic.network))
        if nic.mode in ("bridged", "openvswitch"):
            env[p + "BRIDGE"] = nic.link or ""
    env["INSTANCE_NIC_COUNT"] = len(instance.nics)
    for idx, disk in enumerate(instance.disks):
        env.update(_disk_env(idx, disk, objects=not creating))
    env["INSTANCE_DISK_COUNT"] = len(instance.disks)
    env["INSTANCE_TAGS"] = " ".join(instance.tags)
    for source, kind in ((be, "BE"), (hv, "HV")):
        for key, value in source.items():
            env[f"INSTANCE_{kind}_{key}"] = value
    return {k: str(v) for k, v in env.items()}


def build_env(
    hpath: str,
    phase: str,
    lu_env: Mapping[str, Any],
    *,
    pre_lu_env: Mapping[str, Any] | None = None,
    cluster: str | None = None,
    master: str | None = None,
) -> dict[str, str]:
    """The whole environment of a hook (Ganeti ``_BuildEnv`` + ``_RunWrapper``).

    ``lu_env`` is the operation's environment without prefix; in the post
    phase it is prefixed ``GANETI_POST_`` and ``pre_lu_env`` (default: the
    same) is merged in with the ``GANETI_`` prefix.  Values are ``str()``-ed.
    A key that collides with a fixed one, or already carries the prefix, is
    a ProgrammerError (Ganeti asserts).
    """
    check_phase(phase)
    if hpath not in C.HOOK_OP_CODES:
        raise E.ProgrammerError(
            f"unknown hook path '{hpath}' (known: {', '.join(C.HOOK_OP_CODES)})"
        )
    env = {
        "PATH": C.SCRIPT_PATH,
        "GANETI_HOOKS_VERSION": C.HOOKS_VERSION,
        "GANETI_OP_CODE": C.HOOK_OP_CODES[hpath],
        "GANETI_DATA_DIR": C.GANETI_DATA_DIR,
        "GANETI_HOOKS_PHASE": phase,
        "GANETI_HOOKS_PATH": hpath,
        "GANETI_OBJECT_TYPE": OBJECT_TYPE,
    }
    if cluster is not None:
        env["GANETI_CLUSTER"] = cluster
    if master is not None:
        env["GANETI_MASTER"] = master
    phase_env = _prefixed(lu_env, _PHASE_PREFIX[phase])
    if phase == C.HOOKS_PHASE_POST:
        phase_env.update(_prefixed(lu_env if pre_lu_env is None else pre_lu_env, "GANETI_"))
    clash = sorted(set(env) & set(phase_env))
    if clash:
        raise E.ProgrammerError(
            f"hook environment of '{hpath}' redefines fixed variable(s): {', '.join(clash)}"
        )
    env.update(phase_env)
    return checked({k: str(v) for k, v in env.items()})


def default_extra(hpath: str, node_name: str) -> dict[str, str]:
    """The operation variables ``hooks run`` uses unless given (as Ganeti's defaults set them)."""
    if hpath == "instance-add":
        return {"ADD_MODE": "create"}
    if hpath == "instance-export":
        return {"EXPORT_MODE": "local", "EXPORT_NODE": node_name, "EXPORT_DO_SHUTDOWN": "True",
                "SHUTDOWN_TIMEOUT": "120", "REMOVE_INSTANCE": "False"}
    return {}


def check_extra(lu_base: Mapping[str, Any], extra: Mapping[str, Any]) -> None:
    """UsageError for operation variables given by a user that Ganeti could not produce."""
    fixed = {"HOOKS_VERSION", "OP_CODE", "DATA_DIR", "HOOKS_PHASE", "HOOKS_PATH",
             "OBJECT_TYPE", "CLUSTER", "MASTER"}
    for key in extra:
        if not _KEY_RE.match(key) or key.upper().startswith("GANETI_"):
            raise E.UsageError(f"invalid hook variable name '{key}': give it without the "
                               "GANETI_ prefix, in letters, digits and '_'")
        if key in fixed or key in lu_base:
            raise E.UsageError(f"hook variable '{key}' is set by ganeti-vol itself")


def _prefixed(lu_env: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out = {}
    for key, value in lu_env.items():
        if not _KEY_RE.match(key) or key.upper().startswith(prefix):
            raise E.ProgrammerError(f"invalid hook environment key '{key}'")
        out[prefix + key] = value
    return out
