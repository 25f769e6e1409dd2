"""What Ganeti's own code builds for a case: run with Ganeti's Python modules importable.

    python3 tests/ganeti_reference.py GANETI_DIR defaults  > ganeti_vol/data/ganeti-defaults.json
    python3 tests/ganeti_reference.py GANETI_DIR cases < cases.json > answers.json

``GANETI_DIR`` holds the ``ganeti`` package (Debian's ganeti-3.0 puts it in
``/usr/share/ganeti/3.0``; ``apt-get download ganeti-3.0 && dpkg -x`` gives it
without installing).  It needs the Python that Ganeti runs on and its
dependencies (python3-pycurl, python3-openssl, python3-bitarray, ...), so it
runs as a separate process, never inside the test run.

``defaults`` prints the hypervisor and backend defaults ganeti-vol ships
(``ganeti_vol/data/ganeti-defaults.json``).  ``cases`` reads a JSON list of
cases (an instance and an OS definition, as ``tests/test_ganeti_fidelity.py``
serialises them) and answers, for each, with what Ganeti builds:

- ``create``: ``backend.OSEnvironment`` (create, reinstall and rename add one
  variable each);
- ``import``/``export``: per disk, ``backend._GetImportExportIoCommand`` plus
  what the import-export daemon adds (``LC_ALL=C`` from ``StartDaemon``,
  ``EXP_SIZE_FD``); the daemon's inherited environment is left out;
- ``hook_add``: ``BuildInstanceHookEnv`` as ``LUInstanceCreate`` calls it
  (disks as dicts), values ``str()``-ed as the hooks runner does;
- ``config_ini``: the ``config.ini`` that ``backend.FinalizeExport`` writes.

Run it with ``PYTHONHASHSEED=0``: Ganeti keeps tags in a set, and their order
in config.ini follows the hash seed.

The instance is what ``gnt-instance add`` would make of it on a fresh cluster:
``-H``/``-B`` values type-checked by ``utils.ForceDictType`` and filled with
``Cluster.FillHV``/``FillBE`` from the built-in defaults.  Block devices are
not opened: ``_OpenRealBD`` is replaced by an object that has the disk's path.
This file is not imported by the test suite.
"""

import json
import os
import sys
import tempfile
import time


def _ganeti(path):
    sys.path.insert(0, path)
    from ganeti import backend, constants, objects, pathutils, serializer, utils  # noqa
    from ganeti.cmdlib import instance_utils  # noqa

    return backend, constants, objects, pathutils, serializer, utils, instance_utils


def defaults(path):
    _, C, *_ = _ganeti(path)
    hvs = {hv: dict(sorted(C.HVC_DEFAULTS[hv].items())) for hv in sorted(C.HVC_DEFAULTS)}
    return {
        "source": f"Ganeti {C.RELEASE_VERSION}: ganeti/constants.py HVC_DEFAULTS, HVC_GLOBALS, "
                  "HVS_PARAMETER_TYPES, BEC_DEFAULTS, BES_PARAMETER_TYPES",
        "hypervisor_defaults": hvs,
        "hypervisor_globals": sorted(C.HVC_GLOBALS),
        "hypervisor_types": dict(sorted(C.HVS_PARAMETER_TYPES.items())),
        "backend_defaults": dict(sorted(C.BEC_DEFAULTS.items())),
        "backend_types": dict(sorted(C.BES_PARAMETER_TYPES.items())),
    }


class _RealDisk:
    def __init__(self, path, uri):
        self.dev_path = path
        self._uri = uri

    def GetUserspaceAccessUri(self, _hv):  # noqa: N802 (Ganeti's name)
        return self._uri


