"""RoutedExperts' loop path: padded per-expert regions (bf16/fp16 on CPU) against unpadded math."""

import pytest
import torch

from deepseek_moe.model import experts as experts_mod
from deepseek_moe.model.experts import RoutedExperts, gemm_row_multiple

D, H = 16, 8


def _experts(num=4, seed=0) -> RoutedExperts:
    torch.manual_seed(seed)
    module = RoutedExperts(num, D, H)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return module


def _reference(module: RoutedExperts, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Each expert's own SwiGLU module on its slice (plain autograd)."""
    out, start = [], 0
    for expert, n in zip(module, counts):
        out.append(expert(x_ND[start:start + n]))
        start += n
    return torch.cat(out)


def _grads(module, x, y, gy):
    return torch.autograd.grad(y, [x, *module.parameters()], gy)


def test_row_multiple_pads_only_low_precision_on_cpu():
    assert gemm_row_multiple(torch.zeros(1, dtype=torch.bfloat16)) == 32
    assert gemm_row_multiple(torch.zeros(1, dtype=torch.float16)) == 32
    assert gemm_row_multiple(torch.zeros(1)) == 1


@pytest.mark.parametrize("multiple", [1, 5, 32])
def test_padded_regions_give_the_unpadded_result(monkeypatch, multiple):
    """fp32 with padding forced on: outputs and every gradient equal the per-expert modules,
    including an expert with no rows and counts that are and are not multiples."""
    monkeypatch.setattr(experts_mod, "gemm_row_multiple", lambda x: multiple)
    module = _experts()
    counts = [7, 0, 10, 3]
    x = torch.randn(sum(counts), D, requires_grad=True)
    y = module(x, torch.tensor(counts))
    ref = _reference(module, x, counts)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    gy = torch.randn_like(y)
    got = _grads(module, x, y, gy)
    for a, b in zip(got, _grads(module, x, ref, gy)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    empty_expert_grads = got[1 + 3:1 + 6]  # x, then 3 weights per expert; expert 1 has no rows
    assert all(torch.count_nonzero(g) == 0 for g in empty_expert_grads)


def test_bf16_padded_path_matches_fp32_reference():
    """The real bf16 CPU path (padded to 32 rows) against fp32 math on the same bf16 weights.

    Tolerance: bf16 has 8 mantissa bits (relative step 2^-8 = 0.4%); three chained matmuls over
    D=16 / H=8 inputs stay within a few steps, so 3e-2 relative with a small absolute floor."""
    module = _experts()
    counts = [33, 0, 5, 64]
    x32 = torch.randn(sum(counts), D)
    module_bf16 = _experts().to(torch.bfloat16)
    x = x32.to(torch.bfloat16).requires_grad_(True)
    y = module_bf16(x, torch.tensor(counts))
    assert y.dtype == torch.bfloat16
    module32 = module.float()
    module32.load_state_dict({k: v.float() for k, v in module_bf16.state_dict().items()})
    xr = x.detach().float().requires_grad_(True)
    ref = _reference(module32, xr, counts)
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=2e-2)
    gy = torch.randn_like(ref)
    got = _grads(module_bf16, x, y, gy.to(torch.bfloat16))
    want = _grads(module32, xr, ref, gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-2)
