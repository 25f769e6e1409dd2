"""The scaffold (``ganeti-vol os new``), its jinja2 templates and ``ganeti-vol os install``:
real renders, real scripts run the way Ganeti runs them."""

from __future__ import annotations

import configparser
import glob
import gzip
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import sparse_file
from disk_helpers import make_format, with_sidecar

from ganeti_vol.authoring import scaffold, templates
from ganeti_vol.cli import main
from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = ("raw", "image", "image-sh", "python")
SCRIPTS = ("create", "export", "import", "rename", "verify")
PARAMS = ["--param", "flag:bool:a switch", "--param", "count:int:a number",
          "--param", "names:list:a list", "--param", "note:free text"]


def new_os(tmp_path: Path, template: str, name: str = "myos", *extra: str) -> Path:
    """``ganeti-vol os new`` into tmp_path/defs (tmp_path also holds the node dirs)."""
    parent = tmp_path / "defs"
    parent.mkdir(exist_ok=True)
    rc = main(["os", "new", name, "--template", template, "--dir", str(parent), *extra])
    assert 0 == rc
    return parent / name


def run_script(path: Path, *args: str, env: dict[str, str] | None = None,
               stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    """Run an OS script as Ganeti does: a reset environment with Ganeti's fixed PATH."""
    full = {"PATH": C.SCRIPT_PATH, "OS_NAME": path.parent.name, "OS_API_VERSION": "20",
            "DEBUG_LEVEL": "0", **(env or {})}
    return subprocess.run([str(path), *args], env=full, cwd=path.parent, stdin=stdin,
                          capture_output=True, timeout=60)


# --- the jinja2 adapter ------------------------------------------------------------------


def test_undefined_variable_is_a_template_error_naming_file_and_line():
    """StrictUndefined: a missing variable fails, naming the template file and line."""
    with pytest.raises(E.TemplateError) as info:
        templates.render_string("first line\n{{ missing }}\n", {}, name="t.j2")
    assert str(info.value).startswith("cannot render template t.j2:2: ")
    assert "'missing' is undefined" in str(info.value)


def test_undefined_variable_in_a_packaged_template_names_its_file():
    """The same for a template of the package (the launcher uses name and script)."""
    with pytest.raises(E.TemplateError, match=r"common/launcher:\d+: 'name' is undefined"):
        templates.render("common/launcher", {})


def test_syntax_error_is_a_template_error_naming_file_and_line():
    """A broken tag: TemplateError with file:line, exit code 6."""
    with pytest.raises(E.TemplateError, match=r"t\.j2:3: syntax error") as info:
        templates.render_string("a\nb\n{% if %}\n", {}, name="t.j2")
    assert 6 == info.value.exit_code


def test_template_names_are_the_four_scaffolds():
    """raw, image, image-sh and python are offered (and are what 'os new --template' accepts)."""
    from ganeti_vol.cli import authoring

    assert sorted(authoring.TEMPLATES) == templates.template_names()


# --- os new ------------------------------------------------------------------------------


@pytest.mark.parametrize("template", TEMPLATES)
def test_new_os_is_complete_valid_and_executable(tmp_path, template, capsys, node_dirs):
    """API file 20/15/10, variants, parameters, five executable scripts, README; diagnose passes."""
    top = new_os(tmp_path, template, "myos", "--variants", "small,big", *PARAMS)
    assert "20\n15\n10\n" == (top / "ganeti_api_version").read_text()
    assert "small\nbig\n" == (top / "variants.list").read_text()
    names = [line.split()[0] for line in (top / "parameters.list").read_text().splitlines()]
    builtin = [p.name for p in scaffold.BUILTIN_PARAMS[template]]
    assert builtin + ["flag", "count", "names", "note"] == names
    for script in SCRIPTS:
        assert (top / script).stat().st_mode & stat.S_IXUSR, script
    assert not (top / "README.md").stat().st_mode & stat.S_IXUSR
    assert "myos" in (top / "README.md").read_text()
    capsys.readouterr()
    assert 0 == main(["os", "diagnose", "--search-path", str(top.parent)])
    assert "myos: valid" in capsys.readouterr().out


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_script_prints_usage_on_help(tmp_path, template):
    """-h and --help: exit 0 and a usage text on stdout, with Ganeti's PATH."""
    top = new_os(tmp_path, template)
    for script in SCRIPTS:
        for flag in ("-h", "--help"):
            res = run_script(top / script, flag)
            assert 0 == res.returncode, (script, res.stderr)
            assert res.stdout.decode().startswith(f"usage: {script}"), (script, res.stdout)


@pytest.mark.parametrize("template", TEMPLATES)
def test_verify_checks_the_declared_parameters(tmp_path, template):
    """Good values pass; a bad bool, a bad int or an unknown name fail with ERROR last."""
    top = new_os(tmp_path, template, "myos", *PARAMS)
    good = {"OSP_FLAG": "Off", "OSP_COUNT": "3", "OSP_NAMES": r"a,b\,c", "OSP_NOTE": ""}
    res = run_script(top / "verify", "parameters", env=good)
    assert 0 == res.returncode, res.stderr
    for bad, word in ((dict(good, OSP_FLAG="False?"), "flag"), (dict(good, OSP_COUNT="x"), "count"),
                      (dict(good, OSP_OTHER="1"), "other")):
        res = run_script(top / "verify", "parameters", env=bad)
        assert 0 != res.returncode, bad
        last = res.stderr.decode().strip().splitlines()[-1]
        assert last.startswith("ERROR: ") and word in last, last
    res = run_script(top / "verify", "something-else")
    assert 0 != res.returncode


def test_new_os_never_overwrites_without_force(tmp_path, capsys):
    """An existing directory is refused (exit 3, untouched); --force replaces it."""
    top = new_os(tmp_path, "raw")
    (top / "mine.txt").write_text("keep")
    assert 3 == main(["os", "new", "myos", "--template", "python", "--dir", str(top.parent)])
    assert "already exists: use --force" in capsys.readouterr().err
    assert (top / "mine.txt").exists() and not (top / "osdef.py").exists()
    assert ["myos"] == os.listdir(top.parent)
    assert 0 == main(["os", "new", "myos", "--template", "python", "--dir", str(top.parent),
                      "--force"])
    assert (top / "osdef.py").exists() and not (top / "mine.txt").exists()
    assert ["myos"] == os.listdir(top.parent)


@pytest.mark.parametrize("argv,message", [
    (["os", "new", "bad/name", "--template", "raw"], "invalid OS name 'bad/name'"),
    (["os", "new", "x y", "--template", "raw"], "invalid OS name 'x y'"),
    (["os", "new", "ok", "--template", "raw", "--param", "noDescription"], "a description"),
    (["os", "new", "ok", "--template", "raw", "--param", "9x:desc"], "the name must match"),
    (["os", "new", "ok", "--template", "raw", "--param", "zero_target:again"], "declared twice"),
    (["os", "new", "ok", "--template", "raw", "--variants", "a,a"], "given twice"),
])
def test_bad_names_are_usage_errors(tmp_path, capsys, argv, message):
    """Names outside ^[a-zA-Z0-9_-]+$, bad --param or --variants: exit 3, one line, nothing made."""
    assert 3 == main([*argv, "--dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert [] == os.listdir(tmp_path)


@pytest.mark.parametrize("template", TEMPLATES)
def test_new_os_passes_the_conformance_runner(tmp_path, template, capsys, node_dirs):
    """Straight out of the scaffold, 'ganeti-vol os test' passes (sparse file disks)."""
    pytest.importorskip("ganeti_vol.authoring.conformance")
    top = new_os(tmp_path, template, "fresh")
    capsys.readouterr()
    rc = main(["os", "test", str(top), "--no-loop", "--disk-size", "32M",
               "--work-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert 0 == rc, out


# --- in a virtualenv ----------------------------------------------------------------------

SYSTEM_PYTHON = "/usr/bin/python3"
DEPENDENCIES = ("jinja2", "plumbum", "lz4", "pyudev", "configobj", "xxhash")


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A virtualenv whose base interpreter (the system's python3) lacks ganeti_vol: the
    venv gets this checkout by a .pth file, its dependencies from the system's site
    packages (Debian's python3-* packages)."""
    probe = subprocess.run([SYSTEM_PYTHON, "-c", f"import {', '.join(DEPENDENCIES)}"],
                           capture_output=True, text=True) if os.path.exists(SYSTEM_PYTHON) \
        else None
    if probe is None or probe.returncode:
        pytest.skip(f"needs {SYSTEM_PYTHON} with Debian's python3-{{{','.join(DEPENDENCIES)}}} "
                    "(README command (b) installs them)")
    top = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(top)], check=True, capture_output=True, timeout=120)
    site = subprocess.run([str(top / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "ganeti_vol_checkout.pth").write_text(f"{REPO}\n")
    return top


@pytest.mark.parametrize("template", TEMPLATES)
def test_new_os_passes_os_test_from_a_virtualenv(venv, template, tmp_path, node_dirs):
    """'os new' records the venv's python (not the base interpreter it links to) and the
    scripts use it under Ganeti's PATH; without that record, the scripts still find it
    as their parent ganeti-vol's interpreter, so 'os test' passes from the venv."""
    python = venv / "bin" / "python"

    def gv(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(python), "-m", "ganeti_vol", *argv], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)

    res = gv("os", "new", "venvos", "--template", template, "--dir", str(tmp_path))
    assert res.returncode == 0, res.stderr
    top = tmp_path / "venvos"
    assert (top / scaffold.PYTHON_FILE).read_text() == f"{python}\n"
    by_hand = run_script(top / "verify", "parameters")  # the parent is no Python here
    assert by_hand.returncode == 0, by_hand.stderr
    (top / scaffold.PYTHON_FILE).unlink()
    res = gv("os", "test", str(top), "--no-loop", "--disk-size", "16M", "--disks", "1",
             "--work-dir", str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "cannot find a Python" not in res.stdout + res.stderr


# --- image-sh: the image OS as POSIX shell scripts ---------------------------------------

MiB = 1 << 20
DISK_TAIL = b"pre-existing data at the end of the disk: must survive\n"


def image_sh(tmp_path: Path) -> Path:
    return new_os(tmp_path, "image-sh", "shos")


def raw_image(path: Path, size: int = 2 * MiB) -> Path:
    """Text at 0, random bytes at 1 MiB, a hole between."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(b"".join(b"image line %d\n" % i for i in range(5000)))
        f.seek(MiB)
        f.write(os.urandom(64 << 10))
    return path


def image_as(raw: Path, fmt: str) -> Path:
    """``raw`` converted by the real CLI (``fmt`` a tool name: gzip, xz, lz4), with a sidecar."""
    return with_sidecar(make_format(raw, {"gzip": "gz"}.get(fmt, fmt)))


def filled_disk(path: Path, size: int = 4 * MiB) -> Path:
    """A file disk with data everywhere (0xee) and a marker at its end."""
    path.write_bytes(b"\xee" * (size - len(DISK_TAIL)) + DISK_TAIL)
    return path


def create_env(disk: Path, **params: str) -> dict[str, str]:
    env = {"INSTANCE_NAME": "inst1.example.com", "OS_VARIANT": "default", "DISK_COUNT": "1",
           "DISK_0_PATH": str(disk)}
    env.update({f"OSP_{k.upper()}": v for k, v in params.items()})
    return env


def last_line(res: subprocess.CompletedProcess) -> str:
    return res.stderr.decode().strip().splitlines()[-1]


def test_image_sh_scripts_pass_a_posix_syntax_check(tmp_path):
    """Every rendered shell file parses with dash -n and sh -n (no bashisms that break)."""
    top = image_sh(tmp_path)
    files = [top / s for s in SCRIPTS] + [top / "image.sh", top / "ganeti-vol.sh"]
    assert not (top / "osdef.py").exists()
    shells = [sh for sh in ("dash", "sh") if shutil.which(sh)]
    assert shells
    for path in files:
        assert "{{" not in path.read_text() and "{%" not in path.read_text(), path
        for sh in shells:
            res = subprocess.run([sh, "-n", str(path)], capture_output=True, timeout=10)
            assert res.returncode == 0, (sh, path.name, res.stderr)
    for script in SCRIPTS:
        text = (top / script).read_text()
        assert text.startswith("#!/bin/sh\n") and "\nset -eu\n" in text, script
    bashisms = re.compile(r"\[\[|\bfunction\s|<<<|\$'|\blocal\s|pipefail|\$\{\w+//|"
                          r"\[ [^]]* == ")
    for path in files:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.lstrip().startswith("#"):
                assert not bashisms.search(line), f"{path.name}:{lineno}: {line}"


@pytest.mark.parametrize("fmt", ["raw", "gzip", "lz4", "xz", "qcow2"])
def test_image_sh_create_writes_the_image_and_keeps_the_rest_of_the_disk(tmp_path, fmt):
    """Each format lands byte for byte at the start of disk 0; size and tail are kept."""
    top = image_sh(tmp_path)
    raw = raw_image(tmp_path / "img.raw")
    image = image_as(raw, fmt)
    disk = filled_disk(tmp_path / "d0.img")
    res = run_script(top / "create", env=create_env(disk, image=str(image)))
    assert res.returncode == 0, res.stderr
    assert "sha256" in res.stderr.decode() and "verified" in res.stderr.decode()
    data = disk.read_bytes()
    assert 4 * MiB == len(data)
    assert raw.read_bytes() == data[: 2 * MiB]
    assert data[-4096 - len(DISK_TAIL):] == b"\xee" * 4096 + DISK_TAIL


def test_image_sh_create_uses_the_variant_file_and_its_sample_image(tmp_path):
    """Without -O image, IMAGE= of variants/default.conf (the sample image) is written."""
    top = image_sh(tmp_path)
    disk = filled_disk(tmp_path / "d0.img", 2 * MiB)
    res = run_script(top / "create", env=create_env(disk))
    assert res.returncode == 0, res.stderr
    sample = gzip.decompress((top / scaffold.SAMPLE_IMAGE).read_bytes())
    assert sample == disk.read_bytes()[: len(sample)]


def test_image_sh_sha256_mismatch_is_refused_before_writing(tmp_path):
    """A sidecar (or parameter) hash that differs: exit 1, one ERROR line, disk untouched."""
    top = image_sh(tmp_path)
    image = image_as(raw_image(tmp_path / "img.raw"), "gzip")
    disk = filled_disk(tmp_path / "d0.img")
    before = disk.read_bytes()
    Path(f"{image}.sha256").write_text("0" * 64 + "  img.raw.gzip\n")
    for env in (create_env(disk, image=str(image)),
                create_env(disk, image=str(image), image_sha256="F" * 64)):
        res = run_script(top / "create", env=env)
        assert res.returncode == 1
        line = last_line(res)
        assert line.startswith("ERROR: shos create: image ") and line.endswith(
            "refusing a corrupt or replaced image"), line
        assert before == disk.read_bytes()


@pytest.mark.parametrize("fmt", ["raw", "xz", "qcow2"])
def test_image_sh_image_larger_than_the_disk_is_refused(tmp_path, fmt):
    """6 MiB into a 4 MiB disk: refused before writing, the disk keeps size and data."""
    top = image_sh(tmp_path)
    image = image_as(raw_image(tmp_path / "img.raw", 6 * MiB), fmt)
    disk = filled_disk(tmp_path / "d0.img")
    before = disk.read_bytes()
    res = run_script(top / "create", env=create_env(disk, image=str(image)))
    assert res.returncode == 1
    line = last_line(res)
    assert line.startswith("ERROR: shos create: cannot write image"), line
    assert f"it holds {6 * MiB} bytes, the disk has only {4 * MiB}" in line
    assert before == disk.read_bytes()


def test_image_sh_compressed_image_larger_than_the_disk_fails(tmp_path):
    """gzip does not record a usable size: 'ganeti-vol restore' stops at the disk's end,
    create fails with its ERROR line last and the file disk keeps its size."""
    top = image_sh(tmp_path)
    image = image_as(raw_image(tmp_path / "img.raw", 6 * MiB), "gzip")
    disk = filled_disk(tmp_path / "d0.img")
    res = run_script(top / "create", env=create_env(disk, image=str(image)))
    assert res.returncode == 1
    assert "past the end of the target" in res.stderr.decode()
    assert last_line(res).startswith("ERROR: shos create: cannot write image")
    assert "ganeti-vol restore failed" in last_line(res)
    assert 4 * MiB == disk.stat().st_size


def test_image_sh_corrupt_compressed_image_fails(tmp_path):
    """A gzip stream that breaks off (sha256 matching): the decompressor's failure is the error."""
    top = image_sh(tmp_path)
    image = tmp_path / "broken.gz"
    image.write_bytes(gzip.compress(os.urandom(256 << 10))[:100 << 10])
    disk = filled_disk(tmp_path / "d0.img")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = create_env(disk, image=str(image),
                     image_sha256=hashlib.sha256(image.read_bytes()).hexdigest())
    res = run_script(top / "create", env={**env, "TMPDIR": str(tmp)})
    assert res.returncode == 1
    assert "cannot decompress image" in last_line(res) and "gzip exited" in last_line(res)
    assert os.listdir(tmp) == []  # the trap removed the temporary file


def test_image_sh_verify_checks_the_image_parameters(tmp_path):
    """A bad format, a malformed sha256 and a missing image are refused; good ones pass."""
    top = image_sh(tmp_path)
    image = raw_image(tmp_path / "img.raw")
    good = {"OSP_IMAGE": str(image), "OSP_IMAGE_FORMAT": "raw", "OSP_IMAGE_SHA256": "none"}
    res = run_script(top / "verify", "parameters", env=good)
    assert res.returncode == 0, res.stderr
    for bad, word in (({"OSP_IMAGE_FORMAT": "zip"}, "image_format"),
                      ({"OSP_IMAGE_SHA256": "xyz"}, "image_sha256"),
                      ({"OSP_IMAGE": str(tmp_path / "missing.img")}, "is not a file")):
        res = run_script(top / "verify", "parameters", env={**good, **bad})
        assert res.returncode == 1, bad
        assert last_line(res).startswith("ERROR: shos verify:") and word in last_line(res)


def test_image_sh_export_import_are_dump_and_restore(tmp_path):
    """export writes the disk to stdout; import writes stdin into a disk (never truncated)."""
    top = image_sh(tmp_path)
    disk = filled_disk(tmp_path / "d0.img", MiB)
    res = run_script(top / "export", env={"EXPORT_DEVICE": str(disk), "EXPORT_INDEX": "0"})
    assert res.returncode == 0, res.stderr
    assert disk.read_bytes() == res.stdout
    target = sparse_file(tmp_path / "new.img", 2 * MiB)
    with open(disk, "rb") as stdin:
        res = run_script(top / "import", env={"IMPORT_DEVICE": str(target),
                                              "IMPORT_INDEX": "0"}, stdin=stdin)
    assert res.returncode == 0, res.stderr
    assert disk.read_bytes() + bytes(MiB) == target.read_bytes()


# --- the shipped OS definitions are these templates ---------------------------------------


@pytest.mark.parametrize("name", ["raw", "image"])
def test_shipped_os_definition_is_its_template_rendered(name):
    """os-definitions/raw and /image are exactly 'os new NAME --template NAME' (no drift)."""
    files = scaffold.render_files(name, name)
    top = REPO / "os-definitions" / name
    shipped = {str(p.relative_to(top)) for p in top.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert sorted(files) == sorted(shipped)
    for rel, (data, mode) in files.items():
        assert data == (top / rel).read_bytes(), rel
        assert mode == stat.S_IMODE((top / rel).stat().st_mode) & 0o755, rel


def test_setup_cfg_ships_the_templates_and_every_file_of_raw_and_image():
    """package_data has templates/**/*; data_files cover each file of the two OS dirs."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert "templates/**/*" in cfg["options.package_data"]["ganeti_vol"]
    covered: dict[str, set[str]] = {}
    for dest, patterns in cfg["options.data_files"].items():
        for pattern in patterns.replace("\n", ",").split(","):
            for path in glob.glob(str(REPO / pattern.strip())):
                if os.path.isfile(path):
                    covered[os.path.relpath(path, REPO)] = dest
    for name in ("raw", "image"):
        top = REPO / "os-definitions" / name
        for path in top.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                rel = str(path.relative_to(REPO))
                want = f"share/ganeti-vol/{os.path.dirname(rel)}"
                assert want == covered.get(rel), rel


# --- os install and finding the interpreter ------------------------------------------------


def test_install_records_the_python_that_scripts_use_under_ganetis_path(tmp_path, capsys):
    """'os install' copies the OS and writes ganeti-vol.python; the scripts run with it."""
    marker = tmp_path / "used"
    wrapper = tmp_path / "py"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> "{marker}"\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    dest = tmp_path / "os"
    dest.mkdir()
    assert 0 == main(["os", "install", "raw", "--dest", str(dest), "--python", str(wrapper)])
    installed = dest / "raw"
    assert f"{wrapper}\n" == (installed / scaffold.PYTHON_FILE).read_text()
    disk = sparse_file(tmp_path / "d.img", 1 << 20)
    disk.write_bytes(b"data" * (1 << 18))
    # under Ganeti the parent is a shell pipeline, not Python: run through bash
    res = subprocess.run(
        ["bash", "-c", f'"{installed}/export" | cmp - "{disk}"'],
        env={"PATH": C.SCRIPT_PATH, "EXPORT_DEVICE": str(disk), "EXPORT_INDEX": "0"},
        capture_output=True, timeout=60)
    assert 0 == res.returncode, res.stderr
    assert "-m ganeti_vol" in marker.read_text()
    assert 3 == main(["os", "install", "raw", "--dest", str(dest)])  # exists, no --force


def test_install_refuses_an_invalid_os_definition(tmp_path, capsys):
    """A directory that is not a valid OS definition is not installed (exit 5)."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ganeti_api_version").write_text("20\n")
    dest = tmp_path / "os"
    dest.mkdir()
    assert 5 == main(["os", "install", str(broken), "--dest", str(dest)])
    assert [] == os.listdir(dest)
