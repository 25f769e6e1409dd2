"""Nothing lost, nothing mixed, nothing left behind (issue 11 A3, A4, C11-C14, D15, D16).

Real processes throughout: concurrent ``ganeti-vol`` commands, kill -9, real
scripts that fork and ``setsid``, symlinks planted where an attacker with
write access to a shared directory would plant them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, write_script
from test_process import wait_gone
from test_transfer import RAW_IMPORT, inst, make_image, sha

from ganeti_vol.core import atomicfile
from ganeti_vol.core import errors as E
from ganeti_vol.ganeti import config as cfgmod
from ganeti_vol.ops import operations, transfer
from ganeti_vol.system import process, scriptlog


def gv(*argv: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ganeti_vol", *argv], cwd=REPO, **kw)


def run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ganeti_vol", *argv], cwd=REPO, timeout=timeout,
                          capture_output=True, text=True)


def wait_for(cond, seconds: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def ctx(node_config):
    return operations.OpContext(node=node_config.replace(stall_timeout=20))


def instance_file(tmp_path: Path, name: str, os_name: str, *disks: str, size: str = "12M") -> Path:
    path = tmp_path / f"{name}.ini"
    text = f"[instance]\nname = {name}\nos = {os_name}\n[disks]\n"
    for i, disk in enumerate(disks):
        text += f"[[{i}]]\npath = {tmp_path / disk}\nsize = {size}\n"
    path.write_text(text)
    return path


def export_raw(tmp_path: Path, name: str, seed: int) -> str:
    """An archive named ``name`` of a 12 MiB image made from ``seed``; its image path."""
    image = make_image(tmp_path / f"{name}.img", seed=seed)
    res = run("export", "--name", name, "--disk", str(image))
    assert res.returncode == 0, res.stderr
    return str(image)


# --- A3: an export never deletes what is not an archive ----------------------------------------


def test_export_never_replaces_a_directory_that_is_not_an_archive(tmp_path, node_dirs):
    """`mkdir -p E/p; echo x > E/p/n.txt; export -o E --archive-name p` is refused (exit 15),
    with --force too, and n.txt survives."""
    make_image(tmp_path / "d0.img")
    (tmp_path / "E" / "p").mkdir(parents=True)
    (tmp_path / "E" / "p" / "n.txt").write_text("x\n")
    for force in ([], ["--force"]):
        res = run("export", "--name", "web1", "--disk", str(tmp_path / "d0.img"),
                  "-o", str(tmp_path / "E"), "--archive-name", "p", *force)
        assert res.returncode == 15, res.stderr
        assert "it is not an archive" in res.stderr and "'n.txt'" in res.stderr
        assert "Traceback" not in res.stderr
        assert ["n.txt"] == os.listdir(tmp_path / "E" / "p")
        assert "x\n" == (tmp_path / "E" / "p" / "n.txt").read_text()
    assert ["p"] == os.listdir(tmp_path / "E"), "a staging directory was left behind"


def test_export_replaces_only_an_archive_of_the_same_instance_unless_forced(tmp_path, ctx):
    """An archive of the same instance is replaced; another instance's needs --force."""
    make_image(tmp_path / "d0.img")
    web1 = inst(tmp_path, name="web1", os_name="")
    web2 = inst(tmp_path, name="web2", os_name="")
    out = str(tmp_path / "E")
    first = transfer.export_instance(ctx, web1, output=out, name="p")
    second = transfer.export_instance(ctx, web1, output=out, name="p")
    assert first.to_json()["path"] == second.to_json()["path"]
    with pytest.raises(E.ArchiveError, match="holds an archive of instance 'web1'; use --force"):
        transfer.export_instance(ctx, web2, output=out, name="p")
    replaced = transfer.export_instance(ctx, web2, output=out, name="p", force=True)
    manifest = json.loads(Path(replaced.to_json()["path"], "manifest.json").read_text())
    assert "web2" == manifest["instance"]["name"]


def test_export_never_replaces_an_archive_holding_foreign_files(tmp_path, ctx):
    """A valid archive with a file no archive holds is not replaced, forced or not."""
    make_image(tmp_path / "d0.img")
    web1 = inst(tmp_path, name="web1", os_name="")
    out = tmp_path / "E"
    transfer.export_instance(ctx, web1, output=str(out))
    (out / "web1" / "notes.txt").write_text("mine\n")
    for force in (False, True):
        with pytest.raises(E.ArchiveError, match="'notes.txt'"):
            transfer.export_instance(ctx, web1, output=str(out), force=force)
    assert "mine\n" == (out / "web1" / "notes.txt").read_text()


