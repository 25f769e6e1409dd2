"""The command line: in-process through main(), plus subprocess smoke tests of python -m ganeti_vol."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from ganeti_vol.cli import main

REPO = Path(__file__).resolve().parent.parent


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def gv(*argv, env=None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "ganeti_vol", *argv], capture_output=True, text=True,
        env={**os.environ, **(env or {})}, cwd=REPO, timeout=120, **kw,
    )


def test_os_list_prints_name_variant_lines(capsys, os_factory):
    os_factory("alpha", variants=("v1", "v2"))
    os_factory("beta", variants=None)
    os_factory("broken", skip=("import",))
    rc, out, _ = run(capsys, "os", "list")
    assert rc == 0
    assert out.splitlines() == ["Name", "alpha+v1", "alpha+v2", "beta"]
    rc, out, _ = run(capsys, "os", "list", "--json")
    assert json.loads(out) == ["alpha+v1", "alpha+v2", "beta"]


def test_os_diagnose_shows_reasons_and_shadowed_entries_and_exits_1(capsys, os_factory, tmp_path):
    os_factory("good")
    os_factory("broken", skip=("import",))
    other = tmp_path / "other"
    from conftest import make_os

    make_os(other, "good")
    rc, out, _ = run(capsys, "os", "diagnose", "--search-path", str(tmp_path / "node" / "os"),
                     "--search-path", str(other))
    assert rc == 1
    lines = out.splitlines()
    assert lines[0].startswith("broken: invalid - File 'import' under path")
    assert lines[1].startswith("good: valid (path: ") and "[API versions: 20]" in lines[1]
    assert "[variants: default] [parameters: param1] [trusted]" in lines[1]
    assert lines[2] == f"    [hidden] path: {other / 'good'}, status: valid"
    rc, out, _ = run(capsys, "os", "diagnose", "--json")
    data = json.loads(out)
    assert {e["name"]: e["valid"] for e in data["entries"]} == {"broken": False, "good": True}


def test_os_diagnose_exits_0_when_all_valid(capsys, os_factory):
    os_factory("good")
    assert run(capsys, "os", "diagnose")[0] == 0


def test_os_info_text_and_json(capsys, os_factory):
    os_factory("alpha", variants=("v1",), parameters=(("size", "disk size"), ("flag", "")))
    rc, out, _ = run(capsys, "os", "info", "alpha+v1")
    assert rc == 0
    assert "  variants: v1 (default: v1)" in out and "    size: disk size" in out
    rc, out, _ = run(capsys, "os", "info", "alpha", "--json")
    data = json.loads(out)
    assert data["api_version"] == 20 and data["parameters"][1] == {"name": "flag", "description": ""}


def test_os_info_of_a_missing_os_is_a_one_line_error_with_exit_5(capsys, node_dirs):
    rc, out, err = run(capsys, "os", "info", "nothere")
    assert rc == 5 and out == ""
    assert err.strip().splitlines() == [
        f"ganeti-vol: error: Directory for OS nothere not found in search path ({node_dirs['os']})"
    ]


def test_instance_env_prints_the_export_environment(capsys, os_factory, tmp_path):
    os_factory()
    disk = tmp_path / "d.img"
    rc, out, _ = run(capsys, "instance", "env", "--name", "i1", "--os", "testos",
                     "--disk-spec", f"{disk},size=4M", "--op", "export", "--disk", "0",
                     "--debug-level", "1", "-O", "param1=x")
    assert rc == 0
    env = dict(line.split("=", 1) for line in out.splitlines())
    assert env["EXPORT_DEVICE"] == str(disk) and env["EXPORT_INDEX"] == "0"
    assert env["EXP_SIZE_FD"] == "11" and env["DEBUG_LEVEL"] == "1" and env["OSP_PARAM1"] == "x"
    assert env["OS_VARIANT"] == "default"


def test_instance_env_rejects_a_missing_disk_index(capsys, os_factory, tmp_path):
    os_factory()
    rc, _, err = run(capsys, "instance", "env", "--name", "i1", "--os", "testos",
                     "--disk-spec", f"{tmp_path}/d.img,size=1M", "--op", "import", "--disk", "3")
    assert rc == 3 and "instance 'i1' has no disk 3 (it has 1)" in err


def test_instance_create_rename_and_verify_params_from_a_file(capsys, os_factory, tmp_path):
    os_factory()
    f = tmp_path / "i.ini"
    f.write_text("[instance]\nname = web1\nos = testos+default\n[disks]\n[[0]]\npath = d.img\nsize = 2M\n")
    rc, out, _ = run(capsys, "instance", "create", str(f))
    assert rc == 0 and out.startswith("create of instance 'web1' (testos+default): ok")
    rc, out, _ = run(capsys, "instance", "verify-params", str(f), "--json")
    assert rc == 0 and json.loads(out)["status"] == "ok"
    rc, out, _ = run(capsys, "instance", "rename", str(f), "web2", "--json")
    assert rc == 0 and json.loads(out)["old_name"] == "web1"
    assert "name = web2" in f.read_text()


def test_debug_level_reaches_the_script(capsys, os_factory, tmp_path):
    os_factory(scripts={"create": f'echo "$DEBUG_LEVEL" > {tmp_path}/dl'})
    rc, _, err = run(capsys, "instance", "create", "--name", "i", "--os", "testos+default",
                     "--disk", f"{tmp_path}/d.img,size=1M", "--debug-level", "2")
    assert rc == 0, err
    assert (tmp_path / "dl").read_text() == "2\n"


def test_bad_instance_file_lists_every_problem_without_traceback(capsys, tmp_path, node_dirs):
    f = tmp_path / "i.ini"
    f.write_text("[instance]\nname = web1\nrunning = perhaps\nbogus = 1\n")
    rc, _, err = run(capsys, "instance", "create", str(f))
    assert rc == 4
    assert "instance/running:" in err and "instance/bogus: unknown key" in err
    assert "Traceback" not in err


def test_failed_create_exits_8_with_the_log_tail(capsys, os_factory, tmp_path):
    os_factory(scripts={"create": "echo 'no space for rootfs' >&2; exit 1"})
    rc, _, err = run(capsys, "instance", "create", "--name", "i", "--os", "testos+default",
                     "--disk", f"{tmp_path}/d.img,size=1M")
    assert rc == 8
    assert "failed (exited with exit code 1)" in err and "    no space for rootfs" in err


def test_debug_flag_shows_the_traceback(capsys, node_dirs):
    rc, _, err = run(capsys, "--debug", "os", "info", "nothere")
    assert rc == 5 and "Traceback" in err


def test_module_entry_point_and_version():
    res = gv("--version")
    assert res.returncode == 0 and res.stdout.startswith("ganeti-vol ")


def test_usage_error_exits_3_with_the_usage_of_the_subcommand():
    """A usage error is UsageError's exit 3 (2 is for internal errors), with the usage of
    the command it is about: an invalid value, and an argument argparse does not know
    (which it would report with the top level's usage)."""
    res = gv("instance", "create", "--debug-level", "99")
    assert res.returncode == 3 and "Traceback" not in res.stderr
    assert res.stderr.startswith("usage: ganeti-vol instance create ")
    assert "ganeti-vol: error: instance create: argument --debug-level: invalid choice" \
        in res.stderr
    res = gv("backup", "list", "--bogus")
    assert res.returncode == 3
    assert res.stderr.splitlines() == [
        "usage: ganeti-vol backup list [-h] [--no-headers] [--separator SEP]",
        "                              [-o [+]FIELD,...] [--export-dir DIR] [--json]",
        "ganeti-vol: error: backup list: unrecognized arguments: --bogus",
    ]
    res = gv("--bogus", "os", "list")
    assert res.returncode == 3 and res.stderr.startswith("usage: ganeti-vol [-h]")


def all_parsers(parser=None, path=("ganeti-vol",)):
    """(command path, parser) for the top level and every sub-command, depth first."""
    import argparse

    from ganeti_vol.cli import build_parser

    parser = parser or build_parser()
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, path + (name,))


