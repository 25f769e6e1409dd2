"""``ganeti-vol os test`` on team-written OS definitions that reproduce the peers' known bugs.

Every fixture is a real OS definition of shell scripts run on real sparse
files (and loop devices as root), on a scratch instance with two disks unless
a test says otherwise: a correct raw OS must pass; an ``exit 0`` exporter, a
truncating importer, a wrong ``EXP_SIZE_FD``, an exporter that ignores
``EXPORT_INDEX``, leaked processes, loop devices and partitions must fail (and
be cleaned up); stdout outside export, missing ``--help`` and stray temp
files only warn.
"""

from __future__ import annotations

import json
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import losetup_works, make_os

from ganeti_vol.authoring import conformance
from ganeti_vol.cli import main
from ganeti_vol.system import devices, process, proctree, scriptlog

HELP = 'case "$1" in -h|--help) echo "usage: {name} (a Ganeti OS script)"; exit 0;; esac\n'

GOOD = {
    "create": HELP.format(name="create") + """
i=0
while [ "$i" -lt "${DISK_COUNT:-0}" ]; do
  eval "disk=\\$DISK_${i}_PATH"
  printf 'created %s disk %s\\n' "$INSTANCE_NAME" "$i" |
    dd of="$disk" conv=notrunc,nocreat status=none
  i=$((i + 1))
done
""",
    "export": "#!/bin/bash\n" + HELP.format(name="export") + """
set -e
if [ -n "$EXP_SIZE_FD" ]; then
  if [ -b "$EXPORT_DEVICE" ]; then blockdev --getsize64 "$EXPORT_DEVICE"
  else stat -c %s "$EXPORT_DEVICE"; fi >&"$EXP_SIZE_FD"
fi
cat "$EXPORT_DEVICE"
""",
    "import": HELP.format(name="import") + """
exec dd of="$IMPORT_DEVICE" conv=notrunc,nocreat bs=1M iflag=fullblock status=none
""",
    "rename": HELP.format(name="rename") + '[ -n "$OLD_INSTANCE_NAME" ]\n',
    "verify": HELP.format(name="verify") + """
case "$OSP_MODE" in ""|fast|safe) exit 0;; *) echo "invalid mode '$OSP_MODE'" >&2; exit 1;; esac
""",
}
PARAMS = (("mode", "fast or safe"),)
SIZE = 8 << 20

needs_loop = pytest.mark.skipif(not losetup_works(), reason="needs root and working losetup")


def fixture_os(tmp_path, name="fixos", **changes):
    """A correct raw OS definition with some scripts replaced (None removes one)."""
    scripts = {**GOOD, **changes}
    return str(make_os(tmp_path / "os", name, parameters=PARAMS, scripts=scripts,
                       skip=tuple(k for k, v in scripts.items() if v is None)))


def run_os(tmp_path, os_dir, **options):
    options.setdefault("disk_size", SIZE)
    options.setdefault("loop", False)
    work = tmp_path / "work"
    report = conformance.run(os_dir, conformance.Options(work_dir=str(work), **options))
    assert [] == os.listdir(work), "the scratch directory was not removed"
    return report


def check(report, step, name, disks="file", disk=None):
    """The checks called ``name`` of a step (of disk 0 for a per-disk step unless ``disk``)."""
    return [c for c in report.step(step, disks, disk).checks if c.name == name]


RANK = {"skip": 0, "pass": 1, "warn": 2, "fail": 3}


def verdict(step) -> str:
    """A step's status without the temp-file check: other programs on the machine share /tmp."""
    statuses = [c.status for c in step.checks if c.name != "temp files"]
    return max(statuses or ["pass"], key=RANK.__getitem__)


def backed_by(base) -> list[str]:
    return [dev for dev, backing in devices.iter_loop_devices()
            if backing and backing.startswith(str(base))]


def all_partitions() -> set[str]:
    return {part for dev, _ in devices.iter_loop_devices()
            for _, part, _ in devices.partition_devices(dev)}


# --- the positive control ------------------------------------------------------------------


