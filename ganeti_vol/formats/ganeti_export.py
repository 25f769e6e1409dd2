"""Ganeti's v0 export ``config.ini``: Instance -> text, and text -> Instance.

Written and read with the stdlib :mod:`configparser`, as Ganeti does
(``FinalizeExport`` / ``SerializableConfigParser``, see
``../shared/reference/ganeti-contract.md`` §4.2 and §4.3):

* sections ``export``, ``instance``, ``hypervisor``, ``backend``, ``os``;
* option names are lower-cased (configparser's ``optionxform``), so a
  mixed-case hypervisor or OS parameter name comes back lower-cased, exactly
  as with Ganeti;
* values are ``str(value)``; a missing value is written as the string
  ``None`` and any value spelled ``none`` (any case) reads back as None;
* ``%`` is written as ``%%``, because Ganeti reads the file with an
  interpolating ConfigParser that turns ``%%`` back into ``%``;
* ``[export] version = 0``; any other version is refused with Ganeti's
  message ``Wrong export version N (wanted 0)``.

**Private OS parameters are never written.**  Ganeti puts them in clear in
``[os_private]``; ganeti-vol omits that section and lists only the *names*
of the omitted parameters in a comment (and in the archive manifest), so an
import must supply them again (Ganeti: ``--os-parameters-private``).  A
redacted placeholder was rejected: Ganeti would import it as the value.
Reading a Ganeti-made export still takes ``[os_private]`` if present.

``[hypervisor]`` and ``[backend]`` hold the parameters filled with Ganeti's
defaults (:mod:`ganeti_vol.ganeti.params`), as Ganeti writes them;
``nic<i>_network`` is the network's uuid (its name if the instance file gives
no uuid: Ganeti looks a network up by either); ``disk_template`` is Ganeti's
``GetDiskTemplate`` of the disks (``file``, ``blockdev``, ``mixed``,
``diskless``; Ganeti never reads it back).  A diskless
instance exports a config.ini with ``disk_count = 0``, as Ganeti does.

Every option name is checked before it is written: a name with whitespace,
``=``, ``:``, brackets or a control character would change the file's
structure (a newline starts a new section), so it is refused.
"""

from __future__ import annotations

import configparser
import io
import re
import time
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass

from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Disk, Instance, Nic, disk_template, printable
from ganeti_vol.ganeti import params as ganeti_params
from ganeti_vol.ganeti.fields import instance_uuid_for

SECTION_EXPORT = "export"
SECTION_INSTANCE = "instance"
SECTION_HYPERVISOR = "hypervisor"
SECTION_BACKEND = "backend"
SECTION_OS = "os"
SECTION_OS_PRIVATE = "os_private"
#: Ganeti constants MAX_DISKS / MAX_NICS
MAX_DISKS = 16
MAX_NICS = 8
#: the most read of a config.ini (Ganeti's are a few KiB)
MAX_CONFIG_BYTES = 1 << 20
#: an option name that cannot change the structure of the file
_OPTION_RE = re.compile(r"^[^\s=:\[\]]+$")


@dataclass(frozen=True)
class ExportDisk:
    """One disk as an export's config.ini describes it."""

    index: int
    #: file name of the dump inside the export directory (None: no dump)
    dump: str | None
    size_mib: int
    name: str | None = None
    ivname: str | None = None


@dataclass(frozen=True)
class GanetiExport:
    """A parsed v0 config.ini."""

    instance: Instance
    disks: tuple[ExportDisk, ...]
    version: int
    timestamp: int | None
    source: str | None
    compression: str | None


def _text(value: object) -> str:
    return ("None" if value is None else str(value)).replace("%", "%%")


def render_config(
    instance: Instance,
    dumps: Mapping[int, str],
    *,
    timestamp: int | None = None,
) -> str:
    """The config.ini text of an export of ``instance`` holding the disks in ``dumps``.

    ``dumps`` maps a disk index to the dump file name that ``disk<i>_dump``
    names; only those disks are written (``disk_count`` counts them).
    """
    cp = configparser.ConfigParser(interpolation=None)
    cp[SECTION_EXPORT] = {}
    ex = cp[SECTION_EXPORT]
    ex["version"] = str(C.GANETI_EXPORT_VERSION)
    ex["timestamp"] = str(int(time.time() if timestamp is None else timestamp))
    ex["source"] = _text(instance.primary_node or None)
    ex["os"] = _text(instance.os)
    ex["compression"] = "none"

    be = ganeti_params.filled_be(instance.beparams)
    hv = ganeti_params.filled_hv(instance.hypervisor, instance.hvparams)
    globals_ = ganeti_params.hv_globals()
    cp[SECTION_INSTANCE] = {}
    ins = cp[SECTION_INSTANCE]
    ins["name"] = _text(instance.name)
    ins["maxmem"] = _text(be["maxmem"])
    ins["minmem"] = _text(be["minmem"])
    ins["memory"] = _text(be["maxmem"])  # deprecated alias read by old Ganeti
    ins["vcpus"] = _text(be["vcpus"])
    ins["disk_template"] = disk_template(instance.disks)
    ins["hypervisor"] = _text(instance.hypervisor)
    ins["tags"] = _text(" ".join(instance.tags))
    for i, nic in enumerate(instance.nics):
        _render_nic(ins, i, nic)
    ins["nic_count"] = str(len(instance.nics))
    exported = [i for i in sorted(dumps) if 0 <= i < len(instance.disks)]
    for i in exported:
        disk = instance.disks[i]
        ins[f"disk{i}_ivname"] = f"disk/{i}"
        ins[f"disk{i}_dump"] = _text(dumps[i])
        ins[f"disk{i}_size"] = str(disk.size_mib)
        ins[f"disk{i}_name"] = _text(disk.name)
    ins["disk_count"] = str(len(exported))

    cp[SECTION_HYPERVISOR] = _options(
        SECTION_HYPERVISOR, {k: v for k, v in hv.items() if k.lower() not in globals_})
    cp[SECTION_BACKEND] = _options(SECTION_BACKEND, be)
    cp[SECTION_OS] = _options(SECTION_OS, instance.osparams)
    out = io.StringIO()
    if instance.osparams_private:
        names = ", ".join(sorted(_options(SECTION_OS_PRIVATE, instance.osparams_private)))
        out.write(f"# private OS parameters not exported (supply them on import): {names}\n")
    cp.write(out)
    return out.getvalue()


