"""Ganeti's hooks around every operation: run-parts semantics, environment, veto.

What Ganeti does (``HooksRunner.RunHooks``, ``utils.RunParts``,
``HooksMaster._BuildEnv``/``_RunWrapper``, ``mcpu._ExecLU``; see
doc/hooks.md and ``../shared/reference/ganeti-contract.md`` §5):

- hooks live in ``<hooks_dir>/<hpath>-<phase>.d/``; a missing directory means
  no hooks; dot-files are invisible; entries run in sorted order, and only
  if the name matches ``^[a-zA-Z0-9_-]+$`` and the entry is an executable
  regular file (symlinks followed); every other entry is *skipped*;
- every hook gets exactly the environment built here (PATH, the fixed
  ``GANETI_*`` variables, the standard instance variables and the
  operation's own, prefixed ``GANETI_`` in pre and, in post, also
  ``GANETI_POST_``); stdin is /dev/null and the working directory ``/``;
- a failing pre hook vetoes the operation (:class:`~ganeti_vol.core.errors.HookError`);
  post hooks run only after success and their failures are warnings.

Where ganeti-vol departs from Ganeti (all documented in doc/hooks.md): each
hook has a timeout (node config ``timeouts.hook``) after which its process
group gets TERM and then KILL; output (stdout and stderr interleaved) is
appended to the operation's log file as well as kept in the result.

This module never prints; it logs, and returns :class:`HookResult` lists.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import logging
import os
import re
import shlex
import socket
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ganeti_vol.core import atomicfile
from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Disk, Instance, NodeConfig, disk_template
from ganeti_vol.ganeti import environment as env_mod
from ganeti_vol.ganeti import params as ganeti_params
from ganeti_vol.system import process

log = logging.getLogger(__name__)

PHASES = C.HOOKS_PHASES
OP_CODES = C.HOOK_OP_CODES
#: Ganeti's HTYPE for all of them
OBJECT_TYPE = "INSTANCE"

#: most output kept in a result (the log file has all of it)
OUTPUT_LIMIT = 1 << 20

_KEY_RE = re.compile(r"^[A-Za-z0-9_]+$")
_PHASE_PREFIX = {C.HOOKS_PHASE_PRE: "GANETI_", C.HOOKS_PHASE_POST: "GANETI_POST_"}


class HookStatus(enum.IntEnum):
    """The outcome of one entry; the values are Ganeti's ``HKR_*``."""

    SKIPPED = 0
    FAILED = 1
    SUCCEEDED = 2


@dataclass(frozen=True)
class HookEntry:
    """One visible entry of a hooks directory, and whether it would run."""

    hook: str  # "<hpath>-<phase>.d/<name>", Ganeti's relative name
    path: str
    runnable: bool
    reason: str = ""  # why it is skipped ("" if it runs)


@dataclass(frozen=True)
class HookResult:
    """What happened to one entry (Ganeti's ``(relname, HKR_*, output)`` tuple, and more)."""

    hook: str
    path: str
    status: HookStatus
    output: str = ""  # stdout+stderr, stripped (the last OUTPUT_LIMIT bytes)
    reason: str = ""  # skip reason, or why it failed ("exited with exit code 1", ...)
    duration: float = 0.0
    returncode: int | None = None
    timed_out: bool = False

    @property
    def failed(self) -> bool:
        return self.status is HookStatus.FAILED

    def to_json(self) -> dict[str, Any]:
        return {
            "hook": self.hook,
            "path": self.path,
            "status": self.status.name.lower(),
            "reason": self.reason,
            "output": self.output,
            "duration": round(self.duration, 3),
            "returncode": self.returncode,
            "timed_out": self.timed_out,
        }


# --- directories -----------------------------------------------------------------------


def check_phase(phase: str) -> None:
    if phase not in PHASES:
        raise E.ProgrammerError(f"Unknown hooks phase '{phase}'")


def phase_dir_name(hpath: str, phase: str) -> str:
    check_phase(phase)
    return f"{hpath}-{phase}.d"


