"""Rotary position embedding (Su et al. 2021), "rotate-half" layout as in HF Llama/DeepSeek."""

import torch

from deepseek_moe.model.buffers import KeepBufferDtype


class RotaryEmbedding(KeepBufferDtype):
    """Holds cos/sin tables [max_seq_len, head_dim] as non-persistent fp32 buffers (kept fp32
    when the model is cast to bf16; the rotation runs in the activation dtype)."""

    _keep_dtype_buffers = ("cos", "sin")

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        cos, sin = self._tables(torch.device("cpu"))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (
            self.theta
            ** (torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim)
        )
        t = torch.arange(self.max_seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def reset_tables(self) -> None:
        """Recompute the tables (e.g. after building on the meta device and materialising)."""
        cos, sin = self._tables(self.cos.device)
        self.cos, self.sin = cos, sin

    def forward(self, q_BHSd: torch.Tensor, k_BHSd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        S = q_BHSd.shape[-2]
        if S > self.max_seq_len:
            raise ValueError(
                f"sequence length {S} exceeds model.max_seq_len={self.max_seq_len}: "
                "raise max_seq_len or shorten the sequences."
            )
        cos = self.cos[:S].to(q_BHSd.dtype)
        sin = self.sin[:S].to(q_BHSd.dtype)
        return _apply(q_BHSd, cos, sin), _apply(k_BHSd, cos, sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin
