"""Model configuration: `ModelConfig` (the decoder) and `MoEConfig` (its MoE FFN).

Both are keyword-only dataclasses usable as OmegaConf structured configs (Hydra composes
`conf/model/<name>.yaml` onto them; `OmegaConf.to_object` gives these types back). The model
code only ever sees these dataclasses, never a DictConfig.

Parameter and FLOP counts are analytic (no model is built) and follow the module layout in
`deepseek_moe/model/` exactly; `tests/model/test_config.py` checks them against a real model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

_SCORING_FUNCS = ("softmax", "sigmoid")
_ATTN_IMPLS = ("auto", "sdpa", "bmm")
EXPERTS_IMPLS = ("auto", "grouped_mm", "loop")
ACTIVATION_CHECKPOINTING = ("none", "full")
"""`activation_checkpointing` of the model and of `trainer.activation_checkpointing`."""


# The fields that define the model's parameters (their names and shapes): a checkpoint loads only
# into a model with the same values. The others (loss weights, capacity, kernels) do not.
PARAMETER_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
    "first_k_dense",
    "tie_embeddings",
)
MOE_PARAMETER_FIELDS = ("n_routed_experts", "n_shared_experts", "moe_intermediate_size")


@dataclass(kw_only=True)
class MoEConfig:
    """The mixture-of-experts FFN used by every layer after the first `first_k_dense`."""

    n_routed_experts: int = 16
    """N': number of routed (fine-grained) experts."""
    n_shared_experts: int = 1
    """Ks: number of always-on shared experts (fused into one SwiGLU of width Ks * H). 0 = none."""
    top_k: int = 4
    """K': routed experts activated per token."""
    moe_intermediate_size: int = 64
    """H: hidden width of one routed (and of one shared) expert's SwiGLU."""
    n_groups: int = 1
    """D: device groups the routed experts are split into (contiguous blocks). Under expert
    parallelism these are the EP ranks; on one process they are virtual."""
    topk_groups: int = 1
    """M: groups (devices) a token may be routed to (device-limited routing). M = D = plain top-k."""
    scoring_func: str = "softmax"
    """Affinity function: "softmax" (DeepSeekMoE, V2) or "sigmoid" (V3)."""
    norm_topk_prob: bool = False
    """Renormalise the K' selected gates to sum to 1 (V3). DeepSeekMoE/V2 do not."""
    routed_scaling_factor: float = 1.0
    """Multiplier on the routed gates (V2)."""
    aux_loss_alpha: float = 0.01
    """alpha1: expert-level balance loss weight. 0 = off."""
    device_aux_alpha: float = 0.0
    """alpha2: device-level balance loss weight (needs n_groups > 1). 0 = off."""
    comm_aux_alpha: float = 0.0
    """alpha3: communication balance loss weight (needs n_groups > 1). 0 = off."""
    seq_aux: bool = False
    """Compute the expert-level loss per sequence and average over sequences (released 16B)."""
    z_loss_coef: float = 0.0
    """Router z-loss coefficient: coef * mean_t logsumexp(logits_t)^2. 0 = off."""
    capacity_factor: Optional[float] = None
    """None = dropless. Else capacity per expert = ceil(cf * T * K' / N') token copies over the
    layer's local tokens; the lowest-affinity copies of an overfull expert are dropped (training
    only, never in eval)."""
    bias_update_rate: float = 0.0
    """gamma of V3 aux-loss-free balancing: a selection-only per-expert bias updated once per
    optimizer step by `b -= gamma * sign(load - mean_load)`. 0 = off."""
    router_noise_std: float = 0.0
    """Std of Gaussian noise added to router logits in training (noisy gating, V-MoE). 0 = off."""
    experts_impl: str = "auto"
    """Routed expert compute on the stacked expert weights: "grouped_mm" (one grouped GEMM per
    projection, no per-expert loop, no host sync where torch's kernel is native), "loop" (a
    per-expert loop with one host read per forward, deepseek_moe/model/kernels/) or "auto"
    (grouped_mm for bf16 on sm90/sm100 GPUs, loop elsewhere: `model.experts.resolve_impl`)."""

    def __post_init__(self) -> None:
        E, K = self.n_routed_experts, self.top_k
        if E < 1:
            raise ValueError(f"moe.n_routed_experts={E} must be >= 1.")
        if not 1 <= K <= E:
            raise ValueError(
                f"moe.top_k={K} must be in [1, n_routed_experts={E}]: lower top_k or add experts."
            )
        if self.n_shared_experts < 0:
            raise ValueError(f"moe.n_shared_experts={self.n_shared_experts} must be >= 0.")
        if self.moe_intermediate_size < 1:
            raise ValueError(f"moe.moe_intermediate_size={self.moe_intermediate_size} must be >= 1.")
        if self.n_groups < 1 or E % self.n_groups != 0:
            raise ValueError(
                f"moe.n_routed_experts={E} is not divisible by moe.n_groups={self.n_groups}: "
                "choose n_groups dividing the number of routed experts."
            )
        if not 1 <= self.topk_groups <= self.n_groups:
            raise ValueError(
                f"moe.topk_groups={self.topk_groups} must be in [1, n_groups={self.n_groups}] (M <= D)."
            )
        if self.topk_groups * (E // self.n_groups) < K:
            raise ValueError(
                f"moe.topk_groups={self.topk_groups} groups of {E // self.n_groups} experts hold "
                f"fewer than top_k={K} experts: raise topk_groups or lower top_k."
            )
        if self.scoring_func not in _SCORING_FUNCS:
            raise ValueError(f"moe.scoring_func={self.scoring_func!r} is not one of {_SCORING_FUNCS}.")
        if self.experts_impl not in EXPERTS_IMPLS:
            raise ValueError(
                f"moe.experts_impl={self.experts_impl!r} must be 'auto', 'grouped_mm' or 'loop'."
            )
        for name in (
            "aux_loss_alpha",
            "device_aux_alpha",
            "comm_aux_alpha",
            "z_loss_coef",
            "bias_update_rate",
            "router_noise_std",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"moe.{name}={getattr(self, name)} must be >= 0 (0 = off).")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"moe.capacity_factor={self.capacity_factor} must be > 0, or null for dropless.")
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"moe.routed_scaling_factor={self.routed_scaling_factor} must be > 0.")


