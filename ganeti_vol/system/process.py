"""Run OS scripts and hooks: the one place that starts child processes.

plumbum is imported here and nowhere else.  Policy, matching Ganeti's
``RunCmd(reset_env=True)`` and ``StartDaemon``:

- argv lists only, never a shell string; the working directory is the OS dir;
- the environment is *exactly* the dict given: nothing is inherited (plumbum's
  public ``popen`` merges the machine's environment; ours is empty, see
  :func:`_command_class`), and nothing is put on the argv (private OS
  parameters stay out of the process list);
- every child runs in its own session and process group and, where cgroup v2
  can be used, its own cgroup; a timeout, a stall, Ctrl-C or a failure on our
  side stops everything it started (the cgroup, else its group, session and
  descendants, a ``setsid`` child included): SIGTERM, then SIGKILL after
  :data:`~ganeti_vol.core.constants.KILL_GRACE` seconds.  A child dies with us
  (``PR_SET_PDEATHSIG``), even if we are killed with SIGKILL;
- stderr (and stdout, unless it carries data) goes to a per-operation log
  file named like Ganeti's; a failure quotes its last 20 lines.

The process trees and cgroups of the children are in
:mod:`ganeti_vol.system.proctree`, their log files in
:mod:`ganeti_vol.system.scriptlog`; the names of those that ``ops/``,
``cli/`` and ``ganeti/`` use are importable from here too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.core import signals
from ganeti_vol.core.fdio import enlarge_pipe
from ganeti_vol.core.model import RunResult
from ganeti_vol.system.proctree import (
    Cgroup,
    child_setup,
    cleanup_cgroups as cleanup_cgroups,  # the names ops/ and cli/ use through process
    descendants,
    reap_orphans as reap_orphans,
)
from ganeti_vol.system.scriptlog import (
    append_log as append_log,  # the names ops/ and ganeti/ use through process
    exit_reason as exit_reason,
    failure_tail,
    new_log_file as new_log_file,
    open_log,
    record_watched,
    tail_lines,
    watched_stdout,
)

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _command_class() -> Any:
    """plumbum's ``LocalCommand`` bound to a machine whose base environment is empty.

    plumbum's public ``popen(env=...)`` merges the given dict over the
    machine's environment; ours is a plumbum ``LocalEnv`` emptied once at
    creation (and never changed: safe from any thread), so a child sees
    exactly the dict it is given.  Built on first use: importing plumbum costs
    ~80 ms, which a raw export without hooks never needs to pay.
    """
    from plumbum.machines.local import LocalCommand, LocalEnv, LocalMachine

    class _CleanMachine(LocalMachine):
        env = LocalEnv()

    _CleanMachine.env.clear()
    clean = _CleanMachine()

    class _CleanCommand(LocalCommand):
        __slots__ = ()

        @property
        def machine(self) -> LocalMachine:
            return clean

    return _CleanCommand


def _record(proc: ScriptProcess, stdout_path: str | None) -> None:
    proc.stdout_path = stdout_path
    record_watched(proc.op, proc.argv, proc.pid, stdout_path)


class ScriptProcess:
    """A running child in its own process group, with timeout and group kill."""

    def __init__(self, popen: Any, argv: Sequence[str], op: str, log_path: str | None,
                 timeout: float | None, kill_grace: float = C.KILL_GRACE,
                 cgroup: Cgroup | None = None) -> None:
        self._popen = popen
        self.cgroup = cgroup
        self.argv = tuple(argv)
        self.op = op
        self.log_path = log_path
        self.timeout = timeout
        #: seconds between TERM and KILL when the group is stopped
        self.kill_grace = kill_grace
        self.started = time.monotonic()
        self.timed_out = False
        self.killed = False
        #: where its stdout went when kept apart from the log (see watch), else None
        self.stdout_path: str | None = None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        if timeout:
            self._timer = threading.Timer(timeout, self._on_timeout)
            self._timer.daemon = True
            self._timer.start()

    @property
    def pid(self) -> int:
        return int(self._popen.pid)

    @property
    def returncode(self) -> int | None:
        code: int | None = self._popen.returncode
        return code

    def poll(self) -> int | None:
        code: int | None = self._popen.poll()
        return code

    def _on_timeout(self) -> None:
        self.timed_out = True
        log.warning("%s script '%s' timed out after %gs; stopping it", self.op, self.argv[0],
                    self.timeout or 0)
        self.kill()

    def kill(self, grace: float | None = None) -> None:
        """SIGTERM the script and everything it started, SIGKILL them after ``grace``
        seconds (default: :attr:`kill_grace`).

        "Everything" is the script's cgroup where cgroup v2 can be used, else its
        process group, its session and all its descendants (a ``setsid`` child
        included); see :meth:`members`.
        """
        with self._lock:
            self.killed = True
            self._signal_all(signal.SIGTERM)
            deadline = time.monotonic() + (self.kill_grace if grace is None else grace)
            while time.monotonic() < deadline:
                if self._popen.poll() is not None and not self._group_alive():
                    return
                time.sleep(0.02)
            self._signal_all(signal.SIGKILL)

    def members(self) -> list[int]:
        """The live processes of this script: its cgroup, or its group, session and tree."""
        found = set(descendants(self.pid, alive=self._popen.returncode is None))
        if self.cgroup is not None:
            found.update(self.cgroup.members())
        return sorted(found)

    def _group_alive(self) -> bool:
        """True while a non-zombie process of the script remains.

        ``killpg(pgid, 0)`` also succeeds for zombies, and orphaned zombies
        may wait a while for init to reap them, so look at /proc instead.
        """
        return bool(self.members())

    def _signal_all(self, signum: int) -> None:
        if signum == signal.SIGKILL and self.cgroup is not None:
            self.cgroup.kill()
        for pid in self.members():
            try:
                os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass
        self._signal_group(signum)

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def _release_cgroup(self) -> None:
        """Remove the script's cgroup once it is empty (leftovers of a success keep it)."""
        if self.cgroup is not None and not self.cgroup.members() and self.cgroup.remove():
            self.cgroup = None

    def wait(self) -> int:
        """Wait for the child (the timer enforces the timeout); reaps it."""
        rc = self._popen.wait()
        self.cancel_timer()
        if self.killed or self.timed_out:
            with self._lock:  # let a kill() running in the timer thread finish
                pass
            self._signal_all(signal.SIGKILL)
            self._wait_gone(self.kill_grace)
        self._release_cgroup()
        return int(rc)

    def _wait_gone(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.02)

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def stop(self) -> None:
        """Kill and reap: used on every failure path; never raises."""
        self.cancel_timer()
        try:
            if self._popen.poll() is None or self._group_alive():
                self.kill()
            self._popen.wait()
            self._wait_gone(self.kill_grace)
            self._release_cgroup()
        except Exception:  # cleanup must not mask the original error
            log.exception("cannot stop %s script '%s'", self.op, self.argv[0])

    def duration(self) -> float:
        return time.monotonic() - self.started

    def check(self, rc: int, output: str | None = None) -> RunResult:
        """Raise ScriptTimeout/ScriptFailed for a bad exit, else return the RunResult.

        On failure, whatever the script left running in its process group is
        stopped too.
        """
        if self.timed_out or rc != 0:
            self._signal_all(signal.SIGTERM)
            time.sleep(0.05 if self._group_alive() else 0)
            self._signal_all(signal.SIGKILL)
            self._release_cgroup()
        if self.timed_out:
            raise E.ScriptTimeout(
                op=self.op,
                script=self.argv[0],
                timeout=self.timeout or 0,
                log_path=self.log_path,
                tail_block=failure_tail(self.log_path, output, self.stdout_path),
            )
        if rc != 0:
            raise E.ScriptFailed(
                op=self.op,
                script=self.argv[0],
                reason=exit_reason(rc),
                returncode=rc,
                signal=-rc if rc < 0 else None,
                log_path=self.log_path,
                log_tail=tail_lines(self.log_path) if output is None else output.splitlines(),
                tail_block=failure_tail(self.log_path, output, self.stdout_path),
            )
        return RunResult(self.argv, rc, self.duration(), self.log_path, output or "")


