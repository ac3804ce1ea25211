"""What a relaunch may change (world size, EP size, ZeRO stage: resharded) and what it may not
(the model, ZeRO-0 or another precision when resharding), each named in one line."""

from pathlib import Path

import pytest

from deepseek_moe.checkpoint.reshard import architecture, check_reshardable, check_same_model, layout_change
from deepseek_moe.config.model import ModelConfig, MoEConfig
from deepseek_moe.errors import CheckpointError

SAVED = {"step": 3, "world_size": 2, "ep_size": 2, "zero_stage": 1, "precision": "fp32"}


def test_layout_change_names_only_what_changed():
    assert layout_change(SAVED, world_size=2, ep_size=2, zero_stage=1) is None
    assert (
        layout_change(SAVED, world_size=4, ep_size=4, zero_stage=2) == "world 2 -> 4, ep 2 -> 4, zero 1 -> 2"
    )
    assert layout_change(SAVED, world_size=4, ep_size=2, zero_stage=1) == "world 2 -> 4"
    assert layout_change(SAVED, world_size=2, ep_size=1, zero_stage=2) == "ep 2 -> 1, zero 1 -> 2"
    # states written before a value was recorded count as unchanged for it
    assert layout_change({"step": 3}, world_size=1, ep_size=4, zero_stage=2) is None


def test_resharding_needs_zero_1_or_2_and_the_same_precision():
    check_reshardable(SAVED, Path("ckpt"), zero_stage=2, precision="fp32")
    with pytest.raises(
        CheckpointError,
        match=r"ckpt was saved with parallel.zero_stage=1; this launch "
        r"uses 0 .* stage 1 or 2 on both sides: relaunch with the "
        r"saved layout \(world size 2, parallel.ep_size=2",
    ):
        check_reshardable(SAVED, Path("ckpt"), zero_stage=0, precision="fp32")
    with pytest.raises(CheckpointError, match="parallel.zero_stage=0"):
        check_reshardable({**SAVED, "zero_stage": 0}, Path("ckpt"), zero_stage=1, precision="fp32")
    with pytest.raises(
        CheckpointError,
        match=r"trainer.precision=fp32, this launch uses bf16; "
        r"relaunch with trainer.precision=fp32",
    ):
        check_reshardable(SAVED, Path("ckpt"), zero_stage=1, precision="bf16")
    with pytest.raises(CheckpointError, match="saved before checkpoints recorded their EP size"):
        check_reshardable({"step": 3, "world_size": 2}, Path("ckpt"), zero_stage=1, precision="fp32")


def test_another_model_is_refused_naming_every_difference():
    model = ModelConfig(hidden_size=64, moe=MoEConfig(n_routed_experts=4, top_k=2))
    saved = {**SAVED, "architecture": architecture(model)}
    check_same_model(saved, model, Path("ckpt"))
    # loss weights, capacity, kernels may change between launches
    check_same_model(
        saved,
        ModelConfig(
            hidden_size=64,
            moe=MoEConfig(n_routed_experts=4, top_k=2, aux_loss_alpha=0.1, capacity_factor=2.0),
        ),
        Path("ckpt"),
    )
    other = ModelConfig(hidden_size=128, head_dim=16, moe=MoEConfig(n_routed_experts=8, top_k=2))
    with pytest.raises(CheckpointError) as err:
        check_same_model(saved, other, Path("ckpt"))
    assert str(err.value) == (
        "ckpt holds another model: model.hidden_size=64 (this launch: 128), "
        "model.moe.n_routed_experts=4 (this launch: 8); a run resumes only into the model it was "
        "started with. Relaunch with the saved values, or use a new run_dir"
    )
    with pytest.raises(CheckpointError, match=r"model.moe=on \(this launch: None\)"):
        check_same_model(saved, ModelConfig(hidden_size=64, moe=None), Path("ckpt"))
    check_same_model(SAVED, other, Path("ckpt"))  # states from before the architecture was saved
