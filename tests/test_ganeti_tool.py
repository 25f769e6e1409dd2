"""``ganeti-vol-lz4``, the compression tool for Ganeti's import/export daemon (issue 15 §4).

The tool is run as Ganeti runs it: a console script made from setup.cfg's
entry point, found on Ganeti's fixed PATH, inside the shell pipelines that
Ganeti 3.0's own ``impexpd.CommandBuilder`` builds (``tests/ganeti_impexp.py``
asks Debian's ganeti-3.0 for them), over socat with TLS on loopback, moving a
real sparse image between two file "disks" with ``dd iflag/oflag=direct``.
Corruption is injected by a TLS relay that holds the cluster certificate, as
a broken router or a bad NIC would, outside what TLS itself protects.
Where Ganeti's modules do not import, those tests are skipped with the reason.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import peak_rss
import pytest
from conftest import write_script
from test_ganeti_fidelity import _REFERENCE_ENV, _ganeti_dir
from test_streams import make_image

from ganeti_vol.core import errors as E
from ganeti_vol.formats import lz4tool as T

MIB = 1 << 20
CS = T.CHUNK_SIZE
TOOL = "ganeti-vol-lz4"
REPO = Path(__file__).resolve().parent.parent
IMPEXP = Path(__file__).resolve().parent / "ganeti_impexp.py"
#: the only PATH Ganeti gives the import/export daemon's pipelines
GANETI_PATH = "/sbin:/bin:/usr/sbin:/usr/bin"
HEADER, RECORD = 20, 40
#: what an untouched target disk holds (the tests check nothing else was written)
UNTOUCHED = 0x5A


def _entry_point() -> tuple[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    for line in cfg["options.entry_points"]["console_scripts"].splitlines():
        name, _, target = line.partition("=")
        if name.strip() == TOOL:
            module, _, func = target.strip().partition(":")
            return module, func
    raise AssertionError(f"setup.cfg declares no {TOOL} console script")


@pytest.fixture(scope="module")
def tool_dir(tmp_path_factory) -> Path:
    """A directory holding ganeti-vol-lz4 as pip writes it from setup.cfg's entry point.

    (Ganeti's pipelines get this directory before their fixed PATH: the
    tests do not install into /usr/bin.)
    """
    module, func = _entry_point()
    bindir = tmp_path_factory.mktemp("bin")
    write_script(bindir / TOOL, f"""\
        #!{sys.executable}
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from {module} import {func}
        sys.exit({func}())
        """)
    return bindir


def _env(tool_dir: Path) -> dict[str, str]:
    return {"PATH": f"{tool_dir}:{GANETI_PATH}", "LC_ALL": "C"}


def tool(tool_dir: Path, *args: str, data: bytes | None = None, stdin=None,
         stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([TOOL, *args], input=data, stdin=stdin, stdout=stdout,
                          stderr=subprocess.PIPE, env=_env(tool_dir), timeout=120)


def error_line(stderr: bytes | str) -> str:
    """The one line the tool printed (and nothing else from it)."""
    text = stderr.decode() if isinstance(stderr, bytes) else stderr
    lines = [line for line in text.splitlines() if line.startswith(f"{TOOL}:")]
    assert len(lines) == 1, text
    assert lines[0].startswith(f"{TOOL}: error: "), text
    return lines[0]


def image(path: Path) -> Path:
    """A sparse test disk: 4 data chunks (text, random, a short tail), 2 zero chunks.

    Chunk 2 is written zeros, chunk 3 a hole.
    """
    return make_image(path, 5 * CS + 12345, extents=[
        (0, 3 * MIB, "text"), (3 * MIB, 2 * MIB, "random"), (8 * MIB, 4 * MIB, "zero"),
        (16 * MIB + 100, MIB, "random"), (20 * MIB, 12345, "text")])


def records(stream: bytes) -> list[tuple[int, int, int, int]]:
    """(type, start, payload start, end) of every record, read as doc/remote.md lays them out."""
    out, pos = [], HEADER
    while pos < len(stream):
        _, rtype, _, plen = struct.unpack_from("<2sBBI", stream, pos)
        out.append((rtype, pos, pos + RECORD, pos + RECORD + plen))
        pos += RECORD + plen
    return out


# --- the tool on its own ---------------------------------------------------------------


def test_help_exits_0_without_loading_the_engine(tool_dir):
    """Ganeti runs `TOOL -h` before every transfer and kills it after 2 s: it answers from
    the option parser alone (the engine, lz4 and the thread pool are not even imported)."""
    res = tool(tool_dir, "-h")
    assert res.returncode == 0, res.stderr
    assert b"usage: ganeti-vol-lz4" in res.stdout and not res.stderr
    probe = ("import sys; from ganeti_vol.cli.lz4tool import main\n"
             "assert main(['-h']) == 0\n"
             "print(sorted(m for m in sys.modules if m.startswith(('lz4', 'ganeti_vol.engine.parallel',"
             " 'ganeti_vol.formats.lz4tool', 'concurrent'))), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stderr.strip() == "[]"


def test_round_trip_of_a_sparse_image_from_a_pipe_and_from_the_file(tool_dir, tmp_path):
    """Through a pipe (as in Ganeti's pipelines) zero chunks are found by content, from the
    file by its hole map too: either way they travel without payload, and both streams
    decompress to the exact bytes."""
    src = image(tmp_path / "disk.img")
    data = src.read_bytes()
    piped = tool(tool_dir, data=data)
    with open(src, "rb") as f:
        direct = tool(tool_dir, stdin=f)
    for made in (piped, direct):
        assert made.returncode == 0, made.stderr
        back = tool(tool_dir, "-d", data=made.stdout)
        assert back.returncode == 0, back.stderr
        assert back.stdout == data
        kinds = [(rtype, end - start - RECORD) for rtype, start, _, end in records(made.stdout)]
        assert [rtype for rtype, _ in kinds] == [T.CHUNK] * 6 + [T.END]
        assert [n for _, n in kinds[2:4]] == [0, 0]  # the two zero chunks carry no payload


@pytest.mark.parametrize("size", [CS, 16 * CS - 1])
def test_zero_chunks_cost_a_record_header_each(tool_dir, tmp_path, size):
    zeros = bytes(size)
    res = tool(tool_dir, data=zeros)
    assert res.returncode == 0, res.stderr
    chunks = -(-size // CS)
    end = records(res.stdout)[-1]
    assert len(res.stdout) == HEADER + chunks * RECORD + (end[3] - end[1])
    assert end[3] - end[1] < 200
    assert tool(tool_dir, "-d", data=res.stdout).stdout == zeros


def test_empty_input_round_trips(tool_dir):
    res = tool(tool_dir, data=b"")
    assert res.returncode == 0, res.stderr
    assert [r[0] for r in records(res.stdout)] == [T.END]
    back = tool(tool_dir, "-d", data=res.stdout)
    assert (back.returncode, back.stdout) == (0, b"")


def _made_by(argv: list[str], data: bytes) -> bytes:
    return subprocess.run(argv, input=data, capture_output=True, check=True).stdout


@pytest.mark.parametrize("kind, hint", [
    ("gzip", "gzip data"), ("lz4", "an lz4 frame"), ("raw", "it starts with"),
    ("ganeti", "an uncompressed Ganeti transfer"), ("empty", "empty input"),
])
def test_decompress_refuses_other_streams_and_writes_nothing(tool_dir, kind, hint):
    """A sender that compressed with another tool, or not at all, is refused at once."""
    data = b"Nov 25 12:00:00 node1 kernel: hello\n" * 1000
    stream = {"gzip": lambda: _made_by(["gzip", "-1", "-c"], data),
              "lz4": lambda: _made_by(["lz4", "-1", "-c"], data),
              "raw": lambda: data, "ganeti": lambda: b"M=" + b"a" * 40 + data,
              "empty": lambda: b""}[kind]()
    res = tool(tool_dir, "-d", data=stream)
    assert res.returncode == E.ArchiveError.exit_code
    assert res.stdout == b""
    line = error_line(res.stderr)
    assert "not a ganeti-vol-lz4 stream" in line and hint in line


@pytest.mark.parametrize("args, problem", [
    (["-x"], "unknown option '-x'"), (["-T", "many"], "-T takes a number"),
    (["-d", "--fast"], "unknown option '--fast'"),
])
def test_bad_options_are_one_line_usage_errors(tool_dir, args, problem):
    res = tool(tool_dir, *args, data=b"")
    assert res.returncode == E.UsageError.exit_code
    assert problem in error_line(res.stderr)


def test_refuses_to_write_compressed_data_to_a_terminal(tool_dir):
    master, slave = os.openpty()
    try:
        res = tool(tool_dir, data=b"x", stdout=slave)
    finally:
        os.close(slave)
        os.close(master)
    assert res.returncode == E.UsageError.exit_code
    assert "terminal" in error_line(res.stderr)


def test_peak_rss_stays_bounded_on_both_sides(tool_dir, tmp_path):
    """256 MiB of incompressible data through `tool | tool -d`: neither side holds more
    than its chunks in flight (peak RSS far below the 200 MiB budget, and below the data)."""
    block = random.Random(5).randbytes(MIB + 1)
    src = tmp_path / "random.bin"
    with open(src, "wb") as f:
        for i in range(256):
            f.write(block[i % 7:MIB + i % 7])
    env = _env(tool_dir)
    rss = [tmp_path / "compress.rss", tmp_path / "decompress.rss"]
    with open(src, "rb") as fin, open(os.devnull, "wb") as fout:
        comp = subprocess.Popen(peak_rss.command(rss[0], [TOOL]), stdin=fin,
                                stdout=subprocess.PIPE, env=env)
        decomp = subprocess.Popen(peak_rss.command(rss[1], [TOOL, "-d"]),
                                  stdin=comp.stdout, stdout=fout, env=env)
        comp.stdout.close()
        assert (comp.wait(timeout=120), decomp.wait(timeout=120)) == (0, 0)
    peaks = [peak_rss.kib(path) * 1024 for path in rss]
    assert max(peaks) < 200 * MIB, [p // MIB for p in peaks]


_HEAPS_PROBE = """import ctypes, os, sys
from ganeti_vol.formats import lz4tool as T
src, mid, out, info = sys.argv[1:]
with open(src, "rb") as fin, open(mid, "wb") as fmid:
    T.compress(fin.fileno(), fmid.fileno(), workers=16)
with open(mid, "rb") as fmid, open(out, "wb") as fout:
    T.decompress(fmid.fileno(), fout.fileno(), workers=16)
libc = ctypes.CDLL(None)
if not hasattr(libc, "malloc_info"):
    sys.exit(77)
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
fp = libc.fopen(info.encode(), b"w")
libc.malloc_info(0, fp)
libc.fclose(fp)
"""


def test_worker_threads_share_one_malloc_heap(tmp_path):
    """With 16 threads each would get its own malloc heap, which keeps the chunk buffers
    it freed (the engine's trim threshold): the tool's memory would grow with the CPUs
    (250-380 MiB decompressing the 2 GiB mixed image with 8-16 threads)."""
    src = image(tmp_path / "disk.img")
    info = tmp_path / "malloc_info.xml"
    res = subprocess.run([sys.executable, "-c", _HEAPS_PROBE, str(src), str(tmp_path / "s"),
                          str(tmp_path / "out"), str(info)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    if res.returncode == 77:
        pytest.skip("not glibc: no malloc arenas to share")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out").read_bytes() == src.read_bytes()
    assert info.read_text().count("<heap nr=") == 1


# --- corruption, in-process (many cases) ------------------------------------------------


@pytest.fixture(scope="module")
def stream_of(tmp_path_factory):
    """(original bytes, compressed stream) of the test image, made through a pipe."""
    src = image(tmp_path_factory.mktemp("img") / "disk.img")
    data = src.read_bytes()
    r, w = os.pipe()
    out = tmp_path_factory.mktemp("stream") / "s.gvz"
    feeder = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))
    feeder.start()
    try:
        with open(out, "wb") as f:
            T.compress(r, f.fileno())
    finally:
        feeder.join()
        os.close(r)
    return data, out.read_bytes()


def _decompress(tmp_path: Path, stream: bytes) -> tuple[BaseException | None, bytes]:
    src, dst = tmp_path / "in.gvz", tmp_path / "out.img"
    src.write_bytes(stream)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            T.decompress(fin.fileno(), fout.fileno())
            err = None
        except E.GanetiVolError as exc:
            err = exc
    return err, dst.read_bytes()


def whole_chunks_of(data: bytes, out: bytes) -> bool:
    """``out`` is the first whole chunks of ``data`` (or all of it)."""
    return (len(out) % CS == 0 or len(out) == len(data)) and out == data[:len(out)]


def _chunk_of(stream: bytes, pos: int) -> int:
    """The index of the chunk whose record holds byte ``pos`` (after the last: the END)."""
    for i, (_, start, _, end) in enumerate(records(stream)):
        if start <= pos < end:
            return i
    return 0  # the stream header


def _corruptions(stream: bytes) -> list[int]:
    """Positions to flip: every field of the header and of every record, the start,
    the LZ4 header, the middle and the end of every payload, and random bytes."""
    picks = {0, 8, 10, 11, 12, 16, 19}
    for _, start, payload, end in records(stream):
        picks |= {start + off for off in (0, 2, 3, 4, 8, 12, 20, 36, 39)}
        if end > payload:
            picks |= {payload, payload + 6, (payload + end) // 2, end - 1}
    rng = random.Random(11)
    picks |= {rng.randrange(len(stream)) for _ in range(25)}
    return sorted(picks)


def test_every_flipped_bit_fails_before_its_chunk_is_written(stream_of, tmp_path):
    """Whatever byte of the stream is damaged (header, record fields, frames, the END
    record), decompression fails, and what it wrote is the original's first whole chunks,
    none of them at or after the damaged record."""
    data, stream = stream_of
    assert len(records(stream)) == 7
    for pos in _corruptions(stream):
        bad = bytearray(stream)
        bad[pos] ^= 1 << (pos % 8)
        err, out = _decompress(tmp_path, bytes(bad))
        assert err is not None, f"flip at byte {pos} went unnoticed"
        assert "\n" not in str(err)
        assert whole_chunks_of(data, out), pos
        assert len(out) // CS <= _chunk_of(stream, pos), pos


def test_a_cut_stream_fails_and_keeps_only_whole_good_chunks(stream_of, tmp_path):
    data, stream = stream_of
    cuts = {0, 5, HEADER}
    for _, start, payload, end in records(stream):
        cuts |= {start, start + 1, payload, (payload + end) // 2, end - 1}
    cuts.discard(len(stream))
    for cut in sorted(cuts):
        err, out = _decompress(tmp_path, stream[:cut])
        assert isinstance(err, (E.StreamError, E.ArchiveError)), cut
        assert whole_chunks_of(data, out), cut


def test_reordered_dropped_duplicated_or_trailing_records_fail(stream_of, tmp_path):
    data, stream = stream_of
    recs = [stream[start:end] for _, start, _, end in records(stream)]
    head = stream[:HEADER]
    variants = {
        "swapped": head + recs[0] + recs[4] + recs[2] + recs[3] + recs[1] + b"".join(recs[5:]),
        "dropped": head + recs[0] + b"".join(recs[2:]),
        "duplicated": head + recs[0] + recs[0] + b"".join(recs[1:]),
        "no END": head + b"".join(recs[:-1]),
        "trailing byte": stream + b"\0",
        "second stream": stream + stream,
    }
    for name, bad in variants.items():
        err, out = _decompress(tmp_path, bad)
        assert err is not None, name
        assert whole_chunks_of(data, out), name


def test_a_newer_stream_version_needs_a_newer_reader(stream_of, tmp_path):
    _, stream = stream_of
    head = bytearray(stream[:HEADER])
    head[8] = 2  # version
    head[16:20] = struct.pack("<I", zlib.crc32(head[:16]))
    err, out = _decompress(tmp_path, bytes(head) + stream[HEADER:])
    assert isinstance(err, E.ArchiveFormatError) and "newer ganeti-vol" in str(err)
    assert out == b""


# --- Ganeti's own pipelines ------------------------------------------------------------

GANETI_PYTHON = os.environ.get("GANETI_REFERENCE_PYTHON", "/usr/bin/python3")
LISTENING = re.compile(r"listening on\s+AF=\d+\s+\S+:(\d+)")
MAGIC = hashlib.sha1(b"ganeti-vol test transfer").hexdigest()  # as _GetInstDiskMagic makes it


def _ganeti(*args: str, stdin: str | None = None) -> str:
    """Run tests/ganeti_impexp.py with Ganeti's Python, or skip saying why it cannot run."""
    path = _ganeti_dir()
    if path is None:
        pytest.skip("Ganeti's Python modules are not here (install ganeti-3.0, or set "
                    "GANETI_REFERENCE_DIR to a dir holding the ganeti package)")
    for prog in ("socat", "dd", "gzip"):
        if not shutil.which(prog, path=GANETI_PATH):
            pytest.skip(f"{prog} is not installed (Ganeti's pipelines need it)")
    res = subprocess.run([GANETI_PYTHON, str(IMPEXP), path, *args], input=stdin,
                         capture_output=True, text=True, timeout=120, env=_REFERENCE_ENV)
    if res.returncode and ("ModuleNotFoundError" in res.stderr or "ImportError" in res.stderr):
        pytest.skip(f"Ganeti's modules do not import with {GANETI_PYTHON}: "
                    f"{res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.fixture(scope="module")
def cluster_pem(tmp_path_factory) -> Path:
    """Key and certificate made as `gnt-cluster init` makes noded's server.pem."""
    pem = tmp_path_factory.mktemp("cert") / "server.pem"
    _ganeti("cert", str(pem))
    return pem


class Side:
    """One side of a transfer: the command Ganeti builds, run as its daemon runs it."""

    def __init__(self, tmp: Path, mode: str, compress: str, disk: Path, pem: Path,
                 tool_dir: Path, magic: str | None, port: int | None = None) -> None:
        self.mode = mode
        self.logs = {name: tmp / f"{mode}.{name}" for name in ("socat", "dd", "pid", "stderr")}
        fds = [os.open(self.logs[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
               for name in ("socat", "dd", "pid")]
        try:
            req = {"mode": mode, "compress": compress, "magic": magic, "disk": str(disk),
                   "size_mib": disk.stat().st_size // MIB, "pem": str(pem),
                   "host": "127.0.0.1", "port": port, "bind": "127.0.0.1", "fds": fds}
            self.command = json.loads(_ganeti("pipeline", stdin=json.dumps(req)))
            with open(self.logs["stderr"], "wb") as err:
                self.proc = subprocess.Popen(self.command["argv"], pass_fds=fds,
                                             stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=err,
                                             env=_env(tool_dir), start_new_session=True)
        finally:
            for fd in fds:
                os.close(fd)

    def listen_port(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = LISTENING.search(self.logs["socat"].read_text())
            if found:
                return int(found.group(1))
            assert self.proc.poll() is None, self.stderr()
            time.sleep(0.02)
        raise AssertionError(f"socat did not listen: {self.logs['socat'].read_text()}")

    def wait(self) -> int:
        return self.proc.wait(timeout=120)

    def stderr(self) -> str:
        return self.logs["stderr"].read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Relay(threading.Thread):
    """A TLS relay holding the cluster certificate between exporter and importer.

    It copies the exporter's bytes (the compressed stream, inside TLS) to the
    importer and flips one bit at ``flip`` (None: none); ``seen`` keeps them.
    """

    def __init__(self, pem: Path, upstream: int, flip: int | None) -> None:
        super().__init__(daemon=True)
        self.pem, self.upstream, self.flip = str(pem), upstream, flip
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(60)
        self.port = self.listener.getsockname()[1]
        self.seen = bytearray()
        self.error: BaseException | None = None

    def run(self) -> None:
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(self.pem)
        server.verify_mode = ssl.CERT_REQUIRED
        server.load_verify_locations(self.pem)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.load_cert_chain(self.pem)
        client.load_verify_locations(self.pem)
        client.check_hostname = False  # Ganeti's certificate has a CN, no subjectAltName
        try:
            conn, _ = self.listener.accept()
            with server.wrap_socket(conn, server_side=True) as down, \
                    client.wrap_socket(socket.create_connection(("127.0.0.1", self.upstream)),
                                       server_hostname="ganeti.example.com") as up:
                down.settimeout(60)
                while data := down.recv(1 << 20):
                    start = len(self.seen)
                    self.seen += data
                    if self.flip is not None and start <= self.flip < len(self.seen):
                        self.seen[self.flip] ^= 0x10
                    up.sendall(self.seen[start:])
                up.unwrap()
        except OSError as err:  # the importer gave up: expected when it finds the damage
            self.error = err
        finally:
            self.listener.close()


def transfer(tmp: Path, src: Path, pem: Path, tool_dir: Path, *, compress: str,
             import_compress: str | None = None, magic: str | None = MAGIC,
             flip: int | None = None) -> tuple[Side, Side, Path, Relay]:
    """Move ``src`` into a fresh disk through Ganeti's two pipelines (and a relay)."""
    dst = tmp / "target.img"
    dst.write_bytes(bytes([UNTOUCHED]) * src.stat().st_size)
    sides: list[Side] = []
    try:
        sides.append(Side(tmp, "import", import_compress or compress, dst, pem, tool_dir,
                          magic))
        relay = Relay(pem, sides[0].listen_port(), flip)
        relay.start()
        sides.append(Side(tmp, "export", compress, src, pem, tool_dir, magic, relay.port))
        sides[1].wait()
        sides[0].wait()
        relay.join(30)
    finally:
        for side in sides:
            side.kill()
    return sides[0], sides[1], dst, relay


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> Path:
    """A 24 MiB sparse disk (the test image, rounded up to whole MiB for Ganeti's dd)."""
    path = image(tmp_path_factory.mktemp("disk") / "disk.img")
    with open(path, "r+b") as f:
        f.truncate(24 * MIB)
    probe = subprocess.run(["dd", "if=/dev/zero", f"of={path}.probe", "bs=4096", "count=1",
                            "oflag=direct"], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"the temp dir does not take O_DIRECT, which Ganeti's dd uses: "
                    f"{probe.stderr.strip()}")
    return path


def _first_difference(target: bytes, source: bytes) -> int | None:
    if target == source:
        return None
    lo, hi = 0, len(source)
    while hi - lo > 1:  # binary search on prefixes: bytes compare at memcmp speed
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if target[:mid] == source[:mid] else (lo, mid)
    return lo


@pytest.mark.slow
def test_ganeti_pipeline_moves_the_disk_with_our_tool(tmp_path, disk, cluster_pem, tool_dir):
    """Ganeti's export and import pipelines, TLS socat, the magic value, dd with O_DIRECT:
    the disk arrives byte for byte, and what crossed the wire is exactly our stream."""
    imp, exp, dst, relay = transfer(tmp_path, disk, cluster_pem, tool_dir, compress=TOOL)
    assert (exp.proc.returncode, imp.proc.returncode) == (0, 0), exp.stderr() + imp.stderr()
    assert f"| {TOOL} |" in exp.command["argv"][-1] and f"| {TOOL} -d |" in \
        imp.command["argv"][-1]
    assert dst.read_bytes() == disk.read_bytes()
    local = tool(tool_dir, data=b"M=" + MAGIC.encode() + disk.read_bytes())
    assert bytes(relay.seen) == local.stdout
    assert f"{TOOL}:" not in exp.stderr() + imp.stderr()


def _flip_inside_data_chunk(stream: bytes, nth: int) -> tuple[int, int]:
    """(stream position, chunk index) in the middle of the nth data chunk's frame."""
    data = [(i, p, e) for i, (rtype, s, p, e) in enumerate(records(stream))
            if rtype == T.CHUNK and e > p]
    index, payload, end = data[nth]
    return (payload + end) // 2, index


@pytest.mark.slow
def test_a_flipped_bit_in_transit_fails_before_the_bad_chunk_reaches_the_disk(
        tmp_path, disk, cluster_pem, tool_dir):
    source = disk.read_bytes()
    prefix = b"M=" + MAGIC.encode()
    stream = tool(tool_dir, data=prefix + source).stdout
    flip, chunk = _flip_inside_data_chunk(stream, 2)
    imp, exp, dst, _ = transfer(tmp_path, disk, cluster_pem, tool_dir, compress=TOOL,
                                flip=flip)
    assert imp.proc.returncode != 0
    assert "chunk hash mismatch" in error_line(imp.stderr()) or \
        "corrupt LZ4 frame" in error_line(imp.stderr())
    target = dst.read_bytes()
    diff = _first_difference(target, source)
    assert diff is not None and diff <= chunk * CS - len(prefix)
    assert target[diff:] == bytes([UNTOUCHED]) * (len(target) - diff), "garbage was written"


@pytest.mark.slow
def test_ganeti_gzip_writes_the_damaged_bytes_before_it_fails(
        tmp_path, disk, cluster_pem, tool_dir):
    """Ganeti's own gzip path, same flipped bit: gzip notices only at the end of the stream
    (its CRC), after it has written wrong bytes to the disk."""
    source = disk.read_bytes()
    stream = _made_by(["gzip", "-1", "-c"], b"M=" + MAGIC.encode() + source)
    imp, _, dst, _ = transfer(tmp_path, disk, cluster_pem, tool_dir, compress="gzip",
                              flip=len(stream) // 2)
    assert imp.proc.returncode != 0
    target = dst.read_bytes()
    diff = _first_difference(target, source)
    assert diff is not None
    assert target[diff:] != bytes([UNTOUCHED]) * (len(target) - diff)


@pytest.mark.slow
def test_ganeti_without_compression_succeeds_with_wrong_data(
        tmp_path, disk, cluster_pem, tool_dir):
    """Ganeti's default transport compression (`none`) checks nothing at all."""
    imp, exp, dst, _ = transfer(tmp_path, disk, cluster_pem, tool_dir, compress="none",
                                flip=5 * MIB)
    assert (exp.proc.returncode, imp.proc.returncode) == (0, 0)
    assert dst.read_bytes() != disk.read_bytes()


@pytest.mark.slow
def test_ganeti_gzip_compression_mismatch_succeeds_with_wrong_data(
        tmp_path, disk, cluster_pem, tool_dir):
    """Ganeti's own "compression mismatch A" (import-export_unittest.bash): the exporter
    compresses with gzip, the importer takes it as it is; without a magic value (the
    daemon's option) the import "succeeds" with gzip data on the disk."""
    imp, exp, dst, _ = transfer(tmp_path, disk, cluster_pem, tool_dir, compress="gzip",
                                import_compress="none", magic=None)
    assert (exp.proc.returncode, imp.proc.returncode) == (0, 0)
    assert dst.read_bytes()[:2] == b"\x1f\x8b"


@pytest.mark.slow
@pytest.mark.parametrize("sender, hint", [("gzip", "gzip data"),
                                          ("none", "an uncompressed Ganeti transfer")])
def test_a_sender_without_our_tool_is_refused_and_nothing_is_written(
        tmp_path, disk, cluster_pem, tool_dir, sender, hint):
    imp, _, dst, _ = transfer(tmp_path, disk, cluster_pem, tool_dir, compress=sender,
                              import_compress=TOOL)
    assert imp.proc.returncode != 0
    assert hint in error_line(imp.stderr())
    assert dst.read_bytes() == bytes([UNTOUCHED]) * disk.stat().st_size


@pytest.mark.slow
def test_a_receiver_without_our_tool_fails_on_ganetis_magic_value(
        tmp_path, disk, cluster_pem, tool_dir):
    """The one mismatch our tool cannot see (it does not run on the receiving side):
    Ganeti's magic value, which it sets for every disk it moves, finds our header."""
    imp, _, dst, _ = transfer(tmp_path, disk, cluster_pem, tool_dir, compress=TOOL,
                              import_compress="none")
    assert imp.proc.returncode != 0
    assert "Magic value mismatch" in imp.stderr()
    assert dst.read_bytes() == bytes([UNTOUCHED]) * disk.stat().st_size


# --- Ganeti's import/export daemon itself ---------------------------------------------


class Daemon:
    """Ganeti's import-export daemon, started as backend.StartImportExportDaemon starts it."""

    def __init__(self, tmp: Path, mode: str, disk: Path, pem: Path, tool_dir: Path,
                 port: int | None = None) -> None:
        req = {"mode": mode, "compress": TOOL, "magic": MAGIC, "disk": str(disk),
               "size_mib": disk.stat().st_size // MIB, "pem": str(pem), "host": "127.0.0.1",
               "port": port, "bind": "127.0.0.1", "fds": [0, 0, 0]}
        command = json.loads(_ganeti("pipeline", stdin=json.dumps(req)))
        self.status = tmp / f"{mode}.status"
        self.log = tmp / f"{mode}.daemon.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [GANETI_PYTHON, command["daemon"], str(self.status), *command["daemon_args"]],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=_env(tool_dir),
                start_new_session=True)

    def state(self) -> dict:
        try:
            return json.loads(self.status.read_text())
        except (OSError, ValueError):
            return {}

    def listen_port(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            port = self.state().get("listen_port")
            if port:
                return int(port)
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.05)
        raise AssertionError(f"the import daemon did not listen: {self.log.read_text()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def daemon_transfers(tmp: Path, src: Path, pem: Path, tool_dir: Path,
                     flips: list[int | None]) -> list[tuple[Daemon, Path]]:
    """One transfer of ``src`` per flip, all at once (each daemon sleeps 2 s in its check)."""
    started: list[Daemon] = []
    targets = []
    try:
        imports = []
        for i in range(len(flips)):
            (tmp / str(i)).mkdir()
            targets.append(tmp / str(i) / "target.img")
            targets[-1].write_bytes(bytes([UNTOUCHED]) * src.stat().st_size)
            imports.append(Daemon(tmp / str(i), "import", targets[-1], pem, tool_dir))
            started.append(imports[-1])
        relays = [Relay(pem, imp.listen_port(), flip)
                  for imp, flip in zip(imports, flips, strict=True)]
        for i, relay in enumerate(relays):
            relay.start()
            started.append(Daemon(tmp / str(i), "export", src, pem, tool_dir, relay.port))
        for daemon in reversed(started):
            daemon.proc.wait(timeout=120)
        for relay in relays:
            relay.join(30)
    finally:
        for daemon in started:
            daemon.kill()
    return list(zip(imports, targets, strict=True))


@pytest.mark.slow
def test_ganeti_daemons_accept_the_tool_and_report_our_error_on_damage(
        tmp_path, disk, cluster_pem, tool_dir):
    """The real import-export daemons, as Ganeti's master drives them: their `-h` check
    (they kill the tool after 2 s), the pipelines, the status files the master polls.
    A clean transfer succeeds with the exact disk; a damaged one fails with our one line
    in the status file's recent output, which is what the operator is shown."""
    stream = tool(tool_dir, data=b"M=" + MAGIC.encode() + disk.read_bytes()).stdout
    flip = _flip_inside_data_chunk(stream, 1)[0]
    (good, good_dst), (bad, bad_dst) = daemon_transfers(tmp_path, disk, cluster_pem,
                                                        tool_dir, [None, flip])
    state = good.state()
    assert state.get("exit_status") == 0, (state, good.log.read_text())
    assert good_dst.read_bytes() == disk.read_bytes()
    state = bad.state()
    assert state.get("exit_status") not in (None, 0), state
    ours = [line for line in state["recent_output"] if line.startswith(f"{TOOL}:")]
    assert len(ours) == 1 and "error: cannot read the compressed stream" in ours[0], state
    assert bad_dst.read_bytes() != disk.read_bytes()
