"""The system: what ganeti-vol does to the machine it runs on.

Child processes (OS scripts, hooks, tools: plumbum), block devices and mounts
(pyudev), loop devices and partitions, snapshots, and the locks of
instances, disks and destinations.

May import: :mod:`ganeti_vol.core`.
"""
