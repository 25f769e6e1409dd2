"""Use cases: create, reinstall, rename and parameter verification of an instance.

Each function takes an :class:`OpContext` (node config, debug level, hooks)
and model objects, runs the OS scripts as Ganeti's ``InstanceOsAdd``,
``RunRenameInstance`` and ``ValidateOS`` do, and returns a result
(:mod:`ganeti_vol.ops.results`; ``verify_params`` still a JSON-able dict).
Export and import live in :mod:`ganeti_vol.ops.transfer`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.core.lazy import lazy
from ganeti_vol.core.model import Instance, NodeConfig, OSDefinition
from ganeti_vol.ganeti import discovery
from ganeti_vol.ganeti import environment as env_mod
from ganeti_vol.ganeti.hooks import HookRun
from ganeti_vol.ops import opstate
from ganeti_vol.ops.results import CreateResult, RenameResult, warnings_of
from ganeti_vol.system import process

# configobj and pyudev load only when a disk check or loop device needs them
if TYPE_CHECKING:
    from ganeti_vol.ganeti import config as cfgmod
    from ganeti_vol.ganeti import fields
    from ganeti_vol.system import loopdev
    from ganeti_vol.system.loopdev import LoopState
else:
    cfgmod = lazy("ganeti_vol.ganeti.config")
    fields = lazy("ganeti_vol.ganeti.fields")
    loopdev = lazy("ganeti_vol.system.loopdev")

log = logging.getLogger(__name__)


class Hooks(Protocol):
    """What operations need from the hooks runner (:mod:`ganeti_vol.ganeti.hooks`)."""

    def around(
        self, hpath: str, instance: Instance, extra: Mapping[str, str], log_path: str | None
    ) -> contextlib.AbstractContextManager[HookRun]: ...


class NoHooks:
    """Runs nothing (used when hooks are disabled)."""

    @contextlib.contextmanager
    def around(
        self, hpath: str, instance: Instance, extra: Mapping[str, str], log_path: str | None
    ) -> Iterator[HookRun]:
        yield HookRun()


@dataclass
class OpContext:
    node: NodeConfig
    debug_level: int = 0
    hooks: Hooks = field(default_factory=NoHooks)
    #: extra OS search directories tried before the node's (``--search-path``)
    search_path: tuple[str, ...] = ()

    @property
    def os_search_path(self) -> tuple[str, ...]:
        paths = self.search_path + tuple(self.node.os_search_path)
        return tuple(dict.fromkeys(os.path.normpath(p) for p in paths))

    def load_os(self, name: str) -> OSDefinition:
        if not name:
            raise E.UsageError(
                "the instance has no OS: set 'os = NAME+VARIANT' in the instance file or --os"
            )
        return discovery.load_os(name, self.os_search_path)


# --- disks -------------------------------------------------------------------------------


def create_sparse_disk(what: str, path: str, size: int) -> None:
    """Create a new sparse file disk of ``size`` bytes (never an existing one)."""
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise E.DeviceError(f"cannot create {what} '{path}': directory '{parent}' does not exist")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
    except OSError as err:
        raise E.DeviceError(f"cannot create {what} '{path}': {err.strerror}") from err


def ensure_file_disks(instance: Instance) -> list[str]:
    """Create missing file disks as sparse files; never truncate an existing one.

    Returns the paths created.  A disk smaller than its declared size is an
    error (DeviceError), as is a path whose directory does not exist.
    """
    created = []
    for idx, disk in enumerate(instance.disks):
        if not disk.path:
            continue
        what = f"disk {idx} of instance '{instance.name}'"
        try:
            st = os.stat(disk.path)
        except FileNotFoundError:
            create_sparse_disk(what, disk.path, disk.size_bytes)
            log.info("created %s as a sparse file '%s' of %d MiB", what, disk.path, disk.size_mib)
            created.append(disk.path)
            continue
        except OSError as err:
            raise E.DeviceError(f"cannot use {what} '{disk.path}': {err.strerror}") from err
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise E.DeviceError(
                f"cannot use {what} '{disk.path}': not a regular file or block device"
            )
        actual = process_size(disk.path)
        if actual < disk.size_bytes:
            raise E.DeviceError(
                f"cannot use {what} '{disk.path}': it has {actual} bytes, "
                f"less than the declared {disk.size_mib} MiB"
            )
    return created


def process_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


@contextlib.contextmanager
def script_devices(
    ctx: OpContext, os_def: OSDefinition, instance: Instance, *, read_only: bool = False
) -> Iterator[Instance]:
    """The instance as the scripts must see it.

    When the OS definition asks for block devices (``ganeti_vol.conf``), file
    disks are attached as loop devices (with their partitions) for the
    duration of the block, and ``DISK_<n>_PATH`` points at them.
    """
    if not os_def.wants_block_devices:
        yield instance
        return
    with loopdev.block_devices_for(
        instance.disks, read_only=read_only, partitions=os_def.block_partitions,
        state_dir=ctx.node.state_dir, tag=instance.name, hold=False,
    ) as devices:
        yield env_mod.with_devices(instance, devices)


# --- what a script may not do to the disks ---------------------------------------------


@dataclass(frozen=True)
class DiskWatch:
    """An instance's disks before a script ran (see :func:`watch_disks`)."""

    #: disk path -> size in bytes (None: it did not exist)
    sizes: dict[str, int | None]
    #: every loop device and its partitions; None where they cannot be listed
    loops: LoopState | None


