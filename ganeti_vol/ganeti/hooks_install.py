"""Installing the shipped hooks into a node's hooks directory (``ganeti-vol hooks install``).

Idempotent: a file is replaced only if ganeti-vol installed it and nobody
changed it since (a manifest records the hashes); anything else is foreign
and left alone; the operator's settings file is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from ganeti_vol.core import atomicfile
from ganeti_vol.core import errors as E
from ganeti_vol.ganeti.hooks import PHASES, hook_paths_present, scan

#: records what `hooks install` wrote (invisible to run-parts: a dot-file)
MANIFEST = ".ganeti-vol-hooks.json"
#: helper sourced by the shipped hooks, and their settings (operator-owned)
HELPER = "ganeti-vol-hooks.sh"
SETTINGS = "ganeti-vol-hooks.conf"


@dataclass(frozen=True)
class InstallAction:
    """What ``hooks install`` did (or would do) with one file."""

    file: str  # relative to the target, e.g. "instance-add-pre.d/ganeti-vol-verify-params"
    action: str  # installed | updated | unchanged | kept | skipped
    detail: str = ""

    def to_json(self) -> dict[str, str]:
        return {"file": self.file, "action": self.action, "detail": self.detail}


def shipped_files(source: str) -> list[str]:
    """The files to install from ``source``: the helper and every ``*.d/<name>`` hook."""
    out = []
    if os.path.isfile(os.path.join(source, HELPER)):
        out.append(HELPER)
    for hpath in hook_paths_present(source):
        for phase in PHASES:
            out.extend(e.hook for e in scan(source, hpath, phase) if e.runnable)
    return out


def _digest(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def _read_manifest(target: str) -> dict[str, str]:
    try:
        with open(os.path.join(target, MANIFEST), encoding="utf-8") as f:
            data = json.load(f)
        files = data.get("files", {})
        return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


def _write_atomic(path: str, data: bytes, mode: int) -> None:
    """Write ``path`` atomically (:func:`ganeti_vol.core.atomicfile.replace`)."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    atomicfile.replace(path, data, mode)


def settings_text(template: str, values: Mapping[str, str]) -> str:
    """The settings file: the shipped template with ``KEY=`` lines set to ``values``."""
    lines = []
    for line in template.splitlines():
        key = line.split("=", 1)[0].lstrip("# ").strip()
        if "=" in line and key in values:
            line = f"{key}={shlex.quote(values[key])}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def install(
    source: str, target: str, settings: Mapping[str, str], *, dry_run: bool = False
) -> list[InstallAction]:
    """Install the shipped hooks from ``source`` into the hooks dir ``target``.

    Idempotent.  A file is replaced only if ganeti-vol installed it and it is
    unchanged since (the manifest records its hash); any other existing file
    of the same name is *foreign* and skipped.  An identical file is adopted.
    The settings file is written only if absent.  Disabled hooks (made
    non-executable by the operator) stay disabled.
    """
    if os.path.realpath(source) == os.path.realpath(target):
        raise E.UsageError(f"cannot install hooks into '{target}': it is the shipped directory")
    manifest = _read_manifest(target)
    before = dict(manifest)
    actions = []
    for rel in shipped_files(source):
        actions.append(_install_one(source, target, rel, manifest, dry_run))
    actions.append(_install_settings(source, target, settings, dry_run))
    if not dry_run and manifest != before:
        try:
            _write_atomic(os.path.join(target, MANIFEST),
                          (json.dumps({"format": 1, "files": manifest}, indent=1,
                                      sort_keys=True) + "\n").encode(), 0o644)
        except OSError as err:
            raise _install_error(target, MANIFEST, err) from err
    return actions


def _install_error(target: str, rel: str, err: OSError) -> E.GanetiVolError:
    return E.GanetiVolError(f"cannot install '{rel}' into hooks directory '{target}': "
                            f"{err.strerror or err}")


def _install_one(source: str, target: str, rel: str, manifest: dict[str, str],
                 dry_run: bool) -> InstallAction:
    src, dst = os.path.join(source, rel), os.path.join(target, rel)
    with open(src, "rb") as f:
        data = f.read()
    new = hashlib.sha256(data).hexdigest()
    mode = 0o755
    if os.path.lexists(dst):
        if os.path.islink(dst) or not os.path.isfile(dst):
            return InstallAction(rel, "skipped", "foreign: not a regular file; left alone")
        current = _digest(dst)
        if current == new:
            manifest[rel] = new
            disabled = "" if os.access(dst, os.X_OK) else " (disabled: not executable)"
            return InstallAction(rel, "unchanged", "up to date" + disabled)
        if manifest.get(rel) != current:
            return InstallAction(rel, "skipped", "foreign: not installed by ganeti-vol, or "
                                 "changed since; left alone (remove or rename it to install ours)")
        mode = stat.S_IMODE(os.stat(dst).st_mode)  # keeps a hook the operator disabled disabled
        action = "updated"
    else:
        action = "installed"
    if not dry_run:
        try:
            _write_atomic(dst, data, mode)
        except OSError as err:
            raise _install_error(target, rel, err) from err
        manifest[rel] = new
    return InstallAction(rel, action)


def _install_settings(source: str, target: str, settings: Mapping[str, str],
                      dry_run: bool) -> InstallAction:
    dst = os.path.join(target, SETTINGS)
    if os.path.lexists(dst):
        return InstallAction(SETTINGS, "kept", "the operator's settings are never overwritten")
    try:
        with open(os.path.join(source, SETTINGS), encoding="utf-8") as f:
            template = f.read()
    except OSError:
        template = ""
    if not dry_run:
        try:
            _write_atomic(dst, settings_text(template, settings).encode(), 0o644)
        except OSError as err:
            raise _install_error(target, SETTINGS, err) from err
    return InstallAction(SETTINGS, "installed")