def answer(mods, case):
    backend, C, objects, pathutils, serializer, utils, instance_utils = mods
    inst, osd = case["instance"], case["os"]
    hvp = dict(inst["hvparams"])
    bep = dict(inst["beparams"])
    utils.ForceDictType(hvp, C.HVS_PARAMETER_TYPES)
    utils.ForceDictType(bep, C.BES_PARAMETER_TYPES)
    cluster = objects.Cluster(hvparams={hv: dict(d) for hv, d in C.HVC_DEFAULTS.items()},
                              beparams={C.PP_DEFAULT: dict(C.BEC_DEFAULTS)}, os_hvp={})
    probe = objects.Instance(hypervisor=inst["hypervisor"], os=inst["os"], hvparams=hvp,
                             beparams=bep)
    filled_hv = cluster.FillHV(probe)
    filled_be = cluster.FillBE(probe)

    disks, real = [], {}
    for i, d in enumerate(inst["disks"]):
        if d["backend_type"].startswith("file"):
            dev_type, logical_id = C.DT_FILE, (d["backend_type"].split(":", 1)[1], d["path"])
        else:
            dev_type, logical_id = C.DT_BLOCK, ("manual", d["path"])
        params = {C.LDP_ACCESS: C.DISK_USERSPACE} if d["uri"] else {}
        disk = objects.Disk(dev_type=dev_type, logical_id=logical_id, size=d["size_mib"],
                            mode=d["access"], uuid=d["uuid"], name=d["name"], params=params,
                            iv_name=f"disk/{i}", children=[])
        disks.append(disk)
        real[d["uuid"]] = _RealDisk(d["path"], d["uri"])
    backend._OpenRealBD = lambda disk: real[disk.uuid]

    nics, nic_tuples = [], []
    for n in inst["nics"]:
        net = n["network"]
        netinfo = None
        if net:
            netinfo = {"name": net.get("name"), "uuid": net.get("uuid"),
                       "network": net.get("subnet"), "gateway": net.get("gateway"),
                       "network6": net.get("subnet6"), "gateway6": net.get("gateway6"),
                       "mac_prefix": net.get("mac_prefix"),
                       "tags": net.get("tags", "").split()}
        nicparams = {"mode": n["mode"], "link": n["link"], "vlan": n["vlan"]}
        nics.append(objects.NIC(mac=n["mac"], uuid=n["uuid"], ip=n["ip"], name=n["name"],
                                nicparams=nicparams, network=net.get("uuid") if net else None,
                                netinfo=netinfo))
        nic_tuples.append((n["name"], n["uuid"], n["ip"], n["mac"], n["mode"], n["link"] or "",
                           n["vlan"] or "", net.get("name") if net else None, netinfo))

    instance = objects.Instance(
        name=inst["name"], os=inst["os"], uuid=inst["uuid"], ctime=inst["ctime"],
        mtime=inst["mtime"], primary_node=inst["primary_node"],
        secondary_nodes=inst["secondary_nodes"], hypervisor=inst["hypervisor"],
        hvparams=filled_hv, beparams=filled_be, osparams=dict(inst["osparams"]),
        osparams_private=serializer.PrivateDict(inst["osparams_private"]),
        nics=nics, disks=[d.uuid for d in disks], tags=set(inst["tags"]))
    instance.disks_info = disks
    os_obj = objects.OS(name=osd["name"], path=osd["path"], api_versions=osd["api_versions"],
                        supported_variants=osd["variants"],
                        supported_parameters=osd["parameters"],
                        create_script="create", export_script="export",
                        import_script="import", rename_script="rename",
                        verify_script="verify")
    backend.OSFromDisk = lambda name, base_dir=None: os_obj

    out = {"create": backend.OSEnvironment(instance, os_obj, debug=case.get("debug", 0)),
           "import": [], "export": []}
    for mode, key in ((C.IEM_IMPORT, "import"), (C.IEM_EXPORT, "export")):
        for i, disk in enumerate(disks):
            env = backend._GetImportExportIoCommand(
                instance, mode, C.IEIO_SCRIPT, (disk, i))[0]
            env = dict(env, LC_ALL="C", EXP_SIZE_FD="<fd>")  # StartDaemon, the daemon
            out[key].append(env)

    hook_disks = [{C.IDISK_SIZE: d["size_mib"], C.IDISK_MODE: d["access"],
                   C.IDISK_NAME: d["name"]} for d in inst["disks"]]
    hook = instance_utils.BuildInstanceHookEnv(
        name=inst["name"], primary_node_name=inst["primary_node"],
        secondary_node_names=inst["secondary_nodes"], os_type=inst["os"],
        status=inst["running"],
        minmem=filled_be[C.BE_MINMEM], maxmem=filled_be[C.BE_MAXMEM],
        vcpus=filled_be[C.BE_VCPUS], nics=nic_tuples,
        disk_template=utils.GetDiskTemplate(disks),
        disks=hook_disks, bep=filled_be, hvp=filled_hv, hypervisor_name=inst["hypervisor"],
        tags=list(inst["tags"]))
    out["hook_add"] = {k: str(v) for k, v in hook.items()}

    with tempfile.TemporaryDirectory() as tmp:
        pathutils.EXPORT_DIR = tmp
        time.time = lambda: 1700000000.0  # the [export] timestamp: same answer every run
        os.mkdir(os.path.join(tmp, inst["name"] + ".new"))
        backend.FinalizeExport(instance, disks)
        with open(os.path.join(tmp, inst["name"], C.EXPORT_CONF_FILE)) as f:
            out["config_ini"] = f.read()
    return out


def main(argv):
    path, command = argv[1], argv[2]
    if command == "defaults":
        result = defaults(path)
    elif command == "cases":
        mods = _ganeti(path)
        result = [answer(mods, case) for case in json.load(sys.stdin)]
    else:
        raise SystemExit("usage: ganeti_reference.py GANETI_DIR defaults|cases")
    json.dump(result, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv)