def test_export_replaces_a_damaged_archive_only_when_forced(tmp_path, ctx):
    """A damaged archive (manifest cut short) needs --force; a file or a symlink in the
    archive's place is never replaced."""
    make_image(tmp_path / "d0.img")
    web1 = inst(tmp_path, name="web1", os_name="")
    out = tmp_path / "E"
    transfer.export_instance(ctx, web1, output=str(out))
    manifest = out / "web1" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:50])
    with pytest.raises(E.ArchiveError, match="damaged archive"):
        transfer.export_instance(ctx, web1, output=str(out))
    transfer.export_instance(ctx, web1, output=str(out), force=True)
    json.loads(manifest.read_text())  # whole again
    victim = tmp_path / "victim"
    victim.mkdir()
    (out / "x").symlink_to(victim)
    (out / "y").write_text("file\n")
    for name in ("x", "y"):
        with pytest.raises(E.ArchiveError, match="not a directory"):
            transfer.export_instance(ctx, web1, output=str(out), name=name, force=True)
    assert (out / "x").is_symlink() and "file\n" == (out / "y").read_text()


def test_export_replaces_a_ganeti_export_of_the_same_instance(tmp_path, ctx):
    """What Ganeti (or --format ganeti) wrote for this instance may be replaced."""
    make_image(tmp_path / "d0.img")
    web1 = inst(tmp_path, name="web1", os_name="")
    out = str(tmp_path / "E")
    transfer.export_instance(ctx, web1, output=out, fmt="ganeti")
    res = transfer.export_instance(ctx, web1, output=out)
    assert os.path.exists(os.path.join(res.to_json()["path"], "manifest.json"))


# --- A4: one writer per instance and per disk ---------------------------------------------------


@pytest.fixture
def slowos(os_factory, tmp_path):
    """An OS whose import script waits until the test creates the returned barrier file."""
    barrier = tmp_path / "go"
    os_factory("slowos", scripts={"import": f"while [ ! -e {barrier} ]; do sleep 0.02; done\n"
                                           + RAW_IMPORT})
    return barrier


def test_concurrent_imports_into_the_same_instance_one_fails_naming_the_holder(
    tmp_path, node_dirs, slowos
):
    """`import T A --script & import T B --script`: the second fails at once (exit 20)
    naming the first (pid, operation, start time); the disk holds A only."""
    export_raw(tmp_path, "A", seed=1)
    export_raw(tmp_path, "B", seed=2)
    t = instance_file(tmp_path, "T", "slowos+default", "t0.img")
    first = gv("import", str(t), "A", "--script", stderr=subprocess.PIPE, text=True)
    lock = node_dirs["state"] / "locks" / "instance-T.lock"
    wait_for(lambda: lock.exists() and str(first.pid) in lock.read_text(), what="the lock")
    started = time.monotonic()
    second = run("import", str(t), "B", "--script")
    assert time.monotonic() - started < 10
    assert second.returncode == 20, second.stderr
    assert f"it is in use by pid {first.pid} (import of instance 'T', started " in second.stderr
    slowos.touch()
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert sha(tmp_path / "t0.img") == sha(tmp_path / "A.img")


def test_racing_imports_never_both_succeed_nor_mix(tmp_path, node_dirs, slowos):
    """Started together, exactly one of two imports into one instance gets it; the
    other fails at once while the winner's script still waits (on a barrier file the
    test creates only then), and the disk is exactly the winner's source."""
    barrier = slowos
    export_raw(tmp_path, "A", seed=1)
    export_raw(tmp_path, "B", seed=2)
    t = instance_file(tmp_path, "T", "slowos+default", "t0.img")
    for _ in range(2):
        barrier.unlink(missing_ok=True)
        procs = {src: gv("import", str(t), src, "--script", stderr=subprocess.PIPE, text=True)
                 for src in ("A", "B")}
        wait_for(lambda procs=procs: any(p.poll() is not None for p in procs.values()),
                 what="a loser")
        loser = next(src for src, p in procs.items() if p.poll() is not None)
        winner = "B" if loser == "A" else "A"
        _, err = procs[loser].communicate(timeout=60)
        assert 20 == procs[loser].returncode, err
        assert f"is in use by pid {procs[winner].pid} (import of instance 'T'" in err
        barrier.touch()
        _, err = procs[winner].communicate(timeout=120)
        assert 0 == procs[winner].returncode, err
        assert sha(tmp_path / "t0.img") == sha(tmp_path / f"{winner}.img")


