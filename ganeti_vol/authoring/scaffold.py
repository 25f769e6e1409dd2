"""``ganeti-vol os new`` and ``os install``: make an OS definition from a template, install one.

A scaffold is rendered from ``ganeti_vol/templates/`` (:mod:`ganeti_vol.authoring.templates`):

- ``common/`` gives every OS ``ganeti_api_version`` (20, 15, 10),
  ``variants.list``, ``parameters.list``, ``README.md`` and ``ganeti-vol.sh``
  (sourced by the scripts: finds a Python with ganeti_vol, shell helpers);
- ``<template>/`` gives the scripts; a script the template lacks is the
  ``common/launcher`` that runs ``osdef.py`` (the Python templates);
- ``<template>/variants/_variant.conf`` is rendered once per variant;
- ``common/_*`` are parts that other templates include (``_try-it.md``: the README's
  commands), not files of their own;
- a ``.j2`` suffix is dropped (``osdef.py.j2`` -> ``osdef.py``: the template
  is not Python until rendered).

Rendered text that starts with ``#!`` is made executable.  The ``image``
template (Python) and ``image-sh`` (the same OS as POSIX shell scripts over
``ganeti-vol.sh`` and its own ``image.sh``) also get a small gzip'd sample
image with its ``.sha256``, so the new OS can be created and tested at once.
A template file overrides the ``common/`` file of the same path (``image-sh``
has its own ``README.md``).  The shipped ``os-definitions/raw`` and
``os-definitions/image`` are these templates rendered with their names (a test
keeps them in step).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ganeti_vol import __version__
from ganeti_vol.authoring import templates
from ganeti_vol.core import atomicfile, paths
from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.ganeti import discovery
from ganeti_vol.ganeti import environment as env_mod

log = logging.getLogger(__name__)

TYPES = ("str", "bool", "int", "list")
PARAM_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
SCRIPTS = (
    C.OS_SCRIPT_CREATE, C.OS_SCRIPT_EXPORT, C.OS_SCRIPT_IMPORT, C.OS_SCRIPT_RENAME,
    C.OS_SCRIPT_VERIFY,
)
LAUNCHER = "common/launcher"
#: ``common/_*`` files are parts included by other templates, not files of the new OS
PARTIAL_PREFIX = "_"
VARIANT_TEMPLATE = "variants/_variant.conf"
SAMPLE_IMAGE = "images/sample.img.gz"
#: the file in an OS dir naming the Python interpreter that has ganeti_vol (ganeti-vol.sh)
PYTHON_FILE = "ganeti-vol.python"


@dataclass(frozen=True)
class ParamSpec:
    """A declared OS parameter: its name, type (for verify) and description."""

    name: str
    type: str
    description: str

    def context(self) -> dict[str, str]:
        return {"name": self.name, "type": self.type, "description": self.description,
                "env": env_mod.osp_name(self.name)}


#: parameters each template declares before the user's --param ones
BUILTIN_PARAMS: dict[str, tuple[ParamSpec, ...]] = {
    "raw": (
        ParamSpec("zero_target", "bool",
                  "yes if new disks read as zeros (fresh thin volumes): import then skips "
                  "zero runs (default no; file disks without data are detected)"),
    ),
    "image": (
        ParamSpec("image", "str",
                  "path of the image file (raw, gzip, xz, lz4 or qcow2); default: IMAGE= in "
                  "variants/<variant>.conf"),
        ParamSpec("image_format", "str",
                  "auto (default: from the file's first bytes), raw, gzip, xz, lz4 or qcow2"),
        ParamSpec("image_sha256", "str",
                  "sha256 of the image file (default: IMAGE_SHA256= of the variant, else the "
                  "file <image>.sha256); none skips the check"),
    ),
    "python": (),
}
#: image-sh is the image OS written in shell: the same parameters
BUILTIN_PARAMS["image-sh"] = BUILTIN_PARAMS["image"]
#: the templates whose new OS definitions get the sample image (variants use it as IMAGE=)
SAMPLE_TEMPLATES = ("image", "image-sh")


def parse_param(text: str) -> ParamSpec:
    """``NAME:DESCRIPTION`` or ``NAME:TYPE:DESCRIPTION`` (TYPE: str, bool, int, list)."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not PARAM_NAME_RE.match(name):
        raise E.UsageError(
            f"invalid --param '{text}': the name must match {PARAM_NAME_RE.pattern} "
            "(use NAME:DESCRIPTION or NAME:TYPE:DESCRIPTION)"
        )
    kind = "str"
    head, sep2, tail = rest.partition(":")
    if sep2 and head.strip() in TYPES:
        kind, rest = head.strip(), tail
    description = " ".join(rest.split())
    if not sep or not description:
        raise E.UsageError(f"invalid --param '{text}': a description is needed (NAME:DESCRIPTION)")
    return ParamSpec(name, kind, description)


