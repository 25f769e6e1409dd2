"""Messages that said the wrong thing (issue 12 A12 and 18)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ganeti_vol.cli import main
from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Instance
from ganeti_vol.ops import operations
from ganeti_vol.system import scriptlog

REPO = Path(__file__).resolve().parent.parent


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def gv(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ganeti_vol", *argv], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


# --- failure tails (A12) ---------------------------------------------------------------------


def test_failure_tail_has_the_scripts_stdout_when_os_test_keeps_it_apart(tmp_path, node_config,
                                                                      os_factory):
    """Under 'os test' stdout goes to its own file; the create failure still quotes it
    (snf-image prints its real cause on stdout, seen before only with --keep)."""
    d = os_factory(scripts={"create": "echo 'ERROR: image not found: debian.img'; "
                                      "echo 'create: giving up' >&2; exit 1"})
    ctx = operations.OpContext(node_config)
    inst = Instance(name="i1", os="testos+default", uuid="u", ctime=0, mtime=0)
    with scriptlog.watch(str(tmp_path)) as seen, pytest.raises(E.ScriptFailed) as info:
        operations.create(ctx, inst)
    text = str(info.value)
    assert "create: giving up" in text
    assert "    ERROR: image not found: debian.img" in text
    assert seen.scripts[-1].stdout_path and "last lines of its stdout" in text
    assert str(d) in text


def test_verify_failure_under_os_test_quotes_stdout_and_says_output_once(tmp_path, node_config,
                                                                       os_factory):
    os_factory(scripts={"verify": "echo 'param1: must be a number'; exit 1"})
    ctx = operations.OpContext(node_config)
    inst = Instance(name="i1", os="testos+default", uuid="u", ctime=0, mtime=0,
                    osparams={"param1": "x"})
    with scriptlog.watch(str(tmp_path)), pytest.raises(E.OSDefinitionError) as info:
        operations.verify_params(ctx, inst)
    assert "    param1: must be a number" in str(info.value)


def test_validation_failure_says_output_once(capsys, os_factory):
    """It printed 'output:' twice: 'failed (...), output:\\noutput:\\n    ...'."""
    os_factory(scripts={"verify": "echo 'param1: must be a number' >&2; exit 1"})
    rc, _, err = run(capsys, "instance", "verify-params", "--name", "i1", "--os",
                     "testos+default", "-O", "param1=x")
    assert 5 == rc
    assert 1 == err.count("output:")
    assert ("OS validation script failed (exited with exit code 1), output:\n"
            "    param1: must be a number") in err


# --- misleading messages (18) -----------------------------------------------------------------


def _export_two_disks(capsys, tmp_path, os_factory) -> None:
    os_factory(scripts={"export": 'cat "$EXPORT_DEVICE"', "import": 'cat > "$IMPORT_DEVICE"'})
    src = tmp_path / "w1.ini"
    src.write_text("[instance]\nname = w1\nos = testos+default\n[disks]\n[[0]]\npath = a0.img\n"
                   "size = 8M\n[[1]]\npath = a1.img\nsize = 4M\n")
    assert 0 == run(capsys, "instance", "create", str(src))[0]
    assert 0 == run(capsys, "export", str(src))[0]


def test_too_small_target_is_refused_before_anything_is_written_not_called_broken(
        capsys, tmp_path, os_factory):
    """'are broken: partially imported' was said when nothing had been written; now every
    target is checked first and nothing is created or written."""
    _export_two_disks(capsys, tmp_path, os_factory)
    (tmp_path / "b1.img").write_bytes(b"\0" * (1 << 20))
    dst = tmp_path / "w2.ini"
    dst.write_text("[instance]\nname = w2\n[disks]\n[[0]]\npath = b0.img\n[[1]]\npath = b1.img\n")
    rc, _, err = run(capsys, "import", str(dst), "w1")
    assert 7 == rc
    assert "cannot import into disk 1 of instance 'w2'" in err and "too small" in err
    assert "broken" not in err and "partially" not in err
    assert not (tmp_path / "b0.img").exists()  # disk 0 was not even created


def test_import_of_a_ganeti_export_does_not_claim_verified_chunks(capsys, tmp_path, os_factory):
    _export_two_disks(capsys, tmp_path, os_factory)
    src = tmp_path / "w1.ini"
    assert 0 == run(capsys, "export", str(src), "--format", "ganeti", "--archive-name", "g1")[0]
    dst = tmp_path / "w2.ini"
    dst.write_text("[instance]\nname = w2\n[disks]\n[[0]]\npath = b0.img\n[[1]]\npath = b1.img\n")
    rc, out, _ = run(capsys, "import", str(dst), "g1")
    assert 0 == rc
    assert "every chunk verified" not in out
    assert "not verified: a Ganeti export records no checksums" in out
    rc, out, _ = run(capsys, "import", str(dst), "w1")
    assert 0 == rc and "every chunk verified" in out


def test_missing_disk_path_from_a_flag_says_it_does_not_exist(capsys, os_factory, tmp_path):
    """It said 'disks/0/size: missing value' for a path that does not exist."""
    os_factory()
    missing = tmp_path / "nope.img"
    rc, _, err = run(capsys, "instance", "env", "--name", "i1", "--os", "testos",
                     "--disk-spec", str(missing))
    assert 3 == rc
    assert (f"cannot use disk 0 '{missing}': it does not exist, and no size was given to "
            "create it (add ',size=SIZE'") in err
    assert "missing value" not in err


def test_backup_remove_of_a_missing_archive_says_no_such_archive(capsys, node_dirs):
    rc, _, err = run(capsys, "backup", "remove", "nosuch")
    assert 15 == rc
    assert "no such archive" in err and "not an archive" not in err


def test_config_that_is_a_directory_says_so(tmp_path):
    """'--config /tmp' said 'Config file not found'."""
    res = gv("--config", str(tmp_path), "os", "list")
    assert 4 == res.returncode
    assert f"invalid node config '{tmp_path}': is a directory, not a file" in res.stderr
    assert "not found" not in res.stderr


def test_demo_prints_mib_and_keeps_imported_disks_sparse(tmp_path):
    """The demo's sizes are given in MiB (--size 64M) and printed in MiB; the imported copies
    are as sparse as the originals (they were fully allocated)."""
    work = tmp_path / "demo"
    res = gv("demo", "--dir", str(work))
    assert 0 == res.returncode, res.stderr
    assert " MB" not in res.stdout and "80.0 MiB" in res.stdout
    for i in (0, 1):
        orig = os.stat(work / f"demo1.example.com-disk{i}.img")
        copy = os.stat(work / f"demo2.example.com-disk{i}.img")
        assert copy.st_size == orig.st_size
        assert copy.st_blocks <= orig.st_blocks + 2048  # within 1 MiB of the original
    data = json.loads(gv("demo", "--dir", str(tmp_path / "demo2"), "--json").stdout)
    assert data["steps"][3]["disks_identical"] == [True, True]
