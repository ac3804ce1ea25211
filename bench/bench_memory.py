"""Benchmark: peak memory and speed of a training step with and without activation
checkpointing, and the memory plan's prediction of the peak.

    python bench/bench_memory.py                        # tiny preset at seq 1024, micro-batch 8
    python bench/bench_memory.py --seq-len 512 --iters 3 --dtype bf16
    python bench/bench_memory.py --override num_layers=12   # deeper: blocks outweigh the logits
    python bench/bench_memory.py --iters 0 --loss-chunk-tokens 1024   # the chunked LM loss

Memory: each mode ("none", "full") runs in its own subprocess: build the model (AdamW in the
parameters' dtype, no DeepSpeed), then 2 training steps (gradients zeroed, not freed, between
them, so they stay allocated as the plan counts them); we report peak RSS minus the RSS after
the build (the step's own memory: gradients, optimizer state, activations and transients) next
to the plan's activations + logits gradient + recompute (`deepseek_moe.memory_plan`, ZeRO-0,
one rank) plus this run's gradients and AdamW state, and the ratio measured / planned.
Each mode is measured three times:
- "tensors": glibc's mmap threshold fixed at 64 KiB (`MALLOC_MMAP_THRESHOLD_`), so every tensor
  is its own mapping and RSS follows the live tensor bytes, and oneDNN off
  (`torch.backends.mkldnn.enabled = False`): the plan's quantity, compared with it. On a GPU the
  same quantity is `torch.cuda.max_memory_allocated`.
- "with oneDNN": the same threshold, oneDNN on (torch's default; it runs bf16 matmuls on CPU).
  In bf16 oneDNN keeps memory outside torch's tensors that grows with depth (what it holds was
  not traced); library workspace, which the plan leaves out like cuBLAS's. Reported, not compared.
- "glibc default": glibc raises its mmap threshold up to 32 MiB after the first large free, so
  smaller tensors then come from the heap, whose freed pages stay resident: RSS there is the
  heap's high-water mark, which the plan does not model (reported, not compared).
In fp32, matmuls use MKL whether oneDNN is on or not. With oneDNN off, bf16 matmuls fall back
to torch's own (slow) kernels: the "tensors" runs of bf16 take minutes.
Speed: both modes stepped round-robin in ONE process (so load changes on a shared machine hit
both alike); tokens/s median and "full"'s cost (`--iters 0` skips it). Attention is forced to
SDPA (the GPU path the plan accounts for); experts use the default path for the device.
`--no-memory` skips the memory runs.
`--loss-chunk-tokens N` (N > 0) runs every memory run and the plan with the chunked LM loss
(`trainer.loss_chunk_tokens`); the speed loop then steps each mode with and without it,
round-robin, and prints the chunked loss's tokens/s cost per mode.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.bench_moe_layer import rss_mb  # noqa: E402 (after the sys.path line)

MODES = ("none", "full")


def _cfg(args):
    from deepseek_moe.summary import load_model_config

    return load_model_config(args.model, [f"max_seq_len={args.seq_len}", "attn_impl=sdpa", *args.override])


def _build(args, mode: str, loss_chunk_tokens: int):
    import torch

    from deepseek_moe.model.transformer import DeepSeekMoEForCausalLM

    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(
        _cfg(args), activation_checkpointing=mode, loss_chunk_tokens=loss_chunk_tokens
    ).to(_torch_dtype(args))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    window = torch.randint(0, model.cfg.vocab_size, (args.micro_batch, args.seq_len + 1), generator=g)

    def step():
        out = model(window[:, :-1], window[:, 1:])
        out.loss.backward()
        del out
        opt.step()
        opt.zero_grad(set_to_none=False)

    return step


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.backends.mkldnn.enabled = args.onednn == "on"
    step = _build(args, args.worker, args.loss_chunk_tokens)
    base = rss_mb()
    for _ in range(2):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": args.worker, "peak_over_build_mb": peak - base}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deepseek_moe_tiny")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="model field override, e.g. --override num_layers=12 (repeatable)",
    )
    p.add_argument(
        "--loss-chunk-tokens",
        type=int,
        default=0,
        help="0: the LM head's full logits; N > 0: the chunked LM loss, N tokens per chunk",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the memory runs (speed only)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--onednn", choices=("on", "off"), default="on", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.loss_chunk_tokens < 0:
        p.error(f"--loss-chunk-tokens={args.loss_chunk_tokens} must be >= 0 (0 = no chunking)")
    if args.worker:
        worker(args)
        return
    import torch

    from deepseek_moe.memory_plan import memory_plan
    from deepseek_moe.model.experts import resolve_impl

    cfg = _cfg(args)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    impl = resolve_impl(cfg.moe.experts_impl, torch.device("cpu"), dtype) if cfg.moe else "grouped_mm"
    measured: dict[tuple[str, str], float] = {}
    one_mapping_per_tensor = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    runs = {
        "tensors": (one_mapping_per_tensor, "off"),
        "onednn": (one_mapping_per_tensor, "on"),
        "glibc": ({}, "on"),
    }
    for mode in [] if args.no_memory else MODES:
        flags = [
            f"--{k.replace('_', '-')}={getattr(args, k)}"
            for k in ("model", "seq_len", "micro_batch", "dtype", "threads", "loss_chunk_tokens")
        ]
        flags += [f"--override={o}" for o in args.override]
        for run, (extra_env, onednn) in runs.items():
            env = {**os.environ, "PYTHONPATH": str(ROOT), **extra_env}
            if not extra_env:
                env.pop("MALLOC_MMAP_THRESHOLD_", None)
            res = subprocess.run(
                [sys.executable, __file__, "--worker", mode, f"--onednn={onednn}", *flags],
                cwd=ROOT,
                capture_output=True,
                text=True,
                env=env,
            )
            lines = [l for l in res.stdout.splitlines() if l.startswith("{")]
            if res.returncode or not lines:
                sys.exit(f"memory run {mode} ({run}) failed:\n{res.stderr[-2000:]}")
            measured[(mode, run)] = json.loads(lines[-1])["peak_over_build_mb"]

    chunks = sorted({0, args.loss_chunk_tokens})  # the plain loss as the speed baseline
    tps = {(mode, c): float("nan") for mode in MODES for c in chunks}
    if args.iters:
        torch.set_num_threads(args.threads)
        steps = {key: _build(args, *key) for key in tps}
        times = {key: [] for key in tps}
        for i in range(args.warmup + args.iters):
            for key, step in steps.items():
                t0 = time.perf_counter()
                step()
                if i >= args.warmup:
                    times[key].append(time.perf_counter() - t0)
        tokens = args.micro_batch * args.seq_len
        tps = {key: tokens / statistics.median(t) for key, t in times.items()}
    chunk = args.loss_chunk_tokens

    # gradients + AdamW m and v, all in the parameters' dtype: what this plain torch run holds
    # (the plan's own grads/optimizer assume DeepSpeed's fp32 masters in bf16)
    n_bytes = cfg.num_params() * (2 if args.dtype == "bf16" else 4)
    print(
        f"{args.model} {' '.join(args.override)}, micro-batch {args.micro_batch} x seq {args.seq_len}, {args.dtype}, "
        f"{args.threads} threads, experts {impl}, attention sdpa, loss chunk tokens {chunk or 'off'}, "
        f"{args.iters} round-robin steps"
    )
    print(
        "| activation checkpointing | peak over build MB, tensors (oneDNN off) | planned MB (grads + "
        "AdamW + activations + logits grad + recompute) | tensors / planned | peak over build MB, "
        "with oneDNN | peak over build MB, glibc default | tokens/s median |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode in MODES:
        b = memory_plan(
            cfg,
            micro_batch=args.micro_batch,
            seq_len=args.seq_len,
            precision=args.dtype,
            activation_checkpointing=mode,
            zero_stage=0,
            experts_impl=impl,
            loss_chunk_tokens=chunk,
        )["bytes"]
        planned = (3 * n_bytes + b["activations"] + b["logits_grad"] + b["recompute"]) / 2**20
        tensors, onednn, glibc = (measured.get((mode, r), float("nan")) for r in runs)
        print(
            f"| {mode} | {tensors:,.0f} | {planned:,.0f} | {tensors / planned:.2f} "
            f"| {onednn:,.0f} | {glibc:,.0f} | {tps[mode, chunk]:,.0f} |"
        )
    ratio = {
        r: measured.get(("full", r), float("nan")) / measured.get(("none", r), float("nan")) for r in runs
    }
    print(
        f"full vs none: peak tensors {ratio['tensors'] - 1:+.0%}, with oneDNN {ratio['onednn'] - 1:+.0%}, "
        f"glibc default {ratio['glibc'] - 1:+.0%}, tokens/s {tps['full', chunk] / tps['none', chunk] - 1:+.0%}"
    )
    if chunk:
        print(
            f"loss chunks of {chunk} vs the full logits, tokens/s (same loop): "
            + ", ".join(f"{mode} {tps[mode, chunk] / tps[mode, 0] - 1:+.0%}" for mode in MODES)
        )


def _torch_dtype(args):
    import torch

    return torch.bfloat16 if args.dtype == "bf16" else torch.float32


if __name__ == "__main__":
    main()
