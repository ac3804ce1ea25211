"""Causal attention by batched matmuls with a hand-written backward, for CPU.

Equals `F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)` (tested, fp32 and
bf16). Why it exists: on CPU, SDPA's flash kernel makes less use of the fast bf16 matmuls than
Megatron's unfused path does (bench/bench_attention.py; numbers in bench/reports/attention_*.md).
Selected by `model.attn_impl` ("bmm", or "auto" on CPU, see `attention.choose_attn_impl`).

Shapes: B batch, S sequence, H query heads, G kv heads, d head dim, N = B*H, Q = query rows of
one block, K = keys that block sees.
"""

from __future__ import annotations

import math

import torch

QUERY_BLOCK_ROWS = 64
"""Query rows per block (block [s, e) scores against keys [0, e) only: causality skips about
half of the work)."""


def causal_bmm_attention(
    q_BHSd: torch.Tensor, k_BGSd: torch.Tensor, v_BGSd: torch.Tensor, block_rows: int = QUERY_BLOCK_ROWS
) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(d)) v, the same as SDPA(is_causal=True, enable_gqa=True).

    Query head h uses kv head h // (H/G) (SDPA's GQA convention). Queries are processed in
    blocks of `block_rows` rows (the last one may be shorter); block [s, e) computes scores
    only against keys [0, e).
    """
    S = q_BHSd.shape[-2]
    starts = range(0, S, block_rows)
    blocks = tuple((s, min(s + block_rows, S)) for s in starts)
    return _CausalBmmAttention.apply(q_BHSd, k_BGSd, v_BGSd, blocks)


def _causal_bias(S: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """bias_SS: 0 on and below the diagonal, -inf above (row = query, column = key)."""
    return torch.full((S, S), float("-inf"), dtype=dtype, device=device).triu_(1)


class _CausalBmmAttention(torch.autograd.Function):
    """Causal attention by batched matmuls, per query block [s, e) against keys [0, e).

    NOTE: numerics follow Megatron-LM's unfused attention (scores = baddbmm(mask, q, k^T,
    alpha=1/sqrt(d)) in the activation dtype, then a scale-mask-softmax, then probs @ v): with
    bf16 activations the scores and probabilities are stored in bf16 (torch's CPU softmax and
    its backward compute in fp32 internally). SDPA's flash kernel keeps scores in fp32 tiles,
    so bf16 outputs differ from SDPA's by a few bf16 ulps (dK and dV are also summed over
    query blocks in the activation dtype); fp32 agrees to ~1e-6.

    GQA: k and v are expanded to the H query heads (copies of [B, H, S, d], small next to the
    scores) and their gradients are summed back over the H/G heads of each group.
    Saved for backward: q, k, v ([N, S, d], expanded) and each block's probabilities
    p_NQK (Q = e - s query rows, K = e keys), in the activation dtype.
    """

    @staticmethod
    def forward(ctx, q_BHSd, k_BGSd, v_BGSd, blocks):
        B, H, S, d = q_BHSd.shape
        G = k_BGSd.shape[1]
        scale = 1.0 / math.sqrt(d)
        q_NSd = q_BHSd.reshape(B * H, S, d)
        k_NSd = k_BGSd.unsqueeze(2).expand(B, G, H // G, S, d).reshape(B * H, S, d)
        v_NSd = v_BGSd.unsqueeze(2).expand(B, G, H // G, S, d).reshape(B * H, S, d)
        bias_SS = _causal_bias(S, q_BHSd.dtype, q_BHSd.device)
        y_NSd = torch.empty_like(q_NSd)
        keep = any(ctx.needs_input_grad[:3])  # no backward (eval): hold one block at a time
        probs = []
        for s, e in blocks:
            scores_NQK = torch.baddbmm(
                bias_SS[s:e, :e].expand(B * H, e - s, e),
                q_NSd[:, s:e],
                k_NSd[:, :e].transpose(1, 2),
                alpha=scale,
            )
            p_NQK = torch.softmax(scores_NQK, dim=-1)
            del scores_NQK
            y_NSd[:, s:e] = torch.bmm(p_NQK, v_NSd[:, :e])
            if keep:
                probs.append(p_NQK)
        ctx.shape, ctx.blocks, ctx.scale = (B, H, G, S, d), blocks, scale
        ctx.save_for_backward(q_NSd, k_NSd, v_NSd, *probs)
        return y_NSd.view(B, H, S, d)

    @staticmethod
    def backward(ctx, dy_BHSd):
        q_NSd, k_NSd, v_NSd, *probs = ctx.saved_tensors
        B, H, G, S, d = ctx.shape
        dy_NSd = dy_BHSd.reshape(B * H, S, d)
        dq_NSd = torch.empty_like(q_NSd)
        dk_NSd = torch.zeros_like(k_NSd)
        dv_NSd = torch.zeros_like(v_NSd)
        for (s, e), p_NQK in zip(ctx.blocks, probs):
            dy_NQd = dy_NSd[:, s:e]
            dv_NSd[:, :e].baddbmm_(p_NQK.transpose(1, 2), dy_NQd)  # dV += P^T dY
            dp_NQK = torch.bmm(dy_NQd, v_NSd[:, :e].transpose(1, 2))  # dP = dY V^T
            # NOTE: the fused softmax backward P * (dP - rowsum(dP * P)) (Megatron uses it
            # too); it computes in fp32 for bf16 inputs, unlike the same math in bf16 ops.
            ds_NQK = torch._softmax_backward_data(dp_NQK, p_NQK, -1, p_NQK.dtype)
            del dp_NQK
            dq_NSd[:, s:e] = torch.bmm(ds_NQK, k_NSd[:, :e]).mul_(ctx.scale)  # dQ = dS K
            dk_NSd[:, :e].baddbmm_(ds_NQK.transpose(1, 2), q_NSd[:, s:e], alpha=ctx.scale)  # dK += dS^T Q
        return dq_NSd.view(B, H, S, d), _sum_groups(dk_NSd, B, G), _sum_groups(dv_NSd, B, G), None


def _sum_groups(dx_NSd: torch.Tensor, B: int, G: int) -> torch.Tensor:
    """GQA: gradient of the H expanded heads -> dx_BGSd, summed over the H/G heads of a group."""
    N, S, d = dx_NSd.shape
    if N == B * G:
        return dx_NSd.view(B, G, S, d)
    return dx_NSd.view(B, G, N // (B * G), S, d).sum(2)
