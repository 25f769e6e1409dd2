"""Progress model, renderers, status file and the stall watchdog (with real processes)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from test_streams import CHUNK, ListSink, no_leaks

from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import Cancel
from ganeti_vol.engine import progress as P
from ganeti_vol.engine.parallel import Engine


class Clock:
    """A hand-driven clock, so rates and ETAs are exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_snapshot_gives_percent_rate_and_eta_per_disk_and_overall():
    """Bytes done/total, %, bytes/s over the recent window and the ETA."""
    clock = Clock()
    prog = P.Progress("export", name="web1", clock=clock)
    d0, d1 = prog.disk(0, total=1000), prog.disk(1, total=3000)
    prog.snapshot()
    clock.now += 2
    d0.advance(1000)
    d1.advance(1000)
    snap = prog.snapshot()
    assert (2000, 4000, 50.0) == (snap["done"], snap["total"], snap["percent"])
    assert 1000 == snap["rate_bps"] and 2.0 == snap["eta_s"]
    assert [100.0, 33.3] == [d["percent"] for d in snap["disks"]]


def test_unknown_total_gives_no_percent_and_no_eta():
    """A script that announces no size: bytes and rate only."""
    clock = Clock()
    prog = P.Progress("export", clock=clock)
    prog.disk(0).advance(500)
    clock.now += 1
    snap = prog.snapshot()
    assert (None, None, None) == (snap["total"], snap["percent"], snap["eta_s"])
    assert 500 == snap["done"]


def test_finished_disk_without_total_takes_its_size_as_total():
    """When a disk ends, its total is what was moved."""
    prog = P.Progress("export")
    d = prog.disk(0)
    d.advance(42)
    d.finish()
    assert (42, 100.0, "done") == (d.total, d.snapshot()["percent"], d.state)


def test_bar_renderer_shows_bar_percent_bytes_rate_and_eta():
    """The TTY line has every field and ends with a newline when closed."""
    out = io.StringIO()
    bar = P.BarRenderer(out)
    snap = {"op": "export", "name": "web1", "percent": 50.0, "done": 2_000_000_000,
            "total": 4_000_000_000, "rate_bps": 1_250_000_000, "eta_s": 1.6}
    bar.render(snap)
    bar.close(snap)
    text = out.getvalue()
    assert text.startswith("\rexport web1: [############------------]  50.0% 2.0 GB / 4.0 GB "
                           "1.2 GB/s ETA 00:02")
    assert text.endswith("\n")


def test_auto_mode_draws_a_bar_only_on_a_terminal():
    """--progress=auto: a bar on a real pty, nothing on a pipe or file."""
    assert isinstance(P.make_renderer("auto", io.StringIO()), P.NullRenderer)
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            assert isinstance(P.make_renderer("auto", tty), P.BarRenderer)
    finally:
        os.close(master)
        os.close(slave)


def test_json_renderer_writes_one_json_object_per_line():
    """--progress=json lines parse and say progress, then end."""
    out = io.StringIO()
    prog = P.Progress("import", name="web1")
    prog.disk(0, total=10).advance(5)
    r = P.make_renderer("json", out)
    r.render(prog.snapshot())
    r.close(prog.snapshot())
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert ["progress", "end"] == [x["event"] for x in lines]
    assert (5, 10, 50.0) == (lines[0]["done"], lines[0]["total"], lines[0]["percent"])


def test_invalid_progress_mode_is_a_usage_error():
    """An unknown --progress value is refused with the valid choices."""
    with pytest.raises(E.UsageError, match="invalid --progress 'fancy'"):
        P.make_renderer("fancy")


def test_status_file_is_replaced_atomically_with_json(tmp_path):
    """The status file is valid JSON after every write and no temp file stays."""
    status = P.StatusFile(str(tmp_path / "state"), "export", "web1/x")
    prog = P.Progress("export", name="web1")
    prog.disk(0, total=100).advance(10)
    status.write(prog.snapshot())
    prog.disk(0).advance(10)
    status.write(prog.snapshot())
    assert [os.path.basename(status.path)] == os.listdir(tmp_path / "state" / "status")
    data = json.loads(Path(status.path).read_text())
    assert (20, "export", os.getpid()) == (data["done"], data["op"], data["pid"])
    status.remove()
    assert [] == os.listdir(tmp_path / "state" / "status")


