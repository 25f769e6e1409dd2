"""``ganeti-vol hooks ...``, the CLI's hook exit codes, and the shipped hooks run for real."""

from __future__ import annotations

import configparser
import glob
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_script

from ganeti_vol.cli import main
from ganeti_vol.core import paths
from ganeti_vol.ganeti import hooks, hooks_install

SHIPPED = REPO / "hooks"
VERIFY_PARAMS = "instance-add-pre.d/ganeti-vol-verify-params"
CHECK_SPACE = "instance-export-pre.d/ganeti-vol-check-space"
VERIFY_EXPORT = "instance-export-post.d/ganeti-vol-verify-export"
GOLDEN_ARCHIVE = REPO / "tests" / "data" / "archive-v1" / "golden1.example.com"


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def write_instance(path: Path, name="web1.example.com", os_name="testos+default",
                   primary="", size="1M") -> Path:
    path.write_text(
        f"[instance]\nname = {name}\nos = {os_name}\nprimary_node = {primary}\n"
        f"[disks]\n[[0]]\npath = {name}-0.img\nsize = {size}\n"
        "[beparams]\nmaxmem = 256\n"
    )
    return path


@pytest.fixture(autouse=True)
def _node(node_dirs):
    """Every test gets a node config under tmp_path (hooks, exports, OS dirs)."""
    return node_dirs


@pytest.fixture
def inst_file(tmp_path, node_dirs):
    return write_instance(tmp_path / "web1.ini")


@pytest.fixture
def hooks_dir(node_dirs) -> Path:
    return node_dirs["hooks"]


def hook(hooks_dir: Path, rel: str, body: str, mode: int = 0o755) -> Path:
    path = hooks_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_script(path, body, mode)


# --- hooks list ----------------------------------------------------------------------------


def test_hooks_list_shows_what_runs_and_why_the_rest_is_skipped(capsys, hooks_dir):
    """Text and JSON: run/skip per entry with the reason, missing directories named."""
    hook(hooks_dir, "instance-add-pre.d/10ok", "exit 0")
    hook(hooks_dir, "instance-add-pre.d/20check.sh", "exit 0")
    hook(hooks_dir, "instance-add-pre.d/30off", "exit 0", mode=0o644)
    rc, out, _ = run(capsys, "hooks", "list", "instance-add")
    assert rc == 0
    assert [
        f"hooks directory: {hooks_dir}",
        "instance-add-pre.d:",
        "  run   10ok",
        "  skip  20check.sh  (name does not match ^[a-zA-Z0-9_-]+$ (Ganeti runs no names "
        "with dots, such as '.sh'))",
        "  skip  30off  (not executable)",
        "instance-add-post.d: no directory",
    ] == out.splitlines()
    rc, out, _ = run(capsys, "hooks", "list", "instance-add", "--json")
    data = json.loads(out)
    pre, post = data["paths"]
    seen = [(os.path.basename(e["hook"]), e["action"], e["reason"]) for e in pre["entries"]]
    assert seen[0] == ("10ok", "run", "")
    assert seen[2] == ("30off", "skip", "not executable")
    assert (pre["exists"], post["exists"], post["entries"]) == (True, False, [])


def test_hooks_list_without_a_path_covers_ours_and_other_directories(capsys, hooks_dir):
    """Every hook path ganeti-vol runs, plus other *.d dirs found, marked as not run by us."""
    (hooks_dir / "instance-start-post.d").mkdir()
    rc, out, _ = run(capsys, "hooks", "list")
    lines = out.splitlines()
    assert "instance-start-post.d: empty (not run by ganeti-vol)" in lines
    assert "instance-start-pre.d: no directory (not run by ganeti-vol)" in lines
    for hpath in hooks.OP_CODES:
        assert f"{hpath}-pre.d: no directory" in lines


# --- hooks run / env -----------------------------------------------------------------------


def test_hooks_run_pre_success_prints_results_and_exits_0(capsys, hooks_dir, inst_file):
    """Succeeded and skipped entries are listed with the hook's output."""
    hook(hooks_dir, "instance-add-pre.d/10hello", 'echo "hello $GANETI_INSTANCE_NAME"')
    hook(hooks_dir, "instance-add-pre.d/20x.sh", "exit 1")
    rc, out, _ = run(capsys, "hooks", "run", "instance-add", "pre", "--instance", str(inst_file))
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "instance-add-pre.d for instance 'web1.example.com': 2 entries"
    assert lines[1].startswith("  succeeded  instance-add-pre.d/10hello (")
    assert lines[2] == "      hello web1.example.com"
    assert lines[3].startswith("  skipped    instance-add-pre.d/20x.sh: name does not match")


