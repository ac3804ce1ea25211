"""RoutedExperts: stacked storage, both compute paths against per-expert plain-autograd math,
the per-expert public state-dict layout, and the grouped path's op count."""

import pytest
import torch
import torch.nn.functional as F

from deepseek_moe.model import experts as experts_mod
from deepseek_moe.model.experts import RoutedExperts, resolve_impl
from deepseek_moe.model.kernels import expert_loop as loop_mod
from deepseek_moe.model.kernels.expert_loop import gemm_row_multiple

D, H = 16, 8


def _experts(num=4, seed=0, impl="loop") -> RoutedExperts:
    torch.manual_seed(seed)
    module = RoutedExperts(num, D, H, impl=impl)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return module


def _reference(module: RoutedExperts, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Each expert's SwiGLU written out with F.linear on its slice (plain autograd)."""
    out, start = [], 0
    for l, n in enumerate(counts):
        gate, up, down = module.expert_weights(l)
        x = x_ND[start : start + n]
        out.append(F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down))
        start += n
    return torch.cat(out)


def _grads(module, x, y, gy):
    return torch.autograd.grad(y, [x, *module.parameters()], gy)


def test_row_multiple_pads_only_low_precision_on_cpu():
    assert gemm_row_multiple(torch.zeros(1, dtype=torch.bfloat16)) == 32
    assert gemm_row_multiple(torch.zeros(1, dtype=torch.float16)) == 32
    assert gemm_row_multiple(torch.zeros(1)) == 1


# torch's CUDA grouped_mm (aten/src/ATen/native/cuda/GroupedBlas.cpp): its kernel runs bf16 on
# compute capability major 9 (Hopper) or 10 (datacenter Blackwell); everything else falls back to
# a per-group loop that copies the offsets to the host on every call.
_NATIVE = {(torch.bfloat16, 9), (torch.bfloat16, 10)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("major", [7, 8, 9, 10, 12])
def test_auto_picks_grouped_mm_only_where_cuda_runs_it_natively(monkeypatch, dtype, major):
    monkeypatch.setattr(experts_mod, "cuda_capability", lambda index: (major, 0))
    cuda = torch.device("cuda", 0)
    expected = "grouped_mm" if (dtype, major) in _NATIVE else "loop"
    assert resolve_impl("auto", cuda, dtype) == expected
    assert resolve_impl("auto", cuda, dtype, aligned=False) == "loop"
    # an explicit choice is honoured on any device and dtype
    assert resolve_impl("grouped_mm", cuda, dtype) == "grouped_mm"
    assert resolve_impl("loop", cuda, dtype) == "loop"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_auto_is_the_loop_off_cuda(dtype):
    for device in (torch.device("cpu"), torch.device("meta")):
        assert resolve_impl("auto", device, dtype) == "loop"
        assert resolve_impl("grouped_mm", device, dtype) == "grouped_mm"


@pytest.mark.parametrize("impl, multiple", [("grouped_mm", 1), ("loop", 1), ("loop", 5), ("loop", 32)])
def test_paths_give_the_per_expert_result(monkeypatch, impl, multiple):
    """fp32 (the loop with padding forced on too): outputs and every gradient equal the
    per-expert math, including an expert with no rows and counts that are and are not
    multiples of the padding."""
    monkeypatch.setattr(loop_mod, "gemm_row_multiple", lambda x: multiple)
    module = _experts(impl=impl)
    counts = [7, 0, 10, 3]
    x = torch.randn(sum(counts), D, requires_grad=True)
    y = module(x, torch.tensor(counts))
    ref = _reference(module, x, counts)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    gy = torch.randn_like(y)
    got = _grads(module, x, y, gy)
    for a, b in zip(got, _grads(module, x, ref, gy)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    _, d_gate_up, d_down = got  # expert 1 has no rows: zero weight gradients
    assert torch.count_nonzero(d_gate_up[1]) == 0 and torch.count_nonzero(d_down[1]) == 0


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_bf16_paths_match_fp32_reference(impl):
    """The real bf16 CPU paths (the loop padded to 32 rows) against fp32 math on the same bf16
    weights. Tolerance: bf16 has 8 mantissa bits (relative step 2^-8 = 0.4%); three chained
    matmuls over D=16 / H=8 inputs stay within a few steps, so 3e-2 relative with a small
    absolute floor (for gradients: a few steps of the tensor's largest entry)."""
    counts = [33, 0, 5, 64]
    x32 = torch.randn(sum(counts), D)
    module_bf16 = _experts(impl=impl).to(torch.bfloat16)
    x = x32.to(torch.bfloat16).requires_grad_(True)
    y = module_bf16(x, torch.tensor(counts))
    assert y.dtype == torch.bfloat16
    module32 = _experts(impl=impl)
    module32.load_state_dict({k: v.float() for k, v in module_bf16.state_dict().items()})
    xr = x.detach().float().requires_grad_(True)
    ref = _reference(module32, xr, counts)
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=2e-2)
    gy = torch.randn_like(ref)
    got = _grads(module_bf16, x, y, gy.to(torch.bfloat16))
    want = _grads(module32, xr, ref, gy)
    for a, b in zip(got, want):
        # weight gradients sum up to 64 rows: bf16 rounds them at the scale of the tensor
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=1e-2 * b.abs().max().item())


def test_state_dict_is_per_expert_and_round_trips():
    module = _experts(num=3)
    sd = module.state_dict()
    assert sorted(sd) == sorted(f"{l}.{p}_proj.weight" for l in range(3) for p in ("gate", "up", "down"))
    assert sd["2.up_proj.weight"].shape == (H, D) and sd["2.down_proj.weight"].shape == (D, H)
    torch.testing.assert_close(sd["1.gate_proj.weight"], module.gate_up_proj[1, :H])
    torch.testing.assert_close(sd["1.up_proj.weight"], module.gate_up_proj[1, H:])
    other = _experts(num=3, seed=1)
    other.load_state_dict({k: v.clone() for k, v in sd.items()})
    assert torch.equal(other.gate_up_proj, module.gate_up_proj)
    assert torch.equal(other.down_proj, module.down_proj)
    sd.pop("0.up_proj.weight")
    with pytest.raises(RuntimeError, match="gate_up_proj"):
        other.load_state_dict(sd)


def test_keep_experts_slices_the_stacks():
    module = _experts(num=4)
    want = [tuple(t.clone() for t in module.expert_weights(l)) for l in (2, 3)]
    module.keep_experts(2, 4)
    assert len(module) == 2
    for l, ws in enumerate(want):
        for a, b in zip(module.expert_weights(l), ws):
            assert torch.equal(a, b)


def _count_ops(module, x, counts):
    from bench.bench_op_count import count_top_level_aten_ops

    return count_top_level_aten_ops(lambda: module(x, counts).sum().backward())


def test_grouped_op_count_does_not_grow_with_experts():
    """The grouped path issues the same ops for 8 and 64 experts (no per-expert loop), while the
    loop kernel grows with the expert count."""
    ops = {}
    for L in (8, 64):
        for impl in ("grouped_mm", "loop"):
            torch.manual_seed(0)
            module = RoutedExperts(L, D, H, impl=impl)
            torch.nn.init.normal_(module.gate_up_proj)
            torch.nn.init.normal_(module.down_proj)
            counts = torch.full((L,), 4)
            ops[impl, L] = _count_ops(module, torch.randn(4 * L, D, requires_grad=True), counts)
    assert ops["grouped_mm", 64] == ops["grouped_mm", 8]
    assert ops["loop", 64] > 4 * ops["loop", 8]
