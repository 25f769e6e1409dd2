"""The ``ganeti-vol`` command line.

This package is the only place that writes to stdout, configures logging, and
turns :class:`~ganeti_vol.errors.GanetiVolError` into messages and exit
codes.  Each area has its own module with a ``register(subparsers)``
function; ``main()`` ties them together.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from types import FrameType

from ganeti_vol import __version__
from ganeti_vol import errors as E

log = logging.getLogger("ganeti_vol")

#: modules under ganeti_vol.cli that contribute sub-commands, in help order, with the
#: top-level commands each registers (a test keeps this in step with ``register``)
COMMANDS: dict[str, tuple[str, ...]] = {
    "os_cmds": ("os",),
    "instance": ("instance",),
    "transfer": ("export", "import"),
    "backup": ("backup",),
    "repo_cmds": ("repo",),
    "disk": ("disk", "cleanup"),
    "hooks_cmds": ("hooks",),
    "authoring": ("dump", "restore"),
    "tools": ("demo",),
}
COMMAND_MODULES = tuple(COMMANDS)
#: global options that take a value (needed to find the command word in argv)
_VALUE_OPTIONS = ("--config",)


def command_word(argv: Sequence[str]) -> str | None:
    """The sub-command named in ``argv`` (before any help request), or None."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _VALUE_OPTIONS:
            skip = True
        elif arg in ("-h", "--help", "--version", "--"):
            return None
        elif not arg.startswith("-"):
            return arg
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``only``: register just the module of that command (faster start).

    An unknown ``only`` builds every command, so argparse lists them all in its error.
    """
    if only is not None and not any(only in names for names in COMMANDS.values()):
        only = None
    parser = argparse.ArgumentParser(
        prog="ganeti-vol",
        description="Run, test and stream Ganeti OS definitions without a cluster.",
    )
    parser.add_argument("--version", action="version", version=f"ganeti-vol {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="node config file (default: $GANETI_VOL_CONFIG or /etc/ganeti-vol/ganeti-vol.conf)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (repeat)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks and debug logging"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        if only is not None and only not in COMMANDS[name]:
            continue
        try:
            module = importlib.import_module(f"ganeti_vol.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"ganeti_vol.cli.{name}":
                continue  # area not built yet
            raise
        module.register(sub)
    return parser


def _setup_logging(args: argparse.Namespace) -> logging.Handler:
    level = logging.WARNING
    if args.quiet:
        level = logging.ERROR
    elif args.debug or args.verbose >= 2:
        level = logging.DEBUG
    elif args.verbose == 1:
        level = logging.INFO
    root = logging.getLogger("ganeti_vol")
    root.setLevel(logging.DEBUG)
    for handler in list(root.handlers):
        if getattr(handler, "_ganeti_vol_cli", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("ganeti-vol: %(message)s"))
    handler._ganeti_vol_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.propagate = False
    return handler


def _teardown_logging(handler: logging.Handler) -> None:
    root = logging.getLogger("ganeti_vol")
    root.removeHandler(handler)
    root.propagate = True


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise E.Interrupted(signum)


def _install_signal_handlers() -> dict[int, object]:
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            previous[signum] = signal.signal(signum, _raise_interrupted)
        except ValueError:  # not the main thread (e.g. called from a test thread)
            pass
    return previous


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see doc/exit-codes.md)."""
    arglist = list(argv) if argv is not None else sys.argv[1:]
    # only the invoked command's module is loaded: an export need not import the authoring kit
    parser = build_parser(only=command_word(arglist))
    args = parser.parse_args(arglist)
    handler = _setup_logging(args)
    previous = _install_signal_handlers()
    try:
        return int(args.func(args) or 0)
    except E.GanetiVolError as err:
        if err.traceback or args.debug:
            log.error("%s", "".join(traceback.format_exception(err)).rstrip())
        else:
            log.debug("%s", "".join(traceback.format_exception(err)).rstrip())
        log.error("error: %s", err)
        return err.exit_code
    except E.Interrupted as err:
        log.error("interrupted by %s; cleaned up", signal.Signals(err.signum).name)
        return err.exit_code
    except BrokenPipeError:
        # the reader of our stdout went away: not worth a traceback
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        log.error("error: output pipe closed by the reader")
        return E.StreamError.exit_code
    except Exception as err:  # a bug: say so, with the traceback
        log.error("%s", "".join(traceback.format_exception(err)).rstrip())
        log.error("internal error: %s (please report this)", err)
        return E.GanetiVolError.exit_code
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)  # type: ignore[arg-type]
        _teardown_logging(handler)