def test_hooks_run_pre_failure_exits_10_naming_the_hook(capsys, hooks_dir, inst_file):
    """A failing pre hook is a veto: exit 10, the error names the hook and quotes it."""
    hook(hooks_dir, "instance-add-pre.d/10deny", "echo denied; exit 4")
    rc, out, err = run(capsys, "hooks", "run", "instance-add", "pre", "--instance",
                       str(inst_file), "--json")
    assert rc == 10
    [result] = json.loads(out)["results"]
    assert (result["status"], result["output"], result["returncode"]) == ("failed", "denied", 4)
    assert "vetoed by pre hook 'instance-add-pre.d/10deny' (exited with exit code 4)" in err
    assert "    denied" in err


def test_hooks_run_post_failure_exits_11(capsys, hooks_dir, inst_file):
    """A failing post hook is a warning: exit 11."""
    hook(hooks_dir, "instance-add-post.d/10grumble", "exit 1")
    rc, _, err = run(capsys, "hooks", "run", "instance-add", "post", "--instance", str(inst_file))
    assert rc == 11
    assert "post hook(s) failed: 'instance-add-post.d/10grumble'" in err


def test_hooks_run_passes_e_variables_and_keeps_the_log(capsys, hooks_dir, inst_file, tmp_path):
    """-e KEY=VALUE becomes GANETI_KEY (and GANETI_POST_KEY in post); --log gets the output."""
    hook(hooks_dir, "instance-add-post.d/10show",
         'echo "$GANETI_ADD_MODE $GANETI_POST_SRC_IMAGES"')
    log = tmp_path / "hooks.log"
    rc, out, _ = run(capsys, "hooks", "run", "instance-add", "post", "--instance",
                     str(inst_file), "-e", "ADD_MODE=import", "-e", "SRC_IMAGES=['/a', '/b']",
                     "--log", str(log), "--json")
    assert rc == 0
    assert json.loads(out)["results"][0]["output"] == "import ['/a', '/b']"
    assert "import ['/a', '/b']" in log.read_text().splitlines()


@pytest.mark.parametrize("arg, message", [
    ("NOEQUALS", "invalid -e 'NOEQUALS': expected KEY=VALUE"),
    ("GANETI_X=1", "invalid hook variable name 'GANETI_X'"),
    ("A-B=1", "invalid hook variable name 'A-B'"),
    ("OP_CODE=x", "hook variable 'OP_CODE' is set by ganeti-vol itself"),
    ("INSTANCE_NAME=x", "hook variable 'INSTANCE_NAME' is set by ganeti-vol itself"),
])
def test_hooks_run_rejects_bad_e_variables_with_exit_3(capsys, inst_file, arg, message):
    """Bad -e input is a one-line usage error, not a traceback."""
    rc, _, err = run(capsys, "hooks", "run", "instance-add", "pre", "--instance", str(inst_file),
                     "-e", arg)
    assert rc == 3
    assert f"ganeti-vol: error: {message}" in err and "Traceback" not in err


def test_rename_hooks_need_the_new_name(capsys, inst_file):
    """instance-rename has no sensible default for INSTANCE_NEW_NAME."""
    rc, _, err = run(capsys, "hooks", "run", "instance-rename", "pre", "--instance",
                     str(inst_file))
    assert rc == 3 and "need -e INSTANCE_NEW_NAME=NAME" in err


def test_hooks_env_prints_the_environment_the_hooks_get(capsys, hooks_dir, inst_file):
    """hooks env shows exactly what a real hook sees for the same arguments."""
    hook(hooks_dir, "instance-export-pre.d/10env", "env | grep -v -E '^(PWD|SHLVL|_)='")
    args = ("instance-export", "pre", "--instance", str(inst_file), "-e", "EXPORT_NODE=n2")
    rc, out, _ = run(capsys, "hooks", "env", *args, "--json")
    env = json.loads(out)
    keys = ("EXPORT_NODE", "EXPORT_MODE", "OP_CODE", "INSTANCE_MAXMEM")
    assert tuple(env[f"GANETI_{k}"] for k in keys) == ("n2", "local", "OP_BACKUP_EXPORT", "256")
    rc, out, _ = run(capsys, "hooks", "run", *args, "--json")
    seen = dict(line.split("=", 1) for line in json.loads(out)["results"][0]["output"].split("\n"))
    assert env == seen


