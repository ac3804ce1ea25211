"""Typed, validated configuration dataclasses, one module per owner.

Import from the submodules directly (there is no re-export, so importing one config does not
pull in the others):

- `deepseek_moe.config.model`: `ModelConfig`, `MoEConfig`
- `deepseek_moe.config.data`: `DataConfig`
- `deepseek_moe.config.health`: `HealthConfig` (expert-load statistics and alarms)
- `deepseek_moe.config.train`: `OptimConfig`, `ParallelConfig`, `TrainerConfig`,
  `CheckpointConfig`, `LoggerConfig` and the root `RunConfig` that Hydra composes into.
"""
