"""Progress of a transfer: model, renderers, stall watchdog and status file.

Nothing here writes to stdout (it may carry disk data): the renderers write
to the stream they are given, stderr by default.

Usage (the engine calls ``advance``/``verified``/``set_total``/``set_stage``
on the per-disk objects)::

    progress = Progress("export", name=instance.name)
    cancel = Cancel()
    watchdog = StallWatchdog(cfg.stall_timeout, cancel=cancel)
    with ProgressMonitor(progress, renderer=make_renderer(args.progress),
                         status=StatusFile(cfg.state_dir, "export", instance.name),
                         watchdog=watchdog):
        with open_script_stream(...) as script:
            watchdog.add_kill(script.kill)          # a stalled script gets killed
            engine.encode(script.fd, sink, progress=progress.disk(0), cancel=cancel, ...)
    # on a stall: the engine raises the StallError set on ``cancel``;
    # ``watchdog.error`` holds it too, for callers that see ScriptFailed first

The monitor's thread ticks every ``interval`` seconds: it renders, rewrites
the status file (atomically, at most once a second) and asks the watchdog.
When the block ends every disk is done or failed, the renderer shows the end,
and the status file is removed.  A disk's ``verified`` counts the bytes checked
against a recorded hash (every chunk of an import from an archive or stream)
or read back from the target; an export checks nothing it writes (0), a
Ganeti export has no hashes to check.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import IO, Any

from ganeti_vol.core import atomicfile
from ganeti_vol.core import errors as E
from ganeti_vol.core.procs import process_alive, process_start_time

log = logging.getLogger(__name__)

_RATE_WINDOW = 5.0
STATUS_DIR = "status"


def format_bytes(n: float) -> str:
    """Decimal units, as MB/s figures are given (1 MB = 10^6 B)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds + 0.5)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class DiskProgress:
    """Progress of one disk; the engine reports to it (thread-safe)."""

    def __init__(self, parent: Progress, index: int, total: int | None) -> None:
        self.parent = parent
        self.index = index
        self.total = total
        self.done = 0
        self.verified_bytes = 0
        self.stage = "transferring"
        self.state = "running"
        self.error: str | None = None
        self.started = parent.clock()
        self.ended: float | None = None

    def advance(self, nbytes: int) -> None:
        with self.parent.lock:
            self.done += nbytes
            self.parent.last_activity = self.parent.clock()

    def verified(self, nbytes: int) -> None:
        with self.parent.lock:
            self.verified_bytes += nbytes
            self.parent.last_activity = self.parent.clock()

    def touch(self) -> None:
        """Bytes moved but no chunk completed yet: activity for the watchdog."""
        self.parent.touch()

    def set_total(self, nbytes: int | None) -> None:
        with self.parent.lock:
            self.total = nbytes

    def set_stage(self, stage: str) -> None:
        with self.parent.lock:
            self.stage = stage
            self.parent.last_activity = self.parent.clock()

    def mark_verified(self, nbytes: int) -> None:
        """At least ``nbytes`` were checked against their recorded hashes."""
        with self.parent.lock:
            self.verified_bytes = max(self.verified_bytes, nbytes)

    def finish(self) -> None:
        with self.parent.lock:
            self.state, self.stage, self.ended = "done", "done", self.parent.clock()
            if self.total is None:
                self.total = self.done

    def fail(self, error: BaseException | str) -> None:
        with self.parent.lock:
            self.state, self.ended = "failed", self.parent.clock()
            self.error = str(error)

    def snapshot(self) -> dict[str, Any]:
        elapsed = (self.ended or self.parent.clock()) - self.started
        return {
            "index": self.index,
            "state": self.state,
            "stage": self.stage,
            "done": self.done,
            "total": self.total,
            "percent": _percent(self.done, self.total),
            "verified": self.verified_bytes,
            "rate_bps": round(self.done / elapsed) if elapsed > 0 else None,
            "error": self.error,
        }


def _percent(done: int, total: int | None) -> float | None:
    if not total:
        return None
    return round(min(100.0, 100.0 * done / total), 1)


