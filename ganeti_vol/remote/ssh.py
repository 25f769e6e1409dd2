"""``ssh://[user@]host[:port]/path``: a repository on another node, through the system ssh.

The client runs ``$GANETI_VOL_SSH`` (default ``ssh``: OpenSSH, so keys,
``~/.ssh/config`` and agents work as usual) with
``$GANETI_VOL_REMOTE_COMMAND repo serve PATH`` (default ``ganeti-vol``) on the
far side, and speaks :mod:`ganeti_vol.remote.wire` with it.

:class:`SshRepository` is a :class:`ganeti_vol.remote.RepositoryBackend`:

* ``touch`` (the engine's "does the store have this chunk?", called by every
  worker) is coalesced into batched ``haves`` requests, several in flight;
* ``store`` sends a chunk frame; the server verifies it against its digest
  before storing it (a client cannot poison the store);
* ``prefetch``/``read_frame`` pipeline chunk reads for an import;
* ``publish_snapshot`` uploads the staged snapshot files, then asks the
  server to publish them, last and atomically;
* whole-repository verbs (list, check, prune, gc...) run on the server.

A transfer cut at any point leaves the chunks already stored on the server;
rerunning the command sends only what is still missing.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import shlex
import shutil
import subprocess
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from concurrent import futures
from typing import Any

from ganeti_vol.core import atomicfile
from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import enlarge_pipe
from ganeti_vol.remote import sshcmd, wire
from ganeti_vol.remote.sshcmd import Target, parse, ssh_argv
from ganeti_vol.repo.store import Writer

log = logging.getLogger(__name__)

#: digests per haves request
HAVES_BATCH = 512
#: bytes per file piece (snapshot files: indexes may be large)
FILE_PIECE = 8 << 20

_UNREACHABLE = ("could not resolve hostname", "name or service not known", "no route to host",
                "connection refused", "connection timed out", "network is unreachable",
                "operation timed out", "temporary failure in name resolution")
_AUTH = ("permission denied", "host key verification failed", "too many authentication",
         "remote host identification has changed", "no matching host key")
_NOT_INSTALLED = ("command not found", "no such file or directory", "not found")


class Connection:
    """A running ``ssh HOST ganeti-vol ...`` and the :class:`~.wire.Peer` over its pipes."""

    def __init__(self, target: Target, remote_args: Sequence[str],
                 handler: wire.Handler | None = None) -> None:
        self.target = target
        self.where = target.where
        self._stderr: collections.deque[str] = collections.deque(maxlen=20)
        self._greeted = False
        argv = ssh_argv(target, remote_args)
        log.debug("running %s", shlex.join(argv))
        early = sshcmd.adopt(argv)
        if early is not None:
            log.debug("ssh to %s was started early (pid %d)", self.where, early.pid)
        try:
            self.proc = early or subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True)
        except OSError as err:
            raise E.RemoteError(f"cannot run '{argv[0]}' to reach {self.where}: "
                                f"{err.strerror or err}") from err
        self._finalizer = weakref.finalize(self, _reap, self.proc)
        assert self.proc.stdout and self.proc.stdin and self.proc.stderr
        for pipe in (self.proc.stdin, self.proc.stdout):
            enlarge_pipe(pipe.fileno())
        self._errt = threading.Thread(target=self._read_stderr, args=(self.proc.stderr,),
                                      daemon=True, name="ganeti-vol-ssh-stderr")
        self._errt.start()
        try:
            try:
                wire.read_greeting(self.proc.stdout.fileno(), self.where)
            except EOFError:
                raise self.failure("the far side closed before greeting") from None
        except BaseException:
            self.kill()
            raise
        self._greeted = True
        self.peer = wire.Peer(self.proc.stdout.fileno(), self.proc.stdin.fileno(), self.where,
                              handler=handler, lost=self.lost, close_write=self.proc.stdin.close)
        self.peer.start()

    def _read_stderr(self, f: Any) -> None:
        for raw in f:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._stderr.append(line)
                log.info("%s: %s", self.where, line)

    def _ssh_lines(self, wait: float) -> list[str]:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=wait)
        self._errt.join(timeout=wait)
        return list(self._stderr)

    def failure(self, why: str) -> E.GanetiVolError:
        """The error for a connection that ended early: classified from ssh's stderr."""
        lines = self._ssh_lines(10)
        low = [ln.lower() for ln in lines]
        last = lines[-1] if lines else why
        rc = self.proc.returncode
        if rc == 255 or not any("ganeti-vol" in ln for ln in low):
            for ln, raw in zip(low, lines, strict=False):
                if any(p in ln for p in _UNREACHABLE):
                    return E.HostUnreachable(f"cannot reach {self.where}: {raw.strip()}")
                if any(p in ln for p in _AUTH):
                    return E.AuthError(f"cannot log in to {self.where}: {raw.strip()}")
        for ln, raw in zip(low, lines, strict=False):
            if "ganeti-vol: error:" in ln:
                return _remote_error(raw, rc)
        if not self._greeted and (rc == 127 or any(p in ln for ln in low
                                                   for p in _NOT_INSTALLED)):
            return E.ProtocolError(f"cannot run ganeti-vol on {self.where}: {last.strip()} "
                                   "(install it there, or set GANETI_VOL_REMOTE_COMMAND)")
        return E.RemoteError(f"connection to {self.where} lost ({why}"
                             + (f"; {last.strip()}" if lines else "")
                             + (f"; ssh exited {rc}" if rc is not None else "") + ")")

    def lost(self, why: str) -> E.GanetiVolError:
        if why == "end of stream":
            return self.failure("the far side closed the connection")
        return self.failure(why)

    def close(self) -> None:
        """End the session: the server sees end of stream and exits; ssh follows."""
        peer = getattr(self, "peer", None)
        if peer is not None:
            peer.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        self._errt.join(timeout=5)
        self._finalizer.detach()
        for f in (self.proc.stdout, self.proc.stderr, self.proc.stdin):
            with contextlib.suppress(OSError, ValueError):
                if f is not None:
                    f.close()

    def kill(self) -> None:
        _reap(self.proc)
        self._errt.join(timeout=5)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """End ssh: end of stream first (the server cleans up and exits), then a kill."""
    if proc.poll() is None and proc.stdin is not None:
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _remote_error(line: str, rc: int | None) -> E.GanetiVolError:
    """An error the far side printed before the protocol started: its class from the far
    side's exit code (ssh passes it on)."""
    text = line.split("ganeti-vol: error:", 1)[-1].strip()
    for cls in E.all_error_classes():
        if cls.exit_code == rc:
            return cls(text)
    return E.RemoteError(text)


