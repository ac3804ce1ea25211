"""The DeepSpeed config dict, generated from our `RunConfig` (users never write DS JSON)."""

from __future__ import annotations

from typing import Any

from deepseek_moe.config.train import RunConfig
from deepseek_moe.errors import ConfigError
from deepseek_moe.train.precision import resolve_precision


def build_ds_config(cfg: RunConfig, world_size: int, device_type: str) -> dict[str, Any]:
    """DeepSpeed config for `cfg` on `world_size` processes.

    The optimizer and LR scheduler are ours (passed to `deepspeed.initialize`), so the dict has
    no "optimizer"/"scheduler" sections; DeepSpeed still owns accumulation, clipping, ZeRO
    partitioning, precision and checkpoint files."""
    accum = cfg.grad_accum_steps(world_size)
    precision = resolve_precision(cfg.trainer.precision, device_type)
    ds: dict[str, Any] = {
        "train_batch_size": cfg.trainer.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.trainer.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        # torch.optim.AdamW is ZeRO-safe; the flag only silences DeepSpeed's client-optimizer check.
        "zero_allow_untested_optimizer": True,
        # NOTE: no overflow check in bf16: bf16 has fp32's exponent range, so "overflow" means a
        # real inf/NaN, not a loss-scale problem. DeepSpeed's check scans every gradient and
        # all-reduces a flag every step only to skip the step silently; the trainer instead
        # stops on a non-finite loss or gradient norm.
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": False},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 2**31 - 1,  # we print our own progress
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        ds.update(_bf16_gradient_dtypes(cfg))
    return ds


def _bf16_gradient_dtypes(cfg: RunConfig) -> dict[str, Any]:
    """fp32 gradient accumulation and (by default) fp32 gradient reduction for bf16 runs.

    Without these DeepSpeed sums micro-batch gradients in bf16 and all-reduces them in bf16:
    only the master weights are fp32, and each addition rounds to 8 mantissa bits, an error
    that grows with the number of micro-batches. `grad_accum_dtype: fp32` selects DeepSpeed's
    BF16_Optimizer at ZeRO-1 and fp32 accumulation buffers at ZeRO-2. ZeRO-0 has no fp32
    accumulation path in DeepSpeed, hence the error."""
    if cfg.parallel.zero_stage == 0:
        raise ConfigError(
            "trainer.precision=bf16 with parallel.zero_stage=0: DeepSpeed then accumulates "
            "gradients in bf16 (precision loss that grows with accumulation); use "
            "parallel.zero_stage=1 or 2, or trainer.precision=fp32"
        )
    return {
        "data_types": {"grad_accum_dtype": "fp32"},
        "communication_data_type": cfg.parallel.grad_reduce_dtype,
    }
