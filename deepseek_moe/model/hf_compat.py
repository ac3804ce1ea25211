"""Copy our MoE layer's weights into an HF transformers DeepSeek MoE block.

Used by the parity tests (our layer must equal HF `DeepseekV2Moe` / `DeepseekV3MoE` on the same
weights) and by the MoE-layer benchmark (both compute on identical weights).

HF transformers 5.x stores routed experts fused and stacked: `experts.gate_up_proj` [E, 2H, D]
(gate rows first, then up) and `experts.down_proj` [E, D, H]: the same stacks as our
`RoutedExperts` parameters.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def copy_moe_weights_to_hf(ours: nn.Module, hf_moe: nn.Module) -> None:
    """Load router, routed experts, shared experts (and the V3 selection bias, if both have it)."""
    hf_moe.gate.weight.copy_(ours.gate.weight)
    if hasattr(hf_moe.gate, "e_score_correction_bias"):
        hf_moe.gate.e_score_correction_bias.copy_(ours.gate.e_score_correction_bias)
    hf_moe.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
    hf_moe.experts.down_proj.copy_(ours.experts.down_proj)
    if ours.shared_experts is not None:
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(hf_moe.shared_experts, name).weight.copy_(getattr(ours.shared_experts, name).weight)
