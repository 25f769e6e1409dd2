"""ganeti_vol.osapi, the helper library for OS scripts written in Python: real environments
from ganeti-vol's own builders, real bash, real signals, real loop devices."""

from __future__ import annotations

import errno
import logging
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import losetup_works, sparse_file

from ganeti_vol import osapi
from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Instance, Nic
from ganeti_vol.ganeti import fields
from ganeti_vol.ganeti import environment as env_mod

MiB = 1 << 20
needs_loop = pytest.mark.skipif(not losetup_works(), reason="needs root and loop devices")


def params(**values: str) -> osapi.OSParams:
    return osapi.OSParams.from_environ({f"OSP_{k.upper()}": v for k, v in values.items()})


# --- typed getters -----------------------------------------------------------------------


def test_get_bool_false_string_is_false_not_truthy():
    """Regression (vagrant-libvirt's bool("False")): the text False means False."""
    assert False is params(compress="False").get_bool("compress")


@pytest.mark.parametrize("text,expected", [
    ("yes", True), ("YES", True), ("true", True), ("On", True), ("1", True),
    ("no", False), ("No", False), ("FALSE", False), ("off", False), ("0", False),
    (" yes ", True),
])
def test_get_bool_accepts_the_usual_words_in_any_case(text, expected):
    """yes/no, true/false, on/off, 1/0, case-insensitive, surrounding blanks ignored."""
    assert expected is params(flag=text).get_bool("flag")


@pytest.mark.parametrize("text", ["maybe", "2", "y", ""])
def test_get_bool_rejects_anything_else_naming_the_parameter(text):
    """Not a boolean (and an empty value): OSDefinitionError naming the parameter and value."""
    with pytest.raises(E.OSDefinitionError, match="OS parameter 'flag'.*not a boolean"):
        params(flag=text).get_bool("flag")


def test_unset_is_told_apart_from_empty():
    """Unset: the default; set but empty: '' for strings, [] for lists."""
    p = params(empty="")
    assert p.is_set("empty") and not p.is_set("missing")
    assert "" == p.get_str("empty", default="fallback")
    assert "fallback" == p.get_str("missing", default="fallback")
    assert [] == p.get_list("empty", default=["a"])
    assert ["a"] == p.get_list("missing", default=["a"])
    assert p.get("missing") is None and "" == p.get("empty")


def test_unset_parameter_without_default_is_required():
    """No default: an unset parameter is an error that says how to give it."""
    with pytest.raises(E.OSDefinitionError, match="'size' is required.*-O size="):
        params().get_int("size")


def test_get_int_checks_number_and_bounds():
    """Whole numbers only, within the bounds given."""
    assert 42 == params(n="42").get_int("n")
    with pytest.raises(E.OSDefinitionError, match="'4x' is not a whole number"):
        params(n="4x").get_int("n")
    with pytest.raises(E.OSDefinitionError, match="more than 10"):
        params(n="11").get_int("n", maximum=10)


def test_get_list_splits_on_unescaped_separators_only():
    """Backslash escapes the separator and itself; items are stripped, empty ones dropped."""
    p = params(keys=r"ssh-rsa AAA\, x , b\\,c,,", semi=r"a;b\;c")
    assert ["ssh-rsa AAA, x", "b\\", "c"] == p.get_list("keys")
    assert ["a", "b;c"] == p.get_list("semi", sep=";")


def test_parameter_names_match_ganeti_osp_mapping():
    """OSP_<NAME> upper case with '-' as '_': image-sha256 and image_sha256 are the same key."""
    env = env_mod.core_env(_os_def(), "testos", {"image-sha256": "abc"})
    p = osapi.OSParams.from_environ(env)
    assert "abc" == p.get_str("image-sha256") == p.get_str("image_sha256")


def test_check_rejects_unknown_and_malformed_parameters():
    """check(spec): unknown names and values of the wrong type are refused, unset ones pass."""
    spec = {"flag": "bool", "n": "int", "mode": ("a", "b"), "names": "list"}
    params(flag="yes", mode="b").check(spec)
    with pytest.raises(E.OSDefinitionError, match="unknown OS parameter.*extra"):
        params(extra="1").check(spec)
    with pytest.raises(E.OSDefinitionError, match="'c' is not one of a, b"):
        params(mode="c").check(spec)