def watch_disks(instance: Instance) -> DiskWatch:
    """Sizes of the instance's disks and the loop devices of the machine, before a script."""
    sizes = {d.path: fields.existing_size(d.path) for d in instance.disks if d.path}
    try:
        loops = loopdev.loop_state()
    except E.GanetiVolError as err:  # no udev: the size checks still run
        log.debug("cannot list loop devices: %s", err)
        loops = None
    return DiskWatch(sizes, loops)


def size_changes(sizes: Mapping[str, int | None]) -> list[tuple[str, str]]:
    """``(path, how)`` for each path whose size is no longer the one in ``sizes``."""
    changed = []
    for path, was in sizes.items():
        now = fields.existing_size(path)
        if was is None or now == was:
            continue
        if now is None:
            changed.append((path, "removed"))
        else:
            how = "truncated" if now < was else "grown"
            changed.append((path, f"{how} from {was} to {now} bytes"))
    return changed


def clear_leftovers(instance: Instance, watch: DiskWatch) -> list[tuple[str, str]]:
    """Detach loop devices on the instance's disks and delete stale partitions a script left.

    Only what appeared since ``watch``: loop devices bound to one of the
    disks, partitions on them, and partitions of the disks' tables on unbound
    loop devices.  Returns ``(check, message)`` for each.
    """
    if watch.loops is None:
        return []
    paths = [d.path for d in instance.disks if d.path]
    real = {os.path.realpath(p) for p in paths}
    after = loopdev.loop_state()
    found = loopdev.find_leftovers(
        watch.loops, after, lambda backing: bool(backing and os.path.realpath(backing) in real),
        disks=paths,
    )
    return loopdev.clear_leftovers(found, after)


def check_disks(instance: Instance, watch: DiskWatch, op: str) -> None:
    """Fail an operation whose script exited 0 but changed a disk's size or left devices.

    Raises :class:`~ganeti_vol.core.errors.DeviceError` listing every finding
    (after removing the loop devices and partitions it names).
    """
    index = {d.path: i for i, d in enumerate(instance.disks) if d.path}
    problems = [
        f"disk {index[path]} of instance '{instance.name}' ('{path}') was {how}"
        for path, how in size_changes(watch.sizes)
    ]
    problems += [message for _, message in clear_leftovers(instance, watch)]
    if problems:
        raise E.DeviceError(
            f"the {op} script of instance '{instance.name}' exited 0, but "
            + "; ".join(problems)
        )


# --- validation ------------------------------------------------------------------------


def validate_os_params(
    ctx: OpContext,
    os_def: OSDefinition,
    full_name: str,
    osparams: Mapping[str, str],
    *,
    force_variant: bool = False,
) -> dict[str, Any]:
    """Ganeti ``ValidateOS``: variant check, unknown parameters, then ``verify parameters``."""
    if not force_variant:
        discovery.check_variant(os_def, full_name)
    if os_def.max_api < C.OS_API_V20:
        return {"verify_script": None, "checked": False}
    discovery.check_parameters(os_def, list(osparams))
    script = os_def.script(C.OS_SCRIPT_VERIFY)
    assert script is not None  # required for API >= 20
    env = env_mod.verify_env(os_def, full_name, osparams, ctx.debug_level)
    try:
        result = process.run_script(
            script,
            env,
            cwd=os_def.path,
            op="verify",
            args=[C.VERIFY_CHECK_PARAMETERS],
            timeout=ctx.node.timeout("verify"),
            capture=True,
        )
    except E.ScriptFailed as err:
        # tail_block starts with its own "output:" title (Ganeti: "..., output: %s")
        raise E.OSDefinitionError(
            f"OS validation script failed ({err.reason}), "
            + (err.tail_block.lstrip("\n") or "no output"),
            os_name=os_def.name,
        ) from err
    return {"verify_script": script, "checked": True, "duration": round(result.duration, 3)}


def verify_params(ctx: OpContext, instance: Instance) -> dict[str, Any]:
    """``ganeti-vol instance verify-params``."""
    os_def = ctx.load_os(instance.os)
    outcome = validate_os_params(ctx, os_def, instance.os, env_mod.all_osparams(instance))
    return {
        "operation": "verify-params",
        "instance": instance.name,
        "os": instance.os,
        "os_path": os_def.path,
        "status": "ok",
        **outcome,
    }


