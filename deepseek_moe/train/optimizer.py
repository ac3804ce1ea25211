"""AdamW over the MoE-aware parameter groups (`parallel/param_groups.py`)."""

from __future__ import annotations

import torch

from deepseek_moe.config.train import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW with decay on matrices only; each group starts at the peak LR (the schedule scales it)."""
    from deepseek_moe.parallel.param_groups import optimizer_param_groups

    groups = optimizer_param_groups(model, cfg.weight_decay)
    for group in groups:
        group["lr"] = cfg.lr
    # NOTE: fused=True runs the whole AdamW update as one vectorised kernel per tensor (CPU
    # and CUDA) instead of a Python loop over parameters.
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=device_type in ("cpu", "cuda"),
    )
