"""`--format deepseek`: the layout of DeepSeek's own DeepSeekMoE release (deepseek-moe-16b-base).

config.json: model_type "deepseek", architectures ["DeepseekForCausalLM"] and the release's
`DeepseekConfig` fields. Tensor names are ours already (the model was written against that
release), so the weights map one to one; only the V3 selection-bias buffer is left out.
The release derives head_dim = hidden_size / num_attention_heads, has no gate scaling, no
group-limited routing and softmax scoring only (see refusals.py). Inference servers (vLLM,
SGLang) load this layout natively; transformers needs the release's remote code
(configuration_deepseek.py, modeling_deepseek.py from deepseek-ai/deepseek-moe-16b-base).
"""

from __future__ import annotations

from typing import Any

import torch

from deepseek_moe.config.model import ModelConfig
from deepseek_moe.errors import ExportError

MODEL_TYPE = "deepseek"
ARCHITECTURE = "DeepseekForCausalLM"
HEAD_DIM_FREE = False
_BIAS_SUFFIX = ".mlp.gate.e_score_correction_bias"


def config_json(cfg: ModelConfig, *, dtype: torch.dtype, special_ids: dict[str, int]) -> dict[str, Any]:
    """The release's config.json fields for `cfg`."""
    moe = cfg.moe
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": moe.moe_intermediate_size if moe else cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "n_shared_experts": (moe.n_shared_experts or None) if moe else None,
        "n_routed_experts": moe.n_routed_experts if moe else None,
        "num_experts_per_tok": moe.top_k if moe else None,
        "moe_layer_freq": 1,
        "first_k_dense_replace": cfg.first_k_dense if moe else 0,
        "norm_topk_prob": moe.norm_topk_prob if moe else False,
        "scoring_func": "softmax",
        "aux_loss_alpha": moe.aux_loss_alpha if moe else 0.0,
        "seq_aux": moe.seq_aux if moe else False,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.rms_norm_eps,
        "use_cache": True,
        "bos_token_id": special_ids.get("bos"),
        "eos_token_id": special_ids.get("eos"),
        "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **({"pad_token_id": special_ids["pad"]} if "pad" in special_ids else {}),
    }


def to_tensors(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our HF-layout weights -> the release's tensors (the same names, minus the bias buffer)."""
    out = {k: v for k, v in weights.items() if not k.endswith(_BIAS_SUFFIX)}
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)  # the release ties by config, like transformers
    return out


def model_config_fields(config: dict[str, Any]) -> dict[str, Any]:
    """A release config.json -> our ModelConfig field values (nested `moe` as a dict)."""

    def need(key):
        if key not in config:
            raise ExportError(f"config.json has no {key!r}; is this a DeepSeekMoE directory?")
        return config[key]

    if config.get("scoring_func", "softmax") != "softmax":
        raise ExportError(
            f"config.json scoring_func={config['scoring_func']!r}: only softmax is in the DeepSeekMoE release"
        )
    if config.get("moe_layer_freq", 1) != 1:
        raise ExportError(
            f"config.json moe_layer_freq={config['moe_layer_freq']}: only every "
            "layer after first_k_dense_replace being MoE (1) is supported"
        )
    fields: dict[str, Any] = {
        "vocab_size": need("vocab_size"),
        "hidden_size": need("hidden_size"),
        "num_layers": need("num_hidden_layers"),
        "num_heads": need("num_attention_heads"),
        "num_kv_heads": config.get("num_key_value_heads") or need("num_attention_heads"),
        "head_dim": need("hidden_size") // need("num_attention_heads"),
        "intermediate_size": need("intermediate_size"),
        "max_seq_len": need("max_position_embeddings"),
        "rope_theta": float(config.get("rope_theta", 10000.0)),
        "rms_norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
    }
    if config.get("n_routed_experts"):
        fields["first_k_dense"] = config.get("first_k_dense_replace", 0)
        fields["moe"] = {
            "n_routed_experts": config["n_routed_experts"],
            "n_shared_experts": config.get("n_shared_experts") or 0,
            "top_k": need("num_experts_per_tok"),
            "moe_intermediate_size": need("moe_intermediate_size"),
            "norm_topk_prob": bool(config.get("norm_topk_prob", False)),
            "routed_scaling_factor": float(config.get("routed_scaling_factor", 1.0)),
            "scoring_func": "softmax",
        }
    else:
        fields["first_k_dense"] = fields["num_layers"]
        fields["moe"] = None
    return fields


def from_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The release's tensors -> our HF-layout weights (zero selection bias added)."""
    out = dict(tensors)
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    for i in range(cfg.num_layers):
        if cfg.is_moe_layer(i):
            out[f"model.layers.{i}{_BIAS_SUFFIX}"] = torch.zeros(cfg.moe.n_routed_experts)
    return out
