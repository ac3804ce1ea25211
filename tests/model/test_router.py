"""Router: hand-computed routing, device-limited routing vs a loop reference, V3 bias, noise."""

import math

import pytest
import torch

from deepseek_moe.config.model import MoEConfig
from deepseek_moe.model.dispatch import count_ids
from deepseek_moe.model.router import Router, check_skip_top, device_limited_topk, route


def _logits(probs):
    return torch.tensor(probs, dtype=torch.float32).log()


def test_softmax_topk_hand_computed():
    logits = _logits([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    scores, ids, w = route(logits, top_k=2)
    torch.testing.assert_close(scores, torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]))
    assert ids.tolist() == [[3, 2], [0, 1]]
    torch.testing.assert_close(w, torch.tensor([[0.4, 0.3], [0.4, 0.3]]))  # NOT renormalised


def test_norm_topk_prob_and_scaling_hand_computed():
    logits = _logits([[0.1, 0.2, 0.3, 0.4]])
    _, _, w = route(logits, top_k=2, norm_topk_prob=True, routed_scaling_factor=2.0)
    torch.testing.assert_close(w, torch.tensor([[8 / 7, 6 / 7]]))
    _, _, w = route(logits, top_k=2, routed_scaling_factor=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.8, 0.6]]))


def test_sigmoid_scores_hand_computed():
    scores, ids, w = route(torch.tensor([[0.0, math.log(3.0), -1.0]]), top_k=1, scoring_func="sigmoid")
    assert ids.tolist() == [[1]]
    torch.testing.assert_close(w, torch.tensor([[0.75]]))
    torch.testing.assert_close(scores[0, 0], torch.tensor(0.5))


def test_device_limited_changes_choice_hand_computed():
    # Groups {0,1} and {2,3}: group maxima 0.4 and 0.3 -> keep group 0 only (M=1).
    logits = _logits([[0.4, 0.05, 0.3, 0.25]])
    _, ids_plain, _ = route(logits, top_k=2, n_groups=2, topk_groups=2)
    _, ids_lim, w_lim = route(logits, top_k=2, n_groups=2, topk_groups=1)
    assert ids_plain.tolist() == [[0, 2]]
    assert ids_lim.tolist() == [[0, 1]]
    torch.testing.assert_close(w_lim, torch.tensor([[0.4, 0.05]]))


