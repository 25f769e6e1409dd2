"""The ssh command line of a remote repository, and starting it early.

``ssh://[user@]host[:port]/path`` is parsed here and turned into the system
``ssh`` command (:func:`ssh_argv`), without the rest of
:mod:`ganeti_vol.remote.ssh`: the command line starts ssh for ``export --repo
ssh://...`` before it imports the engine (:func:`prespawn`), so that the
connection (key exchange, the far side's interpreter) comes up meanwhile;
:class:`~ganeti_vol.remote.ssh.Connection` adopts that process (:func:`adopt`)
when it asks for the same command line.  One not adopted is killed at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from ganeti_vol.core import errors as E

_SPEC_RE = re.compile(r"^ssh://(?:(?P<user>[^@/]+)@)?(?P<host>\[[^\]/]+\]|[^:/@]+)"
                      r"(?::(?P<port>\d+))?(?P<path>/.*)$")


@dataclass(frozen=True)
class Target:
    spec: str
    user: str | None
    host: str
    port: int | None
    path: str

    @property
    def where(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.host}"


def parse(spec: str) -> Target:
    """Split ``ssh://[user@]host[:port]/path`` (a UsageError if it is not one)."""
    m = _SPEC_RE.match(spec)
    if not m or m.group("path") in ("/", ""):
        raise E.UsageError(f"invalid ssh repository '{spec}': use ssh://[user@]host[:port]/path")
    port = int(m.group("port")) if m.group("port") else None
    if port is not None and not 0 < port < 65536:
        raise E.UsageError(f"invalid ssh repository '{spec}': port {port} out of range")
    path = m.group("path")
    if path.startswith("/~/") or path.startswith("/./"):
        path = path[3:]  # relative to the remote login's home, as borg does
    return Target(spec, m.group("user"), m.group("host").strip("[]"), port, path)


def ssh_argv(target: Target, remote_args: Sequence[str]) -> list[str]:
    """The ssh command line: ``$GANETI_VOL_SSH [-p PORT] [-l USER] HOST -- COMMAND``."""
    base = shlex.split(os.environ.get("GANETI_VOL_SSH") or "")
    if not base:  # a dead link (no reset) is noticed within a minute
        base = ["ssh", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
    remote = shlex.split(os.environ.get("GANETI_VOL_REMOTE_COMMAND") or "ganeti-vol")
    argv = list(base)
    if target.port:
        argv += ["-p", str(target.port)]
    if target.user:
        argv += ["-l", target.user]
    return argv + [target.host, "--", shlex.join([*remote, *remote_args])]


def serve_args(target: Target) -> list[str]:
    """The far side's arguments for a repository session."""
    return ["repo", "serve", target.path]


_spawned: dict[tuple[str, ...], subprocess.Popen[bytes]] = {}


def prespawn(spec: str) -> None:
    """Start the ssh session of repository ``spec`` now (nothing if it cannot start: the
    command reports that when it opens the repository)."""
    try:
        target = parse(spec)
        argv = ssh_argv(target, serve_args(target))
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    except (E.GanetiVolError, OSError):
        return
    if not _spawned:
        atexit.register(_kill_unadopted)
    _spawned[tuple(argv)] = proc


def adopt(argv: Sequence[str]) -> subprocess.Popen[bytes] | None:
    """The process :func:`prespawn` started with this command line, if any (once)."""
    return _spawned.pop(tuple(argv), None)


def _kill_unadopted() -> None:
    while _spawned:
        _, proc = _spawned.popitem()
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                if f is not None:
                    f.close()
