"""The fault campaign (issue 11, "Done when"): seeded random damage and hostile members.

Every file of a real archive (native lz4 and ``--format ganeti``) and a real
export stream gets random bit flips and truncations; a zoo of hostile
archives replaces each member by a symlink, a FIFO, a device, a directory or
a huge sparse file, and points names and sizes out of bounds.  For every
case:

- ``backup verify`` (one real CLI process for a whole batch, so its peak RSS
  is measured) never says ok for a damaged native archive, never hangs and
  never shows a traceback, and stays within 200 MiB;
- an import of what verify found broken fails, and an import that fails
  leaves each target disk untouched, wholly imported (an earlier disk of a
  stream) or named broken in the error; only a Ganeti export, which records
  no checksums, may import damaged dumps with success; no import writes into
  the archive.

The seed is random per run and printed on failure; ``GV_FAULT_SEED=N`` replays a
run.  The counts are small enough for CI (about 20 s here).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import stat
from pathlib import Path

import pytest
from test_hostile_archives import (  # noqa: F401 (node, ctx: fixtures)
    RSS_LIMIT_MIB,
    Targets,
    ctx,
    export_archive,
    export_stream,
    manifest,
    node,
    run_cli,
    write_manifest,
)

from ganeti_vol.core import errors as E
from ganeti_vol.ops import transfer

SEED = int(os.environ.get("GV_FAULT_SEED") or random.randrange(1 << 32))
#: per file of an archive, and for the stream
FLIPS, CUTS = 8, 4
STREAM_FLIPS, STREAM_CUTS = 40, 20
#: no single import may take longer (a hang fails the test instead of blocking CI)
DEADLINE = 60


def fail(problem: str) -> None:
    pytest.fail(f"GV_FAULT_SEED={SEED}: {problem}")


@pytest.fixture(autouse=True)
def announce_seed():
    print(f"fault campaign seed: GV_FAULT_SEED={SEED}")


@contextlib.contextmanager
def deadline(what: str, seconds: int = DEADLINE):
    """Fail (with the seed) instead of hanging: SIGALRM interrupts a blocked read."""
    def expired(signum, frame):
        raise TimeoutError(f"{what} still ran after {seconds}s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    except TimeoutError as err:
        fail(str(err))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def tree_digest(path: Path) -> dict[str, tuple]:
    """What an archive directory holds: every entry's type, size, mtime and (small files) hash."""
    out = {}
    for p in sorted(path.iterdir()):
        st = p.lstat()
        small = stat.S_ISREG(st.st_mode) and st.st_size < 64 << 20
        out[p.name] = (st.st_mode, st.st_size, st.st_mtime_ns,
                       hashlib.sha256(p.read_bytes()).hexdigest() if small else None)
    return out


def mutations(rnd: random.Random, path: Path) -> list[tuple[str, str, int]]:
    """(file, "flip"|"cut", bit or length) for every regular file of an archive."""
    out = []
    for f in sorted(p.name for p in path.iterdir()):
        size = (path / f).stat().st_size
        out += [(f, "flip", rnd.randrange(size * 8)) for _ in range(FLIPS)]
        out += [(f, "cut", rnd.randrange(size)) for _ in range(CUTS)]
    return out


