"""Raw disk I/O for OS scripts: dump a disk to a stream, restore a stream into a disk.

These are the library halves of ``ganeti-vol dump`` and ``ganeti-vol
restore`` (and of :mod:`ganeti_vol.osapi`); they replace the peers'
``dd if=$DEV bs=1M`` and ``dd of=$DEV conv=nocreat,notrunc oflag=dsync``.

**dump** (:func:`dump`) writes a file or block device to a file descriptor:

- the data ranges of a regular file (``SEEK_DATA``/``SEEK_HOLE``) move with
  ``splice(2)`` into a pipe, ``sendfile(2)`` into anything else, so the
  bytes never enter this process (falls back to ``pread``/``write`` where
  the kernel refuses); a block device is read with 4 MiB ``O_DIRECT`` reads
  (3-4x faster than through the page cache from a loop device here);
- holes become zeros without being read: into a pipe with ``vmsplice(2)``
  of one zero buffer that is never written (pages are referenced, not
  copied), into a
  regular file that ends where we write by seeking past them (the output
  stays sparse), anywhere else by writing a shared zero buffer;
- an output pipe is enlarged to 1 MiB (:func:`ganeti_vol.core.fdio.enlarge_pipe`);
- the size can be announced first on ``EXP_SIZE_FD`` (:func:`announce_size`),
  for files and block devices alike.

**restore** (:func:`restore`, :func:`copy_image`) writes a stream or an image
file into an existing disk through a :class:`DiskWriter`:

- a file disk is never created, truncated or extended; a block device is
  claimed with ``O_EXCL``; the writing itself is the engine's
  :class:`~ganeti_vol.engine.targets.RawTarget` (aligned ``O_DIRECT`` writes where
  possible: 2-4x faster than buffered writes to a loop device here);
- missing, mounted (also through a loop device or partition), held or
  read-only targets are refused first (:func:`check_target`, with
  :func:`ganeti_vol.system.devices.import_target_refusal`), and so is a target
  smaller than the input when the input's size is known; an input that
  turns out to be larger stops at the first byte past the end;
- zero runs (64 KiB granules) are skipped when the target is known to read as
  zeros (a file disk with no data at all, or ``known_zero=True``); otherwise
  they become ``BLKZEROOUT`` (block device) or punched holes (file), which
  also keeps file disks sparse;
- the target is fsynced at the end;
- with ``verify=True`` every 4 MiB chunk of what was meant to land is hashed
  (xxh3-128) while it is copied, and after the fsync the written range is
  read back (``O_DIRECT`` where the target allows it, else buffered after
  the cached pages were dropped) and compared chunk by chunk: a mismatch is
  an :class:`~ganeti_vol.core.errors.IntegrityError` naming the chunk's offset.

The code is in :mod:`~ganeti_vol.engine.rawdump`,
:mod:`~ganeti_vol.engine.rawrestore` and :mod:`~ganeti_vol.engine.rawdisk` (what
both share; disk sizes are :mod:`ganeti_vol.core.fdio`'s); this module is the
one OS scripts use (as ``ganeti_vol.osapi.rawio``), and names them all.

Nothing here prints; errors are :class:`~ganeti_vol.core.errors.GanetiVolError`
subclasses with one-line messages.
"""

from __future__ import annotations

from ganeti_vol.core.fdio import (
    disk_size as disk_size,
    fd_size as fd_size,
    open_readonly as open_readonly,
)
from ganeti_vol.engine.rawdisk import (
    CHUNK as CHUNK,
    EXP_SIZE_FD as EXP_SIZE_FD,
    CopySummary as CopySummary,
    announce_size as announce_size,
    is_all_hole_path as is_all_hole_path,
    size_fd_from_env as size_fd_from_env,
    sync_path as sync_path,
)
from ganeti_vol.engine.rawdump import (
    FILE_STEP as FILE_STEP,
    PIPE_STEP as PIPE_STEP,
    ZeroWriter as ZeroWriter,
    dump as dump,
    open_source as open_source,
)
from ganeti_vol.engine.rawrestore import (
    GRANULE as GRANULE,
    VERIFY_HASH as VERIFY_HASH,
    DiskWriter as DiskWriter,
    check_target as check_target,
    copy_image as copy_image,
    copy_into as copy_into,
    input_size as input_size,
    restore as restore,
)
