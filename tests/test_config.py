"""Node config and instance files (configobj + configspec), and the option parsers."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.ganeti import config as cfgmod
from ganeti_vol.ganeti import fields

REPO = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text).lstrip())
    return str(path)


def test_missing_default_config_means_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("GANETI_VOL_CONFIG")
    monkeypatch.setattr(C, "DEFAULT_CONFIG_FILE", str(tmp_path / "absent.conf"))
    monkeypatch.setattr(cfgmod.C, "DEFAULT_CONFIG_FILE", str(tmp_path / "absent.conf"))
    node = cfgmod.load_node_config()
    # Ganeti's own OS_SEARCH_PATH, so Debian's OS packages are found without a config
    assert node.os_search_path == ("/srv/ganeti/os", "/usr/local/lib/ganeti/os",
                                   "/usr/lib/ganeti/os", "/usr/share/ganeti/os")
    assert node.hooks_dir == "/etc/ganeti/hooks"
    assert node.log_dir == "/var/log/ganeti/os"
    assert node.export_dir == "/srv/ganeti/export"
    assert node.timeout("create") == 86400 and node.timeout("rename") == 3600
    assert node.timeout("verify") == 300 and node.timeout("export") is None
    assert node.source == ""


def test_explicit_config_file_must_exist(tmp_path):
    with pytest.raises(E.ConfigError, match="file does not exist"):
        cfgmod.load_node_config(str(tmp_path / "nope.conf"))


def test_env_var_selects_the_config_file(tmp_path, monkeypatch):
    path = write(tmp_path / "n.conf", "os_search_path = /a, /b\nexport_dir = /exports\n")
    monkeypatch.setenv("GANETI_VOL_CONFIG", path)
    node = cfgmod.load_node_config()
    assert node.os_search_path == ("/a", "/b") and node.export_dir == "/exports"
    assert node.source == path


def test_every_invalid_key_is_reported_at_once_with_its_section(tmp_path):
    path = write(
        tmp_path / "bad.conf",
        """
        workers = many
        stall_timeout = -1
        typo_key = 1
        chunk_hash = md5
        [timeouts]
        create = soon
        nonsense = 3
        """,
    )
    with pytest.raises(E.ConfigError) as err:
        cfgmod.load_node_config(path)
    msg = str(err.value)
    assert msg.startswith(f"invalid node config '{path}':")
    for fragment in ("workers:", "stall_timeout:", "typo_key: unknown key", "chunk_hash:",
                     "timeouts/create:", "timeouts/nonsense: unknown key"):
        assert fragment in msg, fragment
    assert err.value.exit_code == 4


def test_chunk_size_must_be_a_power_of_two_in_range(tmp_path):
    with pytest.raises(E.ConfigError, match="chunk_size"):
        cfgmod.load_node_config(write(tmp_path / "c.conf", "chunk_size = 3M\n"))
    assert cfgmod.load_node_config(write(tmp_path / "d.conf", "chunk_size = 1M\n")).chunk_size == 1 << 20


def test_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path / "s.conf", "[timeouts\ncreate = 1\n")
    with pytest.raises(E.ConfigError, match="line 1"):
        cfgmod.load_node_config(path)


def test_commented_example_instance_file_in_doc_is_valid(tmp_path):
    """doc/instance-file.md's example loads (its disk paths point into tmp via a copy)."""
    text = (REPO / "doc" / "instance-file.md").read_text()
    example = text.split("```ini\n", 1)[1].split("```", 1)[0]
    p = tmp_path / "web1.ini"
    p.write_text(example)
    inst = cfgmod.load_instance(str(p))
    assert inst.name == "web1.example.com"
    assert inst.os == "sample+default"
    assert len(inst.disks) == 2 and len(inst.nics) == 1
    assert inst.osparams_private == {"root_password": "s3cret"}
    assert inst.disks[0].path == str(tmp_path / "web1-disk0.img")


def test_instance_defaults_are_generated_deterministically(tmp_path):
    p = write(tmp_path / "i.ini", "[instance]\nname = a.example\nos = x\n[disks]\n[[0]]\nsize = 1G\npath = d0\n")
    one, two = cfgmod.load_instance(p), cfgmod.load_instance(p)
    assert one.uuid == two.uuid and one.disks[0].uuid == two.disks[0].uuid
    assert one.disks[0].size_mib == 1024
    assert one.disks[0].backend_type == "file:loop"
    assert one.ctime > 0 and one.hypervisor == "kvm"


