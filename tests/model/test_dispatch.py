"""LocalDispatcher: grouping contract of dispatch and the weighted inverse of combine."""

import torch

from deepseek_moe.model.dispatch import LocalDispatcher


def test_dispatch_groups_copies_by_expert_and_skips_dropped():
    x = torch.arange(4, dtype=torch.float32).view(4, 1).expand(4, 3).contiguous()  # row t = t
    ids = torch.tensor([[2, 0], [0, -1], [2, 3], [-1, 0]])
    x_ND, counts, _ = LocalDispatcher().dispatch(x, ids, torch.ones(ids.shape), num_experts=5)
    assert counts.tolist() == [3, 0, 2, 1, 0]  # includes empty experts
    assert x_ND[:, 0].tolist() == [0, 1, 3, 0, 2, 2]  # expert 0: t0,t1,t3; 2: t0,t2; 3: t2


def test_combine_is_weighted_inverse():
    torch.manual_seed(0)
    T, K, D, E = 7, 3, 5, 4
    x = torch.randn(T, D)
    ids = torch.randint(0, E, (T, K))
    ids[1, 2] = -1  # one dropped copy
    w = torch.rand(T, K)
    disp = LocalDispatcher()
    x_ND, counts, ctx = disp.dispatch(x, ids, w, E)
    # Fake expert e: multiply by (e + 1); computed on the dispatched rows.
    scale = torch.repeat_interleave(torch.arange(1, E + 1, dtype=torch.float32), counts)
    y = disp.combine(x_ND * scale[:, None], ctx)
    ref = torch.zeros(T, D)
    for t in range(T):
        for k in range(K):
            if ids[t, k] >= 0:
                ref[t] += w[t, k] * (ids[t, k] + 1) * x[t]
    torch.testing.assert_close(y, ref)


def test_combine_gradients_reach_expert_outputs_and_gates():
    torch.manual_seed(0)
    x = torch.randn(5, 3)
    ids = torch.randint(0, 3, (5, 2))
    w = torch.rand(5, 2, requires_grad=True)
    disp = LocalDispatcher()
    x_ND, _, ctx = disp.dispatch(x, ids, w, 3)
    y_ND = x_ND.clone().requires_grad_(True)
    disp.combine(y_ND, ctx).sum().backward()
    # d/dw[t,k] of sum_t sum_k w[t,k] x[t] = sum(x[t]); every copy row gets its gate as gradient.
    torch.testing.assert_close(w.grad, x.sum(1, keepdim=True).expand(5, 2))
    assert y_ND.grad.shape == y_ND.shape


def test_local_dispatch_reads_the_host_once():
    """One host read (the kept-copy count, needed for x_ND's size) and none in combine; on a GPU
    each read is a sync. Dropped copies are still excluded."""
    from tests.host_reads import count_host_reads

    ids = torch.tensor([[2, 0], [1, -1], [2, 1]])
    x, w = torch.randn(3, 4), torch.rand(3, 2)
    d = LocalDispatcher()
    with count_host_reads() as reads:
        x_ND, counts, ctx = d.dispatch(x, ids, w, 4)
    assert reads.ops == ["_local_scalar_dense"], reads.ops
    assert counts.tolist() == [1, 2, 2, 0] and x_ND.shape == (5, 4)
    with count_host_reads() as reads:
        d.combine(x_ND, ctx)
    assert reads.ops == []


def test_count_ids_equals_bincount():
    from deepseek_moe.model.dispatch import count_ids

    ids = torch.tensor([[3, 0], [3, 5], [0, 0]])
    assert torch.equal(count_ids(ids, 7), torch.bincount(ids.flatten(), minlength=7))
    assert count_ids(torch.zeros(0, 2, dtype=torch.long), 3).tolist() == [0, 0, 0]


def test_dropless_dispatch_reads_nothing_and_equals_the_general_path():
    """`may_drop=False` (no capacity, the presets): no host read at all, same rows and counts."""
    from tests.host_reads import count_host_reads

    torch.manual_seed(0)
    ids = torch.randint(0, 6, (9, 3))
    x, w = torch.randn(9, 4), torch.rand(9, 3)
    d = LocalDispatcher()
    x_ref, counts_ref, ctx_ref = d.dispatch(x, ids, w, 6)
    with count_host_reads() as reads:
        x_ND, counts, ctx = d.dispatch(x, ids, w, 6, may_drop=False)
        y = d.combine(x_ND * 2, ctx)
    assert reads.ops == [], reads.ops
    assert torch.equal(x_ND, x_ref) and torch.equal(counts, counts_ref)
    torch.testing.assert_close(y, d.combine(x_ref * 2, ctx_ref))
