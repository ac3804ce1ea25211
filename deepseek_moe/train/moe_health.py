"""MoE health on the training side: reduce the router statistics, record the expert loads, raise
alarms.

The MoE layers accumulate (`model/router_stats.py`: tokens per expert and the router counters,
on the device, in training forwards only); this module, on the trainer's logging steps:

1. `collect_router_stats`: ONE all-reduce (SUM) of every layer's buffers and all-to-all traffic
   packed into one fp64 tensor, then ONE device-to-host transfer; the buffers restart from zero.
   Other steps add nothing to the step: no collective, no host read.
2. `ExpertLoadsFile`: appends the global tokens per expert of every MoE layer for the interval
   to `<run_dir>/expert_loads.bin` (fixed-size binary records, layout in `expert_loads.json`),
   truncated to the resumed step as metrics.jsonl is.
3. `AlarmMonitor`: dead experts, a collapsed router (hot expert), a hot EP rank from the loads;
   loss and gradient-norm spikes from every step's values (host floats the trainer already
   has). Thresholds: `HealthConfig` (conf/health/default.yaml).

Size of expert_loads.bin: 24 bytes + layers x experts x 4 (uint32) per logging step. The 145B
preset (61 MoE layers x 128 experts): 31,256 bytes a record; 100k steps logged every 10 steps
are 10k records = 313 MB (31 MB logged every 100 steps), beside checkpoints of about 1.7 TB
each. Counts are uint32 unless a logging interval could exceed 2**32 - 1 copies of one expert
(global tokens per step x log_every), then uint64 (the header says which).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from deepseek_moe.atomic import atomic_write_bytes
from deepseek_moe.config.health import HealthConfig
from deepseek_moe.errors import CheckpointError
from deepseek_moe.model.router_stats import COUNTERS, router_metrics_from

log = logging.getLogger("deepseek_moe.train")

LOADS_FILE = "expert_loads.bin"
LOADS_HEADER = "expert_loads.json"
FORMAT = "deepseek_moe.expert_loads/1"


# ---- 1. reduce ------------------------------------------------------------------------------
@dataclass
class RouterStatsSnapshot:
    """The global (summed over ranks) router statistics of one logging interval."""

    metrics: dict[str, float]
    """`moe/layer{L}/<name>` for metrics.jsonl (router_metrics_from + traffic + rank_imbalance)."""
    layers: list[int]
    """Indices of the MoE layers, in model order."""
    counts_LE: np.ndarray
    """int64 [layers, experts]: tokens (copies) per global expert over the interval."""


def collect_router_stats(
    model: Any,
    device: torch.device,
    reduce_sum: Callable[[list[torch.Tensor]], None],
    world_size: int,
    ep_size: int,
) -> RouterStatsSnapshot:
    """Sum every MoE layer's statistics over the ranks in one `reduce_sum` (the trainer passes
    `distributed.reduce_sum_`), read them once, reset them. Collective: every rank calls it at
    the same step. `ep_metrics` (all-to-all bytes and ranks per token, host numbers) rides in the
    same tensor; bytes are summed over ranks, ranks per token averaged."""
    from deepseek_moe.parallel.metrics import ep_metrics

    moe_layers = list(model.moe_layers())
    traffic = ep_metrics(model, reset=True)  # host floats; empty at EP=1
    keys = sorted(traffic)
    parts = [t for layer in moe_layers for t in (layer.stats.tokens_per_expert_E, layer.stats.counters)]
    # torch.full, not torch.tensor: a host-to-device copy of a Python list would block on CUDA
    parts += [torch.full((1,), float(traffic[k]), dtype=torch.float64, device=device) for k in keys]
    flat = torch.cat([p.to(device, torch.float64).reshape(-1) for p in parts])
    reduce_sum([flat])
    values = flat.tolist()  # the one device-to-host transfer
    for layer in moe_layers:
        layer.stats.reset()

    metrics: dict[str, float] = {}
    counts = []
    pos = 0
    for layer in moe_layers:
        E = layer.num_experts
        load = values[pos : pos + E]
        counters = values[pos + E : pos + E + len(COUNTERS)]
        pos += E + len(COUNTERS)
        counts.append(load)
        for name, value in router_metrics_from(load, counters).items():
            metrics[f"moe/layer{layer.layer_idx}/{name}"] = value
        if ep_size > 1 and sum(load) > 0:
            ranks = rank_loads(np.asarray(load), ep_size)
            metrics[f"moe/layer{layer.layer_idx}/rank_imbalance"] = float(ranks.max() / ranks.mean())
    for key, value in zip(keys, values[pos:]):
        metrics[key] = value if key.endswith("a2a_bytes") else value / world_size
    counts_LE = np.rint(np.asarray(counts, dtype=np.float64)).astype(np.int64)
    return RouterStatsSnapshot(metrics, [layer.layer_idx for layer in moe_layers], counts_LE)


def rank_loads(counts_E: np.ndarray, ep_size: int) -> np.ndarray:
    """Tokens per EP rank: rank r holds the experts [r*E/P, (r+1)*E/P). Works on [..., E]."""
    return counts_E.reshape(*counts_E.shape[:-1], ep_size, -1).sum(-1)


# ---- 2. record ------------------------------------------------------------------------------
def record_dtype(num_layers: int, num_experts: int, count_dtype: str) -> np.dtype:
    """One record: the logging step, the first step of its interval, the EP size, the counts."""
    return np.dtype(
        [
            ("step", "<i8"),
            ("first_step", "<i8"),
            ("ep_size", "<i8"),
            ("counts", count_dtype, (num_layers, num_experts)),
        ]
    )


def count_dtype_for(max_count: int) -> str:
    """uint32 while one interval's count of one expert fits, else uint64."""
    return "<u4" if max_count < 2**32 else "<u8"