def test_correct_raw_os_passes_every_step_on_file_disks(tmp_path):
    """A raw OS that does everything right passes every step of both disks, with no warning."""
    report = run_os(tmp_path, fixture_os(tmp_path), bad_params={"mode": "bogus"})
    assert report.passed
    statuses = {(s.name, s.label): verdict(s) for s in report.steps}
    assert {"pass"} == {v for (n, d), v in statuses.items() if "loop" not in d}, report.to_json()
    assert "skip" == statuses[("create", "loop")]
    # export, import and compare run for each disk, each in its own step
    assert [("create", None), ("export", 0), ("export", 1), ("import", 0), ("import", 1),
            ("compare", 0), ("compare", 1), ("rename", None), ("reinstall", None)] == \
        [(s.name, s.disk) for s in report.steps if s.disks == "file"]
    assert set(conformance.DISK_STEPS) == {s.name for s in report.steps if s.disk is not None}
    # create saw both disks: it wrote into each, so no test data was needed
    assert [] == [c for s in report.steps for c in s.checks if c.name == "test data"]
    for disk in (0, 1):
        assert [f"disk {disk}: announced {SIZE} bytes = the dump"] == \
            [c.detail for c in check(report, "export", "EXP_SIZE_FD", disk=disk)]
        assert f"disk {disk}: the imported disk is byte-identical" in \
            report.step("compare", "file", disk).detail
    assert "rejected mode=bogus" in report.step("verify mode").detail


@needs_loop
def test_correct_raw_os_passes_on_loop_devices_too(tmp_path):
    """As root the same steps run again with DISK_0_PATH on loop devices; nothing is left."""
    report = run_os(tmp_path, fixture_os(tmp_path), loop=True)
    assert report.passed
    loop = [s for s in report.steps if s.disks == "loop"]
    assert [None, 0, 1, 0, 1, 0, 1, None, None] == [s.disk for s in loop]
    assert {"pass"} == {verdict(s) for s in loop}, report.to_json()
    assert [] == backed_by(tmp_path)


def test_help_runs_with_an_empty_environment_before_any_disk_exists(tmp_path):
    """--help sees no OS variables at all: a script that finds some gives no usage (warn)."""
    create = GOOD["create"] + ""
    strict = ('[ -n "$INSTANCE_NAME$OS_API_VERSION$DISK_0_PATH" ] && exit 7\n'
              + create)
    report = run_os(tmp_path, fixture_os(tmp_path, create=strict))
    assert "pass" == check(report, "help", "create", "-")[0].status


def test_unknown_parameter_is_rejected_by_ganeti_vol_before_verify_runs(tmp_path):
    """Like Ganeti's _CheckOSPList: an undeclared name never reaches the verify script."""
    marker = tmp_path / "verify-saw-it"
    verify = f'[ -z "$OSP_GANETI_VOL_TEST_UNKNOWN" ] || touch "{marker}"\n' + GOOD["verify"]
    report = run_os(tmp_path, fixture_os(tmp_path, verify=verify))
    step = report.step("verify unknown")
    assert "pass" == verdict(step) and "not supported" in step.checks[0].detail
    assert not marker.exists()


# --- the peers' bugs -----------------------------------------------------------------------


def test_exit_0_exporter_fails_export_when_the_disk_holds_data(tmp_path):
    """guix/cobbler's `exit 0` export: an empty export of a non-empty disk is a failure."""
    report = run_os(tmp_path, fixture_os(tmp_path, export="exit 0\n"))
    assert not report.passed
    for disk in (0, 1):
        export = report.step("export", "file", disk)
        assert "fail" == export.status
        assert "wrote nothing although the disk holds data" in export.detail
        assert "skip" == report.step("import", "file", disk).status
    assert "pass" == verdict(report.step("rename", "file"))  # independent of the export


def test_exit_0_exporter_is_caught_even_when_create_writes_nothing(tmp_path):
    """A noop create leaves zeros: the runner writes test data so an empty export still shows."""
    report = run_os(tmp_path, fixture_os(tmp_path, create="exit 0\n", export="exit 0\n"),
                    allow_empty_create=True)
    export = report.step("export", "file")
    assert ["pass"] == [c.status for c in check(report, "export", "test data")]
    assert "fail" == export.status and "holds data" in export.detail