class Progress:
    """Bytes done/total of an operation, per disk and overall."""

    def __init__(self, op: str, *, name: str = "", clock: Callable[[], float] = time.monotonic):
        self.op = op
        self.name = name
        self.clock = clock
        self.lock = threading.Lock()
        self.disks: dict[int, DiskProgress] = {}
        self.started = clock()
        self.started_wall = time.time()
        self.last_activity = self.started
        self.state = "running"
        self.error: str | None = None
        self._samples: deque[tuple[float, int]] = deque()

    def disk(self, index: int, total: int | None = None) -> DiskProgress:
        """The progress object of disk ``index`` (created on first use)."""
        with self.lock:
            if index not in self.disks:
                self.disks[index] = DiskProgress(self, index, total)
            elif total is not None:
                self.disks[index].total = total
            return self.disks[index]

    def touch(self) -> None:
        """Count as activity without moving bytes (e.g. a snapshot being taken)."""
        with self.lock:
            self.last_activity = self.clock()

    def finish(self, error: BaseException | str | None = None) -> None:
        """End the operation, and every disk still running with it (done, or failed)."""
        with self.lock:
            self.state = "failed" if error is not None else "done"
            self.error = None if error is None else str(error)
            now = self.clock()
            for disk in self.disks.values():
                if disk.state == "running":
                    disk.ended = now
                    if error is None:
                        disk.state = disk.stage = "done"
                    else:
                        disk.state, disk.error = "failed", self.error

    @property
    def done(self) -> int:
        return sum(d.done for d in self.disks.values())

    def snapshot(self) -> dict[str, Any]:
        """Everything a renderer or the status file shows, as plain data."""
        with self.lock:
            now = self.clock()
            disks = [self.disks[i].snapshot() for i in sorted(self.disks)]
            done = sum(d["done"] for d in disks)
            totals = [d["total"] for d in disks]
            total = sum(totals) if disks and None not in totals else None
            self._samples.append((now, done))
            while len(self._samples) > 2 and now - self._samples[0][0] > _RATE_WINDOW:
                self._samples.popleft()
            t0, d0 = self._samples[0]
            elapsed = now - self.started
            if now - t0 >= 0.5:
                rate: float | None = (done - d0) / (now - t0)
            else:
                rate = done / elapsed if elapsed > 0 else None
            eta = None
            if total is not None and rate:
                eta = max(0.0, (total - done) / rate)
            return {
                "op": self.op,
                "name": self.name,
                "state": self.state,
                "pid": os.getpid(),
                "pid_start": process_start_time(os.getpid()),
                "started": self.started_wall,
                "elapsed_s": round(elapsed, 3),
                "done": done,
                "total": total,
                "percent": _percent(done, total),
                "rate_bps": round(rate) if rate is not None else None,
                "eta_s": round(eta, 1) if eta is not None else None,
                "idle_s": round(now - self.last_activity, 3),
                "error": self.error,
                "disks": disks,
            }


# --- renderers -------------------------------------------------------------------------


class NullRenderer:
    """Shows nothing."""

    def render(self, snap: dict[str, Any]) -> None:
        pass

    def close(self, snap: dict[str, Any]) -> None:
        pass