def test_a_disk_shared_by_two_instances_has_one_writer(tmp_path, ctx, node_dirs, slowos):
    """Importing instance X into a disk that an import of instance Y is writing fails
    with BusyError naming that import (the lock is on the disk itself)."""
    export_raw(tmp_path, "A", seed=1)
    y = instance_file(tmp_path, "Y", "slowos+default", "shared.img")
    first = gv("import", str(y), "A", "--script", stderr=subprocess.PIPE, text=True)
    lock = node_dirs["state"] / "locks" / "instance-Y.lock"
    wait_for(lambda: lock.exists() and str(first.pid) in lock.read_text(), what="the lock")
    wait_for(lambda: (tmp_path / "shared.img").exists(), what="the disk")
    x = inst(tmp_path, name="X", os_name="", disks=("shared.img",))
    with pytest.raises(E.BusyError) as err:
        transfer.import_instance(ctx, x, "A")
    assert f"in use by pid {first.pid} (import of instance 'Y'" in str(err.value)
    with pytest.raises(E.BusyError, match=f"pid {first.pid}"):  # create, too
        operations.create(ctx, x.replace(os="slowos+default"))
    slowos.touch()
    _, out = first.communicate(timeout=120)
    assert first.returncode == 0, out


def test_export_of_an_instance_being_imported_is_refused(tmp_path, ctx, node_dirs, slowos):
    """An export would read a half-written disk: it fails naming the import."""
    export_raw(tmp_path, "A", seed=1)
    t = instance_file(tmp_path, "T", "slowos+default", "t0.img")
    first = gv("import", str(t), "A", "--script", stderr=subprocess.PIPE, text=True)
    lock = node_dirs["state"] / "locks" / "instance-T.lock"
    wait_for(lambda: lock.exists() and str(first.pid) in lock.read_text(), what="the lock")
    with pytest.raises(E.BusyError, match=f"in use by pid {first.pid} \\(import"):
        transfer.export_instance(ctx, cfgmod.load_instance(str(t)), raw=True)
    slowos.touch()
    first.communicate(timeout=120)
    assert [] == [n for n in os.listdir(node_dirs["export"]) if n != "A"]


def test_two_exports_to_the_same_destination_one_fails(tmp_path, os_factory, node_dirs):
    """Two instances exported to one archive name at once: the second fails, naming the
    first; the archive published is the first one's."""
    barrier = tmp_path / "go"
    os_factory("slowexp", scripts={
        "export": f'#!/bin/bash\nwhile [ ! -e {barrier} ]; do sleep 0.02; done\n'
                  'stat -c %s "$EXPORT_DEVICE" >&"$EXP_SIZE_FD"\nexec cat "$EXPORT_DEVICE"\n'})
    make_image(tmp_path / "a.img", seed=1)
    make_image(tmp_path / "b.img", seed=2)
    out = str(tmp_path / "E")
    first = gv("export", "--name", "a", "--os", "slowexp", "--disk", str(tmp_path / "a.img"),
               "-o", out, "--archive-name", "x", "--force", stderr=subprocess.PIPE, text=True)
    locks_dir = node_dirs["state"] / "locks"

    def destination_locked() -> bool:
        names = os.listdir(locks_dir) if locks_dir.exists() else []
        return any(n.startswith("export-x-") and str(first.pid) in (locks_dir / n).read_text()
                   for n in names)

    wait_for(destination_locked, what="the lock")
    second = run("export", "--name", "b", "--os", "slowexp", "--disk", str(tmp_path / "b.img"),
                 "-o", out, "--archive-name", "x", "--force")
    assert second.returncode == 20, second.stderr
    assert f"in use by pid {first.pid} (export of instance 'a' to " in second.stderr
    barrier.touch()
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    manifest = json.loads(Path(out, "x", "manifest.json").read_text())
    assert "a" == manifest["instance"]["name"]


HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from ganeti_vol.system import locks
held = locks.Locks({state!r}, locks.Owner.current("import", "instance 'H'"), "import into")
held.instance("H")
held.target({disk!r})
print("held", flush=True)
time.sleep(60)
"""

RESTORE = """
import os, sys
sys.path.insert(0, {repo!r})
from ganeti_vol.core import errors as E
from ganeti_vol.engine import rawio
r, w = os.pipe()
os.write(w, b"x" * 4096)
os.close(w)
try:
    rawio.restore(r, {disk!r})
