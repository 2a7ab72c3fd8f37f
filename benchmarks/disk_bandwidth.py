"""Sequential write and read bandwidth of the disk tier through DiskFile.

    python benchmarks/disk_bandwidth.py [SIZE] [--dir DIR] [--chunk SIZE] [--threads N]

SIZE like 1G, 512M or a byte count (default 1G). The file goes in a fresh
OffloadDir under DIR (default the system temp dir) and is removed afterwards.
Transfers are chunk-sized, aligned, O_DIRECT when the file system takes it, so
the page cache is not what is measured; with --threads N, N chunks are in
flight at once through an IOPool (deeper device queue, as the engine does).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tiergen.disk import IOPool, OffloadDir, aligned_empty  # noqa: E402

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    unit = s[-1] if s and s[-1] in UNITS else ""
    return int(float(s[:len(s) - len(unit)]) * UNITS[unit])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("size", nargs="?", default="1G")
    ap.add_argument("--dir", default=None, help="parent of the offload directory")
    ap.add_argument("--chunk", default="64M", help="bytes per transfer (default 64M)")
    ap.add_argument("--threads", type=int, default=1, help="transfers in flight at once")
    args = ap.parse_args()
    size, chunk = parse_size(args.size), parse_size(args.chunk)
    chunk = min(chunk, size)
    offsets = list(range(0, size - chunk + 1, chunk))   # whole chunks only
    size = len(offsets) * chunk
    # One buffer per thread in flight; the same bytes are written to every chunk.
    bufs = [aligned_empty(chunk) for _ in range(args.threads)]
    for b in bufs:
        b.random_(0, 256)

    with OffloadDir(args.dir) as od, IOPool(args.threads) as pool:
        f = od.new_file("bandwidth.bin", size)
        print(f"{f.path}: {size / 1e9:.2f} GB in {chunk >> 20} MiB chunks, "
              f"{args.threads} thread(s), O_DIRECT={f.direct}")

        def run(op, sync: bool) -> float:
            # Thread i moves every threads-th chunk through its own buffer.
            def worker(i: int) -> None:
                for off in offsets[i::args.threads]:
                    op(off, bufs[i])
            t0 = time.perf_counter()
            for fu in [pool.submit(worker, i) for i in range(args.threads)]:
                fu.result()
            if sync:
                f.sync()   # data still in the device's write cache is not written yet
            return size / (time.perf_counter() - t0) / 1e9

        write = run(f.write_from, sync=True)
        read = run(f.read_into, sync=False)
    print(f"write: {write:.2f} GB/s")
    print(f"read:  {read:.2f} GB/s")


if __name__ == "__main__":
    main()
