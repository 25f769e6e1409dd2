"""create / reinstall / rename / verify-params against real OS definitions in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Instance
from ganeti_vol.ganeti import config as cfgmod
from ganeti_vol.ganeti import fields
from ganeti_vol.ops import operations

RECORD_ENV = 'env | sort > "$RECORD"\n'


def instance(tmp_path, os_name="testos+default", disks=(("d0.img", 8 << 20),), **kw) -> Instance:
    uuid = fields.instance_uuid_for("inst1.example.com")
    made = tuple(
        fields.make_disk(i, uuid, path=str(tmp_path / p), size=size) for i, (p, size) in enumerate(disks)
    )
    return Instance(name="inst1.example.com", os=os_name, uuid=uuid, ctime=1.0, mtime=2.0,
                    disks=made, **kw)


@pytest.fixture
def ctx(node_config):
    return operations.OpContext(node=node_config)


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_create_runs_the_script_with_the_instance_env_and_creates_sparse_disks(
    tmp_path, ctx, os_factory
):
    rec = tmp_path / "env.txt"
    os_factory(scripts={"create": f'RECORD={rec}; export RECORD\n' + RECORD_ENV})
    inst = instance(tmp_path, osparams={"param1": "v"})
    result = operations.create(ctx, inst)
    env = read_env(rec)
    assert env["INSTANCE_NAME"] == "inst1.example.com"
    assert env["OS_VARIANT"] == "default" and env["OSP_PARAM1"] == "v"
    assert env["DISK_0_PATH"] == str(tmp_path / "d0.img") and env["DISK_0_SIZE"] == "8"
    assert "INSTANCE_REINSTALL" not in env
    disk = tmp_path / "d0.img"
    assert disk.stat().st_size == 8 << 20 and disk.stat().st_blocks == 0
    assert result.to_json()["disks_created"] == [str(disk)]
    assert os.path.basename(result.to_json()["log"]).startswith("add-testos+default-inst1.example.com-")


def test_create_never_truncates_an_existing_larger_disk(tmp_path, ctx, os_factory):
    os_factory()
    disk = tmp_path / "d0.img"
    disk.write_bytes(b"x" * (9 << 20))
    operations.create(ctx, instance(tmp_path))
    assert disk.stat().st_size == 9 << 20


def test_create_refuses_a_disk_smaller_than_declared(tmp_path, ctx, os_factory):
    os_factory()
    (tmp_path / "d0.img").write_bytes(b"x" * 1024)
    with pytest.raises(E.DeviceError, match=r"disk 0 of instance 'inst1.example.com' .* has 1024 bytes"):
        operations.create(ctx, instance(tmp_path))


def test_create_failure_reports_script_status_and_log_tail(tmp_path, ctx, os_factory):
    os_factory(scripts={"create": "echo 'mkfs: bad superblock' >&2\nexit 4"})
    with pytest.raises(E.ScriptFailed) as err:
        operations.create(ctx, instance(tmp_path))
    assert err.value.returncode == 4
    assert "mkfs: bad superblock" in str(err.value)


def test_reinstall_sets_instance_reinstall(tmp_path, ctx, os_factory):
    rec = tmp_path / "env.txt"
    os_factory(scripts={"create": f'RECORD={rec}; export RECORD\n' + RECORD_ENV})
    result = operations.create(ctx, instance(tmp_path), reinstall=True)
    assert read_env(rec)["INSTANCE_REINSTALL"] == "1"
    assert result.to_json()["operation"] == "reinstall"


def test_create_validates_parameters_before_running_anything(tmp_path, ctx, os_factory):
    marker = tmp_path / "created"
    os_factory(
        scripts={
            "create": f"touch {marker}",
            "verify": 'echo "param1 must be yes or no, not $OSP_PARAM1" >&2; exit 1',
        }
    )
    with pytest.raises(E.OSDefinitionError) as err:
        operations.create(ctx, instance(tmp_path, osparams={"param1": "maybe"}))
    assert "OS validation script failed (exited with exit code 1)" in str(err.value)
    assert "param1 must be yes or no, not maybe" in str(err.value)
    assert not marker.exists()
    assert not (tmp_path / "d0.img").exists()


def test_create_of_untrusted_only_os_is_refused(tmp_path, ctx, os_factory):
    os_factory(skip=("create",), scripts={"create_untrusted": "exit 0"})
    with pytest.raises(E.OSDefinitionError, match="untrusted"):
        operations.create(ctx, instance(tmp_path))


def test_verify_params_runs_verify_with_the_parameters_argument_and_core_env(
    tmp_path, ctx, os_factory
):
    rec = tmp_path / "env.txt"
    os_factory(scripts={"verify": f'echo "$@" > {rec}.args\nRECORD={rec}; export RECORD\n' + RECORD_ENV})
    result = operations.verify_params(ctx, instance(tmp_path, osparams={"param1": "x"}))
    assert result["checked"] is True
    assert Path(f"{rec}.args").read_text() == "parameters\n"
    env = read_env(rec)
    env.pop("PWD", None)
    env.pop("RECORD", None)
    assert set(env) == {"OS_API_VERSION", "OS_NAME", "OS_VARIANT", "DEBUG_LEVEL", "PATH", "OSP_PARAM1"}


def test_verify_params_rejects_unknown_parameters_and_missing_variant(tmp_path, ctx, os_factory):
    os_factory()
    with pytest.raises(E.OSDefinitionError, match="not supported by the OS testos: bogus"):
        operations.verify_params(ctx, instance(tmp_path, osparams={"bogus": "1"}))
    with pytest.raises(E.OSDefinitionError, match="must include a variant"):
        operations.verify_params(ctx, instance(tmp_path, os_name="testos"))


def test_verify_params_below_api20_accepts_anything_like_ganeti(tmp_path, ctx, os_factory):
    os_factory(api=(15,), parameters=None, skip=("verify",))
    result = operations.verify_params(ctx, instance(tmp_path, osparams={"anything": "1"}))
    assert result["checked"] is False


def test_rename_passes_old_name_updates_the_file_and_names_the_log(tmp_path, ctx, os_factory):
    rec = tmp_path / "env.txt"
    os_factory(scripts={"rename": f'RECORD={rec}; export RECORD\n' + RECORD_ENV})
    f = tmp_path / "i.ini"
    f.write_text("[instance]\nname = inst1.example.com\nos = testos+default\n"
                 "[disks]\n[[0]]\npath = d0.img\nsize = 1M\n")
    inst = cfgmod.load_instance(str(f))
    result = operations.rename(ctx, inst, "inst2.example.com")
    env = read_env(rec)
    assert env["INSTANCE_NAME"] == "inst2.example.com"
    assert env["OLD_INSTANCE_NAME"] == "inst1.example.com"
    assert os.path.basename(result.to_json()["log"]).startswith(
        "rename-testos+default-inst1.example.com-inst2.example.com-"
    )
    again = cfgmod.load_instance(str(f))
    assert again.name == "inst2.example.com" and again.uuid == inst.uuid


def test_rename_rejects_an_invalid_or_identical_name(tmp_path, ctx, os_factory):
    os_factory()
    inst = instance(tmp_path)
    with pytest.raises(E.UsageError, match="invalid new instance name"):
        operations.rename(ctx, inst, "bad name!")
    with pytest.raises(E.UsageError, match="already has that name"):
        operations.rename(ctx, inst, inst.name)


def test_missing_os_is_a_clear_error(tmp_path, ctx):
    with pytest.raises(E.OSDefinitionError, match="Directory for OS nothere not found"):
        operations.create(ctx, instance(tmp_path, os_name="nothere"))


# --- OS definitions that ask for block devices (ganeti_vol.conf) ----------------------------

from conftest import losetup_works  # noqa: E402

needs_loop = pytest.mark.skipif(not losetup_works(), reason="losetup does not work here (needs root)")


@needs_loop
def test_block_device_os_gets_loop_devices_with_partitions_and_they_are_detached(
    tmp_path, ctx, os_factory
):
    import subprocess

    rec = tmp_path / "seen.txt"
    d = os_factory("blockos", scripts={
        "create": f'[ -b "$DISK_0_PATH" ] || exit 9\n'
                  f'ls "$DISK_0_PATH"p* > {rec}\n'
                  'echo data | dd of="$DISK_0_PATH"p1 conv=notrunc status=none',
    })
    (d / "ganeti_vol.conf").write_text("[disks]\naccess = block\n")
    disk = tmp_path / "d0.img"
    with open(disk, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["sfdisk", "-q", str(disk)], input="2048,4096,L\n", text=True, check=True)
    operations.create(ctx, instance(tmp_path, os_name="blockos+default"))
    seen = rec.read_text().split()
    assert len(seen) == 1 and seen[0].startswith("/dev/loop") and seen[0].endswith("p1")
    with open(disk, "rb") as f:
        f.seek(2048 * 512)
        assert f.read(5) == b"data\n"
    from ganeti_vol.system import devices

    assert devices.loop_devices_backed_by(str(disk)) == ()


@needs_loop
def test_block_device_os_can_turn_partitions_off(tmp_path, ctx, os_factory):
    import subprocess

    rec = tmp_path / "seen.txt"
    d = os_factory("blockos", scripts={  # the disk and its partition nodes (loop2p1, not loop20)
        "create": f'for f in "$DISK_0_PATH" "$DISK_0_PATH"p*; do [ -e "$f" ] && echo "$f"; done '
                  f'> {rec}; true'})
    (d / "ganeti_vol.conf").write_text("[disks]\naccess = block\npartitions = no\n")
    disk = tmp_path / "d0.img"
    with open(disk, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["sfdisk", "-q", str(disk)], input="2048,4096,L\n", text=True, check=True)
    operations.create(ctx, instance(tmp_path, os_name="blockos+default"))
    assert len(rec.read_text().split()) == 1  # the loop device only, no p1
