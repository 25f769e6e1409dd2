"""Ganeti v0 export config.ini: written so Ganeti reads it back, read as Ganeti does."""

from __future__ import annotations

import configparser

import pytest

from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Disk, Instance, Nic
from ganeti_vol.formats import ganeti_export as G

DISK_UUID = "3f2a7a4c-0d5c-4f5e-9d8e-1a2b3c4d5e6f"
NET_UUID = "6c1f3a52-2b7e-4d0a-9a51-3f4e5d6c7b8a"


def sample_instance(**kw) -> Instance:
    values = dict(
        name="web1.example.com",
        os="debootstrap+bookworm",
        uuid="0b8f6a57-7c6e-4a43-9f38-0c2f7d7c1a01",
        ctime=1.0,
        mtime=2.0,
        primary_node="node1.example.com",
        disks=(
            Disk(path="/srv/d0", size_mib=1024, uuid=DISK_UUID, backend_type="file:loop"),
            Disk(path="/srv/d1", size_mib=10, uuid="9e1b1c9e-93c0-4d9b-a1d3-6f1f2a0c0b11",
                 name="data", backend_type="file:loop"),
        ),
        nics=(Nic(mac="aa:00:00:11:22:33", uuid="n0", link="br0", ip="192.0.2.10"),
              Nic(mac="aa:00:00:11:22:44", uuid="n1", mode="routed",
                  network={"name": "net1", "uuid": NET_UUID})),
        osparams={"Dhcp": "yes", "ratio": "50%", "empty": ""},
        osparams_private={"root_password": "s3cr3t-value"},
        beparams={"maxmem": "2048", "minmem": "1024", "vcpus": "2"},
        hvparams={"kernel_path": "/boot/vmlinuz-%v", "migration_port": "8102"},
        tags=("prod", "web"),
    )
    values.update(kw)
    return Instance(**values)


def ganeti_reads(text: str) -> configparser.ConfigParser:
    """Read config.ini the way Ganeti does: an interpolating ConfigParser."""
    cp = configparser.ConfigParser()
    cp.read_string(text)
    return cp


def test_config_has_the_v0_sections_and_keys_ganeti_reads():
    """The five sections and the [export]/[instance] keys of FinalizeExport are there."""
    cp = ganeti_reads(G.render_config(sample_instance(), {0: DISK_UUID, 1: "d1"}, timestamp=17))
    assert ["export", "instance", "hypervisor", "backend", "os"] == cp.sections()
    assert {"version": "0", "timestamp": "17", "source": "node1.example.com",
            "os": "debootstrap+bookworm", "compression": "none"} == dict(cp["export"])
    ins = cp["instance"]
    assert ("web1.example.com", "2048", "1024", "2048", "2") == (
        ins["name"], ins["maxmem"], ins["minmem"], ins["memory"], ins["vcpus"])
    assert ("file", "kvm", "prod web") == (ins["disk_template"], ins["hypervisor"], ins["tags"])
    assert ("disk/0", DISK_UUID, "1024", "None") == (
        ins["disk0_ivname"], ins["disk0_dump"], ins["disk0_size"], ins["disk0_name"])
    assert ("2", "2") == (ins["disk_count"], ins["nic_count"])
    assert ("192.0.2.10", "None", "bridged", "br0") == (
        ins["nic0_ip"], ins["nic0_network"], ins["nic0_mode"], ins["nic0_link"])
    assert NET_UUID == ins["nic1_network"]


def test_nic_network_is_written_as_its_uuid_as_ganeti_writes_it():
    """nic<i>_network holds the network's uuid (objects.NIC.network); a name-only network
    (no uuid in the instance file) keeps its name, which Ganeti also looks up."""
    ins = ganeti_reads(G.render_config(sample_instance(), {0: DISK_UUID}))["instance"]
    assert NET_UUID == ins["nic1_network"]
    named = sample_instance(nics=(Nic(mac="aa:00:00:11:22:44", uuid="n1",
                                      network={"name": "net1"}),))
    assert "net1" == ganeti_reads(G.render_config(named, {}))["instance"]["nic0_network"]
    back = G.parse_config(G.render_config(sample_instance(), {0: DISK_UUID}))
    assert {"uuid": NET_UUID} == back.instance.nics[1].network


