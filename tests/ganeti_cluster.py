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
- The node starts without ganeti-vol's configuration: ``/etc/ganeti/hooks`` and
  ``/etc/ganeti-vol`` do not exist inside, even where the host has them (from a package).
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
#: the host paths Ganeti and ganeti-vol would change on a real node: the leak
#: check compares them before and after a cluster's life
WATCHED = (
    "/etc/ganeti", "/etc/ganeti-vol", "/etc/ssh", "/etc/hosts", "/etc/hostname",
    "/var/lib/ganeti", "/var/lib/ganeti-vol", "/var/log/ganeti", "/srv", "/root/.ssh",
    "/run/ganeti", "/run/netns", "/usr/share/ganeti/os",
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
rm -rf /etc/ganeti/hooks /etc/ganeti-vol
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

    # -- life -----------------------------------------------------------------------------

    def start(self) -> GanetiCluster:
        """Bring the cluster up; on any failure (Ctrl-C included) take it down and raise."""
        self._host_before = host_snapshot()
        t0 = time.monotonic()
        try:
            self._start_holder()
            self.run(["sh", "-c", _SETUP, "setup", str(self.state_dir), *OVERLAYS])
            self.timings["namespaces"] = time.monotonic() - t0
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
        """Run this checkout's ganeti-vol inside the namespaces; it reads the node's
        /etc/ganeti-vol/ganeti-vol.conf, as on a real node."""
        repo = str(Path(__file__).resolve().parent.parent)
        env = dict(kw.pop("env", None) or {}, PYTHONPATH=repo)
        return self.run([sys.executable, "-m", "ganeti_vol", *args], env=env, **kw)

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
