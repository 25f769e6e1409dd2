"""The core: what every other room stands on.

Errors and exit codes, the plain data model, Ganeti's names and numbers, value
parsing, where shipped files live, lazy imports, the C library, file-descriptor
I/O, holes and zero runs, files written atomically, process identities and the
records of resources a process holds.

May import: the standard library only (no other room, no third-party package).
"""
