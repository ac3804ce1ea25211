"""DeepSeekMoE decoder for causal LM pretraining.

Shapes: B batch, S sequence, D model dim, V vocab.

    model = DeepSeekMoEForCausalLM(cfg)                # cfg: ModelConfig
    out = model(input_ids_BS, labels_BS)              # -> CausalLMOutput
    out.loss.backward()                               # loss = lm_loss + aux_loss
    model.update_router_bias(reduce_sum)              # once per optimizer step (V3 bias)
    model.router_metrics(reset=True)                  # {"moe/layer{L}/load_imbalance": ...}

Expert parallelism is applied by the model to itself after construction:
`model.apply_ep(ep_rank=r, ep_size=P, make_dispatcher=...)` (each MoE layer keeps rank r's
experts and installs its dispatcher, see `MoELayer.apply_ep`); the model never calls
torch.distributed, the caller (deepseek_moe/parallel/expert_parallel.py) brings the groups.

Labels are ALREADY SHIFTED next-token targets (labels[b, s] is the token after input_ids[b, s]);
-100 is ignored. State-dict keys follow HF DeepSeek/Llama: `model.embed_tokens.weight`,
`model.layers.{L}.{input,post_attention}_layernorm.weight`,
`model.layers.{L}.self_attn.{q,k,v,o}_proj.weight`, `model.layers.{L}.mlp.*` (dense SwiGLU or
MoE, see moe.py), `model.norm.weight`, `lm_head.weight` (absent from parameters when tied).

Build big presets without memory: `with torch.device("meta"): DeepSeekMoEForCausalLM(cfg)`;
after `model.to_empty(device=...)` call `model.init_weights()`.

Two ways to trade compute for memory, chosen when the model is built (the trainer passes
`trainer.activation_checkpointing` and `trainer.loss_chunk_tokens`):
- `DeepSeekMoEForCausalLM(cfg, activation_checkpointing="full")` keeps only each block's input
  during a training forward and recomputes the block in backward (see `_checkpointed`);
- `DeepSeekMoEForCausalLM(cfg, loss_chunk_tokens=N)` (N > 0) computes the LM head and the loss N
  tokens at a time when labels are given, never holding the micro-batch's [B, S, V] logits (see
  chunked_lm_loss.py); the output's `logits_BSV` is then None.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from deepseek_moe.config.model import ACTIVATION_CHECKPOINTING, ModelConfig
from deepseek_moe.model.attention import Attention
from deepseek_moe.model.chunked_lm_loss import IGNORE_INDEX, chunked_lm_cross_entropy
from deepseek_moe.model.dispatch import Dispatcher
from deepseek_moe.model.experts import RoutedExperts
from deepseek_moe.model.ffn import SwiGLU
from deepseek_moe.model.moe import MoELayer
from deepseek_moe.model.norm import RMSNorm
from deepseek_moe.model.router import check_skip_top
from deepseek_moe.model.rope import RotaryEmbedding


class CausalLMOutput(dict):
    """The model's output: a dict with attribute access, like HF's `ModelOutput`.

    NOTE: a dict, not a plain dataclass, because DeepSpeed attaches its backward prologue (which
    clears the low-precision gradients between micro-batches under bf16 with fp32 gradient
    accumulation) only to tensor/tuple/list/dict outputs; a dataclass output is invisible to it
    and the gradients of earlier micro-batches are counted again.

    Keys / attributes:
    - `logits_BSV`: None when labels are given and the model's `loss_chunk_tokens` > 0 (the
      chunked loss never builds the whole micro-batch's logits); call without labels for them;
    - `loss`: lm_loss + aux_loss; None without labels;
    - `lm_loss`: mean next-token cross-entropy over non-ignored labels; None without labels;
    - `aux_loss`: sum of all alpha-scaled balance losses over layers (0 for a dense model);
    - `aux_losses`: per kind ("expert_balance", "device_balance", "comm_balance", "z_loss"),
      summed over layers.
    """

    _FIELDS = ("logits_BSV", "loss", "lm_loss", "aux_loss", "aux_losses")

    def __init__(
        self,
        *,
        logits_BSV: Optional[torch.Tensor],
        loss: Optional[torch.Tensor] = None,
        lm_loss: Optional[torch.Tensor] = None,
        aux_loss: Optional[torch.Tensor] = None,
        aux_losses: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        super().__init__(
            logits_BSV=logits_BSV,
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=torch.zeros(()) if aux_loss is None else aux_loss,
            aux_losses={} if aux_losses is None else aux_losses,
        )

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"CausalLMOutput has no field {name!r}") from None

    def __setattr__(self, name: str, value) -> None:
        if name not in self._FIELDS:
            raise AttributeError(f"CausalLMOutput has no field {name!r}; fields: {self._FIELDS}")
        self[name] = value


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + ffn(norm(x)). FFN is dense SwiGLU or MoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, ep_rank: int, ep_size: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer_idx):
            assert cfg.moe is not None
            self.mlp: nn.Module = MoELayer(
                cfg.hidden_size, cfg.moe, layer_idx=layer_idx, ep_rank=ep_rank, ep_size=ep_size
            )
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self, x_BSD: torch.Tensor, replay: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`replay`: this is the backward recompute of a checkpointed block (see `_checkpointed`)."""
        x_BSD = x_BSD + self.self_attn(self.input_layernorm(x_BSD))
        h_BSD = self.post_attention_layernorm(x_BSD)
        if isinstance(self.mlp, MoELayer):
            y_BSD, aux = self.mlp(h_BSD, replay=replay)
        else:
            y_BSD, aux = self.mlp(h_BSD), {}
        return x_BSD + y_BSD, aux


class DeepSeekMoEModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ep_rank: int, ep_size: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i, ep_rank, ep_size) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepSeekMoEForCausalLM(nn.Module):
    """`ep_rank`/`ep_size` (keyword-only, default no EP) make each MoE layer hold only its
    E/ep_size local experts (a build that never materialises other ranks' experts); `apply_ep`
    then installs the all-to-all dispatchers. `activation_checkpointing` and
    `loss_chunk_tokens` trade compute for memory (see the module docstring); neither changes
    the loss or the gradients."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        ep_rank: int = 0,
        ep_size: int = 1,
        activation_checkpointing: str = "none",
        loss_chunk_tokens: int = 0,
    ) -> None:
        super().__init__()
        if activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ValueError(
                f"activation_checkpointing={activation_checkpointing!r} must be one of {ACTIVATION_CHECKPOINTING}"
            )
        if loss_chunk_tokens < 0:
            raise ValueError(f"loss_chunk_tokens={loss_chunk_tokens} must be >= 0 (0 = no chunking)")
        self.cfg = cfg
        self.ep_size = ep_size
        """Expert-parallel size the MoE layers are split for (set by `apply_ep`)."""
        self.activation_checkpointing = activation_checkpointing
        """"none" or "full" (recompute every block in backward during training)."""
        self.loss_chunk_tokens = loss_chunk_tokens
        """0: the loss reads the full logits; N > 0: with labels, the head and the loss run N
        tokens at a time (chunked_lm_loss.py) and `logits_BSV` is None."""
        self.model = DeepSeekMoEModel(cfg, ep_rank, ep_size)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) for every linear/embedding/router weight, ones for norms,
        zero V3 biases, fresh RoPE tables. Safe to call after `to_empty()` from meta."""
        if self.lm_head.weight.is_meta:  # nothing to initialise (summary / deferred init)
            return
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, RoutedExperts):
                nn.init.normal_(m.gate_up_proj, mean=0.0, std=std)
                nn.init.normal_(m.down_proj, mean=0.0, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, RotaryEmbedding):
                m.reset_tables()
        for layer in self.moe_layers():
            nn.init.normal_(layer.gate.weight, mean=0.0, std=std)
            layer.gate.e_score_correction_bias.zero_()
            layer.gate.pending_load_E.zero_()
            layer.stats.reset()

    def moe_layers(self) -> Iterator[MoELayer]:
        for block in self.model.layers:
            if isinstance(block.mlp, MoELayer):
                yield block.mlp

    def forward(self, input_ids_BS: torch.Tensor, labels_BS: Optional[torch.Tensor] = None) -> CausalLMOutput:
        x_BSD = self.model.embed_tokens(input_ids_BS)
        aux_losses: dict[str, torch.Tensor] = {}
        recompute = self.activation_checkpointing == "full" and self.training and torch.is_grad_enabled()
        for block in self.model.layers:
            x_BSD, aux = _checkpointed(block, x_BSD) if recompute else block(x_BSD)
            for name, value in aux.items():
                aux_losses[name] = aux_losses[name] + value if name in aux_losses else value
        h_BSD = self.model.norm(x_BSD)
        if labels_BS is not None and labels_BS.shape != input_ids_BS.shape:
            raise ValueError(
                f"labels shape {tuple(labels_BS.shape)} != input_ids shape "
                f"{tuple(input_ids_BS.shape)}: pass already-shifted next-token labels."
            )
        chunked = labels_BS is not None and self.loss_chunk_tokens > 0
        logits_BSV = None if chunked else self.lm_head(h_BSD)
        aux_loss = (
            torch.stack(list(aux_losses.values())).sum()
            if aux_losses
            else torch.zeros((), device=h_BSD.device)
        )
        out = CausalLMOutput(logits_BSV=logits_BSV, aux_loss=aux_loss, aux_losses=aux_losses)
        if labels_BS is not None:
            if chunked:
                out.lm_loss = chunked_lm_cross_entropy(
                    h_BSD.reshape(-1, h_BSD.shape[-1]),
                    self.lm_head.weight,
                    labels_BS.reshape(-1),
                    chunk_tokens=self.loss_chunk_tokens,
                )
            else:
                out.lm_loss = lm_cross_entropy(logits_BSV, labels_BS)
            out.loss = out.lm_loss + aux_loss
        return out

    def apply_ep(
        self,
        *,
        ep_rank: int,
        ep_size: int,
        make_dispatcher: Callable[[], Dispatcher],
        wrap_experts: Optional[Callable[[nn.Module], nn.Module]] = None,
    ) -> None:
        """Expert parallelism: every MoE layer keeps EP rank `ep_rank`'s share of its experts
        and routes through its own `make_dispatcher()` (see `MoELayer.apply_ep`)."""
        layers = list(self.moe_layers())
        if not layers:
            raise ValueError("apply_ep: the model has no MoELayer (dense model?); do not call it")
        for layer in layers:
            layer.apply_ep(
                ep_rank=ep_rank, ep_size=ep_size, make_dispatcher=make_dispatcher, wrap_experts=wrap_experts
            )
        self.ep_size = ep_size

    def disable_top_experts(self, r: int) -> None:
        """Analysis (DeepSeekMoE Fig. 4): every MoE layer routes each token past its `r`
        highest-affinity routed experts to the next-ranked ones (`route(skip_top=r)`); 0
        restores plain routing. ValueError when r + top_k exceeds the experts a token may reach."""
        if self.cfg.moe is None:
            if r:
                raise ValueError(f"disabling the top {r} experts needs routed experts; this model is dense")
            return
        check_skip_top(r, self.cfg.moe)
        for layer in self.moe_layers():
            layer.gate.skip_top = r

    @torch.no_grad()
    def update_router_bias(self, reduce_sum: Optional[Callable[[list[torch.Tensor]], None]] = None) -> None:
        """Apply the V3 selection-bias update on every MoE layer (no-op when off); `reduce_sum`
        sums each router's loads over the data-parallel ranks first (see `Router.update_bias`)."""
        for layer in self.moe_layers():
            layer.gate.update_bias(reduce_sum)

    @torch.no_grad()
    def router_metrics(self, reset: bool = True) -> dict[str, float]:
        """Per-layer router stats since the last reset, keyed "moe/layer{L}/<name>"."""
        out: dict[str, float] = {}
        for layer in self.moe_layers():
            for name, value in layer.stats.compute_metrics(reset=reset).items():
                out[f"moe/layer{layer.layer_idx}/{name}"] = value
        return out


def _checkpointed(block: Block, x_BSD: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """block(x_BSD), keeping only x_BSD for backward; the block runs again inside backward.

    The recompute must compute exactly the first forward, or the saved shapes (and under expert
    parallelism the all-to-all splits every rank agreed on) would differ:
    - RNG (router noise): `preserve_rng_state` restores the CPU and input-device generators.
    - Routing is then a deterministic function of the same inputs and weights.
    - Side effects (router statistics, V3 bias loads, the layer's last counts) happen once:
      the second call runs with replay=True. Every rank recomputes its blocks in the same
      (reverse) order in its own backward, so the all-to-alls pair up as in the forward.
    """
    calls = 0

    def run(x: torch.Tensor):
        nonlocal calls
        calls += 1
        return block(x, replay=calls > 1)

    return checkpoint(run, x_BSD, use_reentrant=False, preserve_rng_state=True)


def lm_cross_entropy(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (fp32) over labels != -100; 0 (not NaN) if every label is ignored."""
    V = logits_BSV.shape[-1]
    total = F.cross_entropy(
        logits_BSV.float().reshape(-1, V), labels_BS.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = (labels_BS != IGNORE_INDEX).sum().clamp_min(1)
    return total / count
