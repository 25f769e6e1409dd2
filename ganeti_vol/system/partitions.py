"""Partition tables: the MBR (with its extended boot records) and the GPT of a disk image.

A pure reader (it only reads the file it is given): :func:`read_partition_table`
gives the :class:`PartitionEntry` list that loop devices get their partitions
from (:mod:`ganeti_vol.system.loopdev` adds them with ``BLKPG``).  Damaged
GPTs are a :class:`~ganeti_vol.core.errors.DeviceError`; entries outside the
disk are skipped with a warning.
"""

from __future__ import annotations

import logging
import struct
import uuid as uuidlib
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO

from ganeti_vol.core import errors as E

log = logging.getLogger(__name__)

MBR_ENTRY = struct.Struct("<B3sB3sII")
MBR_EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
MBR_PROTECTIVE_TYPE = 0xEE
GPT_SIGNATURE = b"EFI PART"
GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
GPT_MAX_ENTRIES = 4096


@dataclass(frozen=True)
class PartitionEntry:
    """One partition found in a table; offsets and sizes in bytes."""

    number: int
    start: int
    size: int
    #: primary | extended | logical | gpt
    scheme: str
    #: MBR type ("0x83") or GPT type GUID
    type: str
    name: str = ""


def _read_at(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    data = f.read(size)
    return data if len(data) == size else data + bytes(size - len(data))


def read_partition_table(
    f: BinaryIO, disk_size: int, sector_size: int = 512, *, what: str = "disk"
) -> list[PartitionEntry]:
    """Parse the MBR or GPT partition table of a disk image or device opened as ``f``.

    No table (no 0x55AA signature) yields ``[]``.  A protective MBR leads to
    the GPT: primary header, then the backup one if the primary fails its CRC
    checks.  Entries outside the disk are skipped with a warning.  A damaged
    GPT is a :class:`~ganeti_vol.core.errors.DeviceError`.
    """
    mbr = _read_at(f, 0, 512)
    if mbr[510:512] != b"\x55\xaa":
        return []
    entries = [MBR_ENTRY.unpack_from(mbr, 446 + 16 * i) for i in range(4)]
    if any(boot not in (0x00, 0x80) for boot, *_ in entries):
        return []  # a boot sector (FAT, ...) rather than a partition table
    if any(ptype == MBR_PROTECTIVE_TYPE for _, _, ptype, _, _, _ in entries):
        return _read_gpt(f, disk_size, sector_size, what)
    found: list[PartitionEntry] = []
    next_logical = 5
    for index, (_, _, ptype, _, lba, count) in enumerate(entries):
        if not ptype or not count:
            continue
        start, size = lba * sector_size, count * sector_size
        if ptype in MBR_EXTENDED_TYPES:
            # like the kernel: expose the container with a tiny size so nobody mkfs'es it
            found.append(
                PartitionEntry(
                    index + 1, start, min(size, max(sector_size, 1024)), "extended", f"{ptype:#04x}"
                )
            )
            logical = _read_logical(f, lba, count, sector_size, what, next_logical)
            next_logical += len(logical)
            found.extend(logical)
        else:
            found.append(PartitionEntry(index + 1, start, size, "primary", f"{ptype:#04x}"))
    return _within(found, disk_size, what)


def _read_logical(
    f: BinaryIO, ext_lba: int, ext_count: int, sector_size: int, what: str, first: int
) -> list[PartitionEntry]:
    """Walk the chain of extended boot records; logical partitions are numbered from 5."""
    found: list[PartitionEntry] = []
    ebr_lba, number = ext_lba, first
    seen: set[int] = set()
    while ebr_lba not in seen and len(seen) < 256:
        seen.add(ebr_lba)
        ebr = _read_at(f, ebr_lba * sector_size, 512)
        if ebr[510:512] != b"\x55\xaa":
            log.warning("%s: extended boot record at sector %d has no signature", what, ebr_lba)
            break
        link = None
        for i in range(4):
            _, _, ptype, _, lba, count = MBR_ENTRY.unpack_from(ebr, 446 + 16 * i)
            if not ptype or not count:
                continue
            if ptype in MBR_EXTENDED_TYPES:
                link = link if link is not None else lba
                continue
            start = (ebr_lba + lba) * sector_size
            if not ext_lba <= ebr_lba + lba < ext_lba + ext_count:
                log.warning(
                    "%s: logical partition %d lies outside its extended partition", what, number
                )
            found.append(
                PartitionEntry(number, start, count * sector_size, "logical", f"{ptype:#04x}")
            )
            number += 1
        if link is None:
            break
        ebr_lba = ext_lba + link
    return found


def _gpt_header(f: BinaryIO, lba: int, sector_size: int) -> tuple[Any, ...] | None:
    raw = _read_at(f, lba * sector_size, sector_size)
    fields = GPT_HEADER.unpack_from(raw)
    sig, _rev, hsize, hcrc = fields[:4]
    if sig != GPT_SIGNATURE or not GPT_HEADER.size <= hsize <= sector_size:
        return None
    check = bytearray(raw[:hsize])
    check[16:20] = bytes(4)
    if zlib.crc32(check) != hcrc or fields[5] != lba:
        return None
    return fields


def _read_gpt(f: BinaryIO, disk_size: int, sector_size: int, what: str) -> list[PartitionEntry]:
    last_lba = disk_size // sector_size - 1
    problems = []
    for label, lba in (("primary", 1), ("backup", last_lba)):
        header = _gpt_header(f, lba, sector_size)
        if header is None:
            problems.append(f"{label} GPT header missing or failing its CRC")
            continue
        first_usable, last_usable = header[7], header[8]
        entries_lba, count, entry_size, entries_crc = header[10:14]
        if count > GPT_MAX_ENTRIES or entry_size < GPT_ENTRY.size or entry_size % 8:
            problems.append(f"{label} GPT header has an invalid entry array")
            continue
        array = _read_at(f, entries_lba * sector_size, count * entry_size)
        if zlib.crc32(array) != entries_crc:
            problems.append(f"{label} GPT entry array fails its CRC")
            continue
        found = []
        for i in range(count):
            ptype, _uniq, first, last, _attrs, name = GPT_ENTRY.unpack_from(array, i * entry_size)
            if ptype == bytes(16):
                continue
            if not first_usable <= first <= last <= last_usable:
                log.warning("%s: GPT partition %d lies outside the usable area", what, i + 1)
                continue
            found.append(
                PartitionEntry(
                    i + 1,
                    first * sector_size,
                    (last - first + 1) * sector_size,
                    "gpt",
                    str(uuidlib.UUID(bytes_le=ptype)),
                    name.decode("utf-16-le", "replace").rstrip("\x00"),
                )
            )
        if label == "backup":
            log.warning("%s: primary GPT is damaged, using the backup GPT", what)
        return _within(found, disk_size, what)
    raise E.DeviceError(f"cannot read partition table of '{what}': {'; '.join(problems)}")


def _within(found: list[PartitionEntry], disk_size: int, what: str) -> list[PartitionEntry]:
    kept = []
    for part in found:
        if part.start <= 0 or part.start + part.size > disk_size:
            log.warning(
                "%s: partition %d lies beyond the end of the disk; skipped", what, part.number
            )
            continue
        kept.append(part)
    return kept
