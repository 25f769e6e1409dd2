"""Content origins: import --from-image stores an image once; instances made from it share
its chunks; repo info shows the origin and the shared bytes."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

import pytest
from test_repository import (  # noqa: F401 (ctx, repo: fixtures)
    CS,
    KIB,
    MIB,
    ROOT,
    ctx,
    export,
    instance,
    make_disk,
    poke,
    repo,
    run,
    sha,
    snapshots,
)

from ganeti_vol.core import errors as E
from ganeti_vol.repo import origin
from ganeti_vol.repo.inspect import info


@pytest.fixture
def image(tmp_path) -> tuple[Path, str]:
    img = make_disk(tmp_path / "debian.img", size=2 * MIB, seed=7)
    return img, hashlib.sha256(img.read_bytes()).hexdigest()


def from_image(capsys, repo, name: str, disk: Path, img: str, digest: str, *extra: str):
    return run(capsys, "import", "--name", name, "--disk", f"{disk},size=2M", repo.path,
               "--from-image", img, "--sha256", digest, "--progress", "none", "--no-hooks",
               "--json", *extra)


def test_from_image_stores_it_once_and_instances_share_its_chunks(
        tmp_path, ctx, repo, image, capsys, node_dirs):
    """Two instances from one image: stored once; disks equal the image; exports add little."""
    img, digest = image
    rc, out, _ = from_image(capsys, repo, "web1.example.com", tmp_path / "w1.img", str(img),
                            digest)
    first = json.loads(out)
    assert 0 == rc and first["origin"]["stored"]
    rc, out, _ = from_image(capsys, repo, "web2.example.com", tmp_path / "w2.img", str(img),
                            digest.upper())
    second = json.loads(out)
    assert 0 == rc and not second["origin"]["stored"]
    assert first["origin"]["id"] == second["origin"]["id"]
    assert sha(img) == sha(tmp_path / "w1.img") == sha(tmp_path / "w2.img")
    assert ["origin"] == [s["kind"] for s in snapshots(repo)]
    poke(tmp_path / "w1.img", 700 * KIB, os.urandom(300))
    r = export(ctx, repo, instance(tmp_path, "web1.example.com", disks=("w1.img",)))
    assert 1 == r["repository"]["new_chunks"]
    shown = info(repo, "web1.example.com")["origin"]
    assert (first["origin"]["id"], digest) == (shown["id"], shown["sha256"])
    data = img.read_bytes()
    nonzero = sum(1 for i in range(0, len(data), CS) if data[i:i + CS] != bytes(CS))
    assert (nonzero - 1) * CS == shown["shared_bytes"]
    rc, out, _ = run(capsys, "repo", "info", f"{repo.path}::web1.example.com")
    assert f"origin:   debian.img (sha256 {digest}), shares" in out


def test_a_wrong_sha256_stores_nothing_and_writes_no_disk(tmp_path, repo, image, capsys,
                                                          node_dirs):
    """The image is hashed on the way in: a mismatch is exit 17 and nothing is published."""
    img, digest = image
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    rc, _, err = from_image(capsys, repo, "web1.example.com", tmp_path / "w1.img", str(img),
                            wrong)
    assert 17 == rc and f"not the expected {wrong}" in err
    assert [] == snapshots(repo)
    assert not (tmp_path / "w1.img").exists()
    assert [] == os.listdir(Path(repo.path, "tmp"))


def test_from_image_needs_a_sha256_and_a_repository(tmp_path, repo, image, capsys, node_dirs):
    """Bad input: a malformed digest, a missing --sha256: exit 3."""
    img, _ = image
    rc, _, err = from_image(capsys, repo, "web1.example.com", tmp_path / "w1.img", str(img),
                            "xyz")
    assert 3 == rc and "invalid --sha256 'xyz'" in err
    rc, _, err = run(capsys, "import", "--name", "w", "--disk", str(tmp_path / "w.img"),
                     repo.path, "--from-image", str(img), "--progress", "none")
    assert 3 == rc and "needs --sha256" in err


def test_from_image_reads_a_url(tmp_path, repo, image, capsys, node_dirs):
    """An http:// image (a local server on loopback) is hashed and stored as it streams."""
    img, digest = image
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{img.name}"
        rc, out, err = from_image(capsys, repo, "web1.example.com", tmp_path / "w1.img", url,
                                  digest)
    finally:
        server.shutdown()
        server.server_close()
    assert 0 == rc, err
    assert sha(img) == sha(tmp_path / "w1.img")
    rc, out, err = from_image(capsys, repo, "web2.example.com", tmp_path / "w2.img",
                              url.replace(img.name, "gone.img"), digest)
    assert 0 == rc, err  # the server is gone: the origin is found by its sha256, not fetched
    assert sha(img) == sha(tmp_path / "w2.img")


def test_instances_of_the_shipped_image_os_back_up_against_their_origin(
        tmp_path, ctx, repo, image, capsys, node_dirs):
    """The image OS's export script feeds the repository; the snapshot names the origin."""
    img, digest = image
    search = str(ROOT / "os-definitions")
    rc, _, err = from_image(capsys, repo, "web1.example.com", tmp_path / "w1.img", str(img),
                            digest)
    assert 0 == rc, err
    rc, out, err = run(capsys, "export", "--name", "web1.example.com", "--os", "image+default",
                       "--disk", str(tmp_path / "w1.img"), "--search-path", search,
                       "--repo", repo.path, "--progress", "none", "--no-hooks", "--json",
                       "-O", f"image={img},image_sha256={digest}")
    assert 0 == rc, err
    result = json.loads(out)
    assert ("script", 0) == (result["disks"][0]["mode"], result["repository"]["new_chunks"])
    shown = info(repo, result["repository"]["snapshot"])["origin"]
    assert shown["sha256"] == digest and shown["shared_bytes"] > 0


def test_origin_records_that_are_damaged_are_ignored_not_trusted(tmp_path, ctx, repo, image):
    """A tampered origin record does not name an origin in later snapshots."""
    img, digest = image
    origin.store_image(repo, str(img), digest)
    rec = Path(repo.path, "origins", "web1.example.com.json")
    rec.write_text('{"id": "x", "checksum": "sha256:0"}')
    make_disk(tmp_path / "d0.img")
    snap = export(ctx, repo, instance(tmp_path))["repository"]["snapshot"]
    assert info(repo, snap)["origin"] is None
    with pytest.raises(E.IntegrityError):
        origin.store_image(repo, str(img), "0" * 64)
