"""ganeti-vol's Debian package, built from this tree once per test session.

conftest.py's session fixture ``debian_package`` builds it with the standard tools
(dpkg-buildpackage, debhelper, pybuild) from a copy of this tree, and shares the .deb:
tests/test_debian_package.py installs it on the host with apt, tests/ganeti_cluster.py on
the test cluster's node.  Where the tools are missing there is no .deb, and the reason
says why; a build that fails is a test failure, never a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ganeti_vol import __version__
from ganeti_vol.core import constants as C

#: what building needs (dpkg-buildpackage pulls in the rest: debhelper, dh-python ...)
BUILD_TOOLS = ("dpkg-buildpackage", "dpkg-deb")


class BuildError(RuntimeError):
    """dpkg-buildpackage failed, or made no .deb."""


@dataclass(frozen=True)
class DebianPackage:
    """The built .deb, or None and why it could not be built here."""

    deb: Path | None
    reason: str | None = None


def missing_build_tools() -> str | None:
    """Why the package cannot be built here, or None."""
    for tool in BUILD_TOOLS:
        if not shutil.which(tool, path=C.SCRIPT_PATH):
            return (f"no {tool} here to build ganeti-vol's Debian package (apt-get install "
                    "dpkg-dev debhelper dh-python pybuild-plugin-pyproject: README command (b))")
    return None


def build_package(top: Path) -> Path:
    """Build the package from a copy of this tree under ``top``; the .deb's path."""
    from test_repo import repo_copy

    src = repo_copy(top / "ganeti-vol")
    build = subprocess.run(
        ["dpkg-buildpackage", "-b", "-us", "-uc"], cwd=src, capture_output=True, text=True,
        env={"PATH": C.SCRIPT_PATH, "HOME": str(top), "LC_ALL": "C.UTF-8"}, timeout=600)
    if build.returncode != 0:
        raise BuildError(f"dpkg-buildpackage failed ({build.returncode}):\n"
                         f"{build.stdout[-3000:]}\n{build.stderr[-3000:]}")
    deb = top / f"ganeti-vol_{__version__}_all.deb"
    if not deb.is_file():
        raise BuildError(f"dpkg-buildpackage made no {deb.name}: {sorted(os.listdir(top))}")
    return deb


def debian_package(top: Path) -> DebianPackage:
    """The package built under ``top``, or no .deb and the reason where it cannot be."""
    reason = missing_build_tools()
    if reason:
        return DebianPackage(None, reason)
    return DebianPackage(build_package(top))