def parse_variants(items: Sequence[str]) -> tuple[str, ...]:
    """``a,b`` (repeatable) -> ("a", "b"); the first is the default variant."""
    out: list[str] = []
    for item in items:
        for variant in (v.strip() for v in item.split(",")):
            if not variant:
                continue
            if not C.EXT_PLUGIN_MASK.match(variant):
                raise E.UsageError(
                    f"invalid variant '{variant}': it must match {C.EXT_PLUGIN_MASK.pattern}"
                )
            if variant in out:
                raise E.UsageError(f"variant '{variant}' is given twice")
            out.append(variant)
    return tuple(out) or ("default",)


def check_name(name: str) -> None:
    if not C.EXT_PLUGIN_MASK.match(name):
        raise E.UsageError(
            f"invalid OS name '{name}': it must match {C.EXT_PLUGIN_MASK.pattern} "
            "(Ganeti's rule for OS names)"
        )


def all_params(template: str, extra: Sequence[ParamSpec]) -> list[ParamSpec]:
    params = list(BUILTIN_PARAMS.get(template, ()))
    seen = {p.name.lower().replace("-", "_") for p in params}
    for p in extra:
        key = p.name.lower().replace("-", "_")
        if key in seen:
            raise E.UsageError(f"parameter '{p.name}' is declared twice (or is built in)")
        seen.add(key)
        params.append(p)
    return params


def sample_image(name: str) -> bytes:
    """A 1 MiB raw disk image (text at 0 and 512 KiB, zeros elsewhere), gzip'd reproducibly."""
    raw = bytearray(1 << 20)
    text = "".join(f"ganeti-vol sample image for the {name} OS definition, line {i}\n"
                   for i in range(64)).encode()
    raw[: len(text)] = text
    raw[512 << 10: (512 << 10) + len(text)] = text
    return gzip.compress(bytes(raw), compresslevel=9, mtime=0)


def render_files(
    name: str,
    template: str,
    *,
    variants: Sequence[str] = ("default",),
    params: Sequence[ParamSpec] = (),
    with_sample: bool = False,
) -> dict[str, tuple[bytes, int]]:
    """Every file of the new OS definition: relative path -> (content, mode)."""
    if template not in templates.template_names():
        raise E.UsageError(
            f"unknown template '{template}' (available: {', '.join(templates.template_names())})"
        )
    specs = all_params(template, params)
    context: dict[str, Any] = {
        "name": name,
        "template": template,
        "variants": list(variants),
        "params": [p.context() for p in specs],
        "version": __version__,
        "parent_hint": ".",
        "sample_image": SAMPLE_IMAGE if with_sample else "",
    }
    out: dict[str, tuple[bytes, int]] = {}

    def add(rel: str, text: str) -> None:
        out[rel] = (text.encode(), 0o755 if text.startswith("#!") else 0o644)

    sources = [f for f in templates.files_of(templates.COMMON)
               if f != LAUNCHER and not os.path.basename(f).startswith(PARTIAL_PREFIX)]
    sources += templates.files_of(template)
    for source in sources:
        rel = source.split("/", 1)[1].removesuffix(".j2")
        if rel == VARIANT_TEMPLATE:
            for variant in variants:
                add(f"variants/{variant}.conf",
                    templates.render(source, {**context, "variant": variant}))
        else:
            add(rel, templates.render(source, context))
    for script in SCRIPTS:
        if script not in out:
            add(script, templates.render(LAUNCHER, {**context, "script": script}))
    if with_sample:
        data = sample_image(name)
        out[SAMPLE_IMAGE] = (data, 0o644)
        digest = hashlib.sha256(data).hexdigest()
        out[SAMPLE_IMAGE + ".sha256"] = (
            f"{digest}  {os.path.basename(SAMPLE_IMAGE)}\n".encode(), 0o644)
    return out


def _write_all(top: str, files: Mapping[str, tuple[bytes, int]]) -> None:
    for rel, (data, mode) in sorted(files.items()):
        path = os.path.join(top, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)


