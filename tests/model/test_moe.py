"""MoELayer against a per-token loop reference (outputs and gradients) and HF DeepseekV2Moe."""

import math

import pytest
import torch
import torch.nn.functional as F

from deepseek_moe.config.model import MoEConfig
from deepseek_moe.model.dispatch import LocalDispatcher
from deepseek_moe.model.moe import MoELayer, capacity_mask
from deepseek_moe.model.hf_compat import copy_moe_weights_to_hf

D = 16


def _layer(seed=0, **kw) -> MoELayer:
    torch.manual_seed(seed)
    cfg = MoEConfig(
        **{
            **dict(
                n_routed_experts=8, n_shared_experts=2, top_k=2, moe_intermediate_size=8, aux_loss_alpha=0.0
            ),
            **kw,
        }
    )
    layer = MoELayer(D, cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def reference_moe(layer: MoELayer, x_TD: torch.Tensor, capacity=None) -> torch.Tensor:
    """Loop reference: per-token routing (sorting python lists), per-copy expert calls."""
    cfg = layer.cfg
    E, K = cfg.n_routed_experts, cfg.top_k
    per = E // cfg.n_groups
    probs = torch.softmax(x_TD.float() @ layer.gate.weight.float().T, dim=-1)
    copies = []  # (t, k, expert, score)
    for t in range(x_TD.shape[0]):
        row = probs[t].tolist()
        gmax = [max(row[g * per : (g + 1) * per]) for g in range(cfg.n_groups)]
        keep = sorted(range(cfg.n_groups), key=lambda g: -gmax[g])[: cfg.topk_groups]
        allowed = [e for e in range(E) if e // per in keep]
        for k, e in enumerate(sorted(allowed, key=lambda e: -row[e])[:K]):
            copies.append((t, k, e, row[e]))
    if capacity is not None:
        kept = []
        for e in range(E):
            mine = sorted([c for c in copies if c[2] == e], key=lambda c: (-c[3], c[0] * K + c[1]))
            kept += mine[:capacity]
        copies = kept
    out = [
        layer.shared_experts(x_TD[t : t + 1])[0]
        if layer.shared_experts is not None
        else torch.zeros(x_TD.shape[1])
        for t in range(x_TD.shape[0])
    ]
    for t, k, e, _ in copies:
        gate = probs[t, e] * cfg.routed_scaling_factor
        w_gate, w_up, w_down = layer.experts.expert_weights(e)
        x = x_TD[t : t + 1]
        y = F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)
        out[t] = out[t] + gate * y[0]
    return torch.stack(out)


def _grads(layer, x, y, gy):
    params = [x] + list(layer.parameters())
    return torch.autograd.grad(y, params, gy, allow_unused=False)


def _assert_grads_close(got, want):
    """fp32: each gradient within 1e-4 relative, absolute floor 1e-6 of the tensor's scale
    (per-token and batched sums round differently where entries cancel)."""
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
@pytest.mark.parametrize("groups", [(1, 1), (4, 2)])
def test_layer_matches_loop_reference(impl, groups):
    layer = _layer(experts_impl=impl, n_groups=groups[0], topk_groups=groups[1], routed_scaling_factor=1.5)
    x = torch.randn(2, 9, D, requires_grad=True)
    y, aux = layer(x)
    assert aux == {} and y.shape == x.shape
    ref = reference_moe(layer, x.view(-1, D)).view_as(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    gy = torch.randn_like(y)
    _assert_grads_close(_grads(layer, x, y, gy), _grads(layer, x, ref, gy))


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
def test_experts_with_zero_tokens_stay_in_graph(impl):
    layer = _layer(experts_impl=impl)
    with torch.no_grad():
        layer.gate.weight[5:, 0] = -50.0  # experts 5..7 never win when x[:, 0] > 0
    x = torch.randn(10, D)
    x[:, 0] = x[:, 0].abs() + 1.0
    x.requires_grad_(True)
    y, _ = layer(x)
    assert layer.last_counts_E[5:].sum() == 0
    y.sum().backward()  # expanded (stride-0) output grad: grouped_mm needs it made contiguous
    for p in layer.experts.parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad[5:]) == 0
    ref = reference_moe(layer, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def test_grouped_mm_rejects_unaligned_widths():
    with pytest.raises(ValueError, match="divisible by 8"):
        _layer(experts_impl="grouped_mm", moe_intermediate_size=6)


def test_capacity_mask_matches_loop():
    torch.manual_seed(0)
    T, K, E = 40, 3, 6
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    aff = torch.rand(T, K)
    aff[0, 0] = aff[1, 0]  # a tie, broken by copy index
    cap = 13
    kept = capacity_mask(ids, aff, num_experts=E, capacity=cap)
    ref = torch.zeros(T, K, dtype=torch.bool)
    for e in range(E):
        mine = sorted(
            [(t, k) for t in range(T) for k in range(K) if ids[t, k] == e],
            key=lambda c: (-aff[c].item(), c[0] * K + c[1]),
        )
        for c in mine[:cap]:
            ref[c] = True
    assert torch.equal(kept, ref)


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
def test_capacity_dropping_matches_reference_and_reports(impl):
    layer = _layer(experts_impl=impl, capacity_factor=0.5)
    with torch.no_grad():
        layer.gate.weight[0] += 1.0  # make expert 0 popular so it overflows
    x = torch.randn(24, D, requires_grad=True)
    layer.train()
    y, _ = layer(x)
    cap = math.ceil(0.5 * 24 * 2 / 8)
    ref = reference_moe(layer, x, capacity=cap)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    gy = torch.randn_like(y)
    _assert_grads_close(_grads(layer, x, y, gy), _grads(layer, x, ref, gy))
    dropped = layer.stats.compute_metrics()["dropped_frac"]
    assert dropped > 0
    # Eval never drops.
    layer.eval()
    y_eval, _ = layer(x)
    torch.testing.assert_close(y_eval, reference_moe(layer, x), rtol=1e-5, atol=1e-6)


def test_aux_losses_and_metrics_wired():
    layer = _layer(
        aux_loss_alpha=0.01,
        device_aux_alpha=0.02,
        comm_aux_alpha=0.03,
        z_loss_coef=1e-3,
        n_groups=4,
        topk_groups=2,
    )
    layer.train()
    x = torch.randn(3, 5, D)
    _, aux = layer(x)
    assert set(aux) == {"expert_balance", "device_balance", "comm_balance", "z_loss"}
    m = layer.stats.compute_metrics(reset=True)
    assert m["load_imbalance"] >= 1.0 and m["dropped_frac"] == 0.0
    assert 1.0 <= m["groups_per_token"] <= 2.0 and m["ranks_per_token"] == 1.0
    assert 0 < m["router_entropy"] <= math.log(8) + 1e-6
    assert layer.stats.compute_metrics() == {}  # reset


def test_ep_layer_requires_a_real_dispatcher():
    cfg = MoEConfig(n_routed_experts=8, top_k=2, moe_intermediate_size=4)
    layer = MoELayer(D, cfg, ep_rank=1, ep_size=2)
    assert len(layer.experts) == 4 and layer.local_expert_offset == 4
    with pytest.raises(RuntimeError, match="all-to-all dispatcher"):
        layer(torch.randn(3, D))
    with pytest.raises(ValueError, match="ep_size=3"):
        MoELayer(D, cfg, ep_size=3)


def test_apply_ep_keeps_this_ranks_experts_and_installs_the_dispatcher():
    """The layer parallelizes itself: rank 1 of 2 keeps experts 4..7 of the full layer (the same
    tensors as the full build's slice), its dispatcher, EP ranks in the statistics."""
    full = _layer(seed=3)
    layer = _layer(seed=3)
    made, wrapped = [], []

    class Marker(torch.nn.Module):  # stands in for an engine's wrapper (DeepSpeedExperts)
        def __init__(self, experts):
            super().__init__()
            self.local_experts = experts
            wrapped.append(experts)

        def forward(self, x_ND, counts_L):
            return self.local_experts(x_ND, counts_L)

    def make():
        made.append(LocalDispatcher())
        return made[-1]

    layer.apply_ep(ep_rank=1, ep_size=2, make_dispatcher=make, wrap_experts=Marker)
    assert (layer.num_local_experts, layer.local_expert_offset, layer.stats.num_ranks) == (4, 4, 2)
    assert layer.dispatcher is made[0] and len(made) == 1
    assert isinstance(layer.experts, Marker) and layer.routed_experts is wrapped[0]
    for l in range(4):
        for got, want in zip(layer.routed_experts.expert_weights(l), full.experts.expert_weights(4 + l)):
            assert torch.equal(got, want)
    with pytest.raises(ValueError, match="already parallelized"):
        layer.apply_ep(ep_rank=1, ep_size=2, make_dispatcher=make)
    # an already-local build must be the right rank's
    local = MoELayer(D, full.cfg, ep_rank=0, ep_size=2)
    with pytest.raises(ValueError, match="Build it with ep_rank=1, ep_size=2"):
        local.apply_ep(ep_rank=1, ep_size=2, make_dispatcher=make)
    local.apply_ep(ep_rank=0, ep_size=2, make_dispatcher=make)
    assert (local.num_local_experts, local.local_expert_offset) == (4, 0)


# ---- HF transformers parity -------------------------------------------------------------------


@pytest.mark.parametrize(
    "topk_method, n_group, topk_group", [("greedy", 1, 1), ("group_limited_greedy", 4, 2)]
)
def test_parity_with_hf_deepseek_v2_moe(topk_method, n_group, topk_group):
    """HF DeepseekV2Moe (eager experts) == ours. HF V2 never renormalises top-k gates and
    multiplies by routed_scaling_factor, like DeepSeekMoE/V2 (our norm_topk_prob=False)."""
    import transformers
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    E, H, K = 8, 8, 3
    layer = _layer(
        n_routed_experts=E,
        moe_intermediate_size=H,
        top_k=K,
        n_shared_experts=2,
        n_groups=n_group,
        topk_groups=topk_group,
        routed_scaling_factor=1.3,
    )
    hf_cfg = transformers.DeepseekV2Config(
        hidden_size=D,
        moe_intermediate_size=H,
        n_routed_experts=E,
        num_experts_per_tok=K,
        n_shared_experts=2,
        n_group=n_group,
        topk_group=topk_group,
        topk_method=topk_method,
        routed_scaling_factor=1.3,
        hidden_act="silu",
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    hf = DeepseekV2Moe(hf_cfg).float()
    copy_moe_weights_to_hf(layer, hf)
    x = torch.randn(2, 11, D)
    y, _ = layer(x)
    torch.testing.assert_close(y, hf(x), rtol=1e-5, atol=1e-6)


def test_parity_with_hf_deepseek_v3_moe_sigmoid_bias_norm():
    """V3 options: sigmoid scores, selection-only bias, renormalised top-k, scaling. HF V3 scores
    groups by a top-2 sum (we use the V2 max), so all groups are kept here (M = D): then both
    rules are plain top-k over scores + bias."""
    import transformers
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    E, H, K = 8, 8, 3
    layer = _layer(
        n_routed_experts=E,
        moe_intermediate_size=H,
        top_k=K,
        n_shared_experts=1,
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        bias_update_rate=1e-3,
        n_groups=2,
        topk_groups=2,
    )
    with torch.no_grad():
        layer.gate.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, E))
    hf_cfg = transformers.DeepseekV3Config(
        hidden_size=D,
        moe_intermediate_size=H,
        n_routed_experts=E,
        num_experts_per_tok=K,
        n_shared_experts=1,
        n_group=2,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        hidden_act="silu",
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    hf = DeepseekV3MoE(hf_cfg).float()
    copy_moe_weights_to_hf(layer, hf)
    layer.eval()
    x = torch.randn(2, 11, D)
    y, _ = layer(x)
    torch.testing.assert_close(y, hf(x), rtol=1e-5, atol=1e-6)
    # The bias really changed some selections (else this test would not cover it).
    biased = layer.gate(x.view(-1, D)).ids_TK
    plain = torch.topk(torch.sigmoid(x.view(-1, D) @ layer.gate.weight.T), K).indices
    assert (biased.sort(-1).values != plain.sort(-1).values).any()


@pytest.mark.parametrize(
    "experts_impl,capacity_factor,expected",
    [
        ("grouped_mm", None, []),  # dropless: nothing waits for the host, forward or backward
        ("grouped_mm", 1.0, ["_local_scalar_dense"]),  # the kept-copy count sizes x_ND
        ("loop", None, ["tolist"]),  # the loop kernel reads its counts
    ],
)
def test_moe_layer_host_reads_per_training_step(experts_impl, capacity_factor, expected):
    """Host reads of one MoE layer's training forward + backward at EP=1 (each is a sync on a GPU),
    with every tensor made on its inputs' device (default device = meta catches one that is not)."""
    from tests.host_reads import count_host_reads, created_on_meta_by_default

    from tests.parallel._ep_common import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config(moe_intermediate_size=16, capacity_factor=capacity_factor, experts_impl=experts_impl)
    layer = MoELayer(cfg.hidden_size, cfg.moe).train()
    x = torch.randn(2, 8, cfg.hidden_size, requires_grad=True)
    with count_host_reads() as reads, created_on_meta_by_default():
        y, aux = layer(x)
        (y.sum() + sum(aux.values())).backward()
    assert reads.ops == expected


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_experts_are_counted_once_per_forward_and_shared(capacity_factor):
    """One histogram per forward (every count_ids/bincount call is counted) serves the
    dispatcher, the expert and device balance losses, the V3 bias loads and the statistics;
    each of them equals np.bincount of the router's selections."""
    import numpy as np

    from tests.count_calls import count_histograms

    layer = _layer(
        n_groups=2,
        aux_loss_alpha=0.01,
        device_aux_alpha=0.01,
        bias_update_rate=0.01,
        capacity_factor=capacity_factor,
    )
    layer.train()
    xs = [torch.randn(24, D), torch.randn(2, 5, D)]
    want = np.zeros(8, dtype=np.int64)
    for x in xs:
        ids = layer.gate(x.reshape(-1, D)).ids_TK  # the router alone has no side effects
        want += np.bincount(ids.flatten().numpy(), minlength=8)
        with count_histograms() as calls:
            layer(x)
        assert calls == [("count_ids", 8)]
        assert layer.last_counts_E.tolist() == np.bincount(ids.flatten().numpy(), minlength=8).tolist()
    assert layer.stats.tokens_per_expert_E.tolist() == want.tolist()
    assert layer.gate.pending_load_E.tolist() == want.tolist()
    if capacity_factor is not None:
        dropped = layer.stats.counters[2].item()
        cap_24, cap_10 = math.ceil(0.5 * 24 * 2 / 8), math.ceil(0.5 * 10 * 2 / 8)
        ref = 0
        for x, cap in zip(xs, (cap_24, cap_10)):
            c = np.bincount(layer.gate(x.reshape(-1, D)).ids_TK.flatten().numpy(), minlength=8)
            ref += int(np.maximum(c - cap, 0).sum())
        assert dropped == ref and ref > 0


def test_evaluation_forwards_count_in_nothing():
    layer = _layer(bias_update_rate=0.01)
    x = torch.randn(6, D)
    layer.eval()
    layer(x)
    layer.train()
    with torch.no_grad():  # a training-mode forward without autograd is not training either
        layer(x)
    assert layer.stats.tokens_per_expert_E.sum() == 0 and layer.gate.pending_load_E.sum() == 0
    assert layer.stats.counters.sum() == 0
    layer(x)
    assert layer.stats.tokens_per_expert_E.sum() == 6 * 2 and layer.gate.pending_load_E.sum() == 12


def test_stats_switch_off_keeps_the_bias_loads():
    layer = _layer(bias_update_rate=0.01)
    layer.train()
    layer.stats.enabled = False
    layer(torch.randn(6, D))
    assert layer.stats.counters.sum() == 0 and layer.gate.pending_load_E.sum() == 12


def test_compute_metrics_reads_the_device_once():
    from tests.host_reads import count_host_reads

    layer = _layer()
    layer.train()
    layer(torch.randn(6, D))
    with count_host_reads() as reads:
        metrics = layer.stats.compute_metrics()
    assert reads.ops == ["tolist"] and metrics["load_imbalance"] >= 1.0
