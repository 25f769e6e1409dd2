"""Which OS definition a conformance run tests: a path or NAME[+VARIANT], checked like Ganeti."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from ganeti_vol.authoring.conformance.report import MAX_DISKS
from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.core.model import OSDefinition, OSEntry, split_os_name
from ganeti_vol.ganeti import discovery


def resolve(target: str, search_path: Sequence[str]) -> tuple[OSEntry, str]:
    """The OS entry for a path (anything with a '/') or a NAME[+VARIANT], and the variant named."""
    if "/" in target:
        os_dir = os.path.abspath(target)
        if not os.path.isdir(os_dir):
            raise E.OSDefinitionError(f"cannot test '{target}': not a directory")
        return discovery.probe_os(os.path.basename(os.path.normpath(os_dir)), os_dir), ""
    base, variant = split_os_name(target)
    found = discovery.find_os_dir(base, search_path)
    if found is None:
        hint = ""
        if os.path.isdir(target):
            hint = f" (to test the directory '{target}', write ./{target})"
        raise E.OSDefinitionError(
            f"Directory for OS {base} not found in search path "
            f"({', '.join(search_path) or '(empty)'}){hint}", os_name=base,
        )
    return discovery.probe_os(base, found), variant


def full_os_name(os_def: OSDefinition, variant: str) -> str:
    """``name+variant`` (the first variant by default) or the bare name, checked like Ganeti."""
    if os_def.variants and os_def.max_api >= C.OS_API_V15:
        full = f"{os_def.name}{C.VARIANT_DELIM}{variant or os_def.variants[0]}"
    else:
        full = f"{os_def.name}{C.VARIANT_DELIM}{variant}" if variant else os_def.name
    discovery.check_variant(os_def, full)
    return full


def disk_count(value: str | int) -> int:
    """The number of scratch disks ``--disks`` asks for (UsageError unless 1 to MAX_DISKS)."""
    try:
        count = int(str(value).strip())
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_DISKS:
        raise E.UsageError(f"invalid --disks '{value}': give a number of disks from 1 to "
                           f"{MAX_DISKS}")
    return count


def check_bad_params(os_def: OSDefinition, bad: Mapping[str, str]) -> None:
    """Refuse ``--bad-param`` names the OS does not declare, or an OS that runs no verify."""
    if not bad:
        return
    if os_def.max_api < C.OS_API_V20:
        raise E.UsageError(
            f"--bad-param: OS '{os_def.name}' declares API {os_def.max_api} < 20, "
            "so Ganeti runs no verify script"
        )
    for name in bad:
        if name not in os_def.parameter_names:
            raise E.UsageError(
                f"--bad-param {name}: '{name}' is not in parameters.list of OS "
                f"'{os_def.name}' (an undeclared name is always rejected; give a declared "
                "parameter with a bad value)"
            )
