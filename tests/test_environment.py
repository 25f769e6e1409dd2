"""Golden environment tables (Ganeti OSCoreEnv / OSEnvironment and per-operation extras)."""

from __future__ import annotations

import re

from ganeti_vol.core.model import Disk, Instance, Nic, OSDefinition
from ganeti_vol.ganeti import environment as env_mod
from ganeti_vol.ganeti import params as ganeti_params

OS20 = OSDefinition(
    name="debootstrap",
    path="/srv/ganeti/os/debootstrap",
    api_versions=(20, 15, 10),
    scripts={"create": "/x/create"},
    variants=("default", "minimal"),
    parameters=(("filesystem", "fs"), ("extra-pkgs", "pkgs")),
)
OS10 = OSDefinition(
    name="noop", path="/usr/share/ganeti/os/noop", api_versions=(5, 10),
    scripts={"create": "/x"}, variants=("ignored",),
)

INSTANCE = Instance(
    name="web1.example.com",
    os="debootstrap+minimal",
    uuid="0b9d7a3e-0000-4000-8000-000000000001",
    ctime=1700000000.5,
    mtime=1700000100.25,
    hypervisor="kvm",
    primary_node="node1-uuid",
    secondary_nodes=("node2-uuid", "node3-uuid"),
    disks=(
        Disk(path="/dev/xenvg/web1-0", size_mib=10240, uuid="disk0-uuid", access="rw",
             name="root", backend_type="block"),
        Disk(path=None, size_mib=512, uuid="disk1-uuid", access="ro",
             backend_type="block", uri="rbd:pool/web1-1"),
    ),
    nics=(
        Nic(mac="aa:00:00:11:22:33", uuid="nic0-uuid", mode="bridged", link="br0",
            ip="192.0.2.10", name="eth0"),
        Nic(mac="aa:00:00:11:22:34", uuid="nic1-uuid", mode="routed", link="",
            network={"name": "net1", "uuid": "net-uuid", "subnet": "198.51.100.0/24",
                     "gateway": "198.51.100.1", "tags": "a b"}),
    ),
    osparams={"filesystem": "ext4", "extra-pkgs": "vim"},
    osparams_private={"root-password": "s3cret"},
    beparams={"maxmem": "1024", "vcpus": "2"},
    hvparams={"kernel_path": "/boot/vmlinuz", "disk_type": "paravirtual", "nic_type": "e1000"},
)

GOLDEN_CREATE = {
    "OS_API_VERSION": "20",
    "OS_NAME": "debootstrap",
    "OS_VARIANT": "minimal",
    "DEBUG_LEVEL": "0",
    "PATH": "/sbin:/bin:/usr/sbin:/usr/bin",
    "OSP_FILESYSTEM": "ext4",
    "OSP_EXTRA_PKGS": "vim",
    "OSP_ROOT_PASSWORD": "s3cret",
    "INSTANCE_NAME": "web1.example.com",
    "INSTANCE_OS": "debootstrap+minimal",
    "INSTANCE_UUID": "0b9d7a3e-0000-4000-8000-000000000001",
    "INSTANCE_CTIME": "1700000000.5",
    "INSTANCE_MTIME": "1700000100.25",
    "INSTANCE_PRIMARY_NODE": "node1-uuid",
    "INSTANCE_SECONDARY_NODES": "node2-uuid node3-uuid",
    "HYPERVISOR": "kvm",
    "DISK_COUNT": "2",
    "NIC_COUNT": "2",
    "DISK_0_ACCESS": "rw",
    "DISK_0_UUID": "disk0-uuid",
    "DISK_0_PATH": "/dev/xenvg/web1-0",
    "DISK_0_NAME": "root",
    "DISK_0_FRONTEND_TYPE": "paravirtual",
    "DISK_0_BACKEND_TYPE": "block",
    "DISK_0_SIZE": "10240",
    "DISK_1_ACCESS": "ro",
    "DISK_1_UUID": "disk1-uuid",
    "DISK_1_URI": "rbd:pool/web1-1",
    "DISK_1_FRONTEND_TYPE": "paravirtual",
    "DISK_1_BACKEND_TYPE": "block",
    "DISK_1_SIZE": "512",
    "NIC_0_MAC": "aa:00:00:11:22:33",
    "NIC_0_UUID": "nic0-uuid",
    "NIC_0_NAME": "eth0",
    "NIC_0_IP": "192.0.2.10",
    "NIC_0_MODE": "bridged",
    "NIC_0_BRIDGE": "br0",
    "NIC_0_LINK": "br0",
    "NIC_0_FRONTEND_TYPE": "e1000",
    "NIC_1_MAC": "aa:00:00:11:22:34",
    "NIC_1_UUID": "nic1-uuid",
    "NIC_1_MODE": "routed",
    "NIC_1_NETWORK_NAME": "net1",
    "NIC_1_NETWORK_UUID": "net-uuid",
    "NIC_1_NETWORK_TAGS": "a b",
    "NIC_1_NETWORK_SUBNET": "198.51.100.0/24",
    "NIC_1_NETWORK_GATEWAY": "198.51.100.1",
    "NIC_1_FRONTEND_TYPE": "e1000",
    # every backend and kvm parameter, Ganeti's defaults under the instance's own
    # (tests/test_ganeti_fidelity.py checks the defaults against Ganeti's code)
    **{f"INSTANCE_BE_{k}": str(v) for k, v in ganeti_params.be_defaults().items()},
    "INSTANCE_BE_maxmem": "1024",
    "INSTANCE_BE_vcpus": "2",
    **{f"INSTANCE_HV_{k}": str(v) for k, v in ganeti_params.hv_defaults("kvm").items()},
    "INSTANCE_HV_kernel_path": "/boot/vmlinuz",
    "INSTANCE_HV_disk_type": "paravirtual",
    "INSTANCE_HV_nic_type": "e1000",
}


