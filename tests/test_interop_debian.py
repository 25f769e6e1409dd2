"""Debian's OS definitions, unmodified, through ``ganeti-vol os test``.

``ganeti-os-noop`` must pass; ``ganeti-instance-debootstrap`` must pass with
``PARTITION_STYLE=none`` and fail cleanly (kpartx, no device-mapper here) in
its default partitioned style.  Debootstrap gets no network: a tiny rootfs
cache tar built from busybox-static is staged where the OS looks for it, and
its config file is changed for the test and restored afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import losetup_works

from ganeti_vol.authoring import conformance
from ganeti_vol.cli import main
from ganeti_vol.system import devices

OS_DIR = "/usr/share/ganeti/os"
NOOP = f"{OS_DIR}/noop"
DEBOOTSTRAP = f"{OS_DIR}/debootstrap"
DEFAULT_FILE = "/etc/default/ganeti-instance-debootstrap"
MARK = "# ganeti-vol test"
LOCK = "/run/lock/ganeti-vol-debootstrap-test.lock"
SUITE = "ganeti-vol-test"
BUSYBOX = "/bin/busybox"


def loops_of(base: Path) -> list[str]:
    """Loop devices (and their partitions) backed by a file under ``base``."""
    found = []
    for dev, backing in devices.iter_loop_devices():
        if backing and backing.startswith(str(base)):
            found.append(dev)
            found.extend(p for _, p, _ in devices.partition_devices(dev))
    return found


def problems(report) -> list[tuple[str, str, str]]:
    """(step, disks, detail) of every step that did not pass: the assertion message."""
    steps = report["steps"] if isinstance(report, dict) else [s.to_json() for s in report.steps]
    return [(s["name"], s["disks"], s["detail"]) for s in steps if s["status"] != "pass"]


def verdict(step: dict) -> str:
    """A step's status without the temp-file check: other programs on the machine share /tmp."""
    rank = {"skip": 0, "pass": 1, "warn": 2, "fail": 3}
    statuses = [c["status"] for c in step["checks"] if c["name"] != "temp files"]
    return max(statuses or ["pass"], key=rank.__getitem__)


def all_partitions() -> set[str]:
    """Every loopNpM partition node the kernel knows."""
    return {part for dev, _ in devices.iter_loop_devices()
            for _, part, _ in devices.partition_devices(dev)}


# --- ganeti-os-noop ---------------------------------------------------------------------


@pytest.mark.skipif(not os.path.isdir(NOOP),
                    reason="Debian package ganeti-os-noop is not installed")
def test_debian_noop_passes_os_test_unmodified(tmp_path, capsys):
    """ganeti-os-noop (API 5/10) passes every step, declared to install nothing; only its
    missing --help usage warns."""
    rc = main(["os", "test", NOOP, "--disk-size", "32M", "--work-dir", str(tmp_path), "--json",
               "--allow-empty-create"])
    report = json.loads(capsys.readouterr().out)
    assert 0 == rc, problems(report)
    statuses = {(s["name"], s["disks"]): verdict(s) for s in report["steps"]}
    for name in conformance.PASS_STEPS:
        assert "pass" == statuses[(name, "file")], problems(report)
    assert "warn" == statuses[("help", "-")]
    assert "skip" == statuses[("verify", "-")]  # API 10: Ganeti runs no verify
    if losetup_works():
        assert all("pass" == statuses[(n, "loop")] for n in conformance.PASS_STEPS), \
            problems(report)
    export = next(s for s in report["steps"] if s["name"] == "export")
    assert any(c["name"] == "EXP_SIZE_FD" and "announced 33554432" in c["detail"]
               for c in export["checks"])
    assert [] == os.listdir(tmp_path) and [] == loops_of(tmp_path)


# --- ganeti-instance-debootstrap -----------------------------------------------------------


def _effective_config() -> dict[str, str]:
    """SUITE, ARCH, PARTITION_STYLE and CACHE_DIR as the OS's common.sh computes them."""
    common = Path(DEBOOTSTRAP, "common.sh").read_text()
    cache_dir = re.search(r'^CACHE_DIR="([^"]+)"', common, re.M).group(1)
    script = (
        f'. "{DEFAULT_FILE}"; : ${{SUITE:=jessie}}; '
        ': ${VARIANTS_DIR:=/etc/ganeti/instance-debootstrap/variants}; '
        '[ -f "$VARIANTS_DIR/default.conf" ] && . "$VARIANTS_DIR/default.conf"; '
        'echo "$SUITE"; echo "${ARCH:-$(dpkg --print-architecture)}"; echo "$PARTITION_STYLE"'
    )
    out = subprocess.run(["bash", "-c", script], check=True, capture_output=True, text=True,
                         env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}).stdout.split("\n")
    return {"SUITE": out[0], "ARCH": out[1], "PARTITION_STYLE": out[2], "CACHE_DIR": cache_dir}


