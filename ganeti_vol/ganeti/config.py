"""Everything configobj does for ganeti-vol: the node config and instance files.

configobj is imported here and nowhere else.  Its errors become
:class:`~ganeti_vol.core.errors.ConfigError`, which lists every invalid key (with
its section) at once.
"""

from __future__ import annotations

import io
import os
import stat
import time
from collections.abc import Mapping
from typing import Any

import configobj
from configobj import validate

from ganeti_vol.core import atomicfile
from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Instance, NodeConfig, printable
from ganeti_vol.ganeti.fields import (
    HOSTNAME_RE,
    MAC_RE,
    checked_params,
    instance_uuid_for,
    make_disk,
    make_nic,
    parse_size,
    this_node,
)


SNAPSHOT_PROVIDERS = ("none", "copy", "reflink", "btrfs", "lvm", "zfs")
CHUNK_HASHES = ("xxh3-128", "sha256")

NODE_CONFIGSPEC = f"""
os_search_path = force_list(default=list({", ".join(repr(p) for p in C.DEFAULT_OS_SEARCH_PATH)}))
hooks_dir = string(default={C.DEFAULT_HOOKS_DIR!r})
log_dir = string(default={C.DEFAULT_LOG_DIR!r})
export_dir = string(default={C.DEFAULT_EXPORT_DIR!r})
state_dir = string(default={C.DEFAULT_STATE_DIR!r})
stall_timeout = float(min=0, default=60)
workers = integer(min=0, max=256, default=0)
parallel_disks = integer(min=1, max=64, default=2)
chunk_size = size(default=4M)
chunk_hash = option({", ".join(repr(h) for h in CHUNK_HASHES)}, default='xxh3-128')
snapshot_provider = option({", ".join(repr(p) for p in SNAPSHOT_PROVIDERS)}, default='none')
snapshot_size_percent = float(min=1, max=100, default=20)
change_map = boolean(default=True)
[timeouts]
create = float(min=0, default={C.DEFAULT_TIMEOUTS["create"]})
rename = float(min=0, default={C.DEFAULT_TIMEOUTS["rename"]})
verify = float(min=0, default={C.DEFAULT_TIMEOUTS["verify"]})
export = float(min=0, default={C.DEFAULT_TIMEOUTS["export"]})
import = float(min=0, default={C.DEFAULT_TIMEOUTS["import"]})
hook = float(min=0, default={C.DEFAULT_TIMEOUTS["hook"]})
[s3]
endpoint = string(default='')
region = string(default='')
profile = string(default='')
access_key_id = string(default='')
secret_access_key = string(default='')
retries = integer(min=0, max=20, default=4)
lease_ttl = float(min=1, default=600)
""".splitlines()

INSTANCE_CONFIGSPEC = f"""
[instance]
name = hostname
os = string(default='')
hypervisor = string(default='kvm')
uuid = string(default=None)
ctime = float(default=None)
mtime = float(default=None)
primary_node = string(default='')
secondary_nodes = force_list(default=list())
tags = force_list(default=list())
running = boolean(default=False)
snapshot_provider = option('', {", ".join(repr(p) for p in SNAPSHOT_PROVIDERS)}, default='')
[disks]
  [[__many__]]
  path = string(default=None)
  size = mib_size(default=None)
  access = option('rw', 'ro', default='rw')
  uuid = string(default=None)
  name = string(default=None)
  backend_type = string(default=None)
  uri = string(default=None)
  frontend_type = string(default=None)
[nics]
  [[__many__]]
  mac = mac(default=None)
  uuid = string(default=None)
  mode = option('bridged', 'routed', 'openvswitch', default='bridged')
  link = string(default=None)
  ip = string(default=None)
  name = string(default=None)
  vlan = string(default=None)
  frontend_type = string(default=None)
  network_name = string(default=None)
  network_uuid = string(default=None)
  network_subnet = string(default=None)
  network_gateway = string(default=None)
  network_subnet6 = string(default=None)
  network_gateway6 = string(default=None)
  network_mac_prefix = string(default=None)
  network_tags = string(default=None)
[osparams]
  __many__ = string
[osparams_private]
  __many__ = string
[beparams]
  __many__ = string
[hvparams]
  __many__ = string
""".splitlines()

#: names for the deterministic uuids of instances whose file gives none


