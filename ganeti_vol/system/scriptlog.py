"""Where a script's output goes: per-operation log files, their tails in errors, the os test watch.

stderr (and stdout, unless it carries data) of every child goes to a log file
named like Ganeti's; a failure quotes its last lines (:func:`failure_tail`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ganeti_vol.core import atomicfile
from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E

log = logging.getLogger(__name__)


def log_file_name(
    kind: str, os_name: str, instance: str, component: str | None = None, when: float | None = None
) -> str:
    """``<kind>-<os>-<instance>[-<component>]-<YYYY-MM-DD_HH_MM_SS>.log`` (Ganeti ``_InstanceLogName``)."""
    if component and "/" in component:
        raise E.ProgrammerError(f"log component must not contain '/': {component!r}")
    stamp = time.strftime("%Y-%m-%d_%H_%M_%S", time.localtime(when))
    comp = f"-{component}" if component else ""
    return f"{kind}-{os_name}-{instance}{comp}-{stamp}.log"


def new_log_file(
    log_dir: str, kind: str, os_name: str, instance: str, component: str | None = None
) -> str:
    """Create a new, unique, 0600 log file and return its path.

    Ganeti appends to the same file when two operations start within one
    second; we add ``-2``, ``-3``, ... before ``.log`` instead.
    """
    try:
        os.makedirs(log_dir, mode=0o750, exist_ok=True)
    except OSError as err:
        raise E.ConfigError(
            f"cannot create log directory '{log_dir}': {err.strerror} "
            "(set log_dir in the node config)"
        ) from err
    base = log_file_name(kind, os_name, instance.replace("/", "_"), component)
    stem = base[: -len(".log")]
    for n in range(1, 10000):
        name = base if n == 1 else f"{stem}-{n}.log"
        path = os.path.join(log_dir, name)
        try:
            fd = atomicfile.create_fd(path, 0o600)
        except FileExistsError:
            continue
        except OSError as err:
            raise E.ConfigError(
                f"cannot create log file '{path}': {err.strerror} (set log_dir in the node config)"
            ) from err
        os.close(fd)
        return path
    raise E.ProgrammerError(f"too many log files named '{base}'")


def tail_lines(path: str | None, lines: int = C.LOG_TAIL_LINES) -> list[str]:
    """Last ``lines`` lines of a log file (Ganeti ``TailFile``); [] if unreadable."""
    if not path:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return []
    text = data.decode("utf-8", errors="replace")
    return [line for line in text.splitlines() if line.strip()][-lines:]


def exit_reason(returncode: int) -> str:
    """``exited with exit code N`` / ``terminated by signal N (SIGX)`` (Ganeti ``RunResult``)."""
    if returncode < 0:
        signum = -returncode
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = "unknown"
        return f"terminated by signal {signum} ({name})"
    return f"exited with exit code {returncode}"


def failure_tail(log_path: str | None, output: str | None = None,
                stdout_path: str | None = None) -> str:
    """The failure's tail: the log's (or the captured output's) last lines, and, when
    stdout was kept apart (:func:`watch`), the last lines of stdout too."""
    out = ""
    if stdout_path:  # scripts such as snf-image print their real cause on stdout
        out = E.indent_block(f"last lines of its stdout ('{stdout_path}'):",
                             tail_lines(stdout_path))
    if output is not None:
        return E.indent_block("output:", output.strip().splitlines()[-C.LOG_TAIL_LINES :]) + out
    lines = tail_lines(log_path)
    if not lines:
        return (f"\n(the log file '{log_path}' is empty)" if log_path else "") + out
    return E.indent_block(f"last lines of the log file '{log_path}':", lines) + out


def open_log(log_path: str | None) -> int:
    """An fd appending to ``log_path`` (/dev/null for None): the log made by
    :func:`new_log_file`, reopened without following a symlink and only while it is
    still a plain file of ours (:func:`ganeti_vol.core.atomicfile.open_append`)."""
    if log_path is None:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        return atomicfile.open_append(log_path)
    except OSError as err:
        raise E.ConfigError(f"cannot open log file '{log_path}': {err.strerror or err}") from err


def append_log(log_path: str | None, line: str) -> None:
    """Append one line to a log (see :func:`open_log`); a failure is only logged."""
    if not log_path:
        return
    try:
        fd = open_log(log_path)
    except E.ConfigError as err:
        log.warning("%s", err)
        return
    try:
        os.write(fd, (line + "\n").encode("utf-8", "surrogateescape"))
    except OSError as err:
        log.warning("cannot write to log file '%s': %s", log_path, err.strerror)
    finally:
        os.close(fd)


# --- watching scripts (ganeti-vol os test) ---------------------------------------


@dataclass(frozen=True)
class WatchedScript:
    """One child started while a :class:`Watch` was active."""

    op: str
    argv: tuple[str, ...]
    #: the child's pid, which is also its process group id
    pid: int
    #: where its stdout went instead of the log; None when stdout carried data (export)
    stdout_path: str | None


@dataclass
class Watch:
    """What :func:`watch` saw: every child started in its context, in order."""

    stdout_dir: str
    scripts: list[WatchedScript] = field(default_factory=list)


_WATCH: contextvars.ContextVar[Watch | None] = contextvars.ContextVar(
    "ganeti_vol_process_watch", default=None
)


@contextlib.contextmanager
def watch(stdout_dir: str) -> Iterator[Watch]:
    """Record the children started in this context (this thread) and keep their stdout apart.

    Used by the conformance runner (``ganeti-vol os test``): a child's stdout
    that would go to the operation log goes to its own file in ``stdout_dir``
    instead, so stdout can be told from stderr; the recorded pids let the
    runner find processes a script left behind in its process group.
    """
    current = Watch(stdout_dir)
    token = _WATCH.set(current)
    try:
        yield current
    finally:
        _WATCH.reset(token)


def watched_stdout(op: str, default_fd: int) -> tuple[int, str | None]:
    """The fd a child's non-data stdout goes to (a new file under a watch), and its path."""
    current = _WATCH.get()
    if current is None:
        return default_fd, None
    path = os.path.join(current.stdout_dir, f"{len(current.scripts) + 1:03d}-{op}.stdout")
    return atomicfile.create_fd(path, 0o600), path


def record_watched(op: str, argv: tuple[str, ...], pid: int, stdout_path: str | None) -> None:
    """Note a child just started in the watch of this context, if there is one."""
    current = _WATCH.get()
    if current is not None:
        current.scripts.append(WatchedScript(op, argv, pid, stdout_path))
