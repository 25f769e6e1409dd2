"""A typed helper library for OS definitions written in Python.

An OS script (``create``, ``export``, ``import``, ``rename``, ``verify``)
hands its work to :func:`main`, which parses the Ganeti environment, sets up
logging and a cleanup stack, runs the handler and turns failures into one
decisive last line on stderr::

    import sys
    from ganeti_vol import osapi

    def create(script: osapi.Script) -> None:
        disk = script.env.disk(0)
        if script.params.get_bool("wipe", default=False):
            ...
        script.log.info("installing %s on %s", script.env.instance.name, disk.path)

    def export(script: osapi.Script) -> None:
        osapi.export_disk(script.env)          # raw disk to stdout, size on EXP_SIZE_FD

    if __name__ == "__main__":
        sys.exit(osapi.main({"create": create, "export": export, ...}))

What it provides, against the bugs the peers hand-write (doc/os-authors.md):

- :class:`OSEnv`: the environment parsed once into :class:`InstanceInfo`,
  :class:`DiskInfo`, :class:`NicInfo` and :class:`OSParams`, whose typed
  getters accept ``yes/no/true/false/on/off/1/0`` for booleans (never
  ``bool("False")``), split lists on unescaped separators, and tell an unset
  parameter from an empty one;
- :meth:`OSEnv.transfer_disk`: the disk an export or import script must use
  (``EXPORT_INDEX``/``IMPORT_INDEX`` and ``EXPORT_DEVICE``/``IMPORT_DEVICE``);
- :func:`announce_size`: writes ``EXP_SIZE_FD`` for any disk kind and fd number;
- :class:`CleanupStack`: undo steps run in reverse on success, failure and on
  SIGTERM/SIGINT/SIGHUP, each logged, busy ones retried with backoff;
- logging that honours ``DEBUG_LEVEL`` and ends a failure with ``ERROR: …``
  as the last line (Ganeti shows the last 20 lines of the log);
- :func:`block_device`: a file disk attached as a loop device with its
  partitions (:func:`ganeti_vol.system.loopdev.attached`), a block device as is;
- :func:`copy_image`, :func:`export_disk`, :func:`import_disk`: the sparse,
  never-truncating copies of :mod:`ganeti_vol.engine.rawio`;
- :func:`run_command`, :func:`command_output_fd`: external tools (qemu-img,
  xz, ...) run through :mod:`ganeti_vol.system.process`, failures quoted.

The library never prints; everything goes through :mod:`logging` to stderr.

May import: :mod:`ganeti_vol.ganeti`, :mod:`ganeti_vol.engine`,
:mod:`ganeti_vol.system` and :mod:`ganeti_vol.core` (not the operations, the
repository or the CLI: an OS script stays small).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ganeti_vol.core import constants as C
from ganeti_vol.core import errors
from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import silence_stdout
from ganeti_vol.engine import rawio
from ganeti_vol.ganeti import environment as V
from ganeti_vol.osapi.cleanup import CleanupStack
from ganeti_vol.osapi.commands import command_output_fd, run_command
from ganeti_vol.osapi.disks import (
    BlockDevice,
    announce_size,
    block_device,
    copy_image,
    export_disk,
    import_disk,
    restore_stream,
    sha256_file,
)
from ganeti_vol.osapi.osenv import DiskInfo, InstanceInfo, NicInfo, OSEnv, TransferDisk, read_config
from ganeti_vol.osapi.values import (
    BOOL_HINT,
    FALSE_WORDS,
    REQUIRED,
    SCRIPTS,
    TRUE_WORDS,
    OSParams,
    ParamType,
    param_key,
    param_usage,
    parse_bool,
    parse_int,
    split_list,
)

#: the API of OS scripts (``from ganeti_vol import osapi``); the modules of this package
#: (values, osenv, disks, cleanup, commands) are its parts
__all__ = [
    "BOOL_HINT", "FALSE_WORDS", "REQUIRED", "SCRIPTS", "TRUE_WORDS",
    "BlockDevice", "CleanupStack", "DiskInfo", "Handler", "InstanceInfo", "NicInfo", "OSEnv",
    "OSParams", "ParamType", "Script", "TransferDisk",
    "announce_size", "block_device", "command_output_fd", "copy_image", "errors",
    "export_disk", "help_requested", "import_disk", "main", "param_key", "param_usage",
    "parse_bool", "parse_int", "rawio", "read_config", "restore_stream", "run_command",
    "script_op", "setup_logging", "sha256_file", "split_list",
]


log = logging.getLogger(__name__)


# --- logging and main ------------------------------------------------------------------


class _Formatter(logging.Formatter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING or record.levelno < logging.INFO:
            return f"{record.levelname}: {self.prefix}{text}"
        return f"{self.prefix}{text}"


def setup_logging(debug_level: int = 0, *, prefix: str = "") -> logging.Handler:
    """Log to stderr: INFO and up at DEBUG_LEVEL 0, everything at 1 and above.

    Returns the handler (installed on the root logger, replacing an earlier one).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_ganeti_vol_osapi", False):
            root.removeHandler(handler)
    level = logging.DEBUG if debug_level >= 1 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(prefix))
    handler.setLevel(level)
    handler._ganeti_vol_osapi = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(min(root.level or level, level))
    return handler


