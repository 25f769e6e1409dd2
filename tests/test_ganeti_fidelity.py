"""ganeti-vol against Ganeti 3.0's own code, on generated cases.

``tests/ganeti_reference.py`` runs Ganeti's ``OSEnvironment``,
``_GetImportExportIoCommand``, ``BuildInstanceHookEnv`` and ``FinalizeExport``
on each case.  Its answers are kept in ``tests/data/ganeti-3.0/`` (generated
with Debian's ganeti-3.0 3.0.2-3), so the comparison runs everywhere; where
Ganeti's modules can be imported (``$GANETI_REFERENCE_DIR``, or the installed
``/usr/share/ganeti/3.0``), the answers are also recomputed live.

Every difference is one that doc/ganeti-fidelity.md lists and explains, and
the test checks it is exactly that difference.

To regenerate the stored answers after changing the cases (GANETI_DIR holds
Ganeti's ``ganeti`` package, e.g. from ``apt-get download ganeti-3.0 && dpkg -x``):

    python tests/test_ganeti_fidelity.py GANETI_DIR
"""

from __future__ import annotations

import configparser
import gzip
import json
import os
import random
import socket
import subprocess
import uuid as uuidlib
from pathlib import Path

import pytest

from ganeti_vol.cli import main
from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Disk, Instance, Nic, OSDefinition
from ganeti_vol.formats import ganeti_export as G
from ganeti_vol.ganeti import fields
from ganeti_vol.ganeti import environment as env_mod
from ganeti_vol.ganeti import hooks
from ganeti_vol.ganeti import params as ganeti_params

HERE = Path(__file__).resolve().parent
ANSWERS = HERE / "data" / "ganeti-3.0" / "answers.json.gz"
REFERENCE = HERE / "ganeti_reference.py"
CASES = 240
PRIMARY = "node1.example.com"

# --- the cases ---------------------------------------------------------------------------

_STRINGS = ["", "/srv/x/y", "a b c", "ro console=ttyS0", "x" * 40, "ünïcode"]


def _hv_value(rng: random.Random, kind: str) -> str:
    if kind == "bool":
        return rng.choice(["true", "false", "True", "FALSE", ""])
    if kind == "int":
        return str(rng.randint(0, 65535))
    return rng.choice(_STRINGS)


def _be_value(rng: random.Random, name: str) -> str:
    kind = ganeti_params._data()["backend_types"][name]
    if kind == "size":
        return rng.choice(["128", "512", "1G", "1023", "2.5G", "1000M"])
    return _hv_value(rng, kind)


