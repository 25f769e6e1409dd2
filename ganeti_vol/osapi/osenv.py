"""The environment an OS script gets, parsed once: :class:`OSEnv` with its instance,
disks, NICs and parameters.

The model (:class:`InstanceInfo`, :class:`DiskInfo`, :class:`NicInfo`,
:class:`TransferDisk`) and the parser are the environment contract's own
(:mod:`ganeti_vol.ganeti.environment`); here they get the OS parameters
(:class:`~ganeti_vol.osapi.values.OSParams`) and variant files.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.ganeti import environment as V
from ganeti_vol.ganeti.environment import (
    DiskInfo as DiskInfo,
    InstanceInfo as InstanceInfo,
    NicInfo as NicInfo,
    TransferDisk as TransferDisk,
)
from ganeti_vol.osapi.values import OSParams

log = logging.getLogger(__name__)


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
        instance = V.parse_instance(env)
        disks = V.parse_disks(env)
        nics = V.parse_nics(env)
        return cls(
            os_name=env.get(V.OS_NAME, ""),
            variant=env.get(V.OS_VARIANT, ""),
            api_version=V.env_int(env, V.OS_API_VERSION),
            debug_level=V.env_int(env, V.DEBUG_LEVEL, 0) or 0,
            params=OSParams.from_environ(env),
            instance=instance,
            disks=disks,
            nics=nics,
            reinstall=env.get(V.INSTANCE_REINSTALL, "") == "1",
            old_name=V.optional(env, V.OLD_INSTANCE_NAME),
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
        return V.parse_transfer(self.raw, op, self.disks)

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