def test_missing_instance_file_is_a_one_line_error(capsys, tmp_path):
    """A bad --instance names the file."""
    rc, _, err = run(capsys, "hooks", "run", "instance-add", "pre", "--instance",
                     str(tmp_path / "nope.ini"))
    assert rc == 4 and "nope.ini" in err and "Traceback" not in err


# --- exit codes of operations --------------------------------------------------------------


@pytest.fixture
def testos(os_factory, tmp_path):
    marker = tmp_path / "created"
    os_factory("testos", scripts={"create": f"touch {marker}"})
    return marker


def test_create_with_a_failing_post_hook_prints_the_result_then_exits_11(
        capsys, hooks_dir, testos, tmp_path):
    """The operation's result reaches stdout; the post hook failure gives exit 11 on stderr."""
    hook(hooks_dir, "instance-add-post.d/10grumble", "echo not happy; exit 1")
    rc, out, err = run(capsys, "instance", "create", "--name", "web1", "--os", "testos+default",
                       "--disk", f"{tmp_path / 'web1.img'},size=1M", "--json")
    assert rc == 11
    assert json.loads(out)["status"] == "ok" and testos.exists()
    assert "post hook 'instance-add-post.d/10grumble' failed (exited with exit code 1), " \
           "output: not happy" in err
    assert "operation succeeded, but post hook(s) failed" in err


def test_create_vetoed_by_a_pre_hook_exits_10_and_creates_nothing(
        capsys, hooks_dir, testos, tmp_path):
    """A veto from the CLI: exit 10, no script ran, no disk file."""
    hook(hooks_dir, "instance-add-pre.d/10deny", "echo no; exit 1")
    disk = tmp_path / "web1.img"
    rc, out, err = run(capsys, "instance", "create", "--name", "web1", "--os", "testos+default",
                       "--disk", f"{disk},size=1M")
    assert (rc, out) == (10, "")
    assert not testos.exists() and not disk.exists()


def test_no_hooks_flag_skips_the_hooks(capsys, hooks_dir, testos, tmp_path):
    """--no-hooks runs the operation without any hook."""
    hook(hooks_dir, "instance-add-pre.d/10deny", "exit 1")
    rc, _, _ = run(capsys, "instance", "create", "--no-hooks", "--name", "web1", "--os",
                   "testos+default", "--disk", f"{tmp_path / 'web1.img'},size=1M")
    assert rc == 0 and testos.exists()


# --- hooks install -------------------------------------------------------------------------


def install(capsys, target: Path, *extra):
    rc, out, err = run(capsys, "hooks", "install", "--target", str(target), "--json", *extra)
    return rc, {a["file"]: (a["action"], a["detail"]) for a in json.loads(out)["actions"]}, err


def snapshot(target: Path) -> dict[str, tuple[bytes, int, int]]:
    out = {}
    for root, _, files in os.walk(target):
        for name in files:
            p = Path(root) / name
            st = p.stat()
            out[str(p.relative_to(target))] = (p.read_bytes(), st.st_mode, st.st_mtime_ns)
    return out


def test_install_copies_the_shipped_hooks_and_is_idempotent(capsys, tmp_path):
    """First run installs every shipped file executable; the second changes nothing at all."""
    target = tmp_path / "ganeti-hooks"
    rc, actions, _ = install(capsys, target)
    assert rc == 0
    assert {rel: ("installed", "") for rel in hooks_install.shipped_files(str(SHIPPED))} \
        | {hooks_install.SETTINGS: ("installed", "")} == actions
    for rel in (VERIFY_PARAMS, CHECK_SPACE, VERIFY_EXPORT):
        assert (SHIPPED / rel).read_bytes() == (target / rel).read_bytes()
        assert os.access(target / rel, os.X_OK)
    before = snapshot(target)
    rc, actions, _ = install(capsys, target)
    assert rc == 0
    assert {"unchanged", "kept"} == {a for a, _ in actions.values()}
    assert before == snapshot(target)


