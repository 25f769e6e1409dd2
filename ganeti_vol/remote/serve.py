"""``ganeti-vol repo serve``: the far side of an ``ssh://`` repository.

It speaks :mod:`ganeti_vol.remote.wire` on stdin/stdout (logs go to stderr,
which ssh carries back to the client's log).  The session holds the
repository shared (as every local operation does) and, while the client
exports, a registered writer (so a gc running on the server keeps what the
client touches).

Every chunk a client sends is decoded and checked against its digest
before it is stored: a client can neither poison the store nor overwrite
a chunk (a stored chunk is never rewritten).  A snapshot is written into
the writer's private staging directory and published, last and atomically,
by ``publish``; its id must be new.

**Restriction** (for an ``authorized_keys`` ``command=`` line, see
doc/remote.md): ``--restrict-to-path P`` (repeatable) serves only
repositories at or under P; ``--append-only`` refuses every verb that
deletes, moves or rewrites stored data (remove, prune, gc, and check with
``--read-data`` or ``--repair-from``: they run on the server itself).
Started as a forced command, the server reads ``SSH_ORIGINAL_COMMAND`` (what
the client asked to run, as borg does): it must be ``... repo serve [...]
PATH``; its PATH is the one repository served, and its ``--append-only``
tightens the key's options (nothing in it can loosen them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import threading
from typing import Any

from ganeti_vol import __version__
from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import enlarge_pipe, io_error, pwrite_all
from ganeti_vol.remote import verbs, wire
from ganeti_vol.repo import format as F
from ganeti_vol.repo.check import verify_frame
from ganeti_vol.repo.store import Repository, Writer

log = logging.getLogger(__name__)

_SNAP_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}\.[0-9]{3}Z-[0-9a-f]{6}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def within(path: str, roots: list[str]) -> bool:
    """True if ``path`` (symlinks resolved) is one of ``roots`` or below one."""
    real = os.path.realpath(path)
    for root in roots:
        r = os.path.realpath(root)
        if real == r or real.startswith(r.rstrip("/") + "/"):
            return True
    return False


def from_original_command(command: str) -> tuple[str | None, bool]:
    """(PATH, --append-only) of the client's ``... repo serve [--append-only] PATH``.

    A RemoteRefused error for any other command (the key is for serving only).
    """
    try:
        words = shlex.split(command)
    except ValueError:
        words = []
    for i in range(len(words) - 1):
        if words[i] == "repo" and words[i + 1] == "serve":
            rest = words[i + 2:]
            path = None
            append_only = False
            skip = False
            for w in rest:
                if skip:
                    skip = False
                elif w == "--append-only":
                    append_only = True
                elif w == "--restrict-to-path":
                    skip = True  # the key's restriction stands; the client's is ignored
                elif not w.startswith("-"):
                    path = w
            return path, append_only
    raise E.RemoteRefused(f"this key may only run 'ganeti-vol repo serve' (it was asked "
                          f"to run '{command[:80]}')")


class Session:
    """One client's requests (:meth:`handle` is the :class:`~.wire.Peer` handler)."""

    def __init__(self, *, path: str | None = None, restrict: list[str] | None = None,
                 append_only: bool = False) -> None:
        self.fixed_path = path
        self.restrict = list(restrict or [])
        self.append_only = append_only
        self.repo: Repository | None = None
        self.writer: Writer | None = None
        self._stack = contextlib.ExitStack()
        self._wstack = contextlib.ExitStack()
        self._dirs: set[str] = set()
        self._lock = threading.Lock()

    def close(self) -> None:
        self._wstack.close()
        self._stack.close()

    # -- the handler -------------------------------------------------------------------

    def handle(self, req: dict[str, Any], blob: bytes) -> tuple[dict[str, Any], bytes]:
        op = str(req.get("op"))
        if op == "hello":
            return self._hello(req), b""
        if self.repo is None:
            raise E.ProtocolError(f"request '{op}' before hello")
        method = getattr(self, f"_op_{op}", None)
        if method is None:
            raise E.ProtocolError(f"unknown request '{op}' (a newer client?)")
        result: tuple[dict[str, Any], bytes] = method(self.repo, req, blob)
        return result

    def _hello(self, req: dict[str, Any]) -> dict[str, Any]:
        if req.get("version") != wire.VERSION:
            raise E.ProtocolError(f"protocol version mismatch: the client speaks version "
                                  f"{req.get('version')}, this server (ganeti-vol "
                                  f"{__version__}) speaks {wire.VERSION}")
        if req.get("service") != "repo":
            raise E.ProtocolError(f"this server serves repositories, not '{req.get('service')}'")
        path = str(req.get("path") or "")
        if self.repo is not None:
            raise E.ProtocolError("hello twice")
        if self.fixed_path is not None and os.path.realpath(path) != os.path.realpath(
                self.fixed_path):
            raise E.RemoteRefused(f"repository '{path}' refused: this server serves only "
                                  f"'{self.fixed_path}'")
        if self.restrict and not within(path, self.restrict):
            raise E.RemoteRefused(f"repository '{path}' refused: outside the restricted "
                                  f"path(s) {', '.join(self.restrict)}")
        init = req.get("init")
        if isinstance(init, dict):  # repo init ssh://...
            Repository.init(path, hash_algo=init.get("hash_algo"),
                            chunk_size=int(init.get("chunk_size") or 4 << 20))
        repo = Repository.open(path, write=bool(req.get("write")))
        self._stack.enter_context(repo.shared())
        self.repo = repo
        log.info("serving %s%s", repo.what, " (append-only)" if self.append_only else "")
        info = repo.info()
        return {"version": wire.VERSION, "server": __version__,
                "append_only": self.append_only, "repository": info}

    # -- chunks ------------------------------------------------------------------------

    def _op_haves(self, repo: Repository, req: dict[str, Any], _: bytes) -> Any:
        return {"sizes": repo.haves([_digest(repo, h) for h in req["digests"]])}, b""

    def _need_writer(self, op: str) -> Writer:
        if self.writer is None:
            raise E.ProtocolError(f"request '{op}' outside writer_begin/writer_end")
        return self.writer

    def _op_put(self, repo: Repository, req: dict[str, Any], blob: bytes) -> Any:
        w = self._need_writer("put")
        digest = _digest(repo, req["digest"])
        why = verify_frame(blob, digest, repo.hash_algo)
        if why is None and (_content_size(blob) or 0) > repo.chunk_size:
            why = "larger than the repository's chunk size"
        if why is not None:
            raise E.IntegrityError(f"refused chunk {digest.hex()} for {repo.what}: {why}")
        stored = repo.store(digest, blob, w.tmpdir)
        if stored:
            with self._lock:
                self._dirs.add(repo.chunk_dir(digest))
        return {"stored": stored}, b""

    def _op_sync(self, repo: Repository, req: dict[str, Any], _: bytes) -> Any:
        with self._lock:
            dirs, self._dirs = self._dirs, set()
        repo.sync_dirs(dirs)
        return {}, b""

    def _op_get(self, repo: Repository, req: dict[str, Any], _: bytes) -> Any:
        frame = repo.read_frame(_digest(repo, req["digest"]))
        return ({"missing": True}, b"") if frame is None else ({}, frame)

    # -- snapshots and files -----------------------------------------------------------

    def _op_snapshot_ids(self, repo: Repository, req: dict[str, Any], _: bytes) -> Any:
        return {"ids": repo.snapshot_ids()}, b""

    def _op_file(self, repo: Repository, req: dict[str, Any], _: bytes) -> Any:
        parts = [str(p) for p in req.get("parts") or []]
        ok = ((len(parts) == 3 and parts[0] == F.SNAPSHOTS and _NAME_RE.match(parts[1])
               and _NAME_RE.match(parts[2]))
              or (len(parts) == 2 and parts[0] == F.ORIGINS and _NAME_RE.match(parts[1])))
        if not ok:
            raise E.RemoteRefused(f"file {'/'.join(parts)!r} is not a snapshot or origin file")
        offset, length = int(req.get("offset") or 0), min(int(req.get("length") or 0),
                                                           wire.MAX_BLOB)
        try:
            with open(repo.join(*parts), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(offset)
                data = f.read(length)
        except FileNotFoundError:
            return {"missing": True}, b""
        except OSError as err:
            raise E.ArchiveError(f"cannot read '{'/'.join(parts)}' of {repo.what}: "
                                 f"{err.strerror or err}") from err
        return {"size": size}, data

    def _staging(self, w: Writer, snap_id: str) -> str:
        if not _SNAP_ID_RE.match(snap_id):
            raise E.ProtocolError(f"invalid snapshot id '{snap_id}'")
        return os.path.join(w.tmpdir, f"snapshot-{snap_id}")

    def _op_put_file(self, repo: Repository, req: dict[str, Any], blob: bytes) -> Any:
        w = self._need_writer("put_file")
        staging = self._staging(w, str(req["snapshot"]))
        name = str(req["name"])
        if not _NAME_RE.match(name):
            raise E.ProtocolError(f"invalid snapshot file name '{name}'")
        path = os.path.join(staging, name)
        try:
            os.makedirs(staging, 0o750, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                pwrite_all(fd, blob, int(req.get("offset") or 0), f"'{path}'")
            finally:
                os.close(fd)
        except OSError as err:
            raise io_error("write", f"'{path}'", err) from err
        return {}, b""

    def _op_publish(self, repo: Repository, req: dict[str, Any], _: bytes) -> Any:
        w = self._need_writer("publish")
        snap_id = str(req["snapshot"])
        staging = self._staging(w, snap_id)
        if os.path.exists(repo.snapshot_dir(snap_id)):
            raise E.RemoteRefused(f"snapshot {snap_id} already exists in {repo.what}: "
                                  "nothing is ever overwritten")
        try:
            with open(os.path.join(staging, F.MANIFEST), "rb") as f:
                manifest = F.unseal(f.read(), f"manifest of snapshot {snap_id}")
            for name in os.listdir(staging):
                fd = os.open(os.path.join(staging, name), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as err:
            raise E.ArchiveError(f"cannot publish snapshot {snap_id} in {repo.what}: "
                                 f"{err.strerror or err}") from err
        if manifest.get("id") != snap_id or manifest.get("format") != F.SNAPSHOT_FORMAT:
            raise E.IntegrityError(f"cannot publish snapshot {snap_id}: its manifest is not "
                                   "this snapshot's")
        self._op_sync(repo, req, b"")
        repo.publish_snapshot(staging, snap_id)
        log.info("published snapshot %s in %s", snap_id, repo.what)
        return {}, b""

    # -- writer and verbs --------------------------------------------------------------

    def _op_writer_begin(self, repo: Repository, req: dict[str, Any], _: bytes) -> Any:
        if self.writer is not None:
            raise E.ProtocolError("writer_begin twice")
        self.writer = self._wstack.enter_context(repo.writer())
        return {"token": self.writer.token}, b""

    def _op_writer_end(self, repo: Repository, req: dict[str, Any], _: bytes) -> Any:
        self.writer = None
        self._wstack.close()
        return {}, b""

    def _op_run(self, repo: Repository, req: dict[str, Any], _: bytes) -> Any:
        verb = str(req.get("verb"))
        kwargs = dict(req.get("kwargs") or {})
        if verb not in verbs.VERBS:
            raise E.ProtocolError(f"unknown verb '{verb}'")
        if self.append_only and verb in verbs.DESTRUCTIVE and not (
                verb == "check" and not kwargs.get("read_data") and not kwargs.get(
                    "repair_from")):
            raise E.RemoteRefused(f"'repo {verb}' refused: {repo.what} is served append-only "
                                  "(run it on the server)")
        source = kwargs.get("repair_from")
        if source and self.restrict and not within(str(source), self.restrict):
            raise E.RemoteRefused(f"--repair-from '{source}' refused: outside the restricted "
                                  f"path(s) {', '.join(self.restrict)}")
        try:
            report = verbs.VERBS[verb](repo, **kwargs)
        except TypeError as err:
            raise E.ProtocolError(f"invalid arguments for '{verb}': {err}") from err
        return {"report": report}, b""


def _digest(repo: Repository, text: Any) -> bytes:
    try:
        d = bytes.fromhex(str(text))
    except ValueError:
        d = b""
    if len(d) != repo.hlen:
        raise E.ProtocolError(f"invalid chunk digest {str(text)[:80]!r}")
    return d


def _content_size(frame: bytes) -> int | None:
    from ganeti_vol.engine import codec

    return codec.frame_content_size(frame)


def serve(session: Session, rfd: int = 0, wfd: int = 1) -> None:
    """Greet, then answer requests on ``rfd``/``wfd`` until the client goes away."""
    for fd in (rfd, wfd):  # 1 MiB pipes to and from sshd: fewer switches per chunk
        enlarge_pipe(fd)
    try:
        os.write(wfd, wire.greeting())
        wire.Peer(rfd, wfd, "client", handler=session.handle).run()
    finally:
        session.close()
