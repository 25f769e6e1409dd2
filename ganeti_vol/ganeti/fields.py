"""The fields of an instance as command lines and instance files give them.

Sizes (``4M``, ``10G``), host names and MACs, the disk and NIC records built
from them (uuids derived from the instance's), ``key=value`` and ``--disk``
options, and Ganeti's checks of hypervisor and backend parameters.  No
configobj here: :mod:`ganeti_vol.ganeti.config` reads the files and calls these.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import uuid as uuidlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ganeti_vol.core import errors as E
from ganeti_vol.core.lazy import lazy
from ganeti_vol.core.model import Disk, Instance, Nic, printable

# Ganeti's parameter tables load only when an instance is checked
if TYPE_CHECKING:
    from ganeti_vol.ganeti import params as ganeti_params
else:
    ganeti_params = lazy("ganeti_vol.ganeti.params")

UUID_NAMESPACE = uuidlib.UUID("5d0c8f8e-6a53-4c1e-9a43-6e1f4b0b7a11")

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgGtTpP]?)(i?[bB])?\s*$")
_SIZE_UNITS = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50}
HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")



def parse_size(text: str | int, default_unit: str = "") -> int:
    """Parse ``4M``, ``10G``, ``512`` into bytes (binary units).

    A bare number is in ``default_unit`` ("" = bytes, "M" = MiB).
    """
    if isinstance(text, int):
        return text << _SIZE_UNITS[default_unit.lower()]
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(f"invalid size {text!r} (use a number with an optional K/M/G/T suffix)")
    number, unit, _ = match.groups()
    unit = unit or default_unit
    return int(number) << _SIZE_UNITS[unit.lower()]


def default_backend_type(path: str | None) -> str:
    """``block`` for block devices, ``file:loop`` otherwise (Ganeti BACKEND_TYPE)."""
    if path:
        try:
            if stat.S_ISBLK(os.stat(path).st_mode):
                return "block"
        except OSError:
            pass
    return "file:loop"


def make_disk(
    index: int,
    instance_uuid: str,
    *,
    path: str | None,
    size: int | None = None,
    access: str = "rw",
    uuid: str | None = None,
    name: str | None = None,
    backend_type: str | None = None,
    uri: str | None = None,
    frontend_type: str | None = None,
    origin: str = "",
    size_optional: bool = False,
) -> Disk:
    """Build a Disk; the size (bytes) defaults to the existing file's or device's size.

    With ``size_optional`` an unknown size gives ``size_mib == 0`` (an import
    takes it from the export).
    """
    if size is None and path:
        size = existing_size(path)
    if size is None and size_optional:
        size = 0
    if size is None:
        if not origin:
            raise E.UsageError(
                f"cannot use disk {index} '{path}': it does not exist, and no size was given "
                f"to create it (add ',size=SIZE', e.g. '{path},size=1G')"
            )
        raise E.ConfigError(
            path=origin, what="instance file",
            problems=f"    disks/{index}/size: not given, and its path '{path}' does not exist "
                     "to take the size from (give a size to create it)",
        )
    size_mib = -(-size // (1 << 20))
    return Disk(
        path=os.path.abspath(path) if path else None,
        size_mib=size_mib,
        uuid=uuid or str(uuidlib.uuid5(uuidlib.UUID(instance_uuid), f"disk/{index}")),
        access=access,
        name=name,
        backend_type=backend_type or default_backend_type(path),
        uri=uri,
        frontend_type=frontend_type,
    )


def existing_size(path: str) -> int | None:
    """Size in bytes of a file or block device, or None if it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise E.DeviceError(f"cannot open disk '{path}': {err.strerror}") from err
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def make_nic(index: int, instance_uuid: str, values: Mapping[str, Any]) -> Nic:
    network = {
        key[len("network_"):]: str(value)
        for key, value in values.items()
        if key.startswith("network_") and value is not None
    }
    uid = values.get("uuid") or str(uuidlib.uuid5(uuidlib.UUID(instance_uuid), f"nic/{index}"))
    mac = values.get("mac")
    if not mac or mac == "auto":
        # deterministic locally administered MAC derived from the NIC uuid
        raw = uuidlib.UUID(uid).bytes
        mac = "aa:00:00:%02x:%02x:%02x" % (raw[0], raw[1], raw[2])
    return Nic(
        mac=mac,
        uuid=uid,
        mode=values.get("mode") or "bridged",
        link=values.get("link"),
        ip=values.get("ip"),
        name=values.get("name"),
        vlan=values.get("vlan"),
        frontend_type=values.get("frontend_type"),
        network=network,
    )