def test_create_that_leaves_disk_0_empty_fails_and_the_pass_goes_on(tmp_path):
    """A create whose writes are lost looks like one that writes nothing: zeros on disk 0 fail
    the create step (it passed, with test data written over the loss), unless the OS declares
    that it installs nothing.  Export, import and compare still run on test data."""
    os_dir = fixture_os(tmp_path, create="exit 0\n")
    report = run_os(tmp_path, os_dir)
    assert not report.passed
    [empty] = check(report, "create", "disk 0")
    assert ("fail", "create left disk 0 empty (all zeros): what it wrote was lost, or it "
            "installs nothing (then say so: 'empty_after_create = yes' in [disks] of its "
            "ganeti_vol.conf, or --allow-empty-create)") == \
        (empty.status, empty.detail)
    for disk in (0, 1):
        [trip] = check(report, "compare", "round trip", disk=disk)
        assert "pass" == trip.status and "byte-identical" in trip.detail
    allowed = run_os(tmp_path, os_dir, allow_empty_create=True)
    assert allowed.passed, allowed.to_json()
    assert "create left disk 0 empty, as --allow-empty-create says it may" == \
        check(allowed, "create", "disk 0")[0].detail
    Path(os_dir, "ganeti_vol.conf").write_text("[disks]\nempty_after_create = yes\n")
    declared = run_os(tmp_path, os_dir)
    assert declared.passed, declared.to_json()
    assert "create left disk 0 empty, as ganeti_vol.conf says it may" == \
        check(declared, "create", "disk 0")[0].detail


def test_exit_0_importer_fails_the_round_trip_of_a_raw_export(tmp_path):
    """An importer that writes nothing: the export is the disk's bytes, so the disks must match."""
    report = run_os(tmp_path, fixture_os(tmp_path, **{"import": "cat >/dev/null\n"}))
    assert "pass" == verdict(report.step("import", "file"))
    for disk in (0, 1):
        compare = report.step("compare", "file", disk)
        assert "fail" == compare.status
        assert f"disk {disk}: the export is the disk's bytes, but the imported disk differs" \
            in compare.detail


def test_exporter_ignoring_export_index_fails_the_compare_of_disk_1(tmp_path, capsys):
    """An export that always dumps disk 0 imports fine; the compare of disk 1 names the mix-up.

    A second export of the imported disks would repeat the mistake and match: the runner
    must see that the export of disk 1 is the bytes of disk 0 (create writes nothing here,
    so that needs test data that differs from disk to disk).  With --disks 1 it passes.
    """
    os_dir = fixture_os(tmp_path, create="exit 0\n", export='cat "$DISK_0_PATH"\n')
    argv = ["os", "test", os_dir, "--disk-size", "4M", "--no-loop", "--json",
            "--work-dir", str(tmp_path / "w"), "--allow-empty-create"]
    rc = main(argv)
    report = json.loads(capsys.readouterr().out)
    failed = [(s["name"], s["disk"]) for s in report["steps"] if s["status"] == "fail"]
    assert 1 == rc and [("compare", 1)] == failed, report
    [compare] = [s for s in report["steps"] if (s["name"], s["disk"]) == ("compare", 1)]
    assert "disk 1: the export wrote the bytes of disk 0, not of disk 1: does the export " \
           "script read EXPORT_DEVICE (EXPORT_INDEX=1)?" == compare["detail"]
    rc = main([*argv, "--disks", "1"])
    single = json.loads(capsys.readouterr().out)
    assert 0 == rc and "passed" == single["status"], single
    assert [0] == [s["disk"] for s in single["steps"] if s["name"] == "compare" and s["disk"] == 0]
    assert [] == [s for s in single["steps"] if s["disk"] == 1]


def test_same_export_stream_for_different_disks_is_not_trusted_by_a_second_export(tmp_path):
    """A compressing export of disk 0 for every index: a second export would match, and the
    files cannot show otherwise, so nothing shows disk 1 survived: compare fails (it warned)."""
    export = 'gzip -1 -n -c <"$DISK_0_PATH"\n'
    importer = 'gzip -d | dd of="$IMPORT_DEVICE" conv=notrunc,nocreat status=none\n'
    report = run_os(tmp_path, fixture_os(tmp_path, export=export, **{"import": importer}))
    assert "byte-identical" in report.step("compare", "file", 0).detail
    compare = report.step("compare", "file", 1)
    assert "fail" == verdict(compare), compare.detail
    assert "disk 1: the export of disk 1 is the same stream as that of disk 0 although the " \
           "disks differ" in compare.detail and "cannot be compared" in compare.detail
    assert not report.passed


