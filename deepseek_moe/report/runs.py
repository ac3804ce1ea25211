"""Read what a run directory holds so far: metrics.jsonl, expert_loads.bin, config.yaml.

Works on a live run: a last line cut in the middle of a write is skipped (so is a cut expert-load
record), and every file may be missing except metrics.jsonl.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from deepseek_moe.errors import ReportError
from deepseek_moe.train.moe_health import ExpertLoads, read_expert_loads

_LAYER_KEY = re.compile(r"^moe/layer(\d+)/(.+)$")


@dataclass
class Run:
    """One run directory, as columns over steps (NaN where a step lacks a value)."""

    path: Path
    name: str
    train: list[dict[str, Any]]
    """Optimizer-step lines (they carry `loss`)."""
    val: list[dict[str, Any]]
    """Evaluation lines (`val_loss`, and `val_loss/<source>` when the run evaluates per source)."""
    alarms: list[dict[str, Any]]
    """Alarm lines (`alarm`, `message`)."""
    loads: Optional[ExpertLoads]
    config_text: Optional[str]
    max_steps: Optional[int] = None
    skipped_lines: int = 0
    """Lines that did not parse (a live run's half-written last line)."""
    layers: list[int] = field(default_factory=list)
    """MoE layers with router metrics in metrics.jsonl."""

    def series(self, key: str, rows: Optional[list[dict[str, Any]]] = None) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of the rows that have a non-null `key`."""
        pts = [(r["step"], r[key]) for r in (self.train if rows is None else rows) if r.get(key) is not None]
        if not pts:
            return np.zeros(0), np.zeros(0)
        steps, values = zip(*pts)
        return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)

    def has(self, key: str, rows: Optional[list[dict[str, Any]]] = None) -> bool:
        return any(r.get(key) is not None for r in (self.train if rows is None else rows))

    @property
    def last_step(self) -> int:
        return max((r["step"] for r in self.train), default=0)

    @property
    def val_sources(self) -> list[str]:
        """`<source>` of every `val_loss/<source>` key, sorted."""
        return sorted({k.split("/", 1)[1] for r in self.val for k in r if k.startswith("val_loss/")})

    @property
    def status(self) -> str:
        if self.max_steps is not None and self.last_step >= self.max_steps:
            return "finished"
        return f"in progress or stopped ({self.last_step}/{self.max_steps or '?'} steps)"


def read_metrics_tolerant(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a metrics.jsonl and how many lines did not parse (a cut last line)."""
    rows, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def read_run(path: Path, name: Optional[str] = None) -> Run:
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.exists():
        what = "does not exist" if not path.exists() else "has no metrics.jsonl"
        raise ReportError(
            f"run directory {path} {what}; pass the run_dir of a training run (it holds metrics.jsonl)"
        )
    rows, bad = read_metrics_tolerant(metrics)
    config_path = path / "config.yaml"
    config_text = config_path.read_text(encoding="utf-8") if config_path.exists() else None
    max_steps = None
    if config_text:
        from omegaconf import OmegaConf

        try:
            max_steps = int(OmegaConf.create(config_text).trainer.max_steps)
        except Exception:  # noqa: BLE001 - a config being rewritten, or another layout: no status
            max_steps = None
    train = [r for r in rows if "loss" in r]
    layers = sorted({int(m.group(1)) for r in train for k in r if (m := _LAYER_KEY.match(k))})
    try:
        loads = read_expert_loads(path)
    except (OSError, ValueError, KeyError, TypeError):  # a header being rewritten by a live run
        loads = None
    return Run(
        path=path,
        name=name or path.name,
        train=train,
        val=[r for r in rows if any(k == "val_loss" or k.startswith("val_loss/") for k in r)],
        alarms=[r for r in rows if "alarm" in r],
        loads=loads,
        config_text=config_text,
        max_steps=max_steps,
        skipped_lines=bad,
        layers=layers,
    )


def unique_names(paths: list[Path]) -> list[str]:
    """Short labels for the legend: the directory names, with parents added while they clash."""
    paths = [Path(p).absolute() for p in paths]
    depth = 1
    while depth < 8:
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
        depth += 1
    return [str(p) for p in paths]
