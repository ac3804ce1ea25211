"""DeepSpeed engine + EP (gloo, 2 processes): ZeRO-1/2 loss curves, checkpoints, EP-size change.

One spawned run does all DeepSpeed work (engine init is slow): ZeRO-1 and ZeRO-2 runs of 5 steps
at EP=2, a checkpoint save after step 3 and a resume into a differently initialised model, and
the consolidated weights. The reference is a plain single-process PyTorch loop at EP=1 (no
DeepSpeed): AdamW on the same param groups, mean loss over the ranks' micro-batches, grad-norm
clipping. Clipping is set low so it is active: it checks that DeepSpeed's grad norm counts every
expert exactly once under EP.
"""

import os

import pytest
import torch

from deepseek_moe.checkpoint.consolidate import consolidate_deepspeed_checkpoint
from deepseek_moe.checkpoint.keys import consolidated_state_dict, load_consolidated_state_dict
from deepseek_moe.parallel.expert_parallel import parallelize_moe
from deepseek_moe.parallel.param_groups import optimizer_param_groups
from deepseek_moe.testing.distributed import run_distributed
from tests.parallel._ep_common import B, SEED, build_full_model, micro_batch, tiny_config

STEPS, LR, WD, CLIP, WORLD, EP = 5, 1e-2, 0.1, 0.05, 2, 2


def _ds_config(zero_stage, world=WORLD):
    return {
        "train_batch_size": B * world,
        "train_micro_batch_size_per_gpu": B,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


def _engine(cfg, zero_stage, seed=SEED):
    import deepspeed

    model = parallelize_moe(build_full_model(cfg, seed), EP)
    opt = torch.optim.AdamW(optimizer_param_groups(model, WD), lr=LR, betas=(0.9, 0.95))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_ds_config(zero_stage))
    return engine


def _train(engine, rank, steps):
    losses, norms = [], []
    for step in steps:
        ids, labels = micro_batch(step, rank)
        loss = engine(ids, labels).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        norms.append(float(engine.get_global_grad_norm()))
    return losses, norms


def _ds_run(rank, world, ckpt_dir):
    cfg = tiny_config()
    out = {}
    for stage in (1, 2):
        engine = _engine(cfg, stage)
        out[f"has_moe_{stage}"] = engine.has_moe_layers
        if stage == 1:
            out["losses_1"], out["norms_1"] = _train(engine, rank, range(STEPS))
            module = engine.module
            out["consolidated"] = consolidated_state_dict(module)
            ids, _ = micro_batch(99, rank)
            with torch.no_grad():
                out["logits_99"] = module(ids).logits_BSV
        else:
            first, _ = _train(engine, rank, range(3))
            engine.save_checkpoint(ckpt_dir, tag="step3")
            rest, _ = _train(engine, rank, range(3, STEPS))
            out["losses_2"] = first + rest
            torch.distributed.barrier()
            # resume into a model initialised from another seed: everything must come from disk
            resumed = _engine(cfg, stage, seed=SEED + 1)
            resumed.load_checkpoint(ckpt_dir, tag="step3")
            with torch.no_grad():
                out["logits_99_step3"] = resumed.module(micro_batch(99, rank)[0]).logits_BSV
            out["resumed"], _ = _train(resumed, rank, range(3, STEPS))
    return out


def _reference_curve(cfg, world=WORLD):
    model = build_full_model(cfg)
    opt = torch.optim.AdamW(optimizer_param_groups(model, WD), lr=LR, betas=(0.9, 0.95))
    losses, norms = [], []
    for step in range(STEPS):
        opt.zero_grad()
        step_losses = []
        for r in range(world):
            ids, labels = micro_batch(step, r)
            loss = model(ids, labels).loss
            (loss / world).backward()
            step_losses.append(loss.item())
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        losses.append(step_losses)
    return model, losses, norms


