"""The console scripts setup.cfg declares, written as pip writes them, for this checkout.

tests/test_ganeti_tool.py puts ganeti-vol-lz4 on a test PATH with it, and
tests/ganeti_cluster.py installs it on the test cluster's node (doc/remote.md)."""

from __future__ import annotations

import configparser
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def console_script(name: str) -> str:
    """The text of console script ``name``: this Python, this checkout's ganeti_vol."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    for line in cfg["options.entry_points"]["console_scripts"].splitlines():
        script, _, target = line.partition("=")
        if script.strip() == name:
            module, _, func = target.strip().partition(":")
            return (f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
                    f"from {module} import {func}\nsys.exit({func}())\n")
    raise LookupError(f"setup.cfg declares no {name} console script")