def test_status_file_problems_never_fail_the_transfer(tmp_path, caplog):
    """An unwritable state dir is logged, not raised."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    P.StatusFile(str(blocker), "export", "web1").write({"done": 1})
    assert "cannot write status file" in caplog.text


def test_watchdog_fires_after_the_timeout_only():
    """Idle below the timeout: nothing; above: StallError on cancel, kills called once."""
    clock = Clock()
    prog = P.Progress("export", name="web1", clock=clock)
    cancel = Cancel()
    killed = []
    dog = P.StallWatchdog(10, cancel=cancel, kill=[lambda: killed.append(1)])
    clock.now += 9
    assert not dog.check(prog) and not cancel.is_set()
    prog.disk(0).advance(5)
    clock.now += 9.5
    assert not dog.check(prog)
    clock.now += 1
    assert dog.check(prog) and dog.check(prog)
    assert isinstance(cancel.error, E.StallError) and [1] == killed
    assert "export of 'web1' stalled: no data moved for 10s (after 5 bytes)" == str(dog.error)


def test_watchdog_with_zero_timeout_never_fires():
    """stall_timeout = 0 disables the watchdog."""
    clock = Clock()
    prog = P.Progress("export", clock=clock)
    clock.now += 10**6
    assert not P.StallWatchdog(0).check(prog)


def test_stalled_export_script_is_killed_and_the_engine_raises_stall_error(tmp_path):
    """A script that prints nothing: the watchdog kills it, the export fails with StallError."""
    with no_leaks():
        with Engine(workers=2, chunk_size=CHUNK) as engine:
            proc = subprocess.Popen(["sleep", "60"], stdout=subprocess.PIPE)
            prog = P.Progress("export", name="web1")
            cancel = Cancel()
            dog = P.StallWatchdog(0.3, cancel=cancel, kill=[proc.kill])
            t0 = time.monotonic()
            try:
                with pytest.raises(E.StallError, match="no data moved for 0.3s"):
                    with P.ProgressMonitor(prog, watchdog=dog, interval=0.05):
                        engine.encode(proc.stdout.fileno(), ListSink(), progress=prog.disk(0),
                                      cancel=cancel)
            finally:
                proc.stdout.close()
                proc.wait()
            assert time.monotonic() - t0 < 5
            assert -9 == proc.returncode
            assert "failed" == prog.state


def test_trickling_bytes_keep_the_watchdog_quiet(tmp_path):
    """A slow script that keeps writing is not a stall, even before a chunk is full."""
    script = "for i in 1 2 3 4 5 6 7 8; do printf 'abc'; sleep 0.1; done"
    proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE)
    prog = P.Progress("export")
    cancel = Cancel()
    dog = P.StallWatchdog(0.5, cancel=cancel, kill=[proc.kill])
    try:
        with Engine(workers=1, chunk_size=CHUNK) as engine, \
                P.ProgressMonitor(prog, watchdog=dog, interval=0.05):
            summary = engine.encode(proc.stdout.fileno(), ListSink(), progress=prog.disk(0),
                                    cancel=cancel)
    finally:
        proc.stdout.close()
        proc.wait()
    assert 24 == summary.size and dog.error is None


def test_monitor_thread_renders_writes_status_and_stops(tmp_path):
    """The monitor renders and keeps the status file while running, then leaves no
    thread and no status file."""
    out = io.StringIO()
    status = P.StatusFile(str(tmp_path), "import", "web1")
    prog = P.Progress("import", name="web1")
    before = threading.active_count()
    with P.ProgressMonitor(prog, renderer=P.JsonRenderer(out), status=status, interval=0.02):
        prog.disk(0, total=4).advance(4)
        time.sleep(0.15)
        assert "running" == json.loads(Path(status.path).read_text())["state"]
    assert before == threading.active_count()
    events = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
    assert events[-1] == "end" and "progress" in events
    assert [] == os.listdir(tmp_path / "status")


def test_end_event_finishes_every_disk_and_the_status_file_goes(tmp_path):
    """The end event never shows a disk still running: done on success, failed with
    the error on failure; the status file of the finished operation is removed."""
    for error in (None, E.NoSpaceError(what="archive")):
        out = io.StringIO()
        status = P.StatusFile(str(tmp_path), "export", "web1")
        prog = P.Progress("export", name="web1")
        with contextlib.suppress(E.NoSpaceError):
            with P.ProgressMonitor(prog, renderer=P.JsonRenderer(out), status=status):
                prog.disk(0, total=8).advance(4)
                prog.disk(1, total=8).advance(8)
                if error is not None:
                    raise error
        end = json.loads(out.getvalue().splitlines()[-1])
        want = "done" if error is None else "failed"
        assert (want, [want, want]) == (end["state"], [d["state"] for d in end["disks"]])
        if error is not None:
            assert {"cannot write archive: no space left on device"} == {
                end["error"], *(d["error"] for d in end["disks"])}
        assert not os.path.exists(status.path)


def test_status_files_are_private_even_under_umask_000(tmp_path):
    """Status files are created 0600 whatever the umask (not 0666 under umask 000)."""
    old = os.umask(0)
    try:
        status = P.StatusFile(str(tmp_path / "state"), "import", "web1")
        status.write({"done": 1})
    finally:
        os.umask(old)
    assert 0o600 == stat.S_IMODE(os.stat(status.path).st_mode)


def test_status_file_never_writes_through_a_planted_symlink(tmp_path):
    """A symlink planted at the status file's temporary or final name is never followed:
    the victim keeps its content and the status lands in a new file of ours."""
    status = P.StatusFile(str(tmp_path / "state"), "export", "web1")
    os.makedirs(status.dir)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, status.path + ".tmp")
    os.symlink(victim, status.path)
    status.write({"done": 7})
    assert "precious\n" == victim.read_text()
    assert not os.path.islink(status.path)
    assert 7 == json.loads(Path(status.path).read_text())["done"]


def test_cleanup_removes_status_files_of_dead_processes_only(tmp_path):
    """`cleanup` removes the status files (and temporary files) of processes that are
    gone, never those of a live one."""
    from ganeti_vol.core import procs

    state = tmp_path / "state"
    dead = subprocess.Popen(["true"])
    dead.wait()
    ours = P.StatusFile(str(state), "import", "web1")
    ours.write({"done": 1, "pid": os.getpid(),
                "pid_start": procs.process_start_time(os.getpid())})
    gone = Path(ours.dir) / f"export-web2-{dead.pid}.json"
    gone.write_text(json.dumps({"pid": dead.pid, "pid_start": 1}))
    tmp = Path(ours.dir) / f".export-web2-{dead.pid}.json.tmp-{dead.pid}-1-0123456789ab"
    tmp.write_text("{")
    reused = Path(ours.dir) / f"export-web3-{os.getpid()}.json"  # our pid, another start
    reused.write_text(json.dumps({"pid": os.getpid(), "pid_start": 1}))
    assert sorted([str(gone), str(tmp), str(reused)]) == sorted(
        P.cleanup_status_files(str(state), dry_run=True))
    removed = P.cleanup_status_files(str(state))
    assert sorted([str(gone), str(tmp), str(reused)]) == sorted(removed)
    assert [os.path.basename(ours.path)] == os.listdir(ours.dir)


def test_byte_and_eta_formatting():
    """Decimal units as in MB/s figures; ETA as mm:ss or h:mm:ss."""
    assert ("999 B", "1.5 MB", "2.1 GB") == (P.format_bytes(999), P.format_bytes(1_500_000),
                                             P.format_bytes(2_147_483_648))
    assert ("00:05", "1:01:01", "--:--") == (P.format_eta(5), P.format_eta(3661),
                                            P.format_eta(None))
