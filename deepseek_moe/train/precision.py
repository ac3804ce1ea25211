"""The precision policy: which dtype a run computes in on which device."""

from __future__ import annotations

import logging

import torch

from deepseek_moe.errors import ConfigError

log = logging.getLogger("deepseek_moe.train")


def resolve_precision(precision: str, device_type: str) -> str:
    """ "auto" -> bf16 on CUDA, fp32 elsewhere.

    bf16 on CPU is allowed (DeepSpeed's bf16 ZeRO path runs there: bf16 weights, fp32 master
    weights in the optimizer). It is fast only on CPUs with native bf16 matmuls (AVX512-BF16 or
    AMX; see `cpu_bf16_is_native`), so "auto" keeps CPU runs in fp32 and the same on every
    machine. fp16 needs a GPU (DeepSpeed's loss scaler)."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if precision == "fp16" and device_type != "cuda":
        raise ConfigError(
            f"trainer.precision={precision} needs a GPU; on {device_type} use trainer.precision=fp32 "
            "(or bf16)"
        )
    return precision


def cpu_bf16_is_native() -> bool:
    """True when oneDNN runs bf16 matmuls in hardware (AVX512-BF16 / AMX); otherwise they are
    emulated and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def warn_if_bf16_is_emulated(precision: str, device_type: str) -> None:
    """One warning when a bf16 run on this CPU would be slower than fp32."""
    if precision == "bf16" and device_type == "cpu" and not cpu_bf16_is_native():
        log.warning(
            "trainer.precision=bf16 on a CPU without native bf16 matmuls (AVX512-BF16 "
            "or AMX): they are emulated and slower than fp32; use trainer.precision=fp32"
        )
