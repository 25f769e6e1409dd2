"""The Ganeti environment contract in both directions: what ganeti_vol.ganeti.environment
builds for an OS script, osapi parses back into the same instance (a property test over
seeded random instances: names, disks, NICs, networks, parameters, transfer variables)."""

from __future__ import annotations

import random
import string

import pytest

from ganeti_vol import osapi
from ganeti_vol.core.model import Disk, Instance, Nic, OSDefinition
from ganeti_vol.ganeti import environment as env_mod
from ganeti_vol.ganeti import params as ganeti_params

ROUNDS = 200


def _word(rng: random.Random, alphabet: str = string.ascii_lowercase + string.digits,
          low: int = 1, high: int = 12) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _text(rng: random.Random) -> str:
    """Values an environment can carry: spaces, quotes, '=', unicode; no NUL."""
    return _word(rng, string.ascii_letters + string.digits + " =\"'$;é-_.:/", 0, 20)


def _disk(rng: random.Random, index: int) -> Disk:
    return Disk(
        path=f"/srv/disks/{_word(rng)}-{index}.img" if rng.random() < 0.9 else None,
        size_mib=rng.randint(1, 1 << 20),
        uuid=_word(rng, string.hexdigits.lower(), 32, 32),
        access=rng.choice(("rw", "ro")),
        name=_word(rng) if rng.random() < 0.5 else None,
        backend_type=rng.choice(("block", "file:loop", "file:blktap")),
        uri=f"rbd://pool/{_word(rng)}" if rng.random() < 0.2 else None,
    )


def _nic(rng: random.Random) -> Nic:
    network = {}
    if rng.random() < 0.4:
        network = {"name": _word(rng), "uuid": _word(rng, string.hexdigits.lower(), 32, 32),
                   "tags": " ".join(_word(rng) for _ in range(rng.randint(0, 3)))}
        for key in ("subnet", "gateway", "subnet6", "gateway6", "mac_prefix"):
            if rng.random() < 0.5:
                network[key] = _word(rng, string.digits + ".:/", 3, 18)
    return Nic(
        mac=":".join(f"{rng.randrange(256):02x}" for _ in range(6)),
        uuid=_word(rng, string.hexdigits.lower(), 32, 32),
        mode=rng.choice(("bridged", "routed", "openvswitch")),
        link=_word(rng) if rng.random() < 0.8 else None,
        ip=f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        if rng.random() < 0.5 else None,
        name=_word(rng) if rng.random() < 0.5 else None,
        network=network,
    )


def random_instance(rng: random.Random) -> Instance:
    params = {_word(rng, string.ascii_lowercase + "_-"): _text(rng)
              for _ in range(rng.randint(0, 4))}
    private = {_word(rng, string.ascii_lowercase + "_"): _text(rng)
               for _ in range(rng.randint(0, 2))}
    return Instance(
        name=f"{_word(rng)}.example.com",
        os="myos+" + _word(rng) if rng.random() < 0.5 else "myos",
        uuid=_word(rng, string.hexdigits.lower(), 32, 32),
        ctime=rng.randint(0, 2_000_000_000) + rng.choice((0, 0.5)),
        mtime=rng.randint(0, 2_000_000_000),
        hypervisor=rng.choice(("kvm", "xen-pvm", "xen-hvm", "lxc", "fake")),
        primary_node=f"{_word(rng)}.example.com",
        secondary_nodes=tuple(f"{_word(rng)}.example.com" for _ in range(rng.randint(0, 2))),
        disks=tuple(_disk(rng, i) for i in range(rng.randint(0, 4))),
        nics=tuple(_nic(rng) for _ in range(rng.randint(0, 3))),
        osparams=params,
        osparams_private=private,
    )


OS_DEF = OSDefinition("myos", "/srv/os/myos", (20,), {}, variants=("default",))