# --- the environment ---------------------------------------------------------------------


def _os_def():
    from ganeti_vol.core.model import OSDefinition

    return OSDefinition(name="testos", path="/nonexistent", api_versions=(20, 15, 10),
                        scripts={}, variants=("default", "big"),
                        parameters=(("flag", ""), ("image-sha256", "")))


def _instance(tmp_path: Path) -> Instance:
    uuid = fields.instance_uuid_for("web1.example.com")
    disks = tuple(fields.make_disk(i, uuid, path=str(tmp_path / f"d{i}.img"), size=(i + 1) * MiB)
                  for i in range(2))
    nic = Nic(mac="aa:00:00:11:22:33", uuid="n-uuid", mode="bridged", link="br0", ip="10.0.0.5",
              network={"name": "net1", "uuid": "net-uuid", "subnet": "10.0.0.0/24"})
    return Instance(name="web1.example.com", os="testos+big", uuid=uuid, ctime=1.5, mtime=2.5,
                    disks=disks, nics=(nic,), osparams={"flag": "off"},
                    beparams={"maxmem": "512"}, hvparams={"kernel_path": "/boot/vmlinuz"})


def test_environment_from_ganeti_vol_builders_parses_into_objects(tmp_path):
    """Instance, disks, NICs, parameters, variant: what the env builders put, osapi reads back."""
    env = osapi.OSEnv.from_environ(env_mod.create_env(_os_def(), _instance(tmp_path),
                                                      reinstall=True, debug=1))
    assert ("testos", "big", 20, 1, True) == (env.os_name, env.variant, env.api_version,
                                             env.debug_level, env.reinstall)
    assert "web1.example.com" == env.require_instance().name
    # filled with Ganeti's defaults, as Ganeti passes them
    assert ("512", "128", "1") == (env.instance.be["maxmem"], env.instance.be["minmem"],
                                   env.instance.be["vcpus"])
    assert "/boot/vmlinuz" == env.instance.hv["kernel_path"]
    assert [str(tmp_path / "d0.img"), str(tmp_path / "d1.img")] == [d.path for d in env.disks]
    assert [1, 2] == [d.size_mib for d in env.disks]
    nic = env.nics[0]
    assert ("aa:00:00:11:22:33", "10.0.0.5", "br0", "10.0.0.0/24") == (
        nic.mac, nic.ip, nic.bridge, nic.network["subnet"])
    assert False is env.params.get_bool("flag")


def test_verify_environment_has_no_instance():
    """verify gets only the core variables: no instance, and asking for one says why."""
    env = osapi.OSEnv.from_environ(env_mod.verify_env(_os_def(), "testos", {}))
    assert env.instance is None and () == env.disks
    with pytest.raises(E.UsageError, match="INSTANCE_NAME is not set"):
        env.require_instance()


@pytest.mark.parametrize("op", ["export", "import"])
def test_transfer_disk_is_the_indexed_disk_at_the_given_device(tmp_path, op):
    """EXPORT_INDEX/IMPORT_INDEX pick the disk; EXPORT_DEVICE/IMPORT_DEVICE (a snapshot) is used."""
    builder = env_mod.export_env if op == "export" else env_mod.import_env
    raw = builder(_os_def(), _instance(tmp_path), 1, device="/dev/snap1")
    disk = osapi.OSEnv.from_environ(raw).transfer_disk(op)
    assert (1, "/dev/snap1", str(tmp_path / "d1.img")) == (disk.index, disk.device, disk.disk.path)


def test_transfer_disk_outside_an_export_says_so(tmp_path):
    """A create environment has no EXPORT_INDEX: a UsageError, not a KeyError."""
    env = osapi.OSEnv.from_environ(env_mod.create_env(_os_def(), _instance(tmp_path)))
    with pytest.raises(E.UsageError, match="EXPORT_INDEX is not set"):
        env.transfer_disk("export")