class ExpertLoadsFile:
    """`<run_dir>/expert_loads.bin` (records) + `expert_loads.json` (their layout), rank 0.

    Appends one fixed-size record per logging step and flushes it; a record cut by a kill is
    ignored by readers and removed by `truncate_after` at the next launch, which also drops the
    records after the resumed checkpoint's step (as `MetricsWriter.truncate_after` does)."""

    def __init__(self, run_dir: Path, layers: list[int], num_experts: int, max_count: int) -> None:
        self.path = run_dir / LOADS_FILE
        self.header_path = run_dir / LOADS_HEADER
        self.layers, self.num_experts = list(layers), num_experts
        self.count_dtype = count_dtype_for(max_count)
        self._file = None
        self._warned = False

    def _header(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "layers": self.layers,
            "num_experts": self.num_experts,
            "count_dtype": self.count_dtype,
            "record": "little-endian int64 step, int64 first_step, int64 ep_size, then counts[layer][expert]",
            "record_bytes": record_dtype(len(self.layers), self.num_experts, self.count_dtype).itemsize,
        }

    def truncate_after(self, step: int) -> None:
        """Keep the records with step <= `step` (all of a fresh run's are dropped at step 0),
        then open for appending. A header of another layout with records left is an error."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = json.loads(self.header_path.read_text()) if self.header_path.exists() else None
        if header is not None and self.path.exists():
            dtype = record_dtype(len(header["layers"]), header["num_experts"], header["count_dtype"])
            n = self.path.stat().st_size // dtype.itemsize  # a partial last record is cut off
            steps = np.memmap(self.path, dtype=dtype, mode="r", shape=(n,))["step"] if n else np.zeros(0)
            later = np.flatnonzero(np.asarray(steps) > step)
            keep = int(later[0]) if later.size else n
            del steps
            os.truncate(self.path, keep * dtype.itemsize)
            same = header["layers"] == self.layers and header["num_experts"] == self.num_experts
            if keep and not same:
                raise CheckpointError(
                    f"{self.path} holds loads of layers {header['layers']} x {header['num_experts']} "
                    f"experts, this model has {self.layers} x {self.num_experts}; use a new run_dir"
                )
            if keep:
                self.count_dtype = header["count_dtype"]  # keep appending what the file holds
        elif self.path.exists():
            os.truncate(self.path, 0)  # records without a layout cannot be read
        if not self.path.exists() or self.path.stat().st_size == 0 or header is None:
            atomic_write_bytes(self.header_path, (json.dumps(self._header(), indent=1) + "\n").encode())
        self._file = open(self.path, "ab")

    def append(self, step: int, first_step: int, ep_size: int, counts_LE: np.ndarray) -> None:
        if self._file is None:
            raise RuntimeError("ExpertLoadsFile.truncate_after(step) opens the file; call it first")
        counts = np.asarray(counts_LE, dtype=np.int64)
        limit = np.iinfo(np.dtype(self.count_dtype)).max
        if limit < np.iinfo(np.int64).max and counts.max(initial=0) > limit:
            # only after a relaunch with a larger batch or log_every than the file was made for
            if not self._warned:
                self._warned = True
                log.warning("expert loads above %d are clipped in %s", limit, self.path)
            counts = np.minimum(counts, limit)
        rec = np.zeros(1, record_dtype(len(self.layers), self.num_experts, self.count_dtype))
        rec["step"], rec["first_step"], rec["ep_size"] = step, first_step, ep_size
        rec["counts"][0] = counts
        self._file.write(rec.tobytes())
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class ExpertLoads:
    """What `read_expert_loads` returns: N logging steps of L layers x E experts."""

    layers: list[int]
    steps: np.ndarray
    """int64 [N]: the logging step of each record."""
    first_steps: np.ndarray
    """int64 [N]: the first step its counts cover (counts are sums over first_step..step)."""
    ep_sizes: np.ndarray
    """int64 [N]: parallel.ep_size then (rank loads: `rank_loads(counts[i], ep_sizes[i])`)."""
    counts: np.ndarray
    """int64 [N, L, E]: global tokens per expert over the interval."""


def read_expert_loads(run_dir: Path) -> Optional[ExpertLoads]:
    """The records of a run directory (a live run's too: a partial last record is skipped);
    None when the run has none."""
    run_dir = Path(run_dir)
    header_path, path = run_dir / LOADS_HEADER, run_dir / LOADS_FILE
    if not header_path.exists() or not path.exists():
        return None
    header = json.loads(header_path.read_text())
    dtype = record_dtype(len(header["layers"]), header["num_experts"], header["count_dtype"])
    data = path.read_bytes()
    recs = np.frombuffer(data[: len(data) // dtype.itemsize * dtype.itemsize], dtype=dtype)
    return ExpertLoads(
        layers=list(header["layers"]),
        steps=recs["step"].copy(),
        first_steps=recs["first_step"].copy(),
        ep_sizes=recs["ep_size"].copy(),
        counts=recs["counts"].astype(np.int64),
    )


# ---- 3. alarms ------------------------------------------------------------------------------
@dataclass
class Alarm:
    step: int
    kind: str
    """"dead_expert", "hot_expert", "hot_rank", "loss_spike" or "grad_norm_spike"."""
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The metrics.jsonl line."""
        return {"step": self.step, "alarm": self.kind, "message": self.message, **self.details}


class AlarmMonitor:
    """Host-only alarm logic over a stream of logging intervals and step values (no torch, no
    collective: rank 0 runs it on values every rank already agrees on).

    Each condition fires when it starts and again only after it has cleared, so a lasting state
    is one line, not one per interval. State is not checkpointed: after a resume the dead
    counters and the spike windows start empty."""

    def __init__(self, cfg: HealthConfig) -> None:
        self.cfg = cfg
        self._below: dict[tuple[int, int], int] = {}  # (layer, expert) -> consecutive intervals
        self._dead: set[tuple[int, int]] = set()
        self._hot: set[tuple[str, int]] = set()
        self._windows: dict[str, deque] = {}
        self._spiking: set[str] = set()

    def check_loads(self, step: int, layers: list[int], counts_LE: np.ndarray, ep_size: int) -> list[Alarm]:
        cfg, alarms = self.cfg, []
        if step <= cfg.warmup_steps:
            return alarms
        for layer, counts in zip(layers, np.asarray(counts_LE, dtype=np.float64)):
            total = counts.sum()
            if total <= 0:
                continue
            fair = total / counts.size
            if cfg.dead_fraction > 0:
                newly = []
                for e, c in enumerate(counts):
                    key = (layer, e)
                    if c < cfg.dead_fraction * fair:
                        self._below[key] = self._below.get(key, 0) + 1
                        if self._below[key] >= cfg.dead_intervals and key not in self._dead:
                            self._dead.add(key)
                            newly.append(e)
                    else:
                        self._below.pop(key, None)
                        self._dead.discard(key)
                if newly:
                    share = [round(float(counts[e] / fair), 4) for e in newly]
                    alarms.append(
                        Alarm(
                            step,
                            "dead_expert",
                            f"layer {layer}: expert(s) {newly} below {cfg.dead_fraction:g} of their fair share "
                            f"for {cfg.dead_intervals} logging intervals (load / fair share {share})",
                            {"layer": layer, "experts": newly, "load_vs_fair": share},
                        )
                    )
            if cfg.hot_expert_factor > 0:
                e = int(counts.argmax())
                ratio = float(counts[e] / fair)
                alarms += self._hot_check(
                    step,
                    ("expert", layer),
                    ratio > cfg.hot_expert_factor,
                    "hot_expert",
                    f"layer {layer}: expert {e} has {ratio:.2f}x its fair share (> {cfg.hot_expert_factor:g}): "
                    "router collapse?",
                    {"layer": layer, "expert": e, "load_vs_fair": ratio},
                )
            if cfg.hot_rank_factor > 0 and ep_size > 1:
                ranks = rank_loads(counts, ep_size)
                r = int(ranks.argmax())
                ratio = float(ranks[r] / ranks.mean())
                alarms += self._hot_check(
                    step,
                    ("rank", layer),
                    ratio > cfg.hot_rank_factor,
                    "hot_rank",
                    f"layer {layer}: EP rank {r} gets {ratio:.2f}x its fair share of tokens "
                    f"(> {cfg.hot_rank_factor:g})",
                    {"layer": layer, "ep_rank": r, "load_vs_fair": ratio},
                )
        return alarms

    def _hot_check(self, step, key, hot: bool, kind, message, details) -> list[Alarm]:
        if not hot:
            self._hot.discard(key)
            return []
        if key in self._hot:
            return []
        self._hot.add(key)
        return [Alarm(step, kind, message, details)]

    def check_step(self, step: int, values: dict[str, Optional[float]]) -> list[Alarm]:
        """`values`: this step's `loss` and `grad_norm` (None or non-finite ones are skipped)."""
        cfg, alarms = self.cfg, []
        if cfg.spike_sigmas <= 0:
            return alarms
        for name in ("loss", "grad_norm"):
            x = values.get(name)
            if x is None or not math.isfinite(x):
                continue
            window = self._windows.setdefault(name, deque(maxlen=cfg.spike_window))
            if len(window) == cfg.spike_window and step > cfg.warmup_steps:
                mean = sum(window) / len(window)
                std = math.sqrt(sum((v - mean) ** 2 for v in window) / len(window))
                spike = x > mean + cfg.spike_sigmas * std and x > mean * (1 + cfg.spike_min_rise)
                if spike and name not in self._spiking:
                    sigmas = (x - mean) / std if std > 0 else math.inf
                    alarms.append(
                        Alarm(
                            step,
                            f"{name}_spike",
                            f"{name} spike: {x:.4g} vs {mean:.4g} +- {std:.2g} over the last "
                            f"{cfg.spike_window} steps ({sigmas:.1f} sigma)",
                            {"value": x, "window_mean": mean, "window_std": std},
                        )
                    )
                    self._spiking.add(name)
                elif not spike:
                    self._spiking.discard(name)
            window.append(x)
        return alarms


# ---- the trainer's handle ---------------------------------------------------------------------
class MoEHealth:
    """What the trainer calls (every rank; only rank 0 writes and raises alarms).

    health = MoEHealth(cfg.health, model, ...); health.truncate_after(step)   # setup
    if health.due(step, stop_at): record.update(health.collect(step))         # collective
    alarms = health.alarms(record)                                            # host only
    """

    def __init__(
        self,
        cfg: HealthConfig,
        model: Any,
        *,
        run_dir: Path,
        is_main: bool,
        device: torch.device,
        world_size: int,
        ep_size: int,
        log_every: int,
        checkpoint_every: int,
        tokens_per_step: int,
        start_step: int,
        reduce_sum: Callable[[list[torch.Tensor]], None],
    ) -> None:
        self.cfg, self.model = cfg, model
        self.is_main, self.device, self.world_size, self.ep_size = is_main, device, world_size, ep_size
        self.log_every, self.checkpoint_every = log_every, checkpoint_every
        self.reduce_sum = reduce_sum
        self.last_collected = start_step
        self.snapshot: Optional[RouterStatsSnapshot] = None
        self.monitor = AlarmMonitor(cfg)
        layers = list(model.moe_layers())  # none in a dense model
        self.enabled = bool(layers) and cfg.expert_stats
        for layer in layers:
            layer.stats.enabled = self.enabled
        self.file: Optional[ExpertLoadsFile] = None
        if self.enabled and is_main:
            # one expert gets at most one copy of each token: tokens per step x the longest interval
            self.file = ExpertLoadsFile(
                run_dir,
                [layer.layer_idx for layer in layers],
                layers[0].num_experts,
                tokens_per_step * log_every,
            )

    def truncate_after(self, step: int) -> None:
        self.last_collected = step
        if self.file is not None:
            self.file.truncate_after(step)

    def due(self, step: int, stop_at: int) -> bool:
        """Logging steps, checkpoint steps (so a resume loses no interval) and the launch's last."""
        if not self.enabled or step <= self.last_collected:
            return False
        every = self.checkpoint_every
        return step % self.log_every == 0 or step >= stop_at or bool(every and step % every == 0)

    def collect(self, step: int) -> dict[str, float]:
        """Collective. The interval's router metrics for metrics.jsonl; rank 0 appends the loads."""
        snap = collect_router_stats(self.model, self.device, self.reduce_sum, self.world_size, self.ep_size)
        if self.file is not None:
            self.file.append(step, self.last_collected + 1, self.ep_size, snap.counts_LE)
        self.last_collected = step
        self.snapshot = snap if self.is_main else None
        return snap.metrics

    def alarms(self, step: int, values: dict[str, Any], collected: bool) -> list[Alarm]:
        """Rank 0: the alarms of this step (`collected`: `collect` ran at this step)."""
        if not self.is_main:
            return []
        alarms = self.monitor.check_step(step, values)
        if collected and self.snapshot is not None:
            snap = self.snapshot
            alarms += self.monitor.check_loads(step, snap.layers, snap.counts_LE, self.ep_size)
        return alarms

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