class BarRenderer:
    """One self-rewriting line on a terminal: bar, %, bytes, MB/s, ETA.

    The line fits the terminal's width (asked at every render, so a resized window is
    followed): the bar shrinks, then the name is shortened in the middle, then the bar goes.
    """

    width = 24
    #: narrowest bar worth drawing
    min_width = 5

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._last_len = 0

    def columns(self) -> int | None:
        """The width of the stream's terminal; else $COLUMNS; else None (no limit: the
        stream is a file or pipe, where no line wraps)."""
        try:
            cols = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            cols = 0
        if cols <= 0:
            try:
                cols = int(os.environ.get("COLUMNS", ""))
            except ValueError:
                cols = 0
        return cols if cols > 0 else None

    def line(self, snap: dict[str, Any], columns: int | None = None) -> str:
        """The text of the line; with ``columns``, at most ``columns - 1`` characters (the
        last column is left free: writing into it makes some terminals wrap)."""
        room = columns - 1 if columns else 1 << 30
        pct = snap["percent"]
        total = format_bytes(snap["total"]) if snap["total"] is not None else "?"
        rate = format_bytes(snap["rate_bps"] or 0) + "/s"
        pct_text = f"{pct:5.1f}%" if pct is not None else "  ?  %"
        tail = (f" {pct_text} {format_bytes(snap['done'])} / {total} {rate} "
                f"ETA {format_eta(snap['eta_s'])}")
        name = snap["name"]
        head = f"{snap['op']} {name}: "
        width = min(self.width, room - len(head) - len(tail) - 2)
        if width < self.min_width:  # the name gives way, then the bar
            spare = room - len(tail) - len(f"{snap['op']} : ") - self.min_width - 2
            if spare < len(name):
                name = _shorten(name, max(spare, 5))
                head = f"{snap['op']} {name}: "
            width = min(self.width, room - len(head) - len(tail) - 2)
        if width >= self.min_width:
            if pct is None:
                bar = "?" * width
            else:
                full = int(width * pct / 100)
                bar = "#" * full + "-" * (width - full)
            text = f"{head}[{bar}]{tail}"
        else:
            text = head.rstrip() + tail
        return text[:max(room, 0)]

    def render(self, snap: dict[str, Any]) -> None:
        columns = self.columns()
        text = self.line(snap, columns)
        pad = max(0, min(self._last_len, (columns or 1 << 30) - 1) - len(text))
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._last_len = len(text)

    def close(self, snap: dict[str, Any]) -> None:
        self.render(snap)
        self.stream.write("\n")
        self.stream.flush()


