"""The shipped OS definitions raw and image, run through ganeti-vol's own operations
(create, export, import) exactly as a node would run them: real scripts, real lz4/gzip/xz
and qemu-img CLIs, real sparse files."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from conftest import sparse_file
from disk_helpers import make_format, sha256, with_sidecar

from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Instance
from ganeti_vol.ganeti import fields
from ganeti_vol.ganeti import discovery
from ganeti_vol.ops import operations, transfer

REPO = Path(__file__).resolve().parent.parent
SHIPPED = str(REPO / "os-definitions")
MiB = 1 << 20
DISK = 8 * MiB
MARK = b"pre-existing data beyond the image: must survive\n"


@pytest.fixture
def ctx(node_config):
    return operations.OpContext(node=node_config.replace(stall_timeout=20), search_path=(SHIPPED,))


def instance(tmp_path: Path, os_name: str, disk: str = "d0.img", name: str = "vm1.example.com",
             **osparams: str) -> Instance:
    uuid = fields.instance_uuid_for(name)
    made = (fields.make_disk(0, uuid, path=str(tmp_path / disk), size=DISK),)
    return Instance(name=name, os=os_name, uuid=uuid, ctime=1.0, mtime=1.0, disks=made,
                    osparams=dict(osparams))


def raw_image(path: Path, size: int = 2 * MiB) -> Path:
    """Text at 0, random bytes at 1 MiB, a hole between: a small disk image."""
    rnd = random.Random(7)
    sparse_file(path, size)
    with open(path, "r+b") as f:
        f.write(b"".join(b"image line %d\n" % i for i in range(20000)))
        f.seek(MiB + 4096)
        f.write(rnd.randbytes(256 << 10))
    return path


def disk_with_mark(path: Path) -> Path:
    sparse_file(path, DISK)
    with open(path, "r+b") as f:
        f.seek(DISK - MiB)
        f.write(MARK)
    return path


def script_failure(ctx, inst) -> str:
    with pytest.raises(E.ScriptFailed) as info:
        operations.create(ctx, inst)
    return str(info.value)


def last_log_line(text: str) -> str:
    return text.strip().splitlines()[-1].strip()


# --- validity ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,params", [("raw", ("zero_target",)),
                                         ("image", ("image", "image_format", "image_sha256"))])
def test_shipped_os_is_valid_api_20_with_variants_and_parameters(name, params):
    """Both are valid for Ganeti's checks: API 20 (and 15, 10), a variant, parameters."""
    entry = discovery.probe_os(name, os.path.join(SHIPPED, name))
    assert entry.valid, entry.diagnose
    assert ((20, 15, 10), ("default",), params) == (
        entry.os.api_versions, entry.os.variants, entry.os.parameter_names)


# --- raw -------------------------------------------------------------------------------------


def test_raw_create_leaves_the_disk_as_it_is(tmp_path, ctx):
    """create of the raw OS writes nothing."""
    disk = raw_image(tmp_path / "d0.img", DISK)
    before = sha256(disk)
    operations.create(ctx, instance(tmp_path, "raw+default"))
    assert before == sha256(disk)


def test_raw_export_import_round_trip_through_dump_and_restore(tmp_path, ctx):
    """export (ganeti-vol dump) -> archive -> import (ganeti-vol restore): same bytes, sparse."""
    disk = raw_image(tmp_path / "d0.img", DISK)
    inst = instance(tmp_path, "raw+default")
    result = transfer.export_instance(ctx, inst)
    assert "script" == result.to_json()["mode"] and DISK == result.to_json()["size"]
    target = sparse_file(tmp_path / "new.img", DISK)
    transfer.import_instance(ctx, instance(tmp_path, "raw+default", "new.img"), result.to_json()["path"])
    assert sha256(disk) == sha256(target)
    assert os.stat(target).st_blocks * 512 < 2 * MiB


def test_raw_import_with_zero_target_skips_zero_runs(tmp_path, ctx):
    """zero_target=yes trusts the target to read as zeros: zero runs are not written."""
    disk = raw_image(tmp_path / "d0.img", DISK)
    result = transfer.export_instance(ctx, instance(tmp_path, "raw+default"))
    target = tmp_path / "used.img"
    target.write_bytes(b"\xee" * DISK)  # not zero: the parameter is a promise, not a check
    transfer.import_instance(ctx, instance(tmp_path, "raw+default", "used.img", zero_target="yes"),
                             result.to_json()["path"], raw=False)
    data, want = target.read_bytes(), disk.read_bytes()
    assert want[: 256 << 10] == data[: 256 << 10]  # the text was written
    assert b"\xee" * 4096 == data[DISK - 4096:]  # a zero run of the image was skipped


def test_raw_verify_rejects_a_non_boolean_zero_target(tmp_path, ctx):
    """verify parameters fails on zero_target=maybe, naming the parameter."""
    sparse_file(tmp_path / "d0.img", DISK)
    with pytest.raises(E.OSDefinitionError, match="zero_target"):
        operations.verify_params(ctx, instance(tmp_path, "raw+default", zero_target="maybe"))


