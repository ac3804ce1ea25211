"""Routed experts as a per-expert loop with a hand-written backward, tuned for CPU.

Equals `deepseek_moe.model.experts.grouped_swiglu` (tested). Why it exists: on CPU,
torch's grouped_mm runs per-group matmuls anyway, and autograd around it materialises the full
[N, 2H] intermediates several times; this loop keeps each expert's SwiGLU math on its slice
while it is in cache (bench/bench_moe_layer.py measures both). It reads `counts_L` on the host
(one sync), which is free on CPU and the reason it is not the CUDA default.

Shapes: N token copies grouped by local expert, P padded rows, D model dim, H expert hidden,
L local experts.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F

# Rows per expert are rounded up to this multiple for bf16/fp16 matmuls on CPU (see
# `gemm_row_multiple`).
CPU_LOW_PRECISION_ROW_MULTIPLE = 32


def gemm_row_multiple(x: torch.Tensor) -> int:
    """Row count granularity for the per-expert matmuls on x's device and dtype.

    NOTE: on CPU, bf16/fp16 matmuls go through oneDNN, which JIT-compiles a kernel per distinct
    shape. Token counts per expert change every step, so unpadded slices made almost every
    expert matmul a new shape (primitive creation dominated the bf16 expert time). Rounding each
    expert's rows up to a multiple of 32 (zero rows, a few % extra FLOPs) keeps the shapes in
    oneDNN's cache. fp32 on CPU uses MKL sgemm (no per-shape JIT) and CUDA uses cuBLAS, so both
    compute the exact rows.
    """
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        return CPU_LOW_PRECISION_ROW_MULTIPLE
    return 1


def expert_loop(
    x_ND: torch.Tensor, counts_L: torch.Tensor, gate_up_L2HD: torch.Tensor, down_LDH: torch.Tensor
) -> torch.Tensor:
    """Same contract as `grouped_swiglu`: x_ND grouped by local expert -> y_ND."""
    counts = counts_L.tolist()
    multiple = gemm_row_multiple(x_ND)
    padded = [-(-n // multiple) * multiple for n in counts]
    ends, padded_ends = list(accumulate(counts)), list(accumulate(padded))
    # (start, end) in x_ND and (start, end) of the same expert's region in the padded buffer.
    bounds = [(e - n, e, pe - p, pe) for n, e, p, pe in zip(counts, ends, padded, padded_ends)]
    return _ExpertLoop.apply(x_ND, bounds, gate_up_L2HD, down_LDH)


class _ExpertLoop(torch.autograd.Function):
    """SwiGLU over contiguous per-expert slices with a hand-written backward.

    Why not plain autograd: with L experts autograd records ~10 nodes per expert, and the
    split/cat copies plus full-size elementwise passes dominated on CPU. Here each expert's
    matmuls write into preallocated buffers (`out=`) and its SwiGLU elementwise math runs on its
    own slice right after. Backward saves only the (padded) input and the gate and up
    pre-activations (the activation is recomputed per slice); weight gradients are written
    straight into the stacked gradient tensors.
    Inputs: x_ND, bounds (python list of (start, end, padded_start, padded_end) per expert),
    gate_up [L, 2H, D], down [L, D, H]. When the padded regions are larger than the expert's
    rows (see `gemm_row_multiple`), the matmuls run on a zero-padded copy x_PD: the zero rows
    give zero activations and contribute nothing to any gradient. Experts with an empty slice
    get zero weight gradients.
    """

    @staticmethod
    def forward(ctx, x_ND, bounds, gate_up_L2HD, down_LDH):
        padded = _is_padded(bounds, x_ND.shape[0])
        x_PD = _to_padded(x_ND, bounds) if padded else x_ND.contiguous()
        P, H = x_PD.shape[0], down_LDH.shape[-1]
        # separate contiguous gate and up buffers: the elementwise math and the backward's
        # matmuls then run on dense rows (slices of one [P, 2H] buffer would be strided)
        g_PH = x_PD.new_empty(P, H)
        u_PH = x_PD.new_empty(P, H)
        y_PD = x_PD.new_empty(P, x_PD.shape[1])
        for l, (_, _, s, e) in enumerate(bounds):
            if e > s:
                x = x_PD[s:e]
                torch.mm(x, gate_up_L2HD[l, :H].t(), out=g_PH[s:e])
                torch.mm(x, gate_up_L2HD[l, H:].t(), out=u_PH[s:e])
                torch.mm(F.silu(g_PH[s:e]).mul_(u_PH[s:e]), down_LDH[l].t(), out=y_PD[s:e])
        ctx.bounds, ctx.padded = bounds, padded
        ctx.save_for_backward(x_PD, g_PH, u_PH, gate_up_L2HD, down_LDH)
        return _from_padded(y_PD, bounds, x_ND.shape[0]) if padded else y_PD

    @staticmethod
    def backward(ctx, dy_ND):
        x_PD, g_PH, u_PH, gate_up_L2HD, down_LDH = ctx.saved_tensors
        bounds, padded = ctx.bounds, ctx.padded
        H = down_LDH.shape[-1]
        dy_PD = _to_padded(dy_ND, bounds) if padded else dy_ND.contiguous()
        dx_PD = torch.empty_like(x_PD)
        d_gate_up = torch.empty_like(gate_up_L2HD)
        d_down = torch.empty_like(down_LDH)
        for l, (_, _, s, e) in enumerate(bounds):
            if e == s:
                d_gate_up[l].zero_()
                d_down[l].zero_()
                continue
            x, g, u, dy = x_PD[s:e], g_PH[s:e], u_PH[s:e], dy_PD[s:e]
            w_gate, w_up = gate_up_L2HD[l, :H], gate_up_L2HD[l, H:]
            silu = F.silu(g)
            torch.mm(dy.t(), silu * u, out=d_down[l])  # [D, H]
            da = torch.mm(dy, down_LDH[l])  # [n, H]
            du = da * silu
            dg = torch.ops.aten.silu_backward(da.mul_(u), g)  # da * u * silu'(g)
            torch.mm(dg.t(), x, out=d_gate_up[l, :H])
            torch.mm(du.t(), x, out=d_gate_up[l, H:])
            torch.mm(dg, w_gate, out=dx_PD[s:e])
            dx_PD[s:e].addmm_(du, w_up)
        dx_ND = _from_padded(dx_PD, bounds, dy_ND.shape[0]) if padded else dx_PD
        return dx_ND, None, d_gate_up, d_down


def _is_padded(bounds, num_rows: int) -> bool:
    return bool(bounds) and bounds[-1][3] != num_rows


def _to_padded(x_ND: torch.Tensor, bounds) -> torch.Tensor:
    """Rows of each expert copied to its padded region; padding rows are zero. -> x_PD"""
    x_ND = x_ND.contiguous()
    x_PD = x_ND.new_zeros(bounds[-1][3], x_ND.shape[1])
    for s, e, ps, _ in bounds:
        x_PD[ps : ps + e - s].copy_(x_ND[s:e])
    return x_PD


def _from_padded(y_PD: torch.Tensor, bounds, num_rows: int) -> torch.Tensor:
    """Inverse of `_to_padded`: drop the padding rows. -> y_ND"""
    y_ND = y_PD.new_empty(num_rows, y_PD.shape[1])
    for s, e, ps, _ in bounds:
        y_ND[s:e].copy_(y_PD[ps : ps + e - s])
    return y_ND
