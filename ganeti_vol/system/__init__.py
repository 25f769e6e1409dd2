"""The system: what ganeti-vol does to the machine it runs on.

Child processes (OS scripts, hooks, tools: plumbum; :mod:`.process`, with
:mod:`.proctree` and :mod:`.scriptlog`), block devices and mounts (pyudev;
:mod:`.devices`), loop devices and partitions (:mod:`.loopdev`, with
:mod:`.loopctl`, :mod:`.loopteardown`, :mod:`.loopleftovers`,
:mod:`.partitions`), snapshots (:mod:`.snapshots`, with :mod:`.snapshotlease`
and :mod:`.snapshotproviders`), and the locks of instances, disks and
destinations (:mod:`.locks`).

May import: :mod:`ganeti_vol.core`.
"""
