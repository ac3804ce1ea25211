"""Benchmark: the data path on the default corpus (python_stdlib), ours vs simple peers.

    python bench/bench_data.py                      # prepare into a temp dir + loader speed
    python bench/bench_data.py --seq-len 2048 --micro-batch 4 --iters 300

1. prepare: the full default preset (`python -m data_prep.prepare` with a temp out_dir), wall
   time and its phases as printed by `prepare`.
2. tokenize: encoding every stdlib document with the prepared tokenizer, ours
   (`datasets.map(batched=True, num_proc=2)`, what `prepare` runs) vs the peer baseline, a
   plain single-process `for doc: sp.encode(doc)` loop. Printed: seconds and the ratio.
3. loader: micro-batches/s of our `TrainLoader` (seeded permutation of windows, resumable)
   vs nanoGPT's `get_batch` (random offsets into the same memmap, `torch.stack`). Same
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
from data_prep.sources import load_documents  # noqa: E402
from deepseek_moe.config.data import DataConfig  # noqa: E402
from deepseek_moe.data.loader import build_train_loader  # noqa: E402
from deepseek_moe.data.meta import load_meta  # noqa: E402
from deepseek_moe.data.tokenizer import Tokenizer  # noqa: E402


def bench_tokenize(meta, tmp: Path) -> None:
    from data_prep.prepare import _EncodeWithEOS

    cfg = DataConfig()
    docs = load_documents(cfg, tmp / "cache").dataset
    texts = docs["text"]
    tok = Tokenizer(meta.tokenizer_path)
    t0 = time.perf_counter()
    peer = [tok.sp.encode(t) + [tok.eos_id] for t in texts]
    t_peer = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = docs.map(
        _EncodeWithEOS(tok),
        batched=True,
        batch_size=64,
        num_proc=2,
        remove_columns=["text"],
        cache_file_name=str(tmp / "cache" / "tok.arrow"),
    )
    t_ours = time.perf_counter() - t0
    assert sum(len(x) for x in peer) == sum(len(x) for x in ours["ids"])
    print(
        f"tokenize  {len(texts)} docs: ours (datasets.map, 2 procs) {t_ours:.2f}s, "
        f"peer (spm for-loop, 1 proc) {t_peer:.2f}s, ratio peer/ours = {t_peer / t_ours:.2f}x"
    )


def bench_loader(meta, seq_len: int, micro: int, iters: int) -> None:
    loader = build_train_loader(
        meta, seq_len=seq_len, global_batch_size=micro, micro_batch_size=micro, seed=0
    )
    data = np.memmap(meta.split_path("train"), dtype=np.uint16, mode="r")
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
        bench_tokenize(meta, tmp)
        bench_loader(meta, args.seq_len, args.micro_batch, args.iters)


if __name__ == "__main__":
    main()
