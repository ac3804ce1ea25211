"""Memory-mapped packed token files and their fixed-length windows.

The packed stream of a split (`train.bin`) is cut into windows of `seq_len + 1` tokens that
overlap by one token: window i covers tokens [i*seq_len, i*seq_len + seq_len + 1), so every
token except the first is a target exactly once. The tail shorter than a window is unused.
A window gives `input_ids = w[:-1]` and `labels = w[1:]` (already shifted next-token targets).
Windows cross document boundaries: documents are separated by EOS, as in GPT-style packing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deepseek_moe.data.meta import DTYPES, DataMeta
from deepseek_moe.errors import DataError


class PackedTokens:
    """A read-only memmap over one split's token file, checked against `meta.json`.

    Only the pages a batch touches are read, so every rank can open the whole corpus without
    copying it.
    """

    def __init__(self, meta: DataMeta, split: str):
        self.meta = meta
        self.split = split
        self.path: Path = meta.split_path(split)
        info = meta.splits[split]
        fix = (
            "re-run `python -m data_prep.prepare data=<preset> data.force=true` to rebuild "
            f"{self.path.parent}"
        )
        if not self.path.is_file():
            raise DataError(f"{self.path} is missing although meta.json lists it; {fix}")
        dtype = np.dtype(DTYPES[meta.dtype])
        expected = info.num_tokens * dtype.itemsize
        actual = self.path.stat().st_size
        if actual != expected:
            raise DataError(
                f"{self.path} is truncated or corrupt: {actual} bytes, meta.json "
                f"says {info.num_tokens} {meta.dtype} tokens = {expected} bytes; "
                f"{fix}"
            )
        if info.num_tokens == 0:
            raise DataError(f"{self.path} holds no tokens; {fix}")
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r")

    def __len__(self) -> int:
        return len(self.tokens)

    def num_windows(self, seq_len: int) -> int:
        """Number of full `seq_len + 1` windows (consecutive windows share one token)."""
        return max(0, (len(self.tokens) - 1) // seq_len)

    def windows(self, idx: np.ndarray, seq_len: int) -> np.ndarray:
        """Windows `idx` as an int64 array of shape [len(idx), seq_len + 1]."""
        out = np.empty((len(idx), seq_len + 1), dtype=np.int64)
        for row, i in enumerate(idx):
            start = int(i) * seq_len
            out[row] = self.tokens[start : start + seq_len + 1]
        return out
