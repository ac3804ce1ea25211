"""Checkpoint directory rules: only COMPLETE checkpoints count; pruning keeps the newest N."""

import os

import torch

from deepseek_moe.train import checkpoint as ckpt


def _make(root, step, complete):
    d = root / ckpt.tag_for_step(step)
    (d / "trainer_state").mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        files = ckpt.describe_files(d, list(ckpt.checkpoint_files(d)))
        ckpt.mark_complete(d, step, world_size=1, files=files)
    return d


def test_latest_complete_skips_interrupted_save(tmp_path):
    _make(tmp_path, 10, True)
    _make(tmp_path, 20, True)
    _make(tmp_path, 30, False)  # crashed mid-write: DeepSpeed may already point `latest` at it
    (tmp_path / "latest").write_text("step_00000030")
    (tmp_path / "not_a_tag").mkdir()
    step, path = ckpt.latest_complete(tmp_path)
    assert step == 20 and path.name == "step_00000020"


def test_latest_complete_none(tmp_path):
    assert ckpt.latest_complete(tmp_path / "missing") is None
    _make(tmp_path, 5, False)
    assert ckpt.latest_complete(tmp_path) is None


def test_prune_keeps_newest_complete_and_drops_partials(tmp_path):
    for step in (10, 20, 30):
        _make(tmp_path, step, True)
    _make(tmp_path, 25, False)  # a save that died
    _make(tmp_path, 40, False)  # a save that died in a launch whose progress was lost
    deleted = ckpt.prune(tmp_path, keep=2, saved_step=30)
    assert sorted(p.name for p in deleted) == ["step_00000010", "step_00000025", "step_00000040"]
    left = [(s, c) for s, _, c in ckpt.list_checkpoints(tmp_path)]
    assert left == [(20, True), (30, True)]


def test_prune_without_complete_checkpoint_deletes_nothing(tmp_path):
    _make(tmp_path, 10, False)
    assert ckpt.prune(tmp_path, keep=1, saved_step=10) == []


def test_atomic_torch_save_leaves_no_temp_files(tmp_path):
    path = tmp_path / "a" / "state.pt"
    ckpt.atomic_torch_save({"x": torch.arange(3)}, path)
    assert torch.load(path)["x"].tolist() == [0, 1, 2]
    assert os.listdir(path.parent) == ["state.pt"]
