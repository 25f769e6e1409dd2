"""Export archives on disk: write (staged, atomic), read, verify, list, remove.

An archive is a directory ``<export_dir>/<instance>/`` (format spec:
``doc/archive-format.md``)::

    config.ini          Ganeti v0 export info (ganeti_vol.formats.ganeti_export)
    <disk-uuid>.lz4     per disk: concatenated LZ4 frames, one per chunk;
                        `lz4 -d <disk-uuid>.lz4` restores the raw dump <disk-uuid>
    <disk-uuid>.idx     per disk: binary chunk index (flags, frame offset/length, hash)
    manifest.json       written last: format version, features, per-disk facts

It is staged in a hidden directory ``.<instance>.new-XXXXXX`` next to the
final one; data files are fsynced, the manifest is written last, the
directory is fsynced, then it replaces ``<instance>/`` in one
``renameat2(RENAME_EXCHANGE)`` (the previous archive stays complete until
then) and the old one is deleted.  On any failure, Ctrl-C included, the
staging directory is removed and nothing is published.  A directory without
a complete manifest is "not an archive" (ArchiveError).

``ArchiveWriter(..., format="ganeti")`` writes what Ganeti itself would:
uncompressed (sparse) dumps named by disk uuid plus config.ini, no manifest.
:func:`open_archive` reads both kinds.

Export of one disk::

    with ArchiveWriter(cfg.export_dir, instance, chunk_size=engine.chunk_size,
                       hash_algo=engine.hash_algo) as aw:
        summary = engine.encode(script_io.fd, aw.disk_sink(0, DiskMeta.for_disk(instance, 0)),
                                progress=..., cancel=..., size_hint=script_io.size_hint)
    aw.path    # the published archive

Import of one disk::

    archive = open_archive(path)      # Archive or GanetiArchive
    engine.decode(archive.disk(0), target, progress=..., cancel=...)

Both :meth:`ArchiveWriter.disk_sink` and the engine may be used from several
threads at once (one disk per thread).

Modules, one purpose each: :mod:`.layout` (member names, limits, index records,
the pinned directory), :mod:`.manifest` (manifest.json and the format checks),
:mod:`.workdirs` (hidden work directories named after their owner),
:mod:`.writer` (:class:`ArchiveWriter`), :mod:`.readers` (:func:`open_archive`),
:mod:`.exports` (what an export may replace; resolve, list, verify, remove).
Everything they offer is here too: ``archive.X`` works for each of them.
"""

from __future__ import annotations

from ganeti_vol.formats.archive.layout import (
    ArchiveDir,
    CONFIG,
    DUMP_SUFFIX,
    FEATURE_MANIFEST_SUM,
    FLAG_ZERO,
    FORMAT,
    FORMAT_VERSION,
    IDX_ENTRY,
    IDX_HEADER,
    IDX_MAGIC,
    IDX_VERSION,
    INDEX_SUFFIX,
    KNOWN_FLAGS,
    MANIFEST,
    MANIFEST_SUM,
    MAX_CONFIG,
    MAX_MANIFEST,
    SUPPORTED_FEATURES,
    WRITTEN_FEATURES,
    WRITTEN_OPTIONAL_FEATURES,
    ZERO_MAP_MAX,
    check_name,
    iso_time,
    member_name,
    quote,
    write_file,
)
from ganeti_vol.formats.archive.manifest import (
    check_disks,
    check_format,
    parse_manifest,
    render_manifest,
)
from ganeti_vol.formats.archive.workdirs import (
    WORK_KINDS,
    WorkDir,
    owned_tempdir,
    parse_work_dir,
    publish,
    reclaim_work_dirs,
)
from ganeti_vol.formats.archive.readers import (
    Archive,
    ArchiveDisk,
    GanetiArchive,
    GanetiDumpDisk,
    ListedSource,
    open_archive,
)
from ganeti_vol.formats.archive.exports import (
    check_replaceable,
    list_archives,
    remove,
    resolve,
    verify,
)
from ganeti_vol.formats.archive.writer import (
    ArchiveWriter,
    DiskMeta,
)

__all__ = [
    "Archive",
    "ArchiveDir",
    "ArchiveDisk",
    "ArchiveWriter",
    "CONFIG",
    "DUMP_SUFFIX",
    "DiskMeta",
    "FEATURE_MANIFEST_SUM",
    "FLAG_ZERO",
    "FORMAT",
    "FORMAT_VERSION",
    "GanetiArchive",
    "GanetiDumpDisk",
    "ListedSource",
    "IDX_ENTRY",
    "IDX_HEADER",
    "IDX_MAGIC",
    "IDX_VERSION",
    "INDEX_SUFFIX",
    "KNOWN_FLAGS",
    "MANIFEST",
    "MANIFEST_SUM",
    "MAX_CONFIG",
    "MAX_MANIFEST",
    "SUPPORTED_FEATURES",
    "WORK_KINDS",
    "WRITTEN_FEATURES",
    "WRITTEN_OPTIONAL_FEATURES",
    "WorkDir",
    "ZERO_MAP_MAX",
    "check_disks",
    "check_format",
    "check_name",
    "check_replaceable",
    "iso_time",
    "list_archives",
    "member_name",
    "open_archive",
    "owned_tempdir",
    "parse_manifest",
    "parse_work_dir",
    "publish",
    "quote",
    "reclaim_work_dirs",
    "remove",
    "render_manifest",
    "resolve",
    "verify",
    "write_file",
]
