"""``ganeti-vol move INSTANCE_FILE ssh://node2/INSTANCE_FILE`` (issue 15 §2): real sshd in
network namespaces (tests/sshnet.py), real disks; links cut at random points."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from sshnet import REMOTE_COMMAND, ROOT, SshNet, missing_prerequisite

from ganeti_vol.core import errors as E
from ganeti_vol.engine import codec
from ganeti_vol.ganeti import config as cfgmod
from ganeti_vol.ops import opstate
from ganeti_vol.remote import wire
from ganeti_vol.remote.move import CHUNK_SIZE
from ganeti_vol.remote.ssh import Connection
from ganeti_vol.remote.sshcmd import parse
from ganeti_vol.repo import format as F

#: the repositories' chunk digest here: blake3 where installed, else sha256 (Debian)
HASH = F.default_digest()

pytestmark = pytest.mark.skipif(missing_prerequisite() is not None,
                                reason=str(missing_prerequisite()))

MIB = 1 << 20
CUTPROXY = Path(__file__).resolve().parent / "cutproxy.py"


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    n = SshNet(tmp_path_factory.mktemp("sshnet"), servers=1).start()
    try:
        yield n
    finally:
        n.stop()


class Nodes:
    """The source node (this process's node config) and node2 (its own node config)."""

    def __init__(self, net: SshNet, node_dirs, tmp_path: Path, size: int = 12 * MIB) -> None:
        self.net, self.tmp = net, tmp_path
        self.src_conf = node_dirs["conf"]
        dst = tmp_path / "node2"
        for d in ("state", "log", "os", "hooks", "export"):
            (dst / d).mkdir(parents=True)
        self.dst_state = dst / "state"
        self.dst_conf = dst / "ganeti-vol.conf"
        cfgmod.write_node_config(str(self.dst_conf), {
            "os_search_path": [str(dst / "os")], "hooks_dir": str(dst / "hooks"),
            "log_dir": str(dst / "log"), "export_dir": str(dst / "export"),
            "state_dir": str(self.dst_state)})
        self.src_disk, self.dst_disk = tmp_path / "src.img", tmp_path / "dst.img"
        rng = random.Random(5)
        with open(self.src_disk, "wb") as f:
            f.truncate(size)
            f.write(rng.randbytes(size // 3))
            f.seek(size // 2)
            f.write(b"".join(b"row %d\n" % i for i in range(size // 32)))
        with open(self.dst_disk, "wb") as f:
            f.truncate(size)  # a fresh (empty) disk, as Ganeti creates before an import
        self.src_file, self.dst_file = tmp_path / "src.ini", tmp_path / "dst.ini"
        for ini, disk in ((self.src_file, self.src_disk), (self.dst_file, self.dst_disk)):
            ini.write_text(f"[instance]\nname = web1\n[disks]\n[[0]]\npath = {disk}\n"
                           f"size = {size // MIB}M\n")

    def move(self, *ssh_options: str) -> subprocess.CompletedProcess:
        env = {**self.net.env("ssh_config", *ssh_options), "PYTHONPATH": str(ROOT),
               "GANETI_VOL_REMOTE_COMMAND": f"{REMOTE_COMMAND} --config {self.dst_conf}"}
        return subprocess.run(
            [sys.executable, "-m", "ganeti_vol", "--config", str(self.src_conf), "move",
             str(self.src_file), f"ssh://node2{self.dst_file}", "--json"],
            capture_output=True, text=True, env=env, timeout=120)

    def poke(self, offsets: list[int]) -> None:
        with open(self.src_disk, "r+b") as f:
            for off in offsets:
                f.seek(off)
                f.write(os.urandom(1000))

    def same(self) -> bool:
        return self.src_disk.read_bytes() == self.dst_disk.read_bytes()


def test_a_move_sends_every_chunk_once_then_only_the_chunks_that_differ(net, node_dirs,
                                                                       tmp_path):
    nodes = Nodes(net, node_dirs, tmp_path)
    before = net.tx_bytes(1)
    res = nodes.move()
    assert res.returncode == 0, res.stderr
    first = json.loads(res.stdout)
    full_tx = net.tx_bytes(1) - before
    assert nodes.same()
    assert first["sent_chunks"] == first["disks"][0]["written_chunks"] > 0
    assert opstate.read_mark(str(nodes.dst_state), "web1") is None  # not broken

    nodes.poke([MIB + 10, 7 * MIB + 500, 7 * MIB + 9000])  # two 1 MiB chunks change
    before = net.tx_bytes(1)
    res = nodes.move()
    assert res.returncode == 0, res.stderr
    second = json.loads(res.stdout)
    tx = net.tx_bytes(1) - before
    assert nodes.same()
    assert second["sent_chunks"] == 2 and second["disks"][0]["written_chunks"] == 2
    assert tx < 2 * CHUNK_SIZE + 64 * 1024 < full_tx / 2, (tx, full_tx)

    res = nodes.move()  # nothing differs: nothing is sent, nothing written
    assert res.returncode == 0 and json.loads(res.stdout)["sent_chunks"] == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_move_cut_at_a_random_point_leaves_the_destination_broken_until_a_rerun_completes(
        net, node_dirs, tmp_path, seed):
    nodes = Nodes(net, node_dirs, tmp_path)
    limit = random.Random(seed).randrange(2048, 4 * MIB)
    res = nodes.move("-o", f"ProxyCommand={sys.executable} {CUTPROXY} %h %p {limit}")
    if res.returncode != 0:
        assert res.returncode == E.RemoteError.exit_code, res.stderr
        assert "Traceback" not in res.stderr and "node2" in res.stderr
        mark = opstate.read_mark(str(nodes.dst_state), "web1")
        if mark is not None:  # the cut came after the destination began writing
            assert mark["op"] == "import"
    res = nodes.move()
    assert res.returncode == 0, res.stderr
    assert nodes.same()
    assert opstate.read_mark(str(nodes.dst_state), "web1") is None


def test_the_destination_verifies_each_chunk_before_writing_it(net, node_dirs, tmp_path,
                                                               monkeypatch):
    """A source that answers with the wrong data (here: a test peer speaking the real
    protocol) fails the move; the destination's disk keeps its old bytes."""
    nodes = Nodes(net, node_dirs, tmp_path, size=2 * MIB)
    for k, v in net.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("GANETI_VOL_REMOTE_COMMAND", f"{REMOTE_COMMAND} --config "
                                                    f"{nodes.dst_conf}")
    data = nodes.src_disk.read_bytes()
    import io

    from ganeti_vol.engine import hashing

    buf = io.BytesIO()
    w = F.IndexWriter(buf, HASH, CHUNK_SIZE)
    dd = hashing.DiskDigest(HASH, CHUNK_SIZE)
    for off in range(0, len(data), CHUNK_SIZE):
        piece = data[off:off + CHUNK_SIZE]
        d = hashing.chunk_hash(HASH, piece)
        w.add(False, 0, d)
        dd.update(d)
    w.finish(len(data))

    def evil(req, blob):
        return {}, codec.encode(os.urandom(CHUNK_SIZE))

    before = nodes.dst_disk.read_bytes()
    conn = Connection(parse(f"ssh://node2{nodes.dst_file}"), ["move", "--receive",
                                                               str(nodes.dst_file)],
                      handler=evil)
    try:
        conn.peer.call("hello", version=wire.VERSION, service="move", instance="web1")
        conn.peer.call("index", buf.getvalue(), index=0, size=len(data),
                       chunk_size=CHUNK_SIZE, hash=HASH, digest=dd.finish(len(data)))
        with pytest.raises(E.IntegrityError, match="hash mismatch"):
            conn.peer.call("move", source="an evil source")
    finally:
        conn.close()
    assert nodes.dst_disk.read_bytes() == before
    assert opstate.read_mark(str(nodes.dst_state), "web1")["state"] == opstate.FAILED