@pytest.fixture(scope="module")
def ds_results(tmp_path_factory):
    ckpt_dir = str(tmp_path_factory.mktemp("ds_ckpt"))
    results = run_distributed(_ds_run, WORLD, ckpt_dir, timeout=400)
    return ckpt_dir, results


def test_engine_sees_moe_layers(ds_results):
    _, results = ds_results
    assert all(r["has_moe_1"] and r["has_moe_2"] for r in results)


def test_zero1_and_zero2_reproduce_ep1_loss_curve(ds_results):
    _, results = ds_results
    _, ref_losses, ref_norms = _reference_curve(tiny_config())
    assert min(ref_norms) > CLIP  # clipping is active at every step
    for rank, res in enumerate(results):
        for stage in (1, 2):
            got = torch.tensor(res[f"losses_{stage}"])
            want = torch.tensor([ref_losses[s][rank] for s in range(STEPS)])
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        # DeepSpeed's global grad norm (every expert once) equals the EP=1 norm
        torch.testing.assert_close(
            torch.tensor(res["norms_1"]), torch.tensor(ref_norms), rtol=1e-4, atol=1e-5
        )
    # the loss actually moved, so equal curves are not trivially equal
    assert abs(ref_losses[-1][0] - ref_losses[0][0]) > 1e-3


def test_checkpoint_resume_is_identical(ds_results):
    ckpt_dir, results = ds_results
    for res in results:
        assert res["resumed"] == res["losses_2"][3:]
    # one file per global expert per MoE layer (2 MoE layers x 8 experts), each written once
    files = sorted(os.listdir(os.path.join(ckpt_dir, "step3")))
    expert_files = [f for f in files if "_expert_" in f]
    cfg = tiny_config()
    expected = {
        f"layer_{l}_expert_{e}_mp_rank_00_model_states.pt"
        for l in range(cfg.num_moe_layers)
        for e in range(cfg.moe.n_routed_experts)
    }
    assert set(expert_files) == expected


def test_ep2_weights_load_at_ep1_same_logits(ds_results):
    _, results = ds_results
    sd = results[0]["consolidated"]
    assert results[1]["consolidated"] == {}  # only the first rank of the EP group gathers
    model = build_full_model(tiny_config(), seed=0)  # different init, overwritten by the load
    load_consolidated_state_dict(model, sd)
    for rank, res in enumerate(results):
        ids, _ = micro_batch(99, rank)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits_BSV, res["logits_99"], rtol=1e-5, atol=1e-5)


def test_deepspeed_checkpoint_at_ep2_loads_at_ep1(ds_results):
    # the DeepSpeed tag written at EP=2, read by one process without torch.distributed
    ckpt_dir, results = ds_results
    sd = consolidate_deepspeed_checkpoint(os.path.join(ckpt_dir, "step3"))
    model = build_full_model(tiny_config(), seed=0)
    load_consolidated_state_dict(model, sd)
    for rank, res in enumerate(results):
        ids, _ = micro_batch(99, rank)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits_BSV, res["logits_99_step3"], rtol=1e-5, atol=1e-5)


def _zero2_world4_ep2(rank, world):
    import deepspeed

    model = parallelize_moe(build_full_model(tiny_config()), 2)
    opt = torch.optim.AdamW(optimizer_param_groups(model, WD), lr=LR, betas=(0.9, 0.95))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_ds_config(2, world))
    return _train(engine, rank, range(STEPS))


def test_zero2_ep2_inside_world4_reproduces_ep1():
    # EDP groups of size 2: ZeRO partitions expert optimizer state over them and the grad
    # norm must still count each expert once
    results = run_distributed(_zero2_world4_ep2, 4, timeout=400)
    _, ref_losses, ref_norms = _reference_curve(tiny_config(), world=4)
    for rank, (losses, norms) in enumerate(results):
        want = torch.tensor([ref_losses[s][rank] for s in range(STEPS)])
        torch.testing.assert_close(torch.tensor(losses), want, rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-4, atol=1e-5)