def spawn(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    cwd: str,
    op: str,
    stdin: Any,
    stdout: Any,
    stderr: Any,
    log_path: str | None = None,
    timeout: float | None = None,
    pass_fds: Sequence[int] = (),
    kill_grace: float = C.KILL_GRACE,
) -> ScriptProcess:
    """Start ``argv`` with exactly ``env`` in its own process group."""
    script = argv[0]
    group = Cgroup.create()
    try:
        command = _command_class()(script)
        popen = command.popen(
            list(argv[1:]),
            cwd=cwd,
            env=dict(env),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            new_session=True,
            pass_fds=tuple(pass_fds),
            preexec_fn=child_setup(group),
        )
    except OSError as err:
        if group is not None:
            group.remove()
        raise E.ScriptError(
            f"cannot run OS {op} script '{script}': {err.strerror or err}"
            + (" (is the #! line missing?)" if err.errno == errno.ENOEXEC else ""),
            op=op,
            script=script,
        ) from err
    except BaseException:
        if group is not None:
            group.remove()
        raise
    try:
        if group is not None:
            group.close_enter_fd()
        return ScriptProcess(popen, argv, op, log_path, timeout, kill_grace, group)
    except BaseException:  # e.g. Ctrl-C right after the start: the child must not outlive it
        ScriptProcess(popen, argv, op, log_path, None, 0.0, group).stop()
        raise


