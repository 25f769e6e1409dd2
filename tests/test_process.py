"""The script runner with real scripts: exit codes, signals, timeouts, clean env, logs, streams."""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from pathlib import Path

import pytest
from conftest import write_script

from ganeti_vol.core import errors as E
from ganeti_vol.core import signals
from ganeti_vol.system import process, scriptlog


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture
def logfile(tmp_path):
    return scriptlog.new_log_file(str(tmp_path / "log"), "add", "testos+default", "inst1")


def run(script, logfile, env=None, **kw):
    return process.run_script(
        str(script), env or {"PATH": "/bin:/usr/bin"}, cwd=str(script.parent), op="create",
        log_path=logfile, **kw,
    )


def test_success_returns_a_result_with_log_and_duration(tmp_path, logfile):
    s = write_script(tmp_path / "ok", "echo to-stdout; echo to-stderr >&2")
    result = run(s, logfile)
    assert result.returncode == 0 and result.log_path == logfile
    assert Path(logfile).read_text() == "to-stdout\nto-stderr\n"


def test_non_zero_exit_names_script_status_and_last_20_log_lines(tmp_path, logfile):
    s = write_script(tmp_path / "bad", "i=0; while [ $i -lt 30 ]; do echo line$i >&2; i=$((i+1)); done; exit 3")
    with pytest.raises(E.ScriptFailed) as err:
        run(s, logfile)
    e = err.value
    assert e.returncode == 3 and e.signal is None and e.exit_code == 8
    assert e.log_tail == [f"line{i}" for i in range(10, 30)]
    msg = str(e)
    assert msg.startswith(f"OS create script '{s}' failed (exited with exit code 3)")
    assert f"last lines of the log file '{logfile}':\n    line10\n" in msg
    assert "line9\n" not in msg


def test_script_killed_by_a_signal_is_reported_with_the_signal(tmp_path, logfile):
    s = write_script(tmp_path / "killed", "echo dying >&2; kill -9 $$")
    with pytest.raises(E.ScriptFailed) as err:
        run(s, logfile)
    assert err.value.signal == 9
    assert "(terminated by signal 9 (SIGKILL))" in str(err.value)


def test_timeout_kills_the_whole_process_group(tmp_path, logfile):
    """TERM then KILL go to the group: a background child that ignores TERM dies too."""
    pidfile = tmp_path / "child.pid"
    s = write_script(
        tmp_path / "slow",
        f"sh -c 'trap \"\" TERM; echo $$ > {pidfile}; while :; do sleep 0.1; done' &\n"
        "sleep 60\n",
    )
    t0 = time.monotonic()
    with pytest.raises(E.ScriptTimeout) as err:
        run(s, logfile, timeout=0.5)
    assert err.value.exit_code == 9
    assert "timed out after 0.5s and was killed" in str(err.value)
    child = int(pidfile.read_text())
    assert wait_gone(child), "the TERM-ignoring background child survived"
    assert time.monotonic() - t0 < 15


def test_script_gets_exactly_the_given_environment(tmp_path, logfile, monkeypatch):
    """Nothing leaks from our environment (a sentinel) into the script."""
    monkeypatch.setenv("GANETI_VOL_SENTINEL", "leaked")
    s = write_script(tmp_path / "envdump", "exec /usr/bin/env")
    env = {"PATH": "/sbin:/bin", "OSP_X": "1", "INSTANCE_NAME": "a b c"}
    run(s, logfile, env=env)
    got = dict(line.split("=", 1) for line in Path(logfile).read_text().splitlines())
    for added_by_sh in ("PWD", "SHLVL", "_"):  # as Ganeti's own env test does
        got.pop(added_by_sh, None)
    assert got == env


def test_cwd_is_the_script_directory_and_paths_with_spaces_work(tmp_path, logfile):
    d = tmp_path / "os dir with spaces"
    d.mkdir()
    s = write_script(d / "create", 'pwd; echo "$0"')
    run(s, logfile)
    assert Path(logfile).read_text().splitlines() == [str(d), str(s)]


def test_stdin_is_dev_null(tmp_path, logfile):
    s = write_script(tmp_path / "reads", "cat; echo done")
    run(s, logfile, timeout=10)
    assert Path(logfile).read_text() == "done\n"


def test_script_flooding_stderr_does_not_deadlock(tmp_path, logfile):
    s = write_script(tmp_path / "flood", "head -c 8388608 /dev/zero | tr '\\0' x >&2; echo end >&2")
    run(s, logfile, timeout=60)
    assert os.path.getsize(logfile) == 8 * 1024 * 1024 + 4


def test_missing_shebang_gives_a_clear_error(tmp_path, logfile):
    s = tmp_path / "noshebang"
    s.write_bytes(b"\x7fELFgarbage")
    s.chmod(0o755)
    with pytest.raises(E.ScriptError, match=r"cannot run OS create script .*Exec format error"):
        run(s, logfile)


def test_capture_returns_output_and_quotes_it_on_failure(tmp_path):
    s = write_script(tmp_path / "verify", 'echo "bad parameter: $1" >&2; exit 1')
    with pytest.raises(E.ScriptFailed) as err:
        process.run_script(str(s), {}, cwd=str(tmp_path), op="verify", args=["parameters"],
                           capture=True)
    assert "output:\n    bad parameter: parameters" in str(err.value)