except E.BusyError as err:
    print("busy:", err)
    sys.exit(20)
print("restored")
"""


def test_restore_is_refused_while_another_process_writes_the_disk(tmp_path, node_dirs):
    """`ganeti-vol restore` into a disk an import holds fails with the holder's name;
    the same restore run by the holder itself (an import script) goes through."""
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    env = dict(os.environ)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(repo=str(REPO), state=str(node_dirs["state"]),
                                           disk=str(disk))],
        stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert "held" == holder.stdout.readline().strip()
        res = subprocess.run([sys.executable, "-c", RESTORE.format(repo=str(REPO),
                                                                   disk=str(disk))],
                             capture_output=True, text=True, timeout=60)
        assert 20 == res.returncode, res.stdout + res.stderr
        assert f"in use by pid {holder.pid}" in res.stdout
        assert bytes(4096) == disk.read_bytes()[:4096]
    finally:
        holder.kill()
        holder.communicate()
    # a child of the holder: the lock is held for it
    script = HOLD.replace('print("held", flush=True)\ntime.sleep(60)',
                          "import subprocess\nrc = subprocess.run([sys.executable, '-c', "
                          + repr(RESTORE.format(repo=str(REPO), disk=str(disk)))
                          + "]).returncode\nsys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", script.format(
        repo=str(REPO), state=str(node_dirs["state"]), disk=str(disk))],
        capture_output=True, text=True, timeout=60)
    assert 0 == res.returncode and "restored" in res.stdout, res.stdout + res.stderr
    assert b"x" * 4096 == disk.read_bytes()[:4096]


# --- C11: staging directories of killed exports are reclaimed -----------------------------------


def staging_dirs(export_dir: Path) -> list[str]:
    return sorted(n for n in os.listdir(export_dir) if n.startswith("."))


def test_killed_export_staging_is_reclaimed_by_cleanup_never_a_live_one(
    tmp_path, os_factory, node_dirs
):
    """kill -9 leaves `.<name>.new-*` named after its owner, and the export's status
    file: `cleanup` removes both once the owner is dead, and leaves a running export's
    alone."""
    pidfile = tmp_path / "pid"
    os_factory("stuck", scripts={
        "export": f'echo $$ > {pidfile}\nhead -c 5000000 "$EXPORT_DEVICE"\nexec sleep 60\n'})
    make_image(tmp_path / "d0.img")
    p = gv("export", "--name", "k1", "--os", "stuck", "--disk", str(tmp_path / "d0.img"),
           stderr=subprocess.DEVNULL)
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the script")
    wait_for(lambda: staging_dirs(node_dirs["export"]), what="the staging directory")
    live = staging_dirs(node_dirs["export"])
    assert f"-{p.pid}-" in live[0]
    res = run("cleanup", "--json")
    assert res.returncode == 0, res.stderr
    assert [] == json.loads(res.stdout)["staging"]
    assert live == staging_dirs(node_dirs["export"])
    p.kill()
    p.wait()
    assert wait_gone(int(pidfile.read_text()), 5), "the script outlived ganeti-vol"
    res = run("cleanup", "--dry-run")
    assert f"{live[0]}: would remove (left by pid {p.pid}, not running)" in res.stdout
    assert live == staging_dirs(node_dirs["export"])
    status_dir = node_dirs["state"] / "status"
    assert [f"export-k1-{p.pid}.json"] == os.listdir(status_dir)
    res = run("cleanup")
    assert res.returncode == 0, res.stderr
    assert [] == staging_dirs(node_dirs["export"])
    assert [] == os.listdir(status_dir)


def test_the_next_export_into_the_directory_reclaims_dead_owners_staging(tmp_path, ctx,
                                                                         node_dirs):
    """A staging directory left by a dead process goes with the next export there; one
    whose owner runs (this process), or whose owner is unknown, stays."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    export_dir = node_dirs["export"]
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    with open(f"/proc/{os.getpid()}/stat") as f:
        start = f.read().rsplit(") ", 1)[1].split()[19]
    mine = export_dir / f".other.new-{host}-{os.getpid()}-{start}-abcd1234"
    mine.mkdir()
    orphan = export_dir / f".other.new-{host}-{dead.pid}-{start}-efgh5678"
    orphan.mkdir()
    (orphan / "big.lz4").write_bytes(b"x" * 1000)
    unknown = export_dir / ".old-name.new-abcd1234"
    unknown.mkdir()
    make_image(tmp_path / "d0.img")
    transfer.export_instance(ctx, inst(tmp_path, name="web1", os_name=""))
    assert sorted([mine.name, unknown.name]) == staging_dirs(export_dir)


