"""Render the scaffold templates stored in the package (the only module importing jinja2).

Templates live in ``ganeti_vol/templates/<template>/`` (files under
``common/`` are shared by every template).  Rendering is strict: an undefined
variable is an error (``StrictUndefined``), nothing is HTML-escaped, and a
trailing newline is kept.  Every jinja2 failure becomes a
:class:`~ganeti_vol.core.errors.TemplateError` naming the template file and line.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Mapping
from typing import Any

import jinja2

from ganeti_vol.core import errors as E

#: where the templates are (inside the installed package)
TEMPLATE_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
COMMON = "common"

_env: jinja2.Environment | None = None


def environment() -> jinja2.Environment:
    """The one jinja2 environment (created on first use)."""
    global _env
    if _env is None:
        _env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATE_ROOT),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
        )
    return _env


def template_names() -> list[str]:
    """The templates a scaffold can be made from (every directory but ``common``)."""
    try:
        entries = sorted(os.listdir(TEMPLATE_ROOT))
    except OSError as err:
        raise E.TemplateError(
            f"cannot list the templates in '{TEMPLATE_ROOT}': {err.strerror} (broken install?)"
        ) from err
    return [e for e in entries if e != COMMON and os.path.isdir(os.path.join(TEMPLATE_ROOT, e))]


def files_of(template: str) -> list[str]:
    """Relative paths of the files of ``template`` (``template/...``), sorted."""
    top = os.path.join(TEMPLATE_ROOT, template)
    if not os.path.isdir(top):
        raise E.TemplateError(
            f"unknown template '{template}' (available: {', '.join(template_names())})"
        )
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith((".pyc", ".pyo")):
                continue
            out.append(os.path.relpath(os.path.join(dirpath, name), TEMPLATE_ROOT))
    return out


def _location(err: BaseException, name: str) -> str:
    """``file:line`` of the template frame an error was raised in (from the traceback)."""
    lineno = getattr(err, "lineno", None)
    filename = getattr(err, "filename", None) or getattr(err, "name", None)
    if lineno is None:
        for frame in reversed(traceback.extract_tb(err.__traceback__)):
            if frame.filename.startswith(TEMPLATE_ROOT) or frame.filename.endswith(name):
                filename, lineno = frame.filename, frame.lineno
                break
    where = os.path.relpath(filename, TEMPLATE_ROOT) if filename and os.path.isabs(filename) \
        else (filename or name)
    return f"{where}:{lineno}" if lineno else where


def render(name: str, context: Mapping[str, Any]) -> str:
    """Render the template file ``name`` (relative to the template root) with ``context``."""
    try:
        return environment().get_template(name).render(**context)
    except jinja2.TemplateNotFound as err:
        raise E.TemplateError(f"cannot render template '{name}': not found") from err
    except jinja2.TemplateSyntaxError as err:
        raise E.TemplateError(
            f"cannot render template {_location(err, name)}: syntax error: {err.message}"
        ) from err
    except jinja2.UndefinedError as err:
        raise E.TemplateError(
            f"cannot render template {_location(err, name)}: {err.message}"
        ) from err
    except jinja2.TemplateError as err:
        raise E.TemplateError(f"cannot render template {_location(err, name)}: {err}") from err


def render_string(text: str, context: Mapping[str, Any], name: str = "<string>") -> str:
    """Render template source ``text`` (tests and one-off strings); errors name ``name``."""
    try:
        return environment().from_string(text).render(**context)
    except jinja2.TemplateSyntaxError as err:
        err.filename = err.filename or name
        raise E.TemplateError(
            f"cannot render template {name}:{err.lineno}: syntax error: {err.message}"
        ) from err
    except jinja2.TemplateError as err:
        lineno = None
        for frame in reversed(traceback.extract_tb(err.__traceback__)):
            if frame.filename == "<template>":
                lineno = frame.lineno
                break
        where = f"{name}:{lineno}" if lineno else name
        raise E.TemplateError(f"cannot render template {where}: {err}") from err