def test_install_never_overwrites_a_foreign_file(capsys, tmp_path):
    """A same-named file ganeti-vol did not install is left alone; --strict makes that exit 1."""
    target = tmp_path / "ganeti-hooks"
    foreign = hook(target, VERIFY_PARAMS, "echo the operator's own hook")
    content = foreign.read_bytes()
    rc, actions, err = install(capsys, target)
    assert rc == 0
    assert actions[VERIFY_PARAMS][0] == "skipped" and "foreign" in actions[VERIFY_PARAMS][1]
    assert actions[CHECK_SPACE][0] == "installed"
    assert content == foreign.read_bytes()
    assert f"left foreign file(s) alone: '{foreign}'" in err
    rc, _, _ = install(capsys, target, "--strict")
    assert rc == 1 and content == foreign.read_bytes()


def test_install_leaves_an_operator_modified_hook_alone(capsys, tmp_path):
    """Our hook, edited since it was installed, counts as foreign."""
    target = tmp_path / "ganeti-hooks"
    install(capsys, target)
    edited = target / VERIFY_EXPORT
    edited.write_text(edited.read_text() + "# local change\n")
    _, actions, _ = install(capsys, target)
    assert actions[VERIFY_EXPORT][0] == "skipped"
    assert edited.read_text().endswith("# local change\n")


def test_install_updates_its_own_older_hook_and_keeps_it_disabled(capsys, tmp_path):
    """A file we installed (hash in the manifest) and nobody changed is upgraded in place,
    keeping the mode the operator gave it (non-executable = disabled)."""
    target = tmp_path / "ganeti-hooks"
    install(capsys, target)
    old = target / VERIFY_EXPORT
    old.write_text("#!/bin/sh\n# an older ganeti-vol hook\n")
    old.chmod(0o644)
    manifest = json.loads((target / hooks_install.MANIFEST).read_text())
    manifest["files"][VERIFY_EXPORT] = hashlib.sha256(old.read_bytes()).hexdigest()
    (target / hooks_install.MANIFEST).write_text(json.dumps(manifest))
    _, actions, _ = install(capsys, target)
    assert actions[VERIFY_EXPORT][0] == "updated"
    assert (SHIPPED / VERIFY_EXPORT).read_bytes() == old.read_bytes()
    assert old.stat().st_mode & 0o777 == 0o644


def test_install_reports_a_disabled_hook_as_disabled(capsys, tmp_path):
    """chmod -x is how Ganeti operators disable a hook: reinstalling does not re-enable it."""
    target = tmp_path / "ganeti-hooks"
    install(capsys, target)
    (target / CHECK_SPACE).chmod(0o644)
    _, actions, _ = install(capsys, target)
    assert actions[CHECK_SPACE] == ("unchanged", "up to date (disabled: not executable)")
    assert not os.access(target / CHECK_SPACE, os.X_OK)


def test_install_writes_settings_once_and_keeps_the_operators(capsys, tmp_path, node_dirs):
    """The settings point at this ganeti-vol, node config and export dir; later runs keep edits."""
    target = tmp_path / "ganeti-hooks"
    install(capsys, target)
    settings = target / hooks_install.SETTINGS
    values = dict(line.split("=", 1) for line in settings.read_text().splitlines()
                  if line and not line.startswith("#"))
    assert (str(node_dirs["conf"]), str(node_dirs["export"])) == (
        values["GANETI_VOL_CONFIG"], values["EXPORT_DIR"])
    assert "ganeti" in values["GANETI_VOL"] and "VERIFY_EXPORT" in values
    settings.write_text(settings.read_text() + "CHECK_SPACE=no\n")
    _, actions, _ = install(capsys, target)
    assert actions[hooks_install.SETTINGS][0] == "kept"
    assert settings.read_text().endswith("CHECK_SPACE=no\n")


def test_install_dry_run_writes_nothing(capsys, tmp_path):
    """--dry-run reports what it would do and leaves the target untouched."""
    target = tmp_path / "ganeti-hooks"
    rc, out, _ = run(capsys, "hooks", "install", "--target", str(target), "--dry-run")
    assert rc == 0 and f"  would be installed {VERIFY_PARAMS}" in out.splitlines()
    assert not target.exists()


