"""`all_to_all` / `exchange_counts` against a single-process reference (gloo, 2 and 4 ranks)."""

import pytest
import torch

from deepseek_moe.parallel.all_to_all import all_to_all, exchange_counts
from deepseek_moe.testing.distributed import run_distributed

D = 3


def _splits(world):
    """splits[src][dst]: rows src sends to dst. Includes zero-row pairs and, at world 4, a rank
    (rank 2) that sends nothing at all and a rank (rank 3) that receives nothing at all."""
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 4, (world, world), generator=g)
    s[0, 1] = 0
    if world >= 4:
        s[2, :] = 0
        s[:, 3] = 0
    return s


def _inputs(world):
    s = _splits(world)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(int(s[r].sum()), D, generator=g) for r in range(world)]
    ws = [torch.randn(int(s[:, r].sum()), D, generator=g) for r in range(world)]
    return s, xs, ws


def _reference(world):
    s, xs, ws = _inputs(world)
    xs = [x.clone().requires_grad_(True) for x in xs]
    chunks = [list(torch.split(xs[r], s[r].tolist())) for r in range(world)]
    outs = [torch.cat([chunks[src][dst] for src in range(world)]) for dst in range(world)]
    sum((o * w).sum() for o, w in zip(outs, ws)).backward()
    return [o.detach() for o in outs], [x.grad for x in xs]


def _run_a2a(rank, world):
    s, xs, ws = _inputs(world)
    x = xs[rank].clone().requires_grad_(True)
    # counts exchanged by the helper must equal the column of the split matrix
    recv = exchange_counts(s[rank].clone())
    out = all_to_all(x, recv.tolist(), s[rank].tolist())
    # `.sum()` of a product makes an expanded gradient: the backward must cope with it
    (out * ws[rank]).sum().backward()
    return {"recv": recv, "out": out.detach(), "grad": x.grad}


@pytest.mark.parametrize("world", [2, 4])
def test_all_to_all_matches_reference(world):
    s, _, _ = _inputs(world)
    ref_out, ref_grad = _reference(world)
    results = run_distributed(_run_a2a, world)
    for rank, res in enumerate(results):
        assert torch.equal(res["recv"], s[:, rank])
        assert torch.equal(res["out"], ref_out[rank])
        torch.testing.assert_close(res["grad"], ref_grad[rank], rtol=0, atol=1e-6)
    if world == 4:
        assert results[3]["out"].shape == (0, D) and results[2]["grad"].shape == (0, D)


def test_bad_splits_raise():
    with pytest.raises(ValueError, match="partition the rows"):
        all_to_all(torch.zeros(3, 2), [3], [2])
    with pytest.raises(ValueError, match="one per rank"):
        all_to_all(torch.zeros(3, 2), [1, 2], [3])
