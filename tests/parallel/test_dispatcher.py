"""`AllToAllDispatcher` against a single-process loop reference (gloo, 2 and 4 ranks), with the
local expert ids packed into the row exchange and (fallback) sent separately.

Each rank holds its own tokens; the "experts" are per-expert matrices A_e (y = x @ A_e), so a
copy routed to the wrong expert, a lost copy or a wrong gate changes the output. The reference
loops over every token of every rank in one process.
"""

import pytest
import torch

from deepseek_moe.parallel.dispatcher import AllToAllDispatcher, ids_fit_in
from deepseek_moe.testing.distributed import run_distributed
from tests.host_reads import count_host_reads, created_on_meta_by_default

D, K, E = 4, 2, 8


def _case(world):
    g = torch.Generator().manual_seed(7)
    A = torch.randn(E, D, D, generator=g)
    T = [5, 3, 0, 6][:world]  # rank 2 (world 4) has no tokens at all
    xs, ids, ws, gs = [], [], [], []
    for r in range(world):
        x = torch.randn(T[r], D, generator=g)
        # ids in [0, E) but never expert 3 (an expert with no tokens anywhere) and, at world 4,
        # never experts 6/7 (rank 3 receives nothing)
        allowed = torch.tensor([0, 1, 2, 4, 5] + ([6, 7] if world < 4 else []))
        i = (
            allowed[torch.stack([torch.randperm(len(allowed), generator=g)[:K] for _ in range(T[r])])]
            if T[r]
            else torch.zeros(0, K, dtype=torch.long)
        )
        if T[r] > 1:
            i[1, 0] = -1  # a dropped copy: contributes exactly 0
        xs.append(x)
        ids.append(i.long())
        ws.append(torch.rand(T[r], K, generator=g))
        gs.append(torch.randn(T[r], D, generator=g))
    return A, xs, ids, ws, gs


def _reference(world):
    A, xs, ids, ws, gs = _case(world)
    A = A.clone().requires_grad_(True)
    xs = [x.clone().requires_grad_(True) for x in xs]
    ws = [w.clone().requires_grad_(True) for w in ws]
    ys, loss = [], 0.0
    for r in range(world):
        rows = []
        for t in range(xs[r].shape[0]):
            acc = torch.zeros(D)
            for k in range(K):
                e = int(ids[r][t, k])
                if e >= 0:
                    acc = acc + ws[r][t, k] * (xs[r][t] @ A[e])
            rows.append(acc)
        y = torch.stack(rows) if rows else torch.zeros(0, D)
        ys.append(y.detach())
        loss = loss + (y * gs[r]).sum()
    loss.backward()

    # a rank with no tokens has empty (not missing) gradients
    def grad(t):
        return torch.zeros_like(t) if t.grad is None else t.grad

    return A.grad, ys, [grad(x) for x in xs], [grad(w) for w in ws]


def _run(rank, world, packed_ids=True):
    if not packed_ids:  # as if x's dtype could not hold the local ids: separate int64 exchange
        import deepseek_moe.parallel.dispatcher as dispatcher_module

        dispatcher_module.ids_fit_in = lambda dtype, num_local: False
    A, xs, ids, ws, gs = _case(world)
    disp = AllToAllDispatcher(None, E)
    L = disp.num_local_experts
    A_local = A[rank * L : (rank + 1) * L].clone().requires_grad_(True)
    x = xs[rank].clone().requires_grad_(True)
    w = ws[rank].clone().requires_grad_(True)
    with count_host_reads() as reads, created_on_meta_by_default():
        x_ND, counts_L, ctx = disp.dispatch(x, ids[rank], w, E)
    chunks = torch.split(x_ND, counts_L.tolist())
    y_ND = torch.cat([c @ A_local[l] for l, c in enumerate(chunks)])  # every expert runs, even empty
    with count_host_reads() as combine_reads, created_on_meta_by_default():
        y = disp.combine(y_ND, ctx)
    with count_host_reads() as backward_reads, created_on_meta_by_default():
        (y * gs[rank]).sum().backward()
    return {
        "y": y.detach(),
        "gx": x.grad,
        "gw": w.grad,
        "gA": A_local.grad,
        "counts": counts_L,
        "stats": disp.pop_stats(),
        "host_reads": reads.ops + combine_reads.ops,
        "backward_reads": backward_reads.ops,
    }


