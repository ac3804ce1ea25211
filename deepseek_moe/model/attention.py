"""Causal multi-head self-attention with RoPE and optional GQA, via PyTorch SDPA.

Parameter names follow HF Llama/DeepSeek (`q_proj`, `k_proj`, `v_proj`, `o_proj`, no biases).
"""

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_moe.config.model import ModelConfig
from deepseek_moe.model.rope import RotaryEmbedding


class Attention(nn.Module):
    """x_BSD -> y_BSD. Shapes: B batch, S sequence, D model dim, H heads, G kv heads, d head dim."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, H, G, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, G, d
        self.q_proj = nn.Linear(D, H * d, bias=False)
        self.k_proj = nn.Linear(D, G * d, bias=False)
        self.v_proj = nn.Linear(D, G * d, bias=False)
        self.o_proj = nn.Linear(H * d, D, bias=False)
        self.rotary = RotaryEmbedding(d, cfg.max_seq_len, cfg.rope_theta)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotary(q, k)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))
