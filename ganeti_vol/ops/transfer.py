"""Export and import of whole instances: scripts, snapshots and hooks around the engine.

``export_instance`` runs each disk's ``export`` script (or reads the disk
itself in raw mode) from a snapshot, streams its stdout through the central
:class:`~ganeti_vol.engine.parallel.Engine` into an archive directory that is
published atomically, or into one self-describing stream on stdout.

``import_instance`` reads an archive (native, or Ganeti's own v0 export) or
a stream, verifies every chunk before passing it on, and feeds each disk to
the ``import`` script's stdin, or writes it directly in raw mode.  A disk
that failed half-way is reported as broken, never as good.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, TypeVar

from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import Cancel
from ganeti_vol.core.model import Instance, OSDefinition
from ganeti_vol.engine import progress as progress_mod
from ganeti_vol.engine import hashing, rawio
from ganeti_vol.engine.chunks import ChunkSink, EncodeSummary
from ganeti_vol.engine.parallel import Engine
from ganeti_vol.engine.targets import RawTarget, StreamTarget
from ganeti_vol.formats import archive as archive_mod
from ganeti_vol.formats import wire
from ganeti_vol.ganeti import environment as env_mod
from ganeti_vol.ops import operations, opstate
from ganeti_vol.ops.endpoints import DiskSource, ExportDestination, ImportSource
from ganeti_vol.ops.operations import OpContext
from ganeti_vol.ops.results import (
    DiskExport,
    DiskImport,
    ExportResult,
    ImportRename,
    ImportResult,
    warnings_of,
)
from ganeti_vol.system import changemap, process, snapshots

log = logging.getLogger(__name__)

STREAM = wire.STREAM
T = TypeVar("T")
R = TypeVar("R")


# --- shared plumbing --------------------------------------------------------------------


@dataclass
class Job:
    """Bookkeeping shared by every disk of one export or import."""

    ctx: OpContext
    instance: Instance
    engine: Engine
    cancel: Cancel
    progress: progress_mod.Progress
    watchdog: progress_mod.StallWatchdog

    @contextlib.contextmanager
    def disk_progress(self, index: int) -> Iterator[progress_mod.DiskProgress]:
        """Disk ``index``'s progress, marked done (or failed, with the error) at the end."""
        disk = self.progress.disk(index)
        try:
            yield disk
        except BaseException as err:
            disk.fail(err)
            raise
        disk.finish()

    @contextlib.contextmanager
    def script(self, script: process.ScriptStream,
               symptoms: type[E.StreamError]) -> Iterator[None]:
        """Let the stall watchdog stop ``script`` while the block runs; a ``symptoms`` error
        of the block (a short or broken stream) surfaces as the script's own failure if the
        script failed: that came first."""
        self.watchdog.add_kill(script.kill)
        try:
            yield
        except symptoms as err:
            try:
                script.raise_if_failed()
            except E.ScriptFailed as failed:
                raise failed from err
            raise
        finally:
            self.watchdog.remove_kill(script.kill)

    def first_failure(self, err: E.GanetiVolError) -> E.GanetiVolError:
        """The failure to report when ``err`` ended the run: the watchdog's StallError if
        it fired (what the killed script or the interrupted read raised came after it)."""
        if self.watchdog.error is None or isinstance(err, E.StallError):
            return err
        return self.watchdog.error


@contextlib.contextmanager
def _job(
    ctx: OpContext, op: str, instance: Instance, progress_mode: str,
    cancel: Cancel | None = None, *, scripts: bool = True,
) -> Iterator[Job]:
    """Engine, cancel flag, progress display, status file and stall watchdog of one run.

    A stall surfaces as the StallError, whatever error the killed script or
    the interrupted read produced first.
    """
    cancel = cancel or Cancel()
    progress = progress_mod.Progress(op, name=instance.name)
    watchdog = progress_mod.StallWatchdog(ctx.node.stall_timeout, cancel=cancel)
    status = progress_mod.StatusFile(ctx.node.state_dir, op, instance.name)
    monitor = progress_mod.ProgressMonitor(
        progress, renderer=progress_mod.make_renderer(progress_mode), status=status,
        watchdog=watchdog,
    )
    engine = Engine.from_config(ctx.node, busy_cpus=1 if scripts else 0)
    with engine, monitor:
        job = Job(ctx, instance, engine, cancel, progress, watchdog)
        try:
            yield job
        except E.GanetiVolError as err:
            first = job.first_failure(err)
            if first is not err:
                raise first from err
            raise