def test_hanging_help_is_killed_after_the_timeout_and_only_warns(tmp_path):
    """A script that waits on --help is stopped (its process group too) and reported."""
    create = 'case "$1" in --help) sleep 30;; esac\n' + GOOD["create"]
    report = run_os(tmp_path, fixture_os(tmp_path, create=create), help_timeout=0.5)
    [hang] = check(report, "help", "create", "-")
    assert ("warn", "create --help did not end within 0.5s (killed)") == (hang.status, hang.detail)
    assert not check(report, "help", "processes", "-")


def test_keep_leaves_disks_logs_and_each_script_stdout_for_inspection(tmp_path):
    """--keep keeps the scratch dir; each script's stdout has its own file there."""
    create = 'echo "hello on stdout"\n' + GOOD["create"]
    report = conformance.run(fixture_os(tmp_path, create=create), conformance.Options(
        disk_size=SIZE, loop=False, keep=True, work_dir=str(tmp_path / "w")))
    work = report.work_dir
    try:
        assert os.path.isfile(os.path.join(work, "file-a-disk0.img"))
        assert any(name.startswith("add-fixos") for name in os.listdir(os.path.join(work, "log")))
        outs = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(work, "stdout"))
                for f in files if f.endswith("-create.stdout")]
        assert "hello on stdout\n" in [Path(p).read_text() for p in outs]
    finally:
        shutil.rmtree(work)


def test_importer_that_truncates_the_file_disk_fails_import(tmp_path):
    """rbott/vagrant's bug: writing the image with O_TRUNC shrinks a file disk."""
    export = 'head -c 1048576 "$EXPORT_DEVICE"\n'
    importer = 'cat > "$IMPORT_DEVICE"\n'
    report = run_os(tmp_path, fixture_os(tmp_path, export=export, **{"import": importer}))
    for disk in (0, 1):  # each disk in its own import step
        imported = report.step("import", "file", disk)
        assert "fail" == imported.status
        assert re.search(rf"b-disk{disk}.img' was truncated from {SIZE} to 1048576 bytes$",
                         imported.detail)
        assert "skip" == report.step("compare", "file", disk).status


def test_wrong_exp_size_fd_fails_export(tmp_path):
    """An export announcing a size its dump does not have is caught (Ganeti's ETA lies)."""
    export = "#!/bin/bash\n" + 'echo 4096 >&"$EXP_SIZE_FD"\ncat "$EXPORT_DEVICE"\n'
    report = run_os(tmp_path, fixture_os(tmp_path, export=export))
    for disk in (0, 1):
        checks = check(report, "export", "EXP_SIZE_FD", disk=disk)
        assert [("fail", f"announced 4096 bytes on EXP_SIZE_FD, but the export wrote {SIZE}")] \
            == [(c.status, c.detail) for c in checks]


def test_create_writing_to_stdout_is_a_warning_not_a_failure(tmp_path):
    """Ganeti logs stdout outside export, so it is only a bug sign: warn, exit status 0."""
    create = 'echo "progress: 50%"\n' + GOOD["create"]
    report = run_os(tmp_path, fixture_os(tmp_path, create=create))
    assert report.passed
    create_step = report.step("create", "file")
    assert "warn" == create_step.status
    assert "create wrote 14 bytes to stdout ('progress: 50%')" in create_step.detail


def test_scripts_without_help_handling_only_warn(tmp_path):
    """Ganeti never calls --help: its absence is a warning, naming each script."""
    no_help = {k: v.replace(HELP.format(name=k), "") for k, v in GOOD.items()}
    report = run_os(tmp_path, fixture_os(tmp_path, **no_help))
    assert report.passed
    help_step = report.step("help")
    assert "warn" == help_step.status
    assert {"create", "export", "import", "rename", "verify"} == \
        {c.name for c in help_step.checks if c.status == "warn" and c.name != "temp files"}


