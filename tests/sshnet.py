"""Hosts for the ssh tests: network namespaces joined by veth pairs, each server running
its own real OpenSSH ``sshd -D -f CONFIG`` on its own 10.x address.

* The *client* namespace holds only a network namespace; ``ssh`` runs in it
  through ``nsenter --net`` (so ``GANETI_VOL_SSH`` is ``nsenter ... ssh -F CONFIG``).
* Each *server* namespace has its own network and mount namespaces (a
  tmpfs mounted there, e.g. to fill a disk, is invisible to the host and
  vanishes with it); its sshd listens on 10.231.N.2:22, reached from the
  client's 10.231.N.1 over a veth pair.
* Host keys, the client's keys, ``known_hosts``, ``authorized_keys`` and the
  configs are generated in the test's directory.  Nothing leaves the machine.
* :meth:`SshNet.stop` kills every process in the namespaces (sshd, its
  sessions, servers, ssh clients) and waits until they are gone; the
  namespaces and their veth pairs go with the last process.  It runs on
  every path (the fixture's finalizer, and a failed start).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: what the far side runs: this worktree's ganeti-vol (not an installed one)
REMOTE_COMMAND = f"env PYTHONPATH={ROOT} {sys.executable} -m ganeti_vol"


def missing_prerequisite() -> str | None:
    for tool in ("unshare", "nsenter", "ip", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/usr/sbin/sshd").exists() or shutil.which("ssh") is None:
        return "OpenSSH (openssh-server, openssh-client) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    if probe.returncode:
        return "cannot create network namespaces here: " + probe.stderr.strip()
    return None


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30, **kw)


@dataclass
class Host:
    name: str
    address: str
    holder: subprocess.Popen
    dir: Path
    sshd: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.holder.pid

    def nsenter(self, *, mount: bool = False) -> list[str]:
        argv = ["nsenter", f"--net=/proc/{self.pid}/ns/net"]
        if mount:
            argv.append(f"--mount=/proc/{self.pid}/ns/mnt")
        return argv

    def sh(self, script: str) -> subprocess.CompletedProcess:
        """Run a shell script in this host's namespaces (as root)."""
        return _run([*self.nsenter(mount=True), "sh", "-c", script])


