"""``ganeti-vol move INSTANCE_FILE ssh://node2/INSTANCE_FILE``: copy an instance's disks to
another node, sending only the chunks that differ.

The source (this node) hashes each disk per chunk (holding the instance and
its disks locked, shared, as an export does) and sends the digest lists.
The destination (``ganeti-vol move --receive INSTANCE_FILE``, run by ssh on
node2) brings its existing disks to that state with the machinery of
``import --into-existing`` (:func:`ganeti_vol.repo.restore.import_into_existing`):
it locks the instance and its disks, marks the instance "import in
progress" (broken until the move completes; a rerun resumes), hashes its own
disk chunk by chunk and asks the source for each chunk whose digest differs.
The source reads that chunk again, checks it still has the digest it sent,
compresses it and sends it; the destination decodes it, verifies it against
the digest and only then writes it, then reads back every written chunk.

When the destination already holds an older copy (a previous move, a
restore from the same repository), what crosses the link is the digest list
(about 40 bytes per chunk) and the chunks that differ: ``zfs send -i``
between live disks, without a common snapshot.  No hooks run (as for
``--into-existing``).  The source's disks must not change during the move
(stop the instance, or move from a snapshot); a chunk that changed after it
was hashed fails the move.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import stat
import threading
import time
from concurrent import futures
from typing import Any

from ganeti_vol import __version__
from ganeti_vol.core import atomicfile
from ganeti_vol.core import errors as E
from ganeti_vol.core.holes import read_data, settle, zero_bytes
from ganeti_vol.core.model import Instance
from ganeti_vol.engine import codec, hashing
from ganeti_vol.ops import opstate
from ganeti_vol.remote import wire
from ganeti_vol.repo import format as F

log = logging.getLogger(__name__)

#: the unit a move compares and sends: 1 MiB, so that 1 % of a disk changed by scattered
#: 1 MiB writes costs at most about 2 % (a 4 MiB chunk would cost up to 5 %); the digest
#: list is then 40 bytes per MiB of disk
CHUNK_SIZE = 1 << 20


# --- the source ---------------------------------------------------------------------------


class _SourceDisks:
    """The source's disks: their per-chunk digests, and chunks read again on request."""

    def __init__(self, instance: Instance, algo: str, chunk_size: int) -> None:
        self.instance, self.algo, self.cs = instance, algo, chunk_size
        self.fds: list[int] = []
        self.where: dict[bytes, tuple[int, int, int]] = {}  # digest -> (disk, offset, length)
        self.sent_chunks = self.sent_bytes = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def hash_disk(self, index: int, workers: int) -> dict[str, Any]:
        """Hash disk ``index``; its entry (size, digest) and index file bytes."""
        path = self.instance.disks[index].path or ""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise E.DeviceError(f"cannot read disk {index} of instance "
                                f"'{self.instance.name}' ('{path}'): {err.strerror or err}"
                                ) from err
        self.fds.append(fd)
        size = os.lseek(fd, 0, os.SEEK_END)
        # a file whose delayed writes cannot be flushed is read whole, holes too
        sparse = stat.S_ISREG(os.fstat(fd).st_mode) and settle(fd, path)
        cs, algo = self.cs, self.algo
        codec.tune_malloc()  # chunk-sized buffers are reused, not mapped and zeroed each time

        def one(offset: int) -> tuple[bool, bytes]:
            length = min(cs, size - offset)
            data = read_data(fd, offset, length, sparse=sparse)  # holes are not read
            if data is None or data == zero_bytes(length):
                return True, hashing.zero_hash(algo, length)
            return False, hashing.chunk_hash(algo, data)

        buf = io.BytesIO()
        writer = F.IndexWriter(buf, algo, cs)
        disk_digest = hashing.DiskDigest(algo, cs)
        with futures.ThreadPoolExecutor(workers, thread_name_prefix="ganeti-vol-move") as pool:
            for i, (zero, digest) in enumerate(pool.map(one, range(0, size, cs))):
                writer.add(zero, 0, digest)
                disk_digest.update(digest)
                if not zero:
                    self.where.setdefault(digest, (index, i * cs, min(cs, size - i * cs)))
        writer.finish(size)
        entry = {"index": index, "size": size, "chunk_size": cs, "hash": algo,
                 "digest": disk_digest.finish(size)}
        return {"entry": entry, "index_bytes": buf.getvalue()}

    def handle(self, req: dict[str, Any], _: bytes) -> tuple[dict[str, Any], bytes]:
        """The destination asks for a chunk: read it again, check it, compress it."""
        if req.get("op") != "chunk":
            raise E.ProtocolError(f"unknown request '{req.get('op')}' from the destination")
        digest = bytes.fromhex(str(req.get("digest")))
        found = self.where.get(digest)
        if found is None:
            raise E.ProtocolError(f"the destination asked for chunk {digest.hex()[:16]}..., "
                                  "which the source did not send")
        disk, offset, length = found
        data = os.pread(self.fds[disk], length, offset)
        if hashing.chunk_hash(self.algo, data) != digest:
            raise E.IntegrityError(f"cannot move disk {disk} of instance "
                                   f"'{self.instance.name}': the source changed at offset "
                                   f"{offset} during the move (stop the instance first)")
        frame = codec.encode(data)
        with self._lock:
            self.sent_chunks += 1
            self.sent_bytes += len(frame)
        return {}, frame