def help_requested(argv: Sequence[str] | None = None) -> bool:
    """True if the script was called with ``-h`` or ``--help`` (print the usage and exit 0)."""
    args = list(sys.argv[1:] if argv is None else argv[1:])
    if args and args[0] in SCRIPTS:
        args = args[1:]
    return bool(args) and args[0] in ("-h", "--help")


def script_op(argv: Sequence[str] | None = None) -> tuple[str, list[str]]:
    """``(op, args)``: the script's name (create, export, ...) and its arguments.

    A launcher runs ``osdef.py OP ARGS...``; a script written directly in
    Python is recognised by its own file name.
    """
    argv = list(sys.argv if argv is None else argv)
    if len(argv) > 1 and argv[1] in SCRIPTS:
        return argv[1], argv[2:]
    return os.path.basename(argv[0]) if argv else "", argv[1:]


@dataclass
class Script:
    """What a handler gets: the operation, its arguments, the environment, a cleanup stack."""

    op: str
    args: list[str]
    env: OSEnv
    cleanup: CleanupStack
    log: logging.Logger
    #: the directory of the OS definition (where the scripts are)
    os_dir: str

    @property
    def params(self) -> OSParams:
        return self.env.params

    def require_verify_parameters(self) -> None:
        """``verify`` is called as ``verify parameters``; refuse any other check."""
        if self.args[:1] != [C.VERIFY_CHECK_PARAMETERS]:
            raise E.UsageError(
                f"unknown check '{' '.join(self.args)}' (only 'parameters' is known)"
            )


Handler = Callable[[Script], Any]


def _fail(message: str) -> None:
    """Log a failure so that its one-line summary is the last line on stderr."""
    first, *rest = message.splitlines() or [""]
    if rest:
        log.error("details:\n%s", "\n".join(rest))
    log.error("%s", first)


def main(
    handlers: Mapping[str, Handler] | Handler,
    *,
    usage: Mapping[str, str] | str | None = None,
    show: Callable[[str], Any] | None = None,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    name: str | None = None,
) -> int:
    """Run the handler of this script (by name, see :func:`script_op`); returns the exit code.

    With ``-h``/``--help``, ``show`` (the script passes ``print``: this
    library never prints) gets the ``usage`` text of the script, and 0 is
    returned.  Otherwise: parses the environment, logs per ``DEBUG_LEVEL``,
    runs the handler in a :class:`CleanupStack`, and turns a failure into
    ``ERROR: ...`` as the last line on stderr with a non-zero exit code (that
    of the error class, 128+N for signal N).  Tracebacks are shown for bugs,
    and for every error when ``DEBUG_LEVEL`` >= 1.
    """
    argv = list(sys.argv if argv is None else argv)
    op, args = script_op(argv)
    if usage is not None and help_requested(argv):
        if show is None:
            raise E.ProgrammerError("main(usage=...) needs show= (e.g. print) to print it")
        text = usage if isinstance(usage, str) else usage.get(op, "\n".join(usage.values()))
        show(text)
        return 0
    env_map = os.environ if environ is None else environ
    os_dir = os.path.dirname(os.path.abspath(argv[0])) if argv else os.getcwd()
    label = name or env_map.get(V.OS_NAME) or os.path.basename(os_dir)
    try:
        debug = int(env_map.get(V.DEBUG_LEVEL, "0") or 0)
    except ValueError:
        debug = 0
    handler_obj = setup_logging(debug, prefix=f"{label} {op}: ")
    script_log = logging.getLogger(f"ganeti_vol.os.{label}")
    try:
        if callable(handlers):
            handler = handlers
        else:
            if op not in handlers:
                raise E.UsageError(
                    f"unknown script '{op}' (this OS definition has: {', '.join(handlers)})"
                )
            handler = handlers[op]
        env = OSEnv.from_environ(env_map)
        with CleanupStack() as cleanup:
            handler(Script(op, args, env, cleanup, script_log, os_dir))
        return 0
    except (E.GanetiVolError, E.Interrupted, Exception) as err:
        failure = E.failure(err)
        if failure.stdout_gone:
            silence_stdout()
        elif not failure.interrupted and (debug >= 1 or failure.is_bug):
            log.error("%s", failure.traceback)
        _fail(failure.message)
        return failure.exit_code
    finally:
        handler_obj.flush()
        logging.getLogger().removeHandler(handler_obj)