def skip_reason(path: str, name: str) -> str:
    """Why Ganeti's RunParts would not run ``path`` ("" if it would)."""
    if not C.EXT_PLUGIN_MASK.match(name):
        return (f"name does not match {C.EXT_PLUGIN_MASK.pattern} "
                "(Ganeti runs no names with dots, such as '.sh')")
    try:
        st = os.stat(path)  # follows symlinks, as Ganeti's os.path.isfile
    except FileNotFoundError:
        return "broken symbolic link"
    except OSError as err:
        return f"cannot stat: {err.strerror}"
    if stat.S_ISDIR(st.st_mode):
        return "a directory, not a regular file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if not os.access(path, os.X_OK):
        return "not executable"
    return ""


def scan(hooks_dir: str, hpath: str, phase: str) -> list[HookEntry]:
    """The visible entries of ``<hooks_dir>/<hpath>-<phase>.d`` in run order ([] if missing)."""
    dname = phase_dir_name(hpath, phase)
    dpath = os.path.join(hooks_dir, dname)
    try:
        names = os.listdir(dpath)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as err:
        raise E.ConfigError(f"cannot read hooks directory '{dpath}': {err.strerror}") from err
    entries = []
    for name in sorted(n for n in names if not n.startswith(".")):
        path = os.path.join(dpath, name)
        reason = skip_reason(path, name)
        entries.append(HookEntry(f"{dname}/{name}", path, not reason, reason))
    return entries


def hook_paths_present(hooks_dir: str) -> list[str]:
    """Every ``hpath`` with a ``-pre.d`` or ``-post.d`` directory in ``hooks_dir``, sorted."""
    try:
        names = os.listdir(hooks_dir)
    except OSError:
        return []
    found = set()
    for name in names:
        for phase in PHASES:
            suffix = f"-{phase}.d"
            if name.endswith(suffix) and os.path.isdir(os.path.join(hooks_dir, name)):
                found.add(name[: -len(suffix)])
    return sorted(found)


# --- running -------------------------------------------------------------------------------


def run_one(
    entry: HookEntry,
    env: Mapping[str, str],
    *,
    log_path: str | None = None,
    timeout: float | None = None,
    kill_grace: float = C.KILL_GRACE,
) -> HookResult:
    """Run one runnable entry to completion; never raises for the hook's own failure."""
    process.append_log(log_path, f"=== hook {entry.hook}: started")
    started = time.monotonic()
    try:
        proc, rc, output = process.run_collect(
            [entry.path], env, cwd="/", op="hook", log_path=log_path, timeout=timeout,
            capture=True, capture_limit=OUTPUT_LIMIT, kill_grace=kill_grace,
        )
    except E.ScriptError as err:  # could not even start it (ENOEXEC, ...)
        cause = err.__cause__
        detail = (cause.strerror if isinstance(cause, OSError) and cause.strerror else str(err))
        reason = f"Hook script execution error: {detail}"
        process.append_log(log_path, f"=== hook {entry.hook}: {reason}")
        return HookResult(entry.hook, entry.path, HookStatus.FAILED, reason, reason,
                          time.monotonic() - started)
    duration = time.monotonic() - started
    text = (output or "").strip()
    if proc.timed_out:
        reason = f"timed out after {timeout:g}s and was killed"
    elif rc != 0:
        reason = process.exit_reason(rc)
    else:
        reason = ""
    process.append_log(log_path,
                       f"=== hook {entry.hook}: {reason or 'succeeded'} ({duration:.2f}s)")
    status = HookStatus.FAILED if reason else HookStatus.SUCCEEDED
    return HookResult(entry.hook, entry.path, status, text, reason, duration, rc, proc.timed_out)


