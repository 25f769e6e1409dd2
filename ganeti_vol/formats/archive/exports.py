"""The archives of an export directory: what an export may replace, and resolve, list, verify and remove."""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import threading
from typing import Any

from ganeti_vol.core import errors as E
from ganeti_vol.engine.parallel import Engine
from ganeti_vol.engine.targets import NullTarget
from ganeti_vol.formats.archive.layout import CONFIG, MANIFEST, check_name
from ganeti_vol.formats.archive.readers import Archive, GanetiArchive, open_archive
from ganeti_vol.formats.archive.workdirs import owned_tempdir

log = logging.getLogger(__name__)

def _member_names(found: Archive | GanetiArchive) -> set[str]:
    if isinstance(found, Archive):
        names = {MANIFEST, found.manifest.get("config", CONFIG)}
        for d in found.disks:
            names.update((os.path.basename(d.dump_path), os.path.basename(d.index_path)))
        return names
    return {CONFIG} | {os.path.basename(d.dump_path) for d in found.disks}


_MEMBER_PATTERN = re.compile(r"^(manifest\.json|config\.ini|[0-9a-fA-F-]{36}(\.lz4|\.idx)?)$")


def check_replaceable(path: str, instance_name: str, *, force: bool = False) -> None:
    """Refuse to replace ``path`` unless it is missing, an empty directory, or an archive
    (native or Ganeti) of instance ``instance_name`` holding nothing but its own files.

    ``force`` also allows an archive of another instance, or a damaged one,
    but never a directory holding anything an archive does not hold.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as err:
        raise E.ArchiveError(f"cannot export to '{path}': {err.strerror or err}") from err
    if not stat.S_ISDIR(st.st_mode):
        raise E.ArchiveError(f"cannot export to '{path}': it exists and is not a directory "
                             "(it is never replaced)")
    try:
        entries = set(os.listdir(path))
    except OSError as err:
        raise E.ArchiveError(f"cannot export to '{path}': {err.strerror or err}") from err
    if not entries:
        return
    problem = None
    try:
        found = open_archive(path)
    except E.GanetiVolError as err:
        found, problem = None, str(err)
    allowed = _member_names(found) if found is not None else {
        e for e in entries if _MEMBER_PATTERN.match(e)}
    strangers = sorted(entries - allowed)
    if strangers or not entries & {MANIFEST, CONFIG}:
        shown = ", ".join(f"'{n}'" for n in strangers[:3]) + (" ..." if len(strangers) > 3 else "")
        raise E.ArchiveError(
            f"cannot export to '{path}': it is not an archive (it holds {shown or 'other files'}, "
            "which no archive holds); it is never replaced, not even with --force"
        )
    if found is None:
        if not force:
            raise E.ArchiveError(f"cannot export to '{path}': it holds a damaged archive "
                                 f"({problem}); use --force to replace it")
        return
    if found.instance.name != instance_name and not force:
        raise E.ArchiveError(
            f"cannot export instance '{instance_name}' to '{path}': it holds an archive of "
            f"instance '{found.instance.name}'; use --force to replace it"
        )


# --- verify / list / remove ------------------------------------------------------------


def verify(
    path: str,
    engine: Engine | None = None,
    cancel: threading.Event | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Re-hash every chunk of every disk; raise on the first bad one, else a report.

    The error (IntegrityError, or CompressionError for an undecodable frame)
    names the disk and offset and carries them as ``disk`` and ``offset``.
    A Ganeti export has no hashes: its dumps are only read through.
    ``progress`` is a :class:`ganeti_vol.engine.progress.Progress` (or None).
    """
    archive = open_archive(path)
    own = engine is None
    engine = engine or Engine()
    report: dict[str, Any] = {"path": archive.path, "format": archive.format, "disks": [],
                              "manifest_checked": getattr(archive, "manifest_checked", False)}
    try:
        for disk in archive.disks:
            try:
                dp = progress.disk(disk.index, disk.size) if progress is not None else None
                summary = engine.decode(disk, NullTarget(), cancel=cancel, progress=dp)
                if dp is not None:
                    dp.finish()
            except E.GanetiVolError as err:
                if getattr(err, "disk", None) is None:
                    err.disk = disk.index  # type: ignore[attr-defined]
                raise
            report["disks"].append({"index": disk.index, "size": summary.size,
                                    "chunks": summary.chunks, "digest": summary.digest,
                                    "verified": disk.hash_algo is not None})
    finally:
        if own:
            engine.close()
    report["ok"] = True
    return report


def resolve(name_or_path: str, export_dir: str) -> str:
    """An archive path from a name in ``export_dir`` or a path."""
    if os.sep in name_or_path or name_or_path in (".", ".."):
        return os.path.abspath(name_or_path)
    check_name(name_or_path)
    return os.path.join(export_dir, name_or_path)


def list_archives(export_dir: str) -> list[dict[str, Any]]:
    """Every visible directory in ``export_dir``: its info, or its error if not an archive.

    A broken or foreign directory is listed with its error (``valid`` False);
    it never hides the others.
    """
    try:
        names = sorted(n for n in os.listdir(export_dir) if not n.startswith("."))
    except FileNotFoundError:
        return []
    except OSError as err:
        raise E.ArchiveError(f"cannot list exports in '{export_dir}': {err.strerror}") from err
    out = []
    for name in names:
        path = os.path.join(export_dir, name)
        if not os.path.isdir(path):
            continue
        try:
            out.append({"valid": True, **open_archive(path).info()})
        except E.GanetiVolError as err:
            out.append({"valid": False, "name": name, "path": path, "error": str(err)})
        except Exception as err:  # a bug; one entry must still not hide the others
            log.debug("cannot list '%s'", path, exc_info=True)
            out.append({"valid": False, "name": name, "path": path,
                        "error": f"internal error reading it: {err!r} (please report this)"})
    return out


def remove(path: str) -> None:
    """Remove an archive (it must be one): renamed away atomically, then deleted."""
    path = os.path.abspath(path)
    if not os.path.lexists(path):
        raise E.ArchiveError(f"cannot remove '{path}': no such archive")
    if not os.path.isdir(path) or not (
        os.path.exists(os.path.join(path, MANIFEST)) or os.path.exists(os.path.join(path, CONFIG))
    ):
        raise E.ArchiveError(f"cannot remove '{path}': not an archive")
    parent, base = os.path.split(path)
    try:
        trash = owned_tempdir(parent, base, "remove")
        os.rename(path, os.path.join(trash, base))
    except OSError as err:
        raise E.ArchiveError(f"cannot remove '{path}': {err.strerror or err}") from err
    shutil.rmtree(trash, ignore_errors=True)
