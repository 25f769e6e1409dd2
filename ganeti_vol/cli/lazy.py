"""Lazy imports for the CLI: building the parser must not load every library module.

``transfer = lazy("ganeti_vol.transfer")`` returns the module object at once
but runs its code only when an attribute is first used, so ``ganeti-vol
export`` does not pay for jinja2, the conformance runner or the hooks CLI.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy(name: str) -> ModuleType:
    """The module ``name``, loaded on first attribute access."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"no module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    loader.exec_module(module)
    return module