def move(ctx: Any, instance: Instance, destination: str) -> dict[str, Any]:
    """Copy ``instance``'s disks to the instance file ``ssh://host/INSTANCE_FILE``."""
    from ganeti_vol.remote.ssh import Connection
    from ganeti_vol.remote.sshcmd import parse

    target = parse(destination)
    node = ctx.node
    algo = node.chunk_hash if node.chunk_hash in F.DIGESTS else F.default_digest()
    started = time.monotonic()
    src = _SourceDisks(instance, algo, CHUNK_SIZE)
    with opstate.operation(node.state_dir, "export", instance, read_only=True), \
            contextlib.closing(src):
        disks = [src.hash_disk(i, node.workers or os.cpu_count() or 1)
                 for i in range(len(instance.disks))]
        hashed = time.monotonic()
        conn = Connection(target, ["move", "--receive", target.path], handler=src.handle)
        try:
            conn.peer.call("hello", version=wire.VERSION, service="move",
                           instance=instance.name)
            for d in disks:
                conn.peer.call("index", d["index_bytes"], **d["entry"])
            reply, _ = conn.peer.call("move", source=f"{instance.name} on this node")
        finally:
            conn.close()
    elapsed = time.monotonic() - started
    result = dict(reply["result"])
    size = sum(int(d["entry"]["size"]) for d in disks)
    result.update({
        "operation": "move", "instance": instance.name, "destination": destination,
        "size": size, "sent_chunks": src.sent_chunks, "sent_bytes": src.sent_bytes,
        "link_bytes_sent": conn.peer.bytes_sent, "hash_seconds": round(hashed - started, 3),
        "seconds": round(elapsed, 3),
        "mb_per_s": round(size / elapsed / 1e6, 1) if elapsed > 0 else None})
    return result


# --- the destination ----------------------------------------------------------------------


class _Frames:
    """The "repository" a move imports from: chunk frames come from the source."""

    def __init__(self, peer: wire.Peer, algo: str, what: str) -> None:
        self.peer, self.hash_algo, self.what = peer, algo, what
        self.path = what

    def read_frame(self, digest: bytes) -> bytes | None:
        return self.peer.call("chunk", digest=digest.hex())[1]

    def shared(self) -> contextlib.nullcontext[Any]:
        return contextlib.nullcontext(self)


