"""Lazy imports: building the CLI parser, or starting an export, must not load every module.

``transfer = lazy("ganeti_vol.ops.transfer")`` returns a stand-in at once; the
module is imported (normally, under the import lock, so from any thread) on
the first attribute access.  Nothing is put in ``sys.modules`` early, so
library modules importing each other never see a half-loaded module.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class _LazyModule:
    __slots__ = ("_name", "_module")

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy(name: str) -> Any:
    """The module ``name``, imported on first attribute access."""
    return _LazyModule(name)
