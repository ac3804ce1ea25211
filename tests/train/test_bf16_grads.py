"""bf16 runs accumulate and reduce gradients in fp32 (world 2, EP 2, 4 micro-batches, ZeRO-1/2).

The engine runs on the DeepSpeed config the trainer generates (`build_ds_config`). The reference
runs the SAME bf16 model on the same micro-batches with plain autograd, before any engine exists
(no DeepSpeed hooks), and accumulates each micro-batch's bf16 gradient in fp32, then averages
over the ranks in fp32. Both sides therefore add the very same bf16 micro-batch gradients; only
the order of the fp32 additions in the norm may differ, so the gradient norm must agree to fp32
rounding (rtol 1e-5). Accumulating or reducing in bf16 instead rounds every partial sum to 8
mantissa bits (about 0.2% relative error at 4 micro-batches); a model output DeepSpeed's hooks do
not see re-counts earlier micro-batches (the norm more than doubles): both fail the check.

The updated weights: AdamW (the trainer's optimizer) on fp32 master weights equal to the bf16
initial weights, given the reference gradient; the engine's bf16 weights must equal the bf16
rounding of that update to within one bf16 ulp (the last rounding may fall either way).
"""

import torch
import torch.distributed as dist

from deepseek_moe.config.train import OptimConfig, ParallelConfig, RunConfig, TrainerConfig
from deepspeed.moe.utils import is_moe_param

from deepseek_moe.parallel.expert_parallel import parallelize_moe
from deepseek_moe.parallel.param_groups import optimizer_param_groups
from deepseek_moe.testing.distributed import run_distributed
from tests.parallel._ep_common import B, build_full_model, micro_batch, tiny_config

WORLD, EP, ACCUM, LR, WD = 2, 2, 4, 1e-2, 0.1


def _run_config(zero_stage: int) -> RunConfig:
    return RunConfig(
        model=tiny_config(),
        optim=OptimConfig(lr=LR, weight_decay=WD, grad_clip=0.0),
        parallel=ParallelConfig(ep_size=EP, zero_stage=zero_stage),
        trainer=TrainerConfig(
            precision="bf16", micro_batch_size=B, global_batch_size=B * WORLD * ACCUM, max_steps=100
        ),
    )


def _adamw(model, run_cfg):
    o = run_cfg.optim
    return torch.optim.AdamW(
        optimizer_param_groups(model, o.weight_decay),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        weight_decay=o.weight_decay,
        fused=True,
    )


def _reference(rank, run_cfg):
    """fp32-accumulated, fp32-averaged gradients of the bf16 model; its norm; AdamW's update."""
    model = parallelize_moe(build_full_model(run_cfg.model), EP).to(torch.bfloat16)
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
    for m in range(ACCUM):
        ids, labels = micro_batch(m, rank)
        (model(ids, labels).loss / ACCUM).backward()  # the engine scales the same way
        for n, p in model.named_parameters():
            acc[n] += p.grad.float()
            p.grad = None
    dense_sq, expert_sq = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    experts = {n for n, p in model.named_parameters() if is_moe_param(p)}
    assert experts, "the model has no expert parameters: the check below would be vacuous"
    for n, g in acc.items():
        if n in experts:  # this rank owns the expert: its grad already holds every rank's tokens
            g /= WORLD
            expert_sq += g.double().square().sum()
        else:
            dist.all_reduce(g)
            g /= WORLD
            dense_sq += g.double().square().sum()
    dist.all_reduce(expert_sq)
    norm = float((dense_sq + expert_sq).sqrt())
    # fp32 master weights = the bf16 weights the engine starts from
    master = parallelize_moe(build_full_model(run_cfg.model), EP)
    for n, p in master.named_parameters():
        p.data = p.data.to(torch.bfloat16).float()
        p.grad = acc[n]
    _adamw(master, run_cfg).step()
    return norm, {n: p.detach().to(torch.bfloat16) for n, p in master.named_parameters()}


def _engine_step(rank, run_cfg):
    import deepspeed

    from deepseek_moe.train.ds_config import build_ds_config

    model = parallelize_moe(build_full_model(run_cfg.model), EP)
    ds_config = build_ds_config(run_cfg, WORLD, "cpu")
    engine, *_ = deepspeed.initialize(model=model, optimizer=_adamw(model, run_cfg), config=ds_config)
    for m in range(ACCUM):
        ids, labels = micro_batch(m, rank)
        engine.backward(engine(ids, labels).loss)
        engine.step()
    assert engine.global_steps == 1
    return (
        float(engine.get_global_grad_norm()),
        type(engine.optimizer).__name__,
        {n: p.detach().clone() for n, p in engine.module.named_parameters()},
        ds_config,
    )


def _bf16_run(rank, world):
    out = {}
    for stage in (1, 2):
        run_cfg = _run_config(stage)
        ref_norm, ref_weights = _reference(rank, run_cfg)
        norm, optimizer, weights, ds_config = _engine_step(rank, run_cfg)
        worst = max(
            float(
                (
                    (weights[n].float() - w.float()).abs()
                    / (w.float().abs() * torch.finfo(torch.bfloat16).eps).clamp_min(1e-30)
                ).max()
            )
            for n, w in ref_weights.items()
        )
        changed = sum(
            int((weights[n] != w.to(torch.bfloat16)).sum())
            for n, w in build_full_model(run_cfg.model).to(torch.bfloat16).named_parameters()
            if n in weights and weights[n].shape == w.shape
        )
        out[stage] = dict(
            ref_norm=ref_norm,
            norm=norm,
            optimizer=optimizer,
            worst_ulps=worst,
            changed=changed,
            ds_config=ds_config,
        )
    return out


def test_bf16_grads_accumulate_and_reduce_in_fp32_zero1_zero2():
    results = run_distributed(_bf16_run, WORLD, timeout=400)
    for rank, res in enumerate(results):
        for stage in (1, 2):
            r = res[stage]
            summary = (rank, stage, r["norm"], r["ref_norm"], r["worst_ulps"], r["optimizer"])
            assert abs(r["norm"] - r["ref_norm"]) <= 1e-5 * r["ref_norm"], summary
            assert r["worst_ulps"] <= 1.0 + 1e-6, summary
            assert r["changed"] > 0  # the step did update the weights
            assert r["ds_config"]["data_types"] == {"grad_accum_dtype": "fp32"}
            assert r["ds_config"]["communication_data_type"] == "fp32"
            if stage == 1:  # the optimizer DeepSpeed picks for fp32 accumulation at ZeRO-1
                assert r["optimizer"] == "BF16_Optimizer", r["optimizer"]