# --- C12: a killed import leaves the instance marked broken -------------------------------------


def test_killed_import_is_reported_broken_until_a_rerun_completes(tmp_path, node_dirs, slowos):
    """kill -9 during an import: `instance status` says broken (exit 1) and names the
    import; export refuses the instance; a rerun proceeds, says what it repaired, and
    the status is ok again."""
    export_raw(tmp_path, "A", seed=1)
    t = instance_file(tmp_path, "T", "slowos+default", "t0.img")
    p = gv("import", str(t), "A", "--script", stderr=subprocess.DEVNULL)
    mark = node_dirs["state"] / "instances" / "T.json"
    wait_for(mark.exists, what="the in-progress mark")
    assert "in progress" == json.loads(mark.read_text())["state"]
    busy = run("instance", "status", str(t))
    assert 0 == busy.returncode, busy.stderr
    assert busy.stdout.startswith(f"instance 'T': busy: in use by pid {p.pid} (import of ")
    p.send_signal(signal.SIGKILL)
    p.wait()
    res = run("instance", "status", str(t), "--json")
    assert res.returncode == 1, res.stderr
    status = json.loads(res.stdout)
    assert "broken" == status["state"] and [0] == status["broken_disks"]
    assert f"import from '{node_dirs['export'] / 'A'}' by pid {p.pid}" in status["reason"]
    assert "did not complete" in status["reason"]
    res = run("export", str(t), "--raw")
    assert res.returncode == 7 and "is broken" in res.stderr, res.stderr
    slowos.touch()
    res = run("import", str(t), "A", "--script")
    assert res.returncode == 0, res.stderr
    assert "instance 'T' was broken (import from" in res.stdout
    assert sha(tmp_path / "t0.img") == sha(tmp_path / "A.img")
    res = run("instance", "status", str(t))
    assert (0, "instance 'T': ok") == (res.returncode, res.stdout.strip())
    assert not mark.exists()


def test_rerun_kills_what_a_killed_import_left_writing(tmp_path, node_dirs, os_factory):
    """A killed import's script started a writer that escaped it (setsid -f); the rerun
    kills it first (found by the killed process's script cgroup), so it cannot write
    over the rerun's data."""
    if not cgroup_v2_writable():
        pytest.skip("cgroup v2 cannot be used here: such a writer is not found")
    pidfile = tmp_path / "late"
    os_factory("late", scripts={"import": (
        f"setsid -f sh -c 'echo $$ > {pidfile}; sleep 3; "
        "printf GARBAGE | dd of=\"$IMPORT_DEVICE\" conv=notrunc status=none'\n"
        "sleep 30\n")})
    export_raw(tmp_path, "A", seed=1)
    t = instance_file(tmp_path, "T", "late+default", "t0.img")
    p = gv("import", str(t), "A", "--script", stderr=subprocess.DEVNULL)
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the late writer")
    p.kill()
    p.wait()
    res = run("import", str(t), "A", "--raw")
    assert res.returncode == 0, res.stderr
    assert wait_gone(int(pidfile.read_text()), 1), "the killed import's writer survived"
    assert sha(tmp_path / "t0.img") == sha(tmp_path / "A.img")


def test_failed_create_and_import_are_reported_broken_with_the_error(tmp_path, ctx, os_factory,
                                                                     node_dirs):
    """A script that fails half-way leaves the instance broken with its error; a create
    vetoed before anything was written leaves no mark."""
    os_factory("bados", scripts={"create": "echo half >&2\nexit 3",
                                 "import": 'head -c 100 >/dev/null; exit 4'})
    web = inst(tmp_path, name="web", os_name="bados+default")
    with pytest.raises(E.ScriptFailed):
        operations.create(ctx, web)
    from ganeti_vol.ops import opstate

    status = opstate.instance_status(ctx.node.state_dir, web)
    assert "broken" == status["state"]
    assert status["reason"].startswith("create by pid ") and "exit code 3" in status["reason"]
    export_raw(tmp_path, "A", seed=1)
    with pytest.raises(E.GanetiVolError):
        transfer.import_instance(ctx, web, "A", raw=False)
    status = opstate.instance_status(ctx.node.state_dir, web)
    assert "import from" in status["reason"] and "failed" in status["reason"]
    fresh = inst(tmp_path, name="fresh", os_name="nosuch+default")
    with pytest.raises(E.OSDefinitionError):
        operations.create(ctx, fresh)
    assert "ok" == opstate.instance_status(ctx.node.state_dir, fresh)["state"]


