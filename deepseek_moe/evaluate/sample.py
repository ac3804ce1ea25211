"""Which windows an evaluation reads, and how they are split into every rank's micro-batches.

    sample = trainer_sample(num_windows, micro_batch_size=B, world_size=W, eval_batches=n)
    sample = sample_windows(num_windows, count)          # --sequences N; --all: np.arange(N)
    for ids, valid in rank_batches(sample, micro_batch_size=b, rank=r, world_size=w): ...

The sample is a list of window ids (repeats allowed) fixed before any rank is involved: the
trainer's validation sample (`data.loader.eval_layout` + `spread_windows`, the formula its
`EvalLoader` uses) or N windows spread the same way. It never depends on the evaluating world
size or micro batch; only the split into batches does, and a token-weighted mean of the batch
losses does not see that split.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from deepseek_moe.data.loader import eval_layout, spread_windows


def trainer_sample(
    num_windows: int, *, micro_batch_size: int, world_size: int, eval_batches: int
) -> np.ndarray:
    """The windows the trainer's validation loader reads at every eval, in slot order: its
    micro batch and batch count after the small-split adjustments, times its world size."""
    b, n, _ = eval_layout(
        num_windows, micro_batch_size=micro_batch_size, dp_world=world_size, num_batches=eval_batches
    )
    return sample_windows(num_windows, n * b * world_size)


def sample_windows(num_windows: int, count: int) -> np.ndarray:
    """`count` windows spread evenly over the split (slot j -> window j * N // count)."""
    return spread_windows(np.arange(count, dtype=np.int64), count, num_windows)


def rank_batches(
    sample: np.ndarray, *, micro_batch_size: int, rank: int, world_size: int
) -> Iterator[tuple[np.ndarray, int]]:
    """This rank's micro-batches as (B window ids, how many of them count).

    Batch j is sample[j*B:(j+1)*B] and goes to rank j % W: the trainer's own layout, so with
    its world size and micro batch every rank reads exactly the trainer's batches. Every rank
    yields the same number of batches (the all-to-alls of expert parallelism pair up forwards):
    a short last batch is padded to B with its first window, and a rank with no batch left gets
    one of the sample's first window; the padding rows do not count (`valid` excludes them)."""
    b = micro_batch_size
    batches = math.ceil(len(sample) / b)
    for j in range(rank, math.ceil(batches / world_size) * world_size, world_size):
        ids = sample[j * b : (j + 1) * b]
        valid = len(ids)
        pad = ids[:1] if valid else sample[:1]
        yield np.concatenate([ids, np.repeat(pad, b - valid)]), valid
