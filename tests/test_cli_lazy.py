"""The CLI's lazy imports: nothing heavy at parser time, safe from several threads."""

from __future__ import annotations

import subprocess
import sys
import threading

from ganeti_vol.core.lazy import lazy


def test_building_the_parser_does_not_import_the_engine_or_jinja2():
    code = ("import sys; from ganeti_vol.cli import build_parser; build_parser(); "
            "print(' '.join(m for m in ('ganeti_vol.ops.transfer', 'ganeti_vol.engine.parallel', 'jinja2', "
            "'ganeti_vol.authoring.conformance') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_lazy_module_is_safe_from_many_threads_at_once():
    """Regression: importlib's LazyLoader raced when two disk threads touched a module."""
    mod = lazy("ganeti_vol.system.snapshots")
    errors = []

    def touch():
        try:
            assert callable(mod.instance_snapshot)
        except Exception as err:  # collected, asserted below
            errors.append(err)

    threads = [threading.Thread(target=touch) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_command_map_matches_what_each_module_registers():
    """COMMANDS (used to load only the invoked command's module) is complete and exact."""
    import argparse
    import importlib

    from ganeti_vol import cli

    for name, commands in cli.COMMANDS.items():
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"ganeti_vol.cli.{name}").register(sub)
        assert tuple(sub.choices) == commands, name


def test_command_word_skips_global_options_and_their_values():
    from ganeti_vol.cli import command_word

    assert command_word(["--config", "export", "-v", "import", "x"]) == "import"
    assert command_word(["--config=f", "-q", "export", "--help"]) == "export"
    assert command_word(["--debug", "os", "list"]) == "os"
    assert command_word(["--help", "export"]) is None
    assert command_word(["-v"]) is None


def test_a_command_loads_only_its_own_cli_module():
    """`export --help` builds the export parser without the other commands' modules."""
    code = ("import sys; from ganeti_vol.cli import main\n"
            "try:\n    main(['export', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('ganeti_vol.cli.'))),"
            " file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--raw" in out.stdout  # the real export help
    loaded = set(out.stderr.split())
    assert "ganeti_vol.cli.transfer" in loaded
    assert not loaded & {"ganeti_vol.cli.authoring", "ganeti_vol.cli.os_cmds",
                         "ganeti_vol.cli.tools", "ganeti_vol.cli.hooks_cmds"}


def test_an_unknown_command_still_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "ganeti_vol", "exprot"], capture_output=True,
                         text=True)
    assert out.returncode == 3  # UsageError (doc/exit-codes.md)
    for word in ("export", "import", "backup", "demo", "os", "restore"):
        assert f"'{word}'" in out.stderr
