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

from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe.model.ffn import SwiGLU

# Rows per expert are rounded up to this multiple for bf16/fp16 matmuls on CPU (see
# `gemm_row_multiple`).
CPU_LOW_PRECISION_ROW_MULTIPLE = 32


def gemm_row_multiple(x: torch.Tensor) -> int:
    """Row count granularity for the per-expert matmuls on x's device and dtype.

    NOTE: on CPU, bf16/fp16 matmuls go through oneDNN, which JIT-compiles a kernel per distinct
    shape. Token counts per expert change every step, so unpadded slices made almost every
    expert matmul a new shape: measured 270 us per [~512, 256] x [256, 128] bf16 call instead
    of 75 us (oneDNN primitive creation was ~16% of a bf16 training step). Rounding each
    expert's rows up to a multiple of 32 (zero rows, < 3% extra FLOPs at this size) keeps the
    shapes in oneDNN's cache. fp32 on CPU uses MKL sgemm (no per-shape JIT) and CUDA uses cuBLAS,
    so both compute the exact rows.
    """
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        return CPU_LOW_PRECISION_ROW_MULTIPLE
    return 1


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
        counts = counts_L.tolist()
        multiple = gemm_row_multiple(x_ND)
        padded = [-(-n // multiple) * multiple for n in counts]
        ends, padded_ends = list(accumulate(counts)), list(accumulate(padded))
        # (start, end) in x_ND and (start, end) of the same expert's region in the padded buffer.
        bounds = [(e - n, e, pe - p, pe) for n, e, p, pe in zip(counts, ends, padded, padded_ends)]
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
    own slice right after, while the slice is still in cache. Backward saves only the (padded)
    input and the gate/up pre-activations (the activation is recomputed per slice).
    Inputs: x_ND, bounds (python list of (start, end, padded_start, padded_end) per expert),
    then the L gate, L up and L down weights. When the padded regions are larger than the
    expert's rows (see `gemm_row_multiple`), the matmuls run on a zero-padded copy x_PD: the zero
    rows give zero activations and contribute nothing to any gradient. Experts with an empty
    slice get zero weight gradients.
    """

    @staticmethod
    def forward(ctx, x_ND, bounds, *weights):
        L = len(bounds)
        w_gate, w_up, w_down = weights[:L], weights[L:2 * L], weights[2 * L:]
        padded = _is_padded(bounds, x_ND.shape[0])
        x_PD = _to_padded(x_ND, bounds) if padded else x_ND
        P, H = x_PD.shape[0], w_gate[0].shape[0]
        g_PH = x_PD.new_empty(P, H)
        u_PH = x_PD.new_empty(P, H)
        y_PD = x_PD.new_empty(P, x_PD.shape[1])
        for (_, _, s, e), wg, wu, wd in zip(bounds, w_gate, w_up, w_down):
            if e > s:
                x = x_PD[s:e]
                torch.mm(x, wg.t(), out=g_PH[s:e])
                torch.mm(x, wu.t(), out=u_PH[s:e])
                torch.mm(F.silu(g_PH[s:e]).mul_(u_PH[s:e]), wd.t(), out=y_PD[s:e])
        ctx.bounds, ctx.padded = bounds, padded
        ctx.save_for_backward(x_PD, g_PH, u_PH, *weights)
        return _from_padded(y_PD, bounds, x_ND.shape[0]) if padded else y_PD

    @staticmethod
    def backward(ctx, dy_ND):
        x_PD, g_PH, u_PH, *weights = ctx.saved_tensors
        bounds, padded = ctx.bounds, ctx.padded
        L = len(bounds)
        w_gate, w_up, w_down = weights[:L], weights[L:2 * L], weights[2 * L:]
        dy_PD = _to_padded(dy_ND, bounds) if padded else dy_ND.contiguous()
        dx_PD = torch.empty_like(x_PD)
        d_gate, d_up, d_down = [], [], []
        for (_, _, s, e), wg, wu, wd in zip(bounds, w_gate, w_up, w_down):
            if e == s:
                d_gate.append(torch.zeros_like(wg))
                d_up.append(torch.zeros_like(wu))
                d_down.append(torch.zeros_like(wd))
                continue
            x, g, u, dy = x_PD[s:e], g_PH[s:e], u_PH[s:e], dy_PD[s:e]
            silu = F.silu(g)
            d_down.append(torch.mm(dy.t(), silu * u))          # [D, H]
            da = torch.mm(dy, wd)                              # [n, H]
            du = da * silu
            dg = torch.ops.aten.silu_backward(da.mul_(u), g)   # da * u * silu'(g)
            d_gate.append(torch.mm(dg.t(), x))
            d_up.append(torch.mm(du.t(), x))
            torch.mm(dg, wg, out=dx_PD[s:e])
            dx_PD[s:e].addmm_(du, wu)
        dx_ND = _from_padded(dx_PD, bounds, dy_ND.shape[0]) if padded else dx_PD
        return (dx_ND, None, *d_gate, *d_up, *d_down)


def _is_padded(bounds, num_rows: int) -> bool:
    return bool(bounds) and bounds[-1][3] != num_rows


def _to_padded(x_ND: torch.Tensor, bounds) -> torch.Tensor:
    """Rows of each expert copied to its padded region; padding rows are zero. -> x_PD"""
    x_ND = x_ND.contiguous()
    x_PD = x_ND.new_zeros(bounds[-1][3], x_ND.shape[1])
    for s, e, ps, _ in bounds:
        x_PD[ps:ps + e - s].copy_(x_ND[s:e])
    return x_PD


def _from_padded(y_PD: torch.Tensor, bounds, num_rows: int) -> torch.Tensor:
    """Inverse of `_to_padded`: drop the padding rows. -> y_ND"""
    y_ND = y_PD.new_empty(num_rows, y_PD.shape[1])
    for s, e, ps, _ in bounds:
        y_ND[s:e].copy_(y_PD[ps:ps + e - s])
    return y_ND


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
