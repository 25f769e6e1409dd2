"""Ganeti itself as the client: a real one-node Ganeti 3.0 cluster runs our work.

The cluster (tests/ganeti_cluster.py) lives in private namespaces and is brought up once
per session.  ganeti-vol is installed on its node the way doc/ganeti-integration.md says:
the Debian package built from this tree (once per session, tests/debian_build.py), by the
node's apt, and a node config.  Where no package can be built, the node gets this checkout
by ``ganeti-vol os install`` and ``hooks install`` instead, and the package's own test
here skips saying why.  Then Ganeti's own commands run our OS definitions, read our
exports and run our hooks; every test looks at what Ganeti did (job output, disk bytes,
logs).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import configobj
import ganeti_cluster as gc
import pytest
from conftest import REPO, write_script

from ganeti_vol import __version__
from ganeti_vol.formats.lz4tool import CHUNK_SIZE as CS

pytestmark = [pytest.mark.ganeti_cluster, pytest.mark.slow]

MIB = 1 << 20
DOC = REPO / "doc" / "ganeti-integration.md"
GANETI_EXPORT_DIR = gc.EXPORT_DIR
ADD = ["gnt-instance", "add", "-n", gc.NODE, "-t", "file", "--disk", "0:size=4M",
       "-B", "memory=64M", "--no-start", "--no-name-check", "--no-ip-check"]


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ganeti_cluster(tmp_path_factory) -> Iterator[gc.GanetiCluster]:
    """The running cluster; taken down at the end of the session, on every path."""
    reason = gc.missing_prerequisite()
    if reason:
        pytest.skip(f"no Ganeti cluster here: {reason}")
    cluster = gc.GanetiCluster(tmp_path_factory.mktemp("ganeti-cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        sys.stderr.write(f"\nganeti cluster timings (s): {cluster.timings_text()}\n")
    leftovers = cluster.leftovers()
    assert not leftovers, "the Ganeti cluster left things on the host:\n" + "\n".join(leftovers)


@pytest.fixture(scope="session")
def node(ganeti_cluster, debian_package) -> gc.GanetiCluster:
    """The cluster with ganeti-vol installed on its node: the Debian package (or, where
    none can be built, this checkout) and the node config."""
    if debian_package.deb is None:
        sys.stderr.write(f"\nganeti cluster: the node runs this checkout, not the Debian "
                         f"package: {debian_package.reason}\n")
    ganeti_cluster.install_ganeti_vol(debian_package.deb)
    return ganeti_cluster


@pytest.fixture(scope="session")
def names() -> Iterator[str]:
    """Instance names the cluster's /etc/hosts knows, one per use."""
    return iter(gc.INSTANCE_NAMES)


@pytest.fixture(scope="session")
def hooks(node) -> gc.Result:
    """``ganeti-vol hooks install --dry-run --json`` on the node, whose /etc/ganeti/hooks
    has the shipped hooks (the package's, or `hooks install`'s): its output."""
    return node.ganeti_vol("hooks", "install", "--dry-run", "--json")


@pytest.fixture(scope="session")
def envdump_os(node, tmp_path_factory) -> str:
    """The env-dumping OS definition, installed on the node (doc/ganeti-integration.md)."""
    src = make_envdump_os(tmp_path_factory.mktemp("envdump-os"))
    node.ganeti_vol("os", "install", str(src))
    return "envdump"


def write_image(path: Path, size: int = 4 * MIB) -> tuple[Path, str]:
    """A raw image of ``size`` bytes: random data, a zero run, random data; and its sha256."""
    third = size // 3
    data = os.urandom(third) + bytes(third) + os.urandom(size - 2 * third)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def disk_path(c: gc.GanetiCluster, instance: str, index: int = 0) -> str:
    """The file of disk ``index`` of a Ganeti instance, from the cluster's config."""
    conf = c.config()
    inst = next(i for i in conf["instances"].values() if i["name"] == instance)
    return conf["disks"][inst["disks"][index]]["logical_id"][1]


def instances(c: gc.GanetiCluster) -> set[str]:
    return set(c.run(["gnt-instance", "list", "--no-headers", "-o", "name"]).stdout.split())


# --- the fixture itself --------------------------------------------------------------------


