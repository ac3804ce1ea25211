"""Memory-mapped token shards read as one packed stream, and its fixed-length windows.

A split is the concatenation of its shards in manifest order (see `meta.py`). That stream is
cut into windows of `seq_len + 1` tokens that overlap by one token: window i covers tokens
[i*seq_len, i*seq_len + seq_len + 1), so every token except the first is a target exactly
once. The tail shorter than a window is unused. A window gives `input_ids = w[:-1]` and
`labels = w[1:]` (already shifted next-token targets). Windows cross document boundaries
(documents are separated by EOS, as in GPT-style packing) and shard boundaries alike, so the
windows do not depend on how the preparation cut the stream into shards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deepseek_moe.data.meta import DTYPES, INDEX_DTYPE, DataMeta
from deepseek_moe.errors import DataError

# Each open memmap holds a file descriptor (CPython's mmap keeps a dup of it), and a corpus of
# 2T tokens has thousands of shards: keep only the most recently used ones open.
MAX_OPEN_SHARDS = 128


class PackedTokens:
    """Read-only memmaps over one split's shards, checked against `meta.json` (sizes only).

    Only the pages a batch touches are read, so every rank can open the whole corpus without
    copying it; at most `MAX_OPEN_SHARDS` shards are mapped at a time (opened on first use).
    `path` is the split's directory (named in errors about the split).
    """

    def __init__(self, meta: DataMeta, split: str):
        self.meta = meta
        self.split = split
        self.path: Path = meta.split_dir(split)
        info = meta.splits[split]
        fix = f"re-run `python -m data_prep.prepare data=<preset> data.force=true` to rebuild {meta.dir}"
        dtype = self._dtype = np.dtype(DTYPES[meta.dtype])
        self._paths: list[Path] = []  # non-empty shards (numpy cannot map an empty file)
        sizes = []
        for shard in info.shards:
            path = meta.dir / shard.file
            if not path.is_file():
                raise DataError(f"{path} is missing although meta.json lists it; {fix}")
            expected, actual = shard.num_tokens * dtype.itemsize, path.stat().st_size
            if actual != expected:
                raise DataError(
                    f"{path} is truncated or corrupt: {actual} bytes, meta.json says "
                    f"{shard.num_tokens} {meta.dtype} tokens = {expected} bytes; {fix}"
                )
            if shard.num_tokens:
                self._paths.append(path)
                sizes.append(shard.num_tokens)
        self._open: dict[int, np.memmap] = {}  # shard index -> map, least recently used first
        # starts[j] = stream offset of shard j; starts[-1] = total tokens.
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        if self.starts[-1] != info.num_tokens:
            raise DataError(
                f"{self.path}: its shards hold {self.starts[-1]} tokens, meta.json says {info.num_tokens}; {fix}"
            )
        if info.num_tokens == 0:
            raise DataError(f"{self.path} holds no tokens; {fix}")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def num_windows(self, seq_len: int) -> int:
        """Number of full `seq_len + 1` windows (consecutive windows share one token)."""
        return max(0, (len(self) - 1) // seq_len)

    @property
    def num_shards(self) -> int:
        return len(self._paths)

    def shard(self, j: int) -> np.memmap:
        """The tokens of (non-empty) shard j, mapped on first use."""
        m = self._open.pop(j, None)
        if m is None:
            if len(self._open) >= MAX_OPEN_SHARDS:
                del self._open[next(iter(self._open))]  # unmapped once no view holds it
            m = np.memmap(self._paths[j], dtype=self._dtype, mode="r")
        self._open[j] = m
        return m

    def read(self, start: int, length: int, out: np.ndarray) -> None:
        """Copy stream tokens [start, start + length) into `out` (crossing shards as needed)."""
        j = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < length:
            offset = start + done - int(self.starts[j])
            piece = self.shard(j)[offset : offset + length - done]
            out[done : done + len(piece)] = piece
            done += len(piece)
            j += 1

    def windows(self, idx: np.ndarray, seq_len: int) -> np.ndarray:
        """Windows `idx` as an int64 array of shape [len(idx), seq_len + 1]."""
        out = np.empty((len(idx), seq_len + 1), dtype=np.int64)
        for row, i in enumerate(idx):
            self.read(int(i) * seq_len, seq_len + 1, out[row])
        return out

    def document_ends(self) -> np.ndarray:
        """Stream offset just past each document (after its EOS), uint64 [num_documents], read
        from the shards' .idx files (O(documents) memory: for tools, not for every launch)."""
        info = self.meta.splits[self.split]
        ends = [
            np.fromfile(self.meta.dir / shard.index_file, dtype=INDEX_DTYPE) + np.uint64(start)
            for shard, start in zip(info.shards, _shard_starts(info))
        ]
        return np.concatenate(ends) if ends else np.zeros(0, np.uint64)


def _shard_starts(info) -> list[int]:
    starts, total = [], 0
    for shard in info.shards:
        starts.append(total)
        total += shard.num_tokens
    return starts