def _node_name() -> str:
    return socket.gethostname()


def _run_disks(job: Job, disks: Iterable[T], work: Callable[[T], R], parallel: int) -> list[R]:
    """Run ``work(disk)`` for each disk, at most ``parallel`` at once (1: in order, taking
    each disk from ``disks`` only when the previous one is done); results in input order.

    The first failure cancels the others (their scripts are killed) and is
    raised once every disk has stopped; Ctrl-C in the main thread does the same.
    """
    if parallel <= 1:
        return [work(d) for d in disks]
    items = list(disks)
    if len(items) <= 1:
        return [work(d) for d in items]
    results: dict[int, R] = {}
    pool = futures.ThreadPoolExecutor(parallel, thread_name_prefix="ganeti-vol-disk")
    pending = {pool.submit(work, d): i for i, d in enumerate(items)}
    first: BaseException | None = None
    try:
        while pending:
            done, _ = futures.wait(pending, timeout=0.2, return_when=futures.FIRST_EXCEPTION)
            for fut in done:
                index = pending.pop(fut)
                err = fut.exception()
                if err is None:
                    results[index] = fut.result()
                elif first is None:
                    first = err
                    job.cancel.abort(err)
    except BaseException as err:  # Ctrl-C while waiting
        job.cancel.abort(err)
        first = first or err
        futures.wait(pending)
        raise
    finally:
        pool.shutdown(wait=True)
    if first is not None:
        raise first
    return [results[i] for i in range(len(items))]


def _what(instance: Instance, index: int) -> str:
    return f"disk {index} of instance '{instance.name}'"


def _log_path(ctx: OpContext, kind: str, instance: Instance, index: int) -> str:
    return process.new_log_file(ctx.node.log_dir, kind, instance.os or "raw", instance.name,
                                f"disk{index}")


# --- export -----------------------------------------------------------------------------


def _check_exportable(instance: Instance) -> None:
    for i, disk in enumerate(instance.disks):  # a diskless instance exports its config only
        if not disk.path:
            raise E.UsageError(f"cannot export {_what(instance, i)}: it has no path")
        try:
            mode = os.stat(disk.path).st_mode
        except FileNotFoundError:
            raise E.DeviceError(f"cannot export {_what(instance, i)}: '{disk.path}' does not "
                                "exist") from None
        except OSError as err:
            raise E.DeviceError(f"cannot export {_what(instance, i)}: '{disk.path}': "
                                f"{err.strerror or err}") from None
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise E.DeviceError(f"cannot export {_what(instance, i)}: '{disk.path}' is not a "
                                "regular file or block device")


