"""A real one-node Ganeti 3.0 cluster, from Debian's packages, in private namespaces.

``GanetiCluster(state_dir).start()`` brings up the cluster; ``stop()`` takes it down and
leaves nothing on the host.  tests/test_ganeti_cluster.py uses it through a session
fixture; ``python tests/ganeti_cluster.py`` brings one up and down by hand, with timings.
The facts it rests on: ../shared/reference/ganeti-cluster.md; what Ganeti does with
ganeti-vol there: doc/ganeti-integration.md.

How it is isolated:

- One *holder* process, started by ``unshare``, is PID 1 of new pid, mount, UTS, IPC and
  network namespaces.  Every command runs in them through ``nsenter``.
- In the mount namespace, ``/etc``, ``/var``, ``/srv``, ``/root`` and ``/usr`` are overlays
  whose upper layers live in ``state_dir``: whatever Ganeti or ganeti-vol write there
  (``/etc/ganeti``, ``/var/lib/ganeti``, ``/srv/ganeti``, ``/root/.ssh`` ...) never reaches
  the host.  ``/run`` is a fresh tmpfs and ``/sys`` a fresh sysfs, which shows the
  namespace's own network devices (Ganeti checks the instance bridge there).
- The node starts without ganeti-vol: whatever its Debian package puts on a host (the
  ``HIDDEN`` paths: hooks, configuration, commands, OS definitions, modules, dpkg's
  records) is hidden by whiteouts made in the upper layers before they are mounted, so the
  node never sees it, even when the package is installed or removed on the host while the
  cluster runs; the node's dpkg database is the host's at bring-up, without ganeti-vol.
  (An OS found in two directories also makes Ganeti 3.0's ``gnt-os diagnose`` crash.)
- ``install_ganeti_vol(deb)`` then installs ganeti-vol on the node as a real node gets
  it: the Debian package built from this tree, with the node's own apt, into the
  overlays; without a package, this checkout by ``os install`` and ``hooks install``.
- The network namespace holds ``lo``, a veth pair whose two ends stay inside, and a
  bridge for the instances' NICs.  No route leads out.
- Teardown is the holder's exit: the kernel then kills every process left in its pid
  namespace, and the mount and network namespaces go with the last of them.  The holder
  exits on SIGTERM, and also when its stdin, a pipe from this process, reaches EOF, so the
  cluster dies with the test run even when that run is killed with SIGKILL.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from console_script import console_script

from ganeti_vol import __version__

DOMAIN = "gnt.test"
NODE = f"node1.{DOMAIN}"
NODE_IP = "10.77.0.1"
CLUSTER = f"cluster.{DOMAIN}"
CLUSTER_IP = "10.77.0.100"
#: instance names the private /etc/hosts resolves: inst1.gnt.test .. inst40.gnt.test
INSTANCE_NAMES = tuple(f"inst{i}.{DOMAIN}" for i in range(1, 41))
VETH, VETH_PEER, BRIDGE = "gnt0", "gnt1", "gntbr0"

#: host directories shadowed by an overlay inside the mount namespace
OVERLAYS = ("/etc", "/var", "/srv", "/root", "/usr")
#: the environment of every command run in the cluster.  Ganeti's daemons inherit it from
#: ``gnt-cluster init`` (and pass it on to the OS import/export scripts): about what
#: init gives a Debian node's services, without systemd's INVOCATION_ID and the like
NODE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
#: Debian's Ganeti keeps exports here (upstream's default is /srv/ganeti/export)
EXPORT_DIR = "/var/lib/ganeti/export"
#: the node config ganeti-vol reads on the cluster's node (doc/ganeti-integration.md)
NODE_CONFIG = f"""\
os_search_path = /srv/ganeti/os, /usr/local/lib/ganeti/os, /usr/lib/ganeti/os, /usr/share/ganeti/os
export_dir = {EXPORT_DIR}
"""
#: the hooks' settings (the package's conffile, or what `hooks install` writes)
HOOKS_CONF = "/etc/ganeti/hooks/ganeti-vol-hooks.conf"
#: the only PATH Ganeti gives OS scripts, hooks and its import/export pipelines
GANETI_PATH = "/sbin:/bin:/usr/sbin:/usr/bin"
LZ4_TOOL = "ganeti-vol-lz4"
#: where a pip install into a prefix off Ganeti's PATH puts the tool's console script;
#: doc/remote.md links it into /usr/bin (the package installs /usr/bin's itself)
LZ4_TOOL_SCRIPT = f"/usr/local/lib/ganeti-vol/bin/{LZ4_TOOL}"
LZ4_TOOL_BIN = f"/usr/bin/{LZ4_TOOL}"
#: what `gnt-cluster modify --compression-tools` gets (doc/remote.md)
COMPRESSION_TOOLS = f"gzip,gzip-fast,gzip-slow,{LZ4_TOOL}"
REPO = Path(__file__).resolve().parent.parent

PACKAGE = "ganeti-vol"
#: dpkg's database, whose ganeti-vol entry the node never inherits from the host
DPKG_STATUS = "/var/lib/dpkg/status"
#: what dpkg keeps of an installed ganeti-vol besides its status: the file list and the
#: package's control files (tests/test_debian_package.py keeps the list complete)
DPKG_INFO = tuple(f"/var/lib/dpkg/info/{PACKAGE}.{name}"
                  for name in ("list", "md5sums", "conffiles", "postinst", "prerm"))
#: host paths the node must not see: everything ganeti-vol's Debian package installs
#: (tests/test_debian_package.py keeps the list complete), hidden by whiteouts
HIDDEN = (
    "/etc/ganeti/hooks", "/etc/ganeti-vol", "/usr/bin/ganeti-vol", "/usr/bin/ganeti-vol-lz4",
    "/usr/share/ganeti/os/raw", "/usr/share/ganeti/os/image", "/usr/share/ganeti-vol",
    "/usr/lib/python3/dist-packages/ganeti_vol",
    f"/usr/lib/python3/dist-packages/ganeti_vol-{__version__}.dist-info",
    "/usr/share/doc/ganeti-vol", "/usr/share/python3/runtime.d/ganeti-vol.rtupdate",
    *DPKG_INFO,
)
#: the host paths Ganeti and ganeti-vol would change on a real node, and every path of
#: ganeti-vol's package (the node installs it, the host must not get it): the leak check
#: compares them before and after a cluster's life
WATCHED = (
    "/etc/ganeti", "/etc/ganeti-vol", "/etc/ssh", "/etc/hosts", "/etc/hostname",
    "/var/lib/ganeti", "/var/lib/ganeti-vol", "/var/log/ganeti", "/srv", "/root/.ssh",
    "/run/ganeti", "/run/netns", "/usr/share/ganeti/os",
    *(p for p in HIDDEN if not p.startswith(("/etc/ganeti/", "/usr/share/ganeti/os/"))),
)
#: the smallest disk Ganeti's default instance policy allows is 1024 MiB: allow 1 MiB
IPOLICY_BOUNDS = (
    "min:disk-size=1,cpu-count=1,disk-count=1,memory-size=32,nic-count=0,spindle-use=1"
    "/max:disk-size=1048576,cpu-count=8,disk-count=16,memory-size=32768,nic-count=8,"
    "spindle-use=12"
)

# PID 1 of the namespaces: reaps orphans (the daemons), exits on SIGTERM/SIGINT/SIGHUP
# or on EOF on stdin; the kernel then kills whatever is left in the pid namespace.
_HOLDER = r"""
import os, signal, sys
def reap(*_):
    while True:
        try:
            pid, _st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