def test_install_into_the_shipped_directory_is_refused(capsys):
    """The source cannot be its own target."""
    shipped = paths.shipped_dir("hooks")  # the code under test's (a package's, installed)
    rc, _, err = run(capsys, "hooks", "install", "--target", shipped)
    assert rc == 3 and "it is the shipped directory" in err


def test_every_shipped_file_is_packaged_by_setup_cfg():
    """setup.cfg's data_files install every shipped hook (a new *.d dir needs a line there)."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    packaged = set()
    for dest, sources in cfg["options.data_files"].items():
        if not dest.startswith("share/ganeti-vol/hooks"):
            continue
        sub = dest[len("share/ganeti-vol/hooks"):].lstrip("/")
        for pattern in sources.replace("\n", ",").split(","):
            for f in glob.glob(str(REPO / pattern.strip())):
                assert os.path.isfile(f), f"data_files would copy the directory {f}"
                packaged.add(os.path.join(sub, os.path.basename(f)))
    assert set(hooks_install.shipped_files(str(SHIPPED))) | {hooks_install.SETTINGS} == packaged


def test_shipped_hooks_are_executable_and_named_as_ganeti_requires():
    """Each shipped hook would run under Ganeti's RunParts (no skip)."""
    rels = [r for r in hooks_install.shipped_files(str(SHIPPED)) if "/" in r]
    assert {VERIFY_PARAMS, CHECK_SPACE, VERIFY_EXPORT} == set(rels)
    for rel in rels:
        assert hooks.skip_reason(str(SHIPPED / rel), os.path.basename(rel)) == ""


# --- the shipped hooks, run for real ---------------------------------------------------------


@pytest.fixture
def installed(capsys, hooks_dir):
    """The shipped hooks installed into the node's hooks dir (settings: this node config)."""
    rc, _, _ = run(capsys, "hooks", "install")
    assert rc == 0
    return hooks_dir


def set_setting(hooks_dir: Path, key: str, value: str) -> None:
    settings = hooks_dir / hooks_install.SETTINGS
    settings.write_text(settings.read_text() + f"{key}={value}\n")


def run_hook(capsys, hpath, phase, inst_file, *extra):
    rc, out, err = run(capsys, "hooks", "run", hpath, phase, "--instance", str(inst_file),
                       "--json", *extra)
    [result] = json.loads(out)["results"]
    return rc, result, err


def test_verify_params_hook_accepts_a_valid_os_and_variant(capsys, installed, os_factory,
                                                           inst_file):
    """create mode: ganeti-vol instance verify-params passes, so the hook passes."""
    os_factory("testos")
    rc, result, _ = run_hook(capsys, "instance-add", "pre", inst_file)
    assert (rc, result["status"]) == (0, "succeeded")
    assert "OS 'testos+default' of web1.example.com is valid on this node (create)" \
        in result["output"]


@pytest.mark.parametrize("os_name, verify, expected", [
    ("testos+nope", "exit 0", "does not support variant 'nope'"),
    ("missing+default", "exit 0", "missing"),
    ("testos+default", "echo 'param1 is required' >&2; exit 1", "param1 is required"),
])
def test_verify_params_hook_vetoes_an_os_that_rejects_the_instance(
        capsys, installed, os_factory, tmp_path, os_name, verify, expected):
    """Unknown variant, OS missing on this node, verify rejecting its defaults: exit 10."""
    os_factory("testos", scripts={"verify": verify})
    inst = write_instance(tmp_path / "bad.ini", os_name=os_name)
    rc, result, err = run_hook(capsys, "instance-add", "pre", inst)
    assert (rc, result["status"]) == (10, "failed")
    assert expected in result["output"] and "vetoing its creation" in result["output"]
    assert f"vetoed by pre hook '{VERIFY_PARAMS}'" in err


def test_verify_params_hook_ignores_the_variant_on_import(capsys, installed, os_factory,
                                                          tmp_path):
    """ADD_MODE=import only checks the OS itself, as Ganeti skips the variant check then."""
    os_factory("testos")
    inst = write_instance(tmp_path / "imp.ini", os_name="testos+nope")
    rc, result, _ = run_hook(capsys, "instance-add", "pre", inst, "-e", "ADD_MODE=import")
    assert (rc, result["status"]) == (0, "succeeded")
    assert "(import)" in result["output"]


