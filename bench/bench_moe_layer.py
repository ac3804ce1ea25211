"""Benchmark: one MoE layer forward+backward, ours vs HF transformers vs DeepSpeed, on CPU.

    python bench/bench_moe_layer.py                 # hidden 512 shape, all implementations
    python bench/bench_moe_layer.py --tokens 1024 --iters 3 --impls ours_loop,hf_grouped_mm
    python bench/bench_moe_layer.py --shape 16b --dtype bf16 --no-memory \
        --impls ours_auto,ours_grouped_mm,hf_grouped_mm,matmul   # the 16B layer
    python bench/bench_moe_layer.py --tiny-step     # training step of the tiny preset

`--shape 16b`: the DeepSeekMoE 16B layer (hidden 2048, 64 routed experts of width 1408, top-6,
2 shared), 4096 tokens. `--dtype bf16` runs every implementation in bf16 (weights and
activations; the router stays fp32 inside ours).

Default shape: hidden 512, expert width 352, 64 routed experts top-6, 1 shared expert,
4096 tokens, fp32. Implementations, each timed in its OWN subprocess (so peak RSS is per
implementation) with identical weights copied from our layer:
- ours_auto / ours_loop / ours_grouped_mm: `MoELayer` (dropless) with that `experts_impl`
  (`auto` is the loop kernel on CPU).
- hf_grouped_mm: transformers `DeepseekV2Moe` with `config._experts_implementation =
  "grouped_mm"` (its fast path; "batched_mm" materialises per-token weights).
- deepspeed: `deepspeed.moe.layer.MoE(k=6, capacity_factor=1.0)` (drops tokens past capacity,
  GShard-style [T, E, C] dispatch masks) in a 1-process gloo group, plus the same shared
  SwiGLU expert added outside (DeepSpeed has no shared experts) so the work is comparable.
- matmul: the ceiling, one dense [T, D] x [D, F] matmul forward+backward with the same FLOPs as
  the MoE layer (F = 3 * H * (K + shared) + E).
Timing: all implementations are built in ONE process and stepped round-robin (so load changes
on a shared machine hit all alike); median per implementation. Memory: each implementation runs
2 steps in its own subprocess; we report its peak RSS and the peak above the RSS measured just
before the layer was built. Before timing counts, the first step checks that every exact
implementation (ours_*, hf_grouped_mm) gives HF's output and input gradient (stops otherwise).
Printed: ms/step, tokens/s, HF's time / its time (ours_loop's when HF is not run), its share of
the matmul ceiling (ceiling time / its time), the ceiling's GFLOP/s. Tables in bench/reports/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere without installing the package
_SHAPE_ARGS = ("tokens", "hidden", "expert_width", "experts", "top_k", "shared", "dtype", "threads")
IMPLS = ["ours_auto", "ours_loop", "ours_grouped_mm", "hf_grouped_mm", "deepspeed", "matmul"]
# implementations that compute exactly the layer (deepspeed drops tokens past its capacity)
EXACT = ("ours_auto", "ours_loop", "ours_grouped_mm", "hf_grouped_mm")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _our_layer(args, impl: str):
    import torch

    from deepseek_moe.config.model import MoEConfig
    from deepseek_moe.model.moe import MoELayer

    torch.manual_seed(0)
    cfg = MoEConfig(
        n_routed_experts=args.experts,
        n_shared_experts=args.shared,
        top_k=args.top_k,
        moe_intermediate_size=args.expert_width,
        aux_loss_alpha=0.001,
        experts_impl=impl,
    )
    layer = MoELayer(args.hidden, cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.02)
    return layer.to(_dtype(args))


def _dtype(args):
    import torch

    return torch.bfloat16 if args.dtype == "bf16" else torch.float32


def _build(args, impl: str):
    """Returns step(x_TD, gy_TD) -> None running one forward+backward."""
    import torch

    if impl.startswith("ours_"):
        layer = _our_layer(args, impl[len("ours_") :])

        def step(x, gy):
            y, aux = layer(x)
            torch.autograd.backward(
                [y] + list(aux.values()), [gy] + [torch.ones_like(v) for v in aux.values()]
            )
            return y.detach()

        return step, layer

    ours = _our_layer(args, "loop")
    if impl == "hf_grouped_mm":
        import transformers
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

        from deepseek_moe.model.hf_compat import copy_moe_weights_to_hf

        hf_cfg = transformers.DeepseekV2Config(
            hidden_size=args.hidden,
            moe_intermediate_size=args.expert_width,
            n_routed_experts=args.experts,
            num_experts_per_tok=args.top_k,
            n_shared_experts=args.shared,
            n_group=1,
            topk_group=1,
            topk_method="greedy",
            routed_scaling_factor=1.0,
            hidden_act="silu",
            num_attention_heads=4,
            num_key_value_heads=4,
        )
        hf_cfg._experts_implementation = "grouped_mm"
        layer = DeepseekV2Moe(hf_cfg).to(_dtype(args))
        copy_moe_weights_to_hf(ours, layer)
        del ours

        def step(x, gy):
            y = layer(x.unsqueeze(0)).squeeze(0)
            y.backward(gy)
            return y.detach()

        return step, layer

    if impl == "deepspeed":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
        import deepspeed
        from deepspeed.moe.layer import MoE

        from deepseek_moe.model.ffn import SwiGLU

        deepspeed.init_distributed(dist_backend="gloo")
        moe = MoE(
            args.hidden,
            SwiGLU(args.hidden, args.expert_width),
            num_experts=args.experts,
            ep_size=1,
            k=args.top_k,
            capacity_factor=1.0,
            eval_capacity_factor=1.0,
            drop_tokens=True,
        )
        moe.set_deepspeed_parallelism()
        shared = SwiGLU(args.hidden, args.shared * args.expert_width)
        with torch.no_grad():
            moe.deepspeed_moe.gate.wg.weight.copy_(ours.gate.weight)
            for e, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
                for proj, w in zip(("gate_proj", "up_proj", "down_proj"), ours.experts.expert_weights(e)):
                    getattr(expert, proj).weight.copy_(w)
            shared.load_state_dict(ours.shared_experts.state_dict())
        del ours
        moe.to(_dtype(args))
        shared.to(_dtype(args))
        moe.train()

        def step(x, gy):
            y, l_aux, _ = moe(x.unsqueeze(0))
            y = y.squeeze(0) + shared(x)
            torch.autograd.backward([y, l_aux], [gy, torch.ones_like(l_aux)])
            return y.detach()

        return step, torch.nn.ModuleList([moe, shared])

    if impl == "matmul":
        F = 3 * args.expert_width * (args.top_k + args.shared) + args.experts
        w = torch.nn.Parameter(torch.randn(args.hidden, F, dtype=_dtype(args)) * 0.02)
        gy_F = torch.ones(args.tokens, F, dtype=_dtype(args))

        def step(x, gy):
            (x @ w).backward(gy_F)

        return step, torch.nn.ParameterList([w])

    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")


def _zero_grads(x, module) -> None:
    x.grad = None
    for p in module.parameters():
        p.grad = None


def worker(args) -> None:
    """Memory run of ONE implementation in this process: warmup + one step, then peak RSS."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    x = torch.randn(args.tokens, args.hidden, dtype=_dtype(args), requires_grad=True)
    gy = torch.randn(args.tokens, args.hidden, dtype=_dtype(args))
    base = rss_mb()
    step, module = _build(args, args.worker)
    for _ in range(2):
        step(x, gy)
        _zero_grads(x, module)
    print(json.dumps({"impl": args.worker, "peak_rss_mb": _peak_rss_mb(), "base_rss_mb": base}))


