"""Repositories over ssh (issue 15 §1): real sshd in network namespaces (tests/sshnet.py),
real OpenSSH client, real repositories; links cut at random points, servers killed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from disk_helpers import needs_loop, xfs_mount
from sshnet import REMOTE_COMMAND, ROOT, SshNet, missing_prerequisite

from ganeti_vol.core import errors as E
from ganeti_vol.engine import codec, hashing
from ganeti_vol.remote import wire
from ganeti_vol.remote.ssh import Connection, SshRepository
from ganeti_vol.remote.sshcmd import parse
from ganeti_vol.repo import Repository
from ganeti_vol.repo import format as F

#: the repositories' chunk digest here: blake3 where installed, else sha256 (Debian)
HASH = F.default_digest()

pytestmark = pytest.mark.skipif(missing_prerequisite() is not None,
                                reason=str(missing_prerequisite()))

KIB, MIB = 1 << 10, 1 << 20
CS = 64 * KIB
CUTPROXY = Path(__file__).resolve().parent / "cutproxy.py"


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    n = SshNet(tmp_path_factory.mktemp("sshnet"), servers=2).start()
    try:
        yield n
    finally:
        n.stop()


def make_disk(path: Path, size: int = 4 * MIB, seed: int = 1) -> Path:
    """Random data (incompressible), text, zeros and a hole."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(rng.randbytes(size // 2))
        f.write(b"".join(b"line %d of the log\n" % i for i in range(size // 64)))
    return path


def poke(path: Path, offsets: list[int]) -> None:
    with open(path, "r+b") as f:
        for off in offsets:
            f.seek(off)
            f.write(os.urandom(100))


def cli(net: SshNet, node_dirs, *argv: str, config: str = "ssh_config",
        ssh_options: tuple[str, ...] = (), env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    environ = {**net.env(config, *ssh_options), "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "ganeti_vol", "--config",
                           str(node_dirs["conf"]), *argv], capture_output=True, text=True,
                          env=environ, timeout=timeout)


def export(net, node_dirs, disk: Path, spec: str, **kw) -> subprocess.CompletedProcess:
    return cli(net, node_dirs, "export", "--name", "web1", "--disk", str(disk), "--raw",
               "--repo", spec, "--progress", "none", "--json", **kw)


def one_line_error(res: subprocess.CompletedProcess, code: int) -> str:
    assert res.returncode == code, (res.returncode, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("ganeti-vol: error:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


def chunk_files(repo: Path) -> set[str]:
    return {p.name for p in (repo / "chunks").rglob("*") if p.is_file()}


def unique_data_chunks(disk: Path) -> set[str]:
    data = disk.read_bytes()
    out = set()
    for off in range(0, len(data), CS):
        piece = data[off:off + CS]
        if piece.count(0) != len(piece):
            out.add(hashing.chunk_hash(HASH, piece).hex())
    return out


@pytest.fixture
def repo(tmp_path) -> Path:
    Repository.init(str(tmp_path / "repo"), hash_algo=F.default_digest(), chunk_size=CS)
    return tmp_path / "repo"


def test_export_import_and_every_repo_verb_work_over_ssh_sending_only_missing_chunks(
        net, node_dirs, tmp_path, repo):
    disk = make_disk(tmp_path / "d0.img")
    spec = f"ssh://node2{repo}"
    before = net.tx_bytes(1)
    res = export(net, node_dirs, disk, spec)
    assert res.returncode == 0, res.stderr
    first = json.loads(res.stdout)["repository"]
    full_tx = net.tx_bytes(1) - before
    assert first["new_chunks"] == len(unique_data_chunks(disk)) == len(chunk_files(repo))

    poke(disk, [5 * CS + 7, 40 * CS + 100])  # two chunks change
    before = net.tx_bytes(1)
    res = export(net, node_dirs, disk, spec, env={})
    assert res.returncode == 0, res.stderr
    second = json.loads(res.stdout)["repository"]
    tx = net.tx_bytes(1) - before
    assert second["new_chunks"] == 2
    assert tx < full_tx / 5, (tx, full_tx)  # haves: only the two new chunks crossed

    res = cli(net, node_dirs, "repo", "list", spec, "--json")
    snaps = json.loads(res.stdout)["snapshots"]
    assert res.returncode == 0 and len(snaps) == 2
    res = cli(net, node_dirs, "repo", "info", f"{spec}::web1", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["id"] == snaps[-1]["id"]
    assert json.loads(res.stdout)["path"] == f"{spec}::{snaps[-1]['id']}"  # named as given
    res = cli(net, node_dirs, "repo", "diff", f"{spec}::{snaps[0]['id']}", snaps[1]["id"],
              "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["changed_bytes"] == 2 * CS

    out = tmp_path / "r0.img"
    res = cli(net, node_dirs, "import", "--name", "web1", "--disk",
              f"{out},size={disk.stat().st_size // MIB}M", "--raw", f"{spec}::web1", "--progress",
              "none")
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == disk.read_bytes()
    poke(out, [3 * CS])
    res = cli(net, node_dirs, "import", "--name", "web1", "--disk", str(out),
              f"{spec}::web1", "--into-existing", "--progress", "none", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["disks"][0]["written_chunks"] == 1
    assert out.read_bytes() == disk.read_bytes()

    res = cli(net, node_dirs, "repo", "check", spec, "--read-data", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["ok"], res.stdout
    res = cli(net, node_dirs, "repo", "prune", spec, "--keep-last", "1", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["removed"] == 1
    res = cli(net, node_dirs, "repo", "gc", spec, "--grace", "0", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["chunks_freed"] == 2  # the two replaced chunks
    res = cli(net, node_dirs, "repo", "check", str(repo), "--read-data", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["ok"]


@needs_loop
def test_a_change_map_over_ssh_reads_and_sends_only_the_rewritten_chunks(
        net, node_dirs, tmp_path, repo):
    """A disk on XFS with the reflink provider: the second export over ssh asks the server
    about the base's chunks in one batch, reads only the two rewritten chunks and sends
    only them; the snapshot restores to the disk."""
    conf = tmp_path / "reflink.conf"
    conf.write_text(node_dirs["conf"].read_text() + "snapshot_provider = reflink\n")
    with xfs_mount(tmp_path) as fs:
        disk = make_disk(fs / "d0.img")
        spec = f"ssh://node2{repo}"
        dirs = {**node_dirs, "conf": conf}
        res = export(net, dirs, disk, spec)
        assert res.returncode == 0, res.stderr
        first = json.loads(res.stdout)["disks"][0]
        assert first["unchanged_bytes"] == 0
        poke(disk, [5 * CS + 7, 40 * CS + 100])
        before = net.tx_bytes(1)
        res = export(net, dirs, disk, spec)
        assert res.returncode == 0, res.stderr
        tx = net.tx_bytes(1) - before
        out = json.loads(res.stdout)
        data_chunks = first["chunks"] - first["zero_chunks"]
        assert out["disks"][0]["unchanged_bytes"] == (data_chunks - 2) * CS
        assert out["repository"]["new_chunks"] == 2
        assert tx < 4 * CS + 256 * KIB, tx  # the two chunks (incompressible) and little else
        res = cli(net, dirs, "import", "--name", "web1", "--disk",
                  f"{tmp_path / 'r.img'},size={disk.stat().st_size // MIB}M", "--raw",
                  f"{spec}::{out['repository']['snapshot']}", "--progress", "none")
        assert res.returncode == 0, res.stderr
        assert (tmp_path / "r.img").read_bytes() == disk.read_bytes()
        for p in list(fs.iterdir()):
            p.unlink()


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_a_transfer_cut_at_a_random_point_is_resumed_by_rerunning_it_without_resending(
        net, node_dirs, tmp_path, repo, seed):
    """The link is dropped after a random number of bytes (a ProxyCommand that stops
    forwarding); the rerun completes and sends only the chunks not yet stored."""
    disk = make_disk(tmp_path / "d0.img", seed=seed)
    spec = f"ssh://node2{repo}"
    wanted = unique_data_chunks(disk)
    limit = random.Random(seed).randrange(4 * KIB, 3 * MIB)
    res = export(net, node_dirs, disk, spec, ssh_options=(
        "-o", f"ProxyCommand={sys.executable} {CUTPROXY} %h %p {limit}"))
    if res.returncode != 0:
        line = one_line_error(res, E.RemoteError.exit_code)
        assert "node2" in line
        assert os.listdir(repo / "snapshots") == []  # nothing half-published
    stored = chunk_files(repo)
    assert stored <= wanted
    res = export(net, node_dirs, disk, spec)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)["repository"]
    assert result["new_chunks"] == len(wanted - stored)  # stored chunks were not sent again
    assert chunk_files(repo) == wanted
    res = cli(net, node_dirs, "repo", "check", str(repo), "--read-data", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["ok"]
    assert [p for p in (repo / "tmp").iterdir()] == []  # the dead session's leftovers went


def _serve_pids(net: SshNet) -> list[int]:
    pids = []
    for pid in net.members():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in cmd and b"ganeti_vol" in cmd:
            pids.append(pid)
    return pids


@pytest.mark.parametrize("side", ["server", "client"])
def test_killing_either_side_mid_export_is_resumed_by_rerunning_it(net, node_dirs, tmp_path,
                                                                    repo, side):
    disk = make_disk(tmp_path / "d0.img", size=8 * MIB, seed=7)
    spec = f"ssh://node2{repo}"
    environ = {**net.env(), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "ganeti_vol", "--config",
                             str(node_dirs["conf"]), "export", "--name", "web1", "--disk",
                             str(disk), "--raw", "--repo", spec, "--progress", "none"],
                            env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while len(chunk_files(repo)) < 5 and time.monotonic() < deadline:
        time.sleep(0.005)
    if side == "server":
        for pid in _serve_pids(net):
            os.kill(pid, signal.SIGKILL)
    else:
        proc.kill()
    _, err = proc.communicate(timeout=60)
    if side == "server" and proc.returncode != 0:
        assert proc.returncode == E.RemoteError.exit_code, err
        assert "connection to node2 lost" in err and "Traceback" not in err
    deadline = time.monotonic() + 20
    while _serve_pids(net) and time.monotonic() < deadline:  # the orphaned server ends
        time.sleep(0.05)
    assert not _serve_pids(net)
    stored = chunk_files(repo)
    res = export(net, node_dirs, disk, spec)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["repository"]["new_chunks"] == len(
        unique_data_chunks(disk) - stored)
    # the killed client's private temp dirs are removed by the rerun
    assert [n for n in os.listdir(tempfile.gettempdir())
            if n.startswith((f"ganeti-vol-remote-{proc.pid}-",
                             f"ganeti-vol-stage-{proc.pid}-"))] == []
    # a killed server's private temp dir is removed by the next gc (as a killed local export's)
    assert cli(net, node_dirs, "repo", "gc", f"ssh://node2{repo}").returncode == 0
    assert list((repo / "tmp").iterdir()) == []


def test_a_restricted_append_only_key_adds_snapshots_but_cannot_delete_or_leave_its_path(
        net, node_dirs, tmp_path):
    allowed = tmp_path / "allowed"
    Repository.init(str(allowed / "repo"), chunk_size=CS)
    Repository.init(str(tmp_path / "other"), chunk_size=CS)
    host = net.hosts[1]  # node3: its own authorized_keys
    net.restrict_key(host, f"{REMOTE_COMMAND} repo serve --restrict-to-path {allowed} "
                           "--append-only")
    disk = make_disk(tmp_path / "d0.img", size=2 * MIB)
    spec = f"ssh://node3{allowed}/repo"
    r = dict(config="ssh_config_restricted")
    assert export(net, node_dirs, disk, spec, **r).returncode == 0
    poke(disk, [0])
    assert export(net, node_dirs, disk, spec, **r).returncode == 0
    res = cli(net, node_dirs, "repo", "list", spec, "--json", **r)
    assert res.returncode == 0 and len(json.loads(res.stdout)["snapshots"]) == 2
    assert cli(net, node_dirs, "repo", "check", spec, **r).returncode == 0
    chunks = chunk_files(allowed / "repo")
    for argv in (["repo", "prune", spec, "--keep-last", "1"],
                 ["repo", "gc", spec, "--grace", "0"],
                 ["repo", "remove", f"{spec}::web1"],
                 ["repo", "check", spec, "--read-data"]):
        line = one_line_error(cli(net, node_dirs, *argv, **r), E.RemoteRefused.exit_code)
        assert "append-only" in line
    assert len(os.listdir(allowed / "repo" / "snapshots")) == 2
    assert chunk_files(allowed / "repo") == chunks
    line = one_line_error(export(net, node_dirs, disk, f"ssh://node3{tmp_path}/other", **r),
                          E.RemoteRefused.exit_code)
    assert "outside the restricted path" in line
    # the key runs nothing but 'repo serve' (SSH_ORIGINAL_COMMAND is checked)
    res = subprocess.run([*net.ssh_command("ssh_config_restricted").split(), "node3",
                          "cat", "/etc/hostname"], capture_output=True, text=True, timeout=30)
    assert res.returncode == E.RemoteRefused.exit_code and "may only run" in res.stderr
    # the same key with its full rights still works for the path it names
    assert cli(net, node_dirs, "repo", "gc", spec).returncode == 0  # unrestricted key


def test_ssh_failures_are_one_line_errors_with_their_own_exit_codes(net, node_dirs, tmp_path,
                                                                    repo):
    disk = make_disk(tmp_path / "d0.img", size=2 * MIB)
    host = net.hosts[0]
    line = one_line_error(cli(net, node_dirs, "repo", "list", f"ssh://{host.address}:2222{repo}"),
                          E.HostUnreachable.exit_code)
    assert "cannot reach" in line and "refused" in line
    line = one_line_error(cli(net, node_dirs, "repo", "list", f"ssh://node2{repo}",
                              config="ssh_config_stranger"), E.AuthError.exit_code)
    assert "cannot log in to node2" in line and "Permission denied" in line
    old = "sh -c 'printf \"GANETI-VOL-REMOTE 99\\n\"; cat >/dev/null' x"
    line = one_line_error(cli(net, node_dirs, "repo", "list", f"ssh://node2{repo}",
                              env={"GANETI_VOL_REMOTE_COMMAND": old}),
                          E.ProtocolError.exit_code)
    assert "version mismatch" in line and "version 99" in line
    line = one_line_error(cli(net, node_dirs, "repo", "list", f"ssh://node2{repo}",
                              env={"GANETI_VOL_REMOTE_COMMAND": "echo"}),
                          E.ProtocolError.exit_code)
    assert "not a ganeti-vol server" in line
    line = one_line_error(cli(net, node_dirs, "repo", "list", f"ssh://node2{tmp_path}/nope"),
                          E.ArchiveError.exit_code)
    assert "not a repository" in line
    # a full disk on the server: a 1 MiB tmpfs in node2's own mount namespace
    small = tmp_path / "small"
    small.mkdir()
    host.sh(f"mount -t tmpfs -o size=1m tmpfs {small} && "
            f"{REMOTE_COMMAND} repo init {small}/repo --chunk-size 64K >/dev/null")
    line = one_line_error(export(net, node_dirs, disk, f"ssh://node2{small}/repo"),
                          E.NoSpaceError.exit_code)
    assert "no space left" in line
    assert host.sh(f"ls {small}/repo/snapshots").stdout == ""


def test_the_server_refuses_a_chunk_whose_frame_is_not_its_digest(net, tmp_path, repo,
                                                                   monkeypatch):
    """A client cannot poison the store: frames are verified on the server before stored."""
    for k, v in net.env().items():
        monkeypatch.setenv(k, v)
    good, evil = os.urandom(CS), os.urandom(CS)
    digest = hashing.chunk_hash(HASH, good)
    r = SshRepository(f"ssh://node2{repo}", write=True)
    try:
        with r.writer() as w:
            with pytest.raises(E.IntegrityError, match="refused chunk"):
                r.store(digest, codec.encode(evil), w.tmpdir)
            assert r.haves([digest]) == [None]
            assert r.store(digest, codec.encode(good), w.tmpdir) is True
            assert r.store(digest, codec.encode(good), w.tmpdir) is False  # never rewritten
            assert r.haves([digest, bytes(32)]) == [len(codec.encode(good)), None]
    finally:
        r.close()
    assert chunk_files(repo) == {digest.hex()}


def test_a_client_of_another_protocol_version_is_told_so(net, repo, monkeypatch):
    for k, v in net.env().items():
        monkeypatch.setenv(k, v)
    conn = Connection(parse(f"ssh://node2{repo}"), ["repo", "serve", str(repo)])
    try:
        with pytest.raises(E.ProtocolError, match="version mismatch.*speaks version 99"):
            conn.peer.call("hello", version=99, service="repo", path=str(repo))
    finally:
        conn.close()
    assert wire.VERSION == 1


def test_export_starts_ssh_before_loading_the_engine_and_a_failed_one_leaves_none(
        net, node_dirs, tmp_path, repo):
    """export --repo ssh://...: ssh comes up while the command imports the rest, and the
    repository session adopts that process; an export that fails before it opens the
    repository kills the one it started."""
    disk = make_disk(tmp_path / "d.img")
    spec = f"ssh://node2{repo}"
    res = cli(net, node_dirs, "--debug", "export", "--name", "web1", "--disk", str(disk),
              "--raw", f"--repo={spec}", "--progress", "none")
    assert res.returncode == 0, res.stderr
    assert "ssh to node2 was started early" in res.stderr
    # a repository the far side serves until its client goes: only a kill ends that session
    marker = tmp_path / f"repo-early-{os.getpid()}"
    Repository.init(str(marker), hash_algo=F.default_digest(), chunk_size=CS)
    res = cli(net, node_dirs, "export", "--name", "web1", "--disk", str(tmp_path / "none.img"),
              "--raw", "--repo", f"ssh://node2{marker}", "--progress", "none")
    assert res.returncode != 0 and "none.img" in res.stderr, res.stderr
    deadline = time.monotonic() + 10
    while (left := subprocess.run(["pgrep", "-f", marker.name], capture_output=True,
                                  text=True).stdout) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == "", left


def test_ssh_specs_parse_and_bad_ones_are_usage_errors():
    t = parse("ssh://backup@node2.example.com:2200/srv/repo")
    assert (t.user, t.host, t.port, t.path) == ("backup", "node2.example.com", 2200, "/srv/repo")
    assert parse("ssh://[fd00::2]/r").host == "fd00::2"
    assert parse("ssh://n/~/repo").path == "repo"
    for bad in ("ssh://node2", "ssh://node2/", "ssh://n:99999/r", "ssh:/x"):
        with pytest.raises(E.UsageError):
            parse(bad)


def test_repo_init_over_ssh_creates_the_repository_on_the_server_and_upgrade_stays_local(
        net, node_dirs, tmp_path):
    spec = f"ssh://node2{tmp_path}/new"
    res = cli(net, node_dirs, "repo", "init", spec, "--chunk-size", "64K", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert (info["path"], info["chunk_size"]) == (spec, CS)
    assert Repository.open(str(tmp_path / "new")).chunk_size == CS
    line = one_line_error(cli(net, node_dirs, "repo", "init", spec), E.UsageError.exit_code)
    assert "not empty" in line
    line = one_line_error(cli(net, node_dirs, "repo", "upgrade", spec), E.UsageError.exit_code)
    assert "runs on the host" in line
    assert not Path("ssh:").exists()  # nothing made locally under a name like the spec


def test_peak_rss_of_an_ssh_export_and_import_stays_bounded_on_both_sides(net, node_dirs,
                                                                          tmp_path):
    """4 MiB chunks, 8 stores in flight, 4 requests handled at once on the server: both
    sides stay far below the 200 MiB budget (measured: each side's own peak)."""
    import shlex

    import peak_rss

    Repository.init(str(tmp_path / "repo"), chunk_size=4 * MIB)
    disk = tmp_path / "d0.img"
    with open(disk, "wb") as f:
        for _ in range(12):
            f.write(os.urandom(4 * MIB))  # incompressible: every frame is a full chunk
    spec = f"ssh://node2{tmp_path}/repo"
    for step, argv in (
            ("export", ["export", "--name", "web1", "--disk", str(disk), "--raw", "--repo", spec,
                        "--progress", "none"]),
            ("import", ["import", "--name", "web1", "--disk", f"{tmp_path}/r.img,size=48M",
                        "--raw", f"{spec}::web1", "--progress", "none"])):
        server, client = tmp_path / f"{step}.server", tmp_path / f"{step}.client"
        remote = shlex.join(peak_rss.command(server, shlex.split(REMOTE_COMMAND)))
        environ = {**net.env(), "PYTHONPATH": str(ROOT), "GANETI_VOL_REMOTE_COMMAND": remote}
        res = subprocess.run(peak_rss.command(client, [
            sys.executable, "-m", "ganeti_vol", "--config", str(node_dirs["conf"]), *argv]),
            capture_output=True, text=True, env=environ, timeout=120)
        assert res.returncode == 0, res.stderr
        assert peak_rss.mib(client) < 200 and peak_rss.mib(server) < 200, (
            step, peak_rss.mib(client), peak_rss.mib(server))
    assert (tmp_path / "r.img").read_bytes() == disk.read_bytes()


def test_ctrl_c_of_an_ssh_export_exits_130_and_leaves_no_process_and_no_snapshot(
        net, node_dirs, tmp_path, repo):
    disk = make_disk(tmp_path / "d0.img", size=16 * MIB, seed=11)
    environ = {**net.env(), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "ganeti_vol", "--config",
                             str(node_dirs["conf"]), "export", "--name", "web1", "--disk",
                             str(disk), "--raw", "--repo", f"ssh://node2{repo}", "--progress",
                             "none"], env=environ, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(chunk_files(repo)) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    # 3 of 256 chunks stored when the signal goes: the export cannot have finished
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    deadline = time.monotonic() + 20
    while (_serve_pids(net) or _ssh_clients(net)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _serve_pids(net) and not _ssh_clients(net)
    assert os.listdir(repo / "snapshots") == []
    assert list((repo / "tmp").iterdir()) == []  # the server ended cleanly: its temp dir went


def _ssh_clients(net: SshNet) -> list[int]:
    out = []
    for pid in net.members():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "ssh":
                out.append(pid)
        except OSError:
            pass
    return out