class _Batcher:
    """Coalesce concurrent ``touch`` calls into ``haves`` requests, several in flight."""

    def __init__(self, peer: wire.Peer) -> None:
        self.peer = peer
        self.q: queue.Queue[tuple[bytes, futures.Future[int | None]] | None] = queue.Queue()
        self.t = threading.Thread(target=self._loop, daemon=True, name="ganeti-vol-haves")
        self.t.start()

    def ask(self, digest: bytes) -> int | None:
        fut: futures.Future[int | None] = futures.Future()
        self.q.put((digest, fut))
        return fut.result()

    def _loop(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < HAVES_BATCH:
                try:
                    nxt = self.q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.q.put(None)
                    break
                batch.append(nxt)
            try:
                req = self.peer.request("haves", digests=[d.hex() for d, _ in batch])
            except BaseException as err:
                for _, f in batch:
                    f.set_exception(err)
                continue
            req.add_done_callback(lambda r, b=batch: _settle(r, b))  # type: ignore[misc]

    def stop(self) -> None:
        self.q.put(None)
        self.t.join(timeout=5)


def _settle(req: futures.Future[tuple[dict[str, Any], bytes]],
            batch: list[tuple[bytes, futures.Future[int | None]]]) -> None:
    err = req.exception()
    if err is not None:
        for _, f in batch:
            f.set_exception(err)
        return
    sizes = req.result()[0]["sizes"]
    for (_, f), size in zip(batch, sizes, strict=False):
        f.set_result(None if size is None else int(size))


def open_repository(spec: str, *, write: bool = False) -> SshRepository:
    return SshRepository(spec, write=write)


def init_repository(spec: str, *, hash_algo: str | None = None,
                    chunk_size: int = 4 << 20) -> dict[str, Any]:
    """``repo init ssh://...``: the server creates the repository; its info."""
    repo = SshRepository(spec, write=True, init={"hash_algo": hash_algo,
                                                 "chunk_size": chunk_size})
    try:
        return {**repo.info, "path": spec}
    finally:
        repo.close()


class SshRepository:
    """A repository behind ``ganeti-vol repo serve`` on another host (see the module doc)."""

    #: chunks in flight to the server during an export (each waits for the server to verify
    #: and store it): covers the link's latency; at most 8 frames of memory
    store_threads = 8

    def __init__(self, spec: str, *, write: bool = False,
                 init: dict[str, Any] | None = None) -> None:
        self._closed = False
        self._batcher: _Batcher | None = None
        self.target = parse(spec)
        self.path = spec
        self.what = f"repository '{spec}'"
        self.conn = Connection(self.target, sshcmd.serve_args(self.target))
        self._cache = atomicfile.private_temp_dir("ganeti-vol-remote")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._cache, True)
        try:
            reply, _ = self.conn.peer.call("hello", version=wire.VERSION, service="repo",
                                           path=self.target.path, write=write, init=init)
        except BaseException:
            self.close()
            raise
        info = self.info = reply["repository"]
        self.remote_path = str(info["path"])
        self.hash_algo = str(info["chunk_hash"])
        self.chunk_size = int(info["chunk_size"])
        self.version = int(info["format_version"])
        from ganeti_vol.engine import hashing

        self.hlen = hashing.digest_size(self.hash_algo)
        self._batcher = _Batcher(self.conn.peer)
        self._gets: dict[bytes, futures.Future[tuple[dict[str, Any], bytes]]] = {}
        self._lock = threading.Lock()

    @property
    def peer(self) -> wire.Peer:
        return self.conn.peer

    # -- chunks ------------------------------------------------------------------------

    def haves(self, digests: Sequence[bytes]) -> list[int | None]:
        reqs = [self.peer.request("haves", digests=[d.hex() for d in digests[i:i + HAVES_BATCH]])
                for i in range(0, len(digests), HAVES_BATCH)]
        out: list[int | None] = []
        for r in reqs:
            out += [None if s is None else int(s) for s in r.result()[0]["sizes"]]
        return out

    def touch(self, digest: bytes) -> int | None:
        assert self._batcher is not None
        return self._batcher.ask(digest)

    def chunk_size_on_disk(self, digest: bytes) -> int | None:
        return self.haves([digest])[0]

    def store(self, digest: bytes, frame: bytes | memoryview, tmpdir: str) -> bool:
        return bool(self.peer.call("put", frame, digest=digest.hex())[0]["stored"])

    def chunk_dir(self, digest: bytes) -> str:
        return ""  # the server tracks the directories it wrote to

    def sync_dirs(self, dirs: set[str]) -> None:
        self.peer.call("sync")

    def prefetch(self, digest: bytes) -> None:
        with self._lock:
            if digest not in self._gets:
                self._gets[digest] = self.peer.request("get", digest=digest.hex())

    def read_frame(self, digest: bytes) -> bytes | None:
        with self._lock:
            fut = self._gets.pop(digest, None)
        if fut is None:
            fut = self.peer.request("get", digest=digest.hex())
        reply, blob = fut.result()
        return None if reply.get("missing") else blob

    # -- snapshots and files -----------------------------------------------------------

    def snapshot_ids(self) -> list[str]:
        return list(self.peer.call("snapshot_ids")[0]["ids"])

    def local_file(self, *parts: str) -> str:
        local = os.path.join(self._cache, *parts)
        if os.path.exists(local) or os.path.exists(local + ".missing"):
            return local
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = local + ".part"
        offset = 0
        with open(tmp, "wb") as f:
            while True:
                reply, blob = self.peer.call("file", parts=list(parts), offset=offset,
                                             length=FILE_PIECE)
                if reply.get("missing"):
                    break
                f.write(blob)
                offset += len(blob)
                if offset >= int(reply["size"]) or not blob:
                    break
        if reply.get("missing"):
            os.unlink(tmp)
            open(local + ".missing", "wb").close()
        else:
            os.rename(tmp, local)
        return local

    def publish_snapshot(self, staging: str, snap_id: str) -> None:
        for name in sorted(os.listdir(staging)):
            with open(os.path.join(staging, name), "rb") as f:
                offset = 0
                while True:
                    piece = f.read(FILE_PIECE)
                    if not piece and offset:
                        break
                    self.peer.call("put_file", piece, snapshot=snap_id, name=name,
                                   offset=offset)
                    offset += len(piece)
                    if len(piece) < FILE_PIECE:
                        break
        self.peer.call("publish", snapshot=snap_id)

    # -- locks and verbs ---------------------------------------------------------------

    @contextlib.contextmanager
    def shared(self) -> Iterator[SshRepository]:
        yield self  # the server holds the repository shared for the whole session

    @contextlib.contextmanager
    def writer(self) -> Iterator[Writer]:
        token = self.peer.call("writer_begin")[0]["token"]
        tmpdir = atomicfile.private_temp_dir("ganeti-vol-stage")
        try:
            yield Writer(token, tmpdir, time.time(), -1)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
            if not self.peer.broken:
                with contextlib.suppress(E.GanetiVolError):
                    self.peer.call("writer_end")

    def run(self, verb: str, **kwargs: Any) -> dict[str, Any]:
        report: dict[str, Any] = self.peer.call("run", verb=verb, kwargs=kwargs)[0]["report"]
        for key, value in report.items():  # the server's paths, as this side names them
            if isinstance(value, str) and (value == self.remote_path
                                           or value.startswith(self.remote_path + "::")):
                report[key] = self.path + value[len(self.remote_path):]
        return report

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._batcher is not None:
            self._batcher.stop()
        self.conn.close()
        self._finalizer()