def test_malformed_counts_are_usage_errors():
    """DISK_COUNT=two names the variable instead of crashing."""
    with pytest.raises(E.UsageError, match="DISK_COUNT='two'"):
        osapi.OSEnv.from_environ({"INSTANCE_NAME": "x", "DISK_COUNT": "two"})


def test_variant_config_reads_shell_style_assignments(tmp_path):
    """variants/<variant>.conf: KEY=VALUE, quotes, comments, export; a bad line names file:line."""
    (tmp_path / "variants").mkdir()
    conf = tmp_path / "variants" / "big.conf"
    conf.write_text('# comment\nIMAGE="/srv/my image.img"  # trailing\nexport FORMAT=qcow2\n')
    env = osapi.OSEnv.from_environ({"OS_VARIANT": "big"})
    assert {"IMAGE": "/srv/my image.img", "FORMAT": "qcow2"} == env.variant_config(str(tmp_path))
    conf.write_text("IMAGE=ok\nthis is not an assignment\n")
    with pytest.raises(E.ConfigError, match="big.conf':2"):
        env.variant_config(str(tmp_path))


# --- EXP_SIZE_FD -------------------------------------------------------------------------


def test_exp_size_fd_above_9_from_a_real_bash_script(tmp_path):
    """bash opens fd 11 (dash cannot), Python writes the size line to it, stdout stays clean."""
    disk = sparse_file(tmp_path / "d.img", 3 * MiB + 512)
    code = ("from ganeti_vol import osapi; from ganeti_vol.osapi import rawio; import sys; "
            "osapi.announce_size(rawio.disk_size(sys.argv[1]))")
    script = f'exec 11>"{tmp_path}/size"; EXP_SIZE_FD=11 "{sys.executable}" -c "{code}" "{disk}"'
    res = subprocess.run(["bash", "-c", script], capture_output=True, timeout=30)
    assert 0 == res.returncode, res.stderr
    assert b"" == res.stdout
    assert f"{3 * MiB + 512}\n" == (tmp_path / "size").read_text()


def test_announce_size_without_exp_size_fd_does_nothing():
    """Outside an export (no EXP_SIZE_FD) announcing is a no-op that says so."""
    assert False is osapi.announce_size(123, environ={})


# --- logging and main --------------------------------------------------------------------


def _run_main(capsys, handler, environ, argv=("osdef.py", "create")):
    rc = osapi.main({"create": handler}, argv=list(argv), environ=environ)
    return rc, capsys.readouterr()


def test_main_puts_the_decisive_error_in_the_last_line(capsys):
    """Whatever was logged before, the last stderr line is 'ERROR: ...' with the cause."""
    def handler(script):
        for i in range(30):
            script.log.info("noise %d", i)
        raise E.DeviceError("cannot use disk 0 '/dev/x': too small\n    detail line")

    rc, out = _run_main(capsys, handler, {"OS_NAME": "myos"})
    assert E.DeviceError.exit_code == rc
    last = out.err.strip().splitlines()[-1]
    assert "ERROR: myos create: cannot use disk 0 '/dev/x': too small" == last
    assert "" == out.out


def test_main_shows_a_traceback_for_bugs_and_still_ends_with_error(capsys):
    """An unexpected exception is a bug: traceback for the author, ERROR line last."""
    def handler(script):
        {}["missing"]

    rc, out = _run_main(capsys, handler, {})
    assert 0 != rc
    assert "Traceback" in out.err
    assert out.err.strip().splitlines()[-1].startswith("ERROR: ")
    assert "KeyError" in out.err.strip().splitlines()[-1]


@pytest.mark.parametrize("level,shown", [("0", False), ("1", True)])
def test_debug_level_switches_debug_logging(capsys, level, shown):
    """DEBUG_LEVEL 0 logs INFO and up; 1 and above adds DEBUG."""
    def handler(script):
        script.log.debug("a debug line")
        script.log.info("an info line")

    rc, out = _run_main(capsys, handler, {"DEBUG_LEVEL": level})
    assert 0 == rc
    assert "an info line" in out.err
    assert shown == ("a debug line" in out.err)


