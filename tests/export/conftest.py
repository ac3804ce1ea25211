"""Real EP=2 DeepSpeed checkpoints (2 gloo processes, fp32 ZeRO-1 and bf16 ZeRO-2) and a prepared
tokenizer, shared by the export tests; each run directory looks like the trainer's (config.yaml,
checkpoints/step_XXXXXXXX with COMPLETE)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from deepseek_moe.config.model import ModelConfig, MoEConfig

EP, STEPS, SEQ = 2, 2, 16


def export_model_config(vocab_size: int) -> ModelConfig:
    """First layer dense, 2 shared experts, top-2 of 4 routed experts."""
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_layers=3,
        num_heads=2,
        intermediate_size=64,
        first_k_dense=1,
        max_seq_len=SEQ,
        init_std=0.1,
        moe=MoEConfig(
            n_routed_experts=4,
            n_shared_experts=2,
            top_k=2,
            moe_intermediate_size=16,
            n_groups=2,
            topk_groups=2,
        ),
    )


def _run_config(run_dir: Path, data_dir: Path, model: ModelConfig, precision: str, zero_stage: int):
    from deepseek_moe.config.data import DataConfig
    from deepseek_moe.config.train import OptimConfig, ParallelConfig, RunConfig, TrainerConfig

    return RunConfig(
        run_dir=str(run_dir),
        model=model,
        optim=OptimConfig(warmup_steps=0),
        data=DataConfig(out_dir=str(data_dir), vocab_size=512),
        parallel=ParallelConfig(ep_size=EP, zero_stage=zero_stage),
        trainer=TrainerConfig(max_steps=STEPS, global_batch_size=4, micro_batch_size=2, precision=precision),
    )


def _train_and_save(rank, world, run_cfgs, import_dir):
    """Per run config: EP=2 engine, STEPS optimizer steps, a checkpoint like the trainer's.
    Then the first run is exported (deepseek format) and imported at EP=2 from a different
    random init: returns the consolidated imported weights (rank 0)."""
    import deepspeed
    from omegaconf import OmegaConf

    from deepseek_moe.model.transformer import DeepSeekMoEForCausalLM
    from deepseek_moe.parallel.expert_parallel import parallelize_moe
    from deepseek_moe.parallel.param_groups import optimizer_param_groups
    from deepseek_moe.checkpoint import files as ckpt
    from deepseek_moe.train.ds_config import build_ds_config

    for cfg in run_cfgs:
        torch.manual_seed(0)
        model = parallelize_moe(DeepSeekMoEForCausalLM(cfg.model), EP)
        opt = torch.optim.AdamW(optimizer_param_groups(model, 0.1), lr=1e-2)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=opt, config=build_ds_config(cfg, world, "cpu")
        )
        g = torch.Generator().manual_seed(rank)
        for _ in range(STEPS):
            window = torch.randint(0, cfg.model.vocab_size, (2, SEQ + 1), generator=g)
            out = engine(window[:, :-1], window[:, 1:])
            engine.backward(out.loss)
            engine.step()
        run_dir = Path(cfg.run_dir)
        tag = ckpt.tag_for_step(STEPS)
        engine.save_checkpoint(str(run_dir / "checkpoints"), tag=tag)
        torch.distributed.barrier()
        if rank == 0:
            ckpt.atomic_write_bytes(
                run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)).encode()
            )
            tag_dir = run_dir / "checkpoints" / tag
            ckpt.mark_complete(
                tag_dir, STEPS, world, ckpt.describe_files(tag_dir, list(ckpt.checkpoint_files(tag_dir)))
            )
        torch.distributed.barrier()

    from deepseek_moe.export import export
    from deepseek_moe.export.importer import load_init_from
    from deepseek_moe.checkpoint.keys import consolidated_state_dict

    if rank == 0:
        export(run_cfgs[0].run_dir, import_dir)
    torch.distributed.barrier()
    cfg = run_cfgs[0].model
    torch.manual_seed(100 + rank)  # every rank starts from other random weights
    model = parallelize_moe(DeepSeekMoEForCausalLM(cfg), EP)
    load_init_from(model, dataclasses.replace(cfg, init_from=str(import_dir)))
    return consolidated_state_dict(model)


@pytest.fixture(scope="session")
def tokenizer_data(tmp_path_factory) -> Path:
    """A small prepared python_stdlib corpus with its sentencepiece tokenizer."""
    from deepseek_moe.config.data import DataConfig
    from data_prep.prepare import ensure_prepared

    out = tmp_path_factory.mktemp("export_data") / "stdlib"
    ensure_prepared(
        DataConfig(
            out_dir=str(out),
            max_documents=12,
            vocab_size=512,
            val_fraction=0.2,
            tokenizer_sentences=5000,
            num_proc=1,
        )
    )
    return out


@pytest.fixture(scope="session")
def ep2_runs(tmp_path_factory, tokenizer_data) -> dict:
    """{"fp32": run_dir, "bf16": run_dir}: EP=2 checkpoints (ZeRO-1 fp32, ZeRO-2 bf16) from 2
    processes, and
    "ep2_import": the fp32 run exported and imported at EP=2 (consolidated weights)."""
    from deepseek_moe.data import load_meta, padded_vocab_size
    from deepseek_moe.testing.distributed import run_distributed

    root = tmp_path_factory.mktemp("export_runs")
    model = export_model_config(padded_vocab_size(load_meta(tokenizer_data).vocab_size))
    runs = {p: root / p for p in ("fp32", "bf16")}
    cfgs = [
        _run_config(runs["fp32"], tokenizer_data, model, "fp32", zero_stage=1),
        _run_config(runs["bf16"], tokenizer_data, model, "bf16", zero_stage=2),
    ]
    results = run_distributed(_train_and_save, 2, cfgs, root / "ep2_import", timeout=300)
    return {**runs, "ep2_import": results[0]}