def export_instance(
    ctx: OpContext,
    instance: Instance,
    *,
    output: str | None = None,
    out_fd: int | None = None,
    raw: bool = False,
    fmt: str = "native",
    name: str | None = None,
    progress: str = "none",
    force: bool = False,
    into: Callable[[Instance], ExportDestination] | None = None,
) -> ExportResult:
    """Export every disk of ``instance``.

    ``output``: an export directory (default: the node's ``export_dir``), or
    ``"-"`` for one stream written to ``out_fd``.  ``raw`` reads the disks
    directly instead of running the OS ``export`` script (also used when the
    instance has no OS).  ``fmt="ganeti"`` writes what Ganeti itself writes.
    The instance is locked, its disks share-locked, the destination locked;
    a broken instance (an import that did not complete) is refused, and so
    is a destination that is not an archive of this instance, unless
    ``force`` (never a destination that is not an archive at all).
    ``into(instance)``: another destination instead (e.g. a repository snapshot).
    """
    raw = raw or not instance.os
    os_def = None if raw else ctx.load_os(instance.os)
    if os_def is not None and C.OS_SCRIPT_EXPORT not in os_def.scripts:
        raise E.OSDefinitionError(f"OS '{os_def.name}' has no export script")
    destination = _destination(ctx, instance, output=output, out_fd=out_fd, fmt=fmt, name=name,
                               force=force, into=into)
    started = time.monotonic()
    extra = {
        "EXPORT_MODE": "local",
        "EXPORT_NODE": _node_name(),
        "EXPORT_DO_SHUTDOWN": "False",
        "SHUTDOWN_TIMEOUT": "0",
        "REMOVE_INSTANCE": "False",
    }
    with opstate.operation(ctx.node.state_dir, "export", instance, read_only=True,
                           destination=destination.final):
        if not force:
            opstate.check_not_broken(ctx.node.state_dir, instance, "export")
        _check_exportable(instance)
        hook_log = process.new_log_file(ctx.node.log_dir, "export", instance.os or "raw",
                                        instance.name)
        with ctx.hooks.around("instance-export", instance, extra, hook_log) as hooks, \
                _job(ctx, "export", instance, progress, scripts=not raw) as job:
            with destination.open(job) as dest:
                disks = _run_disks(
                    job, range(len(instance.disks)),
                    lambda i: _export_disk(job, os_def, i, dest.disk_sink),
                    ctx.node.parallel_disks if dest.parallel else 1,
                )
            # post hooks (e.g. the shipped verify hook) see where the export went
            hooks.env["EXPORT_PATH"] = dest.hook_path
    return ExportResult(
        instance=instance.name, os=instance.os, mode="raw" if raw else "script", format=fmt,
        path=dest.path, disks=tuple(disks), elapsed=time.monotonic() - started,
        extra=dest.extra_result(), warnings=warnings_of(hooks.warning()),
    )
@dataclass(frozen=True)
class _Destination:
    """Where an export goes: the archive directory it publishes (None: no directory), and
    how it is opened once the engine runs."""

    final: str | None
    open: Callable[[Job], ExportDestination]


def _destination(
    ctx: OpContext, instance: Instance, *, output: str | None, out_fd: int | None, fmt: str,
    name: str | None, force: bool, into: Callable[[Instance], ExportDestination] | None,
) -> _Destination:
    """The export's destination: ``into``, the stream (``output`` "-"), or an archive."""
    if into is not None:
        return _Destination(None, lambda job: into(instance))
    if output == STREAM:
        if fmt != "native":
            raise E.UsageError("--format ganeti needs an export directory, not '-'")
        if out_fd is None:
            raise E.ProgrammerError("export to a stream needs out_fd")
        fd = out_fd
        return _Destination(None, lambda job: wire.WireWriter(
            fd, instance, chunk_size=job.engine.chunk_size, hash_algo=job.engine.hash_algo,
            cancel=job.cancel))
    export_dir = output or ctx.node.export_dir
    final = os.path.join(export_dir, name or instance.name)
    # before anything runs; the writer checks again before publishing
    archive_mod.check_replaceable(final, instance.name, force=force)
    return _Destination(final, lambda job: archive_mod.ArchiveWriter(
        export_dir, instance, chunk_size=job.engine.chunk_size,
        hash_algo=job.engine.hash_algo, format=fmt, name=name, force=force))


def export_one_disk(ctx: OpContext, instance: Instance, index: int,
                    output: str) -> tuple[str, DiskExport]:
    """Export disk ``index`` alone through the OS export script into an archive in ``output``.

    The per-disk path of :func:`export_instance` (snapshot, ``EXPORT_DEVICE``,
    ``EXPORT_INDEX``, every disk of the instance in ``DISK_*``) without hooks,
    for the conformance runner's one-step-per-disk report.  The archive holds
    only this disk: importing it writes only the disk of the same index.
    Returns the archive's path and what the export of the disk did.
    """
    os_def = ctx.load_os(instance.os)
    final = os.path.join(output, instance.name)
    with opstate.operation(ctx.node.state_dir, "export", instance, read_only=True,
                           destination=final), \
            _job(ctx, "export", instance, "none") as job, \
            archive_mod.ArchiveWriter(output, instance, chunk_size=job.engine.chunk_size,
                                      hash_algo=job.engine.hash_algo) as writer:
        disk = _export_disk(job, os_def, index, writer.disk_sink)
    return writer.path, disk