def test_main_prints_usage_through_the_given_function_on_help(capsys):
    """--help: the script's own usage is shown (by the script's print), exit 0, nothing run."""
    shown = []
    rc = osapi.main({"verify": lambda s: 1 / 0}, usage={"verify": "usage: verify parameters"},
                    show=shown.append, argv=["osdef.py", "verify", "--help"], environ={})
    assert (0, ["usage: verify parameters"]) == (rc, shown)


# --- cleanup stack -----------------------------------------------------------------------


def test_cleanup_runs_in_reverse_and_logs_each_step(caplog):
    """Steps run last-in first-out, each logged as 'undo: ...'."""
    order = []
    with caplog.at_level(logging.INFO, logger="ganeti_vol.osapi"):
        with osapi.CleanupStack() as stack:
            stack.callback(order.append, 1, description="first")
            stack.callback(order.append, 2, description="second")
    assert [2, 1] == order
    assert ["undo: second", "undo: first"] == [r.getMessage() for r in caplog.records]


def test_cleanup_retries_busy_steps_with_backoff():
    """EBUSY (umount, losetup -d) is retried until it succeeds."""
    calls = []

    def busy_twice():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise OSError(errno.EBUSY, "Device or resource busy")

    with osapi.CleanupStack(busy_timeout=5) as stack:
        stack.callback(busy_twice, description="detach")
    assert 3 == len(calls)
    assert calls[2] - calls[1] > calls[1] - calls[0]  # the delay grows


def test_failing_cleanup_step_does_not_stop_the_others():
    """A broken step is reported after the remaining steps ran."""
    ran = []

    def broken():
        raise RuntimeError("boom")

    with pytest.raises(E.GanetiVolError, match="cleanup failed: boom"):
        with osapi.CleanupStack() as stack:
            stack.callback(ran.append, "a")
            stack.callback(broken)
    assert ["a"] == ran


CLEANUP_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ganeti_vol import osapi

    def create(script):
        out = Path(sys.argv[2])
        script.cleanup.callback(out.joinpath("undone").write_text, "yes",
                                description="remove the temporary mount")
        out.joinpath("ready").write_text("1")
        time.sleep(60)

    sys.exit(osapi.main({"create": create}, argv=[sys.argv[0], sys.argv[1]]))
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_cleanup_stack_runs_on_a_signal_in_a_real_subprocess(tmp_path, signum):
    """SIGTERM/SIGINT/SIGHUP: the undo steps run, the exit code is 128+N, ERROR line last."""
    script = tmp_path / "osdef.py"
    script.write_text(CLEANUP_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), "create", str(tmp_path)],
                            stderr=subprocess.PIPE, env=dict(os.environ, OS_NAME="sigos"))
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "ready").exists():
            assert time.monotonic() < deadline, "the script did not start"
            time.sleep(0.02)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert 128 + signum == proc.returncode
    assert "yes" == (tmp_path / "undone").read_text()
    lines = err.decode().strip().splitlines()
    assert "undo: remove the temporary mount" in err.decode()
    name = signal.Signals(signum).name
    assert f"ERROR: sigos create: interrupted by {name}; cleaned up" == lines[-1]


# --- block devices and the sparse copy ----------------------------------------------------


def _mbr_disk(path: Path, size: int = 8 * MiB) -> Path:
    """A disk with one MBR partition from 1 MiB to the end (written by hand)."""
    sparse_file(path, size)
    entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, size // 512 - 2048)
    with open(path, "r+b") as f:
        f.seek(446)
        f.write(entry)
        f.seek(510)
        f.write(b"\x55\xaa")
    return path


@needs_loop
def test_block_device_attaches_a_file_disk_with_its_partitions_and_detaches_it(tmp_path):
    """A file disk becomes /dev/loopN with loopNp1 for the ``with``; nothing stays attached."""
    disk = _mbr_disk(tmp_path / "d.img")
    with osapi.CleanupStack() as stack:
        dev = stack.enter_context(osapi.block_device(str(disk)), description="detach disk 0")
        assert dev.attached and dev.device.startswith("/dev/loop")
        assert (f"{dev.device}p1",) == dev.partitions
        assert os.path.exists(dev.partition(1))
        name = os.path.basename(dev.device)
    with open(f"/sys/block/{name}/size") as f:
        assert "0" == f.read().strip()  # detached