@dataclass
class SshNet:
    base: Path
    servers: int = 2
    client: Host | None = None
    hosts: list[Host] = field(default_factory=list)
    _ns: set[str] = field(default_factory=set)

    # -- start ---------------------------------------------------------------------------

    def start(self) -> SshNet:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _holder(self, name: str, mount: bool) -> Host:
        argv = ["unshare", "--net"] + (["--mount", "--propagation", "private"] if mount else [])
        proc = subprocess.Popen([*argv, "sleep", "infinity"], start_new_session=True)
        d = self.base / name
        d.mkdir(parents=True, exist_ok=True)
        host = Host(name, "", proc, d)
        for _ in range(100):  # until unshare has exec'd sleep in the new namespaces
            try:
                if os.readlink(f"/proc/{proc.pid}/ns/net") != os.readlink("/proc/self/ns/net"):
                    break
            except OSError:
                pass
            time.sleep(0.02)
        self._ns.add(os.readlink(f"/proc/{proc.pid}/ns/net"))
        if mount:
            self._ns.add(os.readlink(f"/proc/{proc.pid}/ns/mnt"))
        return host

    def _start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        self.client = self._holder("client", mount=False)
        _run([*self.client.nsenter(), "ip", "link", "set", "lo", "up"])
        keys = self.base / "keys"
        keys.mkdir(exist_ok=True)
        for name in ("id_ed25519", "restricted_ed25519", "stranger_ed25519"):
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                  str(keys / name)])
        known = []
        for n in range(1, self.servers + 1):
            host = self._holder(f"node{n + 1}", mount=True)
            host.address = f"10.231.{n}.2"
            self.hosts.append(host)
            _run([*self.client.nsenter(), "ip", "link", "add", f"gv{n}", "type", "veth",
                  "peer", "name", "eth0", "netns", str(host.pid)])
            _run([*self.client.nsenter(), "ip", "addr", "add", f"10.231.{n}.1/24", "dev",
                  f"gv{n}"])
            _run([*self.client.nsenter(), "ip", "link", "set", f"gv{n}", "up"])
            host.sh(f"ip link set lo up && ip addr add {host.address}/24 dev eth0 && "
                    "ip link set eth0 up")
            hostkey = host.dir / "ssh_host_ed25519_key"
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)])
            known.append(f"{host.address} {hostkey.with_suffix('.pub').read_text().strip()}")
            (host.dir / "authorized_keys").write_text(
                (keys / "id_ed25519.pub").read_text())
            (host.dir / "sshd_config").write_text(
                f"ListenAddress {host.address}:22\n"
                f"HostKey {hostkey}\n"
                f"PidFile {host.dir / 'sshd.pid'}\n"
                f"AuthorizedKeysFile {host.dir / 'authorized_keys'}\n"
                "StrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "PrintMotd no\nPrintLastLog no\nLogLevel ERROR\nMaxStartups 50\n"
                "MaxSessions 50\n")
            with open(host.dir / "sshd.log", "wb") as log:
                host.sshd = subprocess.Popen(
                    [*host.nsenter(mount=True), "/usr/sbin/sshd", "-D", "-e", "-f",
                     str(host.dir / "sshd_config")],
                    stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        (self.base / "known_hosts").write_text("\n".join(known) + "\n")
        self.write_config("ssh_config", keys / "id_ed25519")
        self.write_config("ssh_config_restricted", keys / "restricted_ed25519")
        self.write_config("ssh_config_stranger", keys / "stranger_ed25519")
        for host in self.hosts:
            self._wait_port(host)

    def write_config(self, name: str, identity: Path, extra: str = "") -> Path:
        aliases = "".join(f"Host {h.name}\n  HostName {h.address}\n" for h in self.hosts)
        path = self.base / name
        path.write_text(
            aliases
            + "Host *\n"
            f"  IdentityFile {identity}\n  IdentitiesOnly yes\n  User root\n"
            f"  UserKnownHostsFile {self.base / 'known_hosts'}\n"
            "  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n"
            "  BatchMode yes\n  ConnectTimeout 5\n  LogLevel ERROR\n"
            "  ServerAliveInterval 5\n  ServerAliveCountMax 2\n" + extra)
        return path

    def _wait_port(self, host: Host) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert host.sshd is not None
            if host.sshd.poll() is not None:
                raise RuntimeError(f"sshd on {host.name} exited: "
                                   + (host.dir / "sshd.log").read_text())
            probe = subprocess.run(
                [*self.client.nsenter(), "ssh", "-F", str(self.base / "ssh_config"),
                 host.name, "true"], capture_output=True, text=True, timeout=20)
            if probe.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"sshd on {host.name} does not answer: {probe.stderr}")

    # -- use -----------------------------------------------------------------------------

    def ssh_command(self, config: str = "ssh_config", *options: str) -> str:
        """GANETI_VOL_SSH: ssh from the client namespace with the test's config."""
        assert self.client is not None
        return shlex.join([*self.client.nsenter(), "ssh", "-F", str(self.base / config),
                           *options])

    def env(self, config: str = "ssh_config", *options: str) -> dict[str, str]:
        return {**os.environ, "GANETI_VOL_SSH": self.ssh_command(config, *options),
                "GANETI_VOL_REMOTE_COMMAND": REMOTE_COMMAND}

    def restrict_key(self, host: Host, command: str) -> None:
        """Authorize the restricted key on ``host`` with a forced command."""
        pub = (self.base / "keys" / "restricted_ed25519.pub").read_text().strip()
        with open(host.dir / "authorized_keys", "a") as f:
            f.write(f'command="{command}",restrict {pub}\n')

    def tx_bytes(self, n: int = 1) -> int:
        """Bytes the client sent on its link to server ``n`` (the veth counter)."""
        assert self.client is not None
        out = _run([*self.client.nsenter(), "ip", "-s", "-j", "link", "show", f"gv{n}"])
        return int(json.loads(out.stdout)[0]["stats64"]["tx"]["bytes"])

    def members(self) -> list[int]:
        """Every process in one of the namespaces."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            for ns in ("net", "mnt"):
                try:
                    if os.readlink(f"/proc/{entry}/ns/{ns}") in self._ns:
                        pids.append(int(entry))
                        break
                except OSError:
                    break
        return pids

    # -- stop ----------------------------------------------------------------------------

    def stop(self) -> None:
        procs = [h.sshd for h in self.hosts if h.sshd] + [h.holder for h in self.hosts]
        if self.client is not None:
            procs.append(self.client.holder)
        for _ in range(50):
            pids = self.members()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for p in procs:
                if p.poll() is None:
                    try:
                        p.wait(timeout=0.1)
                    except subprocess.TimeoutExpired:
                        pass
            time.sleep(0.05)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        left = self.members()
        if left:
            raise RuntimeError(f"processes left in the test namespaces: {left}")
