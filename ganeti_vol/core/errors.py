"""The exception hierarchy of ganeti-vol and the exit codes it maps to.

Every failure the library raises is a :class:`GanetiVolError`. Each class has
a message ``template`` (formatted with the keyword arguments given to the
constructor, which also become attributes) and an ``exit_code``.  Only
:mod:`ganeti_vol.cli` turns an exception into a message and an exit code;
``doc/exit-codes.md`` lists them all and a test keeps that file in step.

:func:`failure` is the one place that turns whatever a command line, an
OS script or the compression tool caught into what it reports: a message and
an exit code.

This module imports nothing outside the standard library.
"""

from __future__ import annotations

import signal
import traceback
from dataclasses import dataclass
from typing import Any

EXIT_OK = 0
EXIT_WARNING = 1
EXIT_SIGNAL_BASE = 128


class GanetiVolError(Exception):
    """Base of every error ganeti-vol raises on purpose."""

    template = "{message}"
    exit_code = 2
    #: show a traceback even without --debug (programming errors only)
    traceback = False

    def __init__(self, message: str | None = None, /, **fields: Any) -> None:
        self.fields = fields
        for key, value in fields.items():
            setattr(self, key, value)
        if message is None:
            try:
                message = self.template.format(**fields)
            except (KeyError, IndexError) as err:  # a bug in the caller, not the user's
                message = f"{self.template} (missing field {err})"
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return self.message

    def restated(self, addition: str, **fields: Any) -> GanetiVolError:
        """This error said again with ``addition`` appended to its message: a new error of
        its class (so of its exit code), with its fields and ``fields``.  Raise it ``from``
        this one; an error is never edited after it was raised."""
        return type(self)(f"{self}{addition}", **{**self.fields, **fields})


class UsageError(GanetiVolError):
    """Bad command-line or environment input."""

    exit_code = 3


class ConfigError(GanetiVolError):
    """A node config or instance file is unreadable or invalid."""

    template = "invalid {what} '{path}':\n{problems}"
    exit_code = 4


class OSDefinitionError(GanetiVolError):
    """An OS definition is missing or invalid, or rejects a variant or parameter."""

    exit_code = 5


class TemplateError(GanetiVolError):
    """A scaffold template could not be rendered."""

    exit_code = 6


class DeviceError(GanetiVolError):
    """A disk, loop device or partition cannot be used."""

    exit_code = 7


class ScriptError(GanetiVolError):
    """An OS script could not be run."""

    exit_code = 8


class ScriptFailed(ScriptError):
    """An OS script exited non-zero or was killed by a signal."""

    template = "OS {op} script '{script}' failed ({reason}){tail_block}"
    reason: str
    tail_block: str
    exit_code = 8


class ScriptTimeout(ScriptError):
    """An OS script exceeded its timeout and was killed."""

    template = (
        "OS {op} script '{script}' timed out after {timeout:g}s and was killed{tail_block}"
    )
    exit_code = 9


class HookError(GanetiVolError):
    """A pre hook failed, so the operation was vetoed before anything was touched."""

    template = "operation vetoed by pre hook '{hook}' ({reason}){output_block}"
    exit_code = 10


class PostHookWarning(GanetiVolError):
    """The operation succeeded, but one or more post hooks failed."""

    template = "operation succeeded, but post hook(s) failed: {hooks}"
    exit_code = 11


class StreamError(GanetiVolError):
    """Moving disk data failed."""

    exit_code = 12


class StallError(StreamError):
    """No data moved for too long."""

    template = "{what} stalled: no data moved for {seconds:g}s (after {done} bytes)"
    exit_code = 13


class ShortTransfer(StreamError):
    """Fewer (or more) bytes were moved than announced."""

    template = "{what}: expected {expected} bytes, got {actual}"
    exit_code = 14


class CompressionError(StreamError):
    """Compressed data could not be decoded."""

    exit_code = 12


class ArchiveError(GanetiVolError):
    """An export archive is missing, incomplete or unusable."""

    exit_code = 15


class ArchiveFormatError(ArchiveError):
    """An archive needs a format version or feature this ganeti-vol cannot read."""

    exit_code = 16


