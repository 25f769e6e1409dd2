"""The environment of hooks: Ganeti's ``BuildInstanceHookEnv`` and ``HooksMaster._BuildEnv``.

Run by :mod:`ganeti_vol.ganeti.hooks`; the instance's NICs are described with
:func:`ganeti_vol.ganeti.environment.network_env`, as for OS scripts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Disk, Instance, disk_template
from ganeti_vol.ganeti import params as ganeti_params
from ganeti_vol.ganeti.environment import INSTANCE_NAME, checked, network_env


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
        INSTANCE_NAME: instance.name,
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