def _rootfs_tar(path: str) -> None:
    """A rootfs just big enough for debootstrap's create: busybox as sh and passwd."""
    with tarfile.open(path, "w") as tar:
        def add_dir(name: str) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)

        def add_file(name: str, text: str, mode: int = 0o644) -> None:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))

        for d in (".", "bin", "etc", "etc/network", "root", "tmp"):
            add_dir(d)
        tar.add(BUSYBOX, "bin/busybox")
        for link in ("sh", "passwd"):
            info = tarfile.TarInfo(f"bin/{link}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
        add_file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
        add_file("etc/shadow", "root:*:19000:0:99999:7:::\n", 0o640)
        add_file("etc/group", "root:x:0:\n")


def _write_atomically(path: str, data: bytes, mode: int) -> None:
    tmp = f"{path}.ganeti-vol-test"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


@contextlib.contextmanager
def debootstrap_staged(partition_style: str):
    """Point debootstrap at a staged cache tar with ``partition_style``; restore everything after.

    A lock serialises test sessions on this machine; lines a crashed run left
    in the config file (marked) are dropped from what is restored.
    """
    os.makedirs(os.path.dirname(LOCK), exist_ok=True)
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            st = os.stat(DEFAULT_FILE)
            original: bytes | None = b"".join(
                line for line in Path(DEFAULT_FILE).read_bytes().splitlines(keepends=True)
                if MARK.encode() not in line
            )
            mode = st.st_mode & 0o7777
        except FileNotFoundError:
            original, mode = None, 0o644
        lines = [f'SUITE="{SUITE}"', f'PARTITION_STYLE="{partition_style}"',
                 'GENERATE_CACHE="no"', 'CLEAN_CACHE=""']
        staged = (original or b"") + "".join(f"{line}  {MARK}\n" for line in lines).encode()
        made_dir, tar_path, cfg = False, None, {}
        try:
            _write_atomically(DEFAULT_FILE, staged, mode)
            cfg = _effective_config()
            if cfg["PARTITION_STYLE"] != partition_style:
                pytest.skip(f"a variant config overrides PARTITION_STYLE={cfg['PARTITION_STYLE']}")
            if not os.path.isdir(cfg["CACHE_DIR"]):
                os.makedirs(cfg["CACHE_DIR"])
                made_dir = True
            tar_path = os.path.join(cfg["CACHE_DIR"], f"cache-{cfg['SUITE']}-{cfg['ARCH']}.tar")
            if os.path.exists(tar_path):
                pytest.skip(f"'{tar_path}' exists and is not ours")
            _rootfs_tar(tar_path)
            yield cfg
        finally:
            if original is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(DEFAULT_FILE)
            else:
                _write_atomically(DEFAULT_FILE, original, mode)
            if tar_path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tar_path)
            if made_dir:
                shutil.rmtree(cfg["CACHE_DIR"], ignore_errors=True)
            # still under the lock: the system is exactly as it was
            restored = Path(DEFAULT_FILE).read_bytes() if original is not None else None
            assert original == restored and not (tar_path and os.path.exists(tar_path))
            assert not made_dir or not os.path.exists(cfg["CACHE_DIR"])


needs_debootstrap = pytest.mark.skipif(
    not (os.path.isdir(DEBOOTSTRAP) and shutil.which("dump") and os.path.exists(BUSYBOX)
         and losetup_works()),
    reason="needs root, working losetup and the Debian packages ganeti-instance-debootstrap, "
           "dump and busybox-static",
)


@needs_debootstrap
def test_debian_debootstrap_with_partition_style_none_passes_os_test(tmp_path):
    """debootstrap (dump/restore) passes create, export, import, rename and reinstall."""
    with debootstrap_staged("none"):
        # one disk: debootstrap formats only disk 0, and its export dumps only ext
        # filesystems, so a second disk fails its export (as it would under Ganeti)
        # its import writes the new filesystem's UUID into /etc/fstab, on purpose
        report = conformance.run(DEBOOTSTRAP, conformance.Options(
            bad_params={"filesystem": "xfs"}, work_dir=str(tmp_path), disks=1,
            allow_change=frozenset({"/etc/fstab"})))
    assert report.passed, problems(report)
    assert "pass" == report.step("verify filesystem").status  # verify rejects xfs
    for kind in ("file", "loop"):
        for name in conformance.PASS_STEPS:
            assert report.step(name, kind).status in ("pass", "warn"), problems(report)
        compare = report.step("compare", kind)
        # a dump stream: neither bytes nor a second export match, the files inside do
        assert "/etc/fstab" in compare.detail or "the same" in compare.detail, compare.detail
    assert [] == os.listdir(tmp_path) and [] == loops_of(tmp_path)


@needs_debootstrap
def test_debian_debootstrap_default_msdos_style_fails_cleanly_at_kpartx(tmp_path):
    """Without device-mapper the partitioned create fails, names kpartx, and leaves nothing."""
    partitions_before = all_partitions()
    with debootstrap_staged("msdos"):
        report = conformance.run(DEBOOTSTRAP, conformance.Options(work_dir=str(tmp_path)))
    assert not report.passed
    create = report.step("create", "file")
    assert "fail" == create.status and "exit code 1" in create.detail
    assert any("kpartx" in line or "device-mapper" in line for line in create.log_tail), \
        create.log_tail
    assert "skip" == report.step("export", "file").status
    if losetup_works():  # the same on a loop device: kpartx, not the file, is the problem
        assert "fail" == report.step("create", "loop").status
    assert not [c for s in report.steps for c in s.checks
                if c.name in ("loop devices", "partitions", "mounts", "processes")]
    assert [] == loops_of(tmp_path) and partitions_before == all_partitions()