def run_hooks(
    hooks_dir: str,
    hpath: str,
    phase: str,
    env: Mapping[str, str],
    *,
    log_path: str | None = None,
    timeout: float | None = None,
    kill_grace: float = C.KILL_GRACE,
) -> list[HookResult]:
    """Ganeti ``RunParts``: one result per visible entry, in order; every runnable one runs."""
    results = []
    for entry in scan(hooks_dir, hpath, phase):
        if not entry.runnable:
            log.debug("skipping hook '%s': %s", entry.hook, entry.reason)
            results.append(HookResult(entry.hook, entry.path, HookStatus.SKIPPED,
                                      reason=entry.reason))
            continue
        log.info("running %s hook '%s'", phase, entry.hook)
        results.append(run_one(entry, env, log_path=log_path, timeout=timeout,
                               kill_grace=kill_grace))
    return results


# --- environment ---------------------------------------------------------------------------


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
        "INSTANCE_NAME": instance.name,
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
        env.update(env_mod.network_env(p, nic.network))
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
    if hpath not in OP_CODES:
        raise E.ProgrammerError(f"unknown hook path '{hpath}' (known: {', '.join(OP_CODES)})")
    env = {
        "PATH": C.SCRIPT_PATH,
        "GANETI_HOOKS_VERSION": C.HOOKS_VERSION,
        "GANETI_OP_CODE": OP_CODES[hpath],
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
    return env_mod.checked({k: str(v) for k, v in env.items()})


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


# --- around an operation ---------------------------------------------------------------------


def _output_block(result: HookResult) -> str:
    if not result.output:
        return "\n(no output)"
    lines = result.output.splitlines()[-C.LOG_TAIL_LINES:]
    return E.indent_block(f"output of {result.hook}:", lines)


def veto_error(hpath: str, instance_name: str, failed: Sequence[HookResult]) -> E.HookError:
    """HookError naming every failed pre hook, with the last lines of its output."""
    first = failed[0]
    names = ", ".join(f"'{r.hook}' ({r.reason})" for r in failed)
    blocks = "".join(_output_block(r) for r in failed)
    plural = "s" if len(failed) > 1 else ""
    return E.HookError(
        f"{hpath} of instance '{instance_name}' vetoed by pre hook{plural} {names}{blocks}",
        hook=first.hook, reason=first.reason, output_block=blocks, hpath=hpath,
        instance=instance_name, results=list(failed),
    )


def post_warning(failed: Sequence[HookResult], *, ran_operation: bool = True
                 ) -> E.PostHookWarning:
    """PostHookWarning (exit 11) naming the failed post hooks."""
    names = ", ".join(f"'{r.hook}' ({r.reason})" for r in failed)
    if ran_operation:
        return E.PostHookWarning(hooks=names, results=list(failed))
    return E.PostHookWarning(f"post hook(s) failed: {names}", hooks=names, results=list(failed))


class OperationHooks:
    """Runs the node's hooks around operations (see :class:`ganeti_vol.ops.operations.Hooks`).

    ``results`` collects every hook result of every operation run with this
    object; ``post_failures`` the failed post hooks among them, which the
    CLI turns into exit code 11 once the operation's result is printed
    (:meth:`raise_post_failures`).
    """

    def __init__(
        self,
        node: NodeConfig,
        *,
        node_name: str | None = None,
        cluster: str | None = None,
        master: str | None = None,
        ssconf_dir: str = C.GANETI_DATA_DIR,
        kill_grace: float = C.KILL_GRACE,
    ) -> None:
        self.node = node
        self.node_name = node_name or socket.gethostname()
        # on a Ganeti node the ssconf files name the cluster and its master
        self.cluster = cluster or read_ssconf(ssconf_dir, "cluster_name") or self.node_name
        self.master = master or read_ssconf(ssconf_dir, "master_node") or self.node_name
        self.kill_grace = kill_grace
        self.results: list[HookResult] = []

    @property
    def post_failures(self) -> list[HookResult]:
        return [r for r in self.results if r.failed and "-post.d/" in r.hook]

    def raise_post_failures(self) -> None:
        """Raise PostHookWarning if any post hook failed (call after reporting the result)."""
        failed = self.post_failures
        if failed:
            raise post_warning(failed)

    def lu_env(self, hpath: str, instance: Instance, extra: Mapping[str, Any]) -> dict[str, Any]:
        """The operation's environment without prefix: instance variables + ``extra``."""
        env: dict[str, Any] = instance_hook_env(hpath, instance, self.node_name)
        clash = sorted(set(env) & set(extra))
        if clash:
            raise E.ProgrammerError(
                f"extra hook variable(s) of '{hpath}' redefine instance ones: {', '.join(clash)}"
            )
        env.update(extra)
        return env

    def env(self, hpath: str, phase: str, lu_env: Mapping[str, Any],
            pre_lu_env: Mapping[str, Any] | None = None) -> dict[str, str]:
        return build_env(hpath, phase, lu_env, pre_lu_env=pre_lu_env, cluster=self.cluster,
                         master=self.master)

    def run_phase(self, hpath: str, phase: str, env: Mapping[str, str],
                  log_path: str | None) -> list[HookResult]:
        """Run one phase's hooks with ``env``; results are recorded and returned."""
        results = run_hooks(
            self.node.hooks_dir, hpath, phase, env, log_path=log_path,
            timeout=self.node.timeout("hook"), kill_grace=self.kill_grace,
        )
        self.results.extend(results)
        return results

    @contextlib.contextmanager
    def around(
        self, hpath: str, instance: Instance, extra: Mapping[str, Any], log_path: str | None
    ) -> Iterator[dict[str, Any]]:
        """Pre hooks (a failure raises HookError), the block, then post hooks if it succeeded.

        Yields the post-phase operation environment (a copy of the pre one):
        what the block puts in it reaches the post hooks as ``GANETI_POST_<key>``
        (Ganeti rebuilds this environment after the operation).  Post hook
        failures are logged and recorded; they never raise here.
        """
        lu_env = self.lu_env(hpath, instance, extra)
        pre_env = self.env(hpath, C.HOOKS_PHASE_PRE, lu_env)
        failed = [r for r in self.run_phase(hpath, C.HOOKS_PHASE_PRE, pre_env, log_path)
                  if r.failed]
        if failed:
            raise veto_error(hpath, instance.name, failed)
        post_lu_env = dict(lu_env)
        yield post_lu_env
        post_env = self.env(hpath, C.HOOKS_PHASE_POST, post_lu_env, pre_lu_env=lu_env)
        for r in self.run_phase(hpath, C.HOOKS_PHASE_POST, post_env, log_path):
            if r.failed:
                log.warning("post hook '%s' failed (%s), output: %s", r.hook, r.reason,
                            r.output or "(no output)")


# --- installing the shipped hooks ----------------------------------------------------------

#: records what `hooks install` wrote (invisible to run-parts: a dot-file)
MANIFEST = ".ganeti-vol-hooks.json"
#: helper sourced by the shipped hooks, and their settings (operator-owned)
HELPER = "ganeti-vol-hooks.sh"
SETTINGS = "ganeti-vol-hooks.conf"


@dataclass(frozen=True)
class InstallAction:
    """What ``hooks install`` did (or would do) with one file."""

    file: str  # relative to the target, e.g. "instance-add-pre.d/ganeti-vol-verify-params"
    action: str  # installed | updated | unchanged | kept | skipped
    detail: str = ""

    def to_json(self) -> dict[str, str]:
        return {"file": self.file, "action": self.action, "detail": self.detail}


def shipped_files(source: str) -> list[str]:
    """The files to install from ``source``: the helper and every ``*.d/<name>`` hook."""
    out = []
    if os.path.isfile(os.path.join(source, HELPER)):
        out.append(HELPER)
    for hpath in hook_paths_present(source):
        for phase in PHASES:
            out.extend(e.hook for e in scan(source, hpath, phase) if e.runnable)
    return out


def _digest(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def _read_manifest(target: str) -> dict[str, str]:
    try:
        with open(os.path.join(target, MANIFEST), encoding="utf-8") as f:
            data = json.load(f)
        files = data.get("files", {})
        return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


def _write_atomic(path: str, data: bytes, mode: int) -> None:
    """Write ``path`` atomically (:func:`ganeti_vol.core.atomicfile.replace`)."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    atomicfile.replace(path, data, mode)


def settings_text(template: str, values: Mapping[str, str]) -> str:
    """The settings file: the shipped template with ``KEY=`` lines set to ``values``."""
    lines = []
    for line in template.splitlines():
        key = line.split("=", 1)[0].lstrip("# ").strip()
        if "=" in line and key in values:
            line = f"{key}={shlex.quote(values[key])}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def install(
    source: str, target: str, settings: Mapping[str, str], *, dry_run: bool = False
) -> list[InstallAction]:
    """Install the shipped hooks from ``source`` into the hooks dir ``target``.

    Idempotent.  A file is replaced only if ganeti-vol installed it and it is
    unchanged since (the manifest records its hash); any other existing file
    of the same name is *foreign* and skipped.  An identical file is adopted.
    The settings file is written only if absent.  Disabled hooks (made
    non-executable by the operator) stay disabled.
    """
    if os.path.realpath(source) == os.path.realpath(target):
        raise E.UsageError(f"cannot install hooks into '{target}': it is the shipped directory")
    manifest = _read_manifest(target)
    before = dict(manifest)
    actions = []
    for rel in shipped_files(source):
        actions.append(_install_one(source, target, rel, manifest, dry_run))
    actions.append(_install_settings(source, target, settings, dry_run))
    if not dry_run and manifest != before:
        try:
            _write_atomic(os.path.join(target, MANIFEST),
                          (json.dumps({"format": 1, "files": manifest}, indent=1,
                                      sort_keys=True) + "\n").encode(), 0o644)
        except OSError as err:
            raise _install_error(target, MANIFEST, err) from err
    return actions


def _install_error(target: str, rel: str, err: OSError) -> E.GanetiVolError:
    return E.GanetiVolError(f"cannot install '{rel}' into hooks directory '{target}': "
                            f"{err.strerror or err}")


def _install_one(source: str, target: str, rel: str, manifest: dict[str, str],
                 dry_run: bool) -> InstallAction:
    src, dst = os.path.join(source, rel), os.path.join(target, rel)
    with open(src, "rb") as f:
        data = f.read()
    new = hashlib.sha256(data).hexdigest()
    mode = 0o755
    if os.path.lexists(dst):
        if os.path.islink(dst) or not os.path.isfile(dst):
            return InstallAction(rel, "skipped", "foreign: not a regular file; left alone")
        current = _digest(dst)
        if current == new:
            manifest[rel] = new
            disabled = "" if os.access(dst, os.X_OK) else " (disabled: not executable)"
            return InstallAction(rel, "unchanged", "up to date" + disabled)
        if manifest.get(rel) != current:
            return InstallAction(rel, "skipped", "foreign: not installed by ganeti-vol, or "
                                 "changed since; left alone (remove or rename it to install ours)")
        mode = stat.S_IMODE(os.stat(dst).st_mode)  # keeps a hook the operator disabled disabled
        action = "updated"
    else:
        action = "installed"
    if not dry_run:
        try:
            _write_atomic(dst, data, mode)
        except OSError as err:
            raise _install_error(target, rel, err) from err
        manifest[rel] = new
    return InstallAction(rel, action)


def _install_settings(source: str, target: str, settings: Mapping[str, str],
                      dry_run: bool) -> InstallAction:
    dst = os.path.join(target, SETTINGS)
    if os.path.lexists(dst):
        return InstallAction(SETTINGS, "kept", "the operator's settings are never overwritten")
    try:
        with open(os.path.join(source, SETTINGS), encoding="utf-8") as f:
            template = f.read()
    except OSError:
        template = ""
    if not dry_run:
        try:
            _write_atomic(dst, settings_text(template, settings).encode(), 0o644)
        except OSError as err:
            raise _install_error(target, SETTINGS, err) from err
    return InstallAction(SETTINGS, "installed")