def time_all(args, impls: list[str]) -> dict[str, list[float]]:
    """Time every implementation in THIS process, round-robin (one step of each in turn), so a
    load change on a shared machine hits all of them alike. Returns seconds per step."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    x = torch.randn(args.tokens, args.hidden, dtype=_dtype(args), requires_grad=True)
    gy = torch.randn(args.tokens, args.hidden, dtype=_dtype(args))
    built = {impl: _build(args, impl) for impl in impls}
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for i in range(args.warmup + args.iters):
        if i and not args.fixed_input:
            # NOTE: a new input each step, as in training, where the routing (so every expert's
            # row count, so each per-expert GEMM's shape) changes every step. With one fixed
            # input the shapes repeat and CPU bf16 paths that JIT a kernel per shape look faster
            # than they train. Every implementation gets the same input within a step.
            x = torch.randn(args.tokens, args.hidden, dtype=_dtype(args), requires_grad=True)
        first: dict[str, tuple] = {}
        for impl, (step, module) in built.items():
            t0 = time.perf_counter()
            y = step(x, gy)
            dt = time.perf_counter() - t0
            if i == 0 and impl in EXACT:
                first[impl] = (y, x.grad.clone())
            _zero_grads(x, module)
            if i >= args.warmup:
                times[impl].append(dt)
        if i == 0:
            check_equal(first, args.dtype)
    return times


def check_equal(results: dict[str, tuple], dtype: str) -> None:
    """Before any timing counts: every exact implementation's output and input gradient equal
    the reference's (hf_grouped_mm when run) up to the dtype's rounding; exits otherwise."""
    if len(results) < 2:
        return
    bound = 2e-2 if dtype == "bf16" else 1e-5  # relative Frobenius error
    ref = "hf_grouped_mm" if "hf_grouped_mm" in results else next(iter(results))
    errs = []
    for impl, (y, dx) in results.items():
        if impl == ref:
            continue
        e = [
            ((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip((y, dx), results[ref])
        ]
        errs.append(f"{impl}: output {e[0]:.1e}, input grad {e[1]:.1e}")
        if not all(v <= bound for v in e):  # also catches NaN
            sys.exit(
                f"{impl} differs from {ref} (relative error output {e[0]:.2e}, input grad "
                f"{e[1]:.2e} > {bound:g}): the timings would not compare the same function"
            )
    print(f"equal outputs and input grads vs {ref} (relative error <= {bound:g}): " + "; ".join(errs))


def tiny_step(args) -> None:
    """Tokens/s of one fwd+bwd+AdamW step of the deepseek_moe_tiny preset at 8 x 256."""
    import torch

    from deepseek_moe.model.transformer import DeepSeekMoEForCausalLM
    from deepseek_moe.summary import load_model_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_model_config("deepseek_moe_tiny")
    model = DeepSeekMoEForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    window = torch.randint(0, cfg.vocab_size, (8, cfg.max_seq_len + 1))
    times = []
    for i in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        out = model(window[:, :-1], window[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    s, b = statistics.median(times), min(times)
    tokens = 8 * cfg.max_seq_len
    print(
        f"deepseek_moe_tiny fwd+bwd+AdamW, micro-batch 8 x {cfg.max_seq_len}, {args.threads} threads: "
        f"median {s * 1e3:.0f} ms/step = {tokens / s:,.0f} tokens/s, best {b * 1e3:.0f} ms/step = "
        f"{tokens / b:,.0f} tokens/s ({args.iters} steps)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--expert-width", type=int, default=352)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--shared", type=int, default=1, help="shared experts")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--shape", choices=("16b",), help="preset shape (overrides the sizes)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--no-memory", action="store_true", help="skip the per-implementation RSS runs")
    p.add_argument(
        "--fixed-input",
        action="store_true",
        help="time every step on the same input (same routing each step; default: a new input per step)",
    )
    p.add_argument(
        "--tiny-step",
        action="store_true",
        help="instead: time a training step of the deepseek_moe_tiny preset",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.shape == "16b":
        args.hidden, args.expert_width, args.experts, args.top_k, args.shared = 2048, 1408, 64, 6, 2
    if args.worker:
        worker(args)
        return
    if args.tiny_step:
        tiny_step(args)
        return
    impls = args.impls.split(",")

    memory: dict[str, dict] = {}
    for impl in [] if args.no_memory else impls:
        cmd = [sys.executable, __file__, "--worker", impl] + [
            f"--{k.replace('_', '-')}={getattr(args, k)}" for k in _SHAPE_ARGS
        ]
        res = subprocess.run(
            cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        line = [l for l in res.stdout.splitlines() if l.startswith("{")]
        if res.returncode != 0 or not line:
            print(f"{impl}: memory run FAILED\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        memory[impl] = json.loads(line[-1])

    times = time_all(args, impls)
    sec = {impl: statistics.median(t) for impl, t in times.items()}
    best = {impl: min(t) for impl, t in times.items()}
    T = args.tokens
    print(
        f"MoE layer fwd+bwd, {args.dtype}, T={T} D={args.hidden} H={args.expert_width} "
        f"E={args.experts} K={args.top_k} +{args.shared} shared, {args.threads} threads, "
        f"{args.iters} round-robin steps, {'one fixed input' if args.fixed_input else 'a new input per step'}: "
        "median / best (best = least disturbed on a shared machine)"
    )
    # ratio column: the reference's time / this implementation's time (> 1: faster than it)
    ref = next((r for r in ("hf_grouped_mm", "ours_loop") if r in sec), next(iter(sec)))
    print(
        f"| impl | ms/step median / best | tokens/s median / best | {ref} time / its time "
        "median / best | share of matmul ceiling median / best | peak RSS MB | RSS over base MB |"
    )
    print("|---|---|---|---|---|---|---|")
    for impl in sec:
        m = memory.get(impl)
        mem = f"{m['peak_rss_mb']:.0f} | {m['peak_rss_mb'] - m['base_rss_mb']:.0f}" if m else "- | -"
        ceil = (
            f"{sec['matmul'] / sec[impl]:.0%} / {best['matmul'] / best[impl]:.0%}" if "matmul" in sec else "-"
        )
        print(
            f"| {impl} | {sec[impl] * 1e3:.0f} / {best[impl] * 1e3:.0f} "
            f"| {T / sec[impl]:,.0f} / {T / best[impl]:,.0f} "
            f"| {sec[ref] / sec[impl]:.2f}x / {best[ref] / best[impl]:.2f}x | {ceil} | {mem} |"
        )
    if "matmul" in sec:
        F = 3 * args.expert_width * (args.top_k + args.shared) + args.experts
        flop = 6 * T * args.hidden * F  # fwd (2) + bwd (4) FLOPs per multiply-add
        print(
            f"matmul ceiling: {flop / 1e12:.2f} TFLOP per step at {flop / sec['matmul'] / 1e9:,.0f} "
            f"GFLOP/s (median)"
        )


if __name__ == "__main__":
    main()