def _replace_dir(dest: str, fill: Any, force: bool) -> None:
    """Create ``dest`` through a temporary sibling filled by ``fill(tmp)``; with ``force``
    an existing ``dest`` is replaced, without it refused."""
    parent = os.path.dirname(dest) or "."
    if os.path.lexists(dest) and not force:
        raise E.UsageError(f"'{dest}' already exists: use --force to replace it")
    if not os.path.isdir(parent):
        raise E.UsageError(f"cannot create '{dest}': directory '{parent}' does not exist")
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.new-", dir=parent)
    except OSError as err:
        raise E.UsageError(f"cannot create '{dest}': {err.strerror}") from err
    try:
        os.chmod(tmp, 0o755)
        fill(tmp)
        atomicfile.replace_dir(tmp, dest)
    except OSError as err:
        raise E.UsageError(f"cannot create '{dest}': {err.strerror}") from err
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def new_os(
    name: str,
    template: str,
    *,
    parent: str = ".",
    variants: Sequence[str] = ("default",),
    params: Sequence[ParamSpec] = (),
    python: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write a new OS definition ``parent/name`` from ``template``; returns a summary.

    Like :func:`install_os`, it records the Python with ganeti_vol (``python``, default:
    the one running this) in ``ganeti-vol.python``, so the scripts run by hand or by
    Ganeti (whose PATH has no virtualenv) find the ganeti_vol the author works with.
    """
    check_name(name)
    files = render_files(name, template, variants=variants, params=params,
                         with_sample=template in SAMPLE_TEMPLATES)
    interpreter = _interpreter(python)
    dest = os.path.abspath(os.path.join(parent, name))

    def fill(tmp: str) -> None:
        _write_all(tmp, files)
        _write_python_file(tmp, interpreter)

    _replace_dir(dest, fill, force)
    entry = discovery.probe_os(name, dest)
    if not entry.valid:  # a template bug: say so loudly
        raise E.ProgrammerError(f"the new OS definition '{dest}' is invalid: {entry.diagnose}")
    log.info("created OS definition '%s' from template %s", dest, template)
    return {"name": name, "path": dest, "template": template, "variants": list(variants),
            "parameters": [p.name for p in all_params(template, params)],
            "files": sorted([*files, PYTHON_FILE]), "python": interpreter}


def _interpreter(python: str | None) -> str:
    """The Python to record: ``python``, default the one running this, as it was started
    (a virtualenv's bin/python, not resolved to the base interpreter it links to)."""
    interpreter = os.path.abspath(python or sys.executable)
    if not os.access(interpreter, os.X_OK):
        raise E.UsageError(f"cannot use '{interpreter}' as the Python: not executable")
    return interpreter


def _write_python_file(top: str, interpreter: str) -> None:
    with open(os.path.join(top, PYTHON_FILE), "w") as f:
        f.write(interpreter + "\n")


def shipped_os_dir(name: str) -> str | None:
    top = paths.shipped_dir("os-definitions")
    if top and C.EXT_PLUGIN_MASK.match(name) and os.path.isdir(os.path.join(top, name)):
        return os.path.join(top, name)
    return None


def install_os(
    source: str,
    dest_dir: str,
    *,
    name: str | None = None,
    python: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Copy an OS definition (a directory, or the name of a shipped one) into ``dest_dir``
    (created if missing).

    The copy records the Python interpreter with ganeti_vol (``python``,
    default: the one running this) in ``ganeti-vol.python``, which
    ``ganeti-vol.sh`` reads first.  An invalid OS definition is refused.
    """
    src = source if os.path.isdir(source) else shipped_os_dir(source)
    if src is None:
        raise E.UsageError(
            f"cannot install '{source}': not a directory, nor an OS shipped with ganeti-vol"
        )
    src = os.path.abspath(src)
    name = name or os.path.basename(src.rstrip("/"))
    check_name(name)
    entry = discovery.probe_os(name, src)
    if not entry.valid:
        raise E.OSDefinitionError(f"cannot install '{src}': {entry.diagnose}")
    interpreter = _interpreter(python)
    try:  # a fresh node has no /srv/ganeti/os yet (Ganeti creates it only when it needs it)
        os.makedirs(dest_dir, mode=0o755, exist_ok=True)
    except OSError as err:
        raise E.UsageError(f"cannot install into '{dest_dir}': {err.strerror}") from err
    dest = os.path.join(os.path.abspath(dest_dir), name)

    def fill(tmp: str) -> None:
        shutil.copytree(src, tmp, symlinks=False, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", PYTHON_FILE))
        _write_python_file(tmp, interpreter)

    _replace_dir(dest, fill, force)
    log.info("installed OS definition '%s' from '%s' (Python: %s)", dest, src, interpreter)
    return {"name": name, "path": dest, "source": src, "python": interpreter}
