"""Formats: what ganeti-vol writes and reads on disk and on the wire.

Export archives, the self-describing export stream, Ganeti's own export
(``config.ini`` and raw dumps), and the record stream of ``ganeti-vol-lz4``.

May import: :mod:`ganeti_vol.ganeti`, :mod:`ganeti_vol.engine`,
:mod:`ganeti_vol.system` and :mod:`ganeti_vol.core`.
"""
