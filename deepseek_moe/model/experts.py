"""Routed experts: per-expert SwiGLU parameters, computed on token copies sorted by expert.

Shapes: N token copies (sorted by expert), D model dim, H expert hidden, L local experts.

`RoutedExperts` IS the `nn.ModuleList` of experts, so the state-dict keys are the HF layout
`experts.<i>.{gate,up,down}_proj.weight` (and DeepSpeed can split experts by parameter name).
Two compute paths, identical math:
- "loop" (default): per expert, gate/up/down matmuls on its contiguous slice of x_ND, written
  into preallocated buffers, inside one autograd Function with a hand-written backward (see
  `_ExpertLoop`). Every expert parameter is an input of that Function, so every expert gets a
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
    split/cat copies plus per-node overhead dominated on CPU. Here the matmuls write into
    preallocated buffers (`out=`), the SwiGLU elementwise math runs once over all N rows, and
    backward saves only x_ND, gate and up pre-activations (the activation is recomputed).
    Inputs: x_ND, bounds (python list of (start, end)), then L gate, L up, L down weights.
    """

    @staticmethod
    def forward(ctx, x_ND, bounds, *weights):
        L = len(bounds)
        w_gate, w_up, w_down = weights[:L], weights[L:2 * L], weights[2 * L:]
        N, H = x_ND.shape[0], w_gate[0].shape[0]
        g_NH = x_ND.new_empty(N, H)
        u_NH = x_ND.new_empty(N, H)
        for (s, e), wg, wu in zip(bounds, w_gate, w_up):
            if e > s:
                torch.mm(x_ND[s:e], wg.t(), out=g_NH[s:e])
                torch.mm(x_ND[s:e], wu.t(), out=u_NH[s:e])
        a_NH = F.silu(g_NH).mul_(u_NH)
        y_ND = x_ND.new_empty(N, x_ND.shape[1])
        for (s, e), wd in zip(bounds, w_down):
            if e > s:
                torch.mm(a_NH[s:e], wd.t(), out=y_ND[s:e])
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
        sig_NH = torch.sigmoid(g_NH)
        silu_NH = g_NH * sig_NH
        a_NH = silu_NH * u_NH
        da_NH = torch.empty_like(g_NH)
        d_down = []
        for (s, e), wd in zip(bounds, w_down):
            d_down.append(torch.mm(dy_ND[s:e].t(), a_NH[s:e]))  # [D, H]; zeros if empty
            if e > s:
                torch.mm(dy_ND[s:e], wd, out=da_NH[s:e])
        du_NH = da_NH * silu_NH
        # d silu(g)/dg = sig * (1 + g * (1 - sig))
        dg_NH = da_NH.mul_(u_NH).mul_(sig_NH * (1 + g_NH * (1 - sig_NH)))
        dx_ND = torch.empty_like(x_ND)
        d_gate, d_up = [], []
        for (s, e), wg, wu in zip(bounds, w_gate, w_up):
            d_gate.append(torch.mm(dg_NH[s:e].t(), x_ND[s:e]))
            d_up.append(torch.mm(du_NH[s:e].t(), x_ND[s:e]))
            if e > s:
                torch.mm(dg_NH[s:e], wg, out=dx_ND[s:e])
                dx_ND[s:e].addmm_(du_NH[s:e], wu)
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