def _options(section: str, values: Mapping[str, object]) -> dict[str, str]:
    """``values`` as option texts; a name that would break the file is refused."""
    for name in values:
        if not _OPTION_RE.match(name) or not name.isprintable():
            raise E.UsageError(f"cannot write [{section}] option '{printable(name)}' into "
                               "config.ini: a name must not contain whitespace, '=', ':', "
                               "brackets or control characters")
    return {k: _text(v) for k, v in values.items()}


def _render_nic(section: configparser.SectionProxy, i: int, nic: Nic) -> None:
    section[f"nic{i}_mac"] = _text(nic.mac)
    section[f"nic{i}_ip"] = _text(nic.ip)
    # Ganeti writes the network's uuid (objects.NIC.network)
    section[f"nic{i}_network"] = _text(nic.network.get("uuid") or nic.network.get("name"))
    section[f"nic{i}_name"] = _text(nic.name)
    section[f"nic{i}_mode"] = _text(nic.mode)
    section[f"nic{i}_link"] = _text(nic.link)
    section[f"nic{i}_vlan"] = _text(nic.vlan)


# --- reading ---------------------------------------------------------------------------


class _Section:
    """Ganeti's SerializableConfigParser.get: ``none`` -> None, some keys optional."""

    def __init__(self, cp: configparser.ConfigParser, name: str, where: str) -> None:
        self.cp, self.name, self.where = cp, name, where

    def has(self, key: str) -> bool:
        return self.cp.has_option(self.name, key)

    def get(self, key: str, optional: bool = False) -> str | None:
        if not self.has(key):
            if optional:
                return None
            raise E.ArchiveError(f"cannot read {self.where}: [{self.name}] has no '{key}'")
        try:
            value = self.cp.get(self.name, key)
        except configparser.Error as err:
            raise E.ArchiveError(f"cannot read {self.where}: {err}") from err
        return None if value.lower() == "none" else value

    def items(self, kind: str | None = None) -> dict[str, str]:
        """The section's options; with ``kind`` (os, hv, be) their names are checked."""
        if not self.cp.has_section(self.name):
            return {}
        out = {k: self.get(k) or "" for k in self.cp.options(self.name)
               if k not in self.cp.defaults()}
        for key in out:
            problem = ganeti_params.name_problem(kind, key) if kind else None
            if problem:
                raise E.ArchiveError(f"cannot read {self.where}: [{self.name}] option "
                                     f"'{printable(key)}': {problem}")
        return out