def run_collect(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    cwd: str,
    op: str,
    log_path: str | None = None,
    timeout: float | None = None,
    capture: bool = False,
    capture_limit: int | None = None,
    kill_grace: float = C.KILL_GRACE,
) -> tuple[ScriptProcess, int, str | None]:
    """Run ``argv`` to completion with stdin from /dev/null; judge nothing.

    stdout and stderr go to ``log_path`` (appended; a file, never a pipe, so
    a child that floods output cannot block).  With ``capture`` what the
    child wrote is also returned (at most the last ``capture_limit`` bytes),
    read back from the log (or from a temporary file without a log).
    Returns ``(process, returncode, output)``; the process has ``timed_out``
    set if the timer stopped it.  Raises ScriptError only if the child
    cannot be started (e.g. ENOEXEC); on any exception while waiting
    (Ctrl-C) the child's process group is killed and reaped first.
    """
    tmp = None
    if capture and log_path is None:
        tmp = tempfile.NamedTemporaryFile(prefix="ganeti-vol-out-", delete=False)
        tmp.close()
        log_path = tmp.name
    try:
        out_fd = open_log(log_path)
        start_offset = os.lseek(out_fd, 0, os.SEEK_END)
        fds = [out_fd]
        proc = None
        try:
            try:
                stdout_fd, stdout_path = watched_stdout(op, out_fd)
                fds.append(stdout_fd)
                null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                fds.append(null)
                with signals.held():
                    proc = spawn(
                        argv, env, cwd=cwd, op=op, stdin=null, stdout=stdout_fd,
                        stderr=out_fd, log_path=None if tmp else log_path, timeout=timeout,
                        kill_grace=kill_grace,
                    )
                    _record(proc, stdout_path)
            finally:
                for fd in dict.fromkeys(fds):
                    os.close(fd)
            rc = proc.wait()
        except BaseException:  # Ctrl-C while starting or waiting: stop it first
            if proc is not None:
                proc.stop()
            raise
        output = None
        if capture and log_path:
            with open(log_path, "rb") as f:
                end = f.seek(0, os.SEEK_END)
                if capture_limit is not None:
                    start_offset = max(start_offset, end - capture_limit)
                f.seek(start_offset)
                output = f.read().decode("utf-8", errors="replace")
    finally:
        if tmp is not None:
            os.unlink(tmp.name)
    return proc, rc, output


