"""What the operations return: frozen results that carry their warnings.

Each result is a frozen dataclass; ``to_json()`` gives the dict the CLI
prints with ``--json`` (key order included).  ``warnings`` holds what went
wrong without failing the operation: a :class:`~ganeti_vol.core.errors.PostHookWarning`
for failed post hooks (exit 11), the error of a failed rename script after an
import (exit 1).  The CLI derives its exit code from them
(:func:`ganeti_vol.cli.common.finish`), never from the hooks runner's state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ganeti_vol.core import errors as E
from ganeti_vol.engine.chunks import DecodeSummary, EncodeSummary


def warnings_of(*found: E.GanetiVolError | None) -> tuple[E.GanetiVolError, ...]:
    """The warnings among ``found`` (None: nothing to warn about), in order."""
    return tuple(w for w in found if w is not None)


def _mb_per_s(size: int, elapsed: float) -> float | None:
    return round(size / elapsed / 1e6, 1) if elapsed > 0 else None


@dataclass(frozen=True)
class Result:
    """The part every operation result shares: its warnings, and its JSON form."""

    warnings: tuple[E.GanetiVolError, ...] = field(default=(), kw_only=True)

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError



# --- export and import -------------------------------------------------------------------


@dataclass(frozen=True)
class DiskExport:
    """What the export of one disk did."""

    summary: EncodeSummary
    index: int
    #: "script" (the export script's stdout) or "raw" (the disk read directly)
    mode: str
    log: str | None
    snapshot: dict[str, Any]

    @property
    def size(self) -> int:
        return self.summary.size

    @property
    def stored_bytes(self) -> int:
        return self.summary.stored_bytes

    def to_json(self) -> dict[str, Any]:
        return {**self.summary.as_dict(), "index": self.index, "mode": self.mode,
                "log": self.log, "snapshot": self.snapshot}


@dataclass(frozen=True)
class ExportResult(Result):
    """What :func:`ganeti_vol.ops.transfer.export_instance` did."""

    instance: str
    os: str
    mode: str
    format: str
    #: the archive, the snapshot (``REPO::ID``), or "-" for a stream
    path: str
    disks: tuple[DiskExport, ...]
    elapsed: float
    #: what the destination adds (a repository's figures under "repository")
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(d.size for d in self.disks)

    @property
    def stored_bytes(self) -> int:
        return sum(d.stored_bytes or 0 for d in self.disks)

    def to_json(self) -> dict[str, Any]:
        size, stored = self.size, self.stored_bytes
        return {
            "operation": "export",
            "instance": self.instance,
            "os": self.os,
            "mode": self.mode,
            "format": self.format,
            "path": self.path,
            "disks": [d.to_json() for d in self.disks],
            "size": size,
            "stored_bytes": stored,
            "ratio": round(size / stored, 2) if stored else None,
            "seconds": round(self.elapsed, 3),
            "mb_per_s": _mb_per_s(size, self.elapsed),
            "status": "ok",
            **self.extra,
        }


@dataclass(frozen=True)
class DiskImport:
    """What the import of one disk did (it is good: a failed disk raises)."""

    summary: DecodeSummary
    index: int
    #: "script" (fed to the import script) or "raw" (written directly)
    mode: str
    target: str | None
    log: str | None

    @property
    def size(self) -> int:
        return self.summary.size

    @property
    def stored_bytes(self) -> None:
        """An import stores nothing (see :attr:`DiskExport.stored_bytes`)."""
        return None

    def to_json(self) -> dict[str, Any]:
        return {**self.summary.as_dict(), "index": self.index, "mode": self.mode,
                "target": self.target, "log": self.log, "state": "good"}


@dataclass(frozen=True)
class ImportRename:
    """The rename script run after an import under a new name (a failure is a warning)."""

    old_name: str
    log: str
    script_duration: float | None = None
    #: why the script failed (None: it succeeded); a warning of the import
    failure: E.ScriptError | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    def to_json(self) -> dict[str, Any]:
        if self.failure is not None:
            return {"status": "failed", "old_name": self.old_name, "error": str(self.failure),
                    "log": self.log}
        return {"status": "ok", "old_name": self.old_name, "log": self.log,
                "script_duration": self.script_duration}


@dataclass(frozen=True)
class ImportResult(Result):
    """What :func:`ganeti_vol.ops.transfer.import_instance` did."""

    instance: str
    os: str
    #: the archive, the snapshot (``REPO::ID``), or "-" for a stream
    source: str
    source_format: str
    disks: tuple[DiskImport, ...]
    elapsed: float
    #: the mark of the broken instance this import repaired (None: it was not broken)
    repaired: str | None = None
    rename: ImportRename | None = None
    #: what the caller adds (an image's origin under "origin")
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(d.size for d in self.disks)

    @property
    def status(self) -> str:
        return "warning" if self.rename is not None and not self.rename.ok else "ok"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "operation": "import",
            "instance": self.instance,
            "os": self.os,
            "source": self.source,
            "source_format": self.source_format,
            "disks": [d.to_json() for d in self.disks],
            "size": self.size,
            "status": self.status,
        }
        if self.repaired is not None:
            out["repaired"] = self.repaired
        if self.rename is not None:
            out["rename"] = self.rename.to_json()
        out["seconds"] = round(self.elapsed, 3)
        out["mb_per_s"] = _mb_per_s(self.size, self.elapsed)
        return {**out, **self.extra}


# --- create, reinstall, rename -----------------------------------------------------------


@dataclass(frozen=True)
class CreateResult(Result):
    """What :func:`ganeti_vol.ops.operations.create` did (a create or a reinstall)."""

    reinstall: bool
    instance: str
    os: str
    os_path: str
    disks_created: tuple[str, ...]
    log: str
    script_duration: float
    duration: float

    def to_json(self) -> dict[str, Any]:
        return {
            "operation": "reinstall" if self.reinstall else "create",
            "instance": self.instance,
            "os": self.os,
            "os_path": self.os_path,
            "disks_created": list(self.disks_created),
            "log": self.log,
            "script_duration": self.script_duration,
            "duration": self.duration,
            "status": "ok",
        }


@dataclass(frozen=True)
class RenameResult(Result):
    """What :func:`ganeti_vol.ops.operations.rename` did."""

    instance: str
    old_name: str
    os: str
    instance_file_updated: bool
    log: str
    script_duration: float

    def to_json(self) -> dict[str, Any]:
        return {
            "operation": "rename",
            "instance": self.instance,
            "old_name": self.old_name,
            "os": self.os,
            "instance_file_updated": self.instance_file_updated,
            "status": "ok",
            "log": self.log,
            "script_duration": self.script_duration,
        }
