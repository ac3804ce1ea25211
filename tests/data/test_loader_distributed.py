"""The loader in real gloo processes: gathered rank batches equal the 1-process global batch,
and the eval loader gives every rank the same batch count (a mismatch would hang collectives)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from deepseek_moe.data.loader import build_eval_loader, build_train_loader
from deepseek_moe.testing.distributed import run_distributed

S, G = 8, 8


def _gathered_global_batches(rank, world, data_dir, steps):
    loader = build_train_loader(
        data_dir, seq_len=S, global_batch_size=G, micro_batch_size=2, dp_rank=rank, dp_world=world, seed=5
    )
    out = []
    for _ in range(steps):
        mine = torch.cat([next(loader)["input_ids"] for _ in range(loader.accum_steps)])
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine)
        out.append(torch.cat(parts))
    n_eval = torch.tensor([0])
    for _ in build_eval_loader(
        data_dir, seq_len=S, micro_batch_size=3, dp_rank=rank, dp_world=world, num_batches=50
    ):
        dist.all_reduce(torch.zeros(1))  # as the trainer's eval loop does after each batch
        n_eval += 1
    return out, int(n_eval)


def test_two_ranks_see_the_one_rank_global_batches(make_prepared):
    meta = make_prepared(40 * S + 1, 20 * S + 1)
    steps = 7  # crosses the epoch boundary (5 steps per epoch)
    ref = build_train_loader(meta, seq_len=S, global_batch_size=G, micro_batch_size=8, seed=5)
    expected = [next(ref)["input_ids"] for _ in range(steps)]
    results = run_distributed(_gathered_global_batches, 2, str(meta.dir), steps, timeout=120)
    for batches, n_eval in results:
        assert all(torch.equal(a, b) for a, b in zip(batches, expected))
        assert n_eval == 20 // (3 * 2)