def test_leaked_background_process_fails_the_step_and_is_killed(tmp_path):
    """A create that leaves a process in its group fails, and the runner kills it."""
    create = GOOD["create"] + "sleep 300 &\n"
    report = run_os(tmp_path, fixture_os(tmp_path, create=create))
    [leak] = check(report, "create", "processes")
    assert "fail" == leak.status and "killed" in leak.detail
    pid = int(re.search(r"pid (\d+) \(", leak.detail).group(1))  # (sleep) or still (create)
    assert not os.path.exists(f"/proc/{pid}") or proctree.live_group_members(pid) == []


def test_leaked_temp_dir_is_a_warning_and_is_left_alone(tmp_path):
    """mktemp without cleanup: reported (warn) but not removed, it might not be the script's."""
    create = GOOD["create"] + "mktemp -d /tmp/fixos-leak.XXXXXX >&2\n"
    before = set(glob.glob("/tmp/fixos-leak.*"))
    try:
        report = run_os(tmp_path, fixture_os(tmp_path, create=create))
        [leak] = check(report, "create", "temp files")
        path = re.search(r"(/tmp/fixos-leak\.\w+)", leak.detail).group(1)
        assert "warn" == leak.status and os.path.isdir(path)
    finally:  # every pass of create made one: remove them all, not only the one reported
        for made in set(glob.glob("/tmp/fixos-leak.*")) - before:
            shutil.rmtree(made, ignore_errors=True)


@needs_loop
def test_leaked_loop_device_fails_the_step_and_is_detached(tmp_path):
    """A create that leaves `losetup -f` attached fails on both passes; nothing stays attached."""
    create = GOOD["create"] + 'losetup -f --show "$DISK_0_PATH" >&2\n'
    report = run_os(tmp_path, fixture_os(tmp_path, create=create), loop=True)
    for kind in ("file", "loop"):
        [leak] = check(report, "create", "loop devices", kind)
        assert "fail" == leak.status and leak.detail.endswith("detached"), leak.detail
    assert [] == backed_by(tmp_path)


@needs_loop
@pytest.mark.skipif(not shutil.which("sfdisk"), reason="needs sfdisk (Debian package fdisk)")
def test_stale_partition_on_a_detached_loop_device_fails_and_is_deleted(tmp_path):
    """cloudimage's bug: BLKPG partitions survive `losetup -d`; the runner deletes them."""
    before = all_partitions()
    create = GOOD["create"] + """
printf 'label: dos\\n,2M,L\\n' | sfdisk -q "$DISK_0_PATH"
dev=$(losetup -f --show "$DISK_0_PATH")
partx -a "$dev"
losetup -d "$dev"
"""
    report = run_os(tmp_path, fixture_os(tmp_path, create=create))
    [leak] = check(report, "create", "partitions")
    assert "fail" == leak.status and leak.detail.endswith("deleted"), leak.detail
    assert before == all_partitions()
    # reported, and the rest of the pass still runs (it was skipped)
    for disk in (0, 1):
        assert "pass" == verdict(report.step("compare", "file", disk))
    assert "pass" == verdict(report.step("rename", "file"))


@needs_loop
def test_block_access_os_writes_are_kept_through_the_whole_round_trip(tmp_path):
    """The pxe case: an `access = block` OS whose create and import `dd` into /dev/loopN
    without fsync.  Everything they write reaches the disks (it was lost at the detach, and
    the runner wrote test data over the loss and passed); the scripts see
    DISK_0_BACKEND_TYPE=block with their block devices on both passes."""
    typed = ('[ ! -b "$DISK_0_PATH" ] || [ "$DISK_0_BACKEND_TYPE" = block ] || '
             '{ echo "block device, backend $DISK_0_BACKEND_TYPE" >&2; exit 1; }\n')
    create = GOOD["create"].replace("conv=notrunc,nocreat", "bs=64k seek=16 conv=notrunc")
    os_dir = fixture_os(tmp_path, create=typed + create,
                        rename=typed + GOOD["rename"], **{"import": typed + GOOD["import"]})
    Path(os_dir, "ganeti_vol.conf").write_text("[disks]\naccess = block\n")
    report = run_os(tmp_path, os_dir, loop=True)
    assert report.passed, report.to_json()
    for kind in ("file", "loop"):
        assert "pass" == check(report, "create", "disk 0", kind)[0].status
        assert [] == [c for s in report.steps if s.disks == kind for c in s.checks
                      if c.name == "test data"]  # create's data was there to export
        for disk in (0, 1):
            [trip] = check(report, "compare", "round trip", kind, disk)
            assert "byte-identical" in trip.detail
    assert [] == backed_by(tmp_path)