def leave(*_):
    os._exit(0)
signal.signal(signal.SIGCHLD, reap)
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, leave)
os.write(1, b"ready\n")
while os.read(0, 4096):
    pass
leave()
"""

# Run once inside the namespaces: the private file systems, the host name, the network.
_SETUP = r"""
set -eu
state=$1; shift
for d in "$@"; do
    n=$(echo "$d" | tr / _)
    mkdir -p "$state/overlay/$n.upper" "$state/overlay/$n.work"
    mount -t overlay overlay \
        -o "lowerdir=$d,upperdir=$state/overlay/$n.upper,workdir=$state/overlay/$n.work" "$d"
done
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mkdir -m 1777 /run/lock
mount -t sysfs sysfs /sys
hostname {node}
echo {node} > /etc/hostname
cat > /etc/hosts <<EOF
127.0.0.1 localhost
{node_ip} {node} {node_short}
{cluster_ip} {cluster} {cluster_short}
{instance_lines}
EOF
ip link set lo up
ip link add {veth} type veth peer name {peer}
ip link add {bridge} type bridge
ip link set {peer} master {bridge}
for l in {veth} {peer} {bridge}; do ip link set "$l" up; done
ip addr add {node_ip}/24 dev {veth}
mkdir -p /etc/ganeti /srv/ganeti/os /srv/ganeti/file-storage /srv/ganeti/export
printf '/srv/ganeti/file-storage\n/srv/ganeti/shared-file-storage\n' \
    > /etc/ganeti/file-storage-paths