def test_percent_signs_survive_gantis_interpolating_parser():
    """'%' is written as '%%' so Ganeti's ConfigParser reads the value back unchanged."""
    text = G.render_config(sample_instance(), {0: DISK_UUID})
    assert "ratio = 50%%" in text
    cp = ganeti_reads(text)
    assert "50%" == cp["os"]["ratio"]
    assert "/boot/vmlinuz-%v" == cp["hypervisor"]["kernel_path"]


def test_option_names_are_lower_cased_as_with_ganeti():
    """Mixed-case parameter names come back lower-cased (configparser's optionxform)."""
    back = G.parse_config(G.render_config(sample_instance(), {0: DISK_UUID}))
    assert "yes" == back.instance.osparams["dhcp"]
    assert "Dhcp" not in back.instance.osparams


def test_private_os_parameters_are_never_written_in_clear():
    """No [os_private] section and no secret value; only the names, in a comment."""
    text = G.render_config(sample_instance(), {0: DISK_UUID})
    assert "s3cr3t-value" not in text
    assert "os_private" not in ganeti_reads(text).sections()
    assert "# private OS parameters not exported (supply them on import): root_password" in text


def test_cluster_global_hypervisor_parameters_are_not_exported():
    """migration_port and friends (HVC_GLOBALS) stay out of [hypervisor], as in Ganeti."""
    cp = ganeti_reads(G.render_config(sample_instance(), {0: DISK_UUID}))
    assert "migration_port" not in cp["hypervisor"]


def test_only_exported_disks_are_listed():
    """disk_count counts the disks that have a dump."""
    cp = ganeti_reads(G.render_config(sample_instance(), {1: "d1"}))
    assert "1" == cp["instance"]["disk_count"]
    assert "disk0_dump" not in cp["instance"] and "d1" == cp["instance"]["disk1_dump"]


def test_round_trip_keeps_what_an_import_needs():
    """Rendering then parsing gives back name, OS, disks, NICs, parameters and tags."""
    inst = sample_instance()
    back = G.parse_config(G.render_config(inst, {0: DISK_UUID, 1: "d1"}, timestamp=99))
    b = back.instance
    assert (inst.name, inst.os, inst.hypervisor, inst.tags) == (b.name, b.os, b.hypervisor, b.tags)
    assert [(0, DISK_UUID, 1024, None), (1, "d1", 10, "data")] == [
        (d.index, d.dump, d.size_mib, d.name) for d in back.disks]
    assert DISK_UUID == b.disks[0].uuid
    assert [("aa:00:00:11:22:33", "192.0.2.10", "br0", None), ("aa:00:00:11:22:44", None, None,
            None)] == [(n.mac, n.ip, n.link, n.vlan) for n in b.nics]
    assert {"uuid": NET_UUID} == b.nics[1].network
    assert {"maxmem": "2048", "minmem": "1024", "vcpus": "2", "always_failover": "False",
            "auto_balance": "True", "spindle_use": "1"} == b.beparams
    assert {"dhcp": "yes", "ratio": "50%", "empty": ""} == b.osparams
    assert 99 == back.timestamp and 0 == back.version


