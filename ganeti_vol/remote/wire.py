"""The framed protocol of ``ganeti-vol repo serve`` and ``move --receive`` (version 1).

The server first writes :data:`MAGIC` and its protocol version as one line,
``GANETI-VOL-REMOTE 1\\n``, so that a client talking to a shell banner or to
another program stops at once with a clear error.  Then both sides exchange
frames::

    header  u8 kind | u32 id | u32 json length | u64 blob length   (big endian)
    json    UTF-8 JSON object
    blob    raw bytes (a chunk frame, a file)

``kind`` is 1 (request: ``{"op": NAME, ...}``), 2 (reply) or 3 (error reply:
``{"type": CLASS, "exit_code": N, "message": TEXT}``).  A reply carries its
request's id; requests are pipelined (many in flight) and may be answered
out of order.  Either side may send requests (``move`` asks its client for
chunks).  The first request is ``hello`` with the client's version; a
server that does not speak it answers with a ``ProtocolError``.

Memory is bounded: a frame's JSON is at most 16 MiB and its blob at most
64 MiB; a peer handles at most :data:`HANDLERS` requests at once and stops
reading (so the pipe, then the sender, waits) until one finishes.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

from ganeti_vol.core import errors as E

log = logging.getLogger(__name__)

VERSION = 1
MAGIC = b"GANETI-VOL-REMOTE"
HEADER = struct.Struct(">BIIQ")
REQUEST, REPLY, ERROR = 1, 2, 3
MAX_JSON = 16 << 20
MAX_BLOB = 64 << 20
#: requests one peer handles at once (each may hold a chunk frame)
HANDLERS = 4

Handler = Callable[[dict[str, Any], bytes], tuple[dict[str, Any], bytes]]


def greeting() -> bytes:
    return MAGIC + b" %d\n" % VERSION


def error_class(name: str) -> type[E.GanetiVolError]:
    """The error class named ``name`` (GanetiVolError if unknown)."""
    for cls in E.all_error_classes():
        if cls.__name__ == name:
            return cls
    return E.GanetiVolError


def read_exact(fd: int, n: int) -> bytes:
    """``n`` bytes from ``fd``; fewer only at end of file."""
    parts = []
    while n:
        try:
            b = os.read(fd, min(n, 1 << 20))
        except OSError as err:
            raise EOFError(str(err)) from err
        if not b:
            break
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def read_greeting(fd: int, peer: str) -> None:
    """Read and check the server's greeting line (a ProtocolError if it is not ours)."""
    line = b""
    while not line.endswith(b"\n") and len(line) < 200:
        b = read_exact(fd, 1)
        if not b:
            break
        line += b
    if not line:
        raise EOFError("no greeting")
    if not line.startswith(MAGIC + b" "):
        text = line.decode("utf-8", "replace").strip()[:80]
        raise E.ProtocolError(f"{peer} is not a ganeti-vol server (it said '{text}'; check "
                              "GANETI_VOL_REMOTE_COMMAND and the far side's login scripts)")
    try:
        version = int(line[len(MAGIC) + 1:].strip())
    except ValueError:
        raise E.ProtocolError(f"{peer}: unreadable greeting {line[:80]!r}") from None
    if version != VERSION:
        raise E.ProtocolError(f"protocol version mismatch: {peer} speaks version {version}, "
                              f"this ganeti-vol speaks {VERSION} (install the same ganeti-vol "
                              "release on both sides)")