@dataclass(kw_only=True)
class ModelConfig:
    """A pre-norm decoder: embeddings -> num_layers blocks -> RMSNorm -> LM head.

    Blocks 0..first_k_dense-1 use a dense SwiGLU FFN of width `intermediate_size`; the others
    use the MoE FFN of `moe` (all blocks are dense when `moe` is None).
    """

    vocab_size: int = 8192
    """Vocabulary size (must equal the tokenizer's)."""
    hidden_size: int = 128
    """D: model width."""
    num_layers: int = 4
    """Number of decoder blocks."""
    num_heads: int = 4
    """Query heads."""
    num_kv_heads: Optional[int] = None
    """Key/value heads (GQA); None = num_heads (standard multi-head attention)."""
    head_dim: Optional[int] = None
    """Per-head width; None = hidden_size // num_heads."""
    intermediate_size: int = 512
    """Width of the dense SwiGLU FFN (first_k_dense layers, or all layers of a dense model)."""
    first_k_dense: int = 1
    """Number of leading blocks with a dense FFN instead of MoE."""
    max_seq_len: int = 256
    """Longest sequence the model is trained on (RoPE table length)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    init_std: float = 0.006
    """Std of the normal init of every linear and embedding weight (paper: 0.006)."""
    tie_embeddings: bool = False
    """Share the LM head with the token embedding (the papers do not)."""
    moe: Optional[MoEConfig] = field(default_factory=MoEConfig)
    """The MoE FFN; None = dense model."""
    attn_impl: str = "auto"
    """Attention kernel: "auto" | "sdpa" | "bmm". "sdpa" = torch scaled_dot_product_attention
    (flash kernels); "bmm" = batched matmuls + softmax with a hand-written backward (faster on
    CPU); "auto" = SDPA on CUDA; on CPU "bmm" in bf16, or in fp32 up to S = 1024, while the
    per-layer scores B*H*S*S stay under a memory bound, else SDPA (rule and measurements in
    deepseek_moe/model/attention.py)."""
    init_from: Optional[str] = None
    """A Hugging Face model directory (`python -m deepseek_moe.export` output in either format,
    or DeepSeek's own release such as deepseek-moe-16b-base) whose weights a NEW run starts
    from: continued pretraining at any EP size. The other model.* fields must match its
    config.json (the vocab size is taken from it); a run resuming its own checkpoint ignores
    it. None = random init."""

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_seq_len",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1.")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads != 0:
                raise ValueError(
                    f"model.hidden_size={self.hidden_size} is not divisible by "
                    f"model.num_heads={self.num_heads}: change one, or set model.head_dim."
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim < 1 or self.head_dim % 2 != 0:
            raise ValueError(f"model.head_dim={self.head_dim} must be a positive even number (RoPE).")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"model.num_heads={self.num_heads} is not divisible by "
                f"model.num_kv_heads={self.num_kv_heads}: choose a divisor for GQA."
            )
        if not 0 <= self.first_k_dense <= self.num_layers:
            raise ValueError(
                f"model.first_k_dense={self.first_k_dense} must be in [0, num_layers={self.num_layers}]."
            )
        if self.init_std <= 0 or self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("model.init_std, model.rms_norm_eps and model.rope_theta must be > 0.")
        if self.attn_impl not in _ATTN_IMPLS:
            raise ValueError(f"model.attn_impl={self.attn_impl!r} must be one of {_ATTN_IMPLS}.")
        if self.init_from is not None and not str(self.init_from).strip():
            raise ValueError("model.init_from is empty; give a model directory, or null for a random init")
        if isinstance(self.moe, dict):  # convenience for ModelConfig(moe={...}) in scripts
            self.moe = MoEConfig(**self.moe)

    # ---- layout -------------------------------------------------------------------------------
    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` (0-based) has an MoE FFN."""
        return self.moe is not None and layer >= self.first_k_dense

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    # ---- parameter counts (must mirror deepseek_moe/model exactly) ----------------------------
    def _attn_params(self) -> int:
        q = self.hidden_size * self.num_heads * self.head_dim
        kv = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * self.hidden_size
        return q + kv + o

    def _block_common_params(self) -> int:
        """Attention + the two RMSNorm weights of one block."""
        return self._attn_params() + 2 * self.hidden_size

    def _embed_params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_embeddings else emb
        return emb + head + self.hidden_size  # + final norm

    def _moe_params(self, active: bool) -> int:
        m = self.moe
        assert m is not None
        swiglu = 3 * self.hidden_size * m.moe_intermediate_size
        routed = (m.top_k if active else m.n_routed_experts) * swiglu
        return routed + m.n_shared_experts * swiglu + m.n_routed_experts * self.hidden_size

    def _ffn_params(self, layer: int, active: bool) -> int:
        if self.is_moe_layer(layer):
            return self._moe_params(active)
        return 3 * self.hidden_size * self.intermediate_size

    def num_params(self) -> int:
        """Total parameters (embedding and LM head included; buffers excluded)."""
        return self._embed_params() + sum(
            self._block_common_params() + self._ffn_params(i, active=False) for i in range(self.num_layers)
        )

    def num_active_params(self) -> int:
        """Parameters used per token: everything except the non-selected routed experts."""
        return self._embed_params() + sum(
            self._block_common_params() + self._ffn_params(i, active=True) for i in range(self.num_layers)
        )

    def flops_per_token(self, seq_len: Optional[int] = None) -> int:
        """Training FLOPs per token (forward + backward = 3x forward) at `seq_len` (default
        max_seq_len).

        Forward = 2 * active matmul params (active params minus the embedding lookup and the
        norm weights; LM head and router count) + attention QK^T and AV over the FULL context:
        2 matmuls x 2 FLOPs x num_heads*head_dim x seq_len per layer (the 6N + 12*L*d*S
        convention, no causal halving). It reproduces the DeepSeekMoE paper's FLOPs per 4K
        tokens: 16B 75.9T vs 74.4T reported, LLaMA2-7B 188.8T vs 187.9T.
        """
        S = self.max_seq_len if seq_len is None else seq_len
        norms = self.hidden_size * (2 * self.num_layers + 1)
        matmul = self.num_active_params() - self.vocab_size * self.hidden_size - norms
        if self.tie_embeddings:  # the tied head is still a matmul
            matmul += self.vocab_size * self.hidden_size
        attn = self.num_layers * 4 * self.num_heads * self.head_dim * S
        return 3 * (2 * matmul + attn)
