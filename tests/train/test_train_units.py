"""Small pieces of the trainer: argv handling, DeepSpeed config, metrics file, vocab padding."""

import json

import pytest

from deepseek_moe.config.train import RunConfig, TrainerConfig
from deepseek_moe.errors import ConfigError
from deepseek_moe.train.distributed import strip_launcher_args
from deepseek_moe.train.ds_config import build_ds_config
from deepseek_moe.train.precision import resolve_precision
from deepseek_moe.train.metrics import MetricsWriter, mfu, read_metrics
from deepseek_moe.train.trainer import check_finite


def test_strip_launcher_args():
    argv = ["model=x", "--local_rank=3", "trainer.seed=1", "--local-rank", "2", "a=b"]
    assert strip_launcher_args(argv) == ["model=x", "trainer.seed=1", "a=b"]
    assert strip_launcher_args(["--local_rank=0"]) == []


def test_ds_config_from_run_config():
    cfg = RunConfig(trainer=TrainerConfig(global_batch_size=32, micro_batch_size=4, max_steps=100))
    cfg.optim.warmup_steps = 10
    ds = build_ds_config(cfg, world_size=2, device_type="cpu")
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4  # 32 / (4 * 2)
    assert ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False


def test_check_finite_stops_on_nan_loss_or_grad_norm():
    check_finite(3, 2.5, 0.7)
    check_finite(3, 2.5, None)  # no norm computed (e.g. no clipping)
    with pytest.raises(FloatingPointError, match="loss is nan at step 3"):
        check_finite(3, float("nan"), 0.7)
    with pytest.raises(FloatingPointError, match="gradient norm is inf at step 4.*last checkpoint"):
        check_finite(4, 2.5, float("inf"))


def test_bf16_config_has_no_step_skipping_overflow_check():
    cfg = RunConfig(trainer=TrainerConfig(global_batch_size=8, micro_batch_size=4, precision="bf16"))
    ds = build_ds_config(cfg, world_size=2, device_type="cpu")
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": False}


def test_precision_auto():
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"  # DeepSpeed's bf16 path runs on CPU
    with pytest.raises(ConfigError, match="trainer.precision=fp32"):
        resolve_precision("fp16", "cpu")


def test_metrics_writer_truncates_lines_after_resume_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = MetricsWriter(path, enabled=True)
    for step in range(1, 6):
        w.write({"step": step, "loss": float(step)})
    w.write({"step": 3, "val_loss": 1.0})
    w._file.write('{"step": 6, "lo')  # a line cut by a crash
    w._file.flush()
    w.truncate_after(3)
    w.write({"step": 4, "loss": float("nan")})
    w.close()
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4]
    assert rows[-1]["loss"] is None  # NaN is not JSON
    assert all(json.dumps(r) for r in rows)


def test_metrics_writer_disabled_on_other_ranks(tmp_path):
    w = MetricsWriter(tmp_path / "m.jsonl", enabled=False)
    w.write({"step": 1})
    w.truncate_after(0)
    w.close()
    assert not (tmp_path / "m.jsonl").exists()


def test_mfu():
    assert mfu(1000.0, 6e6, None) is None
    assert mfu(1000.0, 6e6, 1e10) == pytest.approx(0.6)


def test_wandb_mode_never_online_without_a_key(monkeypatch):
    from deepseek_moe.config.train import LoggerConfig
    from deepseek_moe.train.wandb_logger import resolve_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_mode(LoggerConfig()) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode(LoggerConfig()) == "online"
    assert resolve_mode(LoggerConfig(mode="disabled")) == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")  # the environment wins
    assert resolve_mode(LoggerConfig(mode="online")) == "offline"