def instance_uuid_for(name: str) -> str:
    return str(uuidlib.uuid5(UUID_NAMESPACE, name))


def this_node() -> str:
    """This host's name: the primary node of an instance that names none."""
    return socket.gethostname()


def param_problems(inst: Instance) -> list[str]:
    """Every bad parameter name or value of ``inst``, as ``section/name: why``.

    OS parameter names must fit in an environment variable name on one line;
    hypervisor and backend parameters must be ones Ganeti knows (for the
    instance's hypervisor) with values of Ganeti's types.
    """
    problems = []
    if inst.hypervisor not in ganeti_params.hypervisors():
        problems.append(f"instance/hypervisor: '{printable(inst.hypervisor)}' is not one "
                        f"Ganeti knows ({', '.join(ganeti_params.hypervisors())})")
    for section in ("osparams", "osparams_private"):
        for name in getattr(inst, section):
            problem = ganeti_params.name_problem("os", name)
            if problem:
                problems.append(f"{section}/{printable(name)}: {problem}")
    for kind, section in (("hv", "hvparams"), ("be", "beparams")):
        _, found = ganeti_params.check(kind, getattr(inst, section), inst.hypervisor)
        problems.extend(f"{section}/{p}" for p in found)
    return problems


def checked_params(inst: Instance, origin: str = "") -> Instance:
    """``inst`` with its -H/-B values in Ganeti's types (``true`` -> ``True``, ``1G`` -> ``1024``).

    Bad names or values raise ConfigError (instance file, ``origin``) or
    UsageError (command-line flags) naming every one.
    """
    problems = param_problems(inst)
    if problems:
        if origin:
            raise E.ConfigError(path=origin, what="instance file",
                                problems="\n".join("    " + printable(p) for p in problems))
        raise E.UsageError(f"invalid parameters of instance '{inst.name}': "
                           + "; ".join(printable(p) for p in problems))
    hv, _ = ganeti_params.check("hv", inst.hvparams, inst.hypervisor)
    be, _ = ganeti_params.check("be", inst.beparams, inst.hypervisor)
    return inst.replace(hvparams=hv, beparams=be)


def parse_key_values(items: Iterable[str], what: str) -> dict[str, str]:
    """Parse ``key=value`` options (``-O``); a bad item raises UsageError."""
    out: dict[str, str] = {}
    for item in items:
        for part in split_unescaped(item, ","):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or not key:
                raise E.UsageError(f"invalid {what} '{printable(part)}': expected key=value")
            out[key] = value
    return out


def split_unescaped(text: str, sep: str) -> list[str]:
    """Split on ``sep`` except where escaped with a backslash."""
    parts, cur, escaped = [], [], False
    for ch in text:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in parts if p != ""]


def parse_disk_option(text: str) -> dict[str, Any]:
    """Parse ``--disk PATH[,size=10G][,access=ro][,name=x][,uuid=…]``."""
    parts = split_unescaped(text, ",")
    if not parts:
        raise E.UsageError(f"invalid --disk '{text}': expected PATH[,size=SIZE]")
    values: dict[str, Any] = {"path": parts[0]}
    allowed = {"size", "access", "name", "uuid", "backend_type", "uri"}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep or key not in allowed:
            raise E.UsageError(
                f"invalid --disk option '{part}' in '{text}': expected one of "
                + ", ".join(f"{k}=" for k in sorted(allowed))
            )
        values[key] = value
    if "size" in values:
        try:
            values["size"] = parse_size(values["size"], default_unit="M")
        except ValueError as err:
            raise E.UsageError(f"invalid --disk '{text}': {err}") from None
    if values.get("access", "rw") not in ("rw", "ro"):
        raise E.UsageError(f"invalid --disk '{text}': access must be rw or ro")
    return values
