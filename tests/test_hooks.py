"""The hooks runner with real scripts: Ganeti's hooks/RunParts cases, env, veto, timeouts."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import write_script
from test_process import pid_alive, wait_gone

from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Disk, Instance, Nic
from ganeti_vol.ganeti import hooks
from ganeti_vol.ganeti import params as ganeti_params
from ganeti_vol.ganeti.hooks import HookStatus, OperationHooks
from ganeti_vol.ops import operations

SKIP, FAIL, OK = HookStatus.SKIPPED, HookStatus.FAILED, HookStatus.SUCCEEDED
ENV_DUMP = "env | grep -v -E '^(PWD|SHLVL|_)='"


@pytest.fixture
def base(tmp_path) -> Path:
    d = tmp_path / "hooks"
    d.mkdir()
    return d


def phase_dir(base: Path, phase: str = "pre", hpath: str = "fake") -> Path:
    d = base / f"{hpath}-{phase}.d"
    d.mkdir(exist_ok=True)
    return d


def run(base: Path, phase: str = "pre", env=None, hpath: str = "fake", **kw):
    return hooks.run_hooks(str(base), hpath, phase, env or {"PHASE": phase}, **kw)


def statuses(results):
    return [(os.path.basename(r.hook), r.status) for r in results]


def parse_env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines())


# --- Ganeti's TestHooksRunner and TestRunParts cases ---------------------------------------


@pytest.mark.parametrize("phase", ["pre", "post"])
def test_empty_directory_yields_no_results(base, phase):
    """An existing but empty <hpath>-<phase>.d runs nothing."""
    phase_dir(base, phase)
    assert run(base, phase) == []


@pytest.mark.parametrize("phase", ["pre", "post"])
def test_missing_directory_yields_no_results(base, phase):
    """No <hpath>-<phase>.d at all is not an error: no hooks."""
    assert run(base, phase) == []


def test_non_executable_file_is_skipped_with_empty_output(base):
    """A regular file without the x bit is skipped, and says why."""
    write_script(phase_dir(base) / "10noexec", "exit 0", mode=0o644)
    [r] = run(base)
    assert (r.status, r.output, r.reason) == (SKIP, "", "not executable")
    assert r.hook == "fake-pre.d/10noexec"


def test_executable_with_a_dot_in_its_name_is_skipped(base):
    """'a.off' does not match ^[a-zA-Z0-9_-]+$, so it never runs (Ganeti's way to disable)."""
    marker = base / "ran"
    write_script(phase_dir(base) / "a.off", f"touch {marker}")
    [r] = run(base)
    assert r.status == SKIP and "does not match" in r.reason
    assert not marker.exists()


def test_subdirectory_is_skipped(base):
    """A directory inside the phase directory is skipped, not descended into."""
    (phase_dir(base) / "testdir").mkdir()
    [r] = run(base)
    assert (r.status, r.reason) == (SKIP, "a directory, not a regular file")


def test_exit_0_succeeds_with_empty_output(base):
    """A hook exiting 0 silently is a success with output ''."""
    write_script(phase_dir(base) / "success", "exit 0")
    [r] = run(base)
    assert (r.status, r.output, r.reason, r.returncode) == (OK, "", "", 0)


def test_symlink_to_bin_true_succeeds(base):
    """Symlinks are followed: a link to /bin/true runs and succeeds."""
    (phase_dir(base) / "success").symlink_to("/bin/true")
    assert statuses(run(base)) == [("success", OK)]


def test_broken_symlink_is_skipped_with_its_reason(base):
    """A dangling symlink is skipped as such."""
    (phase_dir(base) / "gone").symlink_to(base / "nowhere")
    [r] = run(base)
    assert (r.status, r.reason) == (SKIP, "broken symbolic link")


def test_exit_1_fails_with_the_exit_reason(base):
    """A hook exiting 1 fails; the reason names the exit code."""
    write_script(phase_dir(base) / "fail", "exit 1")
    [r] = run(base)
    assert (r.status, r.reason, r.returncode) == (FAIL, "exited with exit code 1", 1)


def test_success_failure_and_invalid_name_are_reported_in_order(base):
    """Ganeti's combined case: 00succ, 10fail, 20inv. -> SUCCESS, FAIL, SKIP."""
    d = phase_dir(base)
    write_script(d / "00succ", "exit 0")
    write_script(d / "10fail", "exit 1")
    write_script(d / "20inv.", "exit 0")
    assert statuses(run(base)) == [("00succ", OK), ("10fail", FAIL), ("20inv.", SKIP)]


def test_hooks_run_in_sorted_order(base, tmp_path):
    """10s1, 00s0, 10sa, 80sc, 60sd run (and are reported) in sorted order."""
    d = phase_dir(base)
    order = tmp_path / "order"
    names = ["10s1", "00s0", "10sa", "80sc", "60sd"]
    for name in names:
        write_script(d / name, f"echo {name} >> {order}")
    results = run(base)
    assert sorted(names) == [os.path.basename(r.hook) for r in results]
    assert sorted(names) == order.read_text().split()


def test_mixed_failure_skip_exec_error_and_success_keep_their_order(base):
    """RunParts' mixed case: fail, skip, execution error, success - all reported, in order."""
    d = phase_dir(base)
    write_script(d / "00fail", "exit 1")
    write_script(d / "10skip.sh", "exit 0")
    (d / "20empty").write_text("")
    (d / "20empty").chmod(0o755)
    write_script(d / "30ok", "exit 0")
    results = run(base)
    assert statuses(results) \
        == [("00fail", FAIL), ("10skip.sh", SKIP), ("20empty", FAIL), ("30ok", OK)]


def test_empty_executable_fails_with_a_hook_script_execution_error(base):
    """An empty executable cannot be exec'd (ENOEXEC): failed, with Ganeti's message."""
    f = phase_dir(base) / "empty"
    f.write_text("")
    f.chmod(0o755)
    [r] = run(base)
    assert r.status == FAIL
    assert r.output.startswith("Hook script execution error: Exec format error")
    assert r.output == r.reason


@pytest.mark.parametrize("phase", ["pre", "post"])
def test_environment_is_exactly_the_given_one(base, phase, monkeypatch):
    """Ganeti's env test: the hook sees PHASE=<phase> and nothing else (no sentinel leaks)."""
    monkeypatch.setenv("GANETI_VOL_SENTINEL", "leaked")
    write_script(phase_dir(base, phase) / "00env", ENV_DUMP)
    [r] = run(base, phase)
    assert (OK, f"PHASE={phase}") == (r.status, r.output)


def test_stdout_is_captured(base):
    """What a hook prints is its output (Ganeti's 'echo -n ciao' case)."""
    write_script(phase_dir(base) / "00ciao", "printf ciao")
    [r] = run(base)
    assert r.output == "ciao"


def test_stdout_and_stderr_are_both_kept_and_stripped(base):
    """stderr is output too; surrounding blank lines are stripped like Ganeti's strip()."""
    write_script(phase_dir(base) / "00both", "echo; echo out; echo err >&2; echo")
    [r] = run(base)
    assert r.output == "out\nerr"


def test_dot_files_are_invisible(base):
    """Dot-files are not even listed (Ganeti ListVisibleFiles)."""
    write_script(phase_dir(base) / ".hidden", "exit 1")
    assert run(base) == []


def test_hook_runs_in_root_with_stdin_from_dev_null(base):
    """cwd is '/', and reading stdin gives EOF at once (no hang)."""
    write_script(phase_dir(base) / "00where", "pwd; cat; echo read-done")
    [r] = run(base)
    assert r.output == "/\nread-done"


def test_output_is_appended_to_the_operation_log(base, tmp_path):
    """The log keeps what was there, then a header, the hook's output and its outcome."""
    log_path = tmp_path / "op.log"
    log_path.write_text("earlier line\n")
    write_script(phase_dir(base) / "00talk", "echo hello from the hook")
    run(base, log_path=str(log_path))
    lines = log_path.read_text().splitlines()
    assert lines[0] == "earlier line"
    assert lines[1] == "=== hook fake-pre.d/00talk: started"
    assert lines[2] == "hello from the hook"
    assert lines[3].startswith("=== hook fake-pre.d/00talk: succeeded (")


def test_unknown_phase_is_a_programmer_error(base):
    """Only pre and post exist (Ganeti: "Unknown hooks phase")."""
    with pytest.raises(E.ProgrammerError, match="Unknown hooks phase 'middle'"):
        run(base, "middle")


# --- timeouts, floods, Ctrl-C ----------------------------------------------------------------


def test_timeout_kills_the_hook_and_its_background_child(base, tmp_path):
    """A 'sleep 60' hook with a 0.5 s timeout fails at once; its whole process group dies."""
    pidfile = tmp_path / "child.pid"
    write_script(phase_dir(base) / "00sleep", f"sleep 60 & echo $! > {pidfile}; sleep 60")
    started = time.monotonic()
    [r] = run(base, timeout=0.5)
    assert time.monotonic() - started < 5
    assert (r.status, r.timed_out, r.reason) == (FAIL, True, "timed out after 0.5s and was killed")
    assert wait_gone(int(pidfile.read_text()))


def test_hook_ignoring_term_is_killed_after_the_grace(base, tmp_path):
    """TERM is followed by KILL to the group after the grace period."""
    pidfile = tmp_path / "hook.pid"
    write_script(phase_dir(base) / "00stubborn",
                 f"trap '' TERM; echo $$ > {pidfile}; while :; do sleep 0.1; done")
    started = time.monotonic()
    [r] = run(base, timeout=0.3, kill_grace=0.3)
    assert time.monotonic() - started < 3
    assert (r.status, r.timed_out) == (FAIL, True)
    assert wait_gone(int(pidfile.read_text()))


def test_hook_flooding_output_completes_and_keeps_the_last_mib(base, tmp_path):
    """8 MiB on stdout and 1 MiB on stderr do not block; the log has it all."""
    log_path = tmp_path / "op.log"
    write_script(phase_dir(base) / "00flood",
                 "head -c 8388608 /dev/zero | tr '\\0' x; head -c 1048576 /dev/zero | "
                 "tr '\\0' y >&2; echo; echo the-end")
    [r] = run(base, log_path=str(log_path), timeout=20)
    assert r.status == OK
    assert len(r.output) <= hooks.OUTPUT_LIMIT and r.output.endswith("y\nthe-end")
    assert log_path.stat().st_size > 9 * 1024 * 1024


def test_ctrl_c_while_a_hook_runs_stops_its_process_group(base, tmp_path):
    """SIGINT (the CLI raises Interrupted) kills and reaps the running hook before propagating."""
    pidfile = tmp_path / "hook.pid"
    write_script(phase_dir(base) / "00sleep", f"echo $$ > {pidfile}; sleep 60")

    def interrupted(signum, frame):
        raise E.Interrupted(signum)

    previous = signal.signal(signal.SIGINT, interrupted)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    try:
        timer.start()
        with pytest.raises(E.Interrupted):
            run(base, kill_grace=0.5)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    pid = int(pidfile.read_text())
    assert not pid_alive(pid)


# --- environment (Ganeti's TestHooksRunnerEnv, which Ganeti never runs) ----------------------

FIXED = {
    "PATH": C.SCRIPT_PATH,
    "GANETI_HOOKS_VERSION": "2",
    "GANETI_DATA_DIR": "/var/lib/ganeti",
    "GANETI_OBJECT_TYPE": "INSTANCE",
    "GANETI_HOOKS_PATH": "instance-rename",
    "GANETI_OP_CODE": "OP_INSTANCE_RENAME",
    "GANETI_CLUSTER": "cluster.example.com",
    "GANETI_MASTER": "master.example.com",
}


def build(phase, lu_env, **kw):
    return hooks.build_env("instance-rename", phase, lu_env, cluster="cluster.example.com",
                           master="master.example.com", **kw)


def test_pre_env_is_the_fixed_variables_plus_the_prefixed_operation_ones():
    """Pre: PATH, the fixed GANETI_* variables, and GANETI_FOO for the operation's FOO."""
    assert build("pre", {"FOO": "pre-tmp"}) \
        == {**FIXED, "GANETI_HOOKS_PHASE": "pre", "GANETI_FOO": "pre-tmp"}


def test_post_env_merges_the_pre_variables_with_the_post_ones():
    """Post: GANETI_FOO (pre) + GANETI_POST_FOO + GANETI_POST_BAR, and no GANETI_BAR."""
    env = build("post", {"FOO": "post-tmp", "BAR": 123}, pre_lu_env={"FOO": "pre-tmp"})
    assert env == {**FIXED, "GANETI_HOOKS_PHASE": "post", "GANETI_FOO": "pre-tmp",
            "GANETI_POST_FOO": "post-tmp", "GANETI_POST_BAR": "123"}


def test_post_env_without_a_separate_pre_env_still_merges():
    """Ganeti's 'post without pre' case: the operation's variables appear under both prefixes."""
    env = build("post", {"FOO": "x"})
    assert (env["GANETI_FOO"], env["GANETI_POST_FOO"]) == ("x", "x")


@pytest.mark.parametrize("key", ["DATA_DIR", "OP_CODE", "HOOKS_PHASE", "MASTER"])
@pytest.mark.parametrize("phase", ["pre", "post"])
def test_operation_key_colliding_with_a_fixed_one_is_a_programmer_error(key, phase):
    """An operation variable may not redefine GANETI_DATA_DIR, ..._OP_CODE (Ganeti asserts)."""
    with pytest.raises(E.ProgrammerError, match=f"GANETI_{key}"):
        build(phase, {key: "x"}, pre_lu_env={key: "x"})


@pytest.mark.parametrize("key", ["GANETI_FOO", "foo-bar", ""])
def test_prefixed_or_malformed_operation_key_is_a_programmer_error(key):
    """Operation keys come without the prefix and are [A-Za-z0-9_]+."""
    with pytest.raises(E.ProgrammerError, match="invalid hook environment key"):
        build("pre", {key: "x"})


def test_values_are_converted_with_str_like_ganeti():
    """True/False/None/ints/lists become their str() (Ganeti converts every value)."""
    env = build("pre", {"T": True, "F": False, "N": None, "I": 120, "L": ["/a", False]})
    assert tuple(env[f"GANETI_{k}"] for k in "TFNIL") \
        == ("True", "False", "None", "120", "['/a', False]")


def test_unknown_hook_path_is_a_programmer_error():
    """Only the hook paths ganeti-vol runs have an opcode."""
    with pytest.raises(E.ProgrammerError, match="unknown hook path 'instance-start'"):
        hooks.build_env("instance-start", "pre", {})


WEB1 = Instance(
    name="web1.example.com",
    os="testos+default",
    uuid="11111111-2222-3333-4444-555555555555",
    ctime=0,
    mtime=0,
    primary_node="node1.example.com",
    secondary_nodes=("node2.example.com",),
    disks=(
        Disk(path="/srv/disks/web1-0.img", size_mib=1024, uuid="d0", backend_type="file:loop",
             name="root"),
        Disk(path="/dev/vg/web1-1", size_mib=512, uuid="d1", backend_type="block", access="ro"),
    ),
    nics=(
        Nic(mac="aa:00:00:00:00:01", uuid="n0", link="br0", name="eth0", vlan="100"),
        Nic(mac="aa:00:00:00:00:02", uuid="n1", mode="routed", link="rt1", ip="192.0.2.10",
            network={"name": "net1", "uuid": "nu1", "subnet": "192.0.2.0/24",
                     "gateway": "192.0.2.1", "tags": "a b"}),
    ),
    osparams={"param1": "not in the hook env"},
    beparams={"maxmem": "1024", "vcpus": "2"},
    hvparams={"kernel_path": "/boot/vmlinuz", "boot_order": "disk"},
    tags=("prod", "web"),
    running=True,
)

GOLDEN_ADD_CREATE = {
    "PATH": "/sbin:/bin:/usr/sbin:/usr/bin",
    "GANETI_HOOKS_VERSION": "2",
    "GANETI_OP_CODE": "OP_INSTANCE_CREATE",
    "GANETI_DATA_DIR": "/var/lib/ganeti",
    "GANETI_HOOKS_PHASE": "pre",
    "GANETI_HOOKS_PATH": "instance-add",
    "GANETI_OBJECT_TYPE": "INSTANCE",
    "GANETI_CLUSTER": "cluster.example.com",
    "GANETI_MASTER": "master.example.com",
    "GANETI_ADD_MODE": "create",
    "GANETI_OP_TARGET": "web1.example.com",
    "GANETI_INSTANCE_NAME": "web1.example.com",
    "GANETI_INSTANCE_PRIMARY": "node1.example.com",
    "GANETI_INSTANCE_SECONDARIES": "node2.example.com",
    "GANETI_INSTANCE_OS_TYPE": "testos+default",
    "GANETI_INSTANCE_STATUS": "True",
    "GANETI_INSTANCE_MINMEM": "128",
    "GANETI_INSTANCE_MAXMEM": "1024",
    "GANETI_INSTANCE_MEMORY": "1024",
    "GANETI_INSTANCE_VCPUS": "2",
    "GANETI_INSTANCE_DISK_TEMPLATE": "mixed",
    "GANETI_INSTANCE_HYPERVISOR": "kvm",
    "GANETI_INSTANCE_NIC0_NAME": "eth0",
    "GANETI_INSTANCE_NIC0_UUID": "n0",
    "GANETI_INSTANCE_NIC0_IP": "",
    "GANETI_INSTANCE_NIC0_MAC": "aa:00:00:00:00:01",
    "GANETI_INSTANCE_NIC0_MODE": "bridged",
    "GANETI_INSTANCE_NIC0_LINK": "br0",
    "GANETI_INSTANCE_NIC0_VLAN": "100",
    "GANETI_INSTANCE_NIC0_BRIDGE": "br0",
    "GANETI_INSTANCE_NIC1_UUID": "n1",
    "GANETI_INSTANCE_NIC1_IP": "192.0.2.10",
    "GANETI_INSTANCE_NIC1_MAC": "aa:00:00:00:00:02",
    "GANETI_INSTANCE_NIC1_MODE": "routed",
    "GANETI_INSTANCE_NIC1_LINK": "rt1",
    "GANETI_INSTANCE_NIC1_VLAN": "",
    "GANETI_INSTANCE_NIC1_NETWORK_NAME": "net1",
    "GANETI_INSTANCE_NIC1_NETWORK_UUID": "nu1",
    "GANETI_INSTANCE_NIC1_NETWORK_TAGS": "a b",
    "GANETI_INSTANCE_NIC1_NETWORK_SUBNET": "192.0.2.0/24",
    "GANETI_INSTANCE_NIC1_NETWORK_GATEWAY": "192.0.2.1",
    "GANETI_INSTANCE_NIC_COUNT": "2",
    "GANETI_INSTANCE_DISK0_NAME": "root",
    "GANETI_INSTANCE_DISK0_UUID": "d0",
    "GANETI_INSTANCE_DISK0_SIZE": "1024",
    "GANETI_INSTANCE_DISK0_MODE": "rw",
    "GANETI_INSTANCE_DISK1_UUID": "d1",
    "GANETI_INSTANCE_DISK1_SIZE": "512",
    "GANETI_INSTANCE_DISK1_MODE": "ro",
    "GANETI_INSTANCE_DISK_COUNT": "2",
    "GANETI_INSTANCE_TAGS": "prod web",
    # Ganeti's defaults filled in under the instance's own (FillBE/FillHV)
    **{f"GANETI_INSTANCE_BE_{k}": str(v) for k, v in ganeti_params.be_defaults().items()},
    "GANETI_INSTANCE_BE_maxmem": "1024",
    "GANETI_INSTANCE_BE_vcpus": "2",
    **{f"GANETI_INSTANCE_HV_{k}": str(v) for k, v in ganeti_params.hv_defaults("kvm").items()},
    "GANETI_INSTANCE_HV_kernel_path": "/boot/vmlinuz",
    "GANETI_INSTANCE_HV_boot_order": "disk",
}


def runner_for(node, **kw) -> OperationHooks:
    return OperationHooks(node, node_name="node1.example.com", cluster="cluster.example.com",
                          master="master.example.com", **kw)


def hooks_dir_of(node, phase: str, hpath: str) -> Path:
    return phase_dir(Path(node.hooks_dir), phase, hpath)


def test_instance_add_create_env_seen_by_a_hook_is_exactly_ganetis(node_config, monkeypatch):
    """The env a real instance-add (create) pre hook sees is the golden dict, nothing more."""
    monkeypatch.setenv("GANETI_VOL_SENTINEL", "leaked")
    write_script(hooks_dir_of(node_config, "pre", "instance-add") / "00env", ENV_DUMP)
    runner = runner_for(node_config)
    with runner.around("instance-add", WEB1, {"ADD_MODE": "create"}, None):
        pass
    assert parse_env(runner.results[0].output) == GOLDEN_ADD_CREATE


def test_export_env_describes_disk_objects_and_the_admin_state(node_config):
    """Other hook paths get disk objects (DEV_TYPE, DRIVER, ID) and STATUS up/down."""
    extra = {"EXPORT_MODE": "local", "EXPORT_NODE": "node3", "EXPORT_DO_SHUTDOWN": True,
             "SHUTDOWN_TIMEOUT": 120, "REMOVE_INSTANCE": False}
    runner = runner_for(node_config)
    env = runner.env("instance-export", "pre", runner.lu_env("instance-export", WEB1, extra))
    assert {
        "GANETI_INSTANCE_STATUS": "up",
        "GANETI_INSTANCE_DISK0_DEV_TYPE": "file",
        "GANETI_INSTANCE_DISK0_DRIVER": "loop",
        "GANETI_INSTANCE_DISK0_ID": "/srv/disks/web1-0.img",
        "GANETI_INSTANCE_DISK1_DEV_TYPE": "blockdev",
        "GANETI_INSTANCE_DISK1_DRIVER": "manual",
        "GANETI_INSTANCE_DISK1_ID": "/dev/vg/web1-1",
        "GANETI_OP_CODE": "OP_BACKUP_EXPORT",
        "GANETI_EXPORT_MODE": "local",
        "GANETI_EXPORT_NODE": "node3",
        "GANETI_EXPORT_DO_SHUTDOWN": "True",
        "GANETI_SHUTDOWN_TIMEOUT": "120",
        "GANETI_REMOVE_INSTANCE": "False",
    }.items() <= env.items()
    stopped = runner.lu_env("instance-export", WEB1.replace(running=False, disks=()), extra)
    assert (stopped["INSTANCE_STATUS"], stopped["INSTANCE_DISK_TEMPLATE"]) == ("down", "diskless")


def test_legacy_memory_beparam_fills_minmem_and_maxmem(node_config):
    """beparams 'memory' (old Ganeti) stands for both maxmem and minmem."""
    env = runner_for(node_config).lu_env("instance-add", WEB1.replace(beparams={"memory": "256"}),
                                         {})
    values = tuple(env[f"INSTANCE_{k}"] for k in ("MINMEM", "MAXMEM", "MEMORY", "VCPUS"))
    assert values == ("256", "256", "256", "1")


def test_ssconf_files_name_the_cluster_and_master(node_config, tmp_path):
    """On a Ganeti node, GANETI_CLUSTER/GANETI_MASTER come from ssconf_cluster_name/master_node."""
    (tmp_path / "ssconf_cluster_name").write_text("cl.example.com\n")
    (tmp_path / "ssconf_master_node").write_text("mn.example.com\n")
    runner = OperationHooks(node_config, ssconf_dir=str(tmp_path))
    env = runner.env("instance-reinstall", "pre", {})
    assert (env["GANETI_CLUSTER"], env["GANETI_MASTER"]) == ("cl.example.com", "mn.example.com")


def test_extra_variable_redefining_an_instance_one_is_a_programmer_error(node_config):
    """An operation may not silently replace a standard instance variable."""
    with pytest.raises(E.ProgrammerError, match="INSTANCE_NAME"):
        runner_for(node_config).lu_env("instance-add", WEB1, {"INSTANCE_NAME": "x"})


# --- around operations: veto, post only after success, warnings ------------------------------


@pytest.fixture
def create_os(os_factory, tmp_path):
    """An OS whose create script leaves a marker; returns the marker path."""
    marker = tmp_path / "create-ran"
    os_factory("testos", scripts={"create": f"touch {marker}", "rename": f"touch {marker}"})
    return marker


def instance_with_disk(tmp_path) -> Instance:
    return Instance(name="web1", os="testos+default", uuid="u-web1", ctime=0, mtime=0,
                    disks=(Disk(path=str(tmp_path / "web1-0.img"), size_mib=1, uuid="d0"),))


def context(node, **kw) -> operations.OpContext:
    return operations.OpContext(node=node, hooks=runner_for(node, **kw))


def test_failing_pre_hook_vetoes_create_before_anything_is_touched(node_config, create_os,
                                                                   tmp_path):
    """A failing pre hook raises HookError naming it, with its output; no script ran, no disk."""
    post_marker = tmp_path / "post-ran"
    write_script(hooks_dir_of(node_config, "pre", "instance-add") / "10police",
                 "echo 'web1 is not allowed here'; exit 3")
    write_script(hooks_dir_of(node_config, "post", "instance-add") / "10after",
                 f"touch {post_marker}")
    inst = instance_with_disk(tmp_path)
    with pytest.raises(E.HookError) as err:
        operations.create(context(node_config), inst)
    msg = str(err.value)
    assert msg.startswith("instance-add of instance 'web1' vetoed by pre hook "
                          "'instance-add-pre.d/10police' (exited with exit code 3)")
    assert "    web1 is not allowed here" in msg
    assert err.value.exit_code == 10
    assert not create_os.exists()
    assert not os.path.exists(inst.disks[0].path)
    assert not post_marker.exists()


def test_every_failing_pre_hook_runs_and_is_named(node_config, create_os, tmp_path):
    """All pre hooks run (as in Ganeti's RunParts); the veto lists each failure."""
    d = hooks_dir_of(node_config, "pre", "instance-add")
    write_script(d / "10a", "echo first; exit 1")
    write_script(d / "20b", "echo second; exit 2")
    with pytest.raises(E.HookError) as err:
        operations.create(context(node_config), instance_with_disk(tmp_path))
    msg = str(err.value)
    assert "pre hooks 'instance-add-pre.d/10a' (exited with exit code 1), " \
           "'instance-add-pre.d/20b' (exited with exit code 2)" in msg
    assert "output of instance-add-pre.d/10a:\n    first" in msg
    assert "output of instance-add-pre.d/20b:\n    second" in msg


def test_pre_hook_timeout_is_a_veto(node_config, create_os, tmp_path):
    """A pre hook that outlives timeouts.hook is killed and vetoes the operation."""
    node = node_config.replace(timeouts={**node_config.timeouts, "hook": 0.5})
    write_script(hooks_dir_of(node, "pre", "instance-add") / "10slow", "sleep 60")
    with pytest.raises(E.HookError, match=r"timed out after 0\.5s and was killed"):
        operations.create(context(node), instance_with_disk(tmp_path))
    assert not create_os.exists()


def test_post_hooks_do_not_run_when_the_operation_fails(node_config, os_factory, tmp_path):
    """A failing create script: pre hooks ran, post hooks did not, the script error propagates."""
    os_factory("testos", scripts={"create": "echo broken >&2; exit 1"})
    pre, post = tmp_path / "pre-ran", tmp_path / "post-ran"
    write_script(hooks_dir_of(node_config, "pre", "instance-add") / "10pre", f"touch {pre}")
    write_script(hooks_dir_of(node_config, "post", "instance-add") / "10post", f"touch {post}")
    with pytest.raises(E.ScriptFailed):
        operations.create(context(node_config), instance_with_disk(tmp_path))
    assert (pre.exists(), post.exists()) == (True, False)


def test_post_hooks_run_after_success_with_the_merged_env(node_config, create_os, tmp_path):
    """After a successful create the post hooks see GANETI_ADD_MODE and GANETI_POST_ADD_MODE."""
    write_script(hooks_dir_of(node_config, "post", "instance-add") / "10env", ENV_DUMP)
    ctx = context(node_config)
    result = operations.create(ctx, instance_with_disk(tmp_path))
    assert result.to_json()["status"] == "ok" and create_os.exists()
    env = parse_env(ctx.hooks.results[-1].output)
    keys = ("HOOKS_PHASE", "ADD_MODE", "POST_ADD_MODE", "POST_INSTANCE_NAME")
    assert tuple(env[f"GANETI_{k}"] for k in keys) == ("post", "create", "create", "web1")


def test_post_hook_failure_is_recorded_and_never_undoes_the_operation(node_config, create_os,
                                                                      tmp_path):
    """A failing post hook leaves the result intact; raise_post_failures gives exit 11."""
    write_script(hooks_dir_of(node_config, "post", "instance-add") / "10grumble",
                 "echo grumble; exit 1")
    ctx = context(node_config)
    result = operations.create(ctx, instance_with_disk(tmp_path))
    assert result.to_json()["status"] == "ok" and create_os.exists()
    assert [r.hook for r in ctx.hooks.post_failures] == ["instance-add-post.d/10grumble"]
    with pytest.raises(E.PostHookWarning) as err:
        ctx.hooks.raise_post_failures()
    assert err.value.exit_code == 11
    assert "'instance-add-post.d/10grumble' (exited with exit code 1)" in str(err.value)


def test_a_failed_post_hook_is_a_warning_of_that_operations_result(node_config, create_os,
                                                                   tmp_path):
    """The result carries the PostHookWarning (the CLI's exit 11), not the runner's state."""
    from ganeti_vol.cli import common

    write_script(hooks_dir_of(node_config, "post", "instance-add") / "10grumble", "exit 1")
    ctx = context(node_config)
    result = operations.create(ctx, instance_with_disk(tmp_path))
    assert [type(w) for w in result.warnings] == [E.PostHookWarning]
    assert "'instance-add-post.d/10grumble' (exited with exit code 1)" in str(result.warnings[0])
    with pytest.raises(E.PostHookWarning) as err:
        common.finish(result)
    assert err.value.exit_code == 11
    renamed = operations.rename(ctx, instance_with_disk(tmp_path), "web2")
    assert renamed.warnings == ()  # the next operation does not inherit the failure
    assert common.finish(renamed) == 0


def test_hook_output_lands_in_the_operation_log(node_config, create_os, tmp_path):
    """The create log holds the pre hook's output before the script's."""
    write_script(hooks_dir_of(node_config, "pre", "instance-add") / "10say", "echo said-by-hook")
    result = operations.create(context(node_config), instance_with_disk(tmp_path))
    assert "said-by-hook" in Path(result.to_json()["log"]).read_text().splitlines()


def test_values_put_in_the_yielded_dict_reach_the_post_hooks(node_config):
    """The operation can add post-only variables: they appear as GANETI_POST_<key>."""
    write_script(hooks_dir_of(node_config, "post", "instance-rename") / "10env", ENV_DUMP)
    runner = runner_for(node_config)
    with runner.around("instance-rename", WEB1, {"INSTANCE_NEW_NAME": "web2"}, None) as post:
        post.env["RESULT"] = "renamed"
    env = parse_env(runner.results[-1].output)
    keys = ("POST_RESULT", "INSTANCE_NEW_NAME", "POST_INSTANCE_NEW_NAME")
    assert tuple(env[f"GANETI_{k}"] for k in keys) == ("renamed", "web2", "web2")
    assert "GANETI_RESULT" not in env


def test_rename_hooks_get_the_new_name(node_config, create_os, tmp_path):
    """operations.rename runs instance-rename hooks with INSTANCE_NEW_NAME."""
    write_script(hooks_dir_of(node_config, "pre", "instance-rename") / "10env", ENV_DUMP)
    ctx = context(node_config)
    operations.rename(ctx, instance_with_disk(tmp_path), "web2")
    env = parse_env(ctx.hooks.results[0].output)
    keys = ("OP_CODE", "INSTANCE_NAME", "INSTANCE_NEW_NAME")
    assert tuple(env[f"GANETI_{k}"] for k in keys) == ("OP_INSTANCE_RENAME", "web1", "web2")


def test_reinstall_runs_instance_reinstall_hooks(node_config, create_os, tmp_path):
    """A reinstall uses hook path instance-reinstall (OP_INSTANCE_REINSTALL), no ADD_MODE."""
    write_script(hooks_dir_of(node_config, "pre", "instance-reinstall") / "10env", ENV_DUMP)
    ctx = context(node_config)
    operations.create(ctx, instance_with_disk(tmp_path), reinstall=True)
    env = parse_env(ctx.hooks.results[0].output)
    assert env["GANETI_OP_CODE"] == "OP_INSTANCE_REINSTALL" and "GANETI_ADD_MODE" not in env
