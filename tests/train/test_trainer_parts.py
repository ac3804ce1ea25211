"""Trainer pieces without a process group: host reads per step, the bf16 DeepSpeed config, the
per-rank seed (the resume layout checks are in tests/checkpoint/test_reshard.py)."""

import pytest
import torch

from deepseek_moe.config.train import ParallelConfig, RunConfig, TrainerConfig
from deepseek_moe.errors import ConfigError
from deepseek_moe.model.transformer import CausalLMOutput
from deepseek_moe.train.distributed import DistInfo
from deepseek_moe.train.ds_config import build_ds_config
from deepseek_moe.train.rng import rank_seed
from deepseek_moe.train.trainer import Trainer
from tests.host_reads import count_host_reads

ACCUM = 4


class _FakeEngine:
    """Stands in for the DeepSpeed engine: micro-batch m returns loss parts m + 1, 2 (m + 1)..."""

    def __init__(self, device: str = "cpu") -> None:
        self.calls, self.device = 0, device

    def gradient_accumulation_steps(self) -> int:
        return ACCUM

    def __call__(self, input_ids, labels):
        self.calls += 1
        m = torch.full((), float(self.calls), device=self.device)
        return CausalLMOutput(
            logits_BSV=torch.zeros(1, 1, 1, device=self.device),
            loss=3 * m,
            lm_loss=2 * m,
            aux_loss=m,
            aux_losses={"expert_balance": m},
        )

    def backward(self, loss) -> None:
        pass

    def step(self) -> None:
        pass


def test_train_step_reads_the_host_once_per_step():
    trainer = Trainer(RunConfig())
    trainer.cfg.model.moe = None  # no router bias to update
    trainer.engine = _FakeEngine()
    trainer.dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    batches = iter(
        [{"input_ids": torch.zeros(1, 1, dtype=torch.long), "labels": torch.zeros(1, 1, dtype=torch.long)}]
        * ACCUM
    )
    with count_host_reads() as reads:
        values = trainer._train_step(batches)
    # the loss parts of 4 micro-batches are summed on the device and read once
    assert reads.ops == ["tolist"], reads.ops
    mean_m = (1 + 2 + 3 + 4) / 4
    assert values == pytest.approx(
        {"loss": 3 * mean_m, "lm_loss": 2 * mean_m, "aux_loss": mean_m, "aux/expert_balance": mean_m}
    )


def test_model_output_is_a_dict_with_attributes():
    out = CausalLMOutput(logits_BSV=torch.ones(1))
    assert isinstance(out, dict) and out.loss is None and out["aux_losses"] == {}
    out.loss = torch.tensor(2.0)
    assert out["loss"] is out.loss
    with pytest.raises(AttributeError, match="no field 'los'"):
        out.los = 1


def _bf16(zero_stage: int, reduce_dtype: str = "fp32") -> RunConfig:
    return RunConfig(
        trainer=TrainerConfig(precision="bf16", global_batch_size=8, micro_batch_size=4, max_steps=100),
        parallel=ParallelConfig(zero_stage=zero_stage, grad_reduce_dtype=reduce_dtype),
    )


def test_bf16_ds_config_accumulates_and_reduces_in_fp32():
    ds = build_ds_config(_bf16(1), world_size=2, device_type="cpu")
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    assert build_ds_config(_bf16(2, "bf16"), 2, "cpu")["communication_data_type"] == "bf16"
    fp32 = build_ds_config(RunConfig(trainer=TrainerConfig(precision="fp32", max_steps=100)), 1, "cpu")
    assert "data_types" not in fp32 and "communication_data_type" not in fp32
    with pytest.raises(ConfigError, match="parallel.zero_stage=1 or 2"):
        build_ds_config(_bf16(0), 2, "cpu")
    with pytest.raises(ValueError, match="parallel.grad_reduce_dtype"):
        ParallelConfig(grad_reduce_dtype="fp16")


def test_rank_seeds_differ_and_follow_the_run_seed():
    seeds = [rank_seed(1234, r) for r in range(64)]
    assert len(set(seeds)) == 64 and 1234 not in seeds
    assert rank_seed(1235, 0) != rank_seed(1234, 0)