def _shorten(text: str, room: int) -> str:
    """``text`` in at most ``room`` characters, its middle replaced by '...'."""
    if len(text) <= room:
        return text
    keep = max(room - 3, 2)
    return text[: (keep + 1) // 2] + "..." + text[len(text) - keep // 2:]


class JsonRenderer:
    """``--progress=json``: one JSON object per line (``"event": "progress"|"end"``)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def _emit(self, event: str, snap: dict[str, Any]) -> None:
        self.stream.write(json.dumps({"event": event, **snap}, sort_keys=True) + "\n")
        self.stream.flush()

    def render(self, snap: dict[str, Any]) -> None:
        self._emit("progress", snap)

    def close(self, snap: dict[str, Any]) -> None:
        self._emit("end", snap)


Renderer = NullRenderer | BarRenderer | JsonRenderer
MODES = ("auto", "bar", "json", "none")


def make_renderer(mode: str = "auto", stream: IO[str] | None = None) -> Renderer:
    """``auto``: a bar if ``stream`` (default stderr) is a terminal, else nothing."""
    stream = stream or sys.stderr
    if mode == "auto":
        mode = "bar" if stream.isatty() else "none"
    if mode == "bar":
        return BarRenderer(stream)
    if mode == "json":
        return JsonRenderer(stream)
    if mode == "none":
        return NullRenderer()
    raise E.UsageError(f"invalid --progress '{mode}': use one of {', '.join(MODES)}")


# --- status file -----------------------------------------------------------------------


class StatusFile:
    """``<state_dir>/status/<op>-<name>-<pid>.json``, replaced atomically on each write.

    Created 0600 whatever the umask, never through a symlink (see
    :mod:`ganeti_vol.core.atomicfile`); removed when the operation ends.  Those of
    processes that died are removed by :func:`cleanup_status_files`.
    """

    def __init__(self, state_dir: str, op: str, name: str = "") -> None:
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "none"
        self.dir = os.path.join(state_dir, STATUS_DIR)
        self.path = os.path.join(self.dir, f"{op}-{safe}-{os.getpid()}.json")

    def write(self, snap: dict[str, Any]) -> None:
        """Replace the file with ``snap`` (errors are logged: status never fails a transfer)."""
        data = json.dumps({**snap, "mtime": time.time()}, sort_keys=True) + "\n"
        try:
            atomicfile.private_dir(self.dir, 0o750)
            atomicfile.replace(self.path, data.encode(), 0o600, durable=False)
        except OSError as err:
            log.warning("cannot write status file '%s': %s", self.path, err.strerror or err)

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("cannot remove status file '%s': %s", self.path, err.strerror or err)


def cleanup_status_files(state_dir: str, dry_run: bool = False) -> list[str]:
    """Remove the status files (and temporary files) of processes no longer running."""
    directory = os.path.join(state_dir, STATUS_DIR)
    removed = atomicfile.reclaim_temp_files(directory, dry_run)
    try:
        names = sorted(n for n in os.listdir(directory) if not n.startswith("."))
    except OSError:
        return removed
    for name in names:
        path = os.path.join(directory, name)
        pid_text = name.removesuffix(".json").rsplit("-", 1)[-1]
        if not pid_text.isdigit():
            continue
        pid, start = int(pid_text), None
        try:
            with open(path, "rb") as f:
                start = json.loads(f.read(1 << 20)).get("pid_start")
        except (OSError, ValueError, AttributeError):
            start = None
        alive = (process_alive(pid, int(start)) if isinstance(start, int)
                 else process_start_time(pid) is not None)
        if alive:
            continue
        removed.append(path)
        if not dry_run:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return removed


# --- stall watchdog --------------------------------------------------------------------


class StallWatchdog:
    """No byte (and no other activity) for ``timeout`` seconds: abort with StallError.

    On a stall it sets ``error``, aborts ``cancel`` with it (``cancel.abort(err)``
    for a :class:`ganeti_vol.core.fdio.Cancel`, ``cancel.set()`` for a plain
    Event), then calls every kill callback, so a stuck script dies and the
    engine's loops raise the StallError.  ``timeout`` 0 disables it.
    """

    def __init__(
        self,
        timeout: float,
        *,
        cancel: threading.Event | None = None,
        kill: list[Callable[[], None]] | None = None,
    ) -> None:
        self.timeout = timeout
        self.cancel = cancel
        self._kill = list(kill or [])
        self._lock = threading.Lock()
        self.error: E.StallError | None = None

    def add_kill(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._kill.append(fn)

    def remove_kill(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if fn in self._kill:
                self._kill.remove(fn)

    def check(self, progress: Progress) -> bool:
        """Fire if the progress has been idle too long; True if it fired (now or before)."""
        if self.error is not None:
            return True
        if self.timeout <= 0 or progress.state != "running":
            return False
        idle = progress.clock() - progress.last_activity
        if idle < self.timeout:
            return False
        what = f"{progress.op} of '{progress.name}'" if progress.name else progress.op
        self.error = E.StallError(what=what, seconds=self.timeout, done=progress.done)
        log.error("%s", self.error)
        if self.cancel is not None:
            abort = getattr(self.cancel, "abort", None)
            if abort is not None:
                abort(self.error)
            else:
                self.cancel.set()
        with self._lock:
            kills = list(self._kill)
        for fn in kills:
            try:
                fn()
            except Exception as err:  # keep killing the others
                log.warning("cannot stop a stalled process: %s", err)
        return True


# --- the monitor thread ----------------------------------------------------------------


class ProgressMonitor:
    """A thread that renders, writes the status file and runs the watchdog while in ``with``."""

    def __init__(
        self,
        progress: Progress,
        *,
        renderer: Renderer | None = None,
        status: StatusFile | None = None,
        watchdog: StallWatchdog | None = None,
        interval: float = 0.5,
        status_interval: float = 1.0,
    ) -> None:
        self.progress = progress
        self.renderer = renderer or NullRenderer()
        self.status = status
        self.watchdog = watchdog
        self.interval = interval
        self.status_interval = status_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_status = 0.0

    def tick(self) -> None:
        """One round: watchdog, render, status (the thread calls it; tests may too)."""
        if self.watchdog is not None:
            self.watchdog.check(self.progress)
        snap = self.progress.snapshot()
        self.renderer.render(snap)
        now = time.monotonic()
        if self.status is not None and now - self._last_status >= self.status_interval:
            self._last_status = now
            self.status.write(snap)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception as err:  # never let the display kill a transfer
                log.debug("progress display failed: %s", err)

    def __enter__(self) -> ProgressMonitor:
        if self.status is not None:
            self.status.write(self.progress.snapshot())
            self._last_status = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="ganeti-vol-progress",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.progress.state == "running":
            self.progress.finish(exc if exc is not None else None)
        snap = self.progress.snapshot()
        try:
            self.renderer.close(snap)
        except (OSError, ValueError) as err:
            log.debug("progress display failed: %s", err)
        if self.status is not None:
            self.status.remove()  # the operation is over: its result went to the caller
