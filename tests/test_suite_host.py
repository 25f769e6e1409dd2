"""The suite on a host that is not quiet: it must pass where SIGINT is inherited ignored
(nohup, some CI runners) and while something else on the host uses loop devices."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from conftest import REPO, sparse_file
from disk_helpers import needs_loop


def pytest_child(tmp_path: Path, *tests: str, **kw) -> subprocess.CompletedProcess:
    """Run ``tests`` in a new pytest process (its own base temp dir under ``tmp_path``)."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
         f"--basetemp={tmp_path / 'bt'}", *tests],
        cwd=REPO, capture_output=True, text=True, timeout=300, **kw,
    )


def test_ctrl_c_tests_pass_when_sigint_is_inherited_ignored(tmp_path):
    """The tests that send themselves a real SIGINT install Python's handler first
    (conftest: default_sigint), so an inherited SIG_IGN does not swallow it."""
    proc = pytest_child(
        tmp_path,
        "tests/test_snapshots.py::test_keyboard_interrupt_inside_a_snapshot_still_releases_it",
        "tests/test_loopdev.py::test_keyboard_interrupt_inside_attached_still_detaches_and_"
        "deletes_partitions",
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " passed" in proc.stdout and "failed" not in proc.stdout


@contextlib.contextmanager
def loop_neighbour(image: Path, hold: float = 0.3) -> Iterator[None]:
    """Another user of loop devices: every 10 ms it binds the lowest free one
    (``losetup -f``), which it lets go ``hold`` seconds later; so a loop device that a
    test unbinds is taken at once, as on a busy host."""
    stop = threading.Event()

    def churn() -> None:
        held: deque[tuple[float, str]] = deque()
        try:
            while not stop.is_set():
                proc = subprocess.run(["losetup", "-f", "--show", str(image)],
                                      capture_output=True, text=True, timeout=30)
                if proc.returncode == 0:
                    held.append((time.monotonic() + hold, proc.stdout.strip()))
                while held and held[0][0] <= time.monotonic():
                    subprocess.run(["losetup", "-d", held.popleft()[1]], timeout=30)
                time.sleep(0.01)
        finally:
            for _, device in held:
                subprocess.run(["losetup", "-d", device], timeout=30)

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(60)


@needs_loop
def test_loop_cleanup_tests_pass_beside_another_user_of_loop_devices(tmp_path):
    """The cleanup tests leave partitions on an unbound loop device on purpose; a neighbour
    that binds whatever ``losetup -f`` gives must not take it (nor their crashed runs')."""
    image = sparse_file(tmp_path / "neighbour.img", 1 << 20)
    tests = [f"tests/test_loopdev.py::{name}" for name in (
        "test_cleanup_detaches_a_leaked_device_and_never_touches_foreign_ones",
        "test_cleanup_deletes_stale_partitions_it_has_a_record_for",
        "test_cli_cleanup_reports_what_it_did_and_dry_run_changes_nothing",
        "test_crash_without_other_users_leaves_nothing_attached_and_cleanup_forgets_it",
    )]
    with loop_neighbour(image):
        for _ in range(2):
            proc = pytest_child(tmp_path, *tests)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert "4 passed" in proc.stdout