def make_cases(n: int = CASES, seed: int = 12) -> list[tuple[OSDefinition, Instance]]:
    """``n`` OS definitions and instances, as varied as the OS interface allows."""
    rng = random.Random(seed)
    types = ganeti_params._data()["hypervisor_types"]
    cases = []
    for i in range(n):
        api = rng.choice([(20,), (20, 15, 10), (15, 10), (10,)])
        variants = rng.choice([(), ("default", "minimal")])
        os_def = OSDefinition(
            name="testos", path="/srv/ganeti/os/testos", api_versions=api,
            scripts={"create": "/x"}, variants=variants,
            parameters=(("filesystem", "fs"), ("extra-pkgs", "packages")))
        full = "testos" + (rng.choice(["", "+minimal"]) if variants and max(api) >= 15 else "")
        hv = rng.choice(ganeti_params.hypervisors())
        hv_names = sorted(ganeti_params.hv_defaults(hv))
        hvparams = {k: _hv_value(rng, types[k])
                    for k in rng.sample(hv_names, min(len(hv_names), rng.randint(0, 4)))}
        be_names = sorted(ganeti_params.be_defaults())
        beparams = {k: _be_value(rng, k) for k in rng.sample(be_names, rng.randint(0, 3))}
        name = f"inst{i}.example.com"
        inst_uuid = str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, name))
        disks = []
        for d in range(rng.randint(0, 3)):
            block = rng.random() < 0.5
            uri = f"rbd:pool/{name}-{d}" if block and rng.random() < 0.3 else None
            disks.append(Disk(
                path=(f"/dev/vg/{name}-{d}" if block else f"/srv/disks/{name}-{d}.img"),
                size_mib=rng.choice([1, 64, 1024, 10240]),
                uuid=str(uuidlib.uuid5(uuidlib.UUID(inst_uuid), f"disk/{d}")),
                access=rng.choice(["rw", "ro"]), name=rng.choice([None, f"disk{d}"]),
                backend_type="block" if block else rng.choice(["file:loop", "file:blktap"]),
                uri=uri))
        nics = []
        for k in range(rng.randint(0, 2)):
            mode = rng.choice(["bridged", "routed", "openvswitch"])
            network = {}
            if rng.random() < 0.4:
                network = {"name": f"net{k}", "uuid": str(uuidlib.uuid5(uuidlib.UUID(inst_uuid),
                                                                        f"net/{k}")),
                           "subnet": "198.51.100.0/24", "gateway": "198.51.100.1",
                           "tags": rng.choice(["", "a b"])}
            nics.append(Nic(
                mac=f"aa:00:00:{i % 256:02x}:{k:02x}:{rng.randint(0, 255):02x}",
                uuid=str(uuidlib.uuid5(uuidlib.UUID(inst_uuid), f"nic/{k}")), mode=mode,
                link={"bridged": "br0", "openvswitch": "ovs0"}.get(mode,
                                                                  rng.choice([None, "rt1"])),
                ip=rng.choice([None, f"192.0.2.{k + 10}"]), name=rng.choice([None, f"eth{k}"]),
                vlan=rng.choice([None, "100"]), network=network))
        osparams = {k: rng.choice(_STRINGS) for k in
                    rng.sample(["filesystem", "extra-pkgs", "Mixed_Case"], rng.randint(0, 3))}
        private = {k: "s3cret " + k for k in rng.sample(["root-password", "key"],
                                                        rng.randint(0, 2))}
        inst = Instance(
            name=name, os=full, uuid=inst_uuid, ctime=1700000000.5 + i, mtime=1700000100.25 + i,
            hypervisor=hv, primary_node=PRIMARY,
            secondary_nodes=tuple(rng.sample(["node2.example.com", "node3.example.com"],
                                             rng.randint(0, 2))),
            disks=tuple(disks), nics=tuple(nics), osparams=osparams,
            osparams_private=private, beparams=beparams, hvparams=hvparams,
            tags=tuple(rng.sample(["prod", "web", "db"], rng.randint(0, 2))),
            running=rng.random() < 0.5)
        cases.append((os_def, inst))
    return cases


def case_json(cases: list[tuple[OSDefinition, Instance]]) -> list[dict]:
    """The cases as ganeti_reference.py reads them (-H/-B as the user typed them)."""
    out = []
    for os_def, inst in cases:
        out.append({
            "os": {"name": os_def.name, "path": os_def.path,
                   "api_versions": list(os_def.api_versions), "variants": list(os_def.variants),
                   "parameters": [list(p) for p in os_def.parameters]},
            "instance": {
                "name": inst.name, "os": inst.os, "uuid": inst.uuid, "ctime": inst.ctime,
                "mtime": inst.mtime, "hypervisor": inst.hypervisor,
                "primary_node": inst.primary_node, "secondary_nodes": list(inst.secondary_nodes),
                "disks": [{"path": d.path, "size_mib": d.size_mib, "uuid": d.uuid,
                           "access": d.access, "name": d.name, "backend_type": d.backend_type,
                           "uri": d.uri} for d in inst.disks],
                "nics": [{"mac": n.mac, "uuid": n.uuid, "mode": n.mode, "link": n.link,
                          "ip": n.ip, "name": n.name, "vlan": n.vlan, "network": n.network}
                         for n in inst.nics],
                "osparams": inst.osparams, "osparams_private": inst.osparams_private,
                "beparams": inst.beparams, "hvparams": inst.hvparams, "tags": list(inst.tags),
                "running": inst.running,
            },
        })
    return out


# --- ganeti-vol's answers ----------------------------------------------------------------