def test_create_env_matches_the_golden_table_exactly():
    assert env_mod.create_env(OS20, INSTANCE) == GOLDEN_CREATE


def test_every_hypervisor_and_backend_default_is_passed_as_ganeti_fills_them():
    """INSTANCE_HV_* carries all 65 kvm parameters and INSTANCE_BE_* all six backend ones,
    Ganeti's defaults unless the instance sets them; disk_type gives DISK_<n>_FRONTEND_TYPE
    (snf-image builds '-device ,id=disk0' without it)."""
    bare = INSTANCE.replace(hvparams={}, beparams={}, hypervisor="kvm")
    env = env_mod.create_env(OS20, bare)
    assert 65 == sum(k.startswith("INSTANCE_HV_") for k in env)
    assert {"always_failover": "False", "auto_balance": "True", "maxmem": "128",
            "minmem": "128", "spindle_use": "1", "vcpus": "1"} == {
        k[len("INSTANCE_BE_"):]: v for k, v in env.items() if k.startswith("INSTANCE_BE_")}
    assert ("/usr/bin/kvm", "True", "38400", "paravirtual", "paravirtual", "paravirtual") == (
        env["INSTANCE_HV_kvm_path"], env["INSTANCE_HV_acpi"], env["INSTANCE_HV_serial_speed"],
        env["DISK_0_FRONTEND_TYPE"], env["DISK_1_FRONTEND_TYPE"], env["NIC_0_FRONTEND_TYPE"])
    xen = env_mod.create_env(OS20, bare.replace(hypervisor="xen-pvm"))
    assert 18 == sum(k.startswith("INSTANCE_HV_") for k in xen)
    assert "DISK_0_FRONTEND_TYPE" not in xen  # xen-pvm has no disk_type
    lxc = env_mod.create_env(OS20, bare.replace(hypervisor="lxc"))
    assert 7 == sum(k.startswith("INSTANCE_HV_") for k in lxc)
    assert 25 == sum(k.startswith("INSTANCE_HV_") for k in
                     env_mod.create_env(OS20, bare.replace(hypervisor="xen-hvm")))


def test_import_and_export_scripts_get_lc_all_c_as_under_ganetis_daemon():
    """Ganeti's import-export daemon runs the scripts with LC_ALL=C (utils.StartDaemon)."""
    assert "C" == env_mod.import_env(OS20, INSTANCE, 0)["LC_ALL"]
    assert "C" == env_mod.export_env(OS20, INSTANCE, 0)["LC_ALL"]
    assert "LC_ALL" not in env_mod.create_env(OS20, INSTANCE)  # RunCmd(reset_env=True)


def test_a_nul_byte_in_a_value_is_refused_naming_the_variable():
    """execve cannot carry a NUL byte: a one-line UsageError, never a ValueError traceback."""
    import pytest

    from ganeti_vol.core import errors as E

    inst = INSTANCE.replace(osparams={"motd": "a\0b"})
    with pytest.raises(E.UsageError, match=r"'OSP_MOTD'.*NUL byte") as info:
        env_mod.create_env(OS20, inst)
    assert "\n" not in str(info.value)
    with pytest.raises(E.UsageError, match=r"NUL"):
        env_mod.create_env(OS20, INSTANCE.replace(hvparams={"kernel_args": "ro\0"}))


