"""Find and validate OS definitions the way Ganeti's ``lib/backend.py`` does.

Three entry points share one checklist (:func:`probe_os`):

- :func:`probe_os` never raises: it returns an :class:`OSEntry` with the
  diagnosis (Ganeti ``_TryOSFromDisk``);
- :func:`load_os` returns an :class:`OSDefinition` or raises
  :class:`OSDefinitionError` (Ganeti ``OSFromDisk``);
- :func:`diagnose` lists every entry of every search directory, valid or
  not, with shadowed duplicates (Ganeti ``DiagnoseOS``).

Departures from Ganeti are listed in ``doc/os-discovery.md``.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.core.lazy import lazy
from ganeti_vol.core.model import OSDefinition, OSEntry, printable, split_os_name

# configobj (in the config module) loads only for an OS with a ganeti_vol.conf
if TYPE_CHECKING:
    from ganeti_vol.ganeti import config as cfgmod
else:
    cfgmod = lazy("ganeti_vol.ganeti.config")

log = logging.getLogger(__name__)


class _Invalid(Exception):
    """Internal: carries one diagnosis message."""


def _errno_text(err: OSError) -> str:
    """``ENOENT: No such file or directory`` (Ganeti prints only the name)."""
    if err.errno and err.errno in errno.errorcode:
        return f"{errno.errorcode[err.errno]}: {err.strerror}"
    return str(err)


def find_os_dir(name: str, search_path: Sequence[str]) -> str | None:
    """First search directory holding ``name`` as a directory (Ganeti ``FindFile``)."""
    if not C.EXT_PLUGIN_MASK.match(name):
        return None
    for top in search_path:
        candidate = os.path.join(top, name)
        if os.path.isdir(candidate):
            return candidate
    return None


#: the most read of an OS definition's text files (real ones have a few hundred bytes);
#: a bigger file makes the OS invalid instead of costing memory
MAX_OS_FILE_BYTES = 64 << 10


def _read_os_text(path: str, filename: str, os_dir: str, what: str) -> str:
    """A text file of an OS definition: at most MAX_OS_FILE_BYTES, strict UTF-8, no NUL.

    Ganeti reads these as UTF-8 and crashes on other bytes; we make the OS
    invalid with a message that says where the bad byte is.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_OS_FILE_BYTES + 1)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise _Invalid(
            f"Error while reading the {what} file at {path}: {_errno_text(err)}") from None
    if len(data) > MAX_OS_FILE_BYTES:
        raise _Invalid(f"File '{filename}' under path '{os_dir}' is too large "
                       f"(more than {MAX_OS_FILE_BYTES >> 10} KiB)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise _Invalid(f"File '{filename}' under path '{os_dir}' is not UTF-8 text "
                       f"(byte 0x{data[err.start]:02x} on line {line})") from None
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise _Invalid(f"File '{filename}' under path '{os_dir}' contains a NUL byte "
                       f"(line {line})")
    return text