class _Disk:
    """One disk of the source, as :mod:`ganeti_vol.repo.restore` reads a snapshot disk."""

    def __init__(self, frames: _Frames, entry: dict[str, Any], index_path: str) -> None:
        self.repo, self.entry, self.index_path = frames, entry, index_path
        self.index = int(entry["index"])
        self.size = int(entry["size"])
        self.disk_size: int | None = None
        self.what = f"disk {self.index} moved from {frames.what}"

    def open_index(self) -> F.Index:
        idx = F.Index(self.index_path, self.repo.hash_algo, f"index of {self.what}")
        if (idx.size, idx.chunk_size) != (self.size, int(self.entry["chunk_size"])):
            raise E.IntegrityError(f"cannot read the index of {self.what}: it disagrees with "
                                   "its announcement")
        return idx


class _Moved:
    """The source's disks as a snapshot, for ``restore.import_into_existing``."""

    def __init__(self, frames: _Frames, disks: list[_Disk]) -> None:
        self.repo, self.disks, self.path = frames, disks, frames.what


class Receiver:
    """``move --receive``: the destination's side of a move (the Peer handler)."""

    def __init__(self, ctx: Any, instance: Instance) -> None:
        self.ctx, self.instance = ctx, instance
        self.peer: wire.Peer | None = None
        self.source = ""
        self.algo: str | None = None
        self.entries: list[dict[str, Any]] = []
        self.tmp = atomicfile.private_temp_dir("ganeti-vol-move")

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)

    def handle(self, req: dict[str, Any], blob: bytes) -> tuple[dict[str, Any], bytes]:
        op = req.get("op")
        if op == "hello":
            if req.get("version") != wire.VERSION:
                raise E.ProtocolError(f"protocol version mismatch: the source speaks version "
                                      f"{req.get('version')}, this node (ganeti-vol "
                                      f"{__version__}) speaks {wire.VERSION}")
            if req.get("service") != "move":
                raise E.ProtocolError("this is 'move --receive', not a repository server")
            if req.get("instance") != self.instance.name:
                raise E.UsageError(f"cannot move instance '{req.get('instance')}' into the "
                                   f"instance file of '{self.instance.name}'")
            return {"version": wire.VERSION}, b""
        if op == "index":
            index = int(req["index"])
            if index != len(self.entries) or index >= len(self.instance.disks):
                raise E.UsageError(f"cannot move disk {index}: instance "
                                   f"'{self.instance.name}' has {len(self.instance.disks)} "
                                   "disk(s) here")
            if req.get("hash") not in F.DIGESTS or not codec.valid_chunk_size(
                    req.get("chunk_size")):
                raise E.ProtocolError("unsupported chunk digest or size")
            self.algo = str(req["hash"])
            path = os.path.join(self.tmp, f"disk{index}.idx")
            with open(path, "wb") as f:
                f.write(blob)
            self.entries.append({k: req[k] for k in ("index", "size", "chunk_size", "hash",
                                                     "digest")})
            return {}, b""
        if op == "move":
            assert self.peer is not None and self.algo is not None
            frames = _Frames(self.peer, self.algo, f"'{req.get('source')}'")
            disks = [_Disk(frames, e, os.path.join(self.tmp, f"disk{e['index']}.idx"))
                     for e in self.entries]
            from ganeti_vol.repo.restore import import_into_existing

            result = import_into_existing(_Moved(frames, disks),  # type: ignore[arg-type]
                                          self.instance, state_dir=self.ctx.node.state_dir,
                                          workers=self.ctx.node.workers)
            return {"result": result}, b""
        raise E.ProtocolError(f"unknown request '{op}' (a newer source?)")


def receive(ctx: Any, instance: Instance, rfd: int = 0, wfd: int = 1) -> None:
    """Serve one move into ``instance`` on ``rfd``/``wfd`` (stdin/stdout under ssh)."""
    receiver = Receiver(ctx, instance)
    try:
        os.write(wfd, wire.greeting())
        receiver.peer = wire.Peer(rfd, wfd, "source", handler=receiver.handle)
        receiver.peer.run()
    finally:
        receiver.close()