mkdir -p -m 0700 /root/.ssh
ssh-keygen -A >/dev/null
""".format(
    node=NODE, node_short=NODE.split(".")[0], node_ip=NODE_IP,
    cluster=CLUSTER, cluster_short=CLUSTER.split(".")[0], cluster_ip=CLUSTER_IP,
    instance_lines="\n".join(f"10.77.1.{i} {n} {n.split('.')[0]}"
                             for i, n in enumerate(INSTANCE_NAMES, 1)),
    veth=VETH, peer=VETH_PEER, bridge=BRIDGE,
)


class ClusterError(RuntimeError):
    """The cluster could not be brought up, or a command in it failed."""


def missing_prerequisite() -> str | None:
    """Why a cluster cannot run here, or None: the reason a skip must give."""
    if os.geteuid() != 0:
        return "needs root (namespaces, mounts and Ganeti's daemons)"
    for tool in ("unshare", "nsenter", "ip", "mount"):
        if not _which(tool):
            return f"needs '{tool}' (util-linux/iproute2)"
    if not _which("gnt-cluster", "/usr/sbin:/usr/bin:/sbin:/bin"):
        return ("needs Ganeti: apt-get install --no-install-recommends ganeti "
                "(README command (b))")
    for ns in ("pid", "mnt", "uts", "net", "ipc"):
        if not os.path.exists(f"/proc/self/ns/{ns}"):
            return f"the kernel has no {ns} namespaces"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount", "--uts", "--net", "--ipc",
         "--propagation", "private", "--mount-proc", "true"],
        capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return "cannot create namespaces here: " + (probe.stderr.strip() or "unshare failed")
    return None


def _which(name: str, path: str | None = None) -> str | None:
    for d in (path or os.environ.get("PATH", "")).split(":"):
        p = os.path.join(d, name)
        if d and os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


@dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@dataclass
class GanetiCluster:
    """One cluster's life.  ``state_dir`` holds the overlays' upper layers and logs."""

    state_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    _unshare: subprocess.Popen | None = field(default=None, repr=False)
    _holder_pid: int | None = field(default=None, repr=False)
    _holder_fd: int | None = field(default=None, repr=False)  # a pidfd: signals hit it only
    _ns_ids: dict[str, str] = field(default_factory=dict, repr=False)
    _host_before: dict | None = field(default=None, repr=False)
    #: how install_ganeti_vol() installed ganeti-vol: "package", "checkout" or None
    installed_from: str | None = None
    #: what of ganeti-vol the node had just before install_ganeti_vol() (ganeti_vol_seen)
    seen_before_install: list[str] | None = None

    # -- life -----------------------------------------------------------------------------

    def start(self, *, init: bool = True) -> GanetiCluster:
        """Bring the cluster up; on any failure (Ctrl-C included) take it down and raise.
        ``init=False``: the node alone, its namespaces and file systems, no Ganeti."""
        self._host_before = host_snapshot()
        t0 = time.monotonic()
        try:
            self._start_holder()
            self._hide()
            self._own_dpkg_status()
            self.run(["sh", "-c", _SETUP, "setup", str(self.state_dir), *OVERLAYS])
            self.timings["namespaces"] = time.monotonic() - t0
            if init:
                self._init_cluster()
        except BaseException:
            self.stop()
            raise
        self.timings["bring_up"] = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Take everything down; safe to call twice and after a failed start."""
        t0 = time.monotonic()
        proc, self._unshare = self._unshare, None
        fd, self._holder_fd = self._holder_fd, None
        if fd is not None:
            try:
                signal.pidfd_send_signal(fd, signal.SIGTERM)
            except ProcessLookupError:
                pass
            os.close(fd)
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self._wait_namespaces_gone()
        self.timings["tear_down"] = time.monotonic() - t0

    def leftovers(self) -> list[str]:
        """What this cluster left on the host: processes in its namespaces, mounts that
        name its state dir, changes under the watched paths.  Empty after a clean stop."""
        found = [f"process {pid} still in namespace {ns}" for pid, ns in self._ns_members()]
        with open("/proc/self/mountinfo") as f:
            found += [f"mount left: {line.split()[4]}" for line in f
                      if str(self.state_dir) in line]
        if self._host_before is not None:
            found += snapshot_changes(self._host_before, host_snapshot())
        return found

    def _start_holder(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._unshare = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--uts", "--net",
             "--ipc", "--propagation", "private", "--mount-proc",
             sys.executable, "-c", _HOLDER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=NODE_ENV,
            start_new_session=True)  # Ctrl-C reaches pytest, whose teardown stops us
        line = self._unshare.stdout.readline()
        if line != b"ready\n":
            raise ClusterError("the namespace holder did not start (unshare failed?)")
        holder = _children(self._unshare.pid)
        if len(holder) != 1:
            raise ClusterError(f"unshare has {len(holder)} children, not the holder alone")
        self._holder_pid = holder[0]
        self._holder_fd = os.pidfd_open(self._holder_pid)
        for ns in ("pid", "mnt", "net", "uts", "ipc"):
            self._ns_ids[ns] = os.readlink(f"/proc/{self._holder_pid}/ns/{ns}")

    def _upper(self, top: str) -> Path:
        """The upper layer of the overlay on ``top`` (as _SETUP names it)."""
        return self.state_dir / "overlay" / (top.replace("/", "_") + ".upper")

    def upper_path(self, path: str) -> Path:
        """Where the node's own version of ``path`` lies: in the upper layer of its
        overlay, under ``state_dir``, never on the host."""
        top = next(t for t in OVERLAYS if path.startswith(t + "/"))
        return self._upper(top) / Path(path).relative_to(top)

    def _in_upper(self, path: str) -> Path:
        """upper_path(path) before the mounts, its parent directories made with the
        host's owners and modes."""
        top = next(t for t in OVERLAYS if path.startswith(t + "/"))
        upper = self._upper(top)
        upper.mkdir(parents=True, exist_ok=True)
        rel = Path(path).relative_to(top)
        for parent in reversed(rel.parents[:-1]):
            if not (upper / parent).exists():
                (upper / parent).mkdir()
                _copy_owner_and_mode(Path(top) / parent, upper / parent)
        return upper / rel

    def _hide(self) -> None:
        """Whiteouts for the ``HIDDEN`` paths in the overlays' upper layers (before the
        mounts: the kernel reads them then)."""
        for path in HIDDEN:
            os.mknod(self._in_upper(path), stat.S_IFCHR, os.makedev(0, 0))

    def _own_dpkg_status(self) -> None:
        """The node's own dpkg status file, in the upper layer: the host's as it is now,
        without a ganeti-vol entry.  The node's dpkg then knows ganeti-vol only once it
        installs it itself, whatever the host installs or removes meanwhile."""
        stanzas = Path(DPKG_STATUS).read_text(encoding="utf-8").split("\n\n")
        mine = self._in_upper(DPKG_STATUS)
        mine.write_text("\n\n".join(s for s in stanzas
                                    if not s.startswith(f"Package: {PACKAGE}\n")),
                        encoding="utf-8")
        _copy_owner_and_mode(Path(DPKG_STATUS), mine)

    def host_paths_seen(self) -> list[str]:
        """The ``HIDDEN`` paths through which the node sees the host's files: present both
        inside and on the host, and not written inside (what the node writes lands in an
        upper layer: a file or link, or a directory the overlay marks opaque)."""
        seen = []
        for path in self._existing(HIDDEN):
            upper = self.upper_path(path)
            if not os.path.lexists(path) or upper.is_symlink() or upper.is_file():
                continue
            if upper.is_dir() and _opaque(upper):
                continue
            seen.append(path)
        return seen

    def _existing(self, paths: tuple[str, ...]) -> list[str]:
        """Those of ``paths`` that exist inside (a dangling link counts)."""
        script = 'for p; do if [ -e "$p" ] || [ -L "$p" ]; then echo "$p"; fi; done'
        return self.run(["sh", "-c", script, "sh", *paths]).stdout.split()

    def _init_cluster(self) -> None:
        t0 = time.monotonic()
        self.run(["gnt-cluster", "init", "--enabled-hypervisors=fake",
                  "--enabled-disk-templates=file",
                  "--file-storage-dir=/srv/ganeti/file-storage",
                  f"--master-netdev={VETH}", "--master-netmask=24",
                  f"--nic-parameters=mode=bridged,link={BRIDGE}", "--no-etc-hosts",
                  f"--ipolicy-bounds-specs={IPOLICY_BOUNDS}", CLUSTER], timeout=180)
        self.timings["cluster_init"] = time.monotonic() - t0
        deadline = time.monotonic() + 60
        while True:
            r = self.run(["gnt-cluster", "getmaster"], check=False, timeout=30)
            if r.returncode == 0 and r.stdout.strip() == NODE:
                break
            if time.monotonic() > deadline:
                raise ClusterError(f"the master never answered: {r.output.strip()}")
            time.sleep(0.5)

    def pids(self) -> list[int]:
        """Every process in the cluster's namespaces now."""
        return [pid for pid, _ in self._ns_members()]

    def _ns_members(self) -> list[tuple[int, str]]:
        return namespace_members(set(self._ns_ids.values()))

    def _wait_namespaces_gone(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self._ns_ids and self._ns_members() and time.monotonic() < deadline:
            time.sleep(0.05)

    # -- commands -------------------------------------------------------------------------

    def run(self, argv: list[str], *, check: bool = True, input: str | bytes | None = None,
            env: dict[str, str] | None = None, timeout: float = 120,
            text: bool = True) -> Result:
        """Run ``argv`` inside the cluster's namespaces, as root, in ``/``."""
        if self._holder_pid is None:
            raise ClusterError("the cluster is not running")
        full = ["nsenter", f"--target={self._holder_pid}", "--pid", "--mount", "--uts",
                "--net", "--ipc", "--wd=/", "--", *argv]
        p = subprocess.run(full, input=input, capture_output=True, text=text,
                           stdin=subprocess.DEVNULL if input is None else None,
                           env=dict(NODE_ENV, **(env or {})), umask=0o022, timeout=timeout)
        r = Result(list(argv), p.returncode, p.stdout, p.stderr)
        if check and p.returncode != 0:
            raise ClusterError(f"{shlex.join(argv)} exited with {p.returncode}:\n"
                               f"{r.output.strip()}")
        return r

    def sh(self, script: str, **kw) -> Result:
        """Run a shell script inside the cluster's namespaces."""
        return self.run(["sh", "-c", script], **kw)

    def ganeti_vol(self, *args: str, **kw) -> Result:
        """Run the node's ganeti-vol inside the namespaces: the package's /usr/bin/ganeti-vol
        (the system python3), or this checkout's where install_ganeti_vol() had no package.
        It reads the node's /etc/ganeti-vol/ganeti-vol.conf, as on a real node."""
        if self.installed_from == "package":
            return self.run(["ganeti-vol", *args], **kw)
        env = dict(kw.pop("env", None) or {}, PYTHONPATH=str(REPO))
        return self.run([sys.executable, "-m", "ganeti_vol", *args], env=env, **kw)

    # -- ganeti-vol on the node (doc/ganeti-integration.md) ---------------------------------

    def ganeti_vol_seen(self) -> list[str]:
        """What of ganeti-vol the node has now: the ``HIDDEN`` paths that exist in it, and
        the package's state in the node's dpkg database unless it is unknown there."""
        seen = self._existing(HIDDEN)
        state = self.run(["dpkg-query", "-W", "-f", "${db:Status-Status}", PACKAGE],
                         check=False).stdout
        return seen + ([f"dpkg: {PACKAGE} {state}"] if state not in ("", "not-installed")
                       else [])

    def install_ganeti_vol(self, deb: Path | None) -> None:
        """ganeti-vol on the node, as doc/ganeti-integration.md says: the Debian package
        ``deb`` installed by the node's apt, or, without one, this checkout (`os install`
        of raw and image, `hooks install`, ganeti-vol-lz4 linked into /usr/bin); the node
        config; the hooks' EXPORT_DIR.  What the node had of ganeti-vol before goes into
        ``seen_before_install``."""
        self.seen_before_install = self.ganeti_vol_seen()
        self.run(["mkdir", "-p", "/etc/ganeti-vol"])
        self.run(["sh", "-c", "cat > /etc/ganeti-vol/ganeti-vol.conf"], input=NODE_CONFIG)
        if deb is not None:
            self.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                      "-o", "Dpkg::Options::=--force-confold", str(deb)],
                     env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=300)
            self.installed_from = "package"
            # the package's hook settings carry Debian's export directory, nothing to edit
            if self.run(["grep", "-qx", f"EXPORT_DIR={EXPORT_DIR}", HOOKS_CONF],
                        check=False).returncode:
                raise ClusterError(f"the package's {HOOKS_CONF} does not set "
                                   f"EXPORT_DIR={EXPORT_DIR}, Debian's export directory")
            return
        self.installed_from = "checkout"
        for name in ("raw", "image"):
            self.ganeti_vol("os", "install", name)
        self.ganeti_vol("hooks", "install")
        self.install_lz4_tool()

    @property
    def os_dir(self) -> str:
        """Where the node's raw and image are: the package's directory, or os install's."""
        return "/usr/share/ganeti/os" if self.installed_from == "package" else "/srv/ganeti/os"

    def install_lz4_tool(self) -> None:
        """ganeti-vol-lz4 the way doc/remote.md says for a pip install whose bin directory is
        not on Ganeti's PATH: the console script pip makes from setup.cfg's entry point (for
        this checkout, with the Python that runs this) in PREFIX/bin, linked into /usr/bin."""
        self.run(["mkdir", "-p", os.path.dirname(LZ4_TOOL_SCRIPT)])
        self.run(["sh", "-c", f"cat > {LZ4_TOOL_SCRIPT} && chmod 755 {LZ4_TOOL_SCRIPT}"],
                 input=console_script(LZ4_TOOL))
        self.run(["ln", "-s", LZ4_TOOL_SCRIPT, LZ4_TOOL_BIN])

    def enable_lz4_tool(self) -> None:
        """`gnt-cluster modify --compression-tools` with ganeti-vol-lz4 (doc/remote.md)."""
        self.run(["gnt-cluster", "modify", f"--compression-tools={COMPRESSION_TOOLS}"])

    def config(self) -> dict:
        """Ganeti's configuration (config.data), as it is now."""
        return json.loads(self.run(["cat", "/var/lib/ganeti/config.data"]).stdout)

    def timings_text(self) -> str:
        return ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items())

    def sha256(self, path: str) -> str:
        return self.run(["sha256sum", path]).stdout.split()[0]


