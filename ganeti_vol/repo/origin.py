"""Content origins (EVE's content tree by sha): an image stored once, instances made from it.

``import INSTANCE REPO --from-image URL_OR_PATH --sha256 HEX``:

1. if the repository has no origin with that SHA-256, the image (a raw disk
   image: a path, ``file://``, ``http://`` or ``https://``) is read once,
   hashed with SHA-256 on the way and stored as a snapshot of kind
   ``origin``; a wrong SHA-256 publishes nothing;
2. disk 0 of the instance is imported from the origin (every chunk
   verified, as any import);
3. ``origins/<instance>.json`` records the origin, so each later export of
   the instance names it in its manifest; ``repo info`` then shows how many
   bytes the snapshot shares with the origin.

Instances created from one image share its chunks in the repository: their
first backups store only what changed since the image.  This is what the
shipped ``image`` OS's create script does to disk 0 (write the image after
checking its sha256), done through the repository.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any, BinaryIO

from ganeti_vol.core import errors as E
from ganeti_vol.core.fdio import Cancel, write_all
from ganeti_vol.core.model import Disk, Instance
from ganeti_vol.engine.parallel import Engine
from ganeti_vol.formats.archive import DiskMeta
from ganeti_vol.ganeti import fields
from ganeti_vol.ops.results import ImportResult
from ganeti_vol.repo import format as F
from ganeti_vol.repo.snapshot import Snapshot, SnapshotWriter, list_snapshots
from ganeti_vol.repo.store import Repository, write_atomic

log = logging.getLogger(__name__)

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_PIECE = 1 << 20


def find_origin(repo: Repository, sha256: str) -> str | None:
    """The id of the origin snapshot of the image with this SHA-256, if stored."""
    for m in list_snapshots(repo):
        if m["valid"] and m.get("kind") == "origin" and (m.get("image") or {}).get(
                "sha256") == sha256:
            return str(m["id"])
    return None


def instance_origin(repo: Repository, name: str) -> dict[str, Any] | None:
    """The origin recorded for instance ``name`` (None if none, or if it is unreadable)."""
    path = repo.local_file(F.ORIGINS, f"{name}.json")
    try:
        with open(path, "rb") as f:
            record = F.unseal(f.read(), f"'{path}'")
    except FileNotFoundError:
        return None
    except (OSError, E.GanetiVolError) as err:
        log.warning("ignoring the origin record of '%s': %s", name, err)
        return None
    return {k: record.get(k) for k in ("id", "name", "sha256")}


@contextlib.contextmanager
def _open_image(source: str) -> Iterator[BinaryIO]:
    parsed = urllib.parse.urlparse(source)
    try:
        if parsed.scheme in ("http", "https"):
            with urllib.request.urlopen(source, timeout=60) as resp:  # noqa: S310
                yield resp
            return
        path = urllib.request.url2pathname(parsed.path) if parsed.scheme == "file" else source
        with open(path, "rb") as f:
            yield f
    except OSError as err:  # URLError is an OSError
        why = getattr(err, "reason", None) or err.strerror or err
        raise E.UsageError(f"cannot read image '{source}': {why}") from err


def _feed(src: BinaryIO, fd: int, sha: Any, cancel: Cancel, out: dict[str, Any]) -> None:
    """Copy the image into the pipe, hashing it; closes the pipe's write end."""
    try:
        while not cancel.is_set():
            piece = src.read(_PIECE)
            if not piece:
                break
            sha.update(piece)
            out["size"] += len(piece)
            write_all(fd, piece, cancel, "image pipe")
    except BaseException as err:  # handed to the importing thread
        out["error"] = err
    finally:
        os.close(fd)


def store_image(repo: Repository, source: str, sha256: str, *, workers: int = 0
                ) -> tuple[str, bool]:
    """The origin id of the image (stored now unless it was there); (id, stored now)."""
    existing = find_origin(repo, sha256)
    if existing:
        return existing, False
    name = os.path.basename(urllib.parse.urlparse(source).path) or "image"
    uuid = fields.instance_uuid_for(f"origin-{sha256}")
    pseudo = Instance(name=f"origin-{sha256[:12]}", os="", uuid=uuid, ctime=0.0, mtime=0.0,
                      disks=(Disk(path=source, size_mib=0, uuid=uuid, backend_type="file"),))
    sha = hashlib.sha256()
    fed: dict[str, Any] = {"size": 0}
    cancel = Cancel()
    with _open_image(source) as src, Engine(
            workers=workers, chunk_size=repo.chunk_size, hash_algo=repo.hash_algo) as engine, \
            SnapshotWriter(repo, pseudo, kind="origin",
                           extra={"image": {"source": source, "name": name,
                                            "sha256": sha256}}) as writer:
        rfd, wfd = os.pipe()
        feeder = threading.Thread(target=_feed, args=(src, wfd, sha, cancel, fed),
                                  name="ganeti-vol-image", daemon=True)
        feeder.start()
        try:
            meta = DiskMeta(index=0, uuid=uuid, disk_size=0, mode="raw",
                            source={"path": source, "snapshot": None})
            engine.encode(rfd, writer.disk_sink(0, meta), cancel=cancel, source_kind="pipe",
                          what=f"image '{source}'")
        finally:
            cancel.set()
            os.close(rfd)
            feeder.join()
        if "error" in fed:
            err = fed["error"]
            if isinstance(err, E.GanetiVolError):
                raise err
            raise E.UsageError(f"cannot read image '{source}': {err}") from err
        if sha.hexdigest() != sha256:
            raise E.IntegrityError(f"image '{source}' has SHA-256 {sha.hexdigest()}, not the "
                                   f"expected {sha256}: not stored")
        writer.extra["image"]["size"] = fed["size"]
    log.info("stored image '%s' as origin %s", source, writer.id)
    return writer.id, True


def import_from_image(ctx: Any, instance: Instance, repo_path: str, source: str, sha256: str,
                      *, progress: str = "none") -> ImportResult:
    """Store the image as an origin (once), import it into disk 0, record the origin (in
    the result too, under "origin")."""
    from ganeti_vol.ops import transfer

    sha256 = sha256.lower()
    if not _SHA256_RE.match(sha256):
        raise E.UsageError(f"invalid --sha256 '{sha256}': 64 hex digits expected")
    if not instance.disks:
        raise E.UsageError(f"instance '{instance.name}' has no disk to create from the image")
    repo = Repository.open(repo_path, write=True)
    origin_id, stored = store_image(repo, source, sha256, workers=ctx.node.workers)
    snap = Snapshot(repo, origin_id)
    result = transfer.import_instance(ctx, instance, snap, raw=True, progress=progress)
    record = {"instance": instance.name, "id": origin_id, "sha256": sha256,
              "name": snap.manifest.get("image", {}).get("name")}
    with repo.shared(), repo.writer() as w:
        write_atomic(repo.join(F.ORIGINS, f"{instance.name}.json"), F.seal(record), w.tmpdir,
                     f"origin record of '{instance.name}'")
    return dataclasses.replace(result, extra={**result.extra,
                                              "origin": {**record, "stored": stored}})
