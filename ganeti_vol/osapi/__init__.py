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

import contextlib
import errno
import hashlib
import logging
import os
import shlex
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ganeti_vol.core import constants as C
from ganeti_vol.core import errors
from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import silence_stdout
from ganeti_vol.core.retry import retry_busy
from ganeti_vol.core.signals import deferred, install_interrupting, restore
from ganeti_vol.engine import rawio
from ganeti_vol.ganeti import config as cfgmod
from ganeti_vol.system import devices, loopdev, process

log = logging.getLogger(__name__)

T = TypeVar("T")

TRUE_WORDS = frozenset({"yes", "true", "on", "1"})
FALSE_WORDS = frozenset({"no", "false", "off", "0"})
BOOL_HINT = "use yes/no, true/false, on/off or 1/0"
SCRIPTS = ("create", "export", "import", "rename", "verify")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: default of the typed getters: an unset parameter is an error
REQUIRED: Any = _Required()


# --- values --------------------------------------------------------------------------------


def parse_bool(text: str, what: str) -> bool:
    """``yes/no, true/false, on/off, 1/0`` in any case; anything else is an error."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    shown = f"'{text}'" if text else "empty"
    raise E.OSDefinitionError(f"invalid {what}: {shown} is not a boolean ({BOOL_HINT})")


def parse_int(
    text: str, what: str, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """A whole number (optional sign) within ``[minimum, maximum]``."""
    try:
        value = int(text.strip(), 10)
    except ValueError:
        shown = f"'{text}'" if text else "empty"
        raise E.OSDefinitionError(f"invalid {what}: {shown} is not a whole number") from None
    if minimum is not None and value < minimum:
        raise E.OSDefinitionError(f"invalid {what}: {value} is less than {minimum}")
    if maximum is not None and value > maximum:
        raise E.OSDefinitionError(f"invalid {what}: {value} is more than {maximum}")
    return value


def split_list(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` except where backslash-escaped (``\\,`` and ``\\\\``).

    Items are stripped of surrounding whitespace and empty items dropped,
    so ``""`` is the empty list and ``"a, b\\,c"`` is ``["a", "b,c"]``.
    """
    if len(sep) != 1 or sep == "\\":
        raise E.ProgrammerError(f"list separator must be one character other than '\\\\': {sep!r}")
    return [item.strip() for item in cfgmod._split_unescaped(text, sep) if item.strip()]


#: the type of a parameter for :meth:`OSParams.check`: a name, or the allowed values
ParamType = str | Sequence[str]


def param_usage(spec: Mapping[str, ParamType]) -> str:
    """Lines ``    name (type)`` for a usage text (choices shown as ``a|b|c``)."""
    return "".join(
        f"\n    {name} ({kind if isinstance(kind, str) else '|'.join(kind)})"
        for name, kind in spec.items()
    )


def param_key(name: str) -> str:
    """The canonical key of a parameter: lower case, ``-`` as ``_`` (as in ``OSP_<NAME>``)."""
    return name.strip().lower().replace("-", "_")


