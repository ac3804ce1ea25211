"""Routed experts: per-expert SwiGLU parameters, computed on token copies sorted by expert.

Shapes: N token copies (sorted by expert), D model dim, H expert hidden, L local experts.

`RoutedExperts` IS the `nn.ModuleList` of experts, so the state-dict keys are the HF layout
`experts.<i>.{gate,up,down}_proj.weight` (and DeepSpeed can split experts by parameter name).
Two compute paths, identical math:
- "loop" (default): one gate/up/down matmul chain per expert on its contiguous slice of x_ND.
  Empty slices run too (a [0, D] matmul), so every expert parameter is in the graph (grad 0).
- "grouped_mm": `torch.nn.functional.grouped_mm` over weights stacked at each call (the stack
  is a copy of all expert weights per forward; its gradient is split back by autograd).
bench/bench_moe_layer.py measured which is faster on CPU (see bench/README.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe.model.ffn import SwiGLU


class RoutedExperts(nn.ModuleList):
    def __init__(self, num_experts: int, dim: int, hidden: int, impl: str = "loop") -> None:
        super().__init__([SwiGLU(dim, hidden) for _ in range(num_experts)])
        if impl not in ("loop", "grouped_mm"):
            raise ValueError(f"experts impl={impl!r} must be 'loop' or 'grouped_mm'.")
        if impl == "grouped_mm" and (dim % 8 or hidden % 8):
            # NOTE: grouped_mm needs 16-byte aligned strides (8 elements covers fp32 and bf16).
            raise ValueError(
                f"experts_impl='grouped_mm' needs hidden_size ({dim}) and moe_intermediate_size "
                f"({hidden}) divisible by 8: change the widths or use experts_impl='loop'."
            )
        self.impl = impl

    def forward(self, x_ND: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        """x_ND grouped contiguously by local expert (counts_L rows each) -> y_ND, same order."""
        if counts_L.numel() != len(self):
            raise ValueError(
                f"counts_L has {counts_L.numel()} entries but this rank holds {len(self)} experts."
            )
        if self.impl == "grouped_mm":
            return self._grouped_mm(x_ND, counts_L)
        return self._loop(x_ND, counts_L)

    def _loop(self, x_ND: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(x_ND, counts_L.tolist(), dim=0)
        return torch.cat([expert(chunk) for expert, chunk in zip(self, chunks)], dim=0)

    def _grouped_mm(self, x_ND: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(counts_L, dim=0).to(device=x_ND.device, dtype=torch.int32)
        # Stacked [L, D, 2H] (gate | up) and [L, H, D]: grouped_mm wants (groups, in, out).
        w_gu = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self])
        w_down = torch.stack([e.down_proj.weight for e in self])
        h_N2H = F.grouped_mm(x_ND, w_gu.transpose(-2, -1), offs=offs)
        g_NH, u_NH = h_N2H.chunk(2, dim=-1)
        return _GradContiguous.apply(
            F.grouped_mm(F.silu(g_NH) * u_NH, w_down.transpose(-2, -1), offs=offs)
        )


class _GradContiguous(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    NOTE: grouped_mm's CPU backward rejects stride-0 (expanded) output grads, e.g. from
    `y.sum().backward()` (reference, "Seen on this stack").
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()
