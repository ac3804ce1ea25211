"""LR schedules against hand-computed values."""

import math

import pytest
import torch

from deepseek_moe.config.train import OptimConfig
from deepseek_moe.train.schedule import build_lr_scheduler, lr_multiplier


def test_warmup_is_linear_from_first_step():
    f = [lr_multiplier(s, schedule="cosine", warmup_steps=4, decay_steps=10) for s in range(4)]
    assert f == [0.25, 0.5, 0.75, 1.0]


def test_cosine_hand_values():
    kw = dict(schedule="cosine", warmup_steps=2, decay_steps=12, min_lr_ratio=0.1)
    # progress = (step - 2) / 10
    assert lr_multiplier(2, **kw) == pytest.approx(1.0)
    assert lr_multiplier(7, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(pi/2) = 0
    assert lr_multiplier(4, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_multiplier(12, **kw) == pytest.approx(0.1)
    assert lr_multiplier(50, **kw) == pytest.approx(0.1)


def test_deepseek_step_decay_at_80_and_90_percent():
    kw = dict(
        schedule="step", warmup_steps=10, decay_steps=100, step_decay_at=(0.8, 0.9), step_decay_factor=0.316
    )
    assert lr_multiplier(9, **kw) == 1.0
    assert lr_multiplier(79, **kw) == 1.0
    assert lr_multiplier(80, **kw) == pytest.approx(0.316)
    assert lr_multiplier(89, **kw) == pytest.approx(0.316)
    assert lr_multiplier(90, **kw) == pytest.approx(0.316**2)
    assert lr_multiplier(99, **kw) == pytest.approx(0.099856)


def test_constant_after_warmup():
    assert lr_multiplier(0, schedule="constant", warmup_steps=0, decay_steps=5) == 1.0
    assert lr_multiplier(100, schedule="constant", warmup_steps=3, decay_steps=5) == 1.0


def test_lambdalr_applies_multiplier_to_every_group():
    w1, w2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [w1]}, {"params": [w2], "weight_decay": 0.0}], lr=2.0)
    cfg = OptimConfig(lr=2.0, schedule="step", warmup_steps=2, step_decay_at=[0.5], step_decay_factor=0.5)
    sched = build_lr_scheduler(opt, cfg, decay_steps=6)
    seen = []
    for _ in range(6):
        seen.append(sched.get_last_lr())
        opt.step()
        sched.step()
    assert [lrs[0] for lrs in seen] == pytest.approx([1.0, 2.0, 2.0, 1.0, 1.0, 1.0])
    assert all(a == b for a, b in seen)
