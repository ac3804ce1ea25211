"""Learning-rate schedules as pure functions of the step.

`lr_multiplier(step, ...)` returns the factor applied to the peak LR for the optimizer step with
0-based index `step` (the LR used by the first update is `lr_multiplier(0)`). The trainer wraps it
in a `torch.optim.lr_scheduler.LambdaLR`, which DeepSpeed steps after every optimizer step and
saves in its checkpoints.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch

from deepseek_moe.config.train import OptimConfig


def lr_multiplier(
    step: int,
    *,
    schedule: str,
    warmup_steps: int,
    decay_steps: int,
    min_lr_ratio: float = 0.1,
    step_decay_at: tuple[float, ...] = (0.8, 0.9),
    step_decay_factor: float = 0.316,
) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based).

    1) warmup: linear from 1/warmup to 1 over the first `warmup_steps` steps (step 0 already
       moves the weights, so it gets lr/warmup, not 0).
    2) then by schedule:
       - "constant": 1.
       - "cosine": from 1 down to min_lr_ratio along a half cosine over [warmup, decay_steps];
         min_lr_ratio after decay_steps.
       - "step" (DeepSeekMoE): 1, times step_decay_factor once for each fraction f in
         step_decay_at with step >= f * decay_steps.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        passed = sum(1 for frac in step_decay_at if step >= frac * decay_steps)
        return step_decay_factor**passed
    if schedule == "cosine":
        if step >= decay_steps:
            return min_lr_ratio
        progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}; use 'cosine', 'step' or 'constant'")


def schedule_fn(cfg: OptimConfig, decay_steps: int) -> Callable[[int], float]:
    """The multiplier function for `cfg` (picklable, so LambdaLR state can be saved)."""
    return partial(
        lr_multiplier,
        schedule=cfg.schedule,
        warmup_steps=cfg.warmup_steps,
        decay_steps=decay_steps,
        min_lr_ratio=cfg.min_lr_ratio,
        step_decay_at=tuple(cfg.step_decay_at),
        step_decay_factor=cfg.step_decay_factor,
    )


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, decay_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over every param group; each group's `lr` must be the peak LR."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_fn(cfg, decay_steps))
