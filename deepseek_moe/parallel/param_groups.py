"""AdamW parameter groups for a model with DeepSpeed MoE experts."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["optimizer_param_groups"]


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW param groups, split for DeepSpeed MoE.

    Decay: every matrix (ndim >= 2: linear, embedding, router weights). No decay: norms, biases,
    other vectors. Then `split_params_into_different_moe_groups_for_optimizer` moves expert
    params into groups marked `moe=True` and named by their EDP group, which ZeRO-1/2 partition
    over the expert-data-parallel group instead of the whole data-parallel world.
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    groups = split_params_into_different_moe_groups_for_optimizer(groups)
    # an empty group makes ZeRO's flattening fail; drop them (e.g. a model without vectors)
    return [g for g in groups if len(g["params"]) > 0]
