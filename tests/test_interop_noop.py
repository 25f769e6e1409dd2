"""Debian's ganeti-os-noop, unmodified: discovered, valid, and its create/rename succeed."""

from __future__ import annotations

import os

import pytest

from ganeti_vol.core.model import Instance
from ganeti_vol.ganeti import fields
from ganeti_vol.ganeti import discovery
from ganeti_vol.ops import operations

NOOP_SEARCH = "/usr/share/ganeti/os"
pytestmark = pytest.mark.skipif(
    not os.path.isdir(os.path.join(NOOP_SEARCH, "noop")),
    reason="Debian package ganeti-os-noop is not installed (apt-get install ganeti-os-noop)",
)


@pytest.fixture
def ctx(node_config):
    return operations.OpContext(node=node_config, search_path=(NOOP_SEARCH,))


def noop_instance(tmp_path) -> Instance:
    uuid = fields.instance_uuid_for("noop1.example.com")
    disk = fields.make_disk(0, uuid, path=str(tmp_path / "noop-d0.img"), size=4 << 20)
    return Instance(name="noop1.example.com", os="noop", uuid=uuid, ctime=1.0, mtime=1.0,
                    disks=(disk,))


def test_noop_is_discovered_and_valid():
    entries = {e.name: e for e in discovery.diagnose([NOOP_SEARCH])}
    assert entries["noop"].valid, entries["noop"].diagnose
    os_def = entries["noop"].os
    assert os_def.api_versions == (5, 10) and os_def.api_version == 10
    assert os_def.variants == () and os_def.trusted


def test_noop_create_and_rename_run_unmodified(tmp_path, ctx):
    inst = noop_instance(tmp_path)
    created = operations.create(ctx, inst)
    assert created.to_json()["status"] == "ok" and (tmp_path / "noop-d0.img").exists()
    renamed = operations.rename(ctx, inst, "noop2.example.com")
    assert renamed.to_json()["status"] == "ok"
    assert os.path.basename(renamed.to_json()["log"]).startswith("rename-noop-noop1.example.com-noop2.example.com-")
