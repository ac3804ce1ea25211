"""EP=2 and EP=4 give the EP=1 outputs, losses and gradients (fp32, 1e-5), no DeepSpeed engine.

Reference: ONE process runs the EP=1 model on every rank's micro-batch (same seed, same global
batch) and backpropagates the mean loss. The EP run: each rank builds the full model from the
seed, `parallelize_moe` keeps its experts and installs the all-to-all dispatcher.
"""

import pytest
import torch

from deepseek_moe.model.router import device_limited_topk
from deepseek_moe.checkpoint.keys import consolidated_state_dict
from deepseek_moe.parallel.expert_parallel import parallelize_moe
from deepseek_moe.parallel.metrics import ep_metrics
from deepseek_moe.parallel.groups import get_edp_group, get_ep_group
from deepseek_moe.testing.distributed import run_distributed
from tests.parallel._ep_common import (
    build_full_model,
    hf_grads,
    micro_batch,
    reference_forward_backward,
    set_bias,
    tiny_config,
)


def _ep_run(rank, world, ep_size, moe_overrides, bias):
    cfg = tiny_config(**moe_overrides)
    model = parallelize_moe(build_full_model(cfg), ep_size)
    if bias:
        set_bias(model, bias)
    ids, labels = micro_batch(0, rank)
    o = model(ids, labels)
    (o.loss / world).backward()
    return {
        "logits": o.logits_BSV.detach(),
        "loss": o.loss.detach(),
        "aux": o.aux_loss.detach(),
        "grads": hf_grads(model),
        "ep": ep_metrics(model),
        "counts": [l.last_counts_E for l in model.moe_layers()],
        "ep_ranks": torch.distributed.get_process_group_ranks(get_ep_group(ep_size)),
        "edp_ranks": torch.distributed.get_process_group_ranks(get_edp_group(ep_size)),
        "consolidated": consolidated_state_dict(model),
    }


def _check_against_reference(world, ep_size, moe_overrides=None, bias=None):
    moe_overrides = moe_overrides or {}
    cfg = tiny_config(**moe_overrides)
    ref_outs, ref_grads = reference_forward_backward(cfg, world, bias)
    results = run_distributed(_ep_run, world, ep_size, moe_overrides, bias)
    for r, res in enumerate(results):
        for key in ("logits", "loss", "aux"):
            torch.testing.assert_close(res[key], ref_outs[r][key], rtol=1e-5, atol=1e-5)
        assert res["grads"].keys() == ref_grads.keys() and ref_grads  # the loop below runs
        for name, g in ref_grads.items():
            torch.testing.assert_close(res["grads"][name], g, rtol=1e-5, atol=1e-5, msg=name)
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_ep_equals_ep1_outputs_losses_grads(world):
    results = _check_against_reference(
        world, ep_size=world, moe_overrides=dict(n_groups=world, topk_groups=world // 2)
    )
    # device-limited routing with M=2 groups of 2 experts: a token reaches at most 2 groups;
    # at EP=4 the groups ARE the ranks, so at most 2 ranks per token
    moe_layers = tiny_config().num_moe_layers
    for res in results:
        # both statistics of every MoE layer are present, so the checks below cannot be skipped
        assert len(res["ep"]) == 2 * moe_layers
        assert sum(k.endswith("a2a_ranks_per_token") for k in res["ep"]) == moe_layers
        for key, value in res["ep"].items():
            if key.endswith("a2a_ranks_per_token") and world == 4:
                assert 1.0 <= value <= 2.0
            if key.endswith("a2a_bytes"):
                assert value > 0


def test_ep2_inside_dp4_equals_ep1():
    # world 4, EP=2: two EP groups, expert grads also reduced over the EDP group
    results = _check_against_reference(4, ep_size=2)
    # hand layout: EP groups are consecutive ranks, EDP groups strided
    assert [r["ep_ranks"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["edp_ranks"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    # the first rank of each EP group gathers the full HF-layout weights; the others get {}
    full = build_full_model(tiny_config()).state_dict()
    for rank in (0, 2):
        sd = results[rank]["consolidated"]
        assert sd.keys() == full.keys() and all(torch.equal(sd[k], full[k]) for k in full)
    assert results[1]["consolidated"] == {} and results[3]["consolidated"] == {}


def test_m1_every_token_reaches_one_rank():
    # one routing group per EP rank, M = 1: each token's experts live on exactly one rank
    results = _check_against_reference(
        2, ep_size=2, moe_overrides=dict(n_groups=2, topk_groups=1, device_aux_alpha=0.0, comm_aux_alpha=0.0)
    )
    for res in results:
        ranks = [v for k, v in res["ep"].items() if k.endswith("a2a_ranks_per_token")]
        assert ranks and all(v == 1.0 for v in ranks)  # a mean of integers >= 1 equal to 1


def test_empty_expert_and_empty_rank():
    # selection bias: experts 4..7 (all of EP rank 1) and expert 0 are never chosen, so rank 1
    # receives no token at all and expert 0 of rank 0 runs on an empty slice
    bias = {0: -1e4, 4: -1e4, 5: -1e4, 6: -1e4, 7: -1e4}
    results = _check_against_reference(
        2,
        ep_size=2,
        moe_overrides=dict(
            bias_update_rate=1e-3, n_groups=1, topk_groups=1, device_aux_alpha=0.0, comm_aux_alpha=0.0
        ),
        bias=bias,
    )
    for res in results:
        assert len(res["counts"]) == tiny_config().num_moe_layers > 0
        for counts_E in res["counts"]:
            assert counts_E[[0, 4, 5, 6, 7]].sum() == 0
        # the empty experts' params still got a (zero) gradient, so ZeRO/DP see every param
        g = res["grads"]["model.layers.1.mlp.experts.5.up_proj.weight"]
        assert torch.count_nonzero(g) == 0


def test_m_equals_groups_is_plain_topk():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(50, 8, generator=g)
    ids = device_limited_topk(scores, top_k=3, n_groups=4, topk_groups=4)
    assert torch.equal(ids, torch.topk(scores, 3).indices)
    # and M = 1 keeps every token inside one group of 2 experts (hand rule: group = id // 2)
    ids1 = device_limited_topk(scores, top_k=2, n_groups=4, topk_groups=1)
    assert torch.all(ids1[:, 0] // 2 == ids1[:, 1] // 2)


def _meta_build(rank, world):
    from deepseek_moe.model.transformer import DeepSeekMoEForCausalLM
    from deepseek_moe.checkpoint.keys import load_consolidated_state_dict

    cfg = tiny_config()
    full_sd = build_full_model(cfg).state_dict()  # stands in for a consolidated checkpoint
    # the scalable path: never materialise other ranks' experts
    with torch.device("meta"):
        model = DeepSeekMoEForCausalLM(cfg, ep_rank=rank, ep_size=world)
    model.to_empty(device="cpu")
    model.init_weights()  # RoPE tables and buffers; the weights come from the load
    parallelize_moe(model, world)
    load_consolidated_state_dict(model, full_sd)
    sliced = parallelize_moe(build_full_model(cfg), world)
    ids, _ = micro_batch(0, rank)
    with torch.no_grad():
        return model(ids).logits_BSV, sliced(ids).logits_BSV


def test_meta_device_local_build_matches_sliced_full_build():
    for got, want in run_distributed(_meta_build, 2):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