def ours(os_def: OSDefinition, given: Instance) -> dict:
    """What ganeti-vol builds for a case, the -H/-B values checked as from the command line."""
    inst = fields.checked_params(given)
    return {
        "create": env_mod.create_env(os_def, inst),
        "import": [{**env_mod.import_env(os_def, inst, i), "EXP_SIZE_FD": "<fd>"}
                   for i in range(len(inst.disks))],
        "export": [{**env_mod.export_env(os_def, inst, i), "EXP_SIZE_FD": "<fd>"}
                   for i in range(len(inst.disks))],
        "hook_add": hooks.instance_hook_env("instance-add", inst, PRIMARY),
        "config_ini": G.render_config(inst, {i: d.uuid for i, d in enumerate(inst.disks)}),
    }


def _ini(text: str) -> dict[str, dict[str, str]]:
    cp = configparser.ConfigParser(interpolation=None)
    cp.read_string(text)
    sections = {name: dict(cp[name]) for name in cp.sections()}
    del sections["export"]["timestamp"]
    # Ganeti keeps tags in a set: their order in the file is arbitrary
    sections["instance"]["tags"] = sorted(sections["instance"]["tags"].split())
    return sections


def assert_same_as_ganeti(mine: dict, ganeti: dict, inst: Instance) -> None:
    """Equal, but for the departures doc/ganeti-fidelity.md explains."""
    assert ganeti["create"] == mine["create"]
    assert ganeti["import"] == mine["import"]
    assert ganeti["export"] == mine["export"]
    # instance-add hooks: Ganeti has no disk uuids yet (disks are opcode dicts); we do
    theirs, ours_ = dict(ganeti["hook_add"]), dict(mine["hook_add"])
    for i, disk in enumerate(inst.disks):
        assert "" == theirs.pop(f"INSTANCE_DISK{i}_UUID")
        assert disk.uuid == ours_.pop(f"INSTANCE_DISK{i}_UUID")
    assert theirs == ours_
    # config.ini: Ganeti writes private parameters in clear; we never do
    theirs_ini, ours_ini = _ini(ganeti["config_ini"]), _ini(mine["config_ini"])
    assert {k.lower(): v for k, v in inst.osparams_private.items()} == theirs_ini.pop(
        "os_private")
    assert "os_private" not in ours_ini
    assert theirs_ini == ours_ini


def _stored() -> tuple[list[dict], list[dict]]:
    with gzip.open(ANSWERS, "rt", encoding="utf-8") as f:
        data = json.load(f)
    return data["cases"], data["answers"]


def test_stored_answers_are_for_todays_cases():
    """The generated cases are the ones Ganeti answered (else regenerate, see the docstring)."""
    cases, _ = _stored()
    assert cases == case_json(make_cases())


def test_environments_hooks_and_config_ini_match_ganetis_own_code():
    """Create/reinstall/rename env, import/export env (with the daemon's LC_ALL and
    EXP_SIZE_FD), instance-add hook env and config.ini: as Ganeti 3.0 builds them,
    hypervisor and backend defaults filled in, on every generated case."""
    _, answers = _stored()
    cases = make_cases()
    assert len(answers) == len(cases) == CASES
    for (os_def, inst), ganeti in zip(cases, answers, strict=True):
        assert_same_as_ganeti(ours(os_def, inst), ganeti, inst)


def test_shipped_defaults_are_ganetis():
    """ganeti_vol/data/ganeti-defaults.json holds Ganeti's constants (checked live below)."""
    data = ganeti_params._data()
    assert 65 == len(data["hypervisor_defaults"]["kvm"])
    assert {"chroot", "fake", "kvm", "lxc", "xen-hvm", "xen-pvm"} == set(
        data["hypervisor_defaults"])
    assert {"always_failover": False, "auto_balance": True, "maxmem": 128, "minmem": 128,
            "spindle_use": 1, "vcpus": 1} == data["backend_defaults"]
    assert {"migration_bandwidth", "migration_mode", "migration_port", "xen_cmd"} == set(
        data["hypervisor_globals"])


# --- live: Ganeti's modules on this machine ------------------------------------------------


#: Ganeti's tags are a set: a fixed hash seed gives the same config.ini every run
_REFERENCE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONHASHSEED": "0",
                  "LC_ALL": "C.UTF-8"}