# --- C13: status files are finished and removed ------------------------------------------------


def test_import_end_event_finishes_every_disk_verified_and_leaves_no_status_file(
    tmp_path, node_dirs
):
    """--progress=json: the end event says done for every disk with every byte verified;
    no status file stays."""
    export_raw(tmp_path, "A", seed=1)
    res = run("import", "--name", "t", "--disk", str(tmp_path / "t0.img"), "A",
              "--progress", "json")
    assert res.returncode == 0, res.stderr
    end = json.loads([ln for ln in res.stderr.splitlines() if '"event": "end"' in ln][-1])
    assert [("done", "done", 12 << 20)] == [(d["state"], d["stage"], d["verified"])
                                           for d in end["disks"]]
    assert [] == os.listdir(node_dirs["state"] / "status")


# --- C14: the whole tree of a stalled or timed-out script is stopped -----------------------------


@pytest.mark.parametrize("cgroup", [True, False], ids=["cgroup", "tree-walk"])
def test_stall_kill_stops_a_setsid_grandchild_of_the_export_script(tmp_path, os_factory,
                                                                   node_dirs, monkeypatch,
                                                                   cgroup):
    """A stalled export script's `setsid` child dies with it (cgroup where available,
    else its process tree)."""
    if not cgroup:
        monkeypatch.setenv("GANETI_VOL_NO_CGROUP", "1")
    conf = node_dirs["conf"]
    conf.write_text(conf.read_text().replace("stall_timeout = 30", "stall_timeout = 1"))
    pidfile = tmp_path / "grandchild"
    os_factory("stall", scripts={
        "export": f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 300' &\n"
                  'head -c 1000 "$EXPORT_DEVICE"\nexec sleep 300\n'})
    make_image(tmp_path / "d0.img")
    res = run("export", "--name", "s1", "--os", "stall", "--disk", str(tmp_path / "d0.img"))
    assert res.returncode == 13, res.stderr
    grandchild = int(pidfile.read_text())
    assert wait_gone(grandchild, 5), "the setsid grandchild survived the stall kill"


def cgroup_v2_writable() -> bool:
    """cgroup v2 is mounted, ours to write, and has cgroup.kill (Linux >= 5.14)."""
    with open("/proc/self/cgroup") as f:
        rel = next((ln.split("::", 1)[1].strip() for ln in f if ln.startswith("0::")), None)
    with open("/proc/self/mountinfo") as f:
        mount = next((ln.split()[4] for ln in f if " - cgroup2 " in ln), None)
    if rel is None or mount is None:
        return False
    probe = os.path.join(mount, rel.lstrip("/"), f"gv-test-{os.getpid()}")
    try:
        os.mkdir(probe)
    except OSError:
        return False
    try:
        return os.path.exists(os.path.join(probe, "cgroup.kill"))
    finally:
        os.rmdir(probe)


@pytest.mark.parametrize("how", ["timeout", "ctrl-c"])
def test_timeout_and_ctrl_c_stop_a_double_forked_daemon_of_a_script(tmp_path, how):
    """`setsid -f` (the parent exits at once) escapes every process tree: the script's
    cgroup still holds it, and a timeout or Ctrl-C kills it."""
    if not cgroup_v2_writable():
        pytest.skip("cgroup v2 cannot be used here: only the process tree is walked")
    pidfile = tmp_path / "daemon"
    s = write_script(tmp_path / "s", f"setsid -f sh -c 'echo $$ > {pidfile}; exec sleep 300'\n"
                                     "exec sleep 300\n")
    env = {"PATH": "/bin:/usr/bin"}
    if how == "timeout":
        with pytest.raises(E.ScriptTimeout):
            process.run_script(str(s), env, cwd=str(tmp_path), op="create", timeout=1)
    else:
        with pytest.raises(KeyboardInterrupt):
            with process.open_script_stream(str(s), env, cwd=str(tmp_path), op="export",
                                            log_path=None, direction="read"):
                wait_for(pidfile.exists, what="the daemon")
                raise KeyboardInterrupt
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the daemon")
    assert wait_gone(int(pidfile.read_text()), 5), "the double-forked daemon survived"


