"""The data engine: disks in chunks, hashed and compressed in parallel, and back.

Chunk sources and sinks, the central parallel compressor, import targets and
writers, the LZ4 codec (lz4), chunk hashes (xxhash, blake3), raw dump and
restore for OS scripts (:mod:`.rawio`, over :mod:`.rawdump`, :mod:`.rawrestore`
and :mod:`.rawdisk`), and transfer progress.

May import: :mod:`ganeti_vol.system` and :mod:`ganeti_vol.core`.
"""