def test_verify_params_hook_does_nothing_on_other_nodes(capsys, installed, os_factory, tmp_path):
    """On a node that is neither primary nor secondary (e.g. the master) it checks nothing."""
    inst = write_instance(tmp_path / "far.ini", os_name="missing+default",
                          primary="elsewhere.example.com")
    rc, result, _ = run_hook(capsys, "instance-add", "pre", inst)
    assert (rc, result["status"]) == (0, "succeeded")
    assert "is not one of the nodes of web1.example.com" in result["output"]


def test_check_space_hook_vetoes_an_export_that_would_not_fit(capsys, installed, inst_file):
    """Enough space passes; a reserve larger than the filesystem vetoes with the numbers."""
    rc, result, _ = run_hook(capsys, "instance-export", "pre", inst_file)
    assert (rc, result["status"]) == (0, "succeeded")
    assert "(1025 MiB needed)" in result["output"]  # 1 MiB disk + 1024 MiB reserve
    set_setting(installed, "CHECK_SPACE_RESERVE_MIB", "999999999999")
    rc, result, _ = run_hook(capsys, "instance-export", "pre", inst_file)
    assert (rc, result["status"]) == (10, "failed")
    assert "not enough space for the export of web1.example.com" in result["output"]


def test_export_hooks_act_only_on_the_target_node_of_local_exports(capsys, installed, inst_file):
    """Remote exports and other nodes: nothing to do, success."""
    for extra, says in ((("-e", "EXPORT_MODE=remote"), "is a remote export"),
                        (("-e", "EXPORT_NODE=elsewhere.example.com"), "not to this one")):
        for hpath, phase in (("instance-export", "pre"), ("instance-export", "post")):
            rc, result, _ = run_hook(capsys, hpath, phase, inst_file, *extra)
            assert (rc, result["status"]) == (0, "succeeded") and says in result["output"]


def test_export_hooks_take_localhost_as_this_node(capsys, installed, inst_file):
    """EXPORT_NODE=localhost (what getfqdn() gives on a badly named host) is this node."""
    rc, result, _ = run_hook(capsys, "instance-export", "pre", inst_file,
                             "-e", "EXPORT_NODE=localhost")
    assert (rc, result["status"]) == (0, "succeeded")
    assert "MiB free in" in result["output"]


def test_verify_export_hook_warns_when_the_export_is_missing(capsys, installed, inst_file,
                                                             node_dirs):
    """No <export_dir>/<name> on the target node: the post hook fails (exit 11)."""
    rc, result, _ = run_hook(capsys, "instance-export", "post", inst_file)
    assert (rc, result["status"]) == (11, "failed")
    assert f"'{node_dirs['export']}/web1.example.com' is not a directory" in result["output"]


def test_verify_export_hook_follows_the_export_path_ganeti_vol_passes(
        capsys, installed, inst_file, tmp_path):
    """GANETI_POST_EXPORT_PATH (ganeti-vol's) wins over EXPORT_DIR; empty means streamed."""
    elsewhere = ganeti_made_export(tmp_path / "elsewhere", "web1.example.com", {"d0": b"x"})
    rc, result, _ = run_hook(capsys, "instance-export", "post", inst_file,
                             "-e", f"EXPORT_PATH={elsewhere}")
    assert (rc, result["status"]) == (0, "succeeded"), result["output"]
    assert f"in '{elsewhere}' verified: ok" in result["output"]
    rc, result, _ = run_hook(capsys, "instance-export", "post", inst_file, "-e", "EXPORT_PATH=")
    assert (rc, result["status"]) == (0, "succeeded")
    assert "was streamed" in result["output"]


def ganeti_made_export(export_dir: Path, name: str, dumps: dict[str, bytes]) -> Path:
    """What Ganeti's FinalizeExport leaves: config.ini and raw dumps named by disk uuid."""
    d = export_dir / name
    d.mkdir(parents=True)
    lines = ["[export]", "version = 0", "os = testos+default", "compression = none", "",
             "[instance]", f"name = {name}", f"disk_count = {len(dumps)}"]
    for i, (dump, data) in enumerate(dumps.items()):
        lines += [f"disk{i}_ivname = disk/{i}", f"disk{i}_dump = {dump}", f"disk{i}_size = 1",
                  f"disk{i}_name = None"]
        if data is not None:
            (d / dump).write_bytes(data)
    (d / "config.ini").write_text("\n".join(lines) + "\n\n[hypervisor]\n\n[backend]\n\n[os]\n")
    return d


