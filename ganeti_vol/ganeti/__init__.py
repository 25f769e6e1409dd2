"""The Ganeti OS interface: what Ganeti defines and ganeti-vol follows.

The environment contract of OS scripts (:mod:`.environment`: names, builders,
parser) and of hooks (:mod:`.hookenv`), OS discovery, Ganeti's
hypervisor and backend parameters (``data/ganeti-defaults.json``), the node
config and instance files (configobj), and the hooks runner.

May import: :mod:`ganeti_vol.system` and :mod:`ganeti_vol.core` (not the engine:
the two are independent).
"""
