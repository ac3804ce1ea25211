"""Routed experts: per-expert SwiGLU parameters, computed on token copies sorted by expert.

Shapes: N token copies (sorted by expert), D model dim, H expert hidden, L local experts.

`RoutedExperts` IS the `nn.ModuleList` of experts, so the state-dict keys are the HF layout
`experts.<i>.{gate,up,down}_proj.weight` (and DeepSpeed can split experts by parameter name).
Two compute paths, identical math:
- "loop" (default): per expert, gate/up/down matmuls and the SwiGLU on its contiguous slice of
  x_ND, written into preallocated buffers, inside one autograd Function with a hand-written
  backward (see `_ExpertLoop`). Every expert parameter is an input of that Function, so every expert gets a
  gradient (zeros when it received no tokens).
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
        ends = torch.cumsum(counts_L, 0).tolist()
        bounds = list(zip([0] + ends[:-1], ends))
        weights = ([e.gate_proj.weight for e in self] + [e.up_proj.weight for e in self]
                   + [e.down_proj.weight for e in self])
        return _ExpertLoop.apply(x_ND, bounds, *weights)

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


class _ExpertLoop(torch.autograd.Function):
    """SwiGLU over contiguous per-expert slices with a hand-written backward.

    Why not plain autograd: with E experts autograd records ~10 nodes per expert, and the
    split/cat copies plus full-size elementwise passes dominated on CPU. Here each expert's
    matmuls write into preallocated buffers (`out=`) and its SwiGLU elementwise math runs on its
    own slice right after, while the slice is still in cache. Backward saves only x_ND and the
    gate/up pre-activations (the activation is recomputed per slice).
    Inputs: x_ND, bounds (python list of (start, end) per expert), then the L gate, L up and
    L down weights. Experts with an empty slice get zero weight gradients.
    """

    @staticmethod
    def forward(ctx, x_ND, bounds, *weights):
        L = len(bounds)
        w_gate, w_up, w_down = weights[:L], weights[L:2 * L], weights[2 * L:]
        N, H = x_ND.shape[0], w_gate[0].shape[0]
        g_NH = x_ND.new_empty(N, H)
        u_NH = x_ND.new_empty(N, H)
        y_ND = x_ND.new_empty(N, x_ND.shape[1])
        for (s, e), wg, wu, wd in zip(bounds, w_gate, w_up, w_down):
            if e > s:
                x = x_ND[s:e]
                torch.mm(x, wg.t(), out=g_NH[s:e])
                torch.mm(x, wu.t(), out=u_NH[s:e])
                torch.mm(F.silu(g_NH[s:e]).mul_(u_NH[s:e]), wd.t(), out=y_ND[s:e])
        ctx.bounds = bounds
        ctx.save_for_backward(x_ND, g_NH, u_NH, *weights)
        return y_ND

    @staticmethod
    def backward(ctx, dy_ND):
        x_ND, g_NH, u_NH, *weights = ctx.saved_tensors
        bounds = ctx.bounds
        L = len(bounds)
        w_gate, w_up, w_down = weights[:L], weights[L:2 * L], weights[2 * L:]
        dy_ND = dy_ND.contiguous()
        dx_ND = torch.empty_like(x_ND)
        d_gate, d_up, d_down = [], [], []
        for (s, e), wg, wu, wd in zip(bounds, w_gate, w_up, w_down):
            if e == s:
                d_gate.append(torch.zeros_like(wg))
                d_up.append(torch.zeros_like(wu))
                d_down.append(torch.zeros_like(wd))
                continue
            x, g, u, dy = x_ND[s:e], g_NH[s:e], u_NH[s:e], dy_ND[s:e]
            silu = F.silu(g)
            d_down.append(torch.mm(dy.t(), silu * u))          # [D, H]
            da = torch.mm(dy, wd)                              # [n, H]
            du = da * silu
            dg = torch.ops.aten.silu_backward(da.mul_(u), g)   # da * u * silu'(g)
            d_gate.append(torch.mm(dg.t(), x))
            d_up.append(torch.mm(du.t(), x))
            torch.mm(dg, wg, out=dx_ND[s:e])
            dx_ND[s:e].addmm_(du, wu)
        return (dx_ND, None, *d_gate, *d_up, *d_down)


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
