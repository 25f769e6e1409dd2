"""``repo prune``: keep snapshots by calendar rules, per instance, remove the rest.

borg's rules (``borg prune``), applied to each instance's export
snapshots separately:

* the rules run in the order last, hourly, daily, weekly, monthly, yearly;
* each walks the snapshots newest first and keeps the newest snapshot of
  each period (local time; ISO weeks) that no earlier rule kept, until it
  has kept N;
* a rule that ends up short keeps the oldest snapshot too, as current borg
  does (its ``[oldest]``), so a young series is not thinned away;
* ``--keep-last N`` treats every snapshot as its own period (restic's
  ``--keep-last``; borg's ``--keep-secondly`` would merge two snapshots made
  in the same second).

Prune removes snapshot metadata only; ``repo gc`` frees the chunks that no
snapshot names any more.  Origins and snapshots whose manifest is damaged are
never pruned.
"""

from __future__ import annotations

import time
from typing import Any

from ganeti_vol.core import errors as E
from ganeti_vol.repo.snapshot import list_snapshots, remove_snapshot
from ganeti_vol.repo.store import Repository

RULES: tuple[tuple[str, str | None], ...] = (
    ("last", None),
    ("hourly", "%Y-%m-%d %H"),
    ("daily", "%Y-%m-%d"),
    ("weekly", "%G-%V"),
    ("monthly", "%Y-%m"),
    ("yearly", "%Y"),
)


def _period(snap: dict[str, Any], fmt: str | None) -> str:
    if fmt is None:
        return str(snap["id"])
    return time.strftime(fmt, time.localtime(float(snap["timestamp"])))


def plan(snaps: list[dict[str, Any]], keep: dict[str, int]) -> dict[str, str]:
    """{id: reason} of the snapshots to keep (``snaps``: one instance's manifests)."""
    kept: dict[str, str] = {}
    newest_first = sorted(snaps, key=lambda s: (float(s["timestamp"]), s["id"]), reverse=True)
    for rule, fmt in RULES:
        n = keep.get(rule, 0)
        if n <= 0:
            continue
        count, last = 0, None
        s = None
        for s in newest_first:
            period = _period(s, fmt)
            if period == last:
                continue
            last = period
            if s["id"] not in kept:
                count += 1
                kept[s["id"]] = f"{rule} #{count}"
                if count == n:
                    break
        if s is not None and count < n and s["id"] not in kept:
            kept[s["id"]] = f"{rule}[oldest] #{count + 1}"
    return kept


def prune(repo: Repository, keep: dict[str, int], *, instance: str | None = None,
          dry_run: bool = False) -> dict[str, Any]:
    """Apply the rules to every instance (or one); the decision for each snapshot."""
    if not any(v > 0 for v in keep.values()):
        raise E.UsageError("repo prune needs at least one --keep-* rule above 0 (it would "
                           "remove every snapshot)")
    with repo.shared(), repo.writer() as w:
        manifests = list_snapshots(repo)
        by_instance: dict[str, list[dict[str, Any]]] = {}
        for m in manifests:
            if m["valid"] and m.get("kind") == "export":
                by_instance.setdefault(m["instance"]["name"], []).append(m)
        decisions = []
        for name in sorted(by_instance):
            if instance and name != instance:
                continue
            kept = plan(by_instance[name], keep)
            for m in sorted(by_instance[name], key=lambda s: (float(s["timestamp"]), s["id"])):
                reason = kept.get(m["id"])
                decisions.append({"id": m["id"], "instance": name, "created": m.get("created"),
                                  "tag": m.get("tag"), "keep": reason is not None,
                                  "reason": reason})
        for d in decisions:
            if not d["keep"] and not dry_run:
                remove_snapshot(repo, d["id"], w.tmpdir)
    return {"repository": repo.path, "dry_run": dry_run, "rules": keep,
            "snapshots": decisions,
            "kept": sum(1 for d in decisions if d["keep"]),
            "removed": sum(1 for d in decisions if not d["keep"])}