@needs_loop
@pytest.mark.skipif(not shutil.which("sfdisk"), reason="needs sfdisk (Debian package fdisk)")
def test_loop_pass_scripts_see_through_disk_and_partitions_alike(tmp_path):
    """On the loop pass the runner held the loop devices open, so what create wrote through
    the disk was not seen through its partition (and back).  Now each read sees the last
    write, as on a real disk; the partition's write is what the disk holds afterwards."""
    coherent = """
fail() { echo "$*" >&2; exit 1; }
if [ -b "$DISK_0_PATH" ]; then
  printf 'label: dos\\nstart=2048,size=4096,type=83\\n' | sfdisk -q "$DISK_0_PATH"
  partx -a "$DISK_0_PATH"
  printf OLD | dd of="$DISK_0_PATH" bs=512 seek=2048 conv=notrunc status=none
  [ "$(head -c 3 "$DISK_0_PATH"p1)" = OLD ] || fail "p1 does not see the write through the disk"
  printf NEW | dd of="$DISK_0_PATH"p1 conv=notrunc status=none
  seen=$(dd if="$DISK_0_PATH" bs=512 skip=2048 count=1 status=none | head -c 3)
  [ "$seen" = NEW ] || fail "the disk does not see the write through p1: '$seen'"
  partx -d "$DISK_0_PATH"
fi
"""
    report = run_os(tmp_path, fixture_os(tmp_path, create=GOOD["create"] + coherent), loop=True)
    create = report.step("create", "loop")
    assert "pass" == verdict(create), (create.detail, create.log_tail)
    assert report.passed, report.to_json()
    assert [] == backed_by(tmp_path)


def test_verify_that_accepts_a_bad_value_fails(tmp_path):
    """--bad-param names a declared parameter whose bad value verify must reject."""
    report = run_os(tmp_path, fixture_os(tmp_path, verify="exit 0\n"), bad_params={"mode": "x"})
    step = report.step("verify mode")
    assert "fail" == step.status and "verify accepted the bad parameter mode=x" == step.detail


def test_failing_create_shows_its_log_tail_and_skips_the_rest_of_the_pass(tmp_path):
    """The decisive error is in the report: exit code and the last lines of the log."""
    create = 'echo "cannot find kpartx mapping" >&2\nexit 3\n'
    report = run_os(tmp_path, fixture_os(tmp_path, create=create))
    step = report.step("create", "file")
    assert "fail" == step.status and "exited with exit code 3" in step.detail
    assert ["cannot find kpartx mapping"] == step.log_tail
    assert {"skip"} == {report.step(n, "file").status for n in conformance.PASS_STEPS[1:]}


def test_invalid_os_fails_validate_and_skips_everything(tmp_path):
    """An OS Ganeti would not load (no import script) fails validation; nothing else runs."""
    report = run_os(tmp_path, fixture_os(tmp_path, **{"import": None}))
    assert "fail" == report.step("validate").status
    assert "'import'" in report.step("validate").detail
    assert {"skip"} == {s.status for s in report.steps[1:]}


