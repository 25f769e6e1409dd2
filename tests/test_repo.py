"""Repository contracts: README commands, CI wiring, layout, no printing in the library."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    block = REPO.joinpath("README.md").read_text().split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


VENV_A = "python3 -m venv .venv && .venv/bin/pip install . && "


def test_readme_begins_with_the_two_commands_both_in_a_virtualenv():
    """PEP 668 distributions (Debian 12) refuse 'pip install' into the system's Python:
    (a) and (b) make a virtualenv and use it; (b) installs python3-venv for that."""
    text = REPO.joinpath("README.md").read_text()
    assert text.split("\n", 2)[2].startswith("```sh\n")
    a, b = readme_commands()
    assert a == VENV_A + ".venv/bin/ganeti-vol demo"
    assert " python3-venv " in b
    assert b.endswith(" && python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && "
                      ".venv/bin/python -m pytest -q")
    assert "pip install" not in b.replace(".venv/bin/pip install", "")


def repo_copy(dest: Path) -> Path:
    """This tree without build products, virtualenvs or git metadata (also what the
    Debian package is built from)."""
    import shutil

    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache"))
    return dest


@pytest.mark.slow
def test_readme_command_a_runs_as_written_with_the_systems_python3(tmp_path):
    """(a) in a fresh copy, with python3 from the system's PATH (Debian's externally
    managed one here): the venv is made, ganeti-vol installed into it, the demo passes."""
    import os
    import subprocess

    from ganeti_vol.core import constants as C

    src = repo_copy(tmp_path / "ganeti-vol")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = C.SCRIPT_PATH
    proc = subprocess.run(["sh", "-c", readme_commands()[0]], cwd=src, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "imported disks identical to the originals" in proc.stdout
    assert (src / ".venv" / "pyvenv.cfg").is_file()


def test_ci_runs_exactly_the_readme_test_command():
    ci = REPO.joinpath(".ci", "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_top_level_layout():
    for name in ("setup.cfg", "pyproject.toml", "ganeti_vol", "os-definitions", "hooks", "tests", "doc"):
        assert (REPO / name).exists(), name


def test_library_never_prints():
    """Only ganeti_vol/cli may write to stdout: disk data may be flowing there."""
    offenders = []
    for path in (REPO / "ganeti_vol").rglob("*.py"):
        if "cli" in path.relative_to(REPO / "ganeti_vol").parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{path}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr == "stdout" and \
                    getattr(node.value, "id", None) == "sys":
                offenders.append(f"{path}:{node.lineno} (sys.stdout)")
    assert not offenders, offenders


THIRD_PARTY_HOMES = {
    "plumbum": {"process.py"},
    "lz4": {"codec.py"},
    "configobj": {"config.py"},
    "jinja2": {"templates.py"},
    "pyudev": {"devices.py"},
}


def test_each_third_party_library_sits_behind_one_module():
    for path in (REPO / "ganeti_vol").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module.split(".")[0]]
            for name in names:
                if name in THIRD_PARTY_HOMES:
                    assert path.name in THIRD_PARTY_HOMES[name], f"{path} imports {name}"


def test_shipped_os_definitions_are_valid():
    from ganeti_vol.ganeti import discovery

    entries = discovery.diagnose([str(REPO / "os-definitions")])
    assert entries, "no shipped OS definitions"
    bad = {e.name: e.diagnose for e in entries if not e.valid}
    assert not bad, bad


def test_setup_cfg_declares_the_entry_point_and_dependencies():
    text = REPO.joinpath("setup.cfg").read_text()
    assert re.search(r"ganeti-vol = ganeti_vol\.cli:main", text)
    for dep in ("jinja2", "plumbum", "lz4", "pyudev", "configobj"):
        assert re.search(rf"^\s+{dep}\b", text, re.M), dep


def declared_requirements() -> dict[str, str]:
    """name -> version spec of every install_requires and extras_require line of setup.cfg."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in cfg["options.extras_require"].values():
        lines += extra.splitlines()
    out = {}
    for line in filter(None, (x.split("#")[0].strip() for x in lines)):
        name, spec = re.match(r"^([A-Za-z0-9_.-]+)\s*(.*)$", line).groups()
        out[name.lower()] = spec
    return out


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def _installed_version(name: str) -> tuple[int, ...] | None:
    """The installed version of ``name``; Debian 12's python3-plumbum and python3-xxhash
    record 0.0.0 in their metadata, so then the module's own version attribute."""
    import importlib
    from importlib import metadata

    try:
        version = _version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None
    if version == (0, 0, 0):
        module = importlib.import_module(name)
        version = _version(str(getattr(module, "__version__", None) or module.VERSION))
    return version


def test_every_dependency_is_bounded_below_its_next_major_version():
    """'>=LOW,<MAJOR': MAJOR is a major version above LOW's (pyudev 0.x: <1), and the
    version installed here, which the suite tests, lies in the range."""
    reqs = declared_requirements()
    assert {"jinja2", "plumbum", "lz4", "pyudev", "configobj", "xxhash", "pytest"} <= set(reqs)
    for name, spec in reqs.items():
        low = re.search(r">=\s*([\d.]+)", spec)
        high = re.search(r"<\s*(\d+)(?:,|$)", spec)
        assert low and high, f"{name}: '{spec}' needs >=LOW,<MAJOR"
        assert int(high.group(1)) > _version(low.group(1))[0], f"{name}: {spec}"
        installed = _installed_version(name)
        if installed is None:
            continue  # not installed in this Python (blake3 on Debian 12): the bound still holds
        assert _version(low.group(1)) <= installed < (int(high.group(1)),), (name, installed)

