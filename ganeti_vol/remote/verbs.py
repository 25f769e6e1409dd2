"""Whole-repository verbs, run where the repository is (:func:`ganeti_vol.remote.run`).

Each takes an opened repository and JSON-able keyword arguments and returns
a JSON-able report, so that ``ssh://`` runs it on the server unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _list(repo: Any, instance: str | None = None) -> dict[str, Any]:
    from ganeti_vol.repo import inspect

    with repo.shared():
        return {"repository": repo.path, "snapshots": inspect.list_repo(repo, instance)}


def _info(repo: Any, snapshot: str) -> dict[str, Any]:
    from ganeti_vol.repo import inspect

    with repo.shared():
        return inspect.info(repo, snapshot)


def _diff(repo: Any, a: str, b: str) -> dict[str, Any]:
    from ganeti_vol.repo import inspect

    with repo.shared():
        return inspect.diff(repo, a, b)


def _remove(repo: Any, snapshot: str) -> dict[str, Any]:
    from ganeti_vol.repo import snapshot as S

    with repo.shared(), repo.writer() as w:
        snap_id = S.resolve(repo, snapshot)
        S.remove_snapshot(repo, snap_id, w.tmpdir)
    return {"removed": f"{repo.path}::{snap_id}"}


def _check(repo: Any, read_data: bool = False, repair_from: str | None = None,
           workers: int = 0) -> dict[str, Any]:
    from ganeti_vol.repo import check

    source = None
    if repair_from:
        import os

        instance = None
        if os.path.isfile(repair_from):
            from ganeti_vol.ganeti.config import load_instance

            instance = load_instance(repair_from)
        source = check.open_source(repo, repair_from, instance)
    return check.check(repo, read_data=read_data, source=source, workers=workers)


def _prune(repo: Any, keep: dict[str, int], instance: str | None = None,
           dry_run: bool = False) -> dict[str, Any]:
    from ganeti_vol.repo import prune

    return prune.prune(repo, keep, instance=instance, dry_run=dry_run)


def _gc(repo: Any, grace: float = 300.0, dry_run: bool = False) -> dict[str, Any]:
    from ganeti_vol.repo import gc

    return gc.gc(repo, grace=grace, dry_run=dry_run)


VERBS: dict[str, Callable[..., dict[str, Any]]] = {
    "list": _list, "info": _info, "diff": _diff, "remove": _remove, "check": _check,
    "prune": _prune, "gc": _gc,
}
#: verbs that open the repository for writing (current format version needed)
WRITING = frozenset({"gc"})
#: verbs an append-only server refuses: they delete, move or rewrite stored data
#: (check quarantines damaged chunks and repairs)
DESTRUCTIVE = frozenset({"remove", "prune", "gc", "check"})
