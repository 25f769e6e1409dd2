"""Where the OS definitions and hooks shipped with ganeti-vol live.

In a source checkout they are the top-level ``os-definitions/`` and
``hooks/``; an installed wheel puts them under ``<prefix>/share/ganeti-vol/``.
"""

from __future__ import annotations

import os
import sys
import sysconfig

SHARE_NAME = "ganeti-vol"


def shipped_dir(kind: str) -> str | None:
    """Absolute path of the shipped ``os-definitions`` or ``hooks`` dir, or None."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    checkout = os.path.join(os.path.dirname(package), kind)
    candidates = [checkout]
    for prefix in (sysconfig.get_path("data"), sys.prefix, "/usr/local", "/usr"):
        if prefix:
            candidates.append(os.path.join(prefix, "share", SHARE_NAME, kind))
    for path in candidates:
        if os.path.isdir(path):
            return path
    return None
