"""manifest.json: rendered with its own checksum, parsed and checked field by field, and the format and disk checks it shares with the stream header."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, TypeGuard

from ganeti_vol.core import errors as E
from ganeti_vol.engine import codec
from ganeti_vol.formats import ganeti_export as G
from ganeti_vol.formats.archive.layout import (
    CONFIG,
    FEATURE_MANIFEST_SUM,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MANIFEST_SUM,
    SUPPORTED_FEATURES,
    member_name,
    quote,
)

_SUM_PLACEHOLDER = b"0" * 64
_SUM_FIELD = re.compile(rb'"manifest_sha256"[ \t\r\n]*:[ \t\r\n]*"([^"\\]*)"')
_HEX64 = re.compile(r"[0-9a-f]{64}")


def render_manifest(manifest: dict[str, Any]) -> bytes:
    """manifest.json's bytes, ending with ``manifest_sha256``: its own checksum.

    The checksum is the SHA-256 of the file's bytes with its 64 hex digits
    replaced by 64 ``0``, so every byte of the manifest is covered.
    """
    body = {k: v for k, v in manifest.items() if k != MANIFEST_SUM}
    body[MANIFEST_SUM] = _SUM_PLACEHOLDER.decode()
    text = (json.dumps(body, indent=1) + "\n").encode()
    return _SUM_FIELD.sub(
        lambda m: m.group(0).replace(_SUM_PLACEHOLDER, hashlib.sha256(text).hexdigest().encode()),
        text,
    )


def _check_manifest_sum(data: bytes, manifest: dict[str, Any], where: str) -> bool:
    """Check manifest.json's own checksum; False for a manifest written without one.

    A manifest lists ``manifest-sha256`` in its features and has the field
    (written so since that feature); one with neither is from an older
    ganeti-vol and is read unchecked; anything in between is damage.
    """
    listed = any(_is_str_list(f) and FEATURE_MANIFEST_SUM in f
                 for f in (manifest.get("mandatory_features"), manifest.get("optional_features")))
    if MANIFEST_SUM not in manifest and not listed:
        return False
    found = _SUM_FIELD.findall(data)
    value = manifest.get(MANIFEST_SUM)
    if len(found) != 1 or not isinstance(value, str) or found[0] != value.encode() \
            or not _HEX64.fullmatch(value):
        raise E.IntegrityError(f"cannot open {where}: {MANIFEST} has no valid checksum "
                               f"('{MANIFEST_SUM}', found {len(found)})")
    if hashlib.sha256(_SUM_FIELD.sub(
            lambda m: m.group(0).replace(found[0], _SUM_PLACEHOLDER), data)).hexdigest() != value:
        raise E.IntegrityError(f"cannot open {where}: {MANIFEST} does not match its checksum "
                               f"('{MANIFEST_SUM}'): the manifest is damaged")
    return True


def _is_int(lo: int = 0, hi: int = (1 << 63) - 1) -> Any:
    return lambda v: type(v) is int and lo <= v <= hi


def _is_str(v: object) -> bool:
    return isinstance(v, str)


def _is_hex64(v: object) -> bool:
    return isinstance(v, str) and _HEX64.fullmatch(v) is not None


def _is_str_list(v: object) -> TypeGuard[list[str]]:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


class _Checker:
    """Type and range checks of one manifest object; errors name the key."""

    def __init__(self, obj: dict[str, Any], where: str, prefix: str = "") -> None:
        self.obj, self.where, self.prefix = obj, where, prefix

    def bad(self, key: str, problem: str) -> E.ArchiveError:
        return E.ArchiveError(f"cannot open {self.where}: {MANIFEST}: '{self.prefix}{key}' "
                              f"{problem}")

    def get(self, key: str, ok: Any, expect: str, *, required: bool = True,
            none: bool = False) -> Any:
        if key not in self.obj:
            if required:
                raise self.bad(key, "is missing")
            return None
        value = self.obj[key]
        if not (ok(value) or (none and value is None)):
            raise self.bad(key, f"must be {expect}, not {quote(value)}")
        return value


def _check_manifest(m: dict[str, Any], where: str) -> None:
    """Every field a reader uses has its type and range (ArchiveError naming the key)."""
    top = _Checker(m, where)
    top.get("mandatory_features", _is_str_list, "a list of names")
    top.get("optional_features", _is_str_list, "a list of names", required=False)
    top.get("export_id", _is_str, "a string")
    top.get("created", _is_str, "a time stamp string")
    for key in ("finished", "created_by"):
        top.get(key, _is_str, "a string", required=False)
    inst = _Checker(top.get("instance", lambda v: isinstance(v, dict), "an object"), where,
                    "instance.")
    inst.get("name", lambda v: isinstance(v, str) and v != "", "a non-empty string")
    inst.get("os", _is_str, "a string")
    for key in ("uuid", "hypervisor"):
        inst.get(key, _is_str, "a string", required=False, none=True)
    inst.get("disk_count", _is_int(0, G.MAX_DISKS), f"a number from 0 to {G.MAX_DISKS}",
             required=False)
    member_name(top.get("config", _is_str, "a file name"), where)
    top.get("config_sha256", _is_hex64, "64 hex digits")
    top.get("osparams_private_omitted", _is_str_list, "a list of names", required=False)
    disks = top.get("disks", lambda v: isinstance(v, list) and len(v) <= G.MAX_DISKS,
                    f"a list of at most {G.MAX_DISKS} disks")
    names = {MANIFEST, m["config"]}
    seen: set[int] = set()
    for n, entry in enumerate(disks):
        if not isinstance(entry, dict):
            raise top.bad(f"disks[{n}]", f"must be an object, not {quote(entry)}")
        d = _Checker(entry, where, f"disks[{n}].")
        index = d.get("index", _is_int(0, G.MAX_DISKS - 1), f"a number from 0 to "
                      f"{G.MAX_DISKS - 1}")
        if index in seen:
            raise d.bad("index", f"repeats disk {index}: every disk is listed once")
        seen.add(index)
        d.get("uuid", _is_str, "a string")
        d.get("name", _is_str, "a string", required=False, none=True)
        for key in ("dump", "index_file"):
            name = member_name(d.get(key, _is_str, "a file name"), where)
            if name in names:
                raise d.bad(key, f"names {quote(name)}, which is already another file of the "
                                 "archive")
            names.add(name)
        d.get("index_sha256", _is_hex64, "64 hex digits")
        size = d.get("size", _is_int(), "a byte count")
        d.get("disk_size", _is_int(), "a byte count", required=False, none=True)
        cs = d.get("chunk_size", codec.valid_chunk_size,
                   "a power of two from 64 KiB to 16 MiB")
        count = -(-size // cs)
        d.get("chunks", lambda v, n=count: v == n, f"{count} ({size} bytes in chunks of {cs})")
        d.get("dump_bytes", _is_int(), "a byte count")
        d.get("compression", _is_str, "a string")
        d.get("hash", _is_str, "a string")
        d.get("digest", lambda v: isinstance(v, str) and v.startswith("sha256:")
              and _is_hex64(v[7:]), "'sha256:' and 64 hex digits")
        d.get("zero_chunks", _is_int(0, entry["chunks"]), "a chunk count", required=False)
        for key in ("zero_bytes", "data_bytes", "hole_bytes"):
            d.get(key, _is_int(0, size), "a byte count", required=False)
        for key in ("source", "timings"):
            d.get(key, lambda v: isinstance(v, dict), "an object", required=False, none=True)
        _Checker(entry.get("source") or {}, where, f"disks[{n}].source.").get(
            "mode", _is_str, "a string", required=False, none=True)
        d.get("base", lambda v: False, "null (no base archive in format version 1)",
              required=False, none=True)
        d.get("zero_map", lambda v: isinstance(v, list), "a list", required=False, none=True)


def parse_manifest(data: bytes, where: str) -> tuple[dict[str, Any], bool]:
    """The checked manifest and whether it had its own checksum (see _check_manifest_sum)."""
    try:
        manifest = json.loads(data)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (ValueError, RecursionError) as err:  # RecursionError: nested too deep
        raise E.ArchiveError(
            f"cannot open {where}: not an archive (incomplete or invalid {MANIFEST}: {err})"
        ) from None
    check_format(manifest, f"{where}: {MANIFEST}")
    checked = _check_manifest_sum(data, manifest, where)
    _check_manifest(manifest, where)
    return manifest, checked


def check_format(
    header: dict[str, Any],
    what: str,
    *,
    fmt: str = FORMAT,
    version: int = FORMAT_VERSION,
    supported: frozenset[str] = SUPPORTED_FEATURES,
) -> None:
    """Refuse a manifest or stream header this reader cannot read (ArchiveFormatError)."""
    if header.get("format") != fmt:
        raise E.ArchiveError(f"cannot open {what}: not a {fmt} ('format' is "
                             f"{quote(header.get('format'))})")
    found = header.get("format_version")
    if type(found) is not int or found < 1:
        raise E.ArchiveError(f"cannot open {what}: invalid format_version {quote(found)}")
    if found > version:
        raise E.ArchiveFormatError(
            f"cannot open {what}: format version {found} is newer than {version}; "
            "a newer ganeti-vol is required"
        )
    features = header.get("mandatory_features")
    if not _is_str_list(features):
        raise E.ArchiveError(f"cannot open {what}: invalid mandatory_features {quote(features)}")
    missing = sorted(set(features) - supported)
    if missing:
        raise E.ArchiveFormatError(
            f"cannot open {what}: archive needs feature(s) "
            f"{', '.join(f if f.isprintable() else quote(f) for f in missing)}; "
            "a newer ganeti-vol is required"
        )


def check_disks(
    announced: dict[int, tuple[str | None, int | None]], export: G.GanetiExport, what: str,
    by: str,
) -> None:
    """The disks a manifest or stream announces are exactly config.ini's.

    ``announced`` maps each index to its dump name and disk size in bytes
    (None: not compared); config.ini gives the size in MiB.
    """
    config = {d.index: d for d in export.disks if d.dump}
    if sorted(announced) != sorted(config):
        raise E.ArchiveError(f"cannot open {what}: {by} has disks {sorted(announced)}, "
                             f"{CONFIG} has disks {sorted(config)}")
    for index, (dump, disk_size) in announced.items():
        disk = config[index]
        if dump is not None and dump != disk.dump:
            raise E.ArchiveError(f"cannot open {what}: {by} names {quote(dump)} for disk "
                                 f"{index}, {CONFIG} names {quote(disk.dump)}")
        if disk_size is not None and disk_size != disk.size_mib << 20:
            raise E.ArchiveError(f"cannot open {what}: {by} gives disk {index} "
                                 f"{quote(disk_size)} bytes, {CONFIG} {disk.size_mib} MiB")