class IntegrityError(ArchiveError):
    """Data does not match its recorded hash: it is corrupt."""

    exit_code = 17


class SnapshotError(GanetiVolError):
    """A snapshot could not be taken, read or released."""

    exit_code = 18


class NoSpaceError(GanetiVolError):
    """A filesystem ran out of space."""

    template = "cannot write {what}: no space left on device"
    exit_code = 19


class BusyError(GanetiVolError):
    """An object is in use by another operation or process."""

    exit_code = 20


class RemoteError(GanetiVolError):
    """The link to a remote repository or node broke, or the far side failed."""

    exit_code = 21


class HostUnreachable(RemoteError):
    """ssh could not reach the host (name, route, refused connection, timeout)."""

    exit_code = 22


class AuthError(RemoteError):
    """ssh could not log in (key refused, host key not trusted)."""

    exit_code = 23


class ProtocolError(RemoteError):
    """The far side speaks another protocol version, or is not ganeti-vol at all."""

    exit_code = 24


class RemoteRefused(RemoteError):
    """The server refused the request: a path outside --restrict-to-path, or a deletion
    asked of an --append-only server."""

    exit_code = 25


class Interrupted(BaseException):
    """Raised by the signal handlers of the CLI on SIGINT/SIGTERM/SIGHUP.

    It derives from BaseException so that ``except Exception`` blocks in
    cleanup code do not swallow it.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by signal {signum}")

    @property
    def exit_code(self) -> int:
        return EXIT_SIGNAL_BASE + self.signum


class ProgrammerError(GanetiVolError, AssertionError):
    """Misuse of the library: a bug in ganeti-vol or its caller."""

    exit_code = 2
    traceback = True


def all_error_classes() -> list[type[GanetiVolError]]:
    """Every error class, depth first, base first (used by docs and tests)."""
    out: list[type[GanetiVolError]] = []

    def walk(cls: type[GanetiVolError]) -> None:
        out.append(cls)
        for sub in cls.__subclasses__():
            if sub.__module__ == __name__:
                walk(sub)

    walk(GanetiVolError)
    return out


def indent_block(title: str, lines: list[str] | str) -> str:
    """Format an indented block appended to a one-line message ("" if empty)."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    lines = [line for line in lines]
    if not lines:
        return ""
    return "\n" + title + "\n" + "\n".join("    " + line for line in lines)


@dataclass(frozen=True)
class Failure:
    """What a program that caught ``err`` reports: its type, exit code and message."""

    #: the error class's name; "Interrupted" or "InternalError" for those
    kind: str
    exit_code: int
    #: what to say, one line first (a message may carry indented detail lines)
    message: str
    #: the formatted traceback
    traceback: str
    #: True for bugs: the traceback is shown even without --debug
    is_bug: bool
    #: True if stdout's reader went away (stdout must not be written any more)
    stdout_gone: bool = False

    @property
    def interrupted(self) -> bool:
        return self.kind == "Interrupted"

    @property
    def line(self) -> str:
        """The message as a command line's last line says it: ``error: ...`` for errors."""
        return self.message if self.interrupted or self.is_bug and self.kind == "InternalError" \
            else f"error: {self.message}"


def failure(err: BaseException) -> Failure:
    """How ``err`` is reported (doc/exit-codes.md): one of ours with its own exit code, a
    signal (128+N), the reader of stdout gone (exit 12), or a bug (exit 2)."""
    text = "".join(traceback.format_exception(err)).rstrip()
    if isinstance(err, GanetiVolError):
        return Failure(type(err).__name__, err.exit_code, str(err), text, err.traceback)
    if isinstance(err, (Interrupted, KeyboardInterrupt)):
        signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
        return Failure("Interrupted", EXIT_SIGNAL_BASE + signum,
                       f"interrupted by {signal.Signals(signum).name}; cleaned up", text, False)
    if isinstance(err, BrokenPipeError):
        return Failure(StreamError.__name__, StreamError.exit_code,
                       "the reader of stdout went away (broken pipe)", text, False, True)
    return Failure("InternalError", GanetiVolError.exit_code,
                   f"internal error: {type(err).__name__}: {err} (please report this)", text, True)
