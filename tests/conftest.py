"""Shared fixtures: a clean process environment, a node config pointing at
tmp_path, and a factory for real OS definitions written into tmp_path."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest

from ganeti_vol.engine import hashing
from ganeti_vol.ganeti import config as cfgmod

#: the golden repositories are BLAKE3's: without the package they cannot be read at all
needs_blake3 = pytest.mark.skipif(
    not hashing.available("blake3"),
    reason="needs the Python package blake3, which this Python lacks (Debian 12 has no "
           "python3-blake3: repositories made there use sha256)")
#: every chunk hash algorithm, to parametrize over (blake3 skipped where it is missing)
EVERY_CHUNK_HASH = [pytest.param(a, marks=needs_blake3) if a == "blake3" else a
                    for a in hashing.ALGORITHMS]

REPO = Path(__file__).resolve().parent.parent


def pytest_report_header(config):
    root = os.geteuid() == 0
    loop = shutil.which("losetup") is not None
    lz4 = shutil.which("lz4") is not None
    return [f"ganeti-vol: root={root} losetup={loop} lz4-cli={lz4}"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """Strip Ganeti/OS variables a developer's shell might carry, and point
    the node config at a file under tmp_path (never /etc)."""
    for key in list(os.environ):
        if key.startswith(("GANETI_", "OSP_", "DISK_", "NIC_", "INSTANCE_", "EXPORT_", "IMPORT_")):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("GANETI_VOL_CONFIG", str(tmp_path / "node" / "ganeti-vol.conf"))


@pytest.fixture
def default_sigint():
    """Ctrl-C as in a user's shell: Python's KeyboardInterrupt handler, also where this run
    inherited SIGINT ignored (nohup, some CI runners), which would swallow a test's SIGINT."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def node_dirs(tmp_path):
    """A node config file whose directories all live under tmp_path."""
    base = tmp_path / "node"
    dirs = {
        "os": base / "os",
        "hooks": base / "hooks",
        "log": base / "log",
        "export": base / "export",
        "state": base / "state",
    }
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    conf = base / "ganeti-vol.conf"
    cfgmod.write_node_config(
        str(conf),
        {
            "os_search_path": [str(dirs["os"])],
            "hooks_dir": str(dirs["hooks"]),
            "log_dir": str(dirs["log"]),
            "export_dir": str(dirs["export"]),
            "state_dir": str(dirs["state"]),
            "stall_timeout": "30",
        },
    )
    dirs["conf"] = conf
    return dirs


@pytest.fixture
def node_config(node_dirs):
    return cfgmod.load_node_config(str(node_dirs["conf"]))


@pytest.fixture(scope="session")
def debian_package(tmp_path_factory):
    """ganeti-vol's Debian package built from this tree, once per session and shared by
    the package's tests and the Ganeti test cluster (tests/debian_build.py); ``.deb`` is
    None, with ``.reason``, where it cannot be built here."""
    import debian_build

    return debian_build.debian_package(tmp_path_factory.mktemp("deb"))


def write_script(path: Path, body: str, mode: int = 0o755) -> Path:
    """Write an executable script; ``body`` is dedented, a #!/bin/sh line added if missing."""
    text = textwrap.dedent(body).lstrip("\n")
    if not text.startswith("#!"):
        text = "#!/bin/sh\n" + text
    path.write_text(text)
    path.chmod(mode)
    return path


NOOP = "exit 0\n"


def make_os(
    parent: Path,
    name: str = "testos",
    *,
    api=(20,),
    variants=("default",),
    parameters=(("param1", "first parameter"),),
    scripts=None,
    skip=(),
) -> Path:
    """Create an OS definition dir; ``scripts`` maps script name -> shell body."""
    d = parent / name
    d.mkdir(parents=True, exist_ok=True)
    if "ganeti_api_version" not in skip:
        (d / "ganeti_api_version").write_text("".join(f"{v}\n" for v in api))
    if variants is not None and "variants.list" not in skip:
        (d / "variants.list").write_text("".join(f"{v}\n" for v in variants))
    if parameters is not None and "parameters.list" not in skip:
        (d / "parameters.list").write_text("".join(f"{n} {desc}\n" for n, desc in parameters))
    all_scripts = {s: NOOP for s in ("create", "export", "import", "rename", "verify")}
    all_scripts.update(scripts or {})
    for sname, body in all_scripts.items():
        if sname in skip or body is None:
            continue
        write_script(d / sname, body)
    return d


@pytest.fixture
def os_factory(node_dirs):
    def factory(name="testos", **kw):
        return make_os(node_dirs["os"], name, **kw)

    return factory


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def losetup_works() -> bool:
    if os.geteuid() != 0 or not shutil.which("losetup"):
        return False
    try:
        subprocess.run(["losetup", "-f"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def is_executable(path: Path) -> bool:
    return bool(path.stat().st_mode & stat.S_IXUSR)


# ---------------------------------------------------------------------------
# Loop-device leak check (issue 5, devices and snapshots).  Owned by the
# devices/loopdev/snapshots tests; other areas: please leave it at the end.
#
# Lists the loop devices and loopNpM partitions before the session and fails
# the run if any new one remains afterwards.  Only devices that this session
# can have made count: loop devices whose backing file lives under this
# session's pytest base temp dir, and stale partitions on unbound loop devices
# (other test sessions may run on the same machine at the same time).
# ---------------------------------------------------------------------------
_LOOP_LEAK = {"basetemp": None, "before": None}


def _loop_snapshot(basetemp):
    """{"loopN (backing)" or "loopNpM"} that this session is responsible for."""
    found = set()
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return found
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                backing = f.read().strip()
        except OSError:
            backing = None
        ours = backing is not None and basetemp and backing.startswith(basetemp)
        if ours:
            found.add(f"{name} ({backing})")
        try:
            parts = [e for e in os.listdir(f"/sys/block/{name}") if e.startswith(name + "p")]
        except OSError:
            parts = []
        if ours or backing is None:
            found.update(parts)
    return found


@pytest.fixture(scope="session", autouse=True)
def _loop_leak_scope(tmp_path_factory):
    """Remember this session's base temp dir for the leak check in pytest_sessionfinish."""
    _LOOP_LEAK["basetemp"] = str(tmp_path_factory.getbasetemp())
    _LOOP_LEAK["before"] = _loop_snapshot(_LOOP_LEAK["basetemp"])
    yield


def pytest_sessionfinish(session, exitstatus):
    basetemp, before = _LOOP_LEAK["basetemp"], _LOOP_LEAK["before"]
    if basetemp is None:
        return
    leaked = _loop_snapshot(basetemp) - before
    if leaked:  # detach is asynchronous: look again before calling it a leak
        import time

        time.sleep(0.5)
        leaked &= _loop_snapshot(basetemp) - before
    if leaked:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = "LEAKED loop devices/partitions after the test session: " + ", ".join(
            sorted(leaked)
        )
        if reporter is not None:
            reporter.write_line(message, red=True, bold=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