def run_script(
    script: str,
    env: Mapping[str, str],
    *,
    cwd: str,
    op: str,
    args: Sequence[str] = (),
    log_path: str | None = None,
    timeout: float | None = None,
    capture: bool = False,
) -> RunResult:
    """Run a script to completion with stdin from /dev/null.

    stdout and stderr go to ``log_path`` (appended).  With ``capture`` the
    output is also returned (and quoted on failure) — Ganeti does that for
    ``verify``.  Raises ScriptFailed / ScriptTimeout / ScriptError.
    """
    proc, rc, output = run_collect(
        [script, *args], env, cwd=cwd, op=op, log_path=log_path, timeout=timeout,
        capture=capture,
    )
    return proc.check(rc, output)


@dataclass(frozen=True)
class ToolResult:
    """What a system tool (lvm, zfs, btrfs) did: its exit code and its output, apart."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False


def run_tool(argv: Sequence[str], env: Mapping[str, str], *, timeout: float | None,
             cwd: str = "/") -> ToolResult:
    """Run a system tool to completion, as every child is run (its own process group, killed
    with us, on Ctrl-C and at the timeout); stdin /dev/null, stdout and stderr captured apart.

    A tool that is not installed raises FileNotFoundError; it judges nothing else.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        proc = None
        try:
            try:
                with signals.held():
                    proc = spawn(argv, env, cwd=cwd, op=os.path.basename(argv[0]), stdin=null,
                                 stdout=out.fileno(), stderr=err.fileno(), timeout=timeout)
            except E.ScriptError as error:
                if isinstance(error.__cause__, FileNotFoundError):
                    raise error.__cause__ from None
                raise
            finally:
                os.close(null)
            rc = proc.wait()
        except BaseException:  # Ctrl-C while waiting: stop it first
            if proc is not None:
                proc.stop()
            raise
        out.seek(0)
        err.seek(0)
        return ToolResult(tuple(argv), rc, out.read().decode("utf-8", errors="replace"),
                          err.read().decode("utf-8", errors="replace"), proc.timed_out)


