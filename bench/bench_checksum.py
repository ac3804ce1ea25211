"""Checksum candidates for the checkpoint manifest (checkpoint/files.py), over one large file.

    python bench/bench_checksum.py                    # 1 GiB file, 16 MiB reads, 3 repeats
    python bench/bench_checksum.py --size-mib 4096 --chunk-mib 64

Every candidate reads the same file with the same chunk size, interleaved, repeat by repeat;
the file is read once before timing, so the numbers are for a file in the page cache (what a
resume right after a save sees; a cold shared filesystem is slower for every candidate alike).
"read only" is the floor. Prints GB/s per candidate and its ratio to the plain read.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
import zlib


def _read_only(path: str, chunk: int) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while data := f.read(chunk):
            n += len(data)
    return n


def _crc32(path: str, chunk: int) -> int:
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while data := f.read(chunk):
            crc = zlib.crc32(data, crc)
    return crc


def _adler32(path: str, chunk: int) -> int:
    value = 1
    with open(path, "rb", buffering=0) as f:
        while data := f.read(chunk):
            value = zlib.adler32(data, value)
    return value


def _hashlib(name: str):
    def run(path: str, chunk: int) -> str:
        h = hashlib.new(name)
        with open(path, "rb", buffering=0) as f:
            while data := f.read(chunk):
                h.update(data)
        return h.hexdigest()

    return run


CANDIDATES = {
    "read only": _read_only,
    "zlib.crc32": _crc32,
    "zlib.adler32": _adler32,
    "blake2b": _hashlib("blake2b"),
    "sha256": _hashlib("sha256"),
    "sha1": _hashlib("sha1"),
    "md5": _hashlib("md5"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--chunk-mib", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the test file (default: tmp)")
    args = parser.parse_args()
    chunk = args.chunk_mib << 20
    fd, path = tempfile.mkstemp(dir=args.dir, suffix=".bin")
    try:
        with os.fdopen(fd, "wb") as f:
            block = os.urandom(64 << 20)
            for _ in range(args.size_mib // 64):
                f.write(block)
        size = os.path.getsize(path)
        _read_only(path, chunk)  # into the page cache
        times: dict[str, list[float]] = {name: [] for name in CANDIDATES}
        for _ in range(args.repeats):
            for name, fn in CANDIDATES.items():
                t0 = time.perf_counter()
                fn(path, chunk)
                times[name].append(time.perf_counter() - t0)
    finally:
        os.unlink(path)
    base = statistics.median(times["read only"])
    print(f"file {size / 2**30:.2f} GiB, reads of {args.chunk_mib} MiB, median of {args.repeats}")
    print(f"{'candidate':<14} {'GB/s':>7} {'time vs read only':>18}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:<14} {size / t / 1e9:7.2f} {t / base:17.2f}x")


if __name__ == "__main__":
    main()