def test_log_file_names_follow_ganeti_and_are_unique_within_a_second(tmp_path):
    d = str(tmp_path / "logs")
    paths = [scriptlog.new_log_file(d, "export", "sample+default", "inst1", "disk0") for _ in range(3)]
    assert len(set(paths)) == 3
    pattern = r"export-sample\+default-inst1-disk0-\d{4}-\d\d-\d\d_\d\d_\d\d_\d\d(-[23])?\.log"
    for p in paths:
        assert re.fullmatch(pattern, os.path.basename(p)), p
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600


def test_log_component_must_not_contain_a_slash():
    with pytest.raises(E.ProgrammerError):
        scriptlog.log_file_name("export", "os", "inst", "disk/0")


def test_unwritable_log_dir_is_a_clear_config_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(E.ConfigError, match="cannot create log directory"):
        scriptlog.new_log_file(str(tmp_path / "file" / "sub"), "add", "os", "inst")


def test_tail_lines_skips_blank_lines_and_limits_count(tmp_path):
    p = tmp_path / "l"
    p.write_text("".join(f"{i}\n\n" for i in range(50)))
    assert scriptlog.tail_lines(str(p), 3) == ["47", "48", "49"]
    assert scriptlog.tail_lines(str(tmp_path / "missing")) == []


# --- streams ---------------------------------------------------------------------------


def drain(fd: int) -> bytes:
    chunks = []
    while True:
        data = os.read(fd, 1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def stream(script, logfile, **kw):
    kw.setdefault("direction", "read")
    return process.open_script_stream(
        str(script), {"PATH": "/bin:/usr/bin"}, cwd=str(script.parent), op="export",
        log_path=logfile, **kw,
    )


def test_read_stream_delivers_stdout_and_the_size_announced_on_exp_size_fd(tmp_path, logfile):
    s = write_script(
        tmp_path / "export",
        "#!/bin/bash\necho \"fd=$EXP_SIZE_FD\" >&2\necho 300000 >&$EXP_SIZE_FD\n"
        "head -c 300000 /dev/urandom\n",
    )
    with stream(s, logfile, size_fd=True) as st:
        data = drain(st.fd)
        size = st.size_hint()
    assert len(data) == 300000 and size == 300000
    fd_number = int(re.search(r"fd=(\d+)", Path(logfile).read_text()).group(1))
    assert fd_number > 9, "EXP_SIZE_FD must be above 9 as under Ganeti's daemon"


def test_invalid_size_on_exp_size_fd_is_ignored(tmp_path, logfile, caplog):
    s = write_script(tmp_path / "export", "#!/bin/bash\necho lots >&$EXP_SIZE_FD\necho data\n")
    with stream(s, logfile, size_fd=True) as st:
        assert drain(st.fd) == b"data\n"
    assert st.size_hint() is None
    assert "ignoring invalid size 'lots'" in caplog.text


def test_read_stream_pipe_is_enlarged_to_1mib(tmp_path, logfile):
    import fcntl

    s = write_script(tmp_path / "export", "echo x")
    with stream(s, logfile) as st:
        assert fcntl.fcntl(st.fd, 1032) == 1 << 20  # F_GETPIPE_SZ
        drain(st.fd)


def test_failed_stream_script_raises_after_the_block(tmp_path, logfile):
    s = write_script(tmp_path / "export", "echo partial; echo 'disk not found' >&2; exit 2")
    with pytest.raises(E.ScriptFailed, match="exited with exit code 2") as err:
        with stream(s, logfile) as st:
            assert drain(st.fd) == b"partial\n"
    assert err.value.log_tail == ["disk not found"]


def test_error_in_the_block_kills_the_script_and_propagates_unchanged(tmp_path, logfile):
    pidfile = tmp_path / "pid"
    s = write_script(tmp_path / "export", f"echo $$ > {pidfile}; exec sleep 60")
    before = open_fds()
    t0 = time.monotonic()
    with pytest.raises(KeyError):
        with stream(s, logfile) as st:
            while not pidfile.exists() or not pidfile.read_text().strip():
                time.sleep(0.01)
            raise KeyError("ours")
    assert time.monotonic() - t0 < 10
    assert wait_gone(int(pidfile.read_text()))
    assert st.poll() is not None
    assert open_fds() == before, "file descriptors leaked"


def test_write_stream_feeds_stdin_and_waits(tmp_path, logfile):
    out = tmp_path / "out"
    s = write_script(tmp_path / "import", f"cat > '{out}'")
    with stream(s, logfile, direction="write") as st:
        os.write(st.fd, b"hello " * 1000)
    assert out.read_bytes() == b"hello " * 1000


def test_stream_timeout_raises_script_timeout(tmp_path, logfile):
    s = write_script(tmp_path / "import", "sleep 60")
    with pytest.raises(E.ScriptTimeout):
        with stream(s, logfile, direction="write", timeout=0.3):
            pass


def test_kill_from_another_thread_ends_a_stuck_reader(tmp_path, logfile):
    """The stall watchdog's kill() unblocks a read() waiting on a silent script."""
    s = write_script(tmp_path / "export", "sleep 60")
    with pytest.raises(E.ScriptFailed, match="SIGTERM"):
        with stream(s, logfile) as st:
            threading.Timer(0.3, st.kill).start()
            assert drain(st.fd) == b""


def test_ctrl_c_while_a_script_starts_is_held_until_it_can_be_stopped():
    """SIGINT landing while a child is being started (between the fork and the moment
    ganeti-vol holds it) is held and raised as the start ends, where the caller stops
    the child; nothing is held outside, or for SIG_IGN/SIG_DFL."""
    import signal

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    reached = False
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals.held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)  # Python handlers run between bytecodes: it would be here
                reached = True
        assert reached
        assert signal.default_int_handler is signal.getsignal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    finally:
        signal.signal(signal.SIGINT, old)