def test_timeout_stops_a_setsid_child_without_cgroup(tmp_path, monkeypatch):
    """Without cgroup v2 the tree walk still finds a `setsid` child whose parent lives."""
    monkeypatch.setenv("GANETI_VOL_NO_CGROUP", "1")
    pidfile = tmp_path / "child"
    s = write_script(tmp_path / "s", f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 300' &\n"
                                     "exec sleep 300\n")
    with pytest.raises(E.ScriptTimeout):
        process.run_script(str(s), {"PATH": "/bin:/usr/bin"}, cwd=str(tmp_path), op="create",
                           timeout=1)
    assert wait_gone(int(pidfile.read_text()), 5)


def test_plumbum_is_reached_through_its_public_api_only():
    """process.py starts children with plumbum's public popen(), not its private _popen."""
    source = Path(process.__file__).read_text()
    assert "._popen(" not in source and "_popen" not in source.replace("self._popen", "")


# --- D15/D16: no write through a planted symlink; private files ---------------------------------


def test_rename_never_writes_the_instance_file_through_a_planted_symlink(tmp_path, ctx,
                                                                         os_factory):
    """The instance file is replaced through an unpredictable, exclusively created
    temporary file: a symlink at the old `<file>.tmp<pid>` name gets nothing, let alone
    private parameters; the file keeps its mode."""
    os_factory("renos")
    make_image(tmp_path / "d0.img")
    path = tmp_path / "web1.ini"
    path.write_text(f"[instance]\nname = web1\nos = renos+default\n[disks]\n[[0]]\n"
                    f"path = {tmp_path / 'd0.img'}\nsize = 12M\n"
                    "[osparams_private]\nsecret = hunter2\n")
    path.chmod(0o640)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, f"{path}.tmp{os.getpid()}")
    operations.rename(ctx, cfgmod.load_instance(str(path)), "web2")
    assert "precious\n" == victim.read_text()
    assert "name = web2" in path.read_text() and "hunter2" in path.read_text()
    assert 0o640 == stat.S_IMODE(path.stat().st_mode)
    planted = f"web1.ini.tmp{os.getpid()}"
    assert [] == [n for n in os.listdir(tmp_path) if ".tmp" in n and n != planted]


def test_logs_are_never_reopened_through_a_planted_symlink(tmp_path):
    """A log replaced by a symlink (or by someone else's file) between its creation and
    a later append is refused: nothing is written into the victim."""
    log_dir = tmp_path / "log"
    log_path = scriptlog.new_log_file(str(log_dir), "add", "os", "web1")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.unlink(log_path)
    os.symlink(victim, log_path)
    s = write_script(tmp_path / "s", "echo output")
    with pytest.raises(E.ConfigError, match="cannot open log file"):
        process.run_script(str(s), {"PATH": "/bin"}, cwd=str(tmp_path), op="create",
                           log_path=log_path)
    scriptlog.append_log(log_path, "=== hook x: started")  # the hooks' runner: logged, not raised
    assert "precious\n" == victim.read_text()
    os.unlink(log_path)
    os.link(victim, log_path)  # a planted hard link to someone's file
    with pytest.raises(E.ConfigError, match="links"):
        process.run_script(str(s), {"PATH": "/bin"}, cwd=str(tmp_path), op="create",
                           log_path=log_path)
    assert "precious\n" == victim.read_text()


def test_state_records_are_never_written_through_planted_symlinks(tmp_path):
    """The loop-device and snapshot records, hook settings: the temporary names they
    used before are symlinks to a victim, which keeps its content."""
    from ganeti_vol.core.model import NodeConfig
    from ganeti_vol.ganeti import hooks_install
    from ganeti_vol.system import loopctl, snapshots

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    state = tmp_path / "state"
    record = Path(loopctl.records(str(state)).path("loop7"))
    record.parent.mkdir(parents=True)
    os.symlink(victim, f"{record}.{os.getpid()}.tmp")
    loopctl.write_record(str(state), "/dev/loop7", {"device": "/dev/loop7"})
    assert {"device": "/dev/loop7"} == json.loads(record.read_text())
    provider = snapshots.get_provider("copy", NodeConfig(state_dir=str(state)))
    snap_record = Path(provider.records.path("tag1"))
    snap_record.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(victim, f"{snap_record}.tmp")
    provider._write_record("/x/disk", "tag1")
    assert "tag1" == json.loads(snap_record.read_text())["tag"]
    target = tmp_path / "hooks" / "settings"
    target.parent.mkdir()
    os.symlink(victim, target)
    hooks_install._write_atomic(str(target), b"KEY=1\n", 0o644)
    assert not target.is_symlink() and 0o644 == stat.S_IMODE(target.stat().st_mode)
    assert "precious\n" == victim.read_text()