def test_reinstall_adds_instance_reinstall_only_then():
    env = env_mod.create_env(OS20, INSTANCE, reinstall=True)
    assert env == {**GOLDEN_CREATE, "INSTANCE_REINSTALL": "1"}


def test_rename_env_carries_new_and_old_name():
    env = env_mod.rename_env(OS20, INSTANCE.replace(name="new.example.com"), "web1.example.com")
    assert env["INSTANCE_NAME"] == "new.example.com"
    assert env["OLD_INSTANCE_NAME"] == "web1.example.com"
    assert set(env) == set(GOLDEN_CREATE) | {"OLD_INSTANCE_NAME"}


def test_export_env_adds_export_variables_for_the_disk():
    env = env_mod.export_env(OS20, INSTANCE, 0, device="/dev/xenvg/web1-0.snap")
    extra = {k: v for k, v in env.items() if k not in GOLDEN_CREATE}
    assert extra == {
        "EXPORT_DEVICE": "/dev/xenvg/web1-0.snap",
        "EXPORT_DISK_PATH": "/dev/xenvg/web1-0.snap",
        "EXPORT_INDEX": "0",
        "LC_ALL": "C",
    }
    # DISK_0_PATH keeps the real disk while EXPORT_DEVICE reads the snapshot
    assert env["DISK_0_PATH"] == "/dev/xenvg/web1-0"


def test_import_env_with_uri_only_disk():
    env = env_mod.import_env(OS20, INSTANCE, 1)
    extra = {k: v for k, v in env.items() if k not in GOLDEN_CREATE}
    assert extra == {"IMPORT_DISK_URI": "rbd:pool/web1-1", "IMPORT_INDEX": "1", "LC_ALL": "C"}


def test_verify_env_is_the_core_env_only():
    env = env_mod.verify_env(OS20, "debootstrap+minimal", {"filesystem": "xfs"}, debug=1)
    assert env == {
        "OS_API_VERSION": "20",
        "OS_NAME": "debootstrap",
        "OS_VARIANT": "minimal",
        "DEBUG_LEVEL": "1",
        "PATH": "/sbin:/bin:/usr/sbin:/usr/bin",
        "OSP_FILESYSTEM": "xfs",
    }


def test_os_variant_defaults_to_the_first_variant():
    env = env_mod.core_env(OS20, "debootstrap", {})
    assert env["OS_VARIANT"] == "default"


def test_os_variant_is_empty_below_api15_even_with_variants():
    env = env_mod.core_env(OS10, "noop+ignored", {})
    assert env["OS_VARIANT"] == ""
    assert env["OS_API_VERSION"] == "10"


def test_os_variant_is_empty_without_variants():
    os_def = OSDefinition("x", "/x", (20,), {}, variants=())
    assert env_mod.core_env(os_def, "x", {})["OS_VARIANT"] == ""


def test_osp_naming_uppercases_and_replaces_dashes():
    assert env_mod.osp_name("extra-pkgs") == "OSP_EXTRA_PKGS"
    assert env_mod.osp_name("Mixed_Case-x") == "OSP_MIXED_CASE_X"


def test_private_parameters_override_public_ones_in_the_env():
    inst = INSTANCE.replace(osparams={"a": "public"}, osparams_private={"a": "private"})
    assert env_mod.create_env(OS20, inst)["OSP_A"] == "private"


def test_debug_level_is_passed_through():
    assert env_mod.create_env(OS20, INSTANCE, debug=2)["DEBUG_LEVEL"] == "2"


def test_bridge_is_set_only_in_bridged_mode_and_link_only_if_non_empty():
    env = env_mod.create_env(OS20, INSTANCE)
    assert "NIC_1_BRIDGE" not in env and "NIC_1_LINK" not in env
    inst = INSTANCE.replace(nics=(Nic(mac="m", uuid="u", mode="bridged", link=""),))
    env = env_mod.create_env(OS20, inst)
    assert env["NIC_0_BRIDGE"] == "" and "NIC_0_LINK" not in env


def test_every_key_is_upper_case_except_be_and_hv_keys_and_all_values_are_strings():
    env = env_mod.create_env(OS20, INSTANCE, reinstall=True)
    for key, value in env.items():
        assert isinstance(value, str)
        if not key.startswith(("INSTANCE_BE_", "INSTANCE_HV_")):
            assert re.fullmatch(r"[A-Z0-9_]+", key), key


def test_with_devices_points_disk_paths_at_attached_devices():
    inst = env_mod.with_devices(INSTANCE, {0: "/dev/loop3"})
    assert inst.disks[0].path == "/dev/loop3"
    assert inst.disks[1] == INSTANCE.disks[1]
