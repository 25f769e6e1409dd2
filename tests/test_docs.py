"""The documentation runs as written: every ``sh`` block of the operator docs and of the
OS definitions' READMEs, in order, in an empty directory of a node whose config lives in
a temporary directory; ``ini`` examples are valid, and the instance file examples that
name their file are saved under that name for the blocks after them.  The quickstart's
stream between two nodes goes through a real sshd on 127.0.0.1 (node2, with its own
node config and login directory).

A block that cannot run here is preceded by ``<!-- doc-test: not run: REASON -->``."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ganeti_vol.core import constants as C
from ganeti_vol.ganeti import config as cfgmod

REPO = Path(__file__).resolve().parent.parent
NOT_RUN = re.compile(r"<!--\s*doc-test:\s*not run:\s*(\S.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    lang: str
    text: str
    line: int
    not_run: str | None  # the reason, when marked


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with the not-run mark before each, if any."""
    out, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        before = [x for x in lines[:start] if x.strip()][-1:] or [""]
        mark = NOT_RUN.search(before[0])
        out.append(Block(match.group(1), "\n".join(body) + "\n", start + 1,
                         mark.group(1) if mark else None))
        i += 1
    return out


def shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


# --- a node (and a second one behind sshd) in a temporary directory ------------------------


def write_node_config(top: Path, search_path: list[Path]) -> Path:
    """A node config whose directories are under ``top`` (the first OS dir not created:
    a fresh node has none until 'os install' makes it)."""
    dirs = {k: top / k for k in ("hooks", "log", "export", "state")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    conf = top / "ganeti-vol.conf"
    cfgmod.write_node_config(str(conf), {
        "os_search_path": [str(p) for p in search_path],
        "hooks_dir": str(dirs["hooks"]), "log_dir": str(dirs["log"]),
        "export_dir": str(dirs["export"]), "state_dir": str(dirs["state"]),
    })
    return conf


@dataclass
class Node:
    work: Path
    env: dict[str, str]

    def run(self, block: Block, source: Path) -> None:
        if block.not_run:
            return
        proc = subprocess.run(["bash", "--noprofile", "--norc", "-e", "-o", "pipefail", "-c",
                               block.text], cwd=self.work, env=self.env, capture_output=True,
                              text=True, timeout=600, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, (
            f"{shown(source)}:{block.line}: the block exits {proc.returncode}\n"
            f"{block.text}--- stdout:\n{proc.stdout[-4000:]}--- stderr:\n{proc.stderr[-4000:]}")


def bin_dir(top: Path) -> Path:
    """``ganeti-vol`` for the blocks: this interpreter's, with the code under test."""
    top.mkdir(parents=True, exist_ok=True)
    script = top / "ganeti-vol"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ganeti_vol "$@"\n')
    script.chmod(0o755)
    return top


def node_env(tmp_path: Path, conf: Path, bindir: Path) -> dict[str, str]:
    env = {"PATH": f"{bindir}:{C.SCRIPT_PATH}", "HOME": str(tmp_path / "home"),
           "TMPDIR": str(tmp_path / "tmp"), "LC_ALL": "C.UTF-8",
           "GANETI_VOL_CONFIG": str(conf)}
    if os.environ.get("PYTHONPATH"):  # a checkout run without installing it
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    for d in ("home", "tmp"):
        (tmp_path / d).mkdir(exist_ok=True)
    return env


@pytest.fixture
def node(tmp_path) -> Node:
    conf = write_node_config(tmp_path / "node", [tmp_path / "node" / "os",
                                                 REPO / "os-definitions"])
    work = tmp_path / "work"
    work.mkdir()
    return Node(work, node_env(tmp_path, conf, bin_dir(tmp_path / "bin")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def node2(tmp_path, node):
    """A second node behind a real sshd on 127.0.0.1: 'ssh node2 CMD' runs CMD in its login
    directory with its own node config.  ``ssh`` on the blocks' PATH is the real client with
    a config file naming node2 (OpenSSH reads ~/.ssh from the passwd entry, not $HOME)."""
    sshd = shutil.which("sshd", path="/usr/sbin:/sbin")
    if os.geteuid() != 0 or not sshd or not shutil.which("ssh"):
        pytest.skip("needs root and OpenSSH (openssh-server, openssh-client) for the "
                    "quickstart's stream to a second node")
    top = tmp_path / "node2"
    conf = write_node_config(top, [REPO / "os-definitions"])
    login = top / "login"
    login.mkdir()
    ssh = tmp_path / "ssh"
    ssh.mkdir(mode=0o700)
    for key in ("host", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / key)],
                       check=True, capture_output=True)
    shutil.copy(ssh / "id.pub", ssh / "authorized_keys")
    (ssh / "known_hosts").write_text("node2 " + (ssh / "host.pub").read_text())
    port = free_port()
    env2 = node_env(tmp_path, conf, bin_dir(tmp_path / "bin"))
    setenv = " ".join(f"{k}={v}" for k, v in env2.items() if k in ("PATH", "GANETI_VOL_CONFIG",
                                                                      "PYTHONPATH", "LC_ALL"))
    (ssh / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {ssh / 'host'}\n"
        f"AuthorizedKeysFile {ssh / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\nPidFile none\nLogLevel ERROR\n"
        f"SetEnv {setenv}\n"
        f"ForceCommand cd {login} && exec /bin/sh -c \"$SSH_ORIGINAL_COMMAND\"\n")
    (ssh / "config").write_text(
        f"Host node2\n  HostName 127.0.0.1\n  Port {port}\n  User root\n"
        f"  IdentityFile {ssh / 'id'}\n  IdentitiesOnly yes\n  HostKeyAlias node2\n"
        f"  UserKnownHostsFile {ssh / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
        "  BatchMode yes\n  LogLevel ERROR\n")
    wrapper = tmp_path / "bin" / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F "{ssh / "config"}" "$@"\n')
    wrapper.chmod(0o755)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(ssh / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"sshd exited: {proc.stderr.read()}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "sshd does not listen"
                time.sleep(0.05)
        yield login
    finally:
        proc.terminate()
        proc.wait(30)
        proc.stderr.close()


def run_document(path: Path, node: Node) -> int:
    """Check the ini blocks, save the named instance files, run the sh blocks; returns
    how many sh blocks ran."""
    ran = 0
    for block in blocks(path):
        if block.lang == "ini":
            check_ini(block, path, node.work)
        elif block.lang in ("sh", "bash", "shell", "console"):
            assert block.lang == "sh", f"{path}:{block.line}: shell blocks are ```sh"
            node.run(block, path)
            ran += not block.not_run
    return ran


def check_ini(block: Block, path: Path, work: Path) -> None:
    """An ini example is valid (an instance file, or a node config); one whose first
    line names a file '# NAME.ini' is saved as work/NAME.ini."""
    first = block.text.splitlines()[0]
    named = re.match(r"#\s*([\w.-]+\.ini)\b", first)
    target = work / named.group(1) if named else work.parent / "example.ini"
    target.write_text(block.text)
    try:
        if "[instance]" in block.text:
            cfgmod.load_instance(str(target), size_optional=True)
        else:
            cfgmod.load_node_config(str(target))
    except Exception as err:  # the message names the bad keys
        raise AssertionError(f"{shown(path)}:{block.line}: invalid example: {err}")
    finally:
        if not named:
            target.unlink()


# --- the documents ---------------------------------------------------------------------------


def test_quickstart_runs_as_written_including_the_stream_to_a_second_node(node, node2):
    """Install check, the node config, OS definitions (os install on a fresh node), an
    instance's scripts, export and import, the stream over ssh, and backup."""
    ran = run_document(REPO / "doc" / "quickstart.md", node)
    assert ran >= 6
    assert (node2 / "web1-disk0.img").read_bytes() == (node.work / "web1-disk0.img").read_bytes()
    assert (node.work.parent / "node" / "os" / "raw" / "ganeti-vol.python").is_file()


def test_instance_file_doc_runs_as_written(node):
    """The commented example is a valid instance file its OS accepts, and the commands
    after it (and the one from flags) run."""
    assert run_document(REPO / "doc" / "instance-file.md", node) == 2
    assert (node.work / "web1-disk0.img").stat().st_size == 1 << 30
    assert (node.work / "web3-0.img").is_file()


@pytest.mark.parametrize("name", ["raw", "image"])
def test_shipped_os_readme_runs_as_written(node, name):
    """In the directory holding a copy of the shipped OS, as its README says."""
    defs = node.work / "defs"
    shutil.copytree(REPO / "os-definitions" / name, defs / name)
    node.work = defs
    assert run_document(defs / name / "README.md", node) == 1
    assert (node.work.parent.parent / "node" / "os" / name / "ganeti-vol.python").is_file()


@pytest.mark.parametrize("template", ["image-sh"])
def test_scaffold_readme_runs_as_written(node, template):
    """The README of a new image-sh OS definition (its own README template) runs too."""
    defs = node.work / "defs"
    defs.mkdir()
    subprocess.run(["ganeti-vol", "os", "new", "mine", "--template", template, "--dir", str(defs)],
                   check=True, env=node.env, capture_output=True, timeout=120)
    node.work = defs
    assert run_document(defs / "mine" / "README.md", node) == 1
