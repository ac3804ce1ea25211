"""Checkpoint directory rules: only COMPLETE checkpoints count; pruning keeps the newest N;
the manifest in COMPLETE catches damage."""

import os
import zlib

import torch

from deepseek_moe.checkpoint import files as ckpt


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


def test_share_balances_bytes_and_covers_every_file_once():
    sizes = {"a": 100, "b": 60, "c": 50, "d": 10, "e": 10}
    # by hand, largest first to the rank with fewer bytes (ties: lower rank); loads after each:
    # a->0 (100, 0), b->1 (100, 60), c->1 (100, 110), d->0 (110, 110), e->0 (120, 110)
    assert [ckpt.share(sizes, r, 2) for r in range(2)] == [["a", "d", "e"], ["b", "c"]]
    assert ckpt.share(sizes, 0, 1) == ["a", "b", "c", "d", "e"]
    parts = [ckpt.share(sizes, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(sizes)


def test_manifest_catches_truncation_bit_flip_and_missing_files(tmp_path):
    d = _make(tmp_path, 10, True)
    (d / "trainer_state" / "rank00000.pt").write_bytes(bytes(range(200)))
    files = ckpt.describe_files(d, list(ckpt.checkpoint_files(d)))
    ckpt.mark_complete(d, 10, world_size=1, files=files)
    manifest = ckpt.read_manifest(d)
    assert set(manifest) == {"mp_rank_00_model_states.pt", "trainer_state/rank00000.pt"}
    assert manifest["trainer_state/rank00000.pt"]["crc32"] == f"{zlib.crc32(bytes(range(200))):08x}"
    assert ckpt.find_damage(d, manifest) == []
    raw = bytearray(range(200))
    raw[77] ^= 0x01
    (d / "trainer_state" / "rank00000.pt").write_bytes(bytes(raw))
    assert ckpt.find_damage(d, manifest) == [
        f"{d / 'trainer_state' / 'rank00000.pt'}: contents changed since it was saved (CRC-32 mismatch)"
    ]
    (d / "trainer_state" / "rank00000.pt").write_bytes(bytes(range(100)))
    assert "100 bytes, 200 when saved" in ckpt.find_damage(d, manifest)[0]
    (d / "mp_rank_00_model_states.pt").unlink()
    assert ckpt.find_damage(d, manifest)[0].endswith("mp_rank_00_model_states.pt: missing")
    (d / ckpt.COMPLETE).write_text("{not json")
    assert "cannot be read" in ckpt.find_damage(d, ckpt.read_manifest(d))[0]


def test_prune_never_deletes_the_fallback_for_a_newer_checkpoint(tmp_path):
    """A complete checkpoint above the saved step (a launch with resume=false, or one not yet
    set aside) must not count towards `keep`: the one just saved and its fallback stay."""
    for step in (10, 20, 40):
        _make(tmp_path, step, True)
    _make(tmp_path, 30, True)  # just saved
    damaged = _make(tmp_path, 50, True)
    aside = ckpt.set_aside(damaged)
    assert aside.name == "step_00000050.damaged" and (aside / ckpt.COMPLETE).is_file()
    deleted = ckpt.prune(tmp_path, keep=2, saved_step=30)
    assert [p.name for p in deleted] == ["step_00000010"]
    assert [s for s, _, _ in ckpt.list_checkpoints(tmp_path)] == [20, 30, 40]
    assert aside.is_dir()
    assert ckpt.set_aside(_make(tmp_path, 50, False)).name == "step_00000050.damaged-2"