GANETI_MADE = """\
[export]
version = 0
timestamp = 1700000000
source = 5b1a2c0e-node-uuid
os = debootstrap+default
compression = none

[instance]
name = old1.example.com
maxmem = 512
minmem = 256
memory = 512
vcpus = 1
disk_template = plain
hypervisor = xen-pvm
tags = a b c
nic0_mac = aa:00:00:35:2a:7c
nic0_ip = None
nic0_mode = bridged
nic0_link = xen-br0
nic0_vlan =
nic0_name = None
nic0_network = None
nic2_mac = aa:00:00:00:00:02
nic_count = 1
disk0_ivname = disk/0
disk0_dump = 8a0e0f5e-3a5b-4c1e-9b1a-0d3c2b1a0f9e
disk0_size = 1024
disk0_name = None
disk2_ivname = disk/2
disk2_dump = NONE
disk2_size = 2048
disk_count = 2

[hypervisor]
root_path = /dev/xvda1
kernel_args = ro console=hvc0 100%%

[backend]
maxmem = 512
minmem = 256
vcpus = 1

[os]
dhcp = no

[os_private]
root_password = clear-in-ganeti
"""


def test_reads_an_export_written_by_ganeti():
    """Ganeti's own config.ini: None strings, disk gaps skipped, NICs stop at a gap."""
    exp = G.parse_config(GANETI_MADE, "/srv/ganeti/export/old1.example.com/config.ini")
    inst = exp.instance
    assert ("old1.example.com", "debootstrap+default", "xen-pvm") == (inst.name, inst.os,
                                                                     inst.hypervisor)
    assert [(0, "8a0e0f5e-3a5b-4c1e-9b1a-0d3c2b1a0f9e", 1024), (2, None, 2048)] == [
        (d.index, d.dump, d.size_mib) for d in exp.disks]
    assert 1 == len(inst.nics) and inst.nics[0].ip is None and "" == inst.nics[0].vlan
    assert "ro console=hvc0 100%" == inst.hvparams["kernel_args"]
    assert {"root_password": "clear-in-ganeti"} == inst.osparams_private
    assert ("a", "b", "c") == inst.tags
    assert exp.compression is None  # "none" reads back as None, as in Ganeti


def test_legacy_export_without_backend_section_takes_memory_from_instance():
    """Very old exports keep be params in [instance]; 'memory' maps to maxmem/minmem."""
    text = GANETI_MADE.replace("[backend]\nmaxmem = 512\nminmem = 256\nvcpus = 1\n", "")
    text = text.replace("maxmem = 512\nminmem = 256\n", "")
    inst = G.parse_config(text).instance
    assert {"maxmem": "512", "minmem": "512", "vcpus": "1"} == inst.beparams


def test_wrong_export_version_is_refused_with_ganetis_message():
    """version = 1 is an ArchiveFormatError: 'Wrong export version 1 (wanted 0)'."""
    with pytest.raises(E.ArchiveFormatError,
                       match=r"cannot read export config 'x.ini': Wrong export version 1 \(wanted 0\)"):
        G.parse_config(GANETI_MADE.replace("version = 0", "version = 1"), "x.ini")


def test_missing_export_section_is_a_corrupted_export_config():
    """No [export] section (or an empty file) gives Ganeti's 'Corrupted export config'."""
    for text in ("", "[instance]\nname = x\n"):
        with pytest.raises(E.ArchiveError, match="Corrupted export config"):
            G.parse_config(text)


def test_missing_instance_section_lacks_the_required_fields():
    """No [instance] section gives Ganeti's 'doesn't have the required fields'."""
    with pytest.raises(E.ArchiveError, match="Export info file doesn't have the required fields"):
        G.parse_config("[export]\nversion = 0\nos = x\n")


def test_unparseable_config_is_an_archive_error_naming_the_file(tmp_path):
    """Garbage in config.ini is a one-line ArchiveError naming the path."""
    bad = tmp_path / "config.ini"
    bad.write_text("this is not ini\n")
    with pytest.raises(E.ArchiveError, match=f"cannot read export config '{bad}'"):
        G.read_config(str(bad))


def test_missing_config_file_is_an_archive_error(tmp_path):
    """A missing config.ini names the path and the cause."""
    with pytest.raises(E.ArchiveError, match="No such file or directory"):
        G.read_config(str(tmp_path / "config.ini"))