def _check_size(value: Any, default: Any = None) -> int | None:
    if value is None or value == "None":
        return None
    try:
        return parse_size(value)
    except ValueError as err:
        raise validate.VdtValueError(value) from err


def _check_mib_size(value: Any, default: Any = None) -> int | None:
    """A disk size in an instance file: a bare number is MiB, as in Ganeti and ``--disk``."""
    if value is None or value == "None":
        return None
    try:
        return parse_size(value, default_unit="M")
    except ValueError as err:
        raise validate.VdtValueError(value) from err


def _check_hostname(value: Any) -> str:
    if not isinstance(value, str) or not HOSTNAME_RE.match(value):
        raise validate.VdtValueError(value)
    return value


def _check_mac(value: Any, default: Any = None) -> str | None:
    if value is None or value == "None":
        return None
    if not isinstance(value, str) or not (value == "auto" or MAC_RE.match(value)):
        raise validate.VdtValueError(value)
    return value.lower()


def _validator() -> validate.Validator:
    return validate.Validator({"size": _check_size, "mib_size": _check_mib_size, "hostname": _check_hostname, "mac": _check_mac})


def _describe(error: Any) -> str:
    if error is False:
        return "missing value"
    if isinstance(error, validate.VdtMissingValue):
        return "missing value"
    text = str(error) or error.__class__.__name__
    return text


#: the most read of a node config, instance or OS extension file (they have a few KiB)
MAX_FILE_BYTES = 1 << 20


