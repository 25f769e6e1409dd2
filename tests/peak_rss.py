"""Peak RSS of a command, measured truly.

``ru_maxrss`` of a child forked straight from pytest starts at pytest's own
resident size (exec records the forked copy's high-water mark), so after a
test that grew pytest every child would seem to use that much.  :func:`command`
wraps argv in a small interpreter that forks the real command and writes the
child's own peak (KiB) into a file: the child is forked from that small
process, not from pytest.  It starts without ``site`` (``-I -S``): the probe adds
little to the time of what it measures.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

PROBE = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def command(rss_file: Path, argv: Sequence[str]) -> list[str]:
    """argv wrapped so that its peak RSS lands in ``rss_file`` (read it with :func:`mib`)."""
    return [sys.executable, "-I", "-S", "-c", PROBE, str(rss_file), *argv]


def kib(rss_file: Path) -> int:
    return int(rss_file.read_text())


def mib(rss_file: Path) -> float:
    return kib(rss_file) / 1024
