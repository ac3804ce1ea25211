"""metrics.jsonl: one JSON object per line, written by rank 0 only.

Train lines carry `step`, `loss`, `lm_loss`, `aux_loss`, one key per aux loss
(`aux/<name>`), `lr`, `grad_norm`, `tokens_per_s`, `mfu` (null when the device peak is unknown,
e.g. on CPU), `max_memory_gb` (peak GPU memory allocated by torch on rank 0 since the start;
null on CPU) and, on logging steps (`deepseek_moe/train/moe_health.py` decides which), the
per-MoE-layer router metrics of the steps since the previous one. Eval lines carry `step` and
`val_loss`; alarm lines `step`, `alarm`, `message` and the alarm's details. A mixture run
(`data.sources`) adds `tokens_seen/<source>` to train lines and `val_loss/<source>` to eval
lines, whose `val_loss` is then the weighted mean of those. Every line is flushed as it is
written.

Router metrics (`moe/layer{L}/<name>`) are GLOBAL-batch values: every rank's counts are summed
before the ratio, so `load_imbalance` (max/mean tokens per expert), `max_expert_frac`,
`min_expert_frac`, `router_entropy`, `dropped_frac`, `ranks_per_token`, `groups_per_token` and,
under EP, `rank_imbalance` (max/mean tokens per EP rank) describe the global batches of the
interval. All-to-all metrics (under EP): `a2a_bytes` is the total over
ranks; `a2a_ranks_per_token` is the mean of the ranks' values (each rank routes the same number
of tokens, so this is the global mean too). Evaluation forwards count in neither.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch

from deepseek_moe.atomic import atomic_write_bytes


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every line parses with any JSON reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends to `<run_dir>/metrics.jsonl`. A no-op object on ranks other than 0."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        self._file = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")

    def truncate_after(self, step: int) -> None:
        """On resume from `step`: drop lines logged after it by the interrupted launch (they were
        never checkpointed and will be recomputed), so the file reads as one clean run."""
        if not self.enabled or not self.path.exists():
            return
        self._file.close()
        keep = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:
                    pass  # a line cut by a crash
        atomic_write_bytes(self.path, "".join(keep).encode("utf-8"))
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_total: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak of all devices."""
    if not peak_flops_total:
        return None
    return tokens_per_s * flops_per_token / peak_flops_total


def peak_flops_per_device(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of one device for MFU, or None when unknown (CPU, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    # Dense tensor-core peaks (no sparsity), from the vendor data sheets.
    table_bf16 = {
        "H100 SXM": 989e12,
        "H100 PCIe": 756e12,
        "H100": 989e12,
        "H200": 989e12,
        "A100": 312e12,
        "A800": 312e12,
        "L40S": 362e12,
        "L4": 121e12,
        "A10": 125e12,
    }
    if precision == "fp32":
        return None  # TF32 vs strict fp32 depends on settings; do not guess
    for key, value in table_bf16.items():
        if key in name:
            return value
    return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (for tests and analysis notebooks)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