def test_lock_and_state_files_are_private_under_umask_000(tmp_path, ctx, node_dirs):
    """Marks, lock files and status files are 0600 (directories 0700/0750) whatever the
    umask; the lock directory is refused if it is a symlink."""
    from ganeti_vol.ops import opstate
    from ganeti_vol.system import locks

    old = os.umask(0)
    try:
        web = inst(tmp_path, name="web", os_name="")
        with opstate.operation(ctx.node.state_dir, "import", web) as op:
            op.begin_writes()
            for path in (locks.instance_lock_path(ctx.node.state_dir, "web"),
                         opstate.mark_path(ctx.node.state_dir, "web")):
                assert 0o600 == stat.S_IMODE(os.stat(path).st_mode), path
            assert 0o700 == stat.S_IMODE(os.stat(node_dirs["state"] / "locks").st_mode)
    finally:
        os.umask(old)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.rmdir(node_dirs["state"] / "locks")
    os.symlink(elsewhere, node_dirs["state"] / "locks")
    with pytest.raises(E.ConfigError, match="lock directory"):
        with opstate.operation(ctx.node.state_dir, "import", web):
            pass
    assert [] == os.listdir(elsewhere)


def test_cleanup_removes_lock_files_nobody_holds_but_never_a_held_one(tmp_path, node_dirs):
    """Lock files of dead holders go; a held one stays (and its holder keeps it)."""
    from ganeti_vol.system import locks

    state = str(node_dirs["state"])
    held = locks.Locks(state, locks.Owner.current("import", "instance 'a'"), "import into")
    held.instance("a")
    stale = Path(locks.instance_lock_path(state, "b"))
    stale.write_text(json.dumps({"pid": 1, "start": 0, "op": "import", "what": "b",
                                 "started": 0}))
    res = run("cleanup", "--json")
    assert res.returncode == 0, res.stderr
    assert [str(stale)] == [lk["path"] for lk in json.loads(res.stdout)["locks"]]
    assert os.path.exists(locks.instance_lock_path(state, "a")) and not stale.exists()
    held.release()
    assert [] == os.listdir(Path(state) / "locks")


def test_cleanup_removes_temporary_files_of_killed_writers_only(tmp_path, node_dirs):
    """A writer killed between creating its temporary file and the rename leaves
    `.<name>.tmp-<pid>-<start>-<random>`: `cleanup` removes those of dead writers only."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    with open(f"/proc/{os.getpid()}/stat") as f:
        start = f.read().rsplit(") ", 1)[1].split()[19]
    made = {}
    for sub in ("instances", "loop", "snapshots"):
        d = node_dirs["state"] / sub
        d.mkdir()
        made[sub] = (d / f".x.json.tmp-{dead.pid}-{start}-0123456789ab",
                     d / f".x.json.tmp-{os.getpid()}-{start}-0123456789ab")
        for path in made[sub]:
            path.write_text("{")
    res = run("cleanup", "--json")
    assert res.returncode == 0, res.stderr
    assert sorted(str(d) for d, _ in made.values()) == sorted(json.loads(res.stdout)["temp_files"])
    assert all(not d.exists() and live.exists() for d, live in made.values())


def test_private_temp_dirs_of_killed_processes_are_removed_by_the_next_one(tmp_path,
                                                                          monkeypatch):
    """A client killed with -9 (ssh/S3 repositories, move) leaves its private temp dir: the
    next process making one of that kind removes it, never a live process's."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    dead = subprocess.Popen(["true"])
    dead.wait()
    with open(f"/proc/{os.getpid()}/stat") as f:
        start = f.read().rsplit(") ", 1)[1].split()[19]
    killed = tmp_path / f"ganeti-vol-remote-{dead.pid}-{start}-ab12cd"
    live = tmp_path / f"ganeti-vol-remote-{os.getpid()}-{start}-ef34gh"
    other = tmp_path / f"ganeti-vol-s3-{dead.pid}-{start}-ij56kl"
    for d in (killed, live, other):
        d.mkdir()
        (d / "chunk").write_bytes(b"x")
    made = Path(atomicfile.private_temp_dir("ganeti-vol-remote"))
    try:
        assert made.parent == tmp_path and made.name.startswith(
            f"ganeti-vol-remote-{os.getpid()}-")
        assert not killed.exists() and live.exists() and other.exists()
    finally:
        shutil.rmtree(made)