def damage(data: bytes, kind: str, where: int) -> bytes:
    if kind == "cut":
        return data[:where]
    out = bytearray(data)
    out[where // 8] ^= 1 << (where % 8)
    return bytes(out)


def judge_failure(targets: Targets, tmp_path: Path, err: Exception, case: str) -> None:
    """After a failed import every target disk is untouched, whole, or named broken."""
    images = [(tmp_path / f"src{i}.img").read_bytes() for i in range(2)]
    for i, (path, before) in enumerate(zip(targets.paths, targets.before, strict=True)):
        now = path.read_bytes()
        if now != before and now[:len(images[i])] != images[i] and "broken" not in str(err):
            fail(f"{case}: the import failed after writing part of disk {i}, without naming "
                 f"it broken: {err}")


def check_import(ctx, tmp_path: Path, source: Path, case: str, *, must_fail: bool,
                 must_be_exact: bool = False) -> None:
    """Import the archive ``source`` raw into fresh targets and judge the outcome.

    ``must_fail``: verify found the damage, so the import must fail too; it
    may always fail, but never after writing without naming the disk broken,
    and never change the archive.
    """
    targets = Targets(tmp_path)
    before = tree_digest(source)
    try:
        with deadline(f"import of {case}"):
            transfer.import_instance(ctx, targets.instance, str(source), raw=True)
    except E.GanetiVolError as err:
        judge_failure(targets, tmp_path, err, case)
    except Exception as err:  # noqa: BLE001 (anything else is a bug)
        fail(f"{case}: the import raised {err!r}")
    else:
        if must_fail:
            fail(f"{case}: backup verify found it broken, but it imported with success")
        if must_be_exact:
            images = [(tmp_path / f"src{i}.img").read_bytes() for i in range(2)]
            for i, path in enumerate(targets.paths):
                if path.read_bytes()[:len(images[i])] != images[i]:
                    fail(f"{case}: backup verify said ok and the import succeeded, but disk "
                         f"{i} differs from what was exported")
    if tree_digest(source) != before:
        fail(f"{case}: the import changed the archive")


def verify_batch(node, paths: list[Path], what: str) -> list[dict]:
    """``backup verify --json`` of every path in one CLI process: results, peak RSS checked."""
    run = run_cli(node["conf"], "backup", "verify", "--json", "--progress", "none",
                  *map(str, paths), timeout=120)
    if "Traceback" in run.err or run.rc not in (0, 1, 12, 15, 16, 17):
        fail(f"{what}: verify exited {run.rc}: {run.err[-2000:]}")
    if run.rss_mib > RSS_LIMIT_MIB:
        fail(f"{what}: verify of {len(paths)} archives peaked at {run.rss_mib:.0f} MiB")
    return json.loads(run.out)["archives"]


@pytest.mark.parametrize("fmt", ["native", "ganeti"])
def test_random_damage_to_every_archive_file_is_caught_and_never_imported(ctx, node, tmp_path,
                                                                          fmt):
    """Bit flips and truncations of each file: verify says broken (native), imports stay safe."""
    rnd = random.Random(f"{SEED}-{fmt}")
    good = export_archive(ctx, tmp_path, fmt=fmt)
    cases, paths = [], []
    for n, (name, kind, where) in enumerate(mutations(rnd, good)):
        path = tmp_path / "damaged" / f"{n:03d}"
        shutil.copytree(good, path)
        data = (good / name).read_bytes()
        (path / name).write_bytes(damage(data, kind, where))
        cases.append(f"{fmt} archive, {name} {kind} at {where}")
        paths.append(path)
    results = verify_batch(node, paths, f"{fmt} archives")
    neutral = []
    for case, path, result in zip(cases, paths, results, strict=True):
        if fmt == "native" and result["ok"]:
            # verify checks what the dumps decode to (every chunk's digest) and the manifest,
            # not the compressed bytes themselves: a flip LZ4 decodes to the same bytes (the
            # last token's ignored match nibble, an offset into a run of equal bytes) is not
            # damage to the data, so it must import exactly (doc/security.md)
            neutral.append(case)
            check_import(ctx, tmp_path, path, case, must_fail=False, must_be_exact=True)
            continue
        check_import(ctx, tmp_path, path, case, must_fail=not result["ok"])
    if len(neutral) * 10 > len(cases):
        fail(f"{len(neutral)} of {len(cases)} damaged archives passed verify: {neutral}")


def test_random_damage_to_a_stream_is_caught_and_never_imported(ctx, node, tmp_path):
    """Bit flips and truncations anywhere in a stream: every import fails, no bad byte lands."""
    rnd = random.Random(f"{SEED}-stream")
    good = export_stream(ctx, tmp_path)
    cases = [("flip", rnd.randrange(len(good) * 8)) for _ in range(STREAM_FLIPS)]
    cases += [("cut", rnd.randrange(len(good))) for _ in range(STREAM_CUTS)]
    for kind, where in cases:
        targets = Targets(tmp_path)
        stream = tmp_path / "damaged.gvs"
        stream.write_bytes(damage(good, kind, where))
        with deadline(f"stream {kind} at {where}"), open(stream, "rb") as f:
            try:
                transfer.import_instance(ctx, targets.instance, "-", in_fd=f.fileno(), raw=True)
            except E.GanetiVolError as err:
                judge_failure(targets, tmp_path, err, f"stream {kind} at {where}")
            else:
                fail(f"stream {kind} at {where}: imported with success")
    # a few through the real CLI: no traceback, bounded memory
    for kind, where in rnd.sample(cases, 3):
        stream = tmp_path / "damaged.gvs"
        stream.write_bytes(damage(good, kind, where))
        targets = Targets(tmp_path)
        run = run_cli(node["conf"], "import", "--name", "dst", "--disk", str(targets.paths[0]),
                      "--disk", str(targets.paths[1]), "--raw", "-", stdin=stream)
        if run.rc == 0 or "Traceback" in run.err or run.rss_mib > RSS_LIMIT_MIB:
            fail(f"stream {kind} at {where} through the CLI: exit {run.rc}, "
                 f"{run.rss_mib:.0f} MiB: {run.err[-2000:]}")


# --- the hostile zoo ---------------------------------------------------------------------


def replace_member(path: Path, name: str, kind: str, outside: Path) -> None:
    """Replace the archive file ``name`` by something that is not a regular file of it."""
    member = path / name
    data = member.read_bytes()
    member.unlink()
    if kind == "symlink-out":
        copy = outside / f"{path.name}-{name}"
        copy.write_bytes(data)
        member.symlink_to(copy)
    elif kind == "symlink-in":
        (path / "elsewhere").write_bytes(data)
        member.symlink_to("elsewhere")
    elif kind == "fifo":
        os.mkfifo(member)
    elif kind == "device":
        os.mknod(member, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero: endless
    elif kind == "directory":
        member.mkdir()
    elif kind == "huge-sparse":
        with open(member, "wb") as f:
            f.write(data)
            f.truncate(1 << 40)


MEMBER_KINDS = ["symlink-out", "symlink-in", "fifo", "device", "directory", "huge-sparse"]


def hostile_manifest_edits(rnd: random.Random, m: dict, outside: Path) -> list[tuple[str, dict]]:
    """Manifests naming files out of the archive, or with sizes out of bounds (resigned)."""
    huge = [1 << 62, (1 << 64) - 1, -1, 1 << 40, 3 * (1 << 20) + 1]
    out = []
    for key in ("dump", "index_file"):
        for name in ("../" + m["disks"][0][key], str(outside / "x"), "sub/x", ".", ".."):
            out.append((f"{key}={name}", {"disks": 0, key: name}))
    out.append(("config=../config.ini", {"config": "../config.ini"}))
    for key in ("size", "chunks", "chunk_size", "dump_bytes", "disk_size"):
        value = rnd.choice(huge)
        out.append((f"{key}={value}", {"disks": rnd.randrange(2), key: value}))
    return out


def test_hostile_archive_zoo_is_refused_quickly_in_bounded_memory(ctx, node, tmp_path):
    """Links, FIFOs, devices, directories, huge sparse files, names and sizes out of bounds."""
    rnd = random.Random(f"{SEED}-zoo")
    outside = tmp_path / "outside"
    outside.mkdir()
    cases, paths = [], []
    for fmt in ("native", "ganeti"):
        good = export_archive(ctx, tmp_path, fmt=fmt, name=f"good-{fmt}")
        for name in sorted(p.name for p in good.iterdir()):
            for kind in MEMBER_KINDS:
                if kind == "huge-sparse" and fmt == "ganeti" and name != "config.ini":
                    continue  # a Ganeti dump is read to its end, whatever its size (documented)
                path = tmp_path / "zoo" / f"{len(paths):03d}"
                shutil.copytree(good, path, symlinks=True)
                replace_member(path, name, kind, outside)
                cases.append(f"{fmt} archive, {name} replaced by a {kind}")
                paths.append(path)
    good = tmp_path / "exports" / "good-native"
    for label, edit in hostile_manifest_edits(rnd, manifest(good), outside):
        path = tmp_path / "zoo" / f"{len(paths):03d}"
        shutil.copytree(good, path)
        m = manifest(path)
        target = m["disks"][edit.pop("disks")] if "disks" in edit else m
        target.update(edit)
        write_manifest(path, m)
        cases.append(f"native archive, manifest {label}")
        paths.append(path)
    results = verify_batch(node, paths, "the hostile zoo")
    for case, result in zip(cases, results, strict=True):
        if result["ok"]:
            fail(f"{case}: backup verify says ok")
    for case, path in rnd.sample(list(zip(cases, paths, strict=True)), 12):
        check_import(ctx, tmp_path, path, case, must_fail=True)
