"""The ``ganeti-vol`` command line.

This package is the only place that writes to stdout, configures logging, and
turns :class:`~ganeti_vol.core.errors.GanetiVolError` into messages and exit
codes.  Each area has its own module with a ``register(subparsers)``
function; ``main()`` ties them together.

May import: every room (nothing imports it but ``python -m ganeti_vol``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from ganeti_vol import __version__
from ganeti_vol.cli import common
from ganeti_vol.core import errors as E
from ganeti_vol.core import signals
from ganeti_vol.core.lazy import lazy

# fd I/O (fcntl, termios, libc) loads when a command runs, not for --help or a usage error
if TYPE_CHECKING:
    from ganeti_vol.core import fdio
else:
    fdio = lazy("ganeti_vol.core.fdio")

log = logging.getLogger("ganeti_vol")

#: modules under ganeti_vol.cli that contribute sub-commands, in help order, with the
#: top-level commands each registers (a test keeps this in step with ``register``)
COMMANDS: dict[str, tuple[str, ...]] = {
    "os_cmds": ("os",),
    "instance": ("instance",),
    "transfer": ("export", "import"),
    "backup": ("backup",),
    "repo_cmds": ("repo",),
    "remote_cmds": ("move",),
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


#: where a (sub)parser that met unrecognized arguments records itself (the innermost wins)
_PARSER_ATTR = "_ganeti_vol_parser"


class Parser(argparse.ArgumentParser):
    """argparse with ganeti-vol's rules, for every (sub)command (subparsers inherit the class).

    - an abbreviated long option (``--out`` for ``--output``) is refused, not guessed;
    - a usage error raises :class:`~ganeti_vol.core.errors.UsageError` (exit 3, not argparse's
      2, which doc/exit-codes.md gives to internal errors) with ``usage``: the usage of the
      (sub)command the error is about, also for an unrecognized argument, which argparse
      would report with the top level's usage.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("ganeti-vol").strip()
        raise E.UsageError(f"{command}: {message}" if command else message,
                           usage=self.format_usage().rstrip("\n"))

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        ns, extras = super().parse_known_args(args, namespace)
        if extras and getattr(ns, _PARSER_ATTR, None) is None:
            setattr(ns, _PARSER_ATTR, self)
        return ns, extras

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        ns, extras = self.parse_known_args(args, namespace)
        owner = vars(ns).pop(_PARSER_ATTR, self)
        if extras:
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``only``: register just the module of that command (faster start).

    An unknown ``only`` builds every command, so argparse lists them all in its error.
    """
    if only is not None and not any(only in names for names in COMMANDS.values()):
        only = None
    parser = Parser(
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
        importlib.import_module(f"ganeti_vol.cli.{name}").register(sub)
    return parser


def _prespawn_ssh(argv: Sequence[str]) -> None:
    """``export --repo ssh://...``: start ssh before the engine is imported (the connection
    comes up meanwhile; :mod:`ganeti_vol.remote.sshcmd`)."""
    options = argv[: argv.index("--")] if "--" in argv else argv
    for i, arg in enumerate(options):
        spec = (options[i + 1] if arg == "--repo" and i + 1 < len(options)
                else arg.removeprefix("--repo=") if arg.startswith("--repo=") else "")
        if spec.startswith("ssh://"):
            from ganeti_vol.remote import sshcmd

            sshcmd.prespawn(spec)
            return


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


def wants_json(argv: Sequence[str]) -> bool:
    """``--json`` among the options of ``argv`` (before a ``--``)."""
    options = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in options


def _usage_error(err: E.UsageError, as_json: bool) -> int:
    """A command-line error: the (sub)command's usage and one error line on stderr, exit 3."""
    usage = getattr(err, "usage", "")
    sys.stderr.write((usage + "\n" if usage else "") + f"ganeti-vol: error: {err}\n")
    if as_json:
        common.emit_json({"error": {"type": "UsageError", "exit_code": err.exit_code,
                                    "message": str(err), "usage": usage}})
    return err.exit_code


def _json_error(args: argparse.Namespace, failure: E.Failure) -> None:
    """With ``--json``, an error is a JSON object too: on stdout, where the result would
    have been, or on stderr when stdout carries an export stream (``-o -``).  A command
    that printed its JSON result before failing (a post hook's warning) keeps that one."""
    if not getattr(args, "json", False) or common.json_emitted:
        return
    payload = {"error": {"type": failure.kind, "exit_code": failure.exit_code,
                         "message": failure.message}}
    if getattr(args, "output", None) == "-":
        sys.stderr.write(json.dumps(payload, sort_keys=True, default=str) + "\n")
    else:
        common.emit_json(payload)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see doc/exit-codes.md)."""
    arglist = list(argv) if argv is not None else sys.argv[1:]
    word = command_word(arglist)
    if word == "export" and argv is None:
        _prespawn_ssh(arglist)
    # only the invoked command's module is loaded: an export need not import the authoring kit
    parser = build_parser(only=word)
    try:
        args = parser.parse_args(arglist)
    except E.UsageError as err:
        return _usage_error(err, wants_json(arglist))
    handler = _setup_logging(args)
    previous = signals.install_interrupting()
    common.json_emitted = False
    try:
        return int(args.func(args) or 0)
    except (E.GanetiVolError, E.Interrupted, Exception) as err:
        failure = E.failure(err)
        if failure.stdout_gone:  # not worth a traceback, and stdout must not be written
            fdio.silence_stdout()
        elif not failure.interrupted:
            log.log(logging.ERROR if failure.is_bug or args.debug else logging.DEBUG, "%s",
                    failure.traceback)
        log.error("%s", failure.line)
        if not failure.stdout_gone:
            _json_error(args, failure)
        return failure.exit_code
    finally:
        signals.restore(previous)
        _teardown_logging(handler)
