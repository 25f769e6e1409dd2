"""Authoring: tools for people who write OS definitions.

The scaffold (``ganeti-vol os new``, ``os install``), its templates (jinja2),
and the conformance runner (``ganeti-vol os test``).

May import: :mod:`ganeti_vol.ops` and every room below it (not :mod:`ganeti_vol.osapi`,
:mod:`ganeti_vol.repo` or the CLI).
"""
