"""ganeti-vol: run, test and stream Ganeti OS definitions.

The library never writes to stdout (it may be carrying disk data); it logs
through :mod:`logging`.  The command line lives in :mod:`ganeti_vol.cli`.
"""

__version__ = "0.1.0"
