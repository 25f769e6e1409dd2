"""Bad bytes and odd names in the files and flags ganeti-vol reads (issue 11 B7/B10, issue 12 A5).

Each gives a one-line error naming the file (or flag) and the cause, with a
documented exit code, and never a traceback; one bad OS definition never
hides the others.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_os

from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Instance
from ganeti_vol.formats import ganeti_export as G
from ganeti_vol.ganeti import discovery

REPO = Path(__file__).resolve().parent.parent


def gv(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ganeti_vol", *argv], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=120)


def one_line_error(res: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """The run failed with ``code`` and one line on stderr holding ``words``, no traceback."""
    assert code == res.returncode, res.stderr
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert 1 == len(lines), res.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# --- OS definition files --------------------------------------------------------------------


@pytest.mark.parametrize("filename, data, where", [
    ("ganeti_api_version", b"\xff20\n", "line 1"),
    ("variants.list", b"default\n\xffvariant\n", "line 2"),
    ("parameters.list", b"p1 first\np2 caf\xe9\n", "line 2"),
])
def test_os_file_that_is_not_utf8_makes_the_os_invalid_and_says_where(tmp_path, filename, data,
                                                                       where):
    """Never decoded to U+FFFD ('\\ufffdvariant' as a variant): the OS is refused."""
    d = make_os(tmp_path, "bad")
    (d / filename).write_bytes(data)
    entry = discovery.probe_os("bad", str(d))
    assert not entry.valid
    assert f"File '{filename}' under path '{d}' is not UTF-8 text" in entry.diagnose
    assert where in entry.diagnose and "\ufffd" not in entry.diagnose
    with pytest.raises(E.OSDefinitionError, match="not UTF-8"):
        discovery.load_os("bad", [str(tmp_path)])


def test_a_huge_parameters_list_is_refused_without_reading_it(tmp_path):
    """A 40 MB parameters.list cost 3 GB; now only 64 KiB + 1 byte are read."""
    d = make_os(tmp_path, "big")
    with open(d / "parameters.list", "w") as f:
        f.writelines(f"p{i:07d} a parameter nobody needs\n" for i in range(3000))  # 99 KB
    entry = discovery.probe_os("big", str(d))
    assert not entry.valid
    assert "File 'parameters.list'" in entry.diagnose and "too large" in entry.diagnose


def test_os_diagnose_of_a_40mb_parameters_list_stays_under_200_mib(tmp_path, node_dirs):
    """Peak RSS of the whole command, measured in a fresh process, with a 40 MB file
    (VmHWM of its own memory: ru_maxrss would start at the forking test runner's)."""
    d = make_os(tmp_path / "os", "big")
    with open(d / "parameters.list", "wb") as f:
        f.write(b"".join(b"p%07d a parameter nobody needs\n" % i for i in range(1_300_000)))
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['ganeti-vol', 'os', 'diagnose', '--search-path', {str(tmp_path / 'os')!r}]\n"
        "try:\n    runpy.run_module('ganeti_vol', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
        "print(hwm.split()[1], file=sys.stderr)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    peak_kib = int(res.stderr.strip().splitlines()[-1])
    assert "too large" in res.stdout
    assert peak_kib < 200 * 1024


def test_ganeti_vol_conf_that_is_not_utf8_breaks_only_its_own_os(tmp_path, node_dirs):
    """It used to end 'os diagnose' for every OS with a UnicodeDecodeError."""
    good = make_os(tmp_path / "os", "good")
    bad = make_os(tmp_path / "os", "bad")
    (bad / "ganeti_vol.conf").write_bytes(b"[disks]\naccess = bl\xffock\n")
    res = gv("os", "diagnose", "--search-path", str(tmp_path / "os"))
    assert 1 == res.returncode and "Traceback" not in res.stderr
    lines = res.stdout.splitlines()
    assert 2 == len(lines)
    assert lines[0].startswith(f"bad: invalid - File 'ganeti_vol.conf' under path '{bad}' is "
                               "invalid: line 2: not UTF-8 text (byte 0xff)")
    assert lines[1].startswith(f"good: valid (path: {good})")


def test_os_directory_names_with_a_newline_cannot_forge_diagnose_lines(tmp_path, node_dirs):
    """One line per entry whatever the directory is called; odd names are quoted."""
    make_os(tmp_path / "os", "good")
    make_os(tmp_path / "os", "evil\ngood: valid [trusted]")
    res = gv("os", "diagnose", "--search-path", str(tmp_path / "os"))
    lines = res.stdout.splitlines()
    assert 2 == len(lines), res.stdout
    assert lines[0].startswith("'evil\\ngood: valid [trusted]': invalid - Directory for OS "
                               "'evil\\ngood: valid [trusted]' not found")
    assert lines[1].startswith("good: valid")


# --- instance files, node configs, export configs -----------------------------------------


def test_instance_file_that_is_not_utf8_is_a_one_line_config_error(tmp_path, node_dirs):
    p = tmp_path / "web1.ini"
    p.write_bytes(b"[instance]\nname = web1\nos = x\n[osparams]\nmotd = caf\xe9\n")
    one_line_error(gv("instance", "env", str(p)), 4, f"invalid instance file '{p}'",
                   "line 5: not UTF-8 text (byte 0xe9)")


def test_node_config_that_is_not_utf8_is_a_one_line_config_error(tmp_path):
    p = tmp_path / "node.conf"
    p.write_bytes(b"os_search_path = /srv/\xff\n")
    one_line_error(gv("--config", str(p), "os", "list"), 4, f"invalid node config '{p}'",
                   "line 1: not UTF-8 text (byte 0xff)")


def test_nul_byte_in_an_instance_file_parameter_is_refused(tmp_path, node_dirs):
    """A NUL cannot go into an environment: the file is refused, not execve's ValueError."""
    p = tmp_path / "web1.ini"
    p.write_bytes(b"[instance]\nname = web1\nos = x\n[osparams]\nmotd = a\x00b\n")
    one_line_error(gv("instance", "env", str(p)), 4, f"'{p}'", "line 5: contains a NUL byte")


def _ganeti_export(tmp_path: Path, config: bytes) -> Path:
    d = tmp_path / "export" / "old1"
    d.mkdir(parents=True)
    (d / "config.ini").write_bytes(config)
    (d / "d0").write_bytes(b"\0" * 4096)
    return d


CONFIG = (b"[export]\nversion = 0\nos = testos+default\n[instance]\nname = old1\n"
          b"disk0_size = 1\ndisk0_dump = d0\ndisk_count = 1\n")


@pytest.mark.parametrize("extra, cause", [
    (b"[os]\nmotd = caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset"),
    (b"[os]\nmotd = a\x00b\n", "line 10 contains a NUL byte"),
    (b"[hypervisor]\nbad name = 1\n", "[hypervisor] option 'bad name': invalid name"),
])
def test_bad_ganeti_export_config_is_a_one_line_archive_error(tmp_path, node_dirs, extra, cause):
    d = _ganeti_export(tmp_path, CONFIG + extra)
    target = tmp_path / "t.img"
    res = gv("import", "--name", "new1", "--disk", f"{target},size=1M", str(d), "--raw")
    one_line_error(res, 15, f"export config '{d / 'config.ini'}'", cause)
    assert not target.exists()


# --- -H / -B / -O names ---------------------------------------------------------------------


@pytest.mark.parametrize("flag, item, shown", [
    ("-H", "kernel-path=/x", "hvparams/kernel-path: unknown kvm hypervisor parameter"),
    ("-H", "kernel path=/x", "hvparams/kernel path: unknown kvm hypervisor parameter"),
    ("-B", "max.mem=1", "beparams/max.mem: unknown backend parameter"),
    ("-B", "vcpus\n[os]\nx=1", "beparams/vcpus\\n[os]\\nx: unknown backend parameter"),
    ("-H", "serial_console=maybe", "serial_console: 'maybe' is not a valid boolean"),
    ("-O", "bad name=1", "osparams/bad name: invalid name"),
])
def test_bad_parameter_names_and_values_are_one_line_usage_errors(os_factory, flag, item, shown):
    """'-', space, '.' or a newline in a -H/-B name (the newline used to inject sections into
    config.ini), an unknown name or a value of the wrong type: exit 3 naming it."""
    os_factory("testos")
    res = gv("instance", "env", "--name", "web1", "--os", "testos", flag, item)
    one_line_error(res, 3, "invalid parameters of instance 'web1'", shown)


def test_config_ini_never_gets_a_name_that_changes_its_structure():
    """Whatever builds the instance, render_config refuses a name with a newline or '='."""
    for bad in ("a\n[os_private]\nroot", "a = b", "x:y"):
        inst = Instance(name="w", os="x", uuid="u", ctime=0, mtime=0, osparams={bad: "1"})
        with pytest.raises(E.UsageError, match=r"cannot write \[os\] option"):
            G.render_config(inst, {})
    inst = Instance(name="w", os="x", uuid="u", ctime=0, mtime=0,
                    osparams_private={"root\n[os]\nx": "secret"})
    with pytest.raises(E.UsageError, match=r"\[os_private\] option 'root\\n\[os\]\\nx'"):
        G.render_config(inst, {})
