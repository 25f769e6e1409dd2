"""The Debian package: built from this tree with the standard tools (dpkg-buildpackage,
debhelper, pybuild), installed with apt, then used as a Ganeti node uses it: the system
python3, Ganeti's fixed PATH, the OS definitions in /usr/share/ganeti/os and the hooks in
/etc/ganeti/hooks.  The package is purged afterwards unless it was installed before."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import ganeti_cluster
import pytest
from conftest import sparse_file

from ganeti_vol import __version__
from ganeti_vol.core import constants as C

REPO = Path(__file__).resolve().parent.parent
#: where Ganeti looks for OS definitions (Debian's search path) and runs hooks from
GANETI_OS = Path("/usr/share/ganeti/os")
GANETI_HOOKS = Path("/etc/ganeti/hooks")
HOOKS = ("instance-add-pre.d/ganeti-vol-verify-params",
         "instance-export-pre.d/ganeti-vol-check-space",
         "instance-export-post.d/ganeti-vol-verify-export")
APT = ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=600", "--no-install-recommends"]

needs_dpkg = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("dpkg-buildpackage") or not shutil.which("apt-get"),
    reason="needs root, dpkg-buildpackage and apt-get (a Debian system) to build and "
           "install the package",
)


def node_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """What Ganeti gives a node's commands: its fixed PATH (so the system python3), no
    virtualenv, no PYTHONPATH; a node config under tmp_path."""
    return {"PATH": C.SCRIPT_PATH, "HOME": str(tmp_path), "LC_ALL": "C.UTF-8", **extra}


def node_run(tmp_path: Path, *argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=node_env(tmp_path, **kw.pop("env", {})), cwd="/",
                          capture_output=True, text=True, timeout=300, **kw)


def test_debian_changelog_is_at_the_package_version():
    """debian/changelog's top entry is ganeti_vol.__version__ (a native package)."""
    first = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"ganeti-vol ({__version__}) ")


@pytest.fixture(scope="module")
def package(debian_package):
    """The session's package (built once, tests/debian_build.py), installed with apt;
    purged at the end unless a ganeti-vol package was installed before."""
    if debian_package.deb is None:
        pytest.skip(debian_package.reason)
    deb = debian_package.deb
    before = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", "ganeti-vol"],
                            capture_output=True, text=True)
    was_installed = before.stdout.endswith(" installed")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = subprocess.run(
        [*APT, "-o", "Dpkg::Options::=--force-confold", "install", str(deb)],
        capture_output=True, text=True, env=env, timeout=600)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    try:
        yield deb
    finally:
        if not was_installed:
            subprocess.run(["dpkg", "--purge", "ganeti-vol"], capture_output=True, env=env,
                           timeout=300)


@needs_dpkg
@pytest.mark.deb
def test_package_puts_os_definitions_and_hooks_where_ganeti_looks(package, tmp_path):
    """raw and image in /usr/share/ganeti/os; the hooks exactly as 'ganeti-vol hooks
    install' would put them in /etc/ganeti/hooks (it finds nothing to change there)."""
    for name in ("raw", "image"):
        assert (GANETI_OS / name / "ganeti_api_version").read_text() == "20\n15\n10\n"
        assert os.access(GANETI_OS / name / "create", os.X_OK)
    for hook in HOOKS:
        assert os.access(GANETI_HOOKS / hook, os.X_OK), hook
    assert Path("/usr/bin/ganeti-vol").read_text().startswith("#!/usr/bin/python3")
    res = node_run(tmp_path, "ganeti-vol", "hooks", "install", "--dry-run", "--json",
                   "--target", str(GANETI_HOOKS))
    assert res.returncode == 0, res.stderr
    import json

    actions = {a["file"]: a["action"] for a in json.loads(res.stdout)["actions"]}
    assert {actions[h] for h in HOOKS} == {"unchanged"}, actions
    assert actions["ganeti-vol-hooks.conf"] in ("unchanged", "kept"), actions


