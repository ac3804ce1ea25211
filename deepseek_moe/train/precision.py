"""The precision policy: which dtype a run computes in on which device."""

from __future__ import annotations

import torch


def resolve_precision(precision: str, device_type: str) -> str:
    """ "auto" -> bf16 on CUDA, fp32 elsewhere.

    bf16 on CPU is allowed (DeepSpeed's bf16 ZeRO path runs there: bf16 weights, fp32 master
    weights in the optimizer). It is fast only on CPUs with native bf16 matmuls (AVX512-BF16 or
    AMX; see `cpu_bf16_is_native`), so "auto" keeps CPU runs in fp32 and the same on every
    machine. fp16 needs a GPU (DeepSpeed's loss scaler)."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if precision == "fp16" and device_type != "cuda":
        raise ValueError(
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
