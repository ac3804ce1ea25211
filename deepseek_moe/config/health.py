"""MoE health: the expert-load statistics and the alarms of a training run (`health.*`,
conf/health/default.yaml). What they do: deepseek_moe/train/moe_health.py.

Every alarm is one warning line in the log, one `{"step", "alarm", ...}` line in metrics.jsonl and
a wandb alert (online runs). A threshold of 0 turns its alarm off. No alarm fires at or before
`warmup_steps` (early routing and losses move fast by design).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class HealthConfig:
    """Expert-load statistics and alarms."""

    expert_stats: bool = True
    """Count the router statistics and tokens per expert in training forwards, reduce them over
    the ranks on logging steps (metrics.jsonl `moe/layer{L}/*`, `expert_loads.bin`, the load
    alarms). false: none of that is counted, reduced or written (the balance losses, the V3 bias
    and dispatch still use the per-forward counts; loss and gradient-norm spike alarms still
    run). The switch exists to measure what the statistics cost."""
    warmup_steps: int = 100
    """No alarm at or before this step of the run."""
    dead_fraction: float = 0.1
    """An expert is dead when its tokens over a logging interval are below this fraction of its
    fair share (the layer's tokens / experts); 0 = no dead-expert alarm."""
    dead_intervals: int = 3
    """...for this many consecutive logging intervals."""
    hot_expert_factor: float = 4.0
    """Collapse: the most loaded expert of a layer gets more than this multiple of its fair
    share over a logging interval; 0 = off."""
    hot_rank_factor: float = 1.5
    """Hot EP rank: the experts of one EP rank get more than this multiple of its fair share
    (the layer's tokens / ep_size) over a logging interval (only with parallel.ep_size > 1);
    0 = off."""
    spike_sigmas: float = 6.0
    """Loss or gradient-norm spike: a step's value exceeds the mean of the trailing window by
    more than this many of its standard deviations; 0 = off."""
    spike_window: int = 100
    """Steps in the trailing window (the check starts once it is full, also after a resume)."""
    spike_min_rise: float = 0.1
    """...and exceeds the window's mean by at least this fraction of it, so the noise of a very
    flat window (a tiny standard deviation) is not a spike."""

    def __post_init__(self) -> None:
        for name in ("warmup_steps", "dead_intervals", "spike_window"):
            value = getattr(self, name)
            if value < 0 or (value == 0 and name != "warmup_steps"):
                raise ValueError(
                    f"health.{name}={value!r} must be {'>= 0' if name == 'warmup_steps' else '> 0'}"
                )
        for name in (
            "dead_fraction",
            "hot_expert_factor",
            "hot_rank_factor",
            "spike_sigmas",
            "spike_min_rise",
        ):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"health.{name}={getattr(self, name)!r} must be >= 0 (0 turns the alarm off)"
                )
        if not self.dead_fraction < 1:
            raise ValueError(
                f"health.dead_fraction={self.dead_fraction!r} must be below 1 (a fraction of the fair "
                "share, e.g. 0.1)"
            )
        for name in ("hot_expert_factor", "hot_rank_factor"):
            value = getattr(self, name)
            if 0 < value <= 1:
                raise ValueError(
                    f"health.{name}={value!r} must be above 1 (a multiple of the fair share, e.g. 2), "
                    "or 0 to turn the alarm off"
                )
