"""The kill -9 campaign: ganeti-vol killed at random points of export and import.

For each mode (raw and through OS scripts) the CLI is started and SIGKILLed
after a random delay, several times in a row, then:

- export: whatever sits at the archive's name is a complete archive that
  verifies and holds the source disk (or nothing is there); staging
  directories, status files and lock files left behind are all removed by
  ``ganeti-vol cleanup`` or by the next export;
- import: the instance is reported broken exactly when the kill came between
  its mark and its end (otherwise its disk is untouched, or whole); a rerun
  succeeds and leaves the disk identical to the source; ``cleanup`` leaves
  nothing.

The seed is printed and can be replayed: ``GANETI_VOL_KILL_SEED=N pytest ...``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from test_transfer import RAW_EXPORT

from ganeti_vol.core.model import Instance
from ganeti_vol.formats import archive
from ganeti_vol.ops import opstate

SIZE = 24 << 20
KILLS = 3

# scripts that move 2 MiB at a time with a pause, so kills land mid-transfer
PACED_EXPORT = (
    '#!/bin/bash\nstat -c %s "$EXPORT_DEVICE" >&"$EXP_SIZE_FD"\n'
    f"for i in $(seq 0 {SIZE // (2 << 20) - 1}); do\n"
    '  dd if="$EXPORT_DEVICE" bs=2M skip=$i count=1 status=none; sleep 0.03\ndone\n'
)
PACED_IMPORT = (
    f"for i in $(seq 0 {SIZE // (2 << 20) - 1}); do\n"
    '  dd of="$IMPORT_DEVICE" bs=2M seek=$i count=1 iflag=fullblock conv=notrunc '
    "status=none || exit 1; sleep 0.03\ndone\n"
)


@pytest.fixture(scope="module")
def seed() -> int:
    value = int(os.environ.get("GANETI_VOL_KILL_SEED") or random.SystemRandom().randrange(1 << 30))
    print(f"\nkill campaign seed: {value} (replay with GANETI_VOL_KILL_SEED={value})")
    return value


def image(path: Path, seed: int) -> Path:
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset in range(0, SIZE, 3 << 20):
            f.seek(offset)
            f.write(rnd.randbytes(1 << 20))
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gv(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ganeti_vol", *argv], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ganeti_vol", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def duration(argv: list[str]) -> float:
    """Seconds a whole run takes here: kills are spread over it, from the interpreter's
    start to the end."""
    started = time.monotonic()
    res = run(*argv)
    assert res.returncode == 0, res.stderr
    return time.monotonic() - started


def kill_after(argv: list[str], delay: float) -> int:
    """Start the CLI, SIGKILL it after ``delay`` seconds; its return code (-9 if killed)."""
    proc = gv(*argv)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    return proc.returncode


def leftovers(node_dirs) -> dict[str, list[str]]:
    def listing(path: Path) -> list[str]:
        return sorted(os.listdir(path)) if path.exists() else []

    return {
        "staging": [n for n in listing(node_dirs["export"]) if n.startswith(".")],
        "status": listing(node_dirs["state"] / "status"),
        "locks": listing(node_dirs["state"] / "locks"),
        "marks": listing(node_dirs["state"] / "instances"),
    }


def clean(node_dirs) -> None:
    res = run("cleanup")
    assert res.returncode == 0, res.stderr
    left = leftovers(node_dirs)
    assert {"staging": [], "status": [], "locks": []} == {
        k: v for k, v in left.items() if k != "marks"}, left


@pytest.mark.parametrize("mode", ["raw", "script"])
def test_kill_9_during_export_never_publishes_a_bad_archive(tmp_path, node_dirs, os_factory,
                                                           seed, mode):
    rnd = random.Random(f"{seed}-export-{mode}")
    os_factory("paced", scripts={"export": PACED_EXPORT})
    src = image(tmp_path / "src.img", seed)
    argv = ["export", "--name", "web1", "--disk", str(src)]
    if mode == "script":
        argv += ["--os", "paced"]
    span = duration([*argv, "--archive-name", "calibration"])
    final = node_dirs["export"] / "web1"
    good_digest = None
    outcomes = []
    for attempt in range(KILLS + 1):
        delay = rnd.uniform(0.02, span) if attempt < KILLS else 60
        rc = kill_after(argv, delay)
        outcomes.append((round(delay, 3), rc))
        where = f"seed {seed}, export {mode}, kills so far {outcomes}"
        assert rc in (0, -signal.SIGKILL), where
        if final.exists():
            report = archive.verify(str(final))  # raises if it is not whole
            digest = report["disks"][0]["digest"]
            assert good_digest in (None, digest), where
            good_digest = digest
            manifest = json.loads((final / "manifest.json").read_text())
            assert SIZE == manifest["disks"][0]["size"], where
        else:
            assert rc != 0, where
    assert final.exists(), f"seed {seed}: the last, unkilled export published nothing"
    clean(node_dirs)
    assert [] == leftovers(node_dirs)["marks"]  # an export never marks the instance


@pytest.mark.parametrize("mode", ["raw", "script"])
def test_kill_9_during_import_marks_it_broken_and_a_rerun_repairs(tmp_path, node_dirs,
                                                                 os_factory, seed, mode):
    rnd = random.Random(f"{seed}-import-{mode}")
    os_factory("paced", scripts={"export": RAW_EXPORT, "import": PACED_IMPORT})
    src = image(tmp_path / "src.img", seed)
    res = run("export", "--name", "srcvm", "--disk", str(src))
    assert res.returncode == 0, res.stderr
    target = tmp_path / "t0.img"
    old = image(target, seed + 1)
    before = sha(old)
    inst_file = tmp_path / "t.ini"
    inst_file.write_text(f"[instance]\nname = t\nos = paced+default\n[disks]\n[[0]]\n"
                         f"path = {target}\nsize = {SIZE >> 20}M\n")
    argv = ["import", str(inst_file), "srcvm", "--raw" if mode == "raw" else "--script"]
    span = duration(["import", "--name", "calibration", "--os", "paced", "--disk",
                     str(tmp_path / "calibration.img"), *argv[2:]])
    outcomes = []
    inst = Instance(name="t", os="", uuid="", ctime=0, mtime=0)
    for _ in range(KILLS):
        delay = rnd.uniform(0.02, span)
        rc = kill_after(argv, delay)
        outcomes.append((round(delay, 3), rc))
        where = f"seed {seed}, import {mode}, kills so far {outcomes}"
        status = opstate.instance_status(str(node_dirs["state"]), inst)
        if rc == 0:
            assert "ok" == status["state"] and sha(target) == sha(src), where
            before = sha(target)
            continue
        assert rc == -signal.SIGKILL, where
        if status["state"] == "ok":  # killed before the mark (untouched) or after the end
            assert sha(target) in (before, sha(src)), where
            before = sha(target)
        else:
            assert "broken" == status["state"], (where, status)
            assert "did not complete" in status["reason"], where
            before = None  # the disk may hold anything now
    where = f"seed {seed}, import {mode}, kills {outcomes}"
    res = run("import", *argv[1:])
    assert res.returncode == 0, (where, res.stderr)
    assert sha(target) == sha(src), where
    assert "ok" == opstate.instance_status(str(node_dirs["state"]), inst)["state"], where
    clean(node_dirs)
    assert [] == leftovers(node_dirs)["marks"], where
    time.sleep(0.2)  # anything a killed run left would write now: the disk must not change
    assert sha(target) == sha(src), where
