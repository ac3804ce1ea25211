"""What the MoE statistics cost a training step: health.expert_stats on vs off, in ONE run.

    python bench/bench_moe_stats.py                       # EP 1 and EP 2, 2 CPU processes
    python bench/bench_moe_stats.py --ep 2 --pairs 10 --log-every 10
    python bench/bench_moe_stats.py --ep --layer-reps 50     # only the one-layer timing

The real Trainer (2 gloo processes, 1 intra-op thread each, the bench_train.py shape: hidden
256, 4 layers, 16+1 experts of width 128, top-4, 2 groups M=1, seq 256, micro-batch 8 per rank,
ZeRO-1, fp32) trains `--warmup` untimed steps, then alternates blocks of `--log-every` steps with
the statistics on (router statistics counted in every forward, one all-reduce and one read at the
block's last step, expert_loads.bin appended, load alarms checked) and off
(`health.expert_stats=false`: none of that). A block is one logging interval, so an "on" block
holds exactly one reduction, as a run logging every `--log-every` steps does. Blocks alternate
on/off/on/off in the same process, data stream and warm caches, so load changes on a shared
machine hit both alike; the time of a block is the wall time between the logging of its last
step and of the previous block's last step (everything the loop does, the reduction included).

Printed: per EP size, the median block time on and off, the overhead of the medians and the
overhead of each adjacent (on, off) pair. Target: at most 1% with logging every 10 steps. On a
shared, loaded machine whole blocks vary by +-10%: first, the one-layer timing (`layer_cost`:
one MoE layer's forward + backward with the statistics on and off, interleaved, and one
reduction) bounds the overhead from the parts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_train import DATA, DEVICE_ALPHA, data_config  # noqa: E402  (same shape, same data)

SHAPE = [
    "model.hidden_size=256",
    "model.num_layers=4",
    "model.num_heads=4",
    "model.num_kv_heads=4",
    "model.head_dim=64",
    "model.intermediate_size=1024",
    "model.first_k_dense=1",
    "model.max_seq_len=256",
    "model.moe.n_routed_experts=16",
    "model.moe.n_shared_experts=1",
    "model.moe.moe_intermediate_size=128",
    "model.moe.top_k=4",
    "model.moe.n_groups=2",
    "model.moe.topk_groups=1",
    f"model.moe.device_aux_alpha={DEVICE_ALPHA}",
    "trainer.seq_len=256",
    "trainer.global_batch_size=16",
    "trainer.micro_batch_size=8",
    "trainer.eval_every=0",
    "checkpoint.every=0",
    "logger=none",
    "optim.warmup_steps=1",
    "parallel.zero_stage=1",
    "trainer.reuse_host_memory=true",
]


def _worker(rank: int, world: int, ep: int, warmup: int, pairs: int, log_every: int, run_dir: str) -> list:
    from omegaconf import OmegaConf

    from deepseek_moe.config.compose import compose
    from deepseek_moe.train.cli import register_schema
    from deepseek_moe.train.trainer import Trainer

    steps = warmup + 2 * pairs * log_every
    overrides = SHAPE + DATA + [f"parallel.ep_size={ep}", f"trainer.max_steps={steps}"]
    overrides += [f"trainer.log_every={log_every}", f"run_dir={run_dir}"]
    register_schema()
    trainer = Trainer(OmegaConf.to_object(compose("config", overrides)))
    train_step, log_record = trainer._train_step, trainer._log
    stamps: dict[int, float] = {}

    def switch(batches):
        # steps warmup+1 .. warmup+log_every are block 0 ("on"), the next block 1 ("off"), ...
        block = (trainer.step - warmup) // log_every
        on = trainer.step < warmup or block % 2 == 0
        trainer.health.enabled = on
        for layer in trainer.model.moe_layers():
            layer.stats.enabled = on
        return train_step(batches)

    def stamp(record):
        log_record(record)
        if "loss" in record:
            stamps[record["step"]] = time.perf_counter()

    trainer._train_step, trainer._log = switch, stamp
    trainer.fit()
    ends = [warmup + (b + 1) * log_every for b in range(2 * pairs)]
    starts = [warmup] + ends[:-1]
    return [stamps[e] - stamps[s] for s, e in zip(starts, ends)]


def layer_cost(reps: int) -> dict[str, float]:
    """Seconds (median of `reps`, on/off interleaved) of one MoE layer's training forward +
    backward at the bench shape (one rank's micro-batch, 2048 tokens) with the statistics on and
    off, and of one `collect_router_stats` of a 3-MoE-layer model (1 process). Medians of
    interleaved repetitions stay meaningful on a loaded machine, where whole runs do not."""
    import torch

    from deepseek_moe.config.model import MoEConfig
    from deepseek_moe.model.moe import MoELayer
    from deepseek_moe.train.moe_health import collect_router_stats

    torch.manual_seed(0)
    cfg = MoEConfig(
        n_routed_experts=16,
        n_shared_experts=1,
        top_k=4,
        moe_intermediate_size=128,
        n_groups=2,
        topk_groups=1,
        device_aux_alpha=DEVICE_ALPHA,
    )
    layer = MoELayer(256, cfg)
    layer.train()
    x = torch.randn(8, 256, 256, requires_grad=True)
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(2 * reps + 4):
        on = i % 2 == 0
        layer.stats.enabled = on
        t0 = time.perf_counter()
        y, aux = layer(x)
        (y.square().mean() + sum(aux.values())).backward()
        if i >= 4:  # the first ones warm the allocator and the kernels
            times[on].append(time.perf_counter() - t0)

    class Model:
        def __init__(self, layers):
            self.layers = layers

        def moe_layers(self):
            return iter(self.layers)

    # the work the switch adds to a forward, alone: the statistics' update
    probs = torch.softmax(torch.randn(2048, 16), -1)
    ids = torch.topk(probs, 4).indices
    counts = torch.zeros(16, dtype=torch.long).scatter_add_(
        0, ids.flatten(), torch.ones(8192, dtype=torch.long)
    )
    update = []
    for _ in range(reps * 10):
        t0 = time.perf_counter()
        layer.stats.update(probs_TE=probs, ids_TK=ids, counts_E=counts, kept_E=counts)
        update.append(time.perf_counter() - t0)

    model = Model([MoELayer(256, cfg, layer_idx=i) for i in (1, 2, 3)])
    collect = []
    for _ in range(reps):
        t0 = time.perf_counter()
        collect_router_stats(model, torch.device("cpu"), lambda ts: None, 1, 1)
        collect.append(time.perf_counter() - t0)
    return {
        "on": statistics.median(times[True]),
        "off": statistics.median(times[False]),
        "collect": statistics.median(collect),
        "update": statistics.median(update),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ep", type=int, nargs="*", default=[1, 2])
    parser.add_argument(
        "--world", type=int, default=2, help="processes (1: no all-reduce, but the least noise)"
    )
    parser.add_argument("--warmup", type=int, default=20, help="untimed first steps")
    parser.add_argument("--pairs", type=int, default=6, help="(on, off) block pairs timed")
    parser.add_argument("--log-every", type=int, default=10, help="steps per block = logging interval")
    parser.add_argument(
        "--layer-reps", type=int, default=30, help="repetitions of the one-layer timing; 0 = skip"
    )
    args = parser.parse_args()
    if args.layer_reps:
        import torch

        torch.set_num_threads(1)
        c = layer_cost(args.layer_reps)
        print(
            f"one MoE layer fwd+bwd, 2048 tokens, 1 thread: stats on {c['on'] * 1e3:.2f} ms, off "
            f"{c['off'] * 1e3:.2f} ms (difference {(c['on'] - c['off']) * 1e3:+.3f} ms, "
            f"{(c['on'] / c['off'] - 1) * 100:+.2f}%); RouterStats.update alone {c['update'] * 1e3:.3f} ms "
            f"({c['update'] / c['off'] * 100:.2f}% of the layer's fwd+bwd); collect_router_stats of 3 "
            f"layers {c['collect'] * 1e3:.3f} ms"
        )
        if not args.ep:
            return

    import tempfile

    from data_prep.prepare import ensure_prepared
    from deepseek_moe.testing.distributed import run_distributed

    ensure_prepared(data_config())
    print(
        f"{args.world} process(es); {args.pairs} (on, off) pairs of {args.log_every}-step blocks after {args.warmup} "
        "untimed steps; block time = wall time of its steps, the reduction included"
    )
    print("| EP | on: median block s | off: median block s | overhead of medians | overhead per pair |")
    print("|---|---|---|---|---|")
    for ep in args.ep:
        with tempfile.TemporaryDirectory() as tmp:
            blocks = run_distributed(
                _worker, args.world, ep, args.warmup, args.pairs, args.log_every, f"{tmp}/run", timeout=3600
            )[0]
        on, off = blocks[0::2], blocks[1::2]
        pairs = ", ".join(f"{(a / b - 1) * 100:+.1f}%" for a, b in zip(on, off))
        med_on, med_off = statistics.median(on), statistics.median(off)
        print(
            f"| {ep} | {med_on:.3f} | {med_off:.3f} | {(med_on / med_off - 1) * 100:+.2f}% | {pairs} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
