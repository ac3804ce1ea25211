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
from tests.host_reads import count_host_reads

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
    with count_host_reads() as reads:
        x_ND, counts_L, ctx = disp.dispatch(x, ids[rank], w, E)
    chunks = torch.split(x_ND, counts_L.tolist())
    y_ND = torch.cat([c @ A_local[l] for l, c in enumerate(chunks)])  # every expert runs, even empty
    with count_host_reads() as combine_reads:
        y = disp.combine(y_ND, ctx)
    (y * gs[rank]).sum().backward()
    return {
        "y": y.detach(),
        "gx": x.grad,
        "gw": w.grad,
        "gA": A_local.grad,
        "counts": counts_L,
        "stats": disp.pop_stats(),
        "host_reads": reads.ops + combine_reads.ops,
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
