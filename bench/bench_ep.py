"""Benchmark: expert parallelism (EP=2) vs data parallelism (EP=1 x DP=2) on 2 CPU processes.

    python bench/bench_ep.py                         # both parts, defaults below
    python bench/bench_ep.py --part layer --tokens 1024 --iters 4
    python bench/bench_ep.py --part model --iters 4

Part "layer": one `MoELayer` with the issue's DeepSpeed comparison shape (hidden 512, 64 routed
experts top-6, expert width 352, 1 shared expert, 2048 tokens per rank, fp32). A training step
= forward + backward + gradient sync:
- dp2: every rank holds all 64 experts (LocalDispatcher); all grads all-reduced over 2 ranks;
- ep2_M2 / ep2_M1: `parallelize_moe(.., 2)`: 32 experts per rank, all-to-all dispatch; only
  the router/shared-expert grads are all-reduced (expert-data-parallel group has size 1).
  M2 = plain top-6 over 2 rank-groups; M1 = device-limited routing, each token to ONE rank.
Part "model": the tiny preset (conf/model/deepseek_moe_tiny.yaml) trained through a DeepSpeed
engine (ZeRO-1, AdamW), seq 256 x micro-batch 8 = 2048 tokens per rank, EP=1 x DP=2 vs EP=2.
It times steps 31-40 by default: in the first steps the router sends most token copies to one
rank (M=1), so EP=2 then measures that imbalance (0.93x with `--warmup 2`), not the exchange.

Timing: configs are interleaved step by step (A B C A B C ...) after warm-up, each step starts
after a barrier, and we report the median of rank 0's step times. The all-to-all share is the
time spent inside our exchange calls (row exchanges forward + backward, and the count
exchange; it includes waiting for the other rank, which is what the exchange costs a step).
Bytes = rows this rank sent to the other rank per forward (dispatch + combine); the backward
moves as many again. The machine may be shared: numbers are only comparable within one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from deepseek_moe.testing.distributed import run_distributed  # noqa: E402

_A2A_SECONDS = [0.0]
_COMPUTE_SECONDS = [0.0]  # forward + backward of the current step (set by the step itself)


def _install_a2a_timers() -> None:
    """Wrap the row exchange (forward and backward) and the count exchange with timers."""
    from deepseek_moe.parallel import all_to_all as a2a_mod
    from deepseek_moe.parallel import dispatcher as disp_mod

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            _A2A_SECONDS[0] += time.perf_counter() - t0
            return out

        return wrapper

    a2a_mod._exchange = timed(a2a_mod._exchange)
    disp_mod.exchange_counts = timed(disp_mod.exchange_counts)


def _all_reduce_grads(params, group=None) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size()
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def _timed_loop(rank, steps: dict, warmup: int, iters: int) -> dict:
    """steps: name -> callable doing one step, returning (a2a bytes, one-row-per-copy bytes,
    ranks per token) of that step."""
    times = {name: [] for name in steps}
    compute = {name: [] for name in steps}
    a2a = {name: [] for name in steps}
    nbytes = {name: (0.0, 0.0, 0.0) for name in steps}
    for it in range(warmup + iters):
        for name, step in steps.items():
            dist.barrier()
            _A2A_SECONDS[0] = 0.0
            t0 = time.perf_counter()
            nbytes[name] = step()
            dt = time.perf_counter() - t0
            if it >= warmup:
                times[name].append(dt)
                compute[name].append(_COMPUTE_SECONDS[0])
                a2a[name].append(_A2A_SECONDS[0])
    return {
        name: {
            "step_s": statistics.median(times[name]),
            "compute_s": statistics.median(compute[name]),
            "a2a_s": statistics.median(a2a[name]),
            "bytes": nbytes[name],
        }
        for name in steps
    }


def _layer_worker(rank, world, tokens, iters, warmup):
    from torch import nn

    from deepseek_moe.config.model import MoEConfig
    from deepseek_moe.model.moe import MoELayer
    from deepseek_moe.parallel.expert_parallel import parallelize_moe

    _install_a2a_timers()
    D = 512

    def build(ep_size, topk_groups):
        cfg = MoEConfig(
            n_routed_experts=64,
            n_shared_experts=1,
            top_k=6,
            moe_intermediate_size=352,
            n_groups=2,
            topk_groups=topk_groups,
            aux_loss_alpha=0.01,
        )
        torch.manual_seed(0)
        model = nn.ModuleDict({"moe": MoELayer(D, cfg, layer_idx=0)})
        for p in model.parameters():
            nn.init.normal_(p, std=0.02)
        if ep_size > 1:
            parallelize_moe(model["moe"], ep_size)
        return model

    g = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, D, generator=g)
    g_out = torch.randn(tokens, D, generator=g)

    def make_step(model, ep: bool):
        layer = model["moe"]
        dense = [p for n, p in model.named_parameters() if ".deepspeed_experts." not in n]
        every = list(model.parameters())

        def step():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            y, aux = layer(x)
            ((y * g_out).sum() + sum(aux.values())).backward()
            _COMPUTE_SECONDS[0] = time.perf_counter() - t0
            _all_reduce_grads(dense if ep else every)
            if ep:
                stats = layer.dispatcher.pop_stats()
                return stats["a2a_bytes"], stats["copy_bytes"], stats["ranks_per_token"]
            return 0.0, 0.0, 0.0

        return step

    steps = {
        "dp2": make_step(build(1, 2), ep=False),
        "ep2_M2": make_step(build(2, 2), ep=True),
        "ep2_M1": make_step(build(2, 1), ep=True),
    }
    return _timed_loop(rank, steps, warmup, iters)


def _model_worker(rank, world, iters, warmup):
    import deepspeed
    from omegaconf import OmegaConf

    from deepseek_moe.config.model import ModelConfig
    from deepseek_moe.model.transformer import DeepSeekMoEForCausalLM
    from deepseek_moe.parallel.expert_parallel import parallelize_moe
    from deepseek_moe.parallel.param_groups import optimizer_param_groups

    _install_a2a_timers()
    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/deepseek_moe_tiny.yaml"))
    cfg = ModelConfig(**raw)
    B, S = 8, 256

    def engine(ep_size):
        torch.manual_seed(0)
        model = parallelize_moe(DeepSeekMoEForCausalLM(cfg), ep_size)
        opt = torch.optim.AdamW(optimizer_param_groups(model, 0.1), lr=1e-3)
        ds_cfg = {
            "train_batch_size": B * world,
            "train_micro_batch_size_per_gpu": B,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": 1},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
        }
        eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
        return eng

    g = torch.Generator().manual_seed(rank)
    window = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=g)
    ids, labels = window[:, :-1], window[:, 1:]

    def make_step(eng, ep: bool):
        def step():
            t0 = time.perf_counter()
            loss = eng(ids, labels).loss
            eng.backward(loss)  # includes DeepSpeed's gradient reduction
            _COMPUTE_SECONDS[0] = time.perf_counter() - t0
            eng.step()
            if ep:
                stats = [l.dispatcher.pop_stats() for l in eng.module.moe_layers()]
                return (
                    sum(x["a2a_bytes"] for x in stats),
                    sum(x["copy_bytes"] for x in stats),
                    statistics.mean(x["ranks_per_token"] for x in stats),
                )
            return 0.0, 0.0, 0.0

        return step

    steps = {"dp2": make_step(engine(1), ep=False), "ep2": make_step(engine(2), ep=True)}
    return _timed_loop(rank, steps, warmup, iters)


def _report(title: str, res: dict, tokens_per_rank: int, compute_label: str) -> None:
    base = res["dp2"]["step_s"]
    base_c = res["dp2"]["compute_s"]
    print(f"\n## {title} (2 processes, {tokens_per_rank} tokens per rank, rank 0 medians)")
    print(
        f"| config | step s | tokens/s (2 ranks) | vs EP=1 x DP=2 | {compute_label} s | "
        f"vs EP=1 x DP=2 | all-to-all s (share of step) | a2a MB/fwd | one-row-per-copy MB/fwd "
        "| ranks/token |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in res.items():
        share = r["a2a_s"] / r["step_s"] if r["step_s"] else 0.0
        sent, per_copy, rpt = r["bytes"]
        print(
            f"| {name} | {r['step_s']:.3f} | {2 * tokens_per_rank / r['step_s']:,.0f} | "
            f"{base / r['step_s']:.3f}x | {r['compute_s']:.3f} | {base_c / r['compute_s']:.3f}x | "
            f"{r['a2a_s']:.3f} ({share:.0%}) | {sent / 1e6:.2f} | "
            f"{per_copy / 1e6:.2f} | {rpt:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description="EP=2 vs EP=1 x DP=2 on 2 CPU processes")
    parser.add_argument("--part", choices=["layer", "model", "all"], default="all")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank (layer part)")
    parser.add_argument("--iters", type=int, help="timed steps per config (layer 5, model 10)")
    parser.add_argument("--warmup", type=int, help="untimed first steps (layer 2, model 30)")
    args = parser.parse_args()
    if args.part in ("layer", "all"):
        iters, warmup = args.iters or 5, 2 if args.warmup is None else args.warmup
        res = run_distributed(_layer_worker, 2, args.tokens, iters, warmup, timeout=3600)
        _report(
            "MoE layer: hidden 512, 64 experts top-6, width 352, 1 shared, fwd+bwd+grad sync",
            res[0],
            args.tokens,
            "fwd+bwd (no grad sync)",
        )
    if args.part in ("model", "all"):
        iters, warmup = args.iters or 10, 30 if args.warmup is None else args.warmup
        res = run_distributed(_model_worker, 2, iters, warmup, timeout=3600)
        _report(
            "Tiny preset training step through DeepSpeed (ZeRO-1)",
            res[0],
            8 * 256,
            "fwd+bwd incl. DeepSpeed grad reduction",
        )


if __name__ == "__main__":
    main()
