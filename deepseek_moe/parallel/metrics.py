"""All-to-all traffic statistics of the expert-parallel dispatchers."""

from __future__ import annotations

from deepseek_moe.model.transformer import DeepSeekMoEForCausalLM
from deepseek_moe.parallel.dispatcher import AllToAllDispatcher

__all__ = ["ep_metrics"]


def ep_metrics(model: DeepSeekMoEForCausalLM, reset: bool = True) -> dict[str, float]:
    """Per MoE layer, this rank's all-to-all statistics since the last reset:
    `moe/layer{L}/a2a_bytes` (bytes sent to other ranks, forward dispatch + combine; backward
    moves as much again) and `moe/layer{L}/a2a_ranks_per_token` (mean distinct EP ranks a token
    was sent to). Empty for layers without an all-to-all dispatcher. Reduce across ranks
    (sum bytes, mean ranks) in the trainer."""
    out: dict[str, float] = {}
    for layer in model.moe_layers():
        if isinstance(layer.dispatcher, AllToAllDispatcher):
            stats = layer.dispatcher.pop_stats(reset=reset)
            out[f"moe/layer{layer.layer_idx}/a2a_bytes"] = stats["a2a_bytes"]
            out[f"moe/layer{layer.layer_idx}/a2a_ranks_per_token"] = stats["ranks_per_token"]
    return out