# --- image ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "gz", "xz", "lz4", "qcow2"])
def test_image_create_writes_each_format_and_never_truncates(tmp_path, ctx, fmt):
    """raw, gzip, xz, lz4 and qcow2 images land byte for byte; the disk keeps size and tail."""
    raw = raw_image(tmp_path / "img.raw")
    image = with_sidecar(make_format(raw, fmt))
    disk = disk_with_mark(tmp_path / "d0.img")
    operations.create(ctx, instance(tmp_path, "image+default", image=str(image)))
    data = disk.read_bytes()
    assert DISK == len(data)
    assert raw.read_bytes() == data[: 2 * MiB]
    assert data[DISK - MiB:].startswith(MARK)


def test_image_create_on_a_fresh_sparse_disk_keeps_it_sparse(tmp_path, ctx):
    """A fresh file disk reads as zeros: the image's zero runs are not written."""
    image = with_sidecar(make_format(raw_image(tmp_path / "img.raw"), "gz"))
    disk = sparse_file(tmp_path / "d0.img", DISK)
    operations.create(ctx, instance(tmp_path, "image+default", image=str(image)))
    assert os.stat(disk).st_blocks * 512 < MiB + (512 << 10)


def test_image_sha256_mismatch_is_refused_before_writing(tmp_path, ctx):
    """A replaced or corrupt image (sidecar hash differs): create fails, the disk is untouched."""
    image = with_sidecar(raw_image(tmp_path / "img.raw"), "0" * 64)
    disk = sparse_file(tmp_path / "d0.img", DISK)
    text = script_failure(ctx, instance(tmp_path, "image+default", image=str(image)))
    assert "refusing a corrupt or replaced image" in last_log_line(text)
    assert last_log_line(text).startswith("ERROR: image create:")
    assert 0 == os.stat(disk).st_blocks


def test_image_sha256_parameter_is_checked_too(tmp_path, ctx):
    """image_sha256 given as a parameter: a match installs, a mismatch is refused."""
    image = raw_image(tmp_path / "img.raw")
    sparse_file(tmp_path / "d0.img", DISK)
    operations.create(ctx, instance(tmp_path, "image+default", image=str(image),
                                    image_sha256=sha256(image)))
    text = script_failure(ctx, instance(tmp_path, "image+default", image=str(image),
                                        image_sha256="f" * 64))
    assert "expected " + "f" * 64 in text


def test_image_without_any_checksum_is_refused_unless_switched_off(tmp_path, ctx):
    """No sidecar and no parameter: refused with the fix in the message; none skips the check."""
    image = raw_image(tmp_path / "img.raw")
    sparse_file(tmp_path / "d0.img", DISK)
    text = script_failure(ctx, instance(tmp_path, "image+default", image=str(image)))
    assert "no sha256 for image" in text and "sha256sum" in text
    operations.create(ctx, instance(tmp_path, "image+default", image=str(image),
                                    image_sha256="none"))


@pytest.mark.parametrize("fmt", ["raw", "gz", "qcow2"])
def test_image_larger_than_the_disk_is_refused(tmp_path, ctx, fmt):
    """An image bigger than disk 0 fails; the file disk keeps its size."""
    raw = raw_image(tmp_path / "img.raw", 12 * MiB)
    with open(raw, "r+b") as f:
        f.seek(11 * MiB)
        f.write(b"beyond the disk")
    image = with_sidecar(make_format(raw, fmt))
    disk = sparse_file(tmp_path / "d0.img", DISK)
    text = script_failure(ctx, instance(tmp_path, "image+default", image=str(image)))
    assert last_log_line(text).startswith("ERROR: image create:")
    assert any(word in text for word in ("the disk only", "the disk has only",
                                         "past the end of the target"))
    assert DISK == disk.stat().st_size


def test_image_without_an_image_says_how_to_give_one(tmp_path, ctx):
    """No parameter and no IMAGE= in the variant file: a clear refusal."""
    sparse_file(tmp_path / "d0.img", DISK)
    text = script_failure(ctx, instance(tmp_path, "image+default"))
    assert "no image to install: give -O image=" in last_log_line(text)


def test_image_verify_checks_its_parameters(tmp_path, ctx):
    """verify parameters: a bad format, a malformed sha256 and a missing image are refused."""
    sparse_file(tmp_path / "d0.img", DISK)
    for bad, word in (({"image_format": "zip"}, "image_format"),
                      ({"image_sha256": "xyz"}, "image_sha256"),
                      ({"image": str(tmp_path / "missing.img")}, "is not a file")):
        with pytest.raises(E.OSDefinitionError, match=word):
            operations.verify_params(ctx, instance(tmp_path, "image+default", **bad))


def test_image_export_import_round_trip(tmp_path, ctx):
    """After create, export and import move the raw disk (the osapi dump/restore path)."""
    image = with_sidecar(make_format(raw_image(tmp_path / "img.raw"), "xz"))
    disk = sparse_file(tmp_path / "d0.img", DISK)
    inst = instance(tmp_path, "image+default", image=str(image))
    operations.create(ctx, inst)
    result = transfer.export_instance(ctx, inst)
    target = sparse_file(tmp_path / "new.img", DISK)
    transfer.import_instance(ctx, instance(tmp_path, "image+default", "new.img"), result.to_json()["path"])
    assert sha256(disk) == sha256(target)