def test_verify_export_hook_handles_an_export_made_by_ganeti(capsys, installed, inst_file,
                                                             node_dirs):
    """config.ini + raw dumps: verified by ganeti-vol, or at least found complete."""
    ganeti_made_export(node_dirs["export"], "web1.example.com",
                       {"d0-uuid": b"\0" * (1 << 20), "d1-uuid": b"x" * (1 << 20)})
    rc, result, _ = run_hook(capsys, "instance-export", "post", inst_file)
    assert (rc, result["status"]) == (0, "succeeded"), result["output"]
    assert "verified: ok" in result["output"]


def test_verify_export_hook_checks_completeness_when_ganeti_vol_cannot_run(
        capsys, installed, inst_file, node_dirs):
    """GANETI_VOL unusable (exit 127): a Ganeti-made export is still checked for its dumps."""
    ganeti_made_export(node_dirs["export"], "web1.example.com", {"d0-uuid": b"\0" * 4096})
    set_setting(installed, "GANETI_VOL", "/nonexistent/ganeti-vol")
    rc, result, _ = run_hook(capsys, "instance-export", "post", inst_file)
    assert (rc, result["status"]) == (0, "succeeded"), result["output"]
    assert "config.ini and its 1 dump file(s) are present, the data was not verified" \
        in result["output"]


def test_verify_export_hook_fails_on_a_ganeti_export_with_a_missing_dump(
        capsys, installed, inst_file, node_dirs):
    """A dump named in config.ini but absent: the export is incomplete (exit 11)."""
    ganeti_made_export(node_dirs["export"], "web1.example.com",
                       {"d0-uuid": b"\0" * (1 << 20), "d1-uuid": None})
    rc, result, _ = run_hook(capsys, "instance-export", "post", inst_file)
    assert (rc, result["status"]) == (11, "failed")
    assert "missing dump file(s): d1-uuid" in result["output"]


def test_verify_export_hook_verifies_a_real_archive_and_catches_corruption(
        capsys, installed, tmp_path, node_dirs):
    """The golden archive verifies; one flipped byte in a dump makes the hook fail."""
    name = "golden1.example.com"
    shutil.copytree(GOLDEN_ARCHIVE, node_dirs["export"] / name)
    inst = write_instance(tmp_path / "golden.ini", name=name)
    rc, result, _ = run_hook(capsys, "instance-export", "post", inst)
    assert (rc, result["status"]) == (0, "succeeded"), result["output"]
    assert f"export of {name} in '{node_dirs['export'] / name}' verified: ok" in result["output"]
    dump = next((node_dirs["export"] / name).glob("*.lz4"))
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dump.write_bytes(bytes(data))
    rc, result, _ = run_hook(capsys, "instance-export", "post", inst)
    assert (rc, result["status"]) == (11, "failed")
    assert "FAILED verification" in result["output"]


def test_shipped_hooks_degrade_without_their_helper(tmp_path):
    """Copied alone (no ganeti-vol-hooks.sh): the pre hooks let Ganeti proceed, saying why."""
    d = tmp_path / "instance-add-pre.d"
    d.mkdir()
    shutil.copy(SHIPPED / VERIFY_PARAMS, d)
    [r] = hooks.run_hooks(str(tmp_path), "instance-add", "pre", {"PATH": "/bin:/usr/bin"})
    assert r.status.name.lower() == "succeeded"
    assert "ganeti-vol-hooks.sh is missing" in r.output


# --- smoke ---------------------------------------------------------------------------------


def test_hooks_list_through_python_m_ganeti_vol(node_dirs):
    """The real entry point lists hooks as JSON on stdout, nothing else."""
    proc = subprocess.run([sys.executable, "-m", "ganeti_vol", "hooks", "list", "--json"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert str(node_dirs["hooks"]) == json.loads(proc.stdout)["hooks_dir"]


def test_default_export_node_is_this_host(capsys, inst_file):
    """hooks run instance-export defaults EXPORT_NODE to this node, like a local export here."""
    rc, out, _ = run(capsys, "hooks", "env", "instance-export", "post", "--instance",
                     str(inst_file), "--json")
    env = json.loads(out)
    assert socket.gethostname() == env["GANETI_EXPORT_NODE"] == env["GANETI_POST_EXPORT_NODE"]