def _ganeti_dir() -> str | None:
    for candidate in (os.environ.get("GANETI_REFERENCE_DIR"), "/usr/share/ganeti/3.0",
                      "/usr/share/ganeti/default"):
        if candidate and os.path.isfile(os.path.join(candidate, "ganeti", "backend.py")):
            return candidate
    return None


def _reference(command: str, stdin: str | None = None) -> object:
    path = _ganeti_dir()
    if path is None:
        pytest.skip("Ganeti's Python modules are not here (install ganeti-3.0, or set "
                    "GANETI_REFERENCE_DIR to a dir holding the ganeti package)")
    python = os.environ.get("GANETI_REFERENCE_PYTHON", "/usr/bin/python3")
    res = subprocess.run([python, str(REFERENCE), path, command], input=stdin,
                         capture_output=True, text=True, timeout=600, env=_REFERENCE_ENV)
    if res.returncode != 0 and ("ModuleNotFoundError" in res.stderr
                                or "ImportError" in res.stderr):
        pytest.skip(f"Ganeti's modules do not import with {python}: "
                    f"{res.stderr.strip().splitlines()[-1]}")
    assert 0 == res.returncode, res.stderr
    return json.loads(res.stdout)


def test_live_ganeti_gives_the_stored_answers():
    """Ganeti's code, run now, answers as stored (the stored answers are not stale)."""
    cases, answers = _stored()
    assert answers == _reference("cases", json.dumps(cases))


def test_live_ganeti_defaults_are_the_shipped_ones():
    live = _reference("defaults")
    assert live == ganeti_params._data()


def write_answers(ganeti_dir: str) -> None:
    """Run Ganeti on today's cases and store its answers (see the module docstring)."""
    cases = case_json(make_cases())
    python = os.environ.get("GANETI_REFERENCE_PYTHON", "/usr/bin/python3")
    res = subprocess.run([python, str(REFERENCE), ganeti_dir, "cases"],
                         input=json.dumps(cases, sort_keys=True),
                         capture_output=True, text=True, check=True, env=_REFERENCE_ENV)
    ANSWERS.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(ANSWERS, "wb", mtime=0) as f:
        f.write(json.dumps({"cases": cases, "answers": json.loads(res.stdout)},
                           sort_keys=True).encode())


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(HERE.parent))
    write_answers(sys.argv[1])


# --- the items of issue 12 A, one by one, through the real commands ------------------------

ENV_DUMP = 'env > "{out}.$IMPORT_INDEX$EXPORT_INDEX"; '


def _env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_import_script_gets_exp_size_fd_and_lc_all_c_as_under_ganeti(tmp_path, os_factory):
    """Ganeti's daemon gives import scripts EXP_SIZE_FD too (a writable fd) and LC_ALL=C."""
    out = tmp_path / "env"
    os_factory(scripts={
        "export": ENV_DUMP.format(out=out) + 'cat "$EXPORT_DEVICE"',
        "import": "#!/bin/bash\n" + ENV_DUMP.format(out=out)  # dash cannot write to fd 11
                  + 'echo 1048576 >&"$EXP_SIZE_FD" && cat > "$IMPORT_DEVICE"'})
    src = tmp_path / "w1.ini"
    src.write_text("[instance]\nname = w1\nos = testos+default\n[disks]\n[[0]]\npath = a.img\n"
                   "size = 1M\n")
    assert 0 == main(["instance", "create", str(src)])
    assert 0 == main(["export", str(src), "--progress", "none"])
    exported = _env_file(Path(f"{out}.0"))
    assert ("C", "0") == (exported["LC_ALL"], exported["DEBUG_LEVEL"])
    assert 0 == main(["import", "--name", "w2", "--disk", f"{tmp_path}/b.img",
                      "w1", "--progress", "none"])
    imported = _env_file(Path(f"{out}.0"))
    assert "C" == imported["LC_ALL"] and imported["EXP_SIZE_FD"].isdigit()


