"""``ganeti-vol-lz4``: the compression tool for Ganeti's import/export daemon.

Ganeti runs ``ganeti-vol-lz4 -h`` (it must exit 0 within 2 s), then
``ganeti-vol-lz4`` on the sending side and ``ganeti-vol-lz4 -d`` on the
receiving side (``doc/remote.md``).  The options are parsed by hand and the
engine is imported only after them, so ``-h`` answers without loading it.
Errors are one line on stderr and an exit code from ``doc/exit-codes.md``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence

from ganeti_vol import __version__
from ganeti_vol.core import errors as E
from ganeti_vol.core import signals
from ganeti_vol.core.lazy import lazy

#: the engine loads only when there is data to work on (not for -h or a usage error)
ganeti_tool = lazy("ganeti_vol.formats.lz4tool")

PROG = "ganeti-vol-lz4"

USAGE = f"""\
usage: {PROG} [-d] [-T N] [-v]

Parallel lz4 with per-chunk integrity, for Ganeti's transfers
(gnt-cluster modify --compression-tools=gzip,gzip-fast,gzip-slow,{PROG}).

  (no option)  compress stdin to stdout
  -d           decompress stdin to stdout; every chunk is verified before it is
               written, and a corrupt, missing or truncated stream fails
  -T N         N worker threads (default: one per CPU but one, at most 4)
  -v           log what was done on stderr
  -h           show this help and exit (Ganeti checks that it exits 0)
  --version    show the version and exit
"""


class _Args:
    decompress = False
    workers = 0
    verbose = False


def _parse(argv: Sequence[str]) -> _Args | int:
    """The options, or an exit code once help or version was printed."""
    args = _Args()
    it = iter(argv)
    for arg in it:
        if arg in ("-h", "--help"):
            sys.stdout.write(USAGE)
            return 0
        if arg == "--version":
            sys.stdout.write(f"{PROG} (ganeti-vol {__version__})\n")
            return 0
        if arg in ("-d", "--decompress"):
            args.decompress = True
        elif arg in ("-v", "--verbose"):
            args.verbose = True
        elif arg.startswith("-T"):
            value = arg[2:] or next(it, "")
            if not value.isdigit() or int(value) > 256:
                raise E.UsageError(f"-T takes a number of threads from 0 to 256, not {value!r}")
            args.workers = int(value)
        else:
            raise E.UsageError(f"unknown option {arg!r} (see {PROG} -h)")
    return args


def _run(args: _Args) -> None:
    log = logging.getLogger("ganeti_vol")
    t0 = time.monotonic()
    if args.decompress:
        if os.isatty(0):
            raise E.UsageError("refusing to read a compressed stream from a terminal")
        dec = ganeti_tool.decompress(0, 1, workers=args.workers)
        log.info("decompressed %d bytes (%d chunks, %d zero) in %.2fs",
                 dec.size, dec.chunks, dec.zero_chunks, time.monotonic() - t0)
    else:
        if os.isatty(1):
            raise E.UsageError("refusing to write compressed data to a terminal")
        enc = ganeti_tool.compress(0, 1, workers=args.workers)
        log.info("compressed %d bytes (%d chunks, %d zero) into %d bytes in %.2fs",
                 enc.size, enc.chunks, enc.zero_chunks, enc.stored_bytes,
                 time.monotonic() - t0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; returns the exit code."""
    root = logging.getLogger("ganeti_vol")
    handler: logging.Handler = logging.NullHandler()  # the error is the one line we print
    try:
        parsed = _parse(sys.argv[1:] if argv is None else argv)
        if isinstance(parsed, int):
            return parsed
        if parsed.verbose:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
            root.setLevel(logging.INFO)
        root.addHandler(handler)
        root.propagate = False
        with signals.interrupting():
            _run(parsed)
        return 0
    except (E.GanetiVolError, E.Interrupted, KeyboardInterrupt, Exception) as err:
        failure = E.failure(err)
        if failure.is_bug and "-v" in (argv or sys.argv[1:]):  # the traceback only with -v
            sys.stderr.write(failure.traceback + "\n")
        _error(failure.line)
        return failure.exit_code
    finally:
        root.removeHandler(handler)
        root.propagate = True


def _error(text: str) -> None:
    try:
        sys.stderr.write(f"{PROG}: {' '.join(text.split())}\n")
        sys.stderr.flush()
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
