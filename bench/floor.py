#!/usr/bin/env python3
"""The least a Python process must do to read an export script's stdout: a ceiling for bench/run.py.

    cat IMG | python bench/floor.py

Interpreter start, ``F_SETPIPE_SZ`` to 1 MiB (what ganeti-vol does to the
script's pipe), and every byte read into a recycled 4 MiB buffer: no zero
test, no hash, no compression, no writes.  Not a tool: it bounds what any
Python framework fed by a ``cat`` script can reach on this machine, measured
in the same run as ganeti-vol and the tools it is compared with.
"""

from __future__ import annotations

import fcntl
import os


def main() -> None:
    try:
        fcntl.fcntl(0, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except OSError:
        pass
    buf = memoryview(bytearray(4 << 20))
    while os.readv(0, [buf]):
        pass


if __name__ == "__main__":
    main()
