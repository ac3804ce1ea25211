"""Causal multi-head self-attention with RoPE and optional GQA: PyTorch SDPA or batched matmuls.

Parameter names follow HF Llama/DeepSeek (`q_proj`, `k_proj`, `v_proj`, `o_proj`, no biases).

Shapes: B batch, S sequence, D model dim, H query heads, G kv heads, d head dim, N = B*H;
in the "bmm" path Q = query rows of one block, K = keys that block sees.

Two implementations of the same math (`model.attn_impl`):
- "sdpa": `F.scaled_dot_product_attention(is_causal=True)` (flash kernels on CUDA and CPU).
- "bmm": `_CausalBmmAttention`, Megatron's unfused path: scores by batched matmul, softmax,
  probabilities @ V, with a hand-written backward that saves only q, k, v and the probabilities
  (activation dtype). Queries are cut into blocks of `QUERY_BLOCK_ROWS` rows that attend only
  to keys up to the block's end, so causality skips about half of the work.
- "auto" (default): SDPA on CUDA; on CPU "bmm" where it was measured faster (bf16, or fp32 up
  to S = 1024) and the scores fit a memory bound, else SDPA (`choose_attn_impl`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe.config.model import ModelConfig
from deepseek_moe.model.rope import RotaryEmbedding

QUERY_BLOCK_ROWS = 64
"""Query rows per block of the "bmm" path (block [s, e) scores against keys [0, e) only)."""

AUTO_BMM_MAX_SEQ = 1024
"""Longest sequence for which "auto" picks "bmm" on CPU in fp32 (and any dtype but bf16):
beyond it fp32 "bmm" is no faster than SDPA (measured, see `choose_attn_impl`)."""

AUTO_BMM_MAX_SCORES = 2**27
"""Largest B*H*S*S for which "auto" picks "bmm" on CPU: "bmm" keeps about half of the S x S
scores per layer for backward (at this bound 256 MB per layer in fp32, 128 MB in bf16),
SDPA keeps none."""


def choose_attn_impl(attn_impl: str, device: torch.device, dtype: torch.dtype, B: int, H: int,
                     S: int) -> str:
    """Resolve "auto" to "sdpa" or "bmm"; "sdpa" and "bmm" are returned unchanged.

    "auto": SDPA on CUDA (flash kernels: fast, and no [S, S] tensor in memory). On CPU "bmm"
    when B*H*S*S <= AUTO_BMM_MAX_SCORES and (dtype is bf16 or S <= AUTO_BMM_MAX_SEQ), else
    SDPA. Measured with bench/bench_attention.py on the 2-core AVX512-BF16 EPYC dev machine,
    torch 2.13, B=8, H=4, d=64; fwd+bwd speedup = SDPA time / bmm time; 1 thread on a quiet
    machine (2026-11-24 08:49 UTC, load 0.4-0.7), then 2 threads (load 0.7-1.2):

        S      bf16 1T / 2T    fp32 1T / 2T
        256    2.81x / 2.22x   1.53x / 1.43x
        512    2.84x / 2.61x   1.68x / 1.59x
        1024   1.94x / 1.80x   1.28x / 1.21x
        2048   1.60x / 1.53x   1.04x / 0.98x

    Runs under load (1.5-2.7) gave the same picture within +-15%. bf16 keeps winning (S=4096,
    B=2: 1.48x): CPU bf16 matmuls are fast and the flash kernel does not use them as well;
    fp32 matmuls are ~4x slower than bf16 ones here, so fp32 stops gaining past S=1024. At
    S <= 128 fp32 is at parity (0.98-1.16x), bf16 4-5x. The ratio depends on S, not on B*H
    (B=32: 3.4x / 1.3x at S=256), hence a length rule plus a separate memory bound.
    """
    if attn_impl != "auto":
        return attn_impl
    if device.type != "cpu" or B * H * S * S > AUTO_BMM_MAX_SCORES:
        return "sdpa"
    return "bmm" if dtype == torch.bfloat16 or S <= AUTO_BMM_MAX_SEQ else "sdpa"


class Attention(nn.Module):
    """x_BSD -> y_BSD."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, H, G, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, G, d
        self.attn_impl = cfg.attn_impl
        self.q_proj = nn.Linear(D, H * d, bias=False)
        self.k_proj = nn.Linear(D, G * d, bias=False)
        self.v_proj = nn.Linear(D, G * d, bias=False)
        self.o_proj = nn.Linear(H * d, D, bias=False)
        self.rotary = RotaryEmbedding(d, cfg.max_seq_len, cfg.rope_theta)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        H, G, d = self.num_heads, self.num_kv_heads, self.head_dim
        q_BHSd = self.q_proj(x_BSD).view(B, S, H, d).transpose(1, 2)
        k_BGSd = self.k_proj(x_BSD).view(B, S, G, d).transpose(1, 2)
        v_BGSd = self.v_proj(x_BSD).view(B, S, G, d).transpose(1, 2)
        q_BHSd, k_BGSd = self.rotary(q_BHSd, k_BGSd)
        if choose_attn_impl(self.attn_impl, x_BSD.device, q_BHSd.dtype, B, H, S) == "bmm":
            y_BHSd = causal_bmm_attention(q_BHSd, k_BGSd, v_BGSd)
        else:
            y_BHSd = F.scaled_dot_product_attention(q_BHSd, k_BGSd, v_BGSd, is_causal=True,
                                                    enable_gqa=G != H)
        return self.o_proj(y_BHSd.transpose(1, 2).reshape(B, S, H * d))


def causal_bmm_attention(q_BHSd: torch.Tensor, k_BGSd: torch.Tensor, v_BGSd: torch.Tensor,
                         block_rows: int = QUERY_BLOCK_ROWS) -> torch.Tensor:
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
            scores_NQK = torch.baddbmm(bias_SS[s:e, :e].expand(B * H, e - s, e), q_NSd[:, s:e],
                                       k_NSd[:, :e].transpose(1, 2), alpha=scale)
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
            dv_NSd[:, :e].baddbmm_(p_NQK.transpose(1, 2), dy_NQd)           # dV += P^T dY
            dp_NQK = torch.bmm(dy_NQd, v_NSd[:, :e].transpose(1, 2))        # dP = dY V^T
            # NOTE: the fused softmax backward P * (dP - rowsum(dP * P)) (Megatron uses it
            # too); it computes in fp32 for bf16 inputs, unlike the same math in bf16 ops.
            ds_NQK = torch._softmax_backward_data(dp_NQK, p_NQK, -1, p_NQK.dtype)
            del dp_NQK
            dq_NSd[:, s:e] = torch.bmm(ds_NQK, k_NSd[:, :e]).mul_(ctx.scale)  # dQ = dS K
            dk_NSd[:, :e].baddbmm_(ds_NQK.transpose(1, 2), q_NSd[:, s:e],
                                   alpha=ctx.scale)                          # dK += dS^T Q
        return dq_NSd.view(B, H, S, d), _sum_groups(dk_NSd, B, G), _sum_groups(dv_NSd, B, G), None


def _sum_groups(dx_NSd: torch.Tensor, B: int, G: int) -> torch.Tensor:
    """GQA: gradient of the H expanded heads -> dx_BGSd, summed over the H/G heads of a group."""
    N, S, d = dx_NSd.shape
    if N == B * G:
        return dx_NSd.view(B, G, S, d)
    return dx_NSd.view(B, G, N // (B * G), S, d).sum(2)
