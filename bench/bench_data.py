"""Benchmark: the data path on the default corpus (python_stdlib), ours vs simple peers.

    python bench/bench_data.py                      # prepare into a temp dir + loader speed
    python bench/bench_data.py --seq-len 2048 --micro-batch 4 --iters 300

1. prepare: the full default preset (`python -m data_prep.prepare` with a temp out_dir), wall
   time and its phases as printed by `prepare`.
   (Preparation throughput against the tokenizer's own batch encoding: bench_prepare.py.)
2. loader: micro-batches/s of our `TrainLoader` (seeded permutation of windows, resumable)
   vs nanoGPT's `get_batch` (random offsets into a memmap of the first shard, `torch.stack`). Same
   batch shape; both read from the page cache. Printed: batches/s and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_prep.prepare import prepare  # noqa: E402
from deepseek_moe.config.data import DataConfig  # noqa: E402
from deepseek_moe.data.loader import build_train_loader  # noqa: E402
from deepseek_moe.data.meta import load_meta  # noqa: E402
from deepseek_moe.data.packed import PackedTokens  # noqa: E402


def bench_loader(meta, seq_len: int, micro: int, iters: int) -> None:
    loader = build_train_loader(
        meta, seq_len=seq_len, global_batch_size=micro, micro_batch_size=micro, seed=0
    )
    data = PackedTokens(meta, "train").shard(0)
    rng = np.random.default_rng(0)

    def get_batch():  # nanoGPT train.py
        ix = rng.integers(0, len(data) - seq_len - 1, micro)
        x = torch.stack([torch.from_numpy(data[i : i + seq_len].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + seq_len].astype(np.int64)) for i in ix])
        return x, y

    results = {}
    for name, fn in (("ours", lambda: next(loader)), ("nanogpt", get_batch)):
        for _ in range(10):
            fn()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        results[name] = iters / (time.perf_counter() - t0)
    tok_s = results["ours"] * micro * seq_len
    print(
        f"loader    B={micro} S={seq_len}: ours {results['ours']:.0f} batches/s "
        f"({tok_s / 1e6:.1f}M tokens/s), nanoGPT get_batch {results['nanogpt']:.0f} batches/s, "
        f"ratio ours/peer = {results['ours'] / results['nanogpt']:.2f}x"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=200)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        out = prepare(DataConfig(out_dir=str(tmp / "python_stdlib")))
        meta = load_meta(out)
        n = sum(s.num_tokens for s in meta.splits.values())
        print(
            f"prepare   python_stdlib: {time.perf_counter() - t0:.1f}s wall, {n:,} tokens "
            f"({meta.splits['train'].num_tokens:,} train / {meta.splits['val'].num_tokens:,} "
            f"val), vocab {meta.vocab_size}"
        )
        bench_loader(meta, args.seq_len, args.micro_batch, args.iters)


if __name__ == "__main__":
    main()