# --- create / reinstall ------------------------------------------------------------------


def create(
    ctx: OpContext, instance: Instance, *, reinstall: bool = False, post_checks: bool = True
) -> CreateResult:
    """Run the OS ``create`` script (Ganeti ``InstanceOsAdd``).

    With ``post_checks`` (the default) a script that exits 0 but changed the
    size of a disk, or left a loop device on a disk file or a stale partition
    behind, fails the create (:func:`check_disks`; the devices are removed).
    ``os test`` makes these checks itself, after every step.
    """
    os_def = ctx.load_os(instance.os)
    if C.OS_SCRIPT_CREATE not in os_def.scripts:
        raise E.OSDefinitionError(
            f"OS '{os_def.name}' is untrusted (only create_untrusted): it needs a helper VM, "
            "which ganeti-vol does not run"
        )
    validate_os_params(ctx, os_def, instance.os, env_mod.all_osparams(instance))
    started = time.monotonic()
    log_path = process.new_log_file(ctx.node.log_dir, "add", instance.os, instance.name)
    hpath = "instance-reinstall" if reinstall else "instance-add"
    extra = {} if reinstall else {"ADD_MODE": "create"}
    with opstate.operation(ctx.node.state_dir, "reinstall" if reinstall else "create",
                           instance) as op, \
            ctx.hooks.around(hpath, instance, extra, log_path) as hooks:
        created = ensure_file_disks(instance)
        for path in created:
            op.lock_target(path)
        op.begin_writes()
        watch = watch_disks(instance) if post_checks else None
        try:
            with script_devices(ctx, os_def, instance) as seen:
                env = env_mod.create_env(os_def, seen, reinstall=reinstall, debug=ctx.debug_level)
                result = process.run_script(
                    os_def.scripts[C.OS_SCRIPT_CREATE],
                    env,
                    cwd=os_def.path,
                    op="create",
                    log_path=log_path,
                    timeout=ctx.node.timeout("create"),
                )
        except E.GanetiVolError as err:
            if watch is not None:  # a failed create must not leave devices behind either
                for _, message in clear_leftovers(instance, watch):
                    err.add_note(f"the create script also {message}")
            raise
        if watch is not None:
            check_disks(instance, watch, "create")
    return CreateResult(
        reinstall=reinstall, instance=instance.name, os=instance.os, os_path=os_def.path,
        disks_created=tuple(created), log=log_path,
        script_duration=round(result.duration, 3),
        duration=round(time.monotonic() - started, 3), warnings=warnings_of(hooks.warning()),
    )


# --- rename ------------------------------------------------------------------------------


def rename_log(ctx: OpContext, instance: Instance, old_name: str) -> str:
    """Ganeti names rename logs ``rename-<os>-<old>-<new>-<time>.log``."""
    return process.new_log_file(
        ctx.node.log_dir, "rename", instance.os, f"{old_name}-{instance.name}"
    )


def run_rename_script(
    ctx: OpContext, os_def: OSDefinition, instance: Instance, old_name: str, log_path: str
) -> float:
    """Run ``rename`` with ``OLD_INSTANCE_NAME`` (``instance`` carries the new name); the
    script's duration in seconds (rounded to ms)."""
    with script_devices(ctx, os_def, instance) as seen:
        env = env_mod.rename_env(os_def, seen, old_name, ctx.debug_level)
        result = process.run_script(
            os_def.scripts[C.OS_SCRIPT_RENAME],
            env,
            cwd=os_def.path,
            op="rename",
            log_path=log_path,
            timeout=ctx.node.timeout("rename"),
        )
    return round(result.duration, 3)


def rename(ctx: OpContext, instance: Instance, new_name: str) -> RenameResult:
    """Run the OS ``rename`` script (Ganeti ``RunRenameInstance``)."""
    if not fields.HOSTNAME_RE.match(new_name):  # the same rule as the instance file
        raise E.UsageError(f"invalid new instance name '{new_name}'")
    if new_name == instance.name:
        raise E.UsageError(f"instance '{instance.name}' already has that name")
    os_def = ctx.load_os(instance.os)
    renamed = instance.replace(name=new_name)
    log_path = rename_log(ctx, renamed, instance.name)
    with opstate.operation(ctx.node.state_dir, "rename", instance, also=[new_name]) as op, \
            ctx.hooks.around("instance-rename", instance, {"INSTANCE_NEW_NAME": new_name},
                             log_path) as hooks:
        op.begin_writes()
        duration = run_rename_script(ctx, os_def, renamed, instance.name, log_path)
        if instance.source:
            cfgmod.update_instance_file(instance.source, {"name": new_name, "uuid": instance.uuid})
    return RenameResult(
        instance=new_name, old_name=instance.name, os=instance.os,
        instance_file_updated=bool(instance.source), log=log_path, script_duration=duration,
        warnings=warnings_of(hooks.warning()),
    )
