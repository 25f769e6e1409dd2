"""External tools run by OS scripts (qemu-img, xz, ...): a clean environment, failures
quoted."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence

from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.system import process

log = logging.getLogger(__name__)



# --- external commands -----------------------------------------------------------------


def _command_env(environ: Mapping[str, str] | None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    return {"PATH": env.get("PATH") or C.SCRIPT_PATH, "LC_ALL": "C"}


def _which(name: str, env: Mapping[str, str]) -> str:
    found = shutil.which(name, path=env["PATH"]) if "/" not in name else name
    if not found or not os.access(found, os.X_OK):
        raise E.UsageError(f"cannot run '{name}': not found in {env['PATH']} (is it installed?)")
    return found


def _command_error(argv: Sequence[str], err: E.ScriptError) -> E.ScriptError:
    reason = err.fields.get("reason") or (
        f"timed out after {err.fields.get('timeout', 0):g}s" if isinstance(err, E.ScriptTimeout)
        else str(err))
    return E.ScriptError(
        f"command '{shlex.join(argv)}' failed ({reason}){err.fields.get('tail_block', '')}"
    )


def run_command(
    argv: Sequence[str],
    *,
    environ: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
) -> str:
    """Run a command to completion (stdin /dev/null); returns stdout+stderr.

    It gets only ``PATH`` (from the script's environment) and ``LC_ALL=C``;
    a failure is a ScriptError quoting the command's last output lines.
    """
    env = _command_env(environ)
    exe = _which(argv[0], env)
    try:
        result = process.run_script(exe, env, cwd=cwd or os.getcwd(), op=os.path.basename(exe),
                                    args=list(argv[1:]), timeout=timeout, capture=True)
    except E.ScriptError as err:
        raise _command_error(argv, err) from err
    return result.output


@contextlib.contextmanager
def command_output_fd(
    argv: Sequence[str],
    *,
    environ: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> Iterator[int]:
    """Run a command whose stdout we read: yields the read end of the pipe (1 MiB).

    E.g. ``with osapi.command_output_fd(["xz", "-dc", image]) as fd:
    rawio.restore(fd, disk)``.  Its stderr is kept in a temporary log and
    quoted if it fails; leaving the block early stops it.
    """
    env = _command_env(environ)
    exe = _which(argv[0], env)
    with tempfile.TemporaryDirectory(prefix="ganeti-vol-cmd-") as tmp:
        log_path = os.path.join(tmp, "stderr.log")
        try:
            with process.open_script_stream(
                exe, env, cwd=cwd or os.getcwd(), op=os.path.basename(exe), log_path=log_path,
                direction="read", args=list(argv[1:]),
            ) as stream:
                yield stream.fd
        except E.ScriptError as err:
            raise _command_error(argv, err) from err