@pytest.mark.parametrize("world,packed_ids", [(2, True), (4, True), (2, False)])
def test_dispatch_combine_matches_loop_reference(world, packed_ids):
    gA, ys, gxs, gws = _reference(world)
    _, _, ids, _, _ = _case(world)
    out = run_distributed(_run, world, packed_ids)
    L = E // world
    all_ids = torch.cat(ids).flatten()
    for r, o in enumerate(out):
        torch.testing.assert_close(o["y"], ys[r], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o["gx"], gxs[r], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o["gw"], gws[r], rtol=1e-5, atol=1e-5)
        # expert grads: summed over the tokens of ALL ranks, like the single-process model
        torch.testing.assert_close(o["gA"], gA[r * L : (r + 1) * L], rtol=1e-5, atol=1e-5)
        expected_counts = torch.bincount(all_ids[all_ids >= 0], minlength=E)[r * L : (r + 1) * L]
        assert torch.equal(o["counts"], expected_counts)
        assert o["stats"]["a2a_calls"] == 1.0
        # one host read per layer call: the receiver's per-expert counts came with the split
        # sizes (counts_L stays a tensor), and combine reads nothing
        assert o["host_reads"] == ["tolist"], o["host_reads"]
        assert o["backward_reads"] == [], o["backward_reads"]  # the backward reads nothing
    if world == 4:
        assert out[3]["counts"].sum() == 0 and out[2]["y"].shape == (0, D)

    # hand count of the traffic: a token goes once to each rank holding one of its experts
    def dests(s):
        return [set(int(e) // L for e in row if e >= 0) for row in ids[s]]

    for r, o in enumerate(out):
        sent = sum(len(d - {r}) for d in dests(r))
        recv = sum(sum(r in d for d in dests(s)) for s in range(world) if s != r)
        # a sent pair: its fp32 row, K fp32 gates and K local ids (fp32 packed, else int64)
        id_bytes = 4 if packed_ids else 8
        assert o["stats"]["a2a_bytes"] == sent * (D * 4 + K * 4 + K * id_bytes) + recv * D * 4
        copies_sent = int(((ids[r] >= 0) & (ids[r] // L != r)).sum())
        copies_recv = sum(int(((ids[s] >= 0) & (ids[s] // L == r)).sum()) for s in range(world) if s != r)
        assert o["stats"]["copy_bytes"] == (copies_sent + copies_recv) * D * 4
        n_tok = ids[r].shape[0]
        expected_rpt = sum(len(d) for d in dests(r)) / max(n_tok, 1)
        assert o["stats"]["ranks_per_token"] == pytest.approx(expected_rpt)


def test_ids_fit_in_exact_float_range():
    assert ids_fit_in(torch.bfloat16, 256) and not ids_fit_in(torch.bfloat16, 257)
    assert ids_fit_in(torch.float16, 2048) and not ids_fit_in(torch.float16, 2049)
    assert ids_fit_in(torch.float32, 2**24)
    # the claim behind it: every id in range survives the round trip through the dtype
    ids = torch.arange(-1, 256)
    assert torch.equal(ids.to(torch.bfloat16).round().long(), ids)
    assert not torch.equal(torch.tensor([257]).to(torch.bfloat16).long(), torch.tensor([257]))


# ---- bf16: the combine rounds once, like EP=1 -------------------------------------------------
BF_T, BF_D, BF_K, BF_E = 192, 64, 4, 8


def _bf16_case(world):
    """bf16 rows, gates and routing for each rank; the experts multiply by a power of two
    (exact in bf16), so the combine is the only place that rounds."""
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(BF_T, BF_D, generator=g).to(torch.bfloat16) for _ in range(world)]
    ids = [torch.stack([torch.randperm(BF_E, generator=g)[:BF_K] for _ in range(BF_T)]) for _ in range(world)]
    ws = [torch.rand(BF_T, BF_K, generator=g) for _ in range(world)]
    return xs, ids, ws


def _bf16_expert(x_ND, counts_L, first):
    scale_L = 2.0 ** (torch.arange(len(counts_L)) + first - 3).to(torch.bfloat16)
    return x_ND * torch.repeat_interleave(scale_L, counts_L).unsqueeze(1)


def _bf16_run(rank, world):
    xs, ids, ws = _bf16_case(world)
    disp = AllToAllDispatcher(None, BF_E)
    with created_on_meta_by_default():
        x_ND, counts_L, ctx = disp.dispatch(xs[rank], ids[rank], ws[rank], BF_E)
    y_ND = _bf16_expert(x_ND, counts_L, rank * disp.num_local_experts)
    with created_on_meta_by_default():
        y_TD = disp.combine(y_ND, ctx)
    return y_TD, disp.pop_stats()["a2a_bytes"]


def _bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in units of the bf16 spacing at max(|a|, |b|) (1 = one rounding step)."""
    a, b = a.double(), b.double()
    mag = torch.maximum(a.abs(), b.abs()).clamp_min(torch.finfo(torch.bfloat16).tiny)
    ulp = 2.0 ** (torch.floor(torch.log2(mag)) - 7)
    return float(((a - b).abs() / ulp).max())


def test_bf16_combine_rounds_once_like_ep1():
    """In bf16 the EP=2 output differs from EP=1's by at most one bf16 rounding of the same
    fp32 sum (and both from the exactly rounded sum by at most one): the combine accumulates in
    fp32 and rounds once, as EP=1's batched product does."""
    from deepseek_moe.model.dispatch import LocalDispatcher

    world = 2
    xs, ids, ws = _bf16_case(world)
    out = run_distributed(_bf16_run, world)
    L = BF_E // world
    for r in range(world):
        # bytes: a sent pair is its bf16 row, K bf16 gates and K bf16 local ids; a received
        # pair goes back as one fp32 row (the partial sum)
        dest_T = [set((ids[r][t] // L).tolist()) for t in range(BF_T)]
        sent = sum(len(d - {r}) for d in dest_T)
        recv = sum(
            sum(r in set((ids[s][t] // L).tolist()) for t in range(BF_T)) for s in range(world) if s != r
        )
        assert out[r][1] == sent * (BF_D + 2 * BF_K) * 2 + recv * BF_D * 4
        local = LocalDispatcher()
        x_ND, counts_E, ctx = local.dispatch(xs[r], ids[r], ws[r], BF_E)
        ep1 = local.combine(_bf16_expert(x_ND, counts_E, 0), ctx)
        # the exact sum of the same bf16 terms (gates rounded to bf16, as both paths use them)
        gate_TK = ws[r].to(torch.bfloat16).double() * 2.0 ** (ids[r].double() - 3)
        exact = (gate_TK.unsqueeze(-1) * xs[r].double().unsqueeze(1)).sum(1)
        assert _bf16_ulps(ep1, exact) <= 1.0
        diff, to_exact = _bf16_ulps(out[r][0], ep1), _bf16_ulps(out[r][0], exact)
        print(f"rank {r}: EP=2 vs EP=1 {diff:.2f}, EP=2 vs exact {to_exact:.2f} bf16 rounding steps")
        assert diff <= 1.0 and to_exact <= 1.0