def test_private_parameters_of_a_ganeti_export_reach_the_import_script(tmp_path, os_factory,
                                                                      node_dirs):
    """[os_private] of a Ganeti-made config.ini becomes OSP_* for import, as in Ganeti
    (merged under what the command line gives, like [os])."""
    out = tmp_path / "env"
    os_factory(scripts={"import": ENV_DUMP.format(out=out) + 'cat > "$IMPORT_DEVICE"'},
               parameters=(("param1", "x"), ("root_password", "y"), ("ssh_key", "z")))
    d = node_dirs["export"] / "old1"
    d.mkdir()
    (d / "config.ini").write_text(
        "[export]\nversion = 0\nos = testos+default\n[instance]\nname = old1\n"
        "disk0_size = 1\ndisk0_dump = dump0\ndisk_count = 1\n[os]\nparam1 = public\n"
        "[os_private]\nroot_password = s3cret\nssh_key = from-export\n")
    (d / "dump0").write_bytes(b"x" * (1 << 20))
    assert 0 == main(["import", "--name", "new1", "--disk", f"{tmp_path}/t.img",
                      "--os-parameters-private", "ssh_key=given", "old1", "--script",
                      "--progress", "none"])
    env = _env_file(Path(f"{out}.0"))
    assert ("public", "s3cret", "given") == (env["OSP_PARAM1"], env["OSP_ROOT_PASSWORD"],
                                            env["OSP_SSH_KEY"])


@pytest.mark.parametrize("fmt", ["native", "ganeti"])
def test_diskless_instance_exports_a_config_with_no_disks_and_imports(capsys, tmp_path,
                                                                     os_factory, node_dirs, fmt):
    """Ganeti exports a config.ini with disk_count = 0 for a diskless instance; so do we,
    and such an export imports (running only the rename script)."""
    os_factory()
    src = tmp_path / "dl.ini"
    src.write_text("[instance]\nname = dl1\nos = testos+default\n")
    assert 0 == main(["export", str(src), "--format", fmt, "--progress", "none"])
    ini = configparser.ConfigParser()
    ini.read(node_dirs["export"] / "dl1" / "config.ini")
    assert ("0", "diskless") == (ini["instance"]["disk_count"],
                                 ini["instance"]["disk_template"])
    capsys.readouterr()
    assert 0 == main(["import", "--name", "dl2", "dl1", "--json", "--progress", "none"])
    result = json.loads(capsys.readouterr().out)
    assert ([], "ok") == (result["disks"], result["rename"]["status"])


def test_instance_from_flags_has_this_host_as_primary_node(capsys, os_factory, tmp_path):
    """INSTANCE_PRIMARY_NODE was empty for an instance built from flags (or a file without
    primary_node); it is this host's name, as on the node Ganeti runs the script on."""
    os_factory()
    capsys.readouterr()
    assert 0 == main(["instance", "env", "--name", "i1", "--os", "testos", "--json"])
    assert socket.gethostname() == json.loads(capsys.readouterr().out)["INSTANCE_PRIMARY_NODE"]
    f = tmp_path / "i.ini"
    f.write_text("[instance]\nname = i2\nos = testos\n")
    assert 0 == main(["instance", "env", str(f), "--json"])
    assert socket.gethostname() == json.loads(capsys.readouterr().out)["INSTANCE_PRIMARY_NODE"]


def test_hv_and_be_flags_are_typed_as_ganeti_types_them(capsys, os_factory):
    """-H serial_console=false reaches the scripts as False, -B maxmem=1G as 1024."""
    os_factory()
    capsys.readouterr()
    assert 0 == main(["instance", "env", "--name", "i1", "--os", "testos", "--json",
                      "-H", "serial_console=false,disk_type=scsi", "-B", "maxmem=1G"])
    env = json.loads(capsys.readouterr().out)
    assert ("False", "scsi", "1024", "128") == (
        env["INSTANCE_HV_serial_console"], env["INSTANCE_HV_disk_type"],
        env["INSTANCE_BE_maxmem"], env["INSTANCE_BE_minmem"])


def test_os_test_takes_hv_and_be_parameters():
    """os test -H/-B: the scratch instance carries them over Ganeti's defaults."""
    from ganeti_vol.cli import build_parser
    from ganeti_vol.cli.conformance import _options

    args = build_parser().parse_args(["os", "test", "./x", "-H", "disk_type=scsi",
                                      "-B", "vcpus=4"])
    options = _options(args)
    assert ({"disk_type": "scsi"}, {"vcpus": "4"}) == (dict(options.hvparams),
                                                        dict(options.beparams))
    args = build_parser().parse_args(["os", "test", "./x", "-H", "disk_typo=scsi"])
    with pytest.raises(E.UsageError, match="did you mean 'disk_type'"):
        _options(args)


