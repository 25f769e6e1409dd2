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
import logging
import os
import socket
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Instance, NodeConfig
from ganeti_vol.ganeti.hookenv import (
    build_env,
    check_phase,
    instance_hook_env,
    read_ssconf,
)
from ganeti_vol.system import process

log = logging.getLogger(__name__)

PHASES = C.HOOKS_PHASES
OP_CODES = C.HOOK_OP_CODES
#: most output kept in a result (the log file has all of it)
OUTPUT_LIMIT = 1 << 20



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


@dataclass
class HookRun:
    """One operation's hooks, as :meth:`OperationHooks.around` yields them.

    ``env`` is the post phase's operation environment: what the block puts in
    it reaches the post hooks as ``GANETI_POST_<key>``.  ``post_failures``
    holds the post hooks that failed, once the block and the post phase are
    done: the operation puts :meth:`warning` in its result.
    """

    env: dict[str, Any] = field(default_factory=dict)
    post_failures: list[HookResult] = field(default_factory=list)

    def warning(self) -> E.PostHookWarning | None:
        """PostHookWarning (exit 11) naming the failed post hooks, or None."""
        return post_warning(self.post_failures) if self.post_failures else None


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
    ) -> Iterator[HookRun]:
        """Pre hooks (a failure raises HookError), the block, then post hooks if it succeeded.

        Yields a :class:`HookRun` whose ``env`` is the post-phase operation
        environment (a copy of the pre one): what the block puts in it reaches
        the post hooks as ``GANETI_POST_<key>`` (Ganeti rebuilds this
        environment after the operation).  Post hook failures are logged and
        recorded (in ``post_failures`` too); they never raise here.
        """
        lu_env = self.lu_env(hpath, instance, extra)
        pre_env = self.env(hpath, C.HOOKS_PHASE_PRE, lu_env)
        failed = [r for r in self.run_phase(hpath, C.HOOKS_PHASE_PRE, pre_env, log_path)
                  if r.failed]
        if failed:
            raise veto_error(hpath, instance.name, failed)
        run = HookRun(dict(lu_env))
        yield run
        post_env = self.env(hpath, C.HOOKS_PHASE_POST, run.env, pre_lu_env=lu_env)
        for r in self.run_phase(hpath, C.HOOKS_PHASE_POST, post_env, log_path):
            if r.failed:
                log.warning("post hook '%s' failed (%s), output: %s", r.hook, r.reason,
                            r.output or "(no output)")
                run.post_failures.append(r)