@needs_loop
def test_block_device_writes_through_a_partition_are_seen_through_the_disk(tmp_path):
    """What a program writes through loopNp1 without fsync is seen through /dev/loopN in the
    same ``with`` block and is in the file after it (ganeti-vol holds no stale cache)."""
    disk = _mbr_disk(tmp_path / "d.img")
    marker = b"written-through-p1" * 100
    with osapi.block_device(str(disk)) as dev:
        with open(dev.device, "rb") as f:  # the disk's page cache now holds these zeros
            f.seek(MiB)
            assert f.read(len(marker)) == bytes(len(marker))
        subprocess.run(["dd", f"of={dev.partition(1)}", "status=none"], input=marker, check=True)
        with open(dev.device, "rb") as f:
            f.seek(MiB)
            assert f.read(len(marker)) == marker
    with open(disk, "rb") as f:
        f.seek(MiB)
        assert f.read(len(marker)) == marker


def test_block_device_of_a_missing_path_is_a_device_error(tmp_path):
    """A path that is not a file or block device is a DeviceError naming it."""
    with pytest.raises(E.DeviceError, match="nope"):
        with osapi.block_device(str(tmp_path / "nope")):
            pass


def test_copy_image_never_truncates_and_refuses_a_larger_image(tmp_path):
    """The sparse copy keeps the disk's size and tail; a larger image is refused untouched."""
    image = tmp_path / "img.raw"
    image.write_bytes(b"i" * MiB)
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"d" * (4 * MiB))
    osapi.copy_image(str(image), str(disk))
    data = disk.read_bytes()
    assert (4 * MiB, b"i" * MiB, b"d" * (3 * MiB)) == (len(data), data[:MiB], data[MiB:])
    with pytest.raises(E.DeviceError, match="the disk only"):
        osapi.copy_image(str(disk), str(image))


def test_copy_image_and_restore_stream_pass_verify_through(tmp_path):
    """OS scripts get restore's read-back verification from osapi too."""
    image = tmp_path / "img.raw"
    image.write_bytes(os.urandom(MiB) + bytes(MiB) + b"tail")
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"d" * (4 * MiB))
    assert osapi.copy_image(str(image), str(disk), verify=True).verified
    assert not osapi.copy_image(str(image), str(disk)).verified
    with open(image, "rb") as f:
        assert osapi.restore_stream(f.fileno(), str(disk), verify=True).verified
    assert disk.read_bytes()[:2 * MiB + 4] == image.read_bytes()


# --- commands ----------------------------------------------------------------------------


def test_run_command_failure_quotes_the_command_and_its_output(tmp_path):
    """A failing tool: ScriptError with the command line and its last output lines."""
    with pytest.raises(E.ScriptError) as info:
        osapi.run_command(["gzip", "-dc", str(tmp_path / "missing.gz")])
    text = str(info.value)
    command = f"command 'gzip -dc {tmp_path}/missing.gz'"
    assert text.startswith(f"{command} failed (exited with exit code 1)")
    assert "No such file or directory" in text


def test_command_output_fd_streams_a_decompressor_into_a_disk(tmp_path):
    """xz -dc | restore, all in process: the disk gets the bytes, the tool is reaped."""
    raw = tmp_path / "img.raw"
    raw.write_bytes(os.urandom(MiB) + bytes(MiB))
    subprocess.run(["xz", "-k", "-0", str(raw)], check=True)
    disk = sparse_file(tmp_path / "disk.img", 4 * MiB)
    with osapi.command_output_fd(["xz", "-dc", f"{raw}.xz"]) as fd:
        osapi.restore_stream(fd, str(disk))
    assert raw.read_bytes() == disk.read_bytes()[: 2 * MiB]


def test_unknown_tool_is_a_usage_error():
    """A missing program is named with the PATH searched."""
    with pytest.raises(E.UsageError, match="cannot run 'no-such-tool-xyz': not found"):
        osapi.run_command(["no-such-tool-xyz"])
