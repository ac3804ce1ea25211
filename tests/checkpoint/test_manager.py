"""CheckpointManager without DeepSpeed: save (manifest, pruning, a failed write), verify, the
newest intact checkpoint, resume (state and RNG restored, refusals before anything is loaded).

A small stand-in engine writes and reads files the way DeepSpeed's does for these calls
(`<dir>/<tag>/...` and `<dir>/latest`); one process has no process group and the collectives
pass through; two processes run with gloo."""

from __future__ import annotations

import errno
import os
import zlib
from pathlib import Path

import pytest
import torch

from deepseek_moe.checkpoint import files as ckpt
from deepseek_moe.checkpoint.manager import CheckpointManager
from deepseek_moe.config.model import ModelConfig
from deepseek_moe.errors import CheckpointError, DataError
from deepseek_moe.train.distributed import DistInfo


class _Engine:
    """DeepSpeed's save/load as the manager calls them: its files under `<dir>/<tag>/`."""

    def __init__(self, weights: bytes = b"w" * 100, full_disk_at: str | None = None) -> None:
        self.weights = weights
        self.full_disk_at = full_disk_at
        self.loaded: list[str] = []

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict) -> None:
        tag_dir = Path(save_dir) / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / "latest").write_text(tag)  # before the files, as DeepSpeed's rank 0 does
        path = tag_dir / "mp_rank_00_model_states.pt"
        if tag == self.full_disk_at:
            path.write_bytes(b"PK\x03\x04")  # the start of a file, then no space
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        path.write_bytes(self.weights + str(client_state["step"]).encode())

    def load_checkpoint(self, load_dir: str, tag: str, **kwargs) -> tuple[str, dict]:
        self.loaded.append(tag)
        return str(Path(load_dir) / tag), {}


def _dist(rank: int = 0, world_size: int = 1) -> DistInfo:
    return DistInfo(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))


def _manager(
    ckpt_dir: Path, *, keep: int = 2, dist: DistInfo | None = None, **overrides
) -> CheckpointManager:
    args = dict(
        dist=dist or _dist(),
        keep=keep,
        model_cfg=ModelConfig(),
        ep_size=1,
        zero_stage=1,
        precision="fp32",
        seed=7,
    )
    return CheckpointManager(ckpt_dir, **(args | overrides))


def _state(step: int) -> dict:
    return {"tokens_seen": 100 * step, "loader": {"batches": step}, "wandb_run_id": "abc"}


def _make(root: Path, step: int) -> Path:
    """A complete checkpoint with a manifest, written by hand (the files.py API)."""
    d = root / ckpt.tag_for_step(step)
    (d / "trainer_state").mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    ckpt.mark_complete(d, step, world_size=1, files=ckpt.describe_files(d, list(ckpt.checkpoint_files(d))))
    return d