class OSParams(Mapping[str, str]):
    """The OS parameters (``OSP_*``), keyed by lower-case name, with typed getters.

    An unset parameter is absent; one set to ``""`` is present and empty.
    Each getter takes a ``default`` returned when the parameter is *unset*;
    without one an unset parameter is an error.  An *empty* value is an
    empty string (:meth:`get_str`), an empty list (:meth:`get_list`), and an
    error for booleans and numbers.  Errors are
    :class:`~ganeti_vol.core.errors.OSDefinitionError` naming the parameter.
    """

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = {param_key(k): str(v) for k, v in values.items()}

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> OSParams:
        prefix = C.OSP_PREFIX
        return cls({k[len(prefix):]: v for k, v in environ.items() if k.startswith(prefix)})

    def __getitem__(self, name: str) -> str:
        return self._values[param_key(name)]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._values))

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and param_key(name) in self._values

    def __repr__(self) -> str:
        return f"OSParams({sorted(self._values)})"

    def is_set(self, name: str) -> bool:
        """True if the parameter was given, even as an empty string."""
        return name in self

    def _raw(self, name: str, default: Any) -> tuple[str | None, Any]:
        if name in self:
            return self[name], None
        if default is REQUIRED:
            key = param_key(name)
            raise E.OSDefinitionError(f"OS parameter '{key}' is required (give -O {key}=...)")
        return None, default

    @staticmethod
    def _what(name: str) -> str:
        return f"OS parameter '{param_key(name)}'"

    def get_str(self, name: str, default: Any = REQUIRED) -> str:
        """The value as given (``""`` when set but empty)."""
        value, fallback = self._raw(name, default)
        return fallback if value is None else value

    def get_bool(self, name: str, default: Any = REQUIRED) -> bool:
        """``yes/no, true/false, on/off, 1/0`` in any case (``"False"`` is False)."""
        value, fallback = self._raw(name, default)
        return fallback if value is None else parse_bool(value, self._what(name))

    def get_int(
        self,
        name: str,
        default: Any = REQUIRED,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int:
        value, fallback = self._raw(name, default)
        if value is None:
            return fallback  # type: ignore[no-any-return]
        return parse_int(value, self._what(name), minimum=minimum, maximum=maximum)

    def get_list(self, name: str, default: Any = REQUIRED, *, sep: str = ",") -> list[str]:
        """Items split on unescaped ``sep`` (see :func:`split_list`); empty value: ``[]``."""
        value, fallback = self._raw(name, default)
        return list(fallback) if value is None else split_list(value, sep)

    def get_choice(self, name: str, choices: Sequence[str], default: Any = REQUIRED) -> str:
        value, fallback = self._raw(name, default)
        if value is None:
            return fallback  # type: ignore[no-any-return]
        if value not in choices:
            raise E.OSDefinitionError(
                f"invalid {self._what(name)}: '{value}' is not one of {', '.join(choices)}"
            )
        return value

    def check(self, spec: Mapping[str, ParamType]) -> None:
        """Check every parameter against ``spec``: name -> ``"str"``, ``"bool"``,
        ``"int"``, ``"list"`` or a sequence of allowed values.  Unknown names
        and malformed values raise; unset parameters are fine."""
        self.check_known(list(spec))
        for name, kind in spec.items():
            if name not in self:
                continue
            if kind == "bool":
                self.get_bool(name)
            elif kind == "int":
                self.get_int(name)
            elif kind == "list":
                self.get_list(name)
            elif not isinstance(kind, str):
                self.get_choice(name, kind)
            elif kind != "str":
                raise E.ProgrammerError(f"unknown parameter type {kind!r} for '{name}'")

    def unknown(self, declared: Sequence[str]) -> list[str]:
        """Names given that are not in ``declared`` (parameters.list)."""
        known = {param_key(n) for n in declared}
        return [name for name in self if name not in known]

    def check_known(self, declared: Sequence[str]) -> None:
        extra = self.unknown(declared)
        if extra:
            raise E.OSDefinitionError(
                f"unknown OS parameter(s) {', '.join(extra)} "
                f"(known: {', '.join(param_key(n) for n in declared) or 'none'})"
            )


# --- the environment -------------------------------------------------------------------


def _env_int(environ: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    value = environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise E.UsageError(f"environment variable {name}='{value}' is not a whole number") from None


def _env_float(environ: Mapping[str, str], name: str) -> float | None:
    value = environ.get(name, "").strip()
    try:
        return float(value) if value else None
    except ValueError:
        raise E.UsageError(f"environment variable {name}='{value}' is not a number") from None


@dataclass(frozen=True)
class DiskInfo:
    """One instance disk (``DISK_<n>_*``)."""

    index: int
    path: str | None
    #: DISK_<n>_SIZE in MiB (Ganeti 3.0+); None if not given
    size_mib: int | None
    uuid: str = ""
    name: str | None = None
    access: str = "rw"
    uri: str | None = None
    backend_type: str | None = None
    frontend_type: str | None = None

    @property
    def size_bytes(self) -> int | None:
        return None if self.size_mib is None else self.size_mib << 20

    def require_path(self) -> str:
        if not self.path:
            raise E.UsageError(f"disk {self.index} has no path (DISK_{self.index}_PATH is not set)")
        return self.path

    def actual_size(self) -> int:
        """The size of the file or block device in bytes (what really fits)."""
        return rawio.disk_size(self.require_path())

    def is_block_device(self) -> bool:
        try:
            return stat.S_ISBLK(os.stat(self.require_path()).st_mode)
        except OSError as err:
            raise E.DeviceError(
                f"cannot use disk {self.index} '{self.path}': {err.strerror}"
            ) from err


@dataclass(frozen=True)
class NicInfo:
    """One NIC (``NIC_<n>_*``)."""

    index: int
    mac: str
    uuid: str = ""
    name: str | None = None
    ip: str | None = None
    mode: str | None = None
    link: str | None = None
    bridge: str | None = None
    frontend_type: str | None = None
    #: NIC_<n>_NETWORK_* with the prefix removed and lower-cased (subnet, gateway, ...)
    network: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class InstanceInfo:
    """The instance (``INSTANCE_*``, ``HYPERVISOR``)."""

    name: str
    os: str
    uuid: str = ""
    hypervisor: str = ""
    primary_node: str = ""
    secondary_nodes: tuple[str, ...] = ()
    ctime: float | None = None
    mtime: float | None = None
    #: INSTANCE_BE_* and INSTANCE_HV_*, keys as given after the prefix
    be: dict[str, str] = field(default_factory=dict)
    hv: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TransferDisk:
    """The disk an export or import script works on."""

    op: str
    index: int
    #: what to read (export) or write (import): EXPORT_DEVICE / IMPORT_DEVICE
    device: str
    disk: DiskInfo | None
    uri: str | None = None


def _opt(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name)
    return value if value else None


@dataclass(frozen=True)
class OSEnv:
    """The Ganeti OS environment, parsed (see :meth:`from_environ`)."""

    os_name: str
    variant: str
    api_version: int | None
    debug_level: int
    params: OSParams
    #: None for ``verify``, which gets only the core variables
    instance: InstanceInfo | None = None
    disks: tuple[DiskInfo, ...] = ()
    nics: tuple[NicInfo, ...] = ()
    #: create: INSTANCE_REINSTALL=1
    reinstall: bool = False
    #: rename: OLD_INSTANCE_NAME
    old_name: str | None = None
    #: the variables themselves
    raw: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> OSEnv:
        """Parse ``environ`` (default ``os.environ``); a malformed number is a UsageError."""
        env = dict(os.environ if environ is None else environ)
        instance = None
        if env.get("INSTANCE_NAME"):
            instance = InstanceInfo(
                name=env["INSTANCE_NAME"],
                os=env.get("INSTANCE_OS", env.get("OS_NAME", "")),
                uuid=env.get("INSTANCE_UUID", ""),
                hypervisor=env.get("HYPERVISOR", ""),
                primary_node=env.get("INSTANCE_PRIMARY_NODE", ""),
                secondary_nodes=tuple(env.get("INSTANCE_SECONDARY_NODES", "").split()),
                ctime=_env_float(env, "INSTANCE_CTIME"),
                mtime=_env_float(env, "INSTANCE_MTIME"),
                be={k[12:]: v for k, v in env.items() if k.startswith("INSTANCE_BE_")},
                hv={k[12:]: v for k, v in env.items() if k.startswith("INSTANCE_HV_")},
            )
        disks = []
        for i in range(_env_int(env, "DISK_COUNT", 0) or 0):
            p = f"DISK_{i}_"
            disks.append(DiskInfo(
                index=i, path=_opt(env, p + "PATH"), size_mib=_env_int(env, p + "SIZE"),
                uuid=env.get(p + "UUID", ""), name=_opt(env, p + "NAME"),
                access=env.get(p + "ACCESS", "rw"), uri=_opt(env, p + "URI"),
                backend_type=_opt(env, p + "BACKEND_TYPE"),
                frontend_type=_opt(env, p + "FRONTEND_TYPE"),
            ))
        nics = []
        for i in range(_env_int(env, "NIC_COUNT", 0) or 0):
            p = f"NIC_{i}_"
            nics.append(NicInfo(
                index=i, mac=env.get(p + "MAC", ""), uuid=env.get(p + "UUID", ""),
                name=_opt(env, p + "NAME"), ip=_opt(env, p + "IP"), mode=_opt(env, p + "MODE"),
                link=_opt(env, p + "LINK"), bridge=_opt(env, p + "BRIDGE"),
                frontend_type=_opt(env, p + "FRONTEND_TYPE"),
                network={k[len(p) + 8:].lower(): v for k, v in env.items()
                         if k.startswith(p + "NETWORK_")},
            ))
        return cls(
            os_name=env.get("OS_NAME", ""),
            variant=env.get("OS_VARIANT", ""),
            api_version=_env_int(env, "OS_API_VERSION"),
            debug_level=_env_int(env, "DEBUG_LEVEL", 0) or 0,
            params=OSParams.from_environ(env),
            instance=instance,
            disks=tuple(disks),
            nics=tuple(nics),
            reinstall=env.get("INSTANCE_REINSTALL", "") == "1",
            old_name=_opt(env, "OLD_INSTANCE_NAME"),
            raw=env,
        )

    def require_instance(self) -> InstanceInfo:
        if self.instance is None:
            raise E.UsageError(
                "INSTANCE_NAME is not set: run the script through Ganeti or ganeti-vol "
                "(see 'ganeti-vol instance env')"
            )
        return self.instance

    def disk(self, index: int) -> DiskInfo:
        if not 0 <= index < len(self.disks):
            raise E.UsageError(
                f"instance '{self.instance.name if self.instance else '?'}' has no disk {index} "
                f"(DISK_COUNT={len(self.disks)})"
            )
        return self.disks[index]

    def transfer_disk(self, op: str) -> TransferDisk:
        """The disk of an export (``op="export"``) or import: index, device, disk info.

        The device is ``<OP>_DEVICE`` (a snapshot or loop device on a real
        node), else ``<OP>_DISK_PATH``, else ``DISK_<index>_PATH``.
        """
        if op not in ("export", "import"):
            raise E.ProgrammerError(f"transfer_disk: op must be export or import, not {op!r}")
        prefix = op.upper()
        index = _env_int(self.raw, f"{prefix}_INDEX")
        if index is None:
            raise E.UsageError(
                f"{prefix}_INDEX is not set: the {op} script runs once per disk, started by "
                f"Ganeti or 'ganeti-vol {op}'"
            )
        disk = self.disks[index] if 0 <= index < len(self.disks) else None
        if self.disks and disk is None:
            raise E.UsageError(f"{prefix}_INDEX={index} but DISK_COUNT={len(self.disks)}")
        device = (_opt(self.raw, f"{prefix}_DEVICE") or _opt(self.raw, f"{prefix}_DISK_PATH")
                  or (disk.path if disk else None))
        if not device:
            raise E.UsageError(f"{prefix}_DEVICE is not set: no disk to {op}")
        return TransferDisk(op, index, device, disk, _opt(self.raw, f"{prefix}_DISK_URI"))

    def variant_config(self, os_dir: str) -> dict[str, str]:
        """``<os_dir>/variants/<variant>.conf`` as a dict ({} if there is no such file)."""
        if not self.variant:
            return {}
        if not C.EXT_PLUGIN_MASK.match(self.variant):
            raise E.OSDefinitionError(f"invalid variant name '{self.variant}'")
        path = os.path.join(os_dir, "variants", f"{self.variant}.conf")
        return read_config(path) if os.path.exists(path) else {}


def read_config(path: str) -> dict[str, str]:
    """``KEY=VALUE`` lines (shell quoting, ``#`` comments, optional ``export``) as a dict.

    The subset of shell that variant files of shell OS definitions use; no
    expansion is done.  A malformed line is a ConfigError naming file:line.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise E.ConfigError(f"cannot read '{path}': {err.strerror}") from err
    out: dict[str, str] = {}
    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.startswith("export "):
            text = text[7:].strip()
        key, sep, value = text.partition("=")
        if not sep or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise E.ConfigError(
                f"invalid line in '{path}':{lineno}: expected KEY=VALUE, got {line!r}"
            )
        try:
            words = shlex.split(value, comments=True)
        except ValueError as err:
            raise E.ConfigError(f"invalid value in '{path}':{lineno}: {err}") from None
        out[key] = " ".join(words)
    return out


# --- EXP_SIZE_FD, export and import -----------------------------------------------------


def announce_size(size: int, environ: Mapping[str, str] | None = None) -> bool:
    """Write ``size`` on ``EXP_SIZE_FD`` if it is set; True if it was.

    Works for any fd number (a shell needs bash for fds above 9).
    """
    fd = rawio.size_fd_from_env(environ)
    if fd is None:
        return False
    rawio.announce_size(size, fd)
    return True


def export_disk(env: OSEnv, out_fd: int = 1) -> rawio.CopySummary:
    """Write the export disk raw to ``out_fd`` (stdout), announcing its size first."""
    disk = env.transfer_disk("export")
    return rawio.dump(disk.device, out_fd, environ=env.raw)


def import_disk(
    env: OSEnv, in_fd: int = 0, *, known_zero: bool | None = None, verify: bool = False
) -> rawio.CopySummary:
    """Write the raw disk read from ``in_fd`` (stdin) into the import disk; never truncates.

    ``verify``: read it back from the disk and compare (``restore --verify``).
    """
    disk = env.transfer_disk("import")
    return rawio.restore(in_fd, disk.device, known_zero=known_zero, verify=verify)


def restore_stream(
    in_fd: int,
    disk_path: str,
    *,
    known_zero: bool | None = None,
    size: int | None = None,
    verify: bool = False,
) -> rawio.CopySummary:
    """Write everything read from ``in_fd`` (a pipe, e.g. a decompressor's stdout) into
    the existing disk ``disk_path``: never truncated, zero runs skipped on a zero
    target, an input larger than the disk stopped at the first byte past its end."""
    return rawio.restore(in_fd, disk_path, known_zero=known_zero, size=size, verify=verify)


def copy_image(
    image: str, disk_path: str, *, known_zero: bool | None = None, verify: bool = False
) -> rawio.CopySummary:
    """Copy a raw image file into a disk: holes skipped, zero runs skipped on a zero
    target, an image larger than the disk refused, the disk never truncated.
    ``verify``: read it back from the disk and compare."""
    return rawio.copy_image(image, disk_path, known_zero=known_zero, verify=verify)


def sha256_file(path: str) -> str:
    """The hex sha256 of a file."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as err:
        raise E.UsageError(f"cannot read '{path}': {err.strerror}") from err


# --- cleanup stack ---------------------------------------------------------------------


def _is_busy(err: Exception) -> bool:
    if isinstance(err, OSError):
        return err.errno == errno.EBUSY
    if isinstance(err, E.BusyError):
        return True
    return isinstance(err, E.ScriptFailed) and "busy" in str(err).lower()


@dataclass
class _Step:
    description: str
    action: Callable[[], Any] | None = None
    exit: Callable[..., Any] | None = None


class CleanupStack:
    """Undo steps, run in reverse order when the ``with`` block ends, however it ends.

    Like :class:`contextlib.ExitStack`, plus:

    - inside the block SIGTERM, SIGINT and SIGHUP raise
      :class:`~ganeti_vol.core.errors.Interrupted` (main thread only), so the steps
      run on those signals too; while they run the signals are held back;
    - each step is logged (``undo: <description>``) before it runs;
    - a callback failing with a busy error (EBUSY, BusyError, a command
      saying "busy") is retried with exponential backoff for up to
      ``busy_timeout`` seconds (umount and losetup -d often are briefly busy);
    - a failing step does not stop the others; the first failure is raised
      afterwards (or added as a note to the exception already propagating).
    """

    def __init__(
        self,
        *,
        signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP),
        busy_timeout: float = 10.0,
    ) -> None:
        self._steps: list[_Step] = []
        self.signals = tuple(signals)
        self.busy_timeout = busy_timeout
        self._previous: dict[int, Any] = {}

    def callback(self, fn: Callable[..., Any], *args: Any, description: str | None = None,
                 **kwargs: Any) -> None:
        """Run ``fn(*args, **kwargs)`` at cleanup (retried while busy)."""
        text = description or str(getattr(fn, "__name__", None) or repr(fn))
        self._steps.append(_Step(text, action=lambda: fn(*args, **kwargs)))

    def enter_context(
        self, cm: contextlib.AbstractContextManager[T], description: str | None = None
    ) -> T:
        """Enter ``cm`` now and exit it at cleanup (not retried: a context exits once)."""
        value = cm.__enter__()
        self._steps.append(_Step(description or f"leave {type(cm).__name__}", exit=cm.__exit__))
        return value

    def __enter__(self) -> CleanupStack:
        self._previous = install_interrupting(self.signals)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            with deferred():
                failure = self._unwind(exc_type, exc, tb)
            # a signal held back meanwhile arrives here, still raising Interrupted
        finally:
            restore(self._previous)
        if failure is None:
            return
        if exc is not None:
            exc.add_note(f"cleanup also failed: {failure}")
            return
        if isinstance(failure, E.GanetiVolError) or not isinstance(failure, Exception):
            raise failure
        raise E.GanetiVolError(f"cleanup failed: {failure}") from failure

    def close(self) -> None:
        """Run the steps now (outside a ``with`` block)."""
        self.__exit__(None, None, None)

    def _unwind(self, exc_type: Any, exc: BaseException | None, tb: Any) -> BaseException | None:
        first: BaseException | None = None
        while self._steps:
            step = self._steps.pop()
            log.info("undo: %s", step.description)
            try:
                if step.exit is not None:
                    step.exit(exc_type, exc, tb)
                elif step.action is not None:
                    retry_busy(step.action, is_busy=_is_busy, timeout=self.busy_timeout,
                                       what=step.description, first_delay=0.25, max_delay=4.0)
            except BaseException as err:  # the other steps still run
                log.error("undo step '%s' failed: %s", step.description, err)
                first = first or err
        return first


# --- block devices ---------------------------------------------------------------------


@dataclass(frozen=True)
class BlockDevice:
    """A disk as a block device (yielded by :func:`block_device`)."""

    device: str
    #: /dev paths of its partitions, in partition-number order
    partitions: tuple[str, ...]
    #: True if it is a loop device attached for the duration of the block
    attached: bool

    def partition(self, number: int) -> str:
        """The /dev path of partition ``number`` (1-based)."""
        if not 1 <= number <= len(self.partitions):
            raise E.DeviceError(
                f"'{self.device}' has no partition {number} (it has {len(self.partitions)})"
            )
        return self.partitions[number - 1]


@contextlib.contextmanager
def block_device(
    path: str, *, read_only: bool = False, partitions: bool = True, tag: str | None = None
) -> Iterator[BlockDevice]:
    """The disk ``path`` as a block device with its partitions, for the ``with`` block.

    A file disk is attached as a loop device (partitions added from its MBR or
    GPT even on kernels without partition parsers) and detached on exit, on
    every path; a block device is used as it is.  Use it with
    ``script.cleanup.enter_context(osapi.block_device(path))``.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise E.DeviceError(f"cannot use disk '{path}': {err.strerror}") from err
    if stat.S_ISBLK(mode):
        parts = tuple(p for _, p, _ in devices.partition_devices(path)) if partitions else ()
        yield BlockDevice(path, parts, False)
        return
    # hold=False: the script's own programs (mkfs, mount, dd) are the device's only users,
    # so each last close writes the cache back and the disk and partition nodes agree
    with loopdev.attached(path, read_only=read_only, partitions=partitions, tag=tag,
                          hold=False) as att:
        yield BlockDevice(att.device, tuple(att.partitions), True)


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
    label = name or env_map.get("OS_NAME") or os.path.basename(os_dir)
    try:
        debug = int(env_map.get("DEBUG_LEVEL", "0") or 0)
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