def test_no_command_takes_an_abbreviated_flag(capsys, tmp_path, node_dirs):
    """'--out' is refused, not taken for '--output'; every (sub)parser refuses abbreviations."""
    rc, out, err = run(capsys, "export", "--name", "x", "--os", "sample", "--out", str(tmp_path))
    assert rc == 3 and "unrecognized arguments: --out" in err
    assert not list(node_dirs["export"].iterdir()) and not list(tmp_path.glob("x*"))
    rc, _, err = run(capsys, "backup", "list", "--export", str(tmp_path))
    assert rc == 3 and "unrecognized arguments: --export" in err
    lenient = [" ".join(path) for path, p in all_parsers() if p.allow_abbrev]
    assert lenient == []
    assert len(list(all_parsers())) > 30


def test_json_errors_are_json_on_stdout(capsys, node_dirs, tmp_path):
    """With --json, an error is a JSON object (type, exit code, message) on stdout, for a
    failed operation and for a usage error alike; the one-line error stays on stderr."""
    rc, out, err = run(capsys, "os", "info", "nothere", "--json")
    error = json.loads(out)["error"]
    assert rc == 5 == error["exit_code"] and error["type"] == "OSDefinitionError"
    assert "nothere" in error["message"] and "error:" in err
    rc, out, _ = run(capsys, "backup", "list", "--json", "--separator")
    error = json.loads(out)["error"]
    assert rc == 3 == error["exit_code"] and error["type"] == "UsageError"
    assert "--separator: expected one argument" in error["message"]
    assert error["usage"].startswith("usage: ganeti-vol backup list")
    rc, out, _ = run(capsys, "backup", "list", "--export-dir", str(tmp_path / "none"), "--json")
    assert rc == 3 and "no such directory" in json.loads(out)["error"]["message"]


