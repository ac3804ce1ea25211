"""Training: the loop on the DeepSpeed engine and its components, one module each
(checkpoints: how to save and resume lives in `deepseek_moe.checkpoint`).

- `trainer.py`      `Trainer(cfg).fit()`: setup, loop, eval, when to checkpoint, signals, summary
- `cli.py`          Hydra schema registration and DictConfig -> `RunConfig`
- `distributed.py`  launcher-agnostic process setup, small collectives, `--local_rank` stripping
- `rank_errors.py`  a user error on any rank stops every rank, one rank reports it
- `rank_logging.py` Python logging with the rank in every line
- `optimizer.py`    AdamW over the MoE-aware parameter groups
- `ds_config.py`    the DeepSpeed config generated from `RunConfig`
- `precision.py`    the precision policy (`auto` -> bf16/fp32 per device) and the CPU bf16 probe
- `schedule.py`     LR schedules (warmup + cosine, DeepSeekMoE step decay) as pure functions
- `metrics.py`      metrics.jsonl writer (rank 0), MFU and the GPU peak-FLOPs table
- `host_memory.py`  opt-in glibc allocator tuning for CPU runs (`trainer.reuse_host_memory`)
- `wandb_logger.py` wandb, offline unless an API key is set, never blocking training
- `signals.py`      SIGTERM/SIGUSR1 -> finish the step, save, exit 0
- `rng.py`          seeding and RNG state capture for exact resume
"""