def _export_disk(
    job: Job, os_def: OSDefinition | None, index: int, sink_for: Callable[..., ChunkSink]
) -> DiskExport:
    ctx, instance = job.ctx, job.instance
    what = _what(instance, index)
    job.progress.touch()
    base = staged = None
    with job.disk_progress(index) as disk_progress, \
            snapshots.instance_snapshot(instance, index, ctx.node) as snap:
        source = {"path": instance.disks[index].path, "snapshot": snap.to_json()}
        mode = "raw" if os_def is None else "script"
        meta = archive_mod.DiskMeta.for_disk(instance, index, mode=mode, source=source)
        sink = sink_for(index, meta)
        if os_def is None:
            base = changemap.for_export(ctx.node.change_map, snap.origin, instance.uuid,
                                        index, snap, sink)
            with snap.open() as f, changemap.planned(
                    base, f.fileno(), sink,
                    hashing.zero_hash(job.engine.hash_algo, job.engine.chunk_size),
            ) as (sink, unchanged):
                summary = job.engine.encode(
                    f.fileno(), sink, progress=disk_progress, cancel=job.cancel,
                    source_kind="auto", what=what, unchanged=unchanged,
                )
            log_path = None
        else:
            log_path = _log_path(ctx, "export", instance, index)
            summary = _export_through_script(job, os_def, index, snap.path, sink, log_path,
                                             disk_progress, what)
        snap.check()  # an overflowed snapshot must not be published
        if base is not None:
            staged = base.stage(snap.path)
    if base is not None and staged is not None:  # after the snapshot's release (Base.commit)
        base.commit(staged)
    return DiskExport(summary, index, mode, log_path, snap.to_json())


def _export_through_script(
    job: Job, os_def: OSDefinition, index: int, device: str, sink: ChunkSink,
    log_path: str, disk_progress: progress_mod.DiskProgress, what: str,
) -> EncodeSummary:
    ctx, instance = job.ctx, job.instance
    with operations.script_devices(ctx, os_def, _single_disk(instance, index, device),
                                   read_only=True) as seen:
        dev = seen.disks[index].path
        env = env_mod.export_env(os_def, instance, index, device=dev, debug=ctx.debug_level)
        with process.open_script_stream(
            os_def.scripts[C.OS_SCRIPT_EXPORT], env, cwd=os_def.path, op="export",
            log_path=log_path, direction="read", size_fd=True,
            timeout=ctx.node.timeout("export"),
        ) as script, job.script(script, E.ShortTransfer):
            return job.engine.encode(
                script.fd, sink, progress=disk_progress, cancel=job.cancel,
                size_hint=script.size_hint, source_kind="pipe", what=what,
            )


def _single_disk(instance: Instance, index: int, path: str) -> Instance:
    """The instance with disk ``index`` at ``path`` (a snapshot), for attaching."""
    from dataclasses import replace

    disks = list(instance.disks)
    disks[index] = replace(disks[index], path=path)
    only = [d if i == index else replace(d, path=None) for i, d in enumerate(disks)]
    return instance.replace(disks=tuple(only))


# --- import -----------------------------------------------------------------------------


def open_source(ctx: OpContext, source: str | ImportSource, in_fd: int | None,
                cancel: threading.Event | None) -> ImportSource:
    """A native archive, a Ganeti export, or (``"-"``) a stream read from ``in_fd``.

    A source that is not a string is an opened one already (a repository snapshot).
    """
    if not isinstance(source, str):
        return source
    if source == STREAM:
        if in_fd is None:
            raise E.ProgrammerError("import from a stream needs in_fd")
        return wire.WireReader(in_fd, cancel=cancel)
    path = archive_mod.resolve(source, ctx.node.export_dir)
    return archive_mod.open_archive(path, chunk_size=ctx.node.chunk_size)


def merge_from_export(target: Instance, exported: Instance, *, os_given: bool) -> Instance:
    """Ganeti ``_ReadExportParams``: the OS comes from the export; parameters fill gaps only
    (private OS parameters too: a Ganeti-made export holds them in ``[os_private]``)."""
    changes: dict[str, Any] = {}
    if exported.os and not os_given:
        changes["os"] = exported.os
    for attr in ("osparams", "osparams_private", "beparams", "hvparams"):
        merged = {**getattr(exported, attr), **getattr(target, attr)}
        changes[attr] = merged
    sizes = [d.size_mib for d in exported.disks]
    if any(d.size_mib == 0 for d in target.disks):  # unknown size: the exported one
        from dataclasses import replace

        changes["disks"] = tuple(
            replace(d, size_mib=sizes[i]) if d.size_mib == 0 and i < len(sizes) else d
            for i, d in enumerate(target.disks)
        )
    if not target.nics and exported.nics:
        changes["nics"] = exported.nics
    if not target.tags and exported.tags:
        changes["tags"] = exported.tags
    return target.replace(**changes)