@needs_loop
def test_filesystem_level_round_trip_is_judged_by_the_files_inside(tmp_path):
    """A tar-based OS: bytes differ, the files match (pass); an import losing one fails."""
    mount = 'mnt=$(mktemp -d)\nmount -o "$2"loop "$1" "$mnt"\n'
    create = GOOD["create"].split("\n", 1)[0] + f"""
set -e
mke2fs -F -q -t ext2 "$DISK_0_PATH"
set -- "$DISK_0_PATH"; {mount}
mkdir "$mnt/etc"; echo "$INSTANCE_NAME" > "$mnt/etc/hostname"; echo data > "$mnt/keep"
umount "$mnt"; rmdir "$mnt"
"""
    export = f"""set -e
set -- "$EXPORT_DEVICE" ro,; {mount}
tar -C "$mnt" -c --exclude=./lost+found .
umount "$mnt"; rmdir "$mnt"
"""
    importer = f"""set -e
mke2fs -F -q -t ext2 "$IMPORT_DEVICE"
set -- "$IMPORT_DEVICE"; {mount}
tar -C "$mnt" -x
touch -d @1 "$mnt/etc"  # another directory time: the next export differs, the files not
case "$OSP_MODE" in fast) rm "$mnt/keep";; safe) echo edited > "$mnt/etc/hostname";; esac
umount "$mnt"; rmdir "$mnt"
"""
    os_dir = fixture_os(tmp_path, create=create, export=export, **{"import": importer})
    good = run_os(tmp_path, os_dir, disks=1)  # an OS of one disk: a filesystem on disk 0 only
    assert good.passed, good.to_json()
    assert "pass" == verdict(good.step("compare", "file")), good.step("compare", "file").detail
    assert "the same" in good.step("compare", "file").detail
    lossy = run_os(tmp_path, os_dir, osparams={"mode": "fast"}, disks=1)
    compare = lossy.step("compare", "file")
    assert "fail" == compare.status and "lost 1 of" in compare.detail and "/keep" in compare.detail
    # a changed file is a mismatch too (it warned), unless the import may change it
    edited = run_os(tmp_path, os_dir, osparams={"mode": "safe"}, disks=1)
    compare = edited.step("compare", "file")
    assert "fail" == compare.status and "changed 1 of" in compare.detail, compare.detail
    assert "/etc/hostname" in compare.detail
    allowed = run_os(tmp_path, os_dir, osparams={"mode": "safe"}, disks=1,
                     allow_change=frozenset({"/etc/hostname"}))
    compare = allowed.step("compare", "file")
    assert "warn" == verdict(compare) and "1 changed as allowed (/etc/hostname)" in \
        compare.detail, compare.detail
    assert [] == backed_by(tmp_path)


# --- the command line ---------------------------------------------------------------------


def test_cli_prints_a_table_and_exits_1_on_failure(tmp_path, capsys):
    """The table has one row per step with its result and time; a failure gives exit 1."""
    os_dir = fixture_os(tmp_path, export="exit 0\n")
    rc = main(["os", "test", os_dir, "--disk-size", "4M", "--no-loop",
               "--work-dir", str(tmp_path / "w")])
    out = capsys.readouterr().out
    assert 1 == rc
    assert re.search(r"^STEP\s+DISKS\s+RESULT\s+TIME\s+DETAIL$", out, re.M)
    for disk in (0, 1):  # a row for each disk
        assert re.search(rf"^export\s+file {disk}\s+FAIL\s+\d+\.\d\ds\s+.*wrote nothing", out,
                         re.M)
    assert re.search(r"^rename\s+file\s+pass\s", out, re.M)
    assert out.rstrip().splitlines()[-1].startswith("FAILED: ")


def test_cli_json_report_is_complete_and_exit_0_on_pass(tmp_path, capsys):
    """--json prints one object with every step, its checks and the verdict."""
    rc = main(["os", "test", fixture_os(tmp_path), "--disk-size", "4M", "--no-loop", "--json",
               "--work-dir", str(tmp_path / "w"), "-O", "mode=safe"])
    report = json.loads(capsys.readouterr().out)
    assert 0 == rc and "passed" == report["status"]
    assert ["validate", "help", "verify", "verify unknown"] == \
        [s["name"] for s in report["steps"][:4]]
    assert {"name", "disks", "disk", "status", "seconds", "detail", "checks", "log_tail"} == \
        set(report["steps"][0])
    assert [("export", "file", 0), ("export", "file", 1), ("export", "loop", None)] == \
        [(s["name"], s["disks"], s["disk"]) for s in report["steps"] if s["name"] == "export"]
    assert "verify accepted mode=safe" == report["steps"][2]["checks"][0]["detail"]