def _loop_device_limited(scores, top_k, n_groups, topk_groups):
    """Reference: per token, rank groups by max score, then top-k over allowed experts."""
    T, E = scores.shape
    per = E // n_groups
    out = []
    for t in range(T):
        row = scores[t].tolist()
        gmax = [max(row[g * per : (g + 1) * per]) for g in range(n_groups)]
        keep = sorted(range(n_groups), key=lambda g: -gmax[g])[:topk_groups]
        allowed = [e for e in range(E) if e // per in keep]
        out.append(set(sorted(allowed, key=lambda e: -row[e])[:top_k]))
    return out


@pytest.mark.parametrize("n_groups, topk_groups, top_k", [(4, 2, 3), (4, 1, 2), (8, 3, 6), (2, 1, 4)])
def test_device_limited_matches_loop_reference(n_groups, topk_groups, top_k):
    torch.manual_seed(0)
    scores = torch.rand(64, 16)  # continuous values: no ties
    ids = device_limited_topk(scores, top_k=top_k, n_groups=n_groups, topk_groups=topk_groups)
    ref = _loop_device_limited(scores, top_k, n_groups, topk_groups)
    assert [set(r) for r in ids.tolist()] == ref
    # Never more than M distinct groups per token.
    groups = ids // (16 // n_groups)
    assert max(len(set(g)) for g in groups.tolist()) <= topk_groups


def test_device_limited_with_all_groups_is_plain_topk():
    torch.manual_seed(1)
    scores = torch.randn(100, 12).softmax(-1)
    ids = device_limited_topk(scores, top_k=4, n_groups=3, topk_groups=3)
    torch.testing.assert_close(ids, torch.topk(scores, 4).indices)
    # M = D must not change the rule for any grouping (and agrees with the loop reference).
    for g in (1, 2, 4, 6, 12):
        torch.testing.assert_close(device_limited_topk(scores, top_k=4, n_groups=g, topk_groups=g), ids)
    assert [set(r) for r in ids.tolist()] == _loop_device_limited(scores, 4, 3, 3)


def test_selection_bias_changes_selection_not_gates():
    logits = _logits([[0.4, 0.05, 0.3, 0.25]])
    _, ids, w = route(logits, top_k=2, bias_E=torch.tensor([0.0, 0.0, 0.0, 0.2]))
    assert ids.tolist() == [[3, 0]]  # selection on [0.4, 0.05, 0.3, 0.45]
    torch.testing.assert_close(w, torch.tensor([[0.25, 0.4]]))  # gates from unbiased scores


def test_update_bias_sign_rule_and_accumulation():
    cfg = MoEConfig(n_routed_experts=4, top_k=1, bias_update_rate=0.01)
    router = Router(3, cfg)
    router.train()
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [-1.0, -1.0, -1.0]]))
    # Two micro-batches (grad accumulation): loads add up before one update. The MoE layer
    # counts each forward's selections once and hands them to the router.
    for x in ([[5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0]], [[5.0, 0, 0], [0, 0, 5.0], [-5.0, -5.0, -5.0]]):
        router.record_load(count_ids(router(torch.tensor(x)).ids_TK, 4))
    assert router.pending_load_E.tolist() == [3.0, 1.0, 1.0, 1.0]
    router.update_bias()
    # mean load 1.5: expert 0 overloaded (-rate), the others underloaded (+rate).
    torch.testing.assert_close(router.e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    assert router.pending_load_E.sum() == 0
    router.update_bias()  # nothing accumulated: no change
    torch.testing.assert_close(router.e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    off = Router(3, MoEConfig(n_routed_experts=4, top_k=1))  # no bias: nothing is accumulated
    off.record_load(torch.ones(4, dtype=torch.long))
    assert off.pending_load_E.sum() == 0


def test_update_bias_reduces_its_own_loads_first():
    """Under DP/EP the router sums the loads of every rank with the collective it is given
    (here a stand-in that adds another rank's loads) before the sign rule."""
    cfg = MoEConfig(n_routed_experts=4, top_k=1, bias_update_rate=0.01)
    router = Router(3, cfg)
    router.train()
    with torch.no_grad():
        router.weight.copy_(torch.eye(4, 3))
    router.record_load(
        count_ids(router(torch.tensor([[5.0, 0, 0], [5.0, 0, 0]])).ids_TK, 4)
    )  # expert 0 twice
    calls = []

    def reduce_sum(tensors):  # the other rank picked expert 3 six times
        calls.append(len(tensors))
        tensors[0] += torch.tensor([0.0, 0.0, 0.0, 6.0])

    router.update_bias(reduce_sum)
    # summed loads [2, 0, 0, 6], mean 2: expert 3 over (-), 1 and 2 under (+), 0 at the mean (0)
    torch.testing.assert_close(router.e_score_correction_bias, torch.tensor([0.0, 0.01, 0.01, -0.01]))
    assert calls == [1] and router.pending_load_E.sum() == 0
    # off (rate 0): no collective is issued at all
    off = Router(3, MoEConfig(n_routed_experts=4, top_k=1))
    off.update_bias(reduce_sum)
    assert calls == [1]


def test_noise_only_in_training():
    torch.manual_seed(0)
    cfg = MoEConfig(n_routed_experts=8, top_k=2, router_noise_std=1.0)
    router = Router(4, cfg)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(16, 4)
    router.eval()
    a, b = router(x), router(x)
    torch.testing.assert_close(a.logits_TE, b.logits_TE)
    torch.testing.assert_close(a.logits_TE, x @ router.weight.T)
    router.train()
    c = router(x)
    assert not torch.allclose(c.logits_TE, a.logits_TE)


def test_router_computes_in_fp32_for_bf16_input():
    cfg = MoEConfig(n_routed_experts=8, top_k=2)
    router = Router(4, cfg).to(torch.bfloat16)
    out = router(torch.randn(5, 4, dtype=torch.bfloat16))
    assert out.logits_TE.dtype == torch.float32 and out.weights_TK.dtype == torch.float32


# ---- skip_top: the DeepSeekMoE Fig. 4 redundancy test (analysis knob) --------------------------

# Six experts, two tokens with distinct affinities whose order is written out by hand.
_PROBS = [[0.05, 0.30, 0.10, 0.25, 0.20, 0.10 - 1e-3], [0.22, 0.02, 0.16, 0.08, 0.12, 0.40 - 1e-3]]
_ORDER = [[1, 3, 4, 2, 5, 0], [5, 0, 2, 4, 3, 1]]  # experts by affinity, best first


def _hand_router(top_k: int, **moe) -> Router:
    """A router whose logits are the token vector itself (identity weight)."""
    router = Router(6, MoEConfig(n_routed_experts=6, top_k=top_k, **moe))
    with torch.no_grad():
        router.weight.copy_(torch.eye(6))
    return router.eval()


@pytest.mark.parametrize("skip", [1, 2, 3])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_skip_top_selects_the_next_ranked_experts_with_their_own_affinities(skip, top_k):
    probs = torch.tensor(_PROBS)
    router = _hand_router(top_k)
    router.skip_top = skip
    out = router(probs.log())
    p = probs / probs.sum(-1, keepdim=True)  # the softmax of the logits
    for t in range(2):
        want = _ORDER[t][skip : skip + top_k]
        assert out.ids_TK[t].tolist() == want
        torch.testing.assert_close(out.weights_TK[t], p[t, want])  # original affinities, not renormalised
    # norm_topk_prob and the scaling factor apply to the chosen experts as usual
    _, ids, w = route(probs.log(), top_k=top_k, skip_top=skip, norm_topk_prob=True, routed_scaling_factor=2.0)
    for t in range(2):
        want = _ORDER[t][skip : skip + top_k]
        torch.testing.assert_close(w[t], 2.0 * p[t, want] / p[t, want].sum())


def test_skip_top_under_device_limited_routing_masks_before_the_groups():
    # Groups {0,1,2} and {3,4,5}, one kept group. Token 0: best expert 1 (group 0) is masked;
    # group maxima then 0.10 (expert 2) vs 0.25 (expert 3): group 1 wins -> experts 3, 4.
    # Token 1: best expert 5 (group 1) masked; maxima 0.22 vs 0.12: group 0 -> experts 0, 2.
    _, ids, _ = route(torch.tensor(_PROBS).log(), top_k=2, n_groups=2, topk_groups=1, skip_top=1)
    assert ids.tolist() == [[3, 4], [0, 2]]
    # and against the loop reference on random scores: mask each token's top R, then route
    torch.manual_seed(0)
    scores = torch.rand(64, 16)
    for skip in (1, 3):
        _, ids, _ = route(scores.log(), top_k=3, n_groups=4, topk_groups=2, skip_top=skip)
        masked = scores.clone()
        for t in range(64):
            for e in sorted(range(16), key=lambda e: -scores[t, e].item())[:skip]:
                masked[t, e] = -1.0
        assert [set(r) for r in ids.tolist()] == _loop_device_limited(masked, 3, 4, 2)


def test_skip_top_zero_is_plain_routing_bitwise():
    torch.manual_seed(0)
    logits = torch.randn(32, 16)
    router = _hand_router(2)
    x = torch.randn(32, 6)
    before = router(x)
    router.skip_top = 2
    router.skip_top = 0
    after = router(x)
    for a, b in zip(
        (before.scores_TE, before.ids_TK, before.weights_TK),
        (after.scores_TE, after.ids_TK, after.weights_TK),
    ):
        assert torch.equal(a, b)
    scores, ids, w = route(logits, top_k=4, skip_top=0)
    ref_ids = torch.topk(logits.softmax(-1), 4).indices
    assert torch.equal(ids, ref_ids) and torch.equal(w, logits.softmax(-1).gather(1, ref_ids))


def test_skip_top_limits():
    check_skip_top(4, MoEConfig(n_routed_experts=6, top_k=2))
    with pytest.raises(ValueError, match="at most 4"):
        check_skip_top(5, MoEConfig(n_routed_experts=6, top_k=2))
    # device-limited: one kept group of 3 experts holds at most 3 = R + K
    check_skip_top(1, MoEConfig(n_routed_experts=6, top_k=2, n_groups=2, topk_groups=1))
    with pytest.raises(ValueError, match="kept groups"):
        check_skip_top(2, MoEConfig(n_routed_experts=6, top_k=2, n_groups=2, topk_groups=1))
