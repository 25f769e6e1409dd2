"""The command line: in-process through main(), plus subprocess smoke tests of python -m ganeti_vol."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def test_usage_error_from_argparse_exits_2_without_traceback():
    res = gv("instance", "create", "--debug-level", "99")
    assert res.returncode == 2 and "Traceback" not in res.stderr


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
