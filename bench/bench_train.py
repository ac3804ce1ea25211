"""Training throughput: our train.py vs HF transformers DeepseekV2ForCausalLM through DeepSpeed.

    python bench/bench_train.py                 # both EP sizes, fp32 and bf16, a table + ratios
    python bench/bench_train.py --ep 2 --precision bf16 --steps 10
    python bench/bench_train.py --compare-with ../old-checkout   # ours here vs ours there (A/B)

The nearest thing a user could pick instead of this framework is HF's `DeepseekV2ForCausalLM`
trained with DeepSpeed (AutoEP for expert parallelism). Both run here in the same invocation, as
2 CPU processes (torchrun, gloo, 1 intra-op thread each), at one shape:

    hidden 256, 4 layers (layer 0 dense, FFN 1024), 16 routed + 1 shared experts of width 128,
    top-4, 2 expert groups with M=1 (group-limited routing), vocab 1024, seq 256,
    micro-batch 8 per rank (global 16, no accumulation), AdamW, ZeRO-1,
    in fp32 and in bf16 (DeepSpeed's bf16 mode on both sides: bf16 weights and activations,
    fp32 master weights; bf16 needs a CPU with AVX512-BF16 or AMX to be fast).

- ours: `train.py` itself (the real trainer: router metrics, aux loss, metrics.jsonl) with
  `parallel.ep_size` 1 or 2; tokens/s from its metrics.jsonl.
- hf: `DeepseekV2ForCausalLM` (`topk_method="group_limited_greedy"`, experts implementation
  `grouped_mm`, its fast path), `deepspeed.initialize` with ZeRO-1; for EP=2 DeepSpeed AutoEP
  (`"expert_parallel": {"enabled": true, "autoep_size": 2, "preset_model": "deepseek_v2"}`).
  HF DeepSeek-V2 attention is MLA; we configure it close to our MHA (no q compression,
  kv_lora_rank 128, head dim 32 nope + 32 rope, v 64) and say so. HF computes no balance loss
  here (output_router_logits=False); ours does (alpha1 = 0.01, and the device-level loss with
  alpha2 = 0.05, the paper's value for device groups, which HF does not implement).

Warm-up: the first ~40 steps are a routing transient. At EP=2 with M=1, measured rank loads were
90/10 for ours around step 20 (52/48 by step 100) and 65/35 for HF around step 13; while one
rank does most of the expert work, our EP=2 step was slower than our EP=1 step. A pretraining run spends 10^4+
steps in the settled regime, so the default times steps 51-80, the same for both.

Same-for-both settings: torch's fused AdamW, and the glibc allocator settings of the opt-in
`trainer.reuse_host_memory=true` (deepseek_moe/train/host_memory.py): our run turns it on, the HF
worker applies the same settings to itself. Both read the same prepared python_stdlib windows (vocab 1024) through our
loader. Timing: mean
optimizer-step wall time over the steps after `--warmup` (what a run sees, stalls included);
tokens/s = 16 x 256 / mean.
Target: ours >= 1.5x hf tokens/s at both EP sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HIDDEN, LAYERS, DENSE_FFN, EXPERTS, EXPERT_W, TOP_K, GROUPS, M = 256, 4, 1024, 16, 128, 4, 2, 1
VOCAB, SEQ, MICRO, WORLD = 1024, 256, 8, 2
# DeepSeekMoE's device-level balance loss weight (alpha2 of the paper's 145B model, the published
# recipe for experts split into device groups); HF DeepseekV2 has no device-level loss.
DEVICE_ALPHA = 0.05
GLOBAL = MICRO * WORLD
DATA = [
    f"data.out_dir={REPO / 'data' / 'bench_stdlib_v1024'}",
    "data.vocab_size=1024",
    "data.max_documents=400",
    "data.num_proc=1",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return env


def _torchrun(args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(WORLD),
        "--master_port",
        str(_free_port()),
        *args,
    ]


def data_config():
    from omegaconf import OmegaConf

    from deepseek_moe.config.data import DataConfig

    cfg = OmegaConf.structured(DataConfig)
    cfg.merge_with(OmegaConf.load(REPO / "conf" / "data" / "python_stdlib.yaml"))
    cfg.merge_with(OmegaConf.from_dotlist([d.removeprefix("data.") for d in DATA]))
    return OmegaConf.to_object(cfg)


# ---- ours: the real entry point ---------------------------------------------------------------
def run_ours(ep: int, steps: int, warmup: int, precision: str) -> dict:
    overrides = [
        f"model.hidden_size={HIDDEN}",
        f"model.num_layers={LAYERS}",
        "model.num_heads=4",
        "model.num_kv_heads=4",
        "model.head_dim=64",
        f"model.intermediate_size={DENSE_FFN}",
        "model.first_k_dense=1",
        f"model.max_seq_len={SEQ}",
        f"model.moe.n_routed_experts={EXPERTS}",
        "model.moe.n_shared_experts=1",
        f"model.moe.moe_intermediate_size={EXPERT_W}",
        f"model.moe.top_k={TOP_K}",
        f"model.moe.n_groups={GROUPS}",
        f"model.moe.topk_groups={M}",
        f"model.moe.device_aux_alpha={DEVICE_ALPHA}",
        f"trainer.seq_len={SEQ}",
        f"trainer.global_batch_size={GLOBAL}",
        f"trainer.micro_batch_size={MICRO}",
        f"trainer.max_steps={warmup + steps}",
        "trainer.eval_every=0",
        "trainer.log_every=1000",
        "checkpoint.every=0",
        "logger=none",
        "optim.warmup_steps=1",
        f"trainer.precision={precision}",
        f"parallel.ep_size={ep}",
        "parallel.zero_stage=1",
        "trainer.reuse_host_memory=true",
        *DATA,
    ]
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            _torchrun(["train.py", f"run_dir={tmp}/run", *overrides]),
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"ours EP={ep} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in open(f"{tmp}/run/metrics.jsonl")]
    times = [r["step_time_s"] for r in rows if "loss" in r][warmup:]
    return {
        "step_s": statistics.mean(times),
        "loss_first": rows[0]["lm_loss"],
        "loss_last": [r for r in rows if "loss" in r][-1]["lm_loss"],
    }


# ---- hf: DeepseekV2ForCausalLM + DeepSpeed (+ AutoEP) -----------------------------------------
def hf_worker(ep: int, steps: int, warmup: int, precision: str, out: str) -> None:
    import deepspeed
    import torch
    import transformers

    from data_prep.prepare import ensure_prepared
    from deepseek_moe.data import build_train_loader
    from deepseek_moe.train.host_memory import keep_freed_host_memory

    keep_freed_host_memory()  # the same allocator settings our trainer applies to itself
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    cfg = transformers.DeepseekV2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=DENSE_FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        first_k_dense_replace=1,
        n_routed_experts=EXPERTS,
        n_shared_experts=1,
        moe_intermediate_size=EXPERT_W,
        num_experts_per_tok=TOP_K,
        n_group=GROUPS,
        topk_group=M,
        topk_method="group_limited_greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        q_lora_rank=None,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=64,
        max_position_embeddings=SEQ,
        use_cache=False,
        initializer_range=0.02,
    )
    cfg._experts_implementation = "grouped_mm"
    model = transformers.DeepseekV2ForCausalLM(cfg).float()
    ds_config = {
        "train_batch_size": GLOBAL,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "bf16": {"enabled": precision == "bf16"},
    }
    if ep > 1:
        ds_config["expert_parallel"] = {"enabled": True, "autoep_size": ep, "preset_model": "deepseek_v2"}

    def make_optimizer(params):
        # A callable: DeepSpeed builds it after AutoEP replaced the MoE blocks, and ZeRO needs
        # the expert params in their own "moe" groups.
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(
            {"params": [p for p in params if p.requires_grad], "name": "params"}
        )
        # fused=True like ours (torch's one-kernel AdamW), so the optimizer math is equal
        return torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer, config=ds_config)
    meta = ensure_prepared(data_config())
    loader = build_train_loader(
        meta,
        seq_len=SEQ,
        global_batch_size=GLOBAL,
        micro_batch_size=MICRO,
        dp_rank=rank,
        dp_world=WORLD,
        seed=0,
    )
    times, losses = [], []
    for _ in range(warmup + steps):
        batch = next(loader)
        t0 = time.time()
        # HF shifts labels itself: pass the full window (inputs + last label) as both.
        ids = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)[:, :SEQ]
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        t = torch.tensor([time.time() - t0])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        times.append(float(t))
        losses.append(float(loss))
    if rank == 0:
        Path(out).write_text(
            json.dumps(
                {"step_s": statistics.mean(times[warmup:]), "loss_first": losses[0], "loss_last": losses[-1]}
            )
        )
    # A clean teardown: without it a gloo thread sometimes aborts the process at exit.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def run_hf(ep: int, steps: int, warmup: int, precision: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/hf.json"
        proc = subprocess.run(
            _torchrun(
                [
                    __file__,
                    "--worker",
                    "hf",
                    "--ep",
                    str(ep),
                    "--steps",
                    str(steps),
                    "--warmup",
                    str(warmup),
                    "--precision",
                    precision,
                    "--out",
                    out,
                ]
            ),
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"hf EP={ep} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads(Path(out).read_text())


# ---- A/B of our trainer between two checkouts ------------------------------------------------
def run_ours_in(checkout: Path, ep: int, steps: int, warmup: int, precision: str) -> dict:
    """`run_ours` of `checkout`'s own bench_train.py (its train.py, its package)."""
    code = (
        "import json, sys; sys.path.insert(0, '.'); from bench.bench_train import run_ours; "
        f"print(json.dumps(run_ours({ep}, {steps}, {warmup}, {precision!r})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=checkout,
        capture_output=True,
        text=True,
        env={**_env(), "PYTHONPATH": str(checkout)},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{checkout} EP={ep} {precision} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_checkouts(other: Path, args) -> None:
    """Our tokens/s in this checkout (A) and in `other` (B), alternating A B A B per setting and
    repetition, so load changes hit both alike. Prints median, range and A/B per setting."""
    tokens = GLOBAL * SEQ
    settings = [(p, ep) for p in args.precision for ep in args.ep]
    tps: dict[tuple, dict[str, list[float]]] = {s: {"A": [], "B": []} for s in settings}
    print(
        f"A = {REPO}, B = {other}; {args.reps} repetitions, {args.steps} timed steps after "
        f"{args.warmup}; order per repetition: " + ", ".join(f"{p} EP{ep} A B" for p, ep in settings)
    )
    for rep in range(args.reps):
        for precision, ep in settings:
            for side, checkout in (("A", REPO), ("B", other)):
                r = run_ours_in(checkout, ep, args.steps, args.warmup, precision)
                tps[(precision, ep)][side].append(tokens / r["step_s"])
                print(
                    f"rep {rep} {precision} EP{ep} {side}: {tokens / r['step_s']:,.0f} tok/s "
                    f"(loss {r['loss_first']:.3f}->{r['loss_last']:.3f})",
                    flush=True,
                )
    print(
        "| precision | EP | A tok/s median (min-max) | B tok/s median (min-max) "
        "| A/B of medians | A/B per repetition |"
    )
    print("|---|---|---|---|---|---|")
    for (precision, ep), t in tps.items():
        a, b = t["A"], t["B"]
        pairs = ", ".join(f"{x / y:.3f}" for x, y in zip(a, b))
        print(
            f"| {precision} | {ep} | {statistics.median(a):,.0f} ({min(a):,.0f}-{max(a):,.0f}) "
            f"| {statistics.median(b):,.0f} ({min(b):,.0f}-{max(b):,.0f}) "
            f"| {statistics.median(a) / statistics.median(b):.3f} | {pairs} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ep", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    parser.add_argument(
        "--warmup",
        type=int,
        default=50,
        help="untimed first steps (routing is still settling: see the docstring)",
    )
    parser.add_argument("--precision", choices=["fp32", "bf16"], nargs="*", default=["fp32", "bf16"])
    parser.add_argument(
        "--compare-with",
        type=Path,
        metavar="CHECKOUT",
        help="instead of hf: our trainer here vs in another checkout (A/B, alternating)",
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions for --compare-with")
    parser.add_argument("--worker", choices=["hf"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "hf":
        hf_worker(args.ep[0], args.steps, args.warmup, args.precision[0], args.out)
        return

    from data_prep.prepare import ensure_prepared

    ensure_prepared(data_config())  # once, before any timing
    if args.compare_with:
        compare_checkouts(args.compare_with.resolve(), args)
        return
    tokens = GLOBAL * SEQ
    print(
        f"shape: hidden {HIDDEN}, {LAYERS} layers (first dense), {EXPERTS}+1 experts x {EXPERT_W}, "
        f"top-{TOP_K}, {GROUPS} groups M={M}, vocab {VOCAB}, seq {SEQ}, micro {MICRO}/rank x "
        f"{WORLD} ranks, ZeRO-1; {args.steps} timed steps after {args.warmup}"
    )
    print(
        f"{'precision':>9} | {'EP':>2} | {'ours tok/s':>10} | {'hf tok/s':>9} | {'ratio':>6} | "
        "ours loss | hf loss"
    )
    for precision in args.precision:
        for ep in args.ep:
            # peers timed back to back in one run
            ours = run_ours(ep, args.steps, args.warmup, precision)
            hf = run_hf(ep, args.steps, args.warmup, precision)
            a, b = tokens / ours["step_s"], tokens / hf["step_s"]
            print(
                f"{precision:>9} | {ep:>2} | {a:>10,.0f} | {b:>9,.0f} | {a / b:>5.2f}x | "
                f"{ours['loss_first']:.2f}->{ours['loss_last']:.2f} | "
                f"{hf['loss_first']:.2f}->{hf['loss_last']:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
