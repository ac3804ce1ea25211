"""`--format qwen2_moe`: the same function as a `Qwen2MoeForCausalLM` (native in transformers).

The mapping is exact, not approximate:
- Attention: Qwen2-MoE has q/k/v biases; we write `qkv_bias: true` with ZERO biases (x + 0 is
  exact), so loaders that always build the biases (vLLM, transformers < 5) load it too.
- Dense first layers: `mlp_only_layers = [0 .. first_k_dense-1]`, `decoder_sparse_step = 1`.
- Routed experts: `mlp.gate.weight`, `mlp.experts.{e}.{gate,up,down}_proj.weight` (the per-
  expert layout of the released Qwen1.5-MoE checkpoints; transformers 5 fuses it on load).
  Softmax over all experts in fp32, top-k, `norm_topk_prob` as ours.
- Shared experts: all Ks of them are one SwiGLU of width Ks * H in our model already; Qwen2-MoE
  has one shared expert of width `shared_expert_intermediate_size`, multiplied by
  `sigmoid(shared_expert_gate(x))`. A zero gate weight gives sigmoid(0) = 0.5 exactly, and the
  shared expert's down projection is written times 2: scaling by a power of two is exact in
  floating point (only the exponent changes), so 0.5 * ((2 W) h) == W h bit for bit (barring
  overflow at the format's largest exponent). Without shared experts (Ks = 0) we write a
  width-1 shared expert with a zero down projection: it adds exactly 0.
- head_dim: written when it differs from hidden_size / num_heads (Qwen2-MoE reads it).
"""

from __future__ import annotations

from typing import Any

import torch

from deepseek_moe.config.model import ModelConfig
from deepseek_moe.errors import ExportError

MODEL_TYPE = "qwen2_moe"
ARCHITECTURE = "Qwen2MoeForCausalLM"
HEAD_DIM_FREE = True
SHARED_SCALE = 2.0
"""Shared expert down projection multiplier: 1 / sigmoid(0)."""


def config_json(cfg: ModelConfig, *, dtype: torch.dtype, special_ids: dict[str, int]) -> dict[str, Any]:
    moe = cfg.moe
    shared = moe.n_shared_experts * moe.moe_intermediate_size if moe and moe.n_shared_experts else 1
    out = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.rms_norm_eps,
        "use_cache": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "qkv_bias": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(cfg.first_k_dense)) if moe else list(range(cfg.num_layers)),
        "num_experts": moe.n_routed_experts if moe else 0,
        "num_experts_per_tok": moe.top_k if moe else 1,
        "moe_intermediate_size": moe.moe_intermediate_size if moe else 1,
        "shared_expert_intermediate_size": shared,
        "norm_topk_prob": moe.norm_topk_prob if moe else False,
        "router_aux_loss_coef": moe.aux_loss_alpha if moe else 0.0,
        "output_router_logits": False,
        "bos_token_id": special_ids.get("bos"),
        "eos_token_id": special_ids.get("eos"),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if "pad" in special_ids:
        out["pad_token_id"] = special_ids["pad"]
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        out["head_dim"] = cfg.head_dim
    return out