def test_instance_file_errors_name_section_and_key(tmp_path):
    p = write(
        tmp_path / "i.ini",
        """
        [instance]
        name = not a hostname!
        running = perhaps
        color = blue
        [disks]
        [[0]]
        size = lots
        access = rwx
        [nics]
        [[0]]
        mac = zz:zz
        """,
    )
    with pytest.raises(E.ConfigError) as err:
        cfgmod.load_instance(p)
    msg = str(err.value)
    for fragment in ("instance/name:", "instance/running:",
                     "instance/color: unknown key", "disks/0/size:", "disks/0/access:",
                     "nics/0/mac:"):
        assert fragment in msg, fragment


def test_disk_sections_must_be_consecutive_indexes(tmp_path):
    p = write(tmp_path / "i.ini", "[instance]\nname = a\nos = x\n[disks]\n[[0]]\nsize=1M\n[[2]]\nsize=1M\n")
    with pytest.raises(E.ConfigError, match="indexes must be 0..1 without gaps"):
        cfgmod.load_instance(p)


def test_disk_without_size_needs_an_existing_path(tmp_path):
    (tmp_path / "exists.img").write_bytes(b"\0" * (3 << 20))
    p = write(tmp_path / "i.ini", "[instance]\nname = a\nos = x\n[disks]\n[[0]]\npath = exists.img\n")
    assert cfgmod.load_instance(p).disks[0].size_mib == 3
    p = write(tmp_path / "j.ini", "[instance]\nname = a\nos = x\n[disks]\n[[0]]\npath = missing.img\n")
    with pytest.raises(E.ConfigError, match="disks/0/size: not given, and its path .* does not "
                       "exist"):
        cfgmod.load_instance(p)


def test_instance_round_trips_through_text(tmp_path):
    p = write(
        tmp_path / "i.ini",
        """
        [instance]
        name = rt.example
        os = sample+minimal
        tags = a, b
        [disks]
        [[0]]
        path = /dev/null
        size = 10M
        name = root
        [nics]
        [[0]]
        mac = aa:bb:cc:dd:ee:ff
        network_name = net1
        [osparams]
        message = 100% sure
        [osparams_private]
        secret = x
        """,
    )
    inst = cfgmod.load_instance(p)
    q = tmp_path / "copy.ini"
    q.write_text(cfgmod.instance_to_text(inst))
    assert cfgmod.load_instance(str(q)) == inst.replace(source=str(q))
    assert "secret" not in cfgmod.instance_to_text(inst, include_private=False)


def test_update_instance_file_keeps_comments(tmp_path):
    p = write(tmp_path / "i.ini", "# keep me\n[instance]\nname = a\nos = x\n")
    cfgmod.update_instance_file(p, {"name": "b", "uuid": "u-1"})
    text = Path(p).read_text()
    assert "# keep me" in text
    inst = cfgmod.load_instance(p)
    assert inst.name == "b" and inst.uuid == "u-1"


@pytest.mark.parametrize(
    "text,expected",
    [("512", 512), ("4K", 4096), ("4M", 4 << 20), ("2G", 2 << 30), ("1TiB", 1 << 40), ("10mb", 10 << 20)],
)
def test_parse_size(text, expected):
    assert fields.parse_size(text) == expected


def test_parse_size_rejects_junk():
    with pytest.raises(ValueError):
        fields.parse_size("ten")


def test_disk_option_parsing():
    assert fields.parse_disk_option("/d/x.img,size=10G,access=ro") == {
        "path": "/d/x.img", "size": 10 << 30, "access": "ro"
    }
    assert fields.parse_disk_option("/d/y.img,size=100")["size"] == 100 << 20  # MiB default
    with pytest.raises(E.UsageError, match="invalid --disk option 'colour=red'"):
        fields.parse_disk_option("/d/x,colour=red")


def test_key_value_options_support_escaped_commas():
    assert fields.parse_key_values(["a=1,b=x\\,y", "c="], "OS parameter") == {
        "a": "1", "b": "x,y", "c": ""
    }
    with pytest.raises(E.UsageError, match="invalid OS parameter 'novalue'"):
        fields.parse_key_values(["novalue"], "OS parameter")