def _min_size(disk_source: DiskSource) -> int:
    return max(disk_source.size or 0, disk_source.disk_size or 0)


def _prepare_targets(instance: Instance, sources: Sequence[DiskSource]) -> dict[int, bool]:
    """Check the targets of ``sources``, then create the missing ones as sparse files.

    Every existing target is checked before anything is created, so one
    unusable target (too small, not a disk) fails the import with nothing
    created or written.  Returns ``{index: True if freshly created}``.
    """
    missing: dict[int, int] = {}
    for src in sources:
        disk = instance.disks[src.index]
        what = _what(instance, src.index)
        if not disk.path:
            raise E.UsageError(f"cannot import {what}: it has no path")
        try:
            os.stat(disk.path)
        except FileNotFoundError:
            missing[src.index] = max(disk.size_bytes, _min_size(src))
            continue
        rawio.check_target(disk.path, _min_size(src), what=f"{what} ('{disk.path}')",
                           verb="import into")
    for index, size in missing.items():
        operations.create_sparse_disk(_what(instance, index), instance.disks[index].path or "",
                                      size)
    return {src.index: src.index in missing for src in sources}


def import_instance(
    ctx: OpContext,
    instance: Instance,
    source: str | ImportSource,
    *,
    in_fd: int | None = None,
    raw: bool | None = None,
    os_given: bool = True,
    progress: str = "none",
) -> ImportResult:
    """Import an archive or stream into the disks of ``instance``.

    ``raw``: True writes the disks directly, False runs the ``import``
    script, None decides per disk (raw if it was exported raw or the
    instance has no OS).  After a successful import under a new name the
    ``rename`` script runs with ``OLD_INSTANCE_NAME`` (a failure is a
    warning, as in Ganeti).
    """
    started = time.monotonic()
    cancel = Cancel()
    src = open_source(ctx, source, in_fd, cancel)
    try:
        exported = src.instance
        inst = merge_from_export(instance, exported, os_given=os_given)
        indexes = src.indexes
        if max(indexes, default=-1) >= len(inst.disks):  # indexes are distinct
            raise E.UsageError(
                f"cannot import: the export has {len(indexes)} disk{'s' * (len(indexes) != 1)} "
                f"({', '.join(map(str, sorted(indexes)))}), instance '{inst.name}' has "
                f"{len(inst.disks)} (add them with --disk or in the instance file)"
            )
        os_def = ctx.load_os(inst.os) if inst.os and raw is not True else None
        if os_def is not None and C.OS_SCRIPT_IMPORT not in os_def.scripts:
            raise E.OSDefinitionError(f"OS '{os_def.name}' has no import script")
        extra = {"ADD_MODE": "import", "SRC_NODE": _node_name(), **src.hook_vars()}
        with opstate.operation(ctx.node.state_dir, "import", inst, source=src.path) as op:
            hook_log = process.new_log_file(ctx.node.log_dir, "import", inst.os or "raw",
                                            inst.name)
            with ctx.hooks.around("instance-add", inst, extra, hook_log) as hooks, \
                    _job(ctx, "import", inst, progress, cancel,
                         scripts=os_def is not None and raw is not True) as job:
                disks = _import_disks(job, op, os_def, src, raw)
            rename = None
            if os_def is not None and exported.name and exported.name != inst.name:
                rename = _rename_after_import(ctx, os_def, inst, exported.name)
    finally:
        src.close()
    return ImportResult(
        instance=inst.name, os=inst.os, source=src.path, source_format=src.format,
        disks=tuple(disks), elapsed=time.monotonic() - started,
        repaired=opstate.describe_mark(op.previous) if op.previous is not None else None,
        rename=rename,
        warnings=warnings_of(hooks.warning(), rename.failure if rename is not None else None),
    )


