"""Benchmark: causal attention forward and backward on CPU, SDPA vs our "bmm" path.

    python bench/bench_attention.py                           # 1 thread, S 256..2048, bf16 + fp32
    python bench/bench_attention.py --seq 256 512 --dtypes bf16 --iters 20
    python bench/bench_attention.py --threads 2 --impls sdpa bmm bmm32 bmm128 bmm4096

Shape: B=8, H=4 query heads (G kv heads, default G=H), head dim 64 (`--batch --heads --kv-heads
--head-dim`). Implementations (deepseek_moe/model/attention.py):
- sdpa: `F.scaled_dot_product_attention(is_causal=True)` (torch's flash CPU kernel).
- bmm: `causal_bmm_attention` with its default query block (QUERY_BLOCK_ROWS rows).
- bmmN: the same with N query rows per block (bmm4096 = one full S x S score matrix).
Timing: fwd = the forward with autograd recording (as in training), bwd = `y.backward(dy)` alone.
Implementations are stepped round-robin (a load change on a shared machine hits all alike);
median over `--iters` steps after 2 warm-up steps. "vs sdpa" = sdpa fwd+bwd time / this
impl's fwd+bwd time (> 1 = faster than SDPA); "auto" = what attn_impl "auto" picks on CPU at
that shape. Table in bench/reports/benchmarks_cpu-2vcpu-epyc-avx512bf16_2026-11-24.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere without installing the package

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def _attention_fn(impl: str, enable_gqa: bool):
    import torch.nn.functional as F

    from deepseek_moe.model.kernels.causal_bmm_attention import causal_bmm_attention

    if impl == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    if impl == "bmm":
        return causal_bmm_attention
    if impl.startswith("bmm") and impl[3:].isdigit():
        rows = int(impl[3:])
        return lambda q, k, v: causal_bmm_attention(q, k, v, block_rows=rows)
    raise SystemExit(f"unknown impl {impl!r}: use sdpa, bmm or bmmN (N query rows per block)")


def _time_case(args, dtype_name: str, S: int) -> dict[str, tuple[float, float]]:
    """impl -> (median fwd ms, median bwd ms) at one dtype and sequence length."""
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    B, H, d = args.batch, args.heads, args.head_dim
    G = args.kv_heads or H
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, S, d, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(B, G, S, d, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(B, G, S, d, generator=gen).to(dtype).requires_grad_()
    dy = torch.randn(B, H, S, d, generator=gen).to(dtype)
    fns = {impl: _attention_fn(impl, G != H) for impl in args.impls}
    times: dict[str, tuple[list[float], list[float]]] = {impl: ([], []) for impl in args.impls}
    for step in range(2 + args.iters):
        for impl, fn in fns.items():
            q.grad = k.grad = v.grad = None
            t0 = time.perf_counter()
            y = fn(q, k, v)
            t1 = time.perf_counter()
            y.backward(dy)
            t2 = time.perf_counter()
            if step >= 2:
                times[impl][0].append(t1 - t0)
                times[impl][1].append(t2 - t1)
            del y
    return {impl: (1e3 * statistics.median(f), 1e3 * statistics.median(b)) for impl, (f, b) in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16", "fp32"])
    p.add_argument("--impls", nargs="+", default=["sdpa", "bmm"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="GQA kv heads (default = heads)")
    p.add_argument("--head-dim", type=int, default=64)
    args = p.parse_args()
    if "sdpa" not in args.impls:
        args.impls = ["sdpa"] + args.impls  # the ratio column needs it

    import torch

    from deepseek_moe.model.attention import choose_attn_impl

    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), B={args.batch} H={args.heads} "
        f"G={args.kv_heads or args.heads} d={args.head_dim}, median of {args.iters}"
    )
    print(
        f"{'impl':<6} {'dtype':<5} {'S':>5} {'fwd ms':>8} {'bwd ms':>8} {'total ms':>9} "
        f"{'vs sdpa':>8} {'auto':>5}"
    )
    for dtype_name in args.dtypes:
        for S in args.seq:
            res = _time_case(args, dtype_name, S)
            auto = choose_attn_impl(
                "auto", torch.device("cpu"), getattr(torch, DTYPES[dtype_name]), args.batch, args.heads, S
            )
            ref = sum(res["sdpa"])
            for impl, (fwd, bwd) in res.items():
                print(
                    f"{impl:<6} {dtype_name:<5} {S:>5} {fwd:>8.2f} {bwd:>8.2f} {fwd + bwd:>9.2f} "
                    f"{ref / (fwd + bwd):>7.2f}x {auto if impl == 'sdpa' else '':>5}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