def namespace_members(ids: set[str]) -> list[tuple[int, str]]:
    """(pid, namespace) of every process in one of the namespaces ``ids``, which are
    /proc/PID/ns links such as 'net:[4026532301]'."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        for ns in ("net", "mnt", "pid"):
            try:
                ident = os.readlink(f"/proc/{entry}/ns/{ns}")
            except OSError:
                break
            if ident in ids:
                members.append((int(entry), ident))
                break
    return members


def _opaque(directory: Path) -> bool:
    try:
        return os.getxattr(directory, "trusted.overlay.opaque") == b"y"
    except OSError:
        return False


def _copy_owner_and_mode(src: Path, dst: Path) -> None:
    try:
        st = src.stat()
    except FileNotFoundError:
        return
    os.chown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, stat.S_IMODE(st.st_mode))


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def wait_for_daemon(owner: int, comm: str, timeout: float) -> set[str]:
    """Wait until a process named ``comm`` runs in the cluster that process ``owner`` is
    bringing up; return that process's pid, mount and network namespaces."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for unshare in _children(owner):
            for holder in _children(unshare):
                try:
                    pid_ns = os.readlink(f"/proc/{holder}/ns/pid")
                except OSError:
                    continue
                for pid, _ in namespace_members({pid_ns}):
                    try:
                        if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                            return {os.readlink(f"/proc/{pid}/ns/{ns}")
                                    for ns in ("pid", "mnt", "net")}
                    except OSError:
                        pass
        time.sleep(0.1)
    raise ClusterError(f"no {comm} in a cluster of process {owner} after {timeout}s")


