"""Benchmark: launch cost of the training window order at pretraining scale, without the data.

    python bench/bench_window_order.py                         # 5e8 windows (2T tokens / 4096)
    python bench/bench_window_order.py --windows 5e8 --global-batch 4608 --old-windows 5e7

A `TrainLoader` over a simulated split of `--windows` windows (a stand-in for `PackedTokens`
that holds no tokens) is built, resumed in the middle of epoch 3 and asked for global batches.
Printed: seconds and peak Python-heap bytes (tracemalloc, numpy arrays included) for
1. construction + `load_state_dict` (what every rank does at launch),
2. the first global batch's window ids, and the mean per global batch over `--batches`,
3. the previous order (a shuffled `arange` of every window) at `--old-windows`, for scale: its
   memory is 4 bytes per window per rank, its time linear in the windows.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import deepseek_moe.data.loader as loader_mod  # noqa: E402


class SimulatedTokens:
    """The PackedTokens interface over `windows * seq_len + 1` tokens that do not exist."""

    def __init__(self, meta, split):
        self.path = Path(f"<simulated {split}>")
        self._len = meta.simulated_windows * meta.seq_len + 1

    def __len__(self) -> int:
        return self._len

    def num_windows(self, seq_len: int) -> int:
        return (self._len - 1) // seq_len

    def windows(self, idx, seq_len):
        return np.zeros((len(idx), seq_len + 1), dtype=np.int64)


class SimulatedMeta:
    fingerprint = "simulated"

    def __init__(self, windows: int, seq_len: int):
        self.simulated_windows, self.seq_len = windows, seq_len


def measure(fn):
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, dt, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=float, default=5e8)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--global-batch", type=int, default=4608)
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--old-windows", type=float, default=5e7)
    args = ap.parse_args()
    n, s, g = int(args.windows), args.seq_len, args.global_batch
    loader_mod.PackedTokens = SimulatedTokens  # the loader's only access to the tokens
    meta = SimulatedMeta(n, s)

    def launch():
        ld = loader_mod.TrainLoader(
            meta, seq_len=s, global_batch_size=g, micro_batch_size=1, dp_rank=3, dp_world=args.world, seed=1
        )
        state = ld.state_dict()
        state.update(epoch=3, step_in_epoch=ld.steps_per_epoch // 2, micro_step=0)
        ld.load_state_dict(state)
        return ld

    ld, t_launch, m_launch = measure(launch)
    print(f"windows {n:,} (seq_len {s}: {n * s / 1e12:.2f}T tokens), global batch {g}, world {args.world}")
    print(f"launch (build + resume mid-epoch 3): {t_launch:.4f} s, peak heap {m_launch / 1e6:.3f} MB")
    step = ld.steps_per_epoch // 2
    ids, t_first, m_first = measure(lambda: ld.global_batch_windows(3, step))
    assert len(set(ids.tolist())) == g
    print(f"first global batch ids: {t_first * 1e3:.2f} ms, peak heap {m_first / 1e6:.3f} MB")
    t0 = time.perf_counter()
    for j in range(args.batches):
        ld.global_batch_windows(3, step + 1 + j)
    per = (time.perf_counter() - t0) / args.batches
    print(f"per global batch ids (mean of {args.batches}): {per * 1e3:.2f} ms")

    m = int(args.old_windows)

    def old():
        perm = np.arange(m, dtype=np.uint32)
        np.random.default_rng([1, 3]).shuffle(perm)
        return perm[:1]

    _, t_old, m_old = measure(old)
    print(
        f"previous order (shuffled arange) at {m:,} windows: {t_old:.2f} s, peak heap "
        f"{m_old / 1e6:.0f} MB; linear: {t_old * n / m:.0f} s and {m_old * n / m / 1e9:.1f} GB "
        f"per rank at {n:,} windows"
    )


if __name__ == "__main__":
    main()