def test_cluster_runs_inside_its_own_namespaces(ganeti_cluster):
    """The node's name, network and Ganeti state exist inside the namespaces only."""
    c = ganeti_cluster
    assert c.run(["uname", "-n"]).stdout.strip() == gc.NODE
    assert os.uname().nodename != gc.NODE
    assert c.run(["gnt-cluster", "getmaster"]).stdout.strip() == gc.NODE
    links = c.run(["ip", "-o", "link"]).stdout
    assert gc.BRIDGE in links and gc.VETH in links
    assert gc.BRIDGE not in subprocess.run(["ip", "-o", "link"], capture_output=True,
                                           text=True).stdout
    assert c.run(["test", "-s", "/var/lib/ganeti/config.data"], check=False).returncode == 0
    assert not os.path.exists("/var/lib/ganeti/config.data")


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_interrupted_bring_up_leaves_nothing(tmp_path, how):
    """Ctrl-C while `gnt-cluster init` runs (the owner of the cluster tears it down), or
    SIGKILL of that owner (the holder sees EOF): no process, mount or namespace stays, and
    nothing changed on the host."""
    reason = gc.missing_prerequisite()
    if reason:
        pytest.skip(f"no Ganeti cluster here: {reason}")
    before = gc.host_snapshot()
    owner = subprocess.Popen([sys.executable, gc.__file__, "--state-dir", str(tmp_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        namespaces = gc.wait_for_daemon(owner.pid, "ganeti-noded", timeout=60)
        owner.send_signal(signal.SIGINT if how == "SIGINT" else signal.SIGKILL)
        out, _ = owner.communicate(timeout=60)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    if how == "SIGINT":
        assert "leftovers: none" in out, out
    deadline = time.monotonic() + 10
    while gc.namespace_members(namespaces) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gc.namespace_members(namespaces) == []
    with open("/proc/self/mountinfo") as f:
        assert str(tmp_path) not in f.read()
    assert gc.snapshot_changes(before, gc.host_snapshot()) == []


# --- 1. our OS definitions under Ganeti ----------------------------------------------------


def test_node_starts_without_ganeti_vol(node):
    """Before the install, the node had nothing of ganeti-vol: none of the package's paths
    (whatever the host has), no package in its dpkg database."""
    assert node.seen_before_install == []


def diagnosed(c: gc.GanetiCluster, name: str) -> str:
    """`gnt-os diagnose`'s block of OS ``name`` (it must be valid everywhere)."""
    out = c.run(["gnt-os", "diagnose"]).stdout
    block = re.search(rf"^OS: {name} \[global status: (\w+)\]\n(.*?)(?=^OS: |\Z)", out,
                      re.M | re.S)
    assert block, out
    assert block.group(1) == "valid", block.group(0)
    return block.group(2)


def test_gnt_os_diagnose_calls_the_shipped_definitions_valid(node):
    """The package (or `ganeti-vol os install`) puts raw and image where Ganeti looks, and
    Ganeti agrees."""
    for name, params in (("raw", "zero_target"), ("image", "image, image_format, image_sha256")):
        block = diagnosed(node, name)
        assert f"status: valid (path: {node.os_dir}/{name})" in block
        assert "[variants: default]" in block
        assert f"[parameters: {params}]" in block
    listed = node.run(["gnt-os", "list", "--no-headers"]).stdout.split()
    assert {"raw+default", "image+default"} <= set(listed)


#: what the node's dpkg must say it installed from the package
PACKAGE_PATHS = ("/usr/bin/ganeti-vol", "/usr/bin/ganeti-vol-lz4", "/usr/share/ganeti/os/raw",
                 "/usr/share/ganeti/os/image", gc.HOOKS_CONF,
                 "/etc/ganeti/hooks/instance-add-pre.d/ganeti-vol-verify-params",
                 "/etc/ganeti/hooks/instance-export-post.d/ganeti-vol-verify-export")


def test_node_runs_ganeti_vol_from_the_debian_package(node, debian_package):
    """The node's ganeti-vol, ganeti-vol-lz4, raw, image and hooks are the package's,
    installed by the node's own dpkg into its overlays (never the host's); ganeti-vol runs
    on the system python3, and Ganeti calls /usr/share/ganeti/os/raw and image valid."""
    if node.installed_from != "package":
        pytest.skip(f"the node runs this checkout, not the Debian package: "
                    f"{debian_package.reason}")
    owners = node.run(["dpkg", "-S", *PACKAGE_PATHS]).stdout.splitlines()
    assert owners == [f"{gc.PACKAGE}: {p}" for p in PACKAGE_PATHS]
    version = node.run(["dpkg-query", "-W", "-f", "${Version} ${db:Status-Status}",
                        gc.PACKAGE]).stdout
    assert version == f"{__version__} installed"
    for command in ("ganeti-vol", gc.LZ4_TOOL):
        found = node.run(["env", "-i", f"PATH={gc.GANETI_PATH}", "sh", "-c",
                          f'readlink -f "$(command -v {command})"']).stdout.strip()
        assert found == f"/usr/bin/{command}"
        assert node.run(["head", "-1", found]).stdout == "#!/usr/bin/python3\n"
    where = node.run(["env", "-i", f"PATH={gc.GANETI_PATH}", "python3", "-c",
                      "import ganeti_vol; print(ganeti_vol.__file__)"]).stdout
    assert where.startswith("/usr/lib/python3/dist-packages/ganeti_vol/"), where
    assert node.ganeti_vol("--version").stdout.split() == ["ganeti-vol", __version__]
    for name in ("raw", "image"):
        assert f"status: valid (path: /usr/share/ganeti/os/{name})" in diagnosed(node, name)
    # dpkg wrote into the overlays' upper layers, not the host
    for path in ("/usr/bin/ganeti-vol", f"/var/lib/dpkg/info/{gc.PACKAGE}.list"):
        assert node.upper_path(path).is_file(), path


def test_node_never_sees_what_ganeti_vols_package_put_on_the_host(node):
    """What ganeti-vol's Debian package installs on the host (``gc.HIDDEN``) stays out of
    the node, even when it appears while the cluster runs: here ``raw`` and ``image`` linked
    into the host's /usr/share/ganeti/os, as the package links them, for the few seconds of
    one `gnt-os diagnose`.  Seen inside, each OS would be found in two directories of
    Ganeti's search path, and Ganeti 3.0's `gnt-os diagnose` crashes on that (ValueError in
    gnt_os.py) instead of listing any OS."""
    made = []
    try:
        for name in ("raw", "image"):
            link = Path("/usr/share/ganeti/os") / name
            if not os.path.lexists(link):
                link.symlink_to(REPO / "os-definitions" / name)
                made.append(link)
        diagnose = node.run(["gnt-os", "diagnose"], check=False)
        seen = node.host_paths_seen()
    finally:
        for link in made:
            link.unlink()
    assert diagnose.returncode == 0 and "[hidden]" not in diagnose.output, diagnose.output
    for name in ("raw", "image"):
        assert f"status: valid (path: {node.os_dir}/{name})" in diagnose.stdout
    assert seen == []


def test_image_add_writes_a_disk_equal_to_the_image(node, names, tmp_path):
    """gnt-instance add -o image+default -O image=...,image_sha256=... runs our create,
    which checks the sha256 and writes the image."""
    image, sha = write_image(tmp_path / "disk.raw")
    name = next(names)
    r = node.run([*ADD, "-o", "image+default", "-O", f"image={image},image_sha256={sha}", name])
    assert "running the instance OS create scripts" in r.output
    assert node.sha256(disk_path(node, name)) == sha
    log = node.run(["sh", "-c", f"cat /var/log/ganeti/os/add-image+default-{name}-*.log"]).stdout
    assert f"sha256 {sha} verified" in log


def test_image_add_with_a_wrong_sha256_fails_the_job_with_our_message(node, names, tmp_path):
    """The Ganeti job fails, and its output carries the create script's last log lines."""
    image, sha = write_image(tmp_path / "disk.raw")
    wrong = hashlib.sha256(b"another image").hexdigest()
    name = next(names)
    r = node.run([*ADD, "-o", "image+default", "-O", f"image={image},image_sha256={wrong}",
                  name], check=False)
    assert r.returncode != 0
    assert "OS create script failed (exited with exit code 17)" in r.output, r.output
    assert (f"ERROR: image create: image '{image}' has sha256 {sha}, expected {wrong}: "
            "refusing a corrupt or replaced image") in r.output
    node.run(["gnt-instance", "remove", "-f", name])


def test_bad_os_parameter_is_refused_by_ganeti_running_our_verify(node, names, tmp_path):
    """Ganeti runs `verify parameters` itself before anything is created: the job output
    names the bad parameter in our words, and no instance exists afterwards."""
    image, _ = write_image(tmp_path / "disk.raw")
    name = next(names)
    r = node.run([*ADD, "-o", "image+default", "-O", f"image={image},image_sha256=xyz", name],
                 check=False)
    assert r.returncode != 0
    assert "OS validation script failed" in r.output, r.output
    assert "invalid OS parameter 'image_sha256': 'xyz' is not 64 hex digits" in r.output
    assert name not in instances(node)


def test_reinstall_and_rename_run_our_scripts(node, names, tmp_path):
    """gnt-instance reinstall writes the new image; rename runs our rename script."""
    first, sha1 = write_image(tmp_path / "first.raw")
    second, sha2 = write_image(tmp_path / "second.raw")
    name, new_name = next(names), next(names)
    node.run([*ADD, "-o", "image+default", "-O", f"image={first},image_sha256={sha1}", name])
    node.run(["gnt-instance", "reinstall", "-f", "-O", f"image={second},image_sha256={sha2}",
              name])
    assert node.sha256(disk_path(node, name)) == sha2
    node.run(["gnt-instance", "rename", "-f", "--no-name-check", "--no-ip-check", name,
              new_name])
    assert new_name in instances(node) and name not in instances(node)
    log = node.run(["sh", "-c", "cat /var/log/ganeti/os/"
                    f"rename-image+default-{name}-{new_name}-*.log"]).stdout
    assert f"renamed {name} to {new_name}" in log
    assert node.sha256(disk_path(node, new_name)) == sha2


# --- 2. the same environment, measured on the real thing -----------------------------------

ENVDUMP_DIR = "/srv/envdump"
# Every script first dumps what it got: argv, working directory, umask and its exact
# environment (/proc/self/environ of the script's shell), NUL-separated, into ENVDUMP_DIR.
ENVDUMP_HEAD = f"""\
d={ENVDUMP_DIR}
mkdir -p "$d"
f="$d/${{0##*/}}.$(date +%s%N).$$"
{{ printf '(argv)=%s\\0(cwd)=%s\\0(umask)=%s\\0' "$*" "$(pwd -P)" "$(umask)"
  cat /proc/$$/environ; }} > "$f.tmp"
mv "$f.tmp" "$f"
"""
ENVDUMP_SCRIPTS = {
    "create": "exit 0\n",
    "export": 'exec cat "$EXPORT_DEVICE"\n',
    "import": 'exec dd of="$IMPORT_DEVICE" bs=1M conv=notrunc status=none\n',
    "rename": "exit 0\n",
    "verify": "exit 0\n",
}


def make_envdump_os(parent: Path) -> Path:
    """An OS definition (API 20, variants v1 v2, parameters color and secret) whose every
    script dumps its environment; export and import move disk 0's bytes."""
    d = parent / "envdump"
    d.mkdir()
    (d / "ganeti_api_version").write_text("20\n")
    (d / "variants.list").write_text("v1\nv2\n")
    (d / "parameters.list").write_text("color a public parameter\nsecret a private one\n")
    for script, body in ENVDUMP_SCRIPTS.items():
        write_script(d / script, ENVDUMP_HEAD + body)
    return d


def take_dumps(c: gc.GanetiCluster) -> list[tuple[str, dict[str, str]]]:
    """(script, environment) of every dump since the last call, oldest first; removes them."""
    out = c.run([sys.executable, "-c", f"""
import json, os
d = {ENVDUMP_DIR!r}
names = sorted((n for n in os.listdir(d) if not n.endswith(".tmp")),
               key=lambda n: int(n.split(".")[1])) if os.path.isdir(d) else []
dumps = []
for n in names:
    with open(os.path.join(d, n), "rb") as f:
        items = [e.decode() for e in f.read().split(b"\\0") if e]
    dumps.append((n.split(".")[0], dict(e.split("=", 1) for e in items)))
    os.unlink(os.path.join(d, n))
print(json.dumps(dumps))
"""]).stdout
    return [(script, env) for script, env in json.loads(out)]


def instance_file(conf: dict, name: str, path: Path, *, call_it: str | None = None) -> Path:
    """Write the ganeti-vol instance file (doc/instance-file.md) of Ganeti's instance
    ``name`` as its config.data holds it, parameters filled with the cluster's defaults the
    way Ganeti fills them; ``call_it`` names it differently (a rename's old name)."""
    cluster = conf["cluster"]
    inst = next(i for i in conf["instances"].values() if i["name"] == name)
    base = inst["os"].split("+")[0]
    cfg = configobj.ConfigObj(encoding="utf-8")
    cfg["instance"] = {
        "name": call_it or name, "os": inst["os"], "hypervisor": inst["hypervisor"],
        "uuid": inst["uuid"], "ctime": repr(inst["ctime"]), "mtime": repr(inst["mtime"]),
        "primary_node": inst["primary_node"], "secondary_nodes": [],
        "tags": list(inst["tags"]), "running": inst["admin_state"] == "up",
    }
    disks = {}
    for i, uuid in enumerate(inst["disks"]):
        disk = conf["disks"][uuid]
        disks[str(i)] = {"path": disk["logical_id"][1], "size": f"{disk['size']}M",
                         "uuid": uuid, "access": disk["mode"],
                         "backend_type": f"file:{disk['logical_id'][0]}"}
        if disk.get("name"):
            disks[str(i)]["name"] = disk["name"]
    cfg["disks"] = disks
    cfg["nics"] = {
        str(i): {"mac": nic["mac"], "uuid": nic["uuid"],
                 **{k: str(v) for k, v in {**cluster["nicparams"]["default"],
                                           **nic["nicparams"]}.items()}}
        for i, nic in enumerate(inst["nics"])
    }
    cfg["osparams"] = {**cluster.get("osparams", {}).get(base, {}),
                       **cluster.get("osparams", {}).get(inst["os"], {}), **inst["osparams"]}
    cfg["osparams_private"] = dict(inst["osparams_private"])
    cfg["beparams"] = {k: str(v) for k, v in {**cluster["beparams"]["default"],
                                              **inst["beparams"]}.items()}
    cfg["hvparams"] = {k: str(v) for k, v in {**cluster["hvparams"][inst["hypervisor"]],
                                              **inst["hvparams"]}.items()}
    cfg.filename = str(path)
    cfg.write()
    return path


def measure_environments(c: gc.GanetiCluster, names: Iterator[str], tmp: Path) -> dict:
    """Run add (with verify), export, import (then rename) and rename through Ganeti and,
    for the same instance, through ganeti-vol.  {step: {"ganeti"|"ganeti-vol": dumps}}.
    Our add-pre hook, if installed, is off meanwhile: it would run verify itself."""
    a, b, d = next(names), next(names), next(names)

    def step(ganeti: list[str], ours: Callable[[], list[str]]) -> dict:
        c.run(ganeti)
        measured = {"ganeti": take_dumps(c)}
        c.ganeti_vol(*ours())
        measured["ganeti-vol"] = take_dumps(c)
        return measured

    def ini(name: str, call_it: str | None = None) -> str:
        return str(instance_file(c.config(), name, tmp / f"{name}.ini", call_it=call_it))

    take_dumps(c)
    with hook_disabled(c, "instance-add-pre.d/ganeti-vol-verify-params"):
        return {
            "add": step([*ADD, "-o", "envdump+v2", "-O", "color=blue",
                         "--os-parameters-private", "secret=s3cr3t", a],
                        lambda: ["instance", "create", "--no-hooks", ini(a)]),
            "export": step(["gnt-backup", "export", "-n", gc.NODE, a],
                           lambda: ["export", "--no-hooks", "--progress", "none",
                                    "-o", "/srv/envexport", ini(a)]),
            "import": step(["gnt-backup", "import", "-n", gc.NODE, "-t", "file",
                            f"--src-node={gc.NODE}", f"--src-dir={GANETI_EXPORT_DIR}/{a}",
                            "--net", "0:mac=generate", "--no-name-check", "--no-ip-check", b],
                           lambda: ["import", "--no-hooks", "--progress", "none", ini(b),
                                    f"{GANETI_EXPORT_DIR}/{a}"]),
            "rename": step(["gnt-instance", "rename", "-f", "--no-name-check",
                            "--no-ip-check", b, d],
                           lambda: ["instance", "rename", "--no-hooks", ini(d, call_it=b), d]),
        }


def environment_differences(steps: dict) -> list[tuple[str, str, str | None, str | None]]:
    """(step/script, variable, Ganeti's value, ganeti-vol's value) of every difference;
    None: absent.  A script that ran a different number of times shows as '(runs)'."""
    found = []
    for step, sides in steps.items():
        runs = {side: {} for side in sides}
        for side, dumps in sides.items():
            for script, env in dumps:
                runs[side].setdefault(script, []).append(env)
        g, v = runs["ganeti"], runs["ganeti-vol"]
        for script in sorted(set(g) | set(v)):
            where = f"{step}/{script}"
            gn, vn = len(g.get(script, [])), len(v.get(script, []))
            if gn != vn:
                found.append((where, "(runs)", str(gn), str(vn)))
            if not gn or not vn:
                continue
            genv, venv = g[script][-1], v[script][-1]
            for key in sorted(set(genv) | set(venv)):
                if genv.get(key) != venv.get(key):
                    found.append((where, key, genv.get(key), venv.get(key)))
    return found




@contextmanager
def hook_disabled(c: gc.GanetiCluster, hook: str) -> Iterator[None]:
    """Turn one of the cluster's hooks off the Ganeti way (chmod -x), if it is there."""
    path = f"/etc/ganeti/hooks/{hook}"
    there = c.run(["test", "-x", path], check=False).returncode == 0
    if there:
        c.run(["chmod", "a-x", path])
    try:
        yield
    finally:
        if there:
            c.run(["chmod", "a+x", path])


#: compared by form only: Ganeti bumps an instance's mtime while the operation runs, and
#: EXP_SIZE_FD is whichever descriptor number the runner had free (scripts read the variable)
VOLATILE = {"INSTANCE_MTIME": re.compile(r"^\d+\.\d+$"), "EXP_SIZE_FD": re.compile(r"^\d+$")}
#: what the Ganeti and ganeti-vol cells of the table may hold besides `literal` and absent
PLACEHOLDERS = {"<number>": re.compile(r"^\d+$")}
TABLE_MARK = "<!-- environment differences: tests/test_ganeti_cluster.py reads this table -->"


def documented_differences(text: str) -> dict[tuple[str, str], tuple[str | None, str | None]]:
    """{(step/script, variable): (Ganeti cell, ganeti-vol cell)} from the doc's table; a
    cell is None (absent), a literal or a placeholder."""
    lines = text.split(TABLE_MARK, 1)[1].strip().splitlines()
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        where, var, ganeti, ours = [cell.strip() for cell in line.strip("|").split("|")][:4]
        for w in re.findall(r"`([^`]+)`", where):
            key = (w, re.findall(r"`([^`]+)`", var)[0])
            assert key not in rows, f"{key} is in the table twice"
            rows[key] = (_cell(ganeti), _cell(ours))
    return rows


def _cell(text: str) -> str | None:
    if text.startswith("absent"):
        return None
    found = re.match(r"`([^`]*)`", text)
    assert found, f"a value cell must start with `value` or 'absent': {text!r}"
    return found.group(1)


def _matches(cell: str | None, value: str | None) -> bool:
    if cell is None or value is None:
        return cell is value
    pattern = PLACEHOLDERS.get(cell)
    return bool(pattern.match(value)) if pattern else cell == value


def test_environment_differences_are_exactly_the_documented_ones(node, envdump_os, names,
                                                                 tmp_path):
    """The same instance through Ganeti and through ganeti-vol: every variable (and argv,
    cwd, umask) a script gets is equal, or its difference is a row of the table in
    doc/ganeti-integration.md; every row still differs as written there."""
    steps = measure_environments(node, names, tmp_path)
    ganeti_ran = [(step, script, env) for step, sides in steps.items()
                  for script, env in sides["ganeti"]]
    assert {(step, script) for step, script, _ in ganeti_ran} == {
        ("add", "verify"), ("add", "create"), ("export", "export"), ("import", "verify"),
        ("import", "import"), ("import", "rename"), ("rename", "rename")}
    assert {env["PATH"] for _, _, env in ganeti_ran} == {"/sbin:/bin:/usr/sbin:/usr/bin"}
    measured = {}
    for where, var, g, v in environment_differences(steps):
        pattern = VOLATILE.get(var)
        if pattern and g and v and pattern.match(g) and pattern.match(v):
            continue
        measured[(where, var)] = (g, v)
    documented = documented_differences(DOC.read_text())
    problems = []
    for key in sorted(set(measured) | set(documented)):
        where, var = key
        if key not in documented:
            problems.append(f"new difference, not in the table: {where} {var}: Ganeti "
                            f"{measured[key][0]!r}, ganeti-vol {measured[key][1]!r}")
        elif key not in measured:
            problems.append(f"documented, but no longer differs: {where} {var}")
        elif not all(map(_matches, documented[key], measured[key])):
            problems.append(f"differs otherwise than documented: {where} {var}: Ganeti "
                            f"{measured[key][0]!r}, ganeti-vol {measured[key][1]!r}; the "
                            f"table says {documented[key]}")
    assert problems == [], "doc/ganeti-integration.md's table is out of date:\n" + \
        "\n".join(problems)


# --- 3. exports both ways --------------------------------------------------------------------


def test_gnt_backup_export_is_imported_by_ganeti_vol(node, envdump_os, names, tmp_path):
    """ganeti-vol imports what `gnt-backup export` wrote: the disk's bytes, the OS with its
    variant, the parameters, and the private parameters Ganeti keeps in [os_private]."""
    name, new_name = next(names), next(names)
    image, sha = write_image(tmp_path / "data.raw")
    node.run([*ADD, "-o", "envdump+v2", "-O", "color=green",
              "--os-parameters-private", "secret=hush", name])
    node.run(["dd", f"if={image}", f"of={disk_path(node, name)}", "conv=notrunc",
              "status=none"])
    node.run(["gnt-backup", "export", "-n", gc.NODE, name])
    export = f"{GANETI_EXPORT_DIR}/{name}"
    assert "[os_private]\nsecret = hush\n" in node.run(["cat", f"{export}/config.ini"]).stdout
    target = f"/srv/imported/{new_name}-disk0"
    node.run(["mkdir", "-p", "/srv/imported"])
    take_dumps(node)
    r = node.ganeti_vol("import", "--json", "--progress", "none", "--name", new_name,
                        "--disk", target, export)
    result = json.loads(r.stdout)
    assert (result["status"], result["os"]) == ("ok", "envdump+v2")
    assert node.sha256(target) == sha
    dumps = dict(take_dumps(node))
    assert {k: dumps["import"].get(k) for k in ("OS_VARIANT", "OSP_COLOR", "OSP_SECRET")} == {
        "OS_VARIANT": "v2", "OSP_COLOR": "green", "OSP_SECRET": "hush"}
    assert dumps["rename"]["OLD_INSTANCE_NAME"] == name


def gnt_backup_import(c: gc.GanetiCluster, export: str, name: str) -> gc.Result:
    """`gnt-backup import` of the export directory ``export`` as instance ``name``."""
    r = c.run(["gnt-backup", "import", "-n", gc.NODE, "-t", "file", f"--src-node={gc.NODE}",
               f"--src-dir={export}", "--no-name-check", "--no-ip-check", name])
    assert "WARNING" not in r.output, r.output  # a failed disk is only a warning there
    return r


def ganeti_vol_instance(c: gc.GanetiCluster, name: str, tmp: Path) -> tuple[list[str], str]:
    """An instance made by ganeti-vol with the image OS: (its flags, its disk's sha256)."""
    image, sha = write_image(tmp / "disk.raw")
    c.run(["mkdir", "-p", "/srv/ganeti-vol-disks"])
    flags = ["--name", name, "--os", "image+default", "--hypervisor", "fake",
             "-O", f"image={image},image_sha256={sha}",
             "--disk", f"/srv/ganeti-vol-disks/{name}-disk0,size=4M"]
    c.ganeti_vol("instance", "create", *flags)
    return flags, sha


def test_ganeti_format_export_is_imported_by_gnt_backup(node, names, tmp_path):
    """`ganeti-vol export --format ganeti` into Ganeti's export dir: gnt-backup import
    writes a disk with the same bytes."""
    name, new_name = next(names), next(names)
    flags, sha = ganeti_vol_instance(node, name, tmp_path)
    node.ganeti_vol("export", "--format", "ganeti", "--progress", "none", *flags)
    r = gnt_backup_import(node, f"{GANETI_EXPORT_DIR}/{name}", new_name)
    assert "disk/0 finished receiving data" in r.output
    assert node.sha256(disk_path(node, new_name)) == sha


def test_native_archive_unpacked_by_lz4_is_imported_by_gnt_backup(node, names, tmp_path):
    """A native archive, unpacked in place by the documented `lz4 -d -m *.lz4`, is a
    Ganeti export: gnt-backup import writes a disk with the same bytes."""
    name, new_name = next(names), next(names)
    flags, sha = ganeti_vol_instance(node, name, tmp_path)
    node.ganeti_vol("export", "--progress", "none", *flags)
    export = f"{GANETI_EXPORT_DIR}/{name}"
    assert node.run(["test", "-f", f"{export}/manifest.json"], check=False).returncode == 0
    node.sh(f"cd {export} && lz4 -d -m -q *.lz4")
    r = gnt_backup_import(node, export, new_name)
    assert "disk/0 finished receiving data" in r.output
    assert node.sha256(disk_path(node, new_name)) == sha


# --- 4. our hooks in Ganeti ------------------------------------------------------------------

SHIPPED_HOOKS = {"instance-add-pre.d/ganeti-vol-verify-params",
                 "instance-export-pre.d/ganeti-vol-check-space",
                 "instance-export-post.d/ganeti-vol-verify-export"}


def hooks_ganeti_vol(c: gc.GanetiCluster) -> str:
    """The ganeti-vol the hooks run: GANETI_VOL of their settings, or, where that is empty
    (the package's), 'ganeti-vol' on Ganeti's PATH."""
    settings = c.run(["cat", gc.HOOKS_CONF]).stdout
    command = re.search(r"^GANETI_VOL='?([^'\n]*)'?$", settings, re.M).group(1)
    return command or c.run(["env", "-i", f"PATH={gc.GANETI_PATH}", "sh", "-c",
                             "command -v ganeti-vol"]).stdout.strip()


def test_hooks_are_in_ganetis_hooks_directory(hooks, node):
    """Each shipped hook is executable in /etc/ganeti/hooks, as `ganeti-vol hooks install`
    puts it there (it finds nothing to change), with settings that name Ganeti's export
    directory and a ganeti-vol the hooks find by absolute path."""
    planned = json.loads(hooks.stdout)
    assert planned["target"] == "/etc/ganeti/hooks"
    actions = {a["file"]: a["action"] for a in planned["actions"]}
    assert {actions[h] for h in SHIPPED_HOOKS} == {"unchanged"}, actions
    found = node.run(["find", "/etc/ganeti/hooks", "-mindepth", "2", "-type", "f",
                      "-perm", "-u+x", "-printf", "%P\n"]).stdout.split()
    assert set(found) == SHIPPED_HOOKS
    settings = node.run(["cat", gc.HOOKS_CONF]).stdout
    assert re.search(rf"^EXPORT_DIR='?{GANETI_EXPORT_DIR}'?$", settings, re.M), settings
    command = hooks_ganeti_vol(node)
    assert command.startswith("/") and node.run([*command.split(), "--version"]).stdout


def test_add_pre_hook_vetoes_an_os_ganeti_vol_rejects(hooks, node, names, tmp_path):
    """Ganeti calls the OS valid, ganeti-vol does not (a bad ganeti_vol.conf): our
    add-pre hook stops the job before anything is created, and the job output says why.
    The same add with the intact OS passes the hook."""
    node.ganeti_vol("os", "install", "image", "--name", "imagebad", "--force")
    node.run(["sh", "-c", "cat > /srv/ganeti/os/imagebad/ganeti_vol.conf"],
             input="[disks]\naccess = sideways\n")
    diagnose = node.run(["gnt-os", "diagnose"]).stdout
    assert "OS: imagebad [global status: valid]" in diagnose
    image, sha = write_image(tmp_path / "disk.raw")
    params = ["-O", f"image={image},image_sha256={sha}"]
    vetoed, passed = next(names), next(names)
    r = node.run([*ADD, "-o", "imagebad+default", *params, vetoed], check=False)
    assert r.returncode != 0
    assert "hooks execution failed" in r.output.lower(), r.output
    assert "ganeti-vol-verify-params" in r.output
    assert "ganeti_vol.conf" in r.output and "sideways" in r.output, r.output
    assert f"OS 'imagebad+default' rejects {vetoed} on this node" in r.output
    assert vetoed not in instances(node)
    assert node.run(["test", "-e", f"/srv/ganeti/file-storage/{vetoed}"],
                    check=False).returncode != 0
    node.run([*ADD, "-o", "image+default", *params, passed])
    assert node.sha256(disk_path(node, passed)) == sha


@contextmanager
def hook_settings(c: gc.GanetiCluster, **changes: str) -> Iterator[None]:
    """Change settings in the cluster's ganeti-vol-hooks.conf for a while."""
    path = gc.HOOKS_CONF
    original = c.run(["cat", path]).stdout
    text = original
    for key, value in changes.items():
        text = re.sub(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
    c.run(["sh", "-c", f"cat > {path}"], input=text)
    try:
        yield
    finally:
        c.run(["sh", "-c", f"cat > {path}"], input=original)


def test_export_post_hook_verifies_a_real_gnt_backup_export(hooks, node, names, tmp_path):
    """After gnt-backup export, our post hook runs `ganeti-vol backup verify` on the new
    export, which passes; pointed at the wrong export dir, the hook fails and the job
    output carries its warning."""
    image, sha = write_image(tmp_path / "disk.raw")
    name = next(names)
    node.run([*ADD, "-o", "image+default", "-O", f"image={image},image_sha256={sha}", name])
    real = hooks_ganeti_vol(node)
    calls = "/srv/hook-calls.log"
    write_script(tmp_path / "recorder", f"""\
        echo "called: $*" >> {calls}
        {real} "$@"
        rc=$?
        echo "exit $rc" >> {calls}
        exit $rc
        """)
    with hook_settings(node, GANETI_VOL=str(tmp_path / "recorder")):
        r = node.run(["gnt-backup", "export", "-n", gc.NODE, name])
        assert "hook" not in r.output.lower(), r.output
        recorded = node.run(["cat", calls]).stdout
        assert recorded.splitlines() == [
            f"called: backup verify --progress none {GANETI_EXPORT_DIR}/{name}", "exit 0"]
        with hook_settings(node, EXPORT_DIR="/srv/ganeti/export"):
            r = node.run(["gnt-backup", "export", "-n", gc.NODE, name])
    assert "ganeti-vol-verify-export" in r.output, r.output
    assert (f"export of {name} not found: '/srv/ganeti/export/{name}' is not a directory"
            in r.output), r.output


# --- 5. our compression tool in Ganeti's transfers -------------------------------------------

TOOL = gc.LZ4_TOOL
COMPRESSION_TOOLS = gc.COMPRESSION_TOOLS
#: random data, zeros, random data (8 MiB each): Ganeti's 42-byte magic value goes first,
#: so the tool's stream has seven chunks of 4 MiB or less, one of them all zeros
TOOL_DISK = 24 * MIB
MAGIC_LEN = 42  # Ganeti's "M=<40 hex digits>" travels through the tool before the disk


@pytest.fixture(scope="session")
def lz4_tool(node) -> str:
    """ganeti-vol-lz4 on the node (the package's, or linked into /usr/bin as doc/remote.md
    says for pip) and enabled in the cluster."""
    node.enable_lz4_tool()
    return TOOL


#: earlier than /usr/bin on every PATH Ganeti uses (/sbin is /usr/sbin here)
TOOL_SHADOW = f"/usr/sbin/{TOOL}"


@contextmanager
def tool_calls(c: gc.GanetiCluster, tmp: Path) -> Iterator[Callable[[], list[str]]]:
    """For a while, Ganeti's PATH finds a recorder that logs each call's arguments and runs
    the installed tool; yields a function returning the calls so far."""
    log = tmp / "calls.log"
    recorder = write_script(tmp / "recorder",
                            f'echo "$*" >> {log}\nexec {gc.LZ4_TOOL_BIN} "$@"\n')
    c.run(["ln", "-s", str(recorder), TOOL_SHADOW])
    try:
        found = c.run(["env", "-i", f"PATH={gc.GANETI_PATH}", "sh", "-c",
                       f"command -v {TOOL}"]).stdout.strip()
        assert found in ("/sbin/" + TOOL, TOOL_SHADOW), found
        yield lambda: log.read_text().splitlines() if log.exists() else []
    finally:
        c.run(["rm", "-f", TOOL_SHADOW])


def export_dump(c: gc.GanetiCluster, export: str) -> str:
    """The one disk dump in a Ganeti export directory (named after the disk's uuid)."""
    found = c.run(["find", export, "-type", "f", "!", "-name", "config.ini"]).stdout.split()
    assert len(found) == 1, found
    return found[0]


@dataclass
class ToolExport:
    """An instance exported with `--transport-compression=ganeti-vol-lz4`."""

    name: str
    source: bytes  # its disk
    export: str  # the export directory
    output: str  # gnt-backup export's
    calls: list[str]  # the tool's arguments, one call each
    refused: gc.Result  # the same export with a tool not on the cluster's list

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source).hexdigest()


@pytest.fixture(scope="session")
def tool_export(lz4_tool, node, names, tmp_path_factory) -> ToolExport:
    """An instance with a 24 MiB disk (random data, zeros, random data), exported into the
    node's export directory through our tool: `gnt-backup export
    --transport-compression=ganeti-vol-lz4` (in Ganeti 3.0's CLI, see doc/remote.md)."""
    tmp = tmp_path_factory.mktemp("tool-export")
    name = next(names)
    image, sha = write_image(tmp / "disk.raw", TOOL_DISK)
    node.run(["gnt-instance", "add", "-n", gc.NODE, "-t", "file", "--disk",
              f"0:size={TOOL_DISK // MIB}M", "-B", "memory=64M", "--no-start",
              "--no-name-check", "--no-ip-check", "-o", "image+default",
              "-O", f"image={image},image_sha256={sha}", name])
    export = ["gnt-backup", "export", "-n", gc.NODE]
    refused = node.run([*export, "--transport-compression=lz4", name], check=False)
    with tool_calls(node, tmp) as calls:
        r = node.run([*export, f"--transport-compression={TOOL}", name])
        return ToolExport(name, image.read_bytes(), f"{GANETI_EXPORT_DIR}/{name}", r.output,
                          calls(), refused)


def test_compression_tool_is_installed_and_enabled_as_documented(lz4_tool, node):
    """Found on Ganeti's fixed PATH, `-h` exits 0 (Ganeti checks that before every transfer),
    and the cluster lists it.  Ganeti refuses a list without gzip or with `none`."""
    helped = node.run(["env", "-i", f"PATH={gc.GANETI_PATH}", TOOL, "-h"])
    assert helped.stdout.startswith(f"usage: {TOOL}")
    info = node.run(["gnt-cluster", "info"]).stdout
    listed = re.search(r"compression tools:\s*\n((?:\s+- .*\n)+)", info)
    assert listed and listed.group(1).split() == [
        "-", "gzip", "-", "gzip-fast", "-", "gzip-slow", "-", TOOL], info
    for tools, why in ((TOOL, "the gzip utility must be present"),
                       (f"{COMPRESSION_TOOLS},none", "none is a reserved value")):
        r = node.run(["gnt-cluster", "modify", f"--compression-tools={tools}"], check=False)
        assert r.returncode != 0 and why in r.output, r.output


def test_gnt_backup_export_moves_the_disk_through_our_tool(tool_export, node):
    """Ganeti runs our tool (`-h` on both sides, then the compressor and `-d`) and the dump
    in the export directory holds the disk's bytes.  A tool not on the cluster's list is
    refused before anything moves."""
    assert "disk/0 finished receiving data" in tool_export.output, tool_export.output
    assert sorted(tool_export.calls) == ["", "-d", "-h", "-h"]
    assert node.sha256(export_dump(node, tool_export.export)) == tool_export.sha256
    allowed = COMPRESSION_TOOLS.replace(",", ", ")
    assert tool_export.refused.returncode != 0
    assert f"Compression tool not allowed, tools allowed are [{allowed}]" in \
        tool_export.refused.output, tool_export.refused.output


def test_gnt_backup_import_moves_the_disk_through_our_tool(tool_export, node, names, tmp_path):
    """`gnt-backup import --compress=ganeti-vol-lz4` of that export into a new instance:
    our tool runs on both sides, and the new instance's disk holds the same bytes."""
    name = next(names)
    with tool_calls(node, tmp_path) as calls:
        r = node.run(["gnt-backup", "import", "-n", gc.NODE, "-t", "file",
                      f"--src-node={gc.NODE}", f"--src-dir={tool_export.export}",
                      f"--compress={TOOL}", "--net", "0:mac=generate", "--no-name-check",
                      "--no-ip-check", name])
        assert sorted(calls()) == ["", "-d", "-h", "-h"]
    assert "disk/0 finished receiving data" in r.output and "WARNING" not in r.output, r.output
    assert node.sha256(disk_path(node, name)) == tool_export.sha256


FLIP_AT = 6 * MIB  # inside the second data chunk's frame of a TOOL_DISK stream
#: what the receiving ganeti-vol-lz4 -d says of a damaged stream, in Ganeti's job output
DAMAGE_REPORTED = re.compile(
    r"disk/0 failed to receive data: Exited with status 17 \(recent output: "
    rf"{TOOL}: error: cannot read the compressed stream on stdin at offset \d+: chunk hash "
    r"mismatch \(corrupt data\): .*?; only verified data went to stdout \((\d+) bytes in "
    r"whole chunks\)")


@contextmanager
def flipping_tool(c: gc.GanetiCluster, tmp: Path) -> Iterator[str]:
    """For a while, the cluster allows one more tool, ``ganeti-vol-lz4-flip`` on Ganeti's
    PATH: as a compressor it runs ours and flips one byte of what ours writes, at
    ``FLIP_AT``, on its way to socat (a path Ganeti's pipeline really takes, and one TLS
    does not cover); with ``-h`` or ``-d`` it is ours unchanged.  Yields its name."""
    flipper = write_script(tmp / "flipper", f"""\
        #!{sys.executable}
        import os, subprocess, sys
        if sys.argv[1:]:  # -h, -d: the real tool
            os.execvp({TOOL!r}, [{TOOL!r}, *sys.argv[1:]])
        tool = subprocess.Popen([{TOOL!r}], stdout=subprocess.PIPE)
        pos = 0
        try:
            while block := tool.stdout.read1(1 << 20):
                if pos <= {FLIP_AT} < pos + len(block):
                    block = bytearray(block)
                    block[{FLIP_AT} - pos] ^= 0x10
                sys.stdout.buffer.write(block)
                pos += len(block)
            sys.stdout.buffer.flush()
        except BrokenPipeError:  # the receiving side stopped at the damage
            sys.exit(1)
        sys.exit(tool.wait())
        """)
    flip = f"{TOOL}-flip"
    c.run(["ln", "-s", str(flipper), f"/usr/bin/{flip}"])
    try:
        c.run(["gnt-cluster", "modify", f"--compression-tools={COMPRESSION_TOOLS},{flip}"])
        yield flip
    finally:
        c.run(["gnt-cluster", "modify", f"--compression-tools={COMPRESSION_TOOLS}"])
        c.run(["rm", "-f", f"/usr/bin/{flip}"])


def test_a_byte_corrupted_in_transit_fails_the_export_and_never_reaches_the_dump(
        tool_export, node, tmp_path):
    """One byte flipped between our compressor and socat on the sending side: the receiving
    `ganeti-vol-lz4 -d` finds the damage, the export job fails with our line in its output,
    and the dump Ganeti leaves holds the verified chunks before the damage and nothing
    else: a prefix of the disk.  The last good export stays as it was."""
    with flipping_tool(node, tmp_path) as flip:
        r = node.run(["gnt-backup", "export", "-n", gc.NODE, f"--transport-compression={flip}",
                      tool_export.name], check=False)
    assert r.returncode != 0
    assert "Export failed, errors in export finalization, disk export: disk(s) 0" in r.output
    ours = DAMAGE_REPORTED.search(r.output)
    assert ours, r.output
    verified = int(ours.group(1))
    assert 0 < verified < FLIP_AT and verified % CS == 0
    left = node.run(["cat", export_dump(node, f"{tool_export.export}.new")], text=False).stdout
    assert left == tool_export.source[:verified - MAGIC_LEN]
    assert node.sha256(export_dump(node, tool_export.export)) == tool_export.sha256


def test_a_byte_corrupted_in_transit_is_reported_by_an_import_that_exits_0(
        tool_export, node, names, tmp_path):
    """The same damage in a `gnt-backup import`: our line is in the job output, but Ganeti
    ends an import whose disk failed with a warning and exit code 0, and keeps the instance
    (doc/ganeti-integration.md says so): its new disk holds the verified chunks, and after
    them what it held before, zeros; never a byte of the damaged chunk."""
    name = next(names)
    with flipping_tool(node, tmp_path) as flip:
        r = node.run(["gnt-backup", "import", "-n", gc.NODE, "-t", "file",
                      f"--src-node={gc.NODE}", f"--src-dir={tool_export.export}",
                      f"--compress={flip}", "--net", "0:mac=generate", "--no-name-check",
                      "--no-ip-check", name], check=False)
    assert r.returncode == 0, r.output
    assert (f"WARNING: Some disks for instance {name} on node {gc.NODE} were not imported "
            "successfully") in r.output, r.output
    ours = DAMAGE_REPORTED.search(r.output)
    assert ours, r.output
    verified = int(ours.group(1)) - MAGIC_LEN
    assert name in instances(node)
    disk = node.run(["cat", disk_path(node, name)], text=False).stdout
    assert len(disk) == TOOL_DISK and 0 < verified < FLIP_AT
    assert disk[:verified] == tool_export.source[:verified]
    assert disk[verified:] == bytes(TOOL_DISK - verified)