def to_tensors(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if key.endswith(".mlp.gate.e_score_correction_bias"):
            continue
        if ".mlp.shared_experts." in key:
            key = key.replace(".mlp.shared_experts.", ".mlp.shared_expert.")
            if key.endswith("down_proj.weight"):
                value = value * SHARED_SCALE
        out[key] = value
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    ref = weights["model.embed_tokens.weight"]
    D, like = cfg.hidden_size, dict(dtype=ref.dtype)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        out[f"{p}.self_attn.q_proj.bias"] = torch.zeros(cfg.num_heads * cfg.head_dim, **like)
        for name in ("k_proj", "v_proj"):
            out[f"{p}.self_attn.{name}.bias"] = torch.zeros(cfg.num_kv_heads * cfg.head_dim, **like)
        if cfg.is_moe_layer(i):
            out[f"{p}.mlp.shared_expert_gate.weight"] = torch.zeros(1, D, **like)
            if not cfg.moe.n_shared_experts:
                out[f"{p}.mlp.shared_expert.gate_proj.weight"] = torch.zeros(1, D, **like)
                out[f"{p}.mlp.shared_expert.up_proj.weight"] = torch.zeros(1, D, **like)
                out[f"{p}.mlp.shared_expert.down_proj.weight"] = torch.zeros(D, 1, **like)
    return out


def model_config_fields(config: dict[str, Any]) -> dict[str, Any]:
    """A Qwen2-MoE config.json written by `config_json` -> our ModelConfig field values."""
    try:
        L, D, heads = config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]
        dense = sorted(config.get("mlp_only_layers") or [])
        if config.get("decoder_sparse_step", 1) != 1 or dense != list(range(len(dense))):
            raise ExportError(
                f"config.json: decoder_sparse_step={config.get('decoder_sparse_step')}"
                f", mlp_only_layers={dense}: only leading dense layers are supported"
            )
        fields: dict[str, Any] = {
            "vocab_size": config["vocab_size"],
            "hidden_size": D,
            "num_layers": L,
            "num_heads": heads,
            "num_kv_heads": config.get("num_key_value_heads") or heads,
            "head_dim": config.get("head_dim") or D // heads,
            "intermediate_size": config["intermediate_size"],
            "max_seq_len": config["max_position_embeddings"],
            "rope_theta": float(
                (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))
            ),
            "rms_norm_eps": float(config.get("rms_norm_eps", 1e-6)),
            "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        }
        if config.get("num_experts", 0) > 0 and len(dense) < L:
            H = config["moe_intermediate_size"]
            shared = config["shared_expert_intermediate_size"]
            if shared % H == 0:
                n_shared = shared // H
            elif shared == 1:  # what `config_json` writes for a model without shared experts
                n_shared = 0
            else:
                raise ExportError(
                    f"config.json: shared_expert_intermediate_size={shared} is not "
                    f"a multiple of moe_intermediate_size={H}: not a DeepSeekMoE"
                )
            fields["first_k_dense"] = len(dense)
            fields["moe"] = {
                "n_routed_experts": config["num_experts"],
                "top_k": config["num_experts_per_tok"],
                "moe_intermediate_size": H,
                "n_shared_experts": n_shared,
                "norm_topk_prob": bool(config.get("norm_topk_prob", False)),
            }
        else:
            fields["first_k_dense"], fields["moe"] = L, None
    except KeyError as err:
        raise ExportError(f"config.json has no {err.args[0]!r}; is this a Qwen2-MoE directory?") from err
    return fields


def from_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Qwen2-MoE tensors -> our HF-layout weights. Exact only for what `to_tensors` writes:
    zero q/k/v biases and zero shared-expert gates (else the function is not ours: refused)."""
    out: dict[str, torch.Tensor] = {}
    no_shared = cfg.moe is not None and not cfg.moe.n_shared_experts
    for key, value in tensors.items():
        if key.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias", "shared_expert_gate.weight")):
            if torch.count_nonzero(value):
                raise ExportError(
                    f"{key} is not zero: this Qwen2-MoE model is not a DeepSeekMoE "
                    "(only directories written by --format qwen2_moe import exactly)"
                )
            continue
        if ".mlp.shared_expert." in key:
            if no_shared:  # the width-1 placeholder must add exactly 0
                if key.endswith("down_proj.weight") and torch.count_nonzero(value):
                    raise ExportError(f"{key} is not zero, but the config has no shared experts")
                continue
            key = key.replace(".mlp.shared_expert.", ".mlp.shared_experts.")
            if key.endswith("down_proj.weight"):
                value = value / SHARED_SCALE
        out[key] = value
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    for i in range(cfg.num_layers):
        if cfg.is_moe_layer(i):
            out[f"model.layers.{i}.mlp.gate.e_score_correction_bias"] = torch.zeros(cfg.moe.n_routed_experts)
    return out