@pytest.mark.deb
def test_test_cluster_hides_every_file_the_package_installs(debian_package):
    """tests/ganeti_cluster.py whites out (HIDDEN) everything this package puts on a host,
    dpkg's records of it included, so that its node never sees it: an OS found in
    /usr/share/ganeti/os as well as in the node's /srv/ganeti/os makes Ganeti 3.0's
    `gnt-os diagnose` crash, and a node whose dpkg believed the package installed would
    not install it."""
    if debian_package.deb is None:
        pytest.skip(debian_package.reason)
    deb = str(debian_package.deb)
    listing = subprocess.run(["dpkg-deb", "--contents", deb], capture_output=True,
                             text=True, check=True).stdout
    files = [line.split()[5].removeprefix(".") for line in listing.splitlines()
             if not line.startswith("d")]
    assert "/usr/share/ganeti/os/image" in files, listing
    control = subprocess.run(["dpkg-deb", "--ctrl-tarfile", deb], capture_output=True,
                             check=True).stdout
    members = subprocess.run(["tar", "-t"], input=control, capture_output=True,
                             check=True).stdout.decode().split()
    info = [f"/var/lib/dpkg/info/ganeti-vol.{m.removeprefix('./')}" for m in members
            if m.removeprefix("./") not in ("", "control")]
    assert "/var/lib/dpkg/info/ganeti-vol.postinst" in info, members
    hidden = ganeti_cluster.HIDDEN
    assert [f for f in files + info + ["/var/lib/dpkg/info/ganeti-vol.list"]
            if not any(f == h or f.startswith(h + "/") for h in hidden)] == []


@needs_dpkg
@pytest.mark.deb
def test_test_cluster_node_installs_the_package_the_host_already_has(package, tmp_path):
    """With ganeti-vol's package on the host, the test cluster's node starts without it
    (no file, no entry in its dpkg database) and its own apt installs the package into
    the node's overlays; the host's package is untouched."""
    reason = ganeti_cluster.missing_prerequisite()
    if reason:
        pytest.skip(f"no Ganeti cluster here: {reason}")
    node = ganeti_cluster.GanetiCluster(tmp_path / "node").start(init=False)
    try:
        node.install_ganeti_vol(package)
        owner = node.run(["dpkg", "-S", "/usr/bin/ganeti-vol"]).stdout
        upper = node.upper_path("/var/lib/dpkg/info/ganeti-vol.list")
    finally:
        node.stop()
    assert node.seen_before_install == []
    assert owner == "ganeti-vol: /usr/bin/ganeti-vol\n"
    assert upper.is_file()
    assert node.leftovers() == []


@needs_dpkg
@pytest.mark.deb
def test_package_runs_the_demo_with_the_system_python(package, tmp_path):
    res = node_run(tmp_path, "python3", "-c", "import ganeti_vol; print(ganeti_vol.__file__)")
    assert res.stdout.startswith("/usr/lib/python3/dist-packages/ganeti_vol/"), res
    res = node_run(tmp_path, "ganeti-vol", "demo", "--json")
    assert res.returncode == 0, res.stderr
    assert '"disks_identical": [\n        true,\n        true\n      ]' in res.stdout


@needs_dpkg
@pytest.mark.deb
def test_package_raw_os_passes_os_test_from_ganetis_search_path(package, tmp_path, node_dirs):
    """'os test raw' finds raw in /usr/share/ganeti/os and passes (files and, as root,
    loop devices); its export script run by hand under Ganeti's PATH, with no Python
    parent, finds the system python3."""
    conf = tmp_path / "node.conf"
    conf.write_text(node_dirs["conf"].read_text().replace(
        f"os_search_path = {node_dirs['os']}", f"os_search_path = {GANETI_OS}"))
    assert f"os_search_path = {GANETI_OS}" in conf.read_text()
    res = node_run(tmp_path, "ganeti-vol", "os", "test", "raw", "--disk-size", "32M",
                   "--work-dir", str(tmp_path), env={"GANETI_VOL_CONFIG": str(conf)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"passed: \d+ pass, \d+ warn, 0 fail", res.stdout), res.stdout
    disk = sparse_file(tmp_path / "d.img", 1 << 20)
    disk.write_bytes(b"data" * (1 << 18))
    res = node_run(tmp_path, "sh", "-c", f'"{GANETI_OS}/raw/export" | cmp - "{disk}"',
                   env={"EXPORT_DEVICE": str(disk), "EXPORT_INDEX": "0"})
    assert res.returncode == 0, res.stderr
