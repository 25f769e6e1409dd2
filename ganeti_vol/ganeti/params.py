"""Hypervisor and backend parameters as Ganeti checks and fills them.

Ganeti hands every OS script and hook the instance's hypervisor (``-H``) and
backend (``-B``) parameters *filled* with the cluster's defaults: 65
``INSTANCE_HV_*`` for kvm, six ``INSTANCE_BE_*``, and ``DISK_<n>_FRONTEND_TYPE``
from the filled ``disk_type``.  ganeti-vol ships the defaults of a fresh
Ganeti 3.0 cluster (``ganeti_vol/data/ganeti-defaults.json``, taken from
Ganeti's ``constants.py`` by ``tests/ganeti_reference.py``) and fills them
in unless the instance says otherwise.

:func:`check` does what ``gnt-instance add`` does with ``-H``/``-B``
(``utils.ForceDictType`` and the hypervisor's ``CheckParameterSyntax``):
unknown names are refused, and values are brought to Ganeti's types, so that
``serial_console=true`` reaches the scripts as ``True`` and ``maxmem=1G`` as
``1024``, as under Ganeti.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

from ganeti_vol.core.model import printable

DATA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                         "ganeti-defaults.json")

_UNIT_RE = re.compile(r"^([.\d]+)\s*([a-zA-Z]+)?$")
#: names of hypervisor and backend parameters (Ganeti's are lower case, digits and '_')
_HV_BE_NAME_RE = re.compile(r"[A-Za-z0-9_]+")
#: OS parameter names: anything an environment variable name can carry on one line
_OS_NAME_RE = re.compile(r"[^\s=]+")


@functools.cache
def _data() -> dict[str, Any]:
    with open(DATA_FILE, encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def hypervisors() -> tuple[str, ...]:
    """The hypervisor names Ganeti knows."""
    return tuple(sorted(_data()["hypervisor_defaults"]))


def hv_defaults(hypervisor: str) -> dict[str, Any]:
    """Ganeti's defaults for ``hypervisor`` ({} for one Ganeti does not know)."""
    return dict(_data()["hypervisor_defaults"].get(hypervisor, {}))


def hv_globals() -> frozenset[str]:
    """Cluster-wide hypervisor parameters (``HVC_GLOBALS``): never in an export's config.ini."""
    return frozenset(_data()["hypervisor_globals"])


def be_defaults() -> dict[str, Any]:
    return dict(_data()["backend_defaults"])


def text(value: Any) -> str:
    """A typed value as Ganeti puts it in the environment (``str()``: ``True``, ``128``)."""
    return str(value)


def parse_unit(value: str) -> int:
    """Ganeti ``utils.ParseUnit``: MiB, rounded up to a multiple of 4."""
    m = _UNIT_RE.match(value)
    if not m:
        raise ValueError("invalid format")
    try:
        number = float(m.group(1))
    except ValueError:
        raise ValueError("invalid format") from None
    unit = (m.group(2) or "m").lower()
    scale = {"m": 1, "mb": 1, "mib": 1, "g": 1024, "gb": 1024, "gib": 1024,
             "t": 1 << 20, "tb": 1 << 20, "tib": 1 << 20}.get(unit)
    if scale is None:
        raise ValueError(f"unknown unit: {m.group(2)}")
    mib = math.ceil(number * scale)
    return mib + (-mib % 4)


def _typed(kind: str, value: str) -> Any:
    """One value brought to Ganeti's type (``utils.ForceDictType``); ValueError if it is not."""
    if kind == "bool":
        if value.lower() == "true":
            return True
        if value.lower() in ("false", ""):
            return False
        raise ValueError("is not a valid boolean (true or false)")
    if kind == "int":
        try:
            return int(value)
        except ValueError:
            raise ValueError("is not a valid integer") from None
    if kind == "float":
        try:
            return float(value)
        except ValueError:
            raise ValueError("is not a valid number") from None
    if kind == "size":
        try:
            return parse_unit(value)
        except ValueError as err:
            raise ValueError(f"is not a valid size ({err})") from None
    return value  # string, maybe-string


def name_problem(kind: str, name: str) -> str | None:
    """Why ``name`` cannot be a parameter name of ``kind`` (``os``, ``hv``, ``be``), or None.

    The name ends up in an environment variable name (``OSP_<NAME>``,
    ``INSTANCE_HV_<name>``) and in config.ini, where a newline or ``=``
    would change the file's structure.
    """
    if kind == "os":
        if _OS_NAME_RE.fullmatch(name) and name.isprintable():
            return None
        return "invalid name (no whitespace, '=' or control characters)"
    if _HV_BE_NAME_RE.fullmatch(name):
        return None
    return "invalid name (letters, digits and '_' only)"


def check(
    kind: str, params: Mapping[str, str], hypervisor: str
) -> tuple[dict[str, str], list[str]]:
    """``(normalised params, problems)`` for ``kind`` ``"hv"`` or ``"be"``.

    A problem reads ``<name>: <why>``.  Names must be parameters Ganeti
    knows for the hypervisor (backend names are the same for all); for a
    hypervisor Ganeti does not know, only names of letters, digits and ``_``
    are accepted, and the values are kept as given.
    """
    data = _data()
    if kind == "hv":
        known = data["hypervisor_defaults"].get(hypervisor)
        types = data["hypervisor_types"]
        label = f"{hypervisor} hypervisor parameter"
    elif kind == "be":
        known = types = data["backend_types"]
        label = "backend parameter"
    else:
        raise ValueError(f"unknown parameter kind {kind!r}")
    out: dict[str, str] = {}
    problems: list[str] = []
    for name, value in params.items():
        value = str(value)
        if known is None:
            problem = name_problem(kind, name)
            if problem:
                problems.append(f"{printable(name)}: {problem}")
            else:
                out[name] = value
            continue
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            problems.append(f"{printable(name)}: unknown {label}{hint}")
            continue
        try:
            out[name] = text(_typed(types[name], value))
        except ValueError as err:
            problems.append(f"{name}: '{printable(value)}' {err}")
    return out, problems


def filled_hv(hypervisor: str, hvparams: Mapping[str, str]) -> dict[str, str]:
    """Ganeti ``Cluster.FillHV``: the defaults of ``hypervisor`` with ``hvparams`` over them."""
    filled = {k: text(v) for k, v in hv_defaults(hypervisor).items()}
    filled.update((k, str(v)) for k, v in hvparams.items())
    return filled


def filled_be(beparams: Mapping[str, str]) -> dict[str, str]:
    """Ganeti ``Cluster.FillBE`` (an old export's ``memory`` stands for maxmem and minmem)."""
    be = {k: str(v) for k, v in beparams.items()}
    if "memory" in be:
        memory = be.pop("memory")
        be.setdefault("maxmem", memory)
        be.setdefault("minmem", memory)
    filled = {k: text(v) for k, v in be_defaults().items()}
    filled.update(be)
    return filled