GOLDEN = REPO / "tests" / "data" / "archive-v1" / "golden1.example.com"


def test_backup_list_takes_gnt_backup_list_flags(capsys, node_dirs):
    """--no-headers, --separator and -o [+]FIELD,... as gnt-backup list has them."""
    import shutil

    shutil.copytree(GOLDEN, node_dirs["export"] / "golden1")
    (node_dirs["export"] / "junk").mkdir()
    rc, out, _ = run(capsys, "backup", "list", "--no-headers", "--separator", "|",
                     "-o", "name,instance,disks,valid")
    assert rc == 0
    assert out.splitlines() == ["golden1|golden1.example.com|2|Y", "junk|-|-|N"]
    rc, out, _ = run(capsys, "backup", "list", "-o", "+path", "--separator", ";")
    assert out.splitlines()[0] == "NAME;FORMAT;INSTANCE;DISKS;SIZE;STORED;CREATED;PATH"
    assert out.splitlines()[1].endswith(f";{node_dirs['export'] / 'golden1'}")
    rc, out, _ = run(capsys, "backup", "list", "--no-headers", "-o", "name,size")
    assert out.splitlines() == ["golden1  394.2 kB", "junk     -"]
    rc, _, err = run(capsys, "backup", "list", "-o", "name,nosuch")
    assert rc == 3 and "unknown field(s) nosuch" in err


def test_backup_list_of_a_missing_export_dir_is_an_error(capsys, tmp_path):
    rc, out, err = run(capsys, "backup", "list", "--export-dir", str(tmp_path / "none"))
    assert rc == 3 and out == ""
    assert err.strip().endswith(f"cannot list exports in '{tmp_path / 'none'}' (--export-dir): "
                                "no such directory")


def test_a_bare_disk_size_in_an_instance_file_is_mib(capsys, os_factory, tmp_path):
    """'size = 64' is 64 MiB, as in Ganeti and --disk (it was 64 bytes)."""
    os_factory("plain")
    inst = tmp_path / "i.ini"
    inst.write_text("[instance]\nname = i1\nos = plain+default\n[disks]\n[[0]]\npath = d0.img\n"
                    "size = 64\n[[1]]\npath = d1.img\nsize = 512K\n")
    rc, out, _ = run(capsys, "instance", "env", str(inst), "--op", "create")
    assert rc == 0
    assert "DISK_0_SIZE=64" in out.splitlines() and "DISK_1_SIZE=1" in out.splitlines()
    assert run(capsys, "instance", "create", str(inst))[0] == 0
    assert (tmp_path / "d0.img").stat().st_size == 64 << 20


def test_progress_bar_fits_the_terminal_width(tmp_path, node_dirs):
    """On a 40-column terminal every frame of the bar is at most 39 characters."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))
        long_name = tmp_path / ("a-rather-long-archive-name-" * 3)
        import shutil

        shutil.copytree(GOLDEN, long_name)
        proc = subprocess.run(
            [sys.executable, "-m", "ganeti_vol", "backup", "verify", str(long_name),
             "--progress", "bar"], stdout=subprocess.PIPE, stderr=slave, cwd=REPO,
            env={**os.environ, "COLUMNS": "200"}, timeout=120)
        os.close(slave)
        slave = -1
        screen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child side is closed and drained
                break
            if not chunk:
                break
            screen += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert proc.returncode == 0, screen
    frames = [f for f in screen.decode().replace("\n", "\r").split("\r") if f.strip()]
    assert frames and all(f.startswith("verify ") for f in frames)
    assert max(len(f) for f in frames) <= 39, frames
    assert "100.0%" in frames[-1]


def test_sigint_stops_the_script_cleans_up_and_exits_130(os_factory, tmp_path, node_dirs):
    """Ctrl-C to ganeti-vol stops its children (their process group) and exits 128+2."""
    pidfile = tmp_path / "pid"
    os_factory("slow", scripts={"create": f"echo $$ > {pidfile}\nsleep 60 & wait"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "ganeti_vol", "instance", "create", "--name", "i", "--os", "slow+default",
         "--disk", f"{tmp_path}/d.img,size=1M"],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    child = int(pidfile.read_text())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "interrupted by SIGINT" in err and "Traceback" not in err
    from test_process import wait_gone

    assert wait_gone(child)


def test_demo_runs_the_main_job_without_root_paths(tmp_path):
    res = gv("demo", "--dir", str(tmp_path / "demo"), "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    ops = [s["operation"] for s in data["steps"]]
    assert ops == ["create", "export", "import", "verify"]
    assert all(s["status"] == "ok" for s in data["steps"])
    assert data["steps"][3]["disks_identical"] == [True, True]
    assert data["steps"][2]["rename"]["status"] == "ok"  # imported under a new name
    assert Path(data["work_dir"]).is_dir()
