"""Read-only views of a repository: snapshot list, snapshot info, and the diff of two snapshots."""

from __future__ import annotations

import itertools
from typing import Any

from ganeti_vol.repo.snapshot import Snapshot, list_snapshots, resolve
from ganeti_vol.repo.store import Repository


def summary(m: dict[str, Any]) -> dict[str, Any]:
    """The list view of one manifest."""
    if not m["valid"]:
        return {"id": m["id"], "valid": False, "error": m["error"]}
    disks = m["disks"]
    return {
        "id": m["id"], "valid": True, "kind": m.get("kind"), "instance": m["instance"]["name"],
        "os": m["instance"].get("os"), "tag": m.get("tag"), "created": m.get("created"),
        "disks": len(disks), "size": sum(int(d["size"]) for d in disks),
        "stored_bytes": sum(int(d.get("stored_bytes") or 0) for d in disks),
        "new_bytes": sum(int(d.get("new_stored_bytes") or 0) for d in disks),
        "origin": (m.get("origin") or {}).get("id"),
    }


def list_repo(repo: Repository, instance: str | None = None) -> list[dict[str, Any]]:
    out = [summary(m) for m in list_snapshots(repo)]
    if instance:
        out = [s for s in out if s.get("instance") == instance]
    return out


def info(repo: Repository, spec: str) -> dict[str, Any]:
    """A snapshot's instance, disks, sizes, what it added, and its origin with shared bytes."""
    snap = Snapshot(repo, resolve(repo, spec))
    m = snap.manifest
    out = summary({"valid": True, **m})
    out.update({
        "repository": repo.path, "path": snap.path, "finished": m.get("finished"),
        "created_by": m.get("created_by"), "chunk_hash": repo.hash_algo,
        "disks": [
            {k: d.get(k) for k in ("index", "uuid", "name", "size", "disk_size", "chunk_size",
                                   "chunks", "zero_chunks", "zero_bytes", "digest",
                                   "stored_bytes", "new_chunks", "new_bytes", "new_stored_bytes",
                                   "reused_chunks", "reused_bytes")}
            | {"mode": (d.get("source") or {}).get("mode")}
            for d in m["disks"]
        ],
    })
    out["origin"] = origin_sharing(repo, snap)
    return out


def origin_sharing(repo: Repository, snap: Snapshot) -> dict[str, Any] | None:
    """The snapshot's origin and how many of its bytes are chunks of that origin."""
    origin = snap.manifest.get("origin")
    if not origin:
        return None
    result = dict(origin)
    try:
        osnap = Snapshot(repo, origin["id"])
    except Exception as err:  # noqa: BLE001 - the origin may have been removed
        result.update({"shared_bytes": None, "error": str(err)})
        return result
    have: set[bytes] = set()
    for disk in osnap.disks:  # an origin is one image: its digests fit in memory
        have.update(d for _, zero, _, d in disk.open_index().entries() if not zero)
    shared = 0
    for disk in snap.disks:
        idx = disk.open_index()
        for i, zero, _, digest in idx.entries():
            if not zero and digest in have:
                shared += min(idx.chunk_size, idx.size - i * idx.chunk_size)
    result["shared_bytes"] = shared
    return result


def _runs(changed: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i in changed:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def diff(repo: Repository, spec_a: str, spec_b: str) -> dict[str, Any]:
    """Changed chunk ranges, per disk, between two snapshots (A then B)."""
    a = Snapshot(repo, resolve(repo, spec_a))
    b = Snapshot(repo, resolve(repo, spec_b))
    disks = []
    for index in sorted({d.index for d in a.disks} | {d.index for d in b.disks}):
        da = next((d for d in a.disks if d.index == index), None)
        db = next((d for d in b.disks if d.index == index), None)
        if da is None or db is None:
            only = db or da
            assert only is not None
            disks.append({"index": index, "only_in": b.id if db else a.id,
                          "size": only.size, "changed_bytes": only.size, "ranges": []})
            continue
        ia, ib = da.open_index(), db.open_index()
        cs = ib.chunk_size
        changed = [i for (i, ea, eb) in _pairs(ia, ib) if ea != eb]
        ranges, changed_bytes = [], 0
        size = max(ia.size, ib.size)
        for first, count in _runs(changed):
            offset = first * cs
            length = min(count * cs, size - offset)
            ranges.append({"offset": offset, "length": length})
            changed_bytes += length
        disks.append({"index": index, "size_a": ia.size, "size_b": ib.size,
                      "chunks_changed": len(changed), "changed_bytes": changed_bytes,
                      "ranges": ranges})
    return {"repository": repo.path, "a": a.id, "b": b.id, "disks": disks,
            "changed_bytes": sum(d["changed_bytes"] or 0 for d in disks)}


def _pairs(ia: Any, ib: Any) -> Any:
    """(chunk index, entry of A or None, entry of B or None) for every chunk of either."""
    for ea, eb in itertools.zip_longest(ia.entries(), ib.entries()):
        i = (ea or eb)[0]
        yield i, (ea[1], ea[3]) if ea else None, (eb[1], eb[3]) if eb else None