@pytest.mark.parametrize(("argv", "code", "message"), [
    (["--disk-size", "big"], 3, "invalid --disk-size 'big'"),
    (["--bad-param", "nosuch=1"], 3, "--bad-param nosuch: 'nosuch' is not in parameters.list"),
    (["--variant", "other"], 5, "does not support variant 'other'"),
    (["--timeout", "0"], 3, "invalid --timeout 0"),
    (["--disks", "0"], 3, "invalid --disks '0': give a number of disks from 1 to 4"),
    (["--disks", "9"], 3, "invalid --disks '9': give a number of disks from 1 to 4"),
    (["--disks", "two"], 3, "invalid --disks 'two'"),
])
def test_cli_bad_input_is_one_clear_line_and_a_documented_exit_code(tmp_path, capsys, argv,
                                                                    code, message):
    """Bad options end with 'ganeti-vol: error: ...' and no traceback, before any disk is made."""
    rc = main(["os", "test", fixture_os(tmp_path), "--work-dir", str(tmp_path / "w"), *argv])
    err = capsys.readouterr().err
    assert code == rc
    assert message in err and "Traceback" not in err and 1 == len(err.strip().splitlines())
    assert not (tmp_path / "w").exists()


def test_cli_unknown_os_name_is_an_os_definition_error(tmp_path, capsys, node_dirs):
    """A name not in the search path exits 5 and says where it looked."""
    rc = main(["os", "test", "nosuchos", "--search-path", str(tmp_path)])
    err = capsys.readouterr().err
    assert 5 == rc
    assert f"Directory for OS nosuchos not found in search path ({tmp_path}, {node_dirs['os']})" \
        in err


def test_cli_finds_an_os_by_name_and_variant_in_the_node_search_path(tmp_path, capsys,
                                                                     node_dirs):
    """NAME+VARIANT is looked up in the node's os_search_path, like Ganeti does."""
    make_os(node_dirs["os"], "fixos", parameters=PARAMS, scripts=GOOD)
    rc = main(["os", "test", "fixos+default", "--json",
               "--disk-size", "4M", "--no-loop", "--work-dir", str(tmp_path / "w")])
    report = json.loads(capsys.readouterr().out)
    assert 0 == rc and "fixos+default" == report["full_name"]


def interrupt_during_create(tmp_path, backend_type: str, *extra: str):
    """Run os test in a child; SIGINT it once create runs on ``backend_type`` disks."""
    marker = tmp_path / "create-started"
    create = (f'[ "$DISK_0_BACKEND_TYPE" = {backend_type} ] && '
              f'{{ echo $$ > "{marker}"; sleep 60; }}\n' + GOOD["create"])
    os_dir = fixture_os(tmp_path, create=create)
    work = tmp_path / "w"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ganeti_vol", "os", "test", os_dir, "--disk-size", "4M",
         "--work-dir", str(work), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (marker.exists() and marker.read_text().strip()):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        pgid = int(marker.read_text())
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err, pgid, work


def test_ctrl_c_stops_the_script_and_removes_the_scratch_dir(tmp_path):
    """SIGINT during create: exit 130, the script's process group is gone, nothing is left."""
    rc, err, pgid, work = interrupt_during_create(tmp_path, "file:loop", "--no-loop")
    assert 130 == rc, err
    assert "interrupted by SIGINT" in err
    assert [] == proctree.live_group_members(pgid)
    assert [] == os.listdir(work)


@needs_loop
def test_ctrl_c_on_the_loop_pass_detaches_the_loop_devices(tmp_path):
    """SIGINT while create runs on loop devices: they are detached and the files removed."""
    rc, err, pgid, work = interrupt_during_create(tmp_path, "block")
    assert 130 == rc, err
    assert [] == proctree.live_group_members(pgid)
    assert [] == os.listdir(work) and [] == backed_by(tmp_path)


def test_process_watch_keeps_stdout_apart_and_records_each_child(tmp_path):
    """The hook os test uses: non-data stdout goes to its own file, stderr to the log."""
    script = make_os(tmp_path / "os", "w", scripts={"create": "echo out; echo err >&2\n"})
    log_path = tmp_path / "op.log"
    with scriptlog.watch(str(tmp_path)) as seen:
        process.run_script(str(script / "create"), {}, cwd=str(script), op="create",
                           log_path=str(log_path))
    [child] = seen.scripts
    assert ("create", "out\n", "err\n") == \
        (child.op, Path(child.stdout_path).read_text(), log_path.read_text())
    process.run_script(str(script / "create"), {}, cwd=str(script), op="create",
                       log_path=str(log_path))
    assert "err\nout\nerr\n" == log_path.read_text()  # outside a watch: both in the log
