"""The CLI's lazy imports: nothing heavy at parser time, safe from several threads."""

from __future__ import annotations

import subprocess
import sys
import threading

from ganeti_vol.lazy import lazy


def test_building_the_parser_does_not_import_the_engine_or_jinja2():
    code = ("import sys; from ganeti_vol.cli import build_parser; build_parser(); "
            "print(' '.join(m for m in ('ganeti_vol.transfer', 'ganeti_vol.streams', 'jinja2', "
            "'ganeti_vol.conformance') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_lazy_module_is_safe_from_many_threads_at_once():
    """Regression: importlib's LazyLoader raced when two disk threads touched a module."""
    mod = lazy("ganeti_vol.snapshots")
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