def snapshot_changes(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    """The paths that differ between two host snapshots."""
    return [f"host path changed: {path}" for path in sorted(set(before) | set(after))
            if before.get(path) != after.get(path)]


def host_snapshot() -> dict[str, tuple]:
    """(type, mode, owner, size, mtime, digest or link) of every entry under the watched
    host paths."""
    snap: dict[str, tuple] = {}

    def entry(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            snap[path] = ("link", os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            snap[path] = ("file", st.st_mode, st.st_uid, st.st_gid, st.st_size,
                          st.st_mtime_ns, _digest(path))
        else:
            snap[path] = ("other", st.st_mode, st.st_uid, st.st_gid)

    for top in WATCHED:
        entry(top)
        for root, dirs, files in os.walk(top):
            for name in dirs + files:
                entry(os.path.join(root, name))
    return snap


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str]) -> int:
    """Bring a cluster up (and hold it) and down by hand, with timings and leftovers."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--state-dir", help="default: a temporary directory")
    parser.add_argument("--hold", type=float, default=0,
                        help="seconds to keep it up (enter it: nsenter --target=PID --all)")
    args = parser.parse_args(argv)
    reason = missing_prerequisite()
    if reason:
        print(f"cannot run a cluster here: {reason}", file=sys.stderr)
        return 1

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    with tempfile.TemporaryDirectory(prefix="ganeti-cluster-") as tmp:
        cluster = GanetiCluster(Path(args.state_dir or tmp))
        try:
            cluster.start()
            print(cluster.run(["gnt-cluster", "getmaster"]).stdout.strip(), "is up; holder pid",
                  cluster._holder_pid, flush=True)
            time.sleep(args.hold)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        finally:
            cluster.stop()
        print("timings (s):", cluster.timings_text())
        print("leftovers:", "; ".join(cluster.leftovers()) or "none", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
