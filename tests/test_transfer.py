"""Export and import of whole instances, end to end, with real scripts and the real lz4 CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ganeti_vol.cli import common
from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Instance
from ganeti_vol.ganeti import fields
from ganeti_vol.ops import operations, transfer

REPO = Path(__file__).resolve().parent.parent
SAMPLE = str(REPO / "os-definitions")

RAW_EXPORT = '#!/bin/bash\nstat -c %s "$EXPORT_DEVICE" >&"$EXP_SIZE_FD"\nexec cat "$EXPORT_DEVICE"\n'
RAW_IMPORT = 'exec dd of="$IMPORT_DEVICE" bs=1M iflag=fullblock conv=notrunc status=none\n'


def make_image(path: Path, size: int = 12 << 20, seed: int = 1) -> Path:
    """A sparse image: text, random data and holes, deterministic."""
    import random

    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(0)
        f.write(b"".join(b"line %d of the test image\n" % i for i in range(40000)))
        f.seek(5 << 20)
        f.write(rnd.randbytes(1 << 20))
        f.seek(size - 4096)
        f.write(b"tail" * 1024)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def inst(tmp_path, name="inst1.example.com", os_name="rawos", disks=("d0.img",), size=12 << 20,
         **kw) -> Instance:
    uuid = fields.instance_uuid_for(name)
    made = tuple(fields.make_disk(i, uuid, path=str(tmp_path / p), size=size)
                 for i, p in enumerate(disks))
    return Instance(name=name, os=os_name, uuid=uuid, ctime=1.0, mtime=1.0, disks=made, **kw)


@pytest.fixture
def ctx(node_config):
    return operations.OpContext(node=node_config.replace(stall_timeout=20))


@pytest.fixture
def rawos(os_factory):
    return os_factory("rawos", scripts={"export": RAW_EXPORT, "import": RAW_IMPORT})


def published(export_dir) -> list[str]:
    return sorted(os.listdir(export_dir))


def assert_nothing_published(node_dirs):
    assert published(node_dirs["export"]) == [], "something was published or left staged"


def test_script_export_and_import_round_trip_is_byte_identical(tmp_path, ctx, rawos, node_dirs):
    src = inst(tmp_path, disks=("a0.img", "a1.img"))
    make_image(tmp_path / "a0.img")
    make_image(tmp_path / "a1.img", seed=2)
    result = transfer.export_instance(ctx, src)
    assert result.to_json()["path"] == str(node_dirs["export"] / src.name)
    assert [d["mode"] for d in result.to_json()["disks"]] == ["script", "script"]
    dst = inst(tmp_path, name="inst2.example.com", disks=("b0.img", "b1.img"))
    imported = transfer.import_instance(ctx, dst, src.name)
    assert [d["state"] for d in imported.to_json()["disks"]] == ["good", "good"]
    assert sha(tmp_path / "b0.img") == sha(tmp_path / "a0.img")
    assert sha(tmp_path / "b1.img") == sha(tmp_path / "a1.img")


def test_every_dump_decodes_with_the_stock_lz4_cli_alone(tmp_path, ctx, rawos, node_dirs):
    """Operators can recover without ganeti-vol: `lz4 -d dump` is the exact disk image."""
    src = inst(tmp_path)
    make_image(tmp_path / "d0.img")
    transfer.export_instance(ctx, src)
    dump = node_dirs["export"] / src.name / f"{src.disks[0].uuid}.lz4"
    out = tmp_path / "restored.img"
    subprocess.run(["lz4", "-d", "-q", str(dump), str(out)], check=True)
    assert sha(out) == sha(tmp_path / "d0.img")


def test_raw_export_skips_holes_and_imports_sparse(tmp_path, ctx, node_dirs):
    src = inst(tmp_path, os_name="")
    make_image(tmp_path / "d0.img", size=64 << 20)
    result = transfer.export_instance(ctx, src)
    assert result.to_json()["mode"] == "raw"
    disk = result.to_json()["disks"][0]
    assert disk["zero_chunks"] >= 10
    assert result.to_json()["stored_bytes"] < 0.1 * result.to_json()["size"]
    dst = inst(tmp_path, name="copy.example.com", os_name="", disks=("c0.img",), size=64 << 20)
    transfer.import_instance(ctx, dst, src.name)
    out = tmp_path / "c0.img"
    assert sha(out) == sha(tmp_path / "d0.img")
    # three 4 MiB chunks hold data; the 13 zero chunks must not be allocated
    assert out.stat().st_blocks * 512 <= 12 << 20, "zero chunks were written instead of skipped"


def test_import_runs_rename_with_old_instance_name_when_the_name_changed(
    tmp_path, ctx, os_factory
):
    rec = tmp_path / "rename.txt"
    os_factory("rawos", scripts={
        "export": RAW_EXPORT, "import": RAW_IMPORT,
        "rename": f'echo "$OLD_INSTANCE_NAME -> $INSTANCE_NAME" > {rec}',
    })
    src = inst(tmp_path)
    make_image(tmp_path / "d0.img")
    transfer.export_instance(ctx, src)
    result = transfer.import_instance(ctx, inst(tmp_path, name="new.example.com",
                                                disks=("n0.img",)), src.name)
    assert rec.read_text() == "inst1.example.com -> new.example.com\n"
    assert result.to_json()["rename"]["status"] == "ok"


def test_failed_rename_after_import_is_a_warning(tmp_path, ctx, os_factory):
    os_factory("rawos", scripts={"export": RAW_EXPORT, "import": RAW_IMPORT,
                                 "rename": "echo cannot >&2; exit 1"})
    src = inst(tmp_path)
    make_image(tmp_path / "d0.img")
    transfer.export_instance(ctx, src)
    result = transfer.import_instance(ctx, inst(tmp_path, name="x.example.com",
                                                disks=("x.img",)), src.name)
    assert result.to_json()["status"] == "warning" and result.to_json()["rename"]["status"] == "failed"
    assert [d["state"] for d in result.to_json()["disks"]] == ["good"]
    # the failure is the result's one warning: the CLI exits 1 from it
    assert [type(w) for w in result.warnings] == [E.ScriptFailed]
    assert common.finish(result) == E.EXIT_WARNING


def test_export_and_import_results_are_frozen_and_their_json_keeps_its_keys(tmp_path, ctx,
                                                                            rawos):
    src = inst(tmp_path)
    make_image(tmp_path / "d0.img")
    exported = transfer.export_instance(ctx, src)
    imported = transfer.import_instance(ctx, inst(tmp_path, name="k.example.com",
                                                  disks=("k.img",)), src.name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        exported.path = "elsewhere"  # type: ignore[misc]
    assert list(exported.to_json()) == [
        "operation", "instance", "os", "mode", "format", "path", "disks", "size",
        "stored_bytes", "ratio", "seconds", "mb_per_s", "status"]
    assert list(imported.to_json()) == [
        "operation", "instance", "os", "source", "source_format", "disks", "size", "status",
        "rename", "seconds", "mb_per_s"]
    assert list(imported.to_json()["disks"][0])[-6:] == [
        "read_back", "index", "mode", "target", "log", "state"]
    assert (exported.warnings, imported.warnings) == ((), ())
    assert common.finish(exported) == common.finish(imported) == 0


def test_every_import_source_names_itself_to_the_hooks(tmp_path, ctx, rawos, node_dirs):
    """SRC_PATH and SRC_IMAGES come from the source: its dumps, or '-' and none for a stream."""
    src = inst(tmp_path)
    make_image(tmp_path / "d0.img")
    transfer.export_instance(ctx, src)
    transfer.export_instance(ctx, src, fmt="ganeti", name="g")
    stream = tmp_path / "stream"
    with open(stream, "wb") as f:
        transfer.export_instance(ctx, src, output="-", out_fd=f.fileno())
    uuid = src.disks[0].uuid
    for spec, fmt, dump in ((src.name, "native", f"{uuid}.lz4"), ("g", "ganeti", uuid)):
        opened = transfer.open_source(ctx, spec, None, None)
        path = str(node_dirs["export"] / spec)
        assert (opened.format, opened.sequential, opened.indexes) == (fmt, False, [0])
        assert opened.hook_vars() == {"SRC_PATH": path, "SRC_IMAGES": repr([f"{path}/{dump}"])}
        opened.close()
    with open(stream, "rb") as f:
        opened = transfer.open_source(ctx, "-", f.fileno(), None)
        assert (opened.format, opened.sequential, opened.indexes) == ("stream", True, [0])
        assert opened.hook_vars() == {"SRC_PATH": "-", "SRC_IMAGES": "[]"}
        opened.close()


def test_import_takes_the_os_from_the_export_like_ganeti(tmp_path, ctx, rawos):
    src = inst(tmp_path)
    make_image(tmp_path / "d0.img")
    transfer.export_instance(ctx, src)
    dst = inst(tmp_path, name="o.example.com", os_name="", disks=("o.img",))
    result = transfer.import_instance(ctx, dst, src.name, os_given=False)
    assert result.to_json()["os"] == "rawos" and result.to_json()["disks"][0]["mode"] == "script"


# --- failure behaviour (issue 3 §7) --------------------------------------------------------


@pytest.mark.parametrize(
    "body,error,fragment",
    [
        ('head -c 100000 "$EXPORT_DEVICE"; exit 3', E.ScriptFailed, "exited with exit code 3"),
        ('head -c 100000 "$EXPORT_DEVICE"; kill -9 $$', E.ScriptFailed, "signal 9"),
        ("exit 0", E.ShortTransfer, ""),
        ('#!/bin/bash\necho 12582912 >&"$EXP_SIZE_FD"\nhead -c 1000000 "$EXPORT_DEVICE"',
         E.ShortTransfer, "12582912"),
    ],
    ids=["exits-non-zero", "killed", "prints-nothing", "short-of-announced"],
)
def test_failing_export_script_publishes_nothing(tmp_path, ctx, os_factory, node_dirs, body,
                                                 error, fragment):
    os_factory("rawos", scripts={"export": body, "import": RAW_IMPORT})
    src = inst(tmp_path)
    make_image(tmp_path / "d0.img")
    with pytest.raises(error) as err:
        transfer.export_instance(ctx, src)
    assert fragment in str(err.value)
    assert_nothing_published(node_dirs)


def test_export_failure_of_one_disk_stops_the_others_and_publishes_nothing(
    tmp_path, ctx, os_factory, node_dirs
):
    pidfile = tmp_path / "slow.pid"
    os_factory("rawos", scripts={
        "export": f'if [ "$EXPORT_INDEX" = 1 ]; then exit 7; fi\n'
                  f'echo $$ > {pidfile}; cat "$EXPORT_DEVICE"; exec sleep 60',
        "import": RAW_IMPORT,
    })
    src = inst(tmp_path, disks=("a.img", "b.img"))
    make_image(tmp_path / "a.img")
    make_image(tmp_path / "b.img")
    t0 = time.monotonic()
    with pytest.raises(E.ScriptFailed, match="exit code 7"):
        transfer.export_instance(ctx, src)
    assert time.monotonic() - t0 < 15
    assert_nothing_published(node_dirs)
    from test_process import wait_gone

    if pidfile.exists():
        assert wait_gone(int(pidfile.read_text()))


def test_export_script_flooding_stderr_still_exports(tmp_path, ctx, os_factory):
    os_factory("rawos", scripts={
        "export": 'head -c 6000000 /dev/zero | tr "\\0" e >&2; exec cat "$EXPORT_DEVICE"',
        "import": RAW_IMPORT,
    })
    src = inst(tmp_path)
    make_image(tmp_path / "d0.img")
    result = transfer.export_instance(ctx, src)
    assert result.to_json()["size"] == 12 << 20
    assert os.path.getsize(result.to_json()["disks"][0]["log"]) >= 6000000


def test_stalled_export_script_is_killed_and_reported(tmp_path, node_config, os_factory, node_dirs):
    os_factory("rawos", scripts={"export": 'head -c 1000 "$EXPORT_DEVICE"; exec sleep 60',
                                 "import": RAW_IMPORT})
    ctx = operations.OpContext(node=node_config.replace(stall_timeout=1.0))
    src = inst(tmp_path)
    make_image(tmp_path / "d0.img")
    t0 = time.monotonic()
    with pytest.raises(E.StallError, match="no data moved for 1s"):
        transfer.export_instance(ctx, src)
    assert time.monotonic() - t0 < 15
    assert_nothing_published(node_dirs)


def test_full_disk_during_export_is_a_named_error_and_publishes_nothing(tmp_path, node_config,
                                                                      rawos):
    small = tmp_path / "small"
    small.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)],
                         capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {res.stderr.decode().strip()}")
    try:
        ctx = operations.OpContext(node=node_config.replace(export_dir=str(small)))
        src = inst(tmp_path, size=8 << 20)
        img = tmp_path / "d0.img"
        img.write_bytes(os.urandom(8 << 20))
        with pytest.raises(E.NoSpaceError):
            transfer.export_instance(ctx, src)
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_corrupt_dump_is_detected_before_data_reaches_the_disk_and_the_disk_is_broken(
    tmp_path, ctx, rawos, node_dirs
):
    src = inst(tmp_path, os_name="")
    img = tmp_path / "d0.img"
    img.write_bytes(os.urandom(12 << 20))
    transfer.export_instance(ctx, src)
    dump = node_dirs["export"] / src.name / f"{src.disks[0].uuid}.lz4"
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dump.write_bytes(bytes(data))
    dst = inst(tmp_path, name="c.example.com", os_name="", disks=("c.img",))
    with pytest.raises(E.IntegrityError) as err:
        transfer.import_instance(ctx, dst, src.name)
    assert "broken" in str(err.value)


def test_wrong_archive_version_is_refused(tmp_path, ctx, rawos, node_dirs):
    src = inst(tmp_path)
    make_image(tmp_path / "d0.img")
    transfer.export_instance(ctx, src)
    manifest = node_dirs["export"] / src.name / "manifest.json"
    data = json.loads(manifest.read_text())
    data["format_version"] = 99
    manifest.write_text(json.dumps(data))
    with pytest.raises(E.ArchiveFormatError):
        transfer.import_instance(ctx, inst(tmp_path, name="z.example.com", disks=("z.img",)),
                                 src.name)


def test_failing_import_script_is_named_and_the_disk_reported_broken(tmp_path, ctx, os_factory):
    os_factory("rawos", scripts={"export": RAW_EXPORT,
                                 "import": "head -c 1000 >/dev/null; echo 'mkfs failed' >&2; exit 5"})
    src = inst(tmp_path)
    make_image(tmp_path / "d0.img")
    transfer.export_instance(ctx, src)
    with pytest.raises(E.ScriptFailed) as err:
        transfer.import_instance(ctx, inst(tmp_path, name="f.example.com", disks=("f.img",)),
                                 src.name)
    msg = str(err.value)
    assert "exited with exit code 5" in msg and "mkfs failed" in msg
    assert "disk(s) 0 of instance 'f.example.com' are broken" in msg


def test_import_refuses_a_target_smaller_than_the_disk(tmp_path, ctx, rawos):
    src = inst(tmp_path)
    make_image(tmp_path / "d0.img")
    transfer.export_instance(ctx, src)
    small = tmp_path / "small.img"
    small.write_bytes(b"\0" * (1 << 20))
    dst = inst(tmp_path, name="s.example.com", disks=("small.img",), size=1 << 20)
    with pytest.raises(E.DeviceError, match="small"):
        transfer.import_instance(ctx, dst, src.name)
    assert small.stat().st_size == 1 << 20


def test_import_never_truncates_a_larger_file_disk(tmp_path, ctx, rawos):
    src = inst(tmp_path)
    make_image(tmp_path / "d0.img")
    transfer.export_instance(ctx, src)
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(20 << 20)
    transfer.import_instance(ctx, inst(tmp_path, name="b.example.com", disks=("big.img",),
                                       size=20 << 20), src.name)
    assert big.stat().st_size == 20 << 20
    assert big.read_bytes()[: 12 << 20] == (tmp_path / "d0.img").read_bytes()


def test_import_with_more_archive_disks_than_target_disks_is_refused(tmp_path, ctx, rawos):
    src = inst(tmp_path, disks=("a.img", "b.img"))
    make_image(tmp_path / "a.img")
    make_image(tmp_path / "b.img")
    transfer.export_instance(ctx, src)
    with pytest.raises(E.UsageError, match="the export has 2 disks"):
        transfer.import_instance(ctx, inst(tmp_path, name="one.example.com", disks=("o.img",)),
                                 src.name)


# --- Ganeti interop ------------------------------------------------------------------------


def test_ganeti_format_export_is_uncompressed_dumps_named_by_uuid_with_a_v0_config(
    tmp_path, ctx, rawos, node_dirs
):
    src = inst(tmp_path)
    make_image(tmp_path / "d0.img")
    transfer.export_instance(ctx, src, fmt="ganeti")
    d = node_dirs["export"] / src.name
    assert sorted(os.listdir(d)) == sorted(["config.ini", src.disks[0].uuid])
    assert (d / src.disks[0].uuid).read_bytes() == (tmp_path / "d0.img").read_bytes()
    import configparser

    cp = configparser.ConfigParser()  # Ganeti reads it with an interpolating ConfigParser
    cp.read(d / "config.ini")
    assert cp.get("export", "version") == "0"
    assert cp.get("instance", "disk0_dump") == src.disks[0].uuid
    # and ganeti-vol imports it back
    transfer.import_instance(ctx, inst(tmp_path, name="g.example.com", disks=("g.img",)), src.name)
    assert sha(tmp_path / "g.img") == sha(tmp_path / "d0.img")


# --- CLI: stream pipe and Ctrl-C -----------------------------------------------------------


def gv(*argv, **kw):
    return subprocess.Popen([sys.executable, "-m", "ganeti_vol", *argv], cwd=REPO, **kw)


def test_export_to_stream_piped_into_import_from_stream(tmp_path, rawos, node_dirs):
    """`ganeti-vol export … -o - | ganeti-vol import … -` moves an instance."""
    make_image(tmp_path / "d0.img")
    exp = gv("export", "--name", "p1", "--os", "rawos", "--disk", f"{tmp_path}/d0.img",
             "-o", "-", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    imp = gv("import", "--name", "p2", "--disk", f"{tmp_path}/p2.img", "-", "--json",
             stdin=exp.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    exp.stdout.close()
    out, ierr = imp.communicate(timeout=120)
    _, eerr = exp.communicate(timeout=120)
    assert exp.returncode == 0, eerr
    assert imp.returncode == 0, ierr
    assert json.loads(out)["disks"][0]["state"] == "good"
    assert sha(tmp_path / "p2.img") == sha(tmp_path / "d0.img")


@pytest.mark.parametrize("cut", [0.3, 0.9])
def test_truncated_stream_is_detected_and_the_disk_reported_broken(tmp_path, rawos, node_dirs,
                                                                   cut):
    make_image(tmp_path / "d0.img")
    stream = tmp_path / "s.gvs"
    with open(stream, "wb") as out:
        p = gv("export", "--name", "t1", "--os", "rawos", "--disk", f"{tmp_path}/d0.img",
               "-o", "-", stdout=out, stderr=subprocess.PIPE)
        p.communicate(timeout=120)
    data = stream.read_bytes()
    stream.write_bytes(data[: int(len(data) * cut)])
    with open(stream, "rb") as inp:
        imp = gv("import", "--name", "t2", "--disk", f"{tmp_path}/t2.img,size=12M", "-",
                 stdin=inp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, err = imp.communicate(timeout=120)
    assert imp.returncode in (12, 15, 17), err
    assert "broken" in err or "truncated" in err
    assert "Traceback" not in err


def test_ctrl_c_during_export_removes_staging_and_stops_the_script(tmp_path, os_factory,
                                                                   node_dirs):
    pidfile = tmp_path / "pid"
    os_factory("rawos", scripts={"export": f'echo $$ > {pidfile}; head -c 100 "$EXPORT_DEVICE"; '
                                           "exec sleep 60", "import": RAW_IMPORT})
    make_image(tmp_path / "d0.img")
    p = gv("export", "--name", "c1", "--os", "rawos", "--disk", f"{tmp_path}/d0.img",
           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert_nothing_published(node_dirs)
    from test_process import wait_gone

    assert wait_gone(int(pidfile.read_text()))


# --- real OS definitions: sample and Debian's noop -------------------------------------------


def test_sample_os_round_trip_through_its_scripts(tmp_path, node_config):
    ctx = operations.OpContext(node=node_config, search_path=(SAMPLE,))
    src = inst(tmp_path, os_name="sample+default", size=16 << 20, osparams={"payload_mib": "2"})
    operations.create(ctx, src)
    transfer.export_instance(ctx, src)
    dst = inst(tmp_path, name="copy.example.com", os_name="sample+default", disks=("c.img",),
               size=16 << 20)
    transfer.import_instance(ctx, dst, src.name)
    assert sha(tmp_path / "c.img") == sha(tmp_path / "d0.img")


@pytest.mark.skipif(not os.path.isdir("/usr/share/ganeti/os/noop"),
                    reason="Debian package ganeti-os-noop is not installed")
def test_debian_noop_export_import_round_trip_unmodified(tmp_path, node_config):
    ctx = operations.OpContext(node=node_config, search_path=("/usr/share/ganeti/os",))
    src = inst(tmp_path, os_name="noop")
    make_image(tmp_path / "d0.img")
    result = transfer.export_instance(ctx, src)
    assert result.to_json()["disks"][0]["size_hint"] == 12 << 20  # noop announces it on EXP_SIZE_FD
    transfer.import_instance(ctx, inst(tmp_path, name="n2.example.com", os_name="noop",
                                       disks=("n2.img",)), src.name)
    assert sha(tmp_path / "n2.img") == sha(tmp_path / "d0.img")
