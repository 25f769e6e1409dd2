"""The architecture is checked, not only described: import contracts and strict typing.

``setup.cfg`` holds the import-linter contracts (the rooms are layered, an
adapter never imports another adapter, a third-party package is imported by
its adapter only, the library never imports the CLI) and the mypy settings
(``strict`` for the whole package).  These tests run both on this checkout,
and show that the contracts catch what they forbid.
"""

from __future__ import annotations

import ast
import configparser
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "ganeti_vol")
SETUP_CFG = os.path.join(ROOT, "setup.cfg")


def _config() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(SETUP_CFG)
    return cfg


def lint_imports(root: str) -> subprocess.CompletedProcess[str]:
    """Run import-linter with this checkout's contracts on the package below ``root``."""
    pytest.importorskip("importlinter", reason="import-linter is not installed: "
                        "pip install '.[test]' (the 'test' extra has it)")
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={SETUP_CFG!r}, no_cache=True, no_logo=True))")
    env = {**os.environ, "PYTHONPATH": root}
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, text=True,
                          capture_output=True, timeout=300)


def test_import_contracts_are_kept():
    res = lint_imports(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout, res.stdout


def test_every_room_of_the_package_is_a_layer():
    """A new subpackage must be placed in the layers (and so say what it may import)."""
    layers = _config()["importlinter:contract:layers"]["layers"]
    named = set(re.findall(r"[a-z_]+", layers))
    rooms = {d for d in os.listdir(PACKAGE)
             if os.path.isfile(os.path.join(PACKAGE, d, "__init__.py"))}
    assert rooms - named == set()
    for room in rooms:
        with open(os.path.join(PACKAGE, room, "__init__.py"), encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
        assert "May import:" in doc, f"{room}/__init__.py does not say what it may import"


@pytest.mark.slow
def test_contracts_catch_each_kind_of_forbidden_import(tmp_path):
    """One forbidden import of each kind, written into a copy of the package: every contract
    reports it (so the contracts are not vacuous)."""
    copy = tmp_path / "ganeti_vol"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "templates"))
    injected = {
        "core/paths.py": "import ganeti_vol.engine.codec\n",  # a room imports one above it
        "engine/codec.py": "import ganeti_vol.engine.hashing\n",  # an adapter imports one
        "formats/wire.py": "import xxhash\n",  # a package outside its adapter
        "ops/opstate.py": "import ganeti_vol.cli.common\n",  # the library imports the CLI
    }
    for path, line in injected.items():
        with open(copy / path, "a", encoding="utf-8") as f:
            f.write(line)
    res = lint_imports(str(tmp_path))
    assert res.returncode != 0
    for name in ("The rooms are layered", "An adapter", "Each third-party package",
                 "The library never imports the CLI"):
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith(name)), "")
        assert line.endswith(("BROKEN", "ignored imports)")) and "BROKEN" in line, \
            (name, res.stdout)


def test_the_whole_package_is_strictly_typed(tmp_path):
    pytest.importorskip("mypy", reason="mypy is not installed: pip install '.[test]' "
                        "(the 'test' extra has it)")
    cfg = _config()["mypy"]
    assert cfg.getboolean("strict") and cfg["files"].strip() == "ganeti_vol"
    res = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", SETUP_CFG,
         "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT, text=True, capture_output=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_missing_module_fails_loudly_instead_of_turning_the_hooks_off(tmp_path):
    """Regression: a packaging fault in ganeti_vol.ganeti.hooks silently swapped in no hooks
    (no pre-hook veto).  Now the command stops with the internal error naming the module."""
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / "ganeti-vol.conf").write_text("")  # GANETI_VOL_CONFIG (conftest)
    script = tmp_path / "blocked.py"
    script.write_text(
        "import importlib.abc, sys\n"
        "class Missing(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'ganeti_vol.ganeti.hooks':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Missing())\n"
        "from ganeti_vol.cli import main\n"
        "sys.exit(main(['instance', 'verify-params', 'no-such-instance-file']))\n"
    )
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, text=True,
                         capture_output=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "No module named 'ganeti_vol.ganeti.hooks'" in res.stderr.splitlines()[-1]


def _module_aliases(tree: ast.Module) -> set[str]:
    """Names a module binds to ganeti_vol modules (imports, and lazy("ganeti_vol...") stand-ins)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.asname or a.name.split(".")[0] for a in node.names
                         if a.name.startswith("ganeti_vol"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ganeti_vol"):
            base = os.path.join(ROOT, *node.module.split("."))
            names.update(a.asname or a.name for a in node.names
                         if os.path.exists(os.path.join(base, a.name + ".py"))
                         or os.path.isdir(os.path.join(base, a.name)))
        elif (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
              and getattr(node.value.func, "id", None) == "lazy"):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def test_private_names_do_not_cross_modules():
    """A name with a leading underscore is used only in the module that defines it."""
    crossing = []
    for top, _dirs, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(top, name)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            modules = _module_aliases(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ganeti_vol"):
                    crossing += [f"{path}:{node.lineno} {node.module}.{a.name}" for a in node.names
                                 if a.name.startswith("_") and not a.name.startswith("__")]
                elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                      and node.value.id in modules and node.attr.startswith("_")
                      and not node.attr.startswith("__")):
                    crossing.append(f"{path}:{node.lineno} {node.value.id}.{node.attr}")
    assert crossing == []


def _layers() -> list[tuple[list[str], bool]]:
    """The layers contract, top first: each its rooms, and whether they are independent
    ("a | b") or may import each other ("a : b")."""
    text = _config()["importlinter:contract:layers"]["layers"]
    return [([room.strip("() ") for room in re.split("[|:]", line)], ":" not in line)
            for line in text.strip().splitlines() if line.strip()]


def _lazy_imports(path: str) -> list[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    return [(node.lineno, node.args[0].value) for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy"
            and node.args and isinstance(node.args[0], ast.Constant)]


def test_lazy_imports_keep_the_layers_too():
    """lazy("ganeti_vol.x") stand-ins (the one way to defer an import) are invisible to
    import-linter: the same layering rule is checked on them here."""
    rank = {room: (i, independent) for i, (line, independent) in enumerate(_layers())
            for room in line}
    wrong = []
    for top, _dirs, files in os.walk(PACKAGE):
        room = os.path.relpath(top, PACKAGE).split(os.sep)[0]
        for name in files:
            if not name.endswith(".py") or room not in rank:
                continue
            for line, target in _lazy_imports(os.path.join(top, name)):
                other = target.split(".")[1] if target.count(".") else ""
                if other == room or other not in rank:
                    continue
                above = rank[other][0] < rank[room][0]
                sibling = rank[other][0] == rank[room][0] and rank[room][1]
                if above or sibling:  # a room above, or an independent sibling
                    wrong.append(f"{room}/{name}:{line} lazy({target!r})")
    assert wrong == []
