"""The evaluation sample: the trainer's validation windows exactly (EvalLoader is the reference),
and a split into every rank's batches that reads each sample window once, whatever the layout."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from deepseek_moe.data import EvalLoader, load_meta
from deepseek_moe.data.packed import PackedTokens
from deepseek_moe.evaluate.sample import rank_batches, sample_windows, trainer_sample
from tests.evaluate.conftest import data_dir


@pytest.mark.parametrize(
    "seq_len, micro, world, batches",
    [
        (64, 4, 2, 2),  # the usual case: 4 batches of 4, interleaved over 2 ranks
        (64, 5, 3, 3),
        (30000, 4, 2, 4),  # a split of 4 windows: the micro batch shrinks to 2, one batch
        (100000, 2, 3, 1),  # 1 window for 3 ranks: the index wraps, every rank reads it
    ],
)
def test_trainer_sample_is_what_the_trainers_eval_loader_reads(tiny_data, seq_len, micro, world, batches):
    meta = load_meta(data_dir(tiny_data))
    tokens = PackedTokens(meta, "val")
    sample = trainer_sample(
        tokens.num_windows(seq_len), micro_batch_size=micro, world_size=world, eval_batches=batches
    )
    for rank in range(world):
        loader = EvalLoader(
            meta, seq_len=seq_len, micro_batch_size=micro, dp_rank=rank, dp_world=world, num_batches=batches
        )
        ours = list(
            rank_batches(sample, micro_batch_size=loader.micro_batch_size, rank=rank, world_size=world)
        )
        assert len(ours) == len(loader)
        for (ids, valid), batch in zip(ours, loader):
            assert valid == loader.micro_batch_size
            windows = torch.from_numpy(tokens.windows(ids, seq_len))
            assert torch.equal(windows[:, :-1], batch["input_ids"])


@pytest.mark.parametrize("count", [1, 7, 16, 33])
def test_every_layout_reads_each_sample_window_once(count):
    sample = sample_windows(1000, count)
    assert len(sample) == count and (np.diff(sample) > 0).all()  # spread, no repeat
    for world in (1, 2, 3):
        for micro in (1, 3, 4, 8):
            per_rank = [
                list(rank_batches(sample, micro_batch_size=micro, rank=r, world_size=world))
                for r in range(world)
            ]
            assert len({len(b) for b in per_rank}) == 1  # the same number of forwards on every rank
            read = Counter()
            for batches in per_rank:
                for ids, valid in batches:
                    assert len(ids) == micro and 0 <= valid <= micro
                    read.update(ids[:valid].tolist())
            assert read == Counter(sample.tolist()), (world, micro)