class ScriptStream:
    """Our end of a streaming script (see :func:`open_script_stream`)."""

    def __init__(self, proc: ScriptProcess, fd: int, size_fd: int | None) -> None:
        self.proc = proc
        self.fd = fd
        self._size_fd = size_fd
        self._size_buf = b""
        self._size: int | None = None

    def size_hint(self) -> int | None:
        """Bytes the export script announced on ``EXP_SIZE_FD`` (None until it did)."""
        if self._size is None and self._size_fd is not None:
            self._read_size()
        return self._size

    def _read_size(self) -> None:
        assert self._size_fd is not None
        eof = False
        while len(self._size_buf) <= 4096:
            try:
                data = os.read(self._size_fd, 4096)
            except OSError:  # EAGAIN: nothing more yet
                break
            if not data:
                eof = True
                break
            self._size_buf += data
        if b"\n" not in self._size_buf and not eof and len(self._size_buf) <= 4096:
            return  # the line is not complete yet
        line = self._size_buf.split(b"\n", 1)[0].strip()
        self._size_fd_close()
        if not line:
            return
        try:
            value = int(line)
            if value < 0:
                raise ValueError(value)
        except ValueError:
            log.warning(
                "ignoring invalid size %r announced on EXP_SIZE_FD by '%s'",
                line[:64].decode("ascii", "replace"), self.proc.argv[0],
            )
            return
        self._size = value

    def _size_fd_close(self) -> None:
        if self._size_fd is not None:
            os.close(self._size_fd)
            self._size_fd = None

    def close_our_end(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1

    def kill(self) -> None:
        self.proc.kill()

    def poll(self) -> int | None:
        return self.proc.poll()

    def exit_status(self, timeout: float) -> int | None:
        """The script's exit status if it ends within ``timeout`` seconds, else None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                return rc
            time.sleep(0.01)
        return self.proc.poll()

    def raise_if_failed(self, timeout: float = 2.0) -> None:
        """Raise the script's own ScriptFailed if it has failed (or fails within ``timeout``).

        Used when our side saw a symptom (an empty or short dump): the
        script's exit status and log tail are the better first cause.
        """
        rc = self.exit_status(timeout)
        if rc not in (None, 0):
            self.proc.check(rc)

    def recent_output(self, lines: int = C.LOG_TAIL_LINES) -> list[str]:
        return tail_lines(self.proc.log_path, lines)


@contextlib.contextmanager
def open_script_stream(
    script: str,
    env: Mapping[str, str],
    *,
    cwd: str,
    op: str,
    log_path: str | None,
    direction: str,
    timeout: float | None = None,
    size_fd: bool = False,
    args: Sequence[str] = (),
) -> Iterator[ScriptStream]:
    """Run a script whose stdout (``direction="read"``) or stdin (``"write"``) is ours.

    The pipe is enlarged to 1 MiB.  With ``size_fd`` the script gets
    ``EXP_SIZE_FD`` (an fd number > 9, as under Ganeti's daemon).  On a clean
    exit from the ``with`` block our end is closed, the script is waited for,
    and ScriptFailed/ScriptTimeout is raised if it failed.  If the block
    raises, the script's process group is killed and reaped first, and the
    block's exception propagates unchanged.
    """
    if direction not in ("read", "write"):
        raise E.ProgrammerError(f"direction must be read or write, not {direction!r}")
    env = dict(env)
    rpipe, wpipe = os.pipe()
    enlarge_pipe(rpipe)
    ours, theirs_fd = (rpipe, wpipe) if direction == "read" else (wpipe, rpipe)
    theirs: int | None = theirs_fd
    size_r = size_w = None
    pass_fds: list[int] = []
    log_fd = open_log(log_path)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    proc = None
    try:
        if size_fd:
            size_r, low_w = os.pipe()
            size_w = fcntl.fcntl(low_w, fcntl.F_DUPFD_CLOEXEC, C.EXP_SIZE_FD_NUMBER)
            os.close(low_w)
            os.set_blocking(size_r, False)
            env["EXP_SIZE_FD"] = str(size_w)
            pass_fds.append(size_w)
        stdout_path = None
        if direction == "read":
            stdin, stdout = null, theirs_fd
        else:
            stdin, (stdout, stdout_path) = theirs_fd, watched_stdout(op, log_fd)
        try:
            with signals.held():
                proc = spawn(
                    [script, *args], env, cwd=cwd, op=op, stdin=stdin, stdout=stdout,
                    stderr=log_fd, log_path=log_path, timeout=timeout, pass_fds=pass_fds,
                )
                _record(proc, stdout_path)
        finally:
            if stdout not in (theirs_fd, log_fd):
                os.close(stdout)
        os.close(theirs_fd)
        theirs = None
        if size_w is not None:
            os.close(size_w)
            size_w = None
        stream = ScriptStream(proc, ours, size_r)
    except BaseException:  # Ctrl-C while starting too: the child must not outlive it
        if proc is not None:
            proc.stop()
        for fd in (ours, theirs, size_r, size_w):
            if fd is not None:
                os.close(fd)
        raise
    finally:
        os.close(null)
        os.close(log_fd)
    try:
        yield stream
    except BaseException:
        stream.close_our_end()
        proc.stop()
        stream._size_fd_close()
        raise
    stream.close_our_end()
    try:
        rc = proc.wait()
    except BaseException:
        proc.stop()
        stream._size_fd_close()
        raise
    try:
        stream.size_hint()
    finally:
        stream._size_fd_close()
    proc.check(rc)