def read_api_versions(os_dir: str) -> list[int]:
    """Parse ``ganeti_api_version``: one integer per line (Ganeti ``_OSOndiskAPIVersion``)."""
    api_file = os.path.join(os_dir, C.OS_API_FILE)
    try:
        st = os.stat(api_file)
    except OSError as err:
        raise _Invalid(
            f"Required file '{C.OS_API_FILE}' not found under path {os_dir}: {_errno_text(err)}"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise _Invalid(f"File '{C.OS_API_FILE}' in {os_dir} is not a regular file")
    try:
        text = _read_os_text(api_file, C.OS_API_FILE, os_dir, "API version")
    except FileNotFoundError as err:
        raise _Invalid(
            f"Error while reading the API version file at {api_file}: {_errno_text(err)}"
        ) from None
    versions = []
    for lineno, line in enumerate(text.splitlines(), 1):
        try:
            versions.append(int(line.strip()))
        except ValueError:
            raise _Invalid(
                f"API version(s) can't be converted to integer: line {lineno} of {api_file} "
                f"is {line!r}"
            ) from None
    return versions


def _read_lines(path: str, what: str) -> list[str] | None:
    """Lines of an optional text file; None if it does not exist."""
    try:
        text = _read_os_text(path, os.path.basename(path), os.path.dirname(path), f"OS {what}")
    except FileNotFoundError:
        return None
    return text.splitlines()


def parse_variants(lines: list[str]) -> tuple[str, ...]:
    """Strip, drop blank and ``#`` lines, keep order (Ganeti ``FilterEmptyLinesAndComments``)."""
    out = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return tuple(out)


def parse_parameters(lines: list[str]) -> tuple[tuple[str, str], ...]:
    """``name<whitespace>description`` per line.

    Ganeti crashes on blank lines and on name-only lines; we skip blank and
    ``#`` lines and give name-only lines an empty description.
    """
    out = []
    for line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        parts = stripped.split(None, 1)
        out.append((parts[0], parts[1].strip() if len(parts) > 1 else ""))
    return tuple(out)


def _required_files(max_api: int) -> dict[str, bool]:
    """File name -> required?, gated by the *maximum declared* version as Ganeti does."""
    files = {name: True for name in C.OS_SCRIPTS}
    files[C.OS_SCRIPT_CREATE] = False
    files[C.OS_SCRIPT_CREATE_UNTRUSTED] = False
    if max_api >= C.OS_API_V15:
        files[C.OS_VARIANTS_FILE] = False
    if max_api >= C.OS_API_V20:
        files[C.OS_PARAMETERS_FILE] = True
    else:
        del files[C.OS_SCRIPT_VERIFY]
    return files


def _check_os_dir(name: str, os_dir: str) -> OSDefinition:
    versions = read_api_versions(os_dir)
    if not set(versions) & C.OS_API_VERSIONS:
        raise _Invalid(
            f"API version mismatch for path '{os_dir}': found {versions}, "
            f"want {sorted(C.OS_API_VERSIONS)}."
        )
    max_api = max(versions)
    scripts: dict[str, str] = {}
    present: set[str] = set()
    for filename, required in _required_files(max_api).items():
        path = os.path.join(os_dir, filename)
        try:
            st = os.stat(path)  # follows symlinks, like Ganeti
        except OSError as err:
            if err.errno == errno.ENOENT and not required:
                continue
            raise _Invalid(
                f"File '{filename}' under path '{os_dir}' is missing ({_errno_text(err)})"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise _Invalid(f"File '{filename}' under path '{os_dir}' is not a regular file")
        if filename in C.OS_SCRIPTS:
            if not st.st_mode & stat.S_IXUSR:
                raise _Invalid(f"File '{filename}' under path '{os_dir}' is not executable")
            scripts[filename] = path
        present.add(filename)
    if C.OS_SCRIPT_CREATE not in scripts and C.OS_SCRIPT_CREATE_UNTRUSTED not in scripts:
        raise _Invalid(
            f"A create script (trusted or untrusted) under path '{os_dir}' must exist"
        )
    variants: tuple[str, ...] = ()
    if C.OS_VARIANTS_FILE in present:
        lines = _read_lines(os.path.join(os_dir, C.OS_VARIANTS_FILE), "variants")
        variants = parse_variants(lines or [])
    parameters: tuple[tuple[str, str], ...] = ()
    if C.OS_PARAMETERS_FILE in present:
        lines = _read_lines(os.path.join(os_dir, C.OS_PARAMETERS_FILE), "parameters")
        parameters = parse_parameters(lines or [])
    return OSDefinition(
        name=name,
        path=os_dir,
        api_versions=tuple(versions),
        scripts=scripts,
        variants=variants,
        parameters=parameters,
        **_block_device_options(os_dir),
    )


def _block_device_options(os_dir: str) -> dict[str, bool]:
    """ganeti-vol extension: ``ganeti_vol.conf`` with ``[disks] access = block``."""
    path = os.path.join(os_dir, C.OS_BLOCKDEV_FILE)
    if not os.path.lexists(path):
        return {}
    try:
        disks = cfgmod.load_os_extension(path)
    except E.ConfigError as err:  # one line, as every other diagnosis
        problems = "; ".join(p.strip() for p in str(getattr(err, "problems", err)).splitlines())
        raise _Invalid(f"File '{C.OS_BLOCKDEV_FILE}' under path '{os_dir}' is invalid: "
                       f"{problems}") from None
    return {
        "wants_block_devices": disks.get("access") == "block",
        "block_partitions": bool(disks.get("partitions", True)),
        "empty_after_create": bool(disks.get("empty_after_create", False)),
    }


def probe_os(name: str, os_dir: str) -> OSEntry:
    """Validate one OS directory; never raises.

    The diagnosis is always one line: a name or path with a newline (a
    directory may be called anything) is shown escaped, so it cannot forge
    lines of ``os diagnose``.
    """
    if not C.EXT_PLUGIN_MASK.match(name):
        return OSEntry(
            name,
            os_dir,
            False,
            f"Directory for OS {name if name.isprintable() else repr(name)} not found in "
            "search path "
            f"(name does not match {C.EXT_PLUGIN_MASK.pattern})",
        )
    if not os.path.isdir(os_dir):
        return OSEntry(
            name, os_dir, False, f"Directory for OS {name} not found in search path (not a directory)"
        )
    try:
        os_def = _check_os_dir(name, os_dir)
    except _Invalid as err:
        return OSEntry(name, os_dir, False, printable(str(err)))
    except (OSError, ValueError, E.GanetiVolError) as err:  # never let one OS break the listing
        return OSEntry(name, os_dir, False, printable(f"cannot check '{os_dir}': {err}"))
    return OSEntry(name, os_dir, True, "", os_def)


def load_os(name: str, search_path: Sequence[str]) -> OSDefinition:
    """Load the OS ``name`` (a ``+variant`` suffix is ignored) or raise OSDefinitionError."""
    base, _ = split_os_name(name)
    os_dir = find_os_dir(base, search_path)
    if os_dir is None:
        where = ", ".join(search_path) or "(empty)"
        raise E.OSDefinitionError(
            f"Directory for OS {base} not found in search path ({where})",
            os_name=base,
        )
    entry = probe_os(base, os_dir)
    if not entry.valid or entry.os is None:
        raise E.OSDefinitionError(f"invalid OS '{base}': {entry.diagnose}", os_name=base)
    return entry.os


def _visible_entries(top: str) -> list[str]:
    """Ganeti ``ListVisibleFiles``: skip dot-files and ``lost+found`` at a mount point."""
    names = sorted(os.listdir(top))
    out = []
    for n in names:
        if n.startswith("."):
            continue
        if n == "lost+found" and os.path.ismount(top):
            continue
        out.append(n)
    return out


def diagnose(search_path: Sequence[str]) -> list[OSEntry]:
    """Every entry of every search directory; later duplicates are attached as shadowed.

    Unlike Ganeti, an unreadable search directory is logged and skipped
    instead of ending the scan.
    """
    by_name: dict[str, list[OSEntry]] = {}
    order: list[str] = []
    for top in search_path:
        if not os.path.isdir(top):
            continue
        try:
            names = _visible_entries(top)
        except OSError as err:
            log.warning("cannot list OS directory '%s': %s", top, err.strerror)
            continue
        for name in names:
            entry = probe_os(name, os.path.join(top, name))
            if name not in by_name:
                by_name[name] = []
                order.append(name)
            by_name[name].append(entry)
    result = []
    for name in sorted(order):
        first, *rest = by_name[name]
        result.append(
            OSEntry(first.name, first.path, first.valid, first.diagnose, first.os, tuple(rest))
        )
    return result


def check_variant(os_def: OSDefinition, full_name: str) -> None:
    """Ganeti ``_CheckOSVariant``."""
    base, variant = split_os_name(full_name)
    if not os_def.variants or os_def.max_api < C.OS_API_V15:
        if variant:
            raise E.OSDefinitionError(
                f"OS '{base}' does not support variants ('{variant}' passed)"
            )
        return
    if not variant:
        raise E.OSDefinitionError(
            f"OS name '{base}' must include a variant "
            f"(one of: {', '.join(os_def.variants)})"
        )
    if variant not in os_def.variants:
        raise E.OSDefinitionError(
            f"OS '{base}' does not support variant '{variant}' "
            f"(supported: {', '.join(os_def.variants)})"
        )


def check_parameters(os_def: OSDefinition, names: Sequence[str]) -> None:
    """Ganeti ``_CheckOSPList``: only for API >= 20."""
    unknown = sorted(set(names) - set(os_def.parameter_names))
    if unknown:
        raise E.OSDefinitionError(
            f"The following parameters are not supported by the OS {os_def.name}: "
            f"{', '.join(unknown)}"
        )