class Peer:
    """One end of a connection: send requests (pipelined), answer the other end's.

    A reader thread (or :meth:`run` in the caller's thread) reads frames:
    replies complete the futures of :meth:`request`; requests go to
    ``handler`` in a small pool.  When the link breaks, every pending and
    later request fails with ``lost()``'s error.
    """

    def __init__(self, rfd: int, wfd: int, name: str, handler: Handler | None = None,
                 lost: Callable[[str], E.GanetiVolError] | None = None,
                 close_write: Callable[[], None] | None = None) -> None:
        self.rfd, self.wfd, self.name = rfd, wfd, name
        self.handler = handler
        self._close_write = close_write
        self._lost = lost or (lambda why: E.RemoteError(f"connection to {name} lost ({why})"))
        self._wlock = threading.Lock()
        self._plock = threading.Lock()
        self._pending: dict[int, futures.Future[tuple[dict[str, Any], bytes]]] = {}
        self._next = 0
        self._error: E.GanetiVolError | None = None
        self._slots = threading.Semaphore(HANDLERS)
        self._pool: futures.ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- sending -------------------------------------------------------------------------

    def _send(self, kind: int, ident: int, obj: dict[str, Any], blob: bytes | memoryview) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode()
        head = HEADER.pack(kind, ident, len(data), len(blob))
        with self._wlock:
            if self._error is not None:
                raise self._error
            if self.wfd < 0:
                raise E.ProgrammerError(f"connection to {self.name} already closed")
            try:
                for part in (head + data, blob):
                    mv = memoryview(part)
                    while mv:
                        n = os.write(self.wfd, mv)
                        mv = mv[n:]
            except OSError as err:
                self._fail(f"write failed: {err.strerror or err}")
                raise self._error from err  # type: ignore[misc]
            self.bytes_sent += len(head) + len(data) + len(blob)

    def request(self, op: str, blob: bytes | memoryview = b"", **args: Any
                ) -> futures.Future[tuple[dict[str, Any], bytes]]:
        """Send a request now; its future gives (reply JSON, reply blob) or raises."""
        fut: futures.Future[tuple[dict[str, Any], bytes]] = futures.Future()
        with self._plock:
            if self._error is not None:
                raise self._error
            self._next = (self._next + 1) & 0xFFFFFFFF
            ident = self._next
            self._pending[ident] = fut
        try:
            self._send(REQUEST, ident, {"op": op, **args}, blob)
        except BaseException:
            with self._plock:
                self._pending.pop(ident, None)
            raise
        return fut

    def call(self, op: str, blob: bytes | memoryview = b"", **args: Any
             ) -> tuple[dict[str, Any], bytes]:
        return self.request(op, blob, **args).result()

    # -- receiving -----------------------------------------------------------------------

    def start(self) -> None:
        """Read frames in a background thread (a client)."""
        self._thread = threading.Thread(target=self.run, name=f"ganeti-vol-{self.name}",
                                        daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Read frames until the link ends (a server calls this in its main thread)."""
        why = "end of stream"
        try:
            while True:
                head = read_exact(self.rfd, HEADER.size)
                if not head:
                    break
                if len(head) < HEADER.size:
                    why = "truncated frame"
                    break
                kind, ident, jlen, blen = HEADER.unpack(head)
                if jlen > MAX_JSON or blen > MAX_BLOB or kind not in (REQUEST, REPLY, ERROR):
                    why = "invalid frame"
                    break
                data = read_exact(self.rfd, jlen)
                blob = read_exact(self.rfd, blen)
                if len(data) < jlen or len(blob) < blen:
                    why = "truncated frame"
                    break
                self.bytes_received += HEADER.size + jlen + blen
                try:
                    obj = json.loads(data)
                except ValueError:
                    why = "invalid frame"
                    break
                if kind == REQUEST:
                    self._dispatch(ident, obj, blob)
                else:
                    self._complete(kind, ident, obj, blob)
        except EOFError as err:
            why = str(err) or why
        finally:
            self._fail(why)
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def _complete(self, kind: int, ident: int, obj: dict[str, Any], blob: bytes) -> None:
        with self._plock:
            fut = self._pending.pop(ident, None)
        if fut is None:
            return
        if kind == REPLY:
            fut.set_result((obj, blob))
        else:
            cls = error_class(str(obj.get("type")))
            fut.set_exception(cls(str(obj.get("message") or "remote error")))

    def _dispatch(self, ident: int, obj: dict[str, Any], blob: bytes) -> None:
        if self.handler is None:
            self._reply_error(ident, E.ProtocolError(f"{self.name} takes no requests"))
            return
        if self._pool is None:
            self._pool = futures.ThreadPoolExecutor(HANDLERS,
                                                    thread_name_prefix="ganeti-vol-serve")
        self._slots.acquire()  # at most HANDLERS requests (and their blobs) at once
        self._pool.submit(self._handle, ident, obj, blob)

    def _handle(self, ident: int, obj: dict[str, Any], blob: bytes) -> None:
        try:
            assert self.handler is not None
            try:
                reply, rblob = self.handler(obj, blob)
            except E.GanetiVolError as err:
                self._reply_error(ident, err)
                return
            except Exception as err:  # a bug: say so to the other side, log it here
                log.exception("%s: request %s failed", self.name, obj.get("op"))
                self._reply_error(ident, E.GanetiVolError(f"internal error on the far side: "
                                                          f"{err!r}"))
                return
            try:
                self._send(REPLY, ident, reply, rblob)
            except E.GanetiVolError:
                pass
        finally:
            self._slots.release()

    def _reply_error(self, ident: int, err: E.GanetiVolError) -> None:
        try:
            self._send(ERROR, ident, {"type": type(err).__name__, "exit_code": err.exit_code,
                                      "message": str(err)}, b"")
        except E.GanetiVolError:
            pass

    def _fail(self, why: str) -> None:
        with self._plock:
            if self._error is None:
                self._error = self._lost(why)
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(self._error)

    @property
    def broken(self) -> bool:
        return self._error is not None

    def close(self) -> None:
        """Stop sending (the other end sees end of stream) and wait for the reader."""
        with self._wlock:
            if self.wfd >= 0:
                try:
                    if self._close_write is not None:
                        self._close_write()
                    else:
                        os.close(self.wfd)
                except OSError:
                    pass
            self.wfd = -1
        if self._thread is not None:
            self._thread.join(timeout=30)
