"""`parallelize_moe` and friends in one process (ep_size=1, no torch.distributed)."""

import pytest
import torch
from deepspeed.moe.layer import MoE as DeepSpeedMoE

from deepseek_moe.config.model import ModelConfig
from deepseek_moe.errors import CheckpointError
from deepseek_moe.model.transformer import DeepSeekMoEForCausalLM
from deepseek_moe.parallel.deepspeed_experts import DeepSpeedExperts
from deepseek_moe.checkpoint.keys import consolidated_state_dict, load_consolidated_state_dict
from deepseek_moe.parallel.expert_parallel import parallelize_moe
from deepseek_moe.parallel.param_groups import optimizer_param_groups
from tests.parallel._ep_common import build_full_model, micro_batch, tiny_config


def test_parallelize_ep1_keeps_outputs_and_hf_keys():
    cfg = tiny_config()
    model = build_full_model(cfg)
    plain_sd = {k: v.clone() for k, v in model.state_dict().items()}
    ids, labels = micro_batch(0, 0)
    before = model(ids, labels)
    parallelize_moe(model, 1)
    after = model(ids, labels)
    assert torch.equal(before.logits_BSV, after.logits_BSV) and torch.equal(before.loss, after.loss)
    wrappers = [m for m in model.modules() if isinstance(m, DeepSpeedMoE)]
    assert len(wrappers) == cfg.num_moe_layers and all(isinstance(w, DeepSpeedExperts) for w in wrappers)
    # DeepSpeed's expert-file naming pattern, and only routed experts under it
    for name, p in model.named_parameters():
        is_routed = ".deepspeed_moe.experts.deepspeed_experts." in name
        assert (getattr(p, "allreduce", True) is False) == is_routed, name
    # consolidated = exactly the unparallelized model's state dict
    sd = consolidated_state_dict(model)
    assert sd.keys() == plain_sd.keys()
    assert all(torch.equal(sd[k], plain_sd[k]) for k in sd)


def test_optimizer_param_groups():
    model = parallelize_moe(build_full_model(tiny_config()), 1)
    groups = optimizer_param_groups(model, 0.1)
    by_name = {}
    for g in groups:
        by_name.setdefault(g["name"], []).append(g)
    moe = by_name["ep_size_1"]
    assert all(g["moe"] and g["weight_decay"] == 0.1 for g in moe)
    expert_ids = {id(p) for g in moe for p in g["params"]}
    routed = {id(p) for n, p in model.named_parameters() if ".deepspeed_experts." in n}
    assert expert_ids == routed
    norms = {id(p) for n, p in model.named_parameters() if "norm" in n}
    assert norms <= {id(p) for g in by_name["no_decay"] for p in g["params"]}
    assert all(g["weight_decay"] == 0.0 for g in by_name["no_decay"])
    every = [id(p) for g in groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())  # each param exactly once


def test_load_consolidated_checks_keys():
    model = parallelize_moe(build_full_model(tiny_config()), 1)
    sd = consolidated_state_dict(model)
    sd.pop("model.layers.1.mlp.experts.3.up_proj.weight")
    with pytest.raises(CheckpointError, match="1 missing keys"):
        load_consolidated_state_dict(model, sd)
    sd = consolidated_state_dict(model)
    sd["model.layers.1.mlp.bogus.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="1 unexpected keys"):
        load_consolidated_state_dict(model, sd)


def test_parallelize_errors():
    model = parallelize_moe(build_full_model(tiny_config()), 1)
    with pytest.raises(ValueError, match="already parallelized"):
        parallelize_moe(model, 1)
    with pytest.raises(RuntimeError, match="needs torch.distributed"):
        parallelize_moe(build_full_model(tiny_config()), 2)
    dense = DeepSeekMoEForCausalLM(
        ModelConfig(vocab_size=32, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16, moe=None)
    )
    with pytest.raises(ValueError, match="no MoELayer"):
        parallelize_moe(dense, 1)
