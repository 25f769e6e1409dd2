"""SHA-256 against BLAKE3 for repository chunk digests (doc/repository-format.md).

256 MiB in 4 MiB pieces, half log-like text and half random, hashed with 1
and 2 threads; median (min, max) of 5 runs in GB/s.  Run: python3 bench/hash_digests.py
"""

import hashlib
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import blake3

rng = random.Random(1)
line = b"Nov 25 12:00:00 node1 kernel: [ 1.234] block drbd0: resync done\n"
text = (line * ((4 << 20) // len(line) + 1))[:4 << 20]
chunks = [rng.randbytes(4 << 20) if i % 2 else text for i in range(64)]  # 256 MiB
total = sum(map(len, chunks))


def sha(b):
    return hashlib.sha256(b).digest()


def b3(b):
    return blake3.blake3(b).digest()


def run(fn, threads):
    t = time.perf_counter()
    if threads == 1:
        for c in chunks:
            fn(c)
    else:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(fn, chunks))
    return total / (time.perf_counter() - t) / 1e9


for name, fn in (("sha256", sha), ("blake3", b3)):
    for th in (1, 2):
        runs = [run(fn, th) for _ in range(5)]
        print(f"{name} {th} thread(s): median {statistics.median(runs):.2f} GB/s "
              f"(min {min(runs):.2f} max {max(runs):.2f})")
