"""Streaming writer of one task's token shards for one split (see `deepseek_moe/data/meta.py`).

Token ids go from the encoder's lists straight into the shard file as uint16/uint32 (a numpy
array per batch, never an int64 cache): scratch space is the output itself, memory one batch.
A shard is written under a temp name and renamed when it is complete (with its .idx, which is
renamed first), so a killed task never leaves a shard under its final name that is shorter
than its index says; the task's completion marker, written last, is what makes its shards
count (see `data_prep/tasks.py`).
"""

from __future__ import annotations

import array
import hashlib
import itertools
import os
from pathlib import Path
import numpy as np

from deepseek_moe.data.meta import DTYPES, INDEX_DTYPE, ShardMeta


def shard_name(split: str, task: int, shard: int) -> str:
    """Path of a shard inside the data directory; sorts in stream order."""
    return f"{split}/{task:05d}-{shard:05d}.bin"


class ShardWriter:
    """Appends documents (lists of ids, EOS included) to `split` shards of task `task`."""

    def __init__(self, root: Path, split: str, task: int, dtype: str, shard_tokens: int):
        self.root, self.split, self.task = root, split, task
        self.dtype = np.dtype(DTYPES[dtype])
        self.shard_tokens = shard_tokens
        self.shards: list[ShardMeta] = []
        self._file = None
        (root / split).mkdir(parents=True, exist_ok=True)

    def _open(self) -> None:
        self._name = shard_name(self.split, self.task, len(self.shards))
        self._tmp = self.root / f"{self._name}.tmp-{os.getpid()}"
        self._file = open(self._tmp, "wb")
        self._sha = hashlib.sha256()
        self._ends = array.array("Q")  # 8 bytes per document, bounded by shard_tokens
        self._tokens = 0

    def write(self, docs: list[list[int]]) -> None:
        """Append `docs` (each ending in EOS) in order; a shard closes once it holds at least
        `shard_tokens` tokens, at a document boundary."""
        i = 0
        while i < len(docs):
            if self._file is None:
                self._open()
            # Take documents up to the one that fills the shard.
            j, room = i, self.shard_tokens - self._tokens
            while j < len(docs) and (room > 0 or j == i):
                room -= len(docs[j])
                j += 1
            lengths = [len(d) for d in docs[i:j]]
            count = sum(lengths)
            ids = np.fromiter(itertools.chain.from_iterable(docs[i:j]), dtype=self.dtype, count=count)
            data = ids.tobytes()
            self._file.write(data)
            self._sha.update(data)
            self._ends.extend(itertools.accumulate(lengths, initial=self._tokens))
            del self._ends[-(j - i) - 1]  # `initial`: the previous end, already recorded
            self._tokens += count
            if self._tokens >= self.shard_tokens:
                self._close()
            i = j

    def _close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        name = self.root / self._name
        index_tmp = self.root / f"{self._name[: -len('.bin')]}.idx.tmp-{os.getpid()}"
        np.asarray(self._ends, dtype=INDEX_DTYPE).tofile(index_tmp)
        os.replace(index_tmp, name.with_suffix(".idx"))
        os.replace(self._tmp, name)
        self.shards.append(
            ShardMeta(
                file=self._name,
                num_tokens=self._tokens,
                num_documents=len(self._ends),
                sha256=self._sha.hexdigest(),
            )
        )

    def close(self) -> list[ShardMeta]:
        """Finish the open shard (if it holds anything); returns this task's shards."""
        if self._file is not None:
            if self._tokens:
                self._close()
            else:
                self.abort()
        return self.shards

    def abort(self) -> None:
        """Drop the open shard's temp file (on an error)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            Path(self._tmp).unlink(missing_ok=True)


def remove_task_files(root: Path, task: int, splits) -> None:
    """Delete every shard, index and temp file task `task` left in `root` (a rerun starts
    the task over: its output is a pure function of its documents)."""
    for split in splits:
        d = root / split
        if d.is_dir():
            for p in d.glob(f"{task:05d}-*"):
                p.unlink()