def assert_round_trips(instance: Instance, parsed: osapi.OSEnv) -> None:
    info = parsed.require_instance()
    assert (info.name, info.os, info.uuid, info.hypervisor, info.primary_node,
            info.secondary_nodes) == (instance.name, instance.os, instance.uuid,
                                      instance.hypervisor, instance.primary_node,
                                      instance.secondary_nodes)
    assert (info.ctime, info.mtime) == (float(instance.ctime), float(instance.mtime))
    assert info.be == {k: str(v) for k, v in ganeti_params.filled_be(instance.beparams).items()}
    assert info.hv == {k: str(v) for k, v in
                       ganeti_params.filled_hv(instance.hypervisor, instance.hvparams).items()}
    assert len(parsed.disks) == len(instance.disks)
    for index, (got, disk) in enumerate(zip(parsed.disks, instance.disks, strict=True)):
        assert got.index == index
        assert (got.path, got.size_mib, got.uuid, got.name, got.access, got.uri,
                got.backend_type) == (disk.path, disk.size_mib, disk.uuid, disk.name,
                                      disk.access, disk.uri, disk.backend_type)
    assert len(parsed.nics) == len(instance.nics)
    for got, nic in zip(parsed.nics, instance.nics, strict=True):
        assert (got.mac, got.uuid, got.name, got.ip, got.mode, got.link) == (
            nic.mac, nic.uuid, nic.name, nic.ip, nic.mode, nic.link)
        assert got.bridge == (nic.link or None if nic.mode == "bridged" else None)
        expected = {k: v for k, v in nic.network.items()
                    if k in ("name", "uuid") or v or k == "tags"}
        if "tags" in expected:
            expected["tags"] = " ".join(expected["tags"].split())
        assert got.network == expected
    merged = {**instance.osparams, **instance.osparams_private}
    assert dict(parsed.params.items()) == {osapi.param_key(k): v for k, v in merged.items()}


@pytest.mark.parametrize("seed", range(ROUNDS))
def test_osapi_parses_back_every_instance_the_environment_builders_build(seed):
    rng = random.Random(seed)
    instance = random_instance(rng)
    env = env_mod.create_env(OS_DEF, instance, reinstall=seed % 2 == 1)
    parsed = osapi.OSEnv.from_environ(env)
    assert_round_trips(instance, parsed)
    assert parsed.reinstall == (seed % 2 == 1)
    assert (parsed.os_name, parsed.api_version) == ("myos", 20)
    assert parsed.variant == (instance.os_variant or "default")


@pytest.mark.parametrize("seed", range(0, ROUNDS, 5))
def test_export_and_import_disks_parse_back_as_built(seed):
    rng = random.Random(seed)
    instance = random_instance(rng)
    if not instance.disks or instance.disks[0].path is None:
        instance = instance.replace(
            disks=(Disk(path="/srv/disks/d0.img", size_mib=8, uuid="u0"), *instance.disks[1:]))
    index = rng.randrange(len(instance.disks))
    if instance.disks[index].path is None:
        index = 0
    device = f"/dev/snap{seed}" if rng.random() < 0.5 else None
    for op, build in (("export", env_mod.export_env), ("import", env_mod.import_env)):
        parsed = osapi.OSEnv.from_environ(build(OS_DEF, instance, index, device=device))
        assert_round_trips(instance, parsed)
        transfer = parsed.transfer_disk(op)
        assert (transfer.index, transfer.device, transfer.uri) == (
            index, device or instance.disks[index].path, instance.disks[index].uri)


def test_rename_parses_back_the_old_and_the_new_name():
    instance = random_instance(random.Random(7))
    parsed = osapi.OSEnv.from_environ(env_mod.rename_env(OS_DEF, instance, "old.example.com"))
    assert (parsed.require_instance().name, parsed.old_name) == (instance.name,
                                                                 "old.example.com")


def test_every_variable_name_of_the_contract_is_spelled_in_one_module():
    """The names live in ganeti_vol.ganeti.environment; the parser OS scripts use (osapi)
    and every other module take them from there instead of spelling them again."""
    import os
    import re

    import ganeti_vol

    names = [env_mod.OS_API_VERSION, env_mod.OS_NAME, env_mod.OS_VARIANT, env_mod.DEBUG_LEVEL,
             env_mod.INSTANCE_NAME, env_mod.INSTANCE_OS, env_mod.INSTANCE_UUID,
             env_mod.INSTANCE_CTIME, env_mod.INSTANCE_MTIME, env_mod.INSTANCE_PRIMARY_NODE,
             env_mod.INSTANCE_SECONDARY_NODES, env_mod.INSTANCE_REINSTALL,
             env_mod.OLD_INSTANCE_NAME, env_mod.HYPERVISOR, env_mod.DISK_COUNT,
             env_mod.NIC_COUNT]
    spelled = re.compile("[\"'](" + "|".join(names) + r"|(DISK|NIC)_\{|(EXPORT|IMPORT)_(INDEX|"
                         r"DEVICE|DISK_PATH|DISK_URI))[\"'{]")
    top = os.path.dirname(ganeti_vol.__file__)
    home = os.path.join(top, "ganeti", "environment.py")
    found = []
    for root, _dirs, files in os.walk(top):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".py") and path != home:
                with open(path, encoding="utf-8") as f:
                    found += [f"{path}:{n}" for n, line in enumerate(f, 1) if spelled.search(line)]
    assert found == []
