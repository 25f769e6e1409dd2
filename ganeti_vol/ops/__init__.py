"""Operations: the use cases, as a Ganeti node runs them.

Create, reinstall, rename and parameter verification of an instance; export
and import of whole instances; and what an operation leaves behind if it
dies (the instance's "in progress" mark).

May import: :mod:`ganeti_vol.formats`, :mod:`ganeti_vol.ganeti`,
:mod:`ganeti_vol.engine`, :mod:`ganeti_vol.system` and :mod:`ganeti_vol.core`.
"""