def test_save_writes_a_verified_manifest_and_prunes(tmp_path):
    manager, engine = _manager(tmp_path, keep=2), _Engine()
    for step in (1, 2, 3):
        assert manager.save(engine, step=step, state=_state(step)) == tmp_path / ckpt.tag_for_step(step)
        assert manager.last_saved_step == step
    assert [(s, c) for s, _, c in ckpt.list_checkpoints(tmp_path)] == [(2, True), (3, True)]
    tag_dir = tmp_path / "step_00000003"
    manifest = ckpt.read_manifest(tag_dir)
    # every file but the marker, with its size and CRC-32 computed here independently
    on_disk = sorted(p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*") if p.is_file())
    assert sorted(manifest) == [rel for rel in on_disk if rel != ckpt.COMPLETE]
    for rel, entry in manifest.items():
        raw = (tag_dir / rel).read_bytes()
        assert entry == {"size": len(raw), "crc32": f"{zlib.crc32(raw):08x}"}
    saved = torch.load(ckpt.rank_state_path(tag_dir, 0), weights_only=False)
    assert saved["step"] == 3 and saved["tokens_seen"] == 300 and saved["loader"] == {"batches": 3}
    assert (saved["world_size"], saved["ep_size"], saved["zero_stage"], saved["precision"]) == (
        1,
        1,
        1,
        "fp32",
    )
    assert saved["architecture"]["model.hidden_size"] == ModelConfig().hidden_size
    assert manager.verify(tag_dir) == []


def test_resume_restores_state_and_rng_from_the_newest_intact(tmp_path, caplog):
    manager, engine = _manager(tmp_path, keep=3), _Engine()
    manager.save(engine, step=1, state=_state(1))
    manager.save(engine, step=2, state=_state(2))
    after_save_2 = torch.rand(4)  # what the run draws right after the step-2 save
    manager.save(engine, step=3, state=_state(3))
    (tmp_path / "step_00000003" / "mp_rank_00_model_states.pt").write_bytes(b"?")  # truncated

    relaunch, engine2, checked = _manager(tmp_path, keep=3), _Engine(), []
    state = relaunch.resume(engine2, torch.nn.Linear(1, 1), check=checked.append)
    assert engine2.loaded == ["step_00000002"] and checked == [state]
    assert state["step"] == 2 and state["tokens_seen"] == 200 and state["loader"] == {"batches": 2}
    assert relaunch.last_saved_step == 2
    assert torch.equal(torch.rand(4), after_save_2)  # the RNG continues where step 2 left it
    assert [p.name for p in sorted(tmp_path.iterdir()) if p.is_dir()] == [
        "step_00000001",
        "step_00000002",
        "step_00000003.damaged",
    ]
    assert "step_00000003 is damaged" in caplog.text and "1 bytes, 101 when saved" in caplog.text


def test_nothing_to_resume(tmp_path):
    engine = _Engine()
    assert _manager(tmp_path).resume(engine, torch.nn.Linear(1, 1), check=lambda s: None) is None
    assert engine.loaded == [] and not tmp_path.joinpath("x").exists()


def test_resume_refuses_before_loading_anything(tmp_path):
    """Another model (CheckpointError) is refused before the caller's check; the caller's check
    (e.g. the loader: another data set) before any state is loaded."""
    _manager(tmp_path).save(_Engine(), step=1, state=_state(1))
    engine = _Engine()
    other = ModelConfig(hidden_size=2 * ModelConfig().hidden_size)
    checked = []
    with pytest.raises(CheckpointError, match=r"holds another model: model.hidden_size=.*this launch"):
        _manager(tmp_path, model_cfg=other).resume(engine, torch.nn.Linear(1, 1), check=checked.append)
    assert checked == []

    def refuse(state):
        raise DataError("other data")

    with pytest.raises(DataError, match="other data"):
        _manager(tmp_path).resume(engine, torch.nn.Linear(1, 1), check=refuse)
    # another layout that cannot be resharded (ZeRO-0 on one side), after the check
    checked = []
    with pytest.raises(CheckpointError, match="saved with parallel.zero_stage=1; this launch uses 0"):
        _manager(tmp_path, zero_stage=0).resume(engine, torch.nn.Linear(1, 1), check=checked.append)
    assert len(checked) == 1 and engine.loaded == []


def test_failed_write_deletes_the_partial_save_and_names_the_intact_one(tmp_path):
    manager = _manager(tmp_path)
    manager.save(_Engine(), step=2, state=_state(2))
    with pytest.raises(CheckpointError) as err:
        manager.save(_Engine(full_disk_at="step_00000004"), step=4, state=_state(4))
    message = str(err.value)
    assert (
        "saving checkpoint" in message
        and "step_00000004 failed on rank 0: No space left on device" in message
    )
    assert f"resumes from {tmp_path / 'step_00000002'}, which is intact" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002"]  # `latest` named it: gone too
    assert manager.last_saved_step == 2


def test_resume_candidates_when_every_checkpoint_is_damaged(tmp_path, capsys):
    """One process, no process group: the collectives pass through."""
    manager = _manager(tmp_path)
    for step in (10, 20, 30):
        _make(tmp_path, step)
    (tmp_path / "step_00000030" / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert manager.newest_intact() == (20, tmp_path / "step_00000020")
    assert [p.name for p in sorted(tmp_path.iterdir())] == [
        "step_00000010",
        "step_00000020",
        "step_00000030.damaged",
    ]
    for step in (10, 20):
        (tmp_path / ckpt.tag_for_step(step) / "mp_rank_00_model_states.pt").write_bytes(b"y")
    with pytest.raises(
        CheckpointError,
        match=r"no intact checkpoint.*all 2 complete ones are "
        r"damaged.*checkpoint.resume=false",
    ):
        manager.newest_intact()
    assert (tmp_path / "step_00000020").is_dir()  # nothing set aside when nothing is intact


def _newest_intact_case(rank, world_size, ckpt_root):
    manager = _manager(Path(ckpt_root), dist=_dist(rank, world_size))
    found = manager.newest_intact()
    return found[0], sorted(p.name for p in Path(ckpt_root).iterdir())


def test_ranks_agree_on_the_resume_checkpoint(tmp_path):
    """Damage that only rank 1 checks (its share): both ranks still pick the same checkpoint."""
    from deepseek_moe.testing.distributed import run_distributed

    for step in (1, 2):
        tag_dir = tmp_path / ckpt.tag_for_step(step)
        (tag_dir / "trainer_state").mkdir(parents=True)
        (tag_dir / "big.pt").write_bytes(b"b" * 1000)  # rank 0's share (largest first)
        (tag_dir / "trainer_state" / "small.pt").write_bytes(b"s" * 10)  # rank 1's share
        ckpt.mark_complete(
            tag_dir, step, 2, ckpt.describe_files(tag_dir, ["big.pt", "trainer_state/small.pt"])
        )
    (tmp_path / "step_00000002" / "trainer_state" / "small.pt").write_bytes(b"S" * 10)
    results = run_distributed(_newest_intact_case, 2, str(tmp_path), timeout=120)
    for rank in range(2):
        assert results[rank][0] == 1
        assert results[rank][1] == ["step_00000001", "step_00000002.damaged"]


def test_the_manager_imports_without_deepspeed():
    """Save, verify and resume checks need no DeepSpeed import; resharding imports it itself."""
    import subprocess
    import sys

    code = "import sys, deepseek_moe.checkpoint.manager; print('deepspeed' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False"