def parse_config(text: str | bytes, path: str = "config.ini") -> GanetiExport:
    """Parse config.ini text (or its bytes, which must be UTF-8); ``path`` names it in errors."""
    where = f"export config '{path}'"
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise E.ArchiveError(
                f"cannot read {where}: not UTF-8 text (byte 0x{text[err.start]:02x} at "
                f"offset {err.start})"
            ) from None
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise E.ArchiveError(f"cannot read {where}: line {line} contains a NUL byte")
    cp = configparser.ConfigParser()  # interpolating, as Ganeti reads it
    try:
        cp.read_string(text)
    except configparser.Error as err:
        raise E.ArchiveError(f"cannot read {where}: {printable(err.message)}") from err
    if not cp.has_section(SECTION_EXPORT):
        raise E.ArchiveError(f"cannot read {where}: Corrupted export config")
    if not cp.has_section(SECTION_INSTANCE):
        raise E.ArchiveError(
            f"cannot read {where}: Export info file doesn't have the required fields"
        )
    ex = _Section(cp, SECTION_EXPORT, where)
    ins = _Section(cp, SECTION_INSTANCE, where)
    raw_version = ex.get("version", optional=True)
    try:
        version = int(raw_version) if raw_version is not None else None
    except ValueError:
        version = None
    if version != C.GANETI_EXPORT_VERSION:
        raise E.ArchiveFormatError(
            f"cannot read {where}: Wrong export version {raw_version} "
            f"(wanted {C.GANETI_EXPORT_VERSION})"
        )
    name = ins.get("name")
    if not name:
        raise E.ArchiveError(f"cannot read {where}: [instance] has no 'name'")
    timestamp = _int(ex.get("timestamp", optional=True), where, "timestamp")
    inst_uuid = instance_uuid_for(name)
    disks = _read_disks(ins, inst_uuid, where)
    beparams = _Section(cp, SECTION_BACKEND, where).items("be")
    if not cp.has_section(SECTION_BACKEND):  # very old exports: be params in [instance]
        for key in ("maxmem", "minmem", "vcpus", "memory"):
            if ins.has(key):
                beparams[key] = ins.get(key) or ""
    if "memory" in beparams:
        mem = beparams.pop("memory")
        beparams.setdefault("maxmem", mem)
        beparams.setdefault("minmem", mem)
    instance = Instance(
        name=name,
        os=ex.get("os") or "",
        uuid=inst_uuid,
        ctime=float(timestamp or 0),
        mtime=float(timestamp or 0),
        hypervisor=ins.get("hypervisor", optional=True) or "kvm",
        primary_node=ex.get("source", optional=True) or "",
        disks=tuple(Disk(path=None, size_mib=d.size_mib, uuid=_disk_uuid(d, inst_uuid),
                         name=d.name) for d in disks),
        nics=tuple(_read_nics(ins, inst_uuid)),
        osparams=_Section(cp, SECTION_OS, where).items("os"),
        osparams_private=_Section(cp, SECTION_OS_PRIVATE, where).items("os"),
        beparams=beparams,
        hvparams=_Section(cp, SECTION_HYPERVISOR, where).items("hv"),
        tags=tuple((ins.get("tags", optional=True) or "").split()),
    )
    return GanetiExport(
        instance=instance,
        disks=tuple(disks),
        version=version,
        timestamp=timestamp,
        source=ex.get("source", optional=True),
        compression=ex.get("compression", optional=True),
    )


def _int(value: str | None, where: str, key: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise E.ArchiveError(f"cannot read {where}: '{key}' is not a number: '{value}'") from None


def _read_disks(ins: _Section, inst_uuid: str, where: str) -> list[ExportDisk]:
    disks = []
    for i in range(MAX_DISKS):  # gaps are skipped, as Ganeti does
        size = _int(ins.get(f"disk{i}_size", optional=True), where, f"disk{i}_size")
        if size is None:
            continue
        disks.append(
            ExportDisk(
                index=i,
                dump=ins.get(f"disk{i}_dump", optional=True),
                size_mib=size,
                name=ins.get(f"disk{i}_name", optional=True),
                ivname=ins.get(f"disk{i}_ivname", optional=True),
            )
        )
    return disks


def _disk_uuid(disk: ExportDisk, inst_uuid: str) -> str:
    """Ganeti names dumps by disk (or snapshot) uuid; else derive one."""
    try:
        return str(uuidlib.UUID(disk.dump or ""))
    except ValueError:
        return str(uuidlib.uuid5(uuidlib.UUID(inst_uuid), f"disk/{disk.index}"))


def _read_nics(ins: _Section, inst_uuid: str) -> list[Nic]:
    nics = []
    for i in range(MAX_NICS):  # NICs stop at the first gap, as Ganeti does
        if not ins.has(f"nic{i}_mac"):
            break
        network = ins.get(f"nic{i}_network", optional=True)
        nics.append(
            Nic(
                mac=ins.get(f"nic{i}_mac") or "auto",
                uuid=str(uuidlib.uuid5(uuidlib.UUID(inst_uuid), f"nic/{i}")),
                mode=ins.get(f"nic{i}_mode", optional=True) or "bridged",
                link=ins.get(f"nic{i}_link", optional=True),
                ip=ins.get(f"nic{i}_ip", optional=True),
                name=ins.get(f"nic{i}_name", optional=True),
                vlan=ins.get(f"nic{i}_vlan", optional=True),
                network=_network(network),
            )
        )
    return nics


def _network(value: str | None) -> dict[str, str]:
    """``nic<i>_network``: Ganeti writes the network's uuid; older files may hold a name."""
    if not value:
        return {}
    try:
        return {"uuid": str(uuidlib.UUID(value))}
    except ValueError:
        return {"name": value}


def read_config(path: str) -> GanetiExport:
    """Read and parse a config.ini file (at most :data:`MAX_CONFIG_BYTES`)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise E.ArchiveError(
            f"cannot read export config '{path}': {err.strerror or err}"
        ) from err
    if len(data) > MAX_CONFIG_BYTES:
        raise E.ArchiveError(f"cannot read export config '{path}': larger than "
                             f"{MAX_CONFIG_BYTES >> 20} MiB (a config.ini has a few KiB)")
    return parse_config(data, path)