def test_instance_env_for_import_shows_what_the_archive_merges_in(capsys, tmp_path, os_factory,
                                                                  node_dirs):
    """instance env --op import --archive A: the OS, INSTANCE_BE_*/INSTANCE_HV_* and disk sizes
    a real import takes from the archive."""
    os_factory(scripts={"export": 'cat "$EXPORT_DEVICE"'})
    src = tmp_path / "w1.ini"
    src.write_text("[instance]\nname = w1\nos = testos+default\n[disks]\n[[0]]\npath = a.img\n"
                   "size = 2M\n[beparams]\nmaxmem = 512\n[hvparams]\nkernel_args = quiet\n")
    assert 0 == main(["instance", "create", str(src)])
    assert 0 == main(["export", str(src), "--progress", "none"])
    capsys.readouterr()
    assert 0 == main(["instance", "env", "--name", "w2", "--disk-spec", f"{tmp_path}/b.img",
                      "--op", "import", "--archive", "w1", "--json"])
    env = json.loads(capsys.readouterr().out)
    assert ("testos+default", "512", "quiet", "2") == (
        env["INSTANCE_OS"], env["INSTANCE_BE_maxmem"], env["INSTANCE_HV_kernel_args"],
        env["DISK_0_SIZE"])
    assert ("C", "11") == (env["LC_ALL"], env["EXP_SIZE_FD"])
    assert 3 == main(["instance", "env", "--name", "w2", "--os", "testos", "--archive", "w1"])


def test_default_search_path_is_ganetis_and_finds_debians_os_packages(capsys, monkeypatch,
                                                                      tmp_path):
    """With no node config Ganeti looks in /srv/ganeti/os, /usr/local/lib/ganeti/os,
    /usr/lib/ganeti/os and /usr/share/ganeti/os, where Debian's packages put theirs."""
    from ganeti_vol.core import constants as C

    assert ("/srv/ganeti/os", "/usr/local/lib/ganeti/os", "/usr/lib/ganeti/os",
            "/usr/share/ganeti/os") == C.DEFAULT_OS_SEARCH_PATH
    if not os.path.isdir("/usr/share/ganeti/os/noop"):
        pytest.skip("Debian's ganeti-os-noop is not installed")
    monkeypatch.delenv("GANETI_VOL_CONFIG")
    monkeypatch.setattr(C, "DEFAULT_CONFIG_FILE", str(tmp_path / "absent.conf"))
    capsys.readouterr()
    assert 0 == main(["os", "list", "--no-headers"])
    assert "noop" in capsys.readouterr().out.split()


def test_each_deliberate_departure_is_documented_and_is_what_we_do(tmp_path, node_config):
    """DEBUG_LEVEL for import/export, parameters.list trailing whitespace, the disk uuid in
    instance-add hooks: doc/ganeti-fidelity.md says why, and the code does what it says."""
    from conftest import make_os

    from ganeti_vol.ganeti import discovery

    doc = (HERE.parent / "doc" / "ganeti-fidelity.md").read_text()
    for words in ("`DEBUG_LEVEL` is always `0` for import, export and verify",
                  "`parameters.list` descriptions keep trailing whitespace",
                  "`instance-add` hooks get an empty `INSTANCE_DISK<n>_UUID`"):
        assert words in doc
    os_def, inst = make_cases(1)[0]
    inst = inst.replace(disks=(Disk(path="/x", size_mib=1, uuid="d-uuid"),))
    assert "3" == env_mod.import_env(os_def, inst, 0, debug=3)["DEBUG_LEVEL"]
    assert "d-uuid" == hooks.instance_hook_env("instance-add", inst, PRIMARY)[
        "INSTANCE_DISK0_UUID"]
    make_os(tmp_path, "ws", parameters=(("p1", "first one  \t"),))
    assert (("p1", "first one"),) == discovery.load_os("ws", [str(tmp_path)]).parameters