def _import_disks(job: Job, op: opstate.Operation, os_def: OSDefinition | None,
                  src: ImportSource, raw: bool | None) -> list[DiskImport]:
    """The import proper, once the instance and its disks are locked.

    A sequential source's disks are checked and imported as they come; any
    other's targets are all checked before anything is created or written,
    then imported at once (at most ``parallel_disks``).
    """
    inst = job.instance
    states: dict[int, str] = {}
    fresh: dict[int, bool] = {}

    def work(disk_source: DiskSource) -> DiskImport:
        index = disk_source.index
        if index not in fresh:  # a stream's disks are checked as they come
            fresh.update(_prepare_targets(inst, [disk_source]))
        states[index] = "importing"  # from here on, the disk may be half-written
        try:
            result = _import_disk(job, op, os_def, disk_source, raw, fresh[index])
        except BaseException:
            states[index] = "broken"
            raise
        states[index] = "good"
        return result

    disks: Iterable[DiskSource] = src.disk_sources()
    parallel = 1
    if not src.sequential:
        listed = list(disks)
        fresh.update(_prepare_targets(inst, listed))
        disks = sorted(listed, key=lambda d: d.index)
        parallel = job.ctx.node.parallel_disks
    try:
        return _run_disks(job, disks, work, parallel)
    except E.GanetiVolError as err:
        broken = sorted(i for i, s in states.items() if s != "good")
        if not broken or err.fields.get("target_broken"):  # said already
            raise
        raise err.restated(f" (disk(s) {', '.join(map(str, broken))} of instance "
                           f"'{inst.name}' are broken: partially imported)") from err


def _import_disk(job: Job, op: opstate.Operation, os_def: OSDefinition | None,
                 disk_source: DiskSource, raw: bool | None, fresh: bool) -> DiskImport:
    with job.disk_progress(disk_source.index) as disk_progress:
        result = _import_disk_to(job, op, os_def, disk_source, raw, fresh, disk_progress)
        if disk_source.hash_algo is not None:  # every chunk was checked against its hash
            disk_progress.mark_verified(result.size)
    return result


def _import_disk_to(job: Job, op: opstate.Operation, os_def: OSDefinition | None,
                    disk_source: DiskSource, raw: bool | None, fresh: bool,
                    disk_progress: progress_mod.DiskProgress) -> DiskImport:
    ctx, instance = job.ctx, job.instance
    index = disk_source.index
    path = instance.disks[index].path
    assert path is not None  # _prepare_targets refused a disk without one
    op.lock_target(path, f"{_what(instance, index)} ('{path}')")
    op.begin_writes()
    use_raw = raw if raw is not None else (os_def is None or disk_source.mode == "raw")
    log_path = None
    if use_raw or os_def is None:
        target = RawTarget(path, known_zero=fresh)
        summary = job.engine.decode(disk_source, target, progress=disk_progress, cancel=job.cancel)
        mode = "raw"
    else:
        log_path = _log_path(ctx, "import", instance, index)
        with operations.script_devices(ctx, os_def, instance) as seen:
            env = env_mod.import_env(os_def, seen, index, debug=ctx.debug_level)
            with process.open_script_stream(
                os_def.scripts[C.OS_SCRIPT_IMPORT], env, cwd=os_def.path, op="import",
                log_path=log_path, direction="write", size_fd=True,  # as Ganeti's daemon does
                timeout=ctx.node.timeout("import"),
            ) as script, job.script(script, E.StreamError):  # e.g. the script stopped reading
                summary = job.engine.decode(
                    disk_source, StreamTarget(script.fd),
                    progress=disk_progress, cancel=job.cancel,
                )
        mode = "script"
    return DiskImport(summary, index, mode, path, log_path)


def _rename_after_import(
    ctx: OpContext, os_def: OSDefinition, instance: Instance, old_name: str
) -> ImportRename:
    log_path = operations.rename_log(ctx, instance, old_name)
    try:
        duration = operations.run_rename_script(ctx, os_def, instance, old_name, log_path)
    except E.ScriptError as err:
        log.warning("instance '%s' was imported, but its rename script failed: %s",
                    instance.name, err)
        return ImportRename(old_name, log_path, failure=err)
    return ImportRename(old_name, log_path, script_duration=duration)