def read_text(path: str, what: str) -> list[str]:
    """The lines of a small UTF-8 text file, or ConfigError saying why it cannot be one.

    At most :data:`MAX_FILE_BYTES` are read; a directory, a device, bytes
    that are not UTF-8 and NUL bytes are refused with the line they are on.
    """
    def bad(problem: str) -> E.ConfigError:  # one line: the file is unusable as a whole
        return E.ConfigError(f"invalid {what} '{printable(path)}': {problem}", path=path,
                             what=what, problems=f"    {problem}")

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        raise bad(f"cannot read: {err.strerror or err}") from err
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise bad("is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise bad("is not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise bad(f"cannot read: {err.strerror or err}") from err
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise bad(f"larger than {MAX_FILE_BYTES >> 20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise bad(f"line {line}: not UTF-8 text (byte 0x{data[err.start]:02x})") from None
    if "\0" in text:
        raise bad(f"line {text.count(chr(10), 0, text.index(chr(0))) + 1}: contains a NUL byte")
    return text.splitlines()


def _load(
    path: str, spec: list[str], what: str, *, missing_ok: bool, strict_keys: bool
) -> configobj.ConfigObj:
    """Read and validate a configobj file; raise ConfigError naming every bad key."""
    if missing_ok and not os.path.lexists(path):
        cfg = configobj.ConfigObj(configspec=spec, interpolation=False, encoding="utf-8")
    else:
        lines = read_text(path, what)
        try:
            cfg = configobj.ConfigObj(
                lines,
                configspec=spec,
                interpolation=False,
                raise_errors=False,
                list_values=True,
            )
        except configobj.ConfigObjError as err:
            syntax = [f"line {e.line_number}: {e.msg}" for e in getattr(err, "errors", [])]
            if not syntax:
                syntax = [str(err)]
            raise E.ConfigError(
                path=path, what=what,
                problems="\n".join("    " + printable(p) for p in syntax)
            ) from err
    result = cfg.validate(_validator(), preserve_errors=True)
    problems: list[str] = []
    if result is not True:
        for sections, key, error in configobj.flatten_errors(cfg, result):
            where = "/".join([*sections, key]) if key is not None else "/".join(sections)
            if key is None:
                problems.append(f"[{where}]: missing section")
            else:
                problems.append(f"{where}: {_describe(error)}")
    if strict_keys:
        for sections, name in configobj.get_extra_values(cfg):
            where = "/".join([*sections, name])
            problems.append(f"{where}: unknown key")
    if problems:
        raise E.ConfigError(
            path=path, what=what,
            problems="\n".join("    " + printable(p) for p in sorted(problems)),
        )
    return cfg


# --- node config ---------------------------------------------------------------------


def node_config_path(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """``--config``, else ``$GANETI_VOL_CONFIG``, else the default path."""
    if explicit:
        return explicit
    environ = os.environ if environ is None else environ
    return environ.get(C.CONFIG_ENV_VAR) or C.DEFAULT_CONFIG_FILE


def load_node_config(path: str | None = None, *, missing_ok: bool | None = None) -> NodeConfig:
    """Read the node config.  A missing default file means built-in defaults.

    A file named explicitly (``--config``/``$GANETI_VOL_CONFIG``) must exist.
    """
    resolved = node_config_path(path)
    if missing_ok is None:
        missing_ok = resolved == C.DEFAULT_CONFIG_FILE
    if not missing_ok and not os.path.exists(resolved):
        raise E.ConfigError(
            path=resolved, what="node config", problems="    file does not exist"
        )
    cfg = _load(resolved, NODE_CONFIGSPEC, "node config", missing_ok=True, strict_keys=True)
    chunk = cfg["chunk_size"]
    if chunk & (chunk - 1) or not (64 << 10) <= chunk <= (16 << 20):
        raise E.ConfigError(
            path=resolved,
            what="node config",
            problems="    chunk_size: must be a power of two between 64K and 16M",
        )
    search = tuple(p for p in cfg["os_search_path"] if p)
    return NodeConfig(
        os_search_path=search,
        hooks_dir=cfg["hooks_dir"],
        log_dir=cfg["log_dir"],
        export_dir=cfg["export_dir"],
        state_dir=cfg["state_dir"],
        timeouts={k: float(v) for k, v in cfg["timeouts"].items()},
        stall_timeout=cfg["stall_timeout"],
        workers=cfg["workers"],
        parallel_disks=cfg["parallel_disks"],
        chunk_size=chunk,
        chunk_hash=cfg["chunk_hash"],
        snapshot_provider=cfg["snapshot_provider"],
        snapshot_size_percent=cfg["snapshot_size_percent"],
        change_map=cfg["change_map"],
        s3=dict(cfg["s3"]),
        source=resolved if os.path.exists(resolved) else "",
    )


def write_node_config(path: str, values: Mapping[str, Any]) -> None:
    """Write a node config file (used by the sample and tests)."""
    cfg = configobj.ConfigObj(interpolation=False, encoding="utf-8")
    cfg.filename = path
    for key, value in values.items():
        cfg[key] = dict(value) if isinstance(value, Mapping) else value
    cfg.write()


# --- instance files --------------------------------------------------------------------


def _sorted_indexed(section: Mapping[str, Any], what: str, path: str) -> list[tuple[int, Any]]:
    items = []
    bad = []
    for key, value in section.items():
        if not key.isdigit():
            bad.append(f"{what}/{key}: section names must be indexes 0, 1, 2, ...")
            continue
        items.append((int(key), value))
    items.sort()
    if not bad and [i for i, _ in items] != list(range(len(items))):
        bad.append(f"{what}: indexes must be 0..{len(items) - 1} without gaps")
    if bad:
        raise E.ConfigError(path=path, what="instance file", problems="\n".join("    " + b for b in bad))
    return items


def load_instance(path: str, *, size_optional: bool = False) -> Instance:
    """Read and validate an instance file (doc/instance-file.md).

    ``size_optional``: a disk without a size whose file does not exist yet
    gets ``size_mib == 0`` (imports take the size from the export).
    """
    if not os.path.exists(path):
        raise E.ConfigError(path=path, what="instance file", problems="    file does not exist")
    cfg = _load(path, INSTANCE_CONFIGSPEC, "instance file", missing_ok=False, strict_keys=True)
    base = os.path.dirname(os.path.abspath(path))
    sec = cfg["instance"]
    name = sec["name"]
    inst_uuid = sec["uuid"] or instance_uuid_for(name)
    try:
        stamp = os.stat(path).st_mtime
    except OSError:
        stamp = time.time()
    disks = []
    for index, dsec in _sorted_indexed(cfg["disks"], "disks", path):
        dpath = dsec["path"]
        if dpath and not os.path.isabs(dpath):
            dpath = os.path.join(base, dpath)
        disks.append(
            make_disk(
                index,
                inst_uuid,
                path=dpath,
                size=dsec["size"],
                access=dsec["access"],
                uuid=dsec["uuid"],
                name=dsec["name"],
                backend_type=dsec["backend_type"],
                uri=dsec["uri"],
                frontend_type=dsec["frontend_type"],
                origin=path,
                size_optional=size_optional,
            )
        )
    nics = [make_nic(i, inst_uuid, nsec) for i, nsec in _sorted_indexed(cfg["nics"], "nics", path)]
    inst = Instance(
        name=name,
        os=sec["os"],
        uuid=inst_uuid,
        ctime=sec["ctime"] if sec["ctime"] is not None else stamp,
        mtime=sec["mtime"] if sec["mtime"] is not None else stamp,
        hypervisor=sec["hypervisor"],
        primary_node=sec["primary_node"] or this_node(),
        secondary_nodes=tuple(sec["secondary_nodes"]),
        disks=tuple(disks),
        nics=tuple(nics),
        osparams=dict(cfg["osparams"]),
        osparams_private=dict(cfg["osparams_private"]),
        beparams=dict(cfg["beparams"]),
        hvparams=dict(cfg["hvparams"]),
        tags=tuple(sec["tags"]),
        running=sec["running"],
        snapshot_provider=sec["snapshot_provider"],
        source=os.path.abspath(path),
    )
    return checked_params(inst, path)


def instance_to_text(inst: Instance, *, include_private: bool = True) -> str:
    """Serialise an instance back to instance-file text (round-trips with load_instance)."""
    cfg = configobj.ConfigObj(interpolation=False, encoding="utf-8", list_values=True)
    cfg["instance"] = {
        "name": inst.name,
        "os": inst.os,
        "hypervisor": inst.hypervisor,
        "uuid": inst.uuid,
        "ctime": repr(inst.ctime),
        "mtime": repr(inst.mtime),
        "primary_node": inst.primary_node,
        "secondary_nodes": list(inst.secondary_nodes),
        "tags": list(inst.tags),
        "running": "yes" if inst.running else "no",
    }
    if inst.snapshot_provider:
        cfg["instance"]["snapshot_provider"] = inst.snapshot_provider
    cfg["disks"] = {}
    for i, d in enumerate(inst.disks):
        entry: dict[str, Any] = {"size": f"{d.size_mib}M", "access": d.access, "uuid": d.uuid}
        for key in ("path", "name", "uri", "frontend_type"):
            if getattr(d, key):
                entry[key] = getattr(d, key)
        entry["backend_type"] = d.backend_type
        cfg["disks"][str(i)] = entry
    cfg["nics"] = {}
    for i, n in enumerate(inst.nics):
        entry = {"mac": n.mac, "uuid": n.uuid, "mode": n.mode}
        for key in ("link", "ip", "name", "vlan", "frontend_type"):
            if getattr(n, key):
                entry[key] = getattr(n, key)
        for key, value in n.network.items():
            entry[f"network_{key}"] = value
        cfg["nics"][str(i)] = entry
    cfg["osparams"] = dict(inst.osparams)
    if include_private:
        cfg["osparams_private"] = dict(inst.osparams_private)
    cfg["beparams"] = dict(inst.beparams)
    cfg["hvparams"] = dict(inst.hvparams)
    lines = [x.decode() if isinstance(x, bytes) else x for x in cfg.write()]
    return "\n".join(lines) + "\n"


# --- OS definition extension file ------------------------------------------------------

OS_EXTENSION_CONFIGSPEC = """
[disks]
access = option('file', 'block', default='file')
partitions = boolean(default=True)
empty_after_create = boolean(default=False)
""".splitlines()


def load_os_extension(path: str) -> dict[str, Any]:
    """Read ``ganeti_vol.conf`` of an OS definition (doc/devices.md); returns [disks]."""
    cfg = _load(path, OS_EXTENSION_CONFIGSPEC, "OS extension file", missing_ok=False,
                strict_keys=True)
    return dict(cfg["disks"])


def update_instance_file(path: str, values: Mapping[str, str]) -> None:
    """Set keys of the ``[instance]`` section in place, keeping comments and layout."""
    try:
        cfg = configobj.ConfigObj(path, interpolation=False, encoding="utf-8", file_error=True)
        cfg.setdefault("instance", {})
        for key, value in values.items():
            cfg["instance"][key] = value
        buf = io.BytesIO()
        cfg.write(buf)
        # the file the operator named (a symlink's target), replaced without ever
        # writing through a name someone else could have planted
        atomicfile.replace(os.path.realpath(path), buf.getvalue(), mode=None)
    except (OSError, configobj.ConfigObjError) as err:
        raise E.ConfigError(
            path=path, what="instance file", problems=f"    cannot update: {err}"
        ) from err
