"""Causal multi-head self-attention with RoPE and optional GQA.

Parameter names follow HF Llama/DeepSeek (`q_proj`, `k_proj`, `v_proj`, `o_proj`, no biases).

Shapes: B batch, S sequence, D model dim, H query heads, G kv heads, d head dim.

The computation is PyTorch's `F.scaled_dot_product_attention(is_causal=True)` (flash kernels on
CUDA and CPU). `model.attn_impl` selects a variant of the same math:
- "sdpa": always SDPA.
- "bmm": the CPU kernel `deepseek_moe/model/kernels/causal_bmm_attention.py` (batched matmuls
  per query block with a hand-written backward; faster than SDPA's CPU flash kernel where
  `choose_attn_impl` picks it, see bench/reports/attention_*.md).
- "auto" (default): SDPA on CUDA; on CPU "bmm" where it is faster and its scores fit a memory
  bound, else SDPA (`choose_attn_impl`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe.config.model import ModelConfig
from deepseek_moe.model.kernels.causal_bmm_attention import causal_bmm_attention
from deepseek_moe.model.rope import RotaryEmbedding

AUTO_BMM_MAX_SEQ = 1024
"""Longest sequence for which "auto" picks "bmm" on CPU in fp32 (and any dtype but bf16):
beyond it fp32 "bmm" is no faster than SDPA (bench/reports/attention_*.md)."""

AUTO_BMM_MAX_SCORES = 2**27
"""Largest B*H*S*S for which "auto" picks "bmm" on CPU: "bmm" keeps about half of the S x S
scores per layer for backward (at this bound 256 MB per layer in fp32, 128 MB in bf16),
SDPA keeps none."""


def choose_attn_impl(attn_impl: str, device: torch.device, dtype: torch.dtype, B: int, H: int, S: int) -> str:
    """Resolve "auto" to "sdpa" or "bmm"; "sdpa" and "bmm" are returned unchanged.

    "auto": SDPA on CUDA (flash kernels: fast, and no [S, S] tensor in memory). On CPU "bmm"
    when B*H*S*S <= AUTO_BMM_MAX_SCORES and (dtype is bf16 or S <= AUTO_BMM_MAX_SEQ), else
    SDPA. Why (bench/bench_attention.py; numbers in bench/reports/attention_*.md): CPU bf16
    matmuls are fast and the flash kernel uses them less well, so bf16 "bmm" wins at every
    measured length; fp32 matmuls are slower, so fp32 stops gaining past AUTO_BMM_MAX_SEQ. The
    gain depends on S, not on B*H, hence a length rule plus a separate memory bound.
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
            y_BHSd = F.scaled_dot_product_attention(q_BHSd, k_BGSd, v_BGSd, is_causal=True, enable_gqa=G != H)
        return self.o_proj(y_BHSd.transpose(1, 2).reshape(B, S, H * d))
