"""``repo upgrade``: migrate an older repository layout in place, crash-safely.

Version 1 -> 2 moves every chunk from ``chunks/<digest>`` to
``chunks/<first 2 hex>/<digest>`` (256 directories instead of one that holds
every chunk of the repository).  Steps, each safe to interrupt with kill -9:

1. take the repository lock exclusively (nothing else may run);
2. write ``config.json`` (atomically) with the new ``format_version`` and an
   ``"upgrade": {"from": 1}`` marker: from now on every other command refuses
   the repository and says to run ``repo upgrade`` again;
3. rename each chunk into its directory (a rename is atomic; the chunks not
   yet moved are moved by a rerun), then fsync the directories;
4. write ``config.json`` without the marker.

Rerunning ``repo upgrade`` on an interrupted repository continues at step 3;
on a current one it does nothing.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ganeti_vol import __version__
from ganeti_vol.core import atomicfile
from ganeti_vol.core.fdio import io_error
from ganeti_vol.repo import format as F
from ganeti_vol.repo.store import Repository, write_atomic

log = logging.getLogger(__name__)


def upgrade(path: str) -> dict[str, Any]:
    repo = Repository.open(path, upgrading=True)
    old = int((repo.config.get("upgrade") or {}).get("from") or repo.version)
    if repo.version == F.FORMAT_VERSION and not repo.config.get("upgrade"):
        return {"repository": repo.path, "from": repo.version, "to": repo.version,
                "moved_chunks": 0, "upgraded": False}
    with repo.exclusive("upgrading"):
        tmp = repo.join(F.TMP)
        for d in (*F.DIRS, *F.chunk_dirs(F.FORMAT_VERSION)):
            os.makedirs(repo.join(d), 0o750, exist_ok=True)
        atomicfile.fsync_dir(repo.join(F.CHUNKS))  # the new directories exist before chunks move in
        config = {k: v for k, v in repo.config.items() if k != "checksum"}
        config.update(format_version=F.FORMAT_VERSION, upgrade={"from": old},
                      upgraded_by=f"ganeti-vol {__version__}")
        write_atomic(repo.join(F.CONFIG), F.seal(config), tmp, f"{repo.what}: {F.CONFIG}")
        moved = _move_chunks(repo)
        del config["upgrade"]
        write_atomic(repo.join(F.CONFIG), F.seal(config), tmp, f"{repo.what}: {F.CONFIG}")
    log.info("upgraded %s from format version %d to %d (%d chunks moved)", repo.what, old,
             F.FORMAT_VERSION, moved)
    return {"repository": repo.path, "from": old, "to": F.FORMAT_VERSION,
            "moved_chunks": moved, "upgraded": True}


def _move_chunks(repo: Repository) -> int:
    root = repo.join(F.CHUNKS)
    moved, dirs = 0, set()
    with os.scandir(root) as it:
        flat = [e.name for e in it if e.is_file() and F.is_digest_name(e.name, repo.hlen)]
    for name in flat:
        dst = os.path.join(root, F.chunk_relpath(name, F.FORMAT_VERSION).split("/", 1)[1])
        try:
            os.makedirs(os.path.dirname(dst), 0o750, exist_ok=True)
            os.rename(os.path.join(root, name), dst)
        except OSError as err:
            raise io_error("move", f"chunk '{root}/{name}'", err) from err
        dirs.add(os.path.dirname(dst))
        moved += 1
    for d in sorted(dirs) + [root]:
        atomicfile.fsync_dir(d)
    return moved
