"""Damaged checkpoints are detected, set aside and skipped; a failed save keeps the previous
checkpoint as the resume point; re-prepared data is refused at resume. One reference run
(6 steps, a checkpoint every 2) is copied for each scenario."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest

from deepseek_moe.checkpoint import files as ckpt
from deepseek_moe.train.metrics import read_metrics
from tests.train.helpers import REPO, TINY, command, run_train, train_env
from tests.train.test_user_errors import check_one_line, reprepared_copy, stderr_lines


def _args(tiny_data, run_dir, max_steps):
    return (
        TINY
        + tiny_data
        + [
            "logger=none",
            f"run_dir={run_dir}",
            f"trainer.max_steps={max_steps}",
            "checkpoint.every=2",
            "checkpoint.keep=3",
            "trainer.eval_every=0",
        ]
    )


def _train_rows(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def _digests(tag_dir):
    return {
        p.relative_to(tag_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """An uninterrupted 6-step run with complete checkpoints at steps 2, 4 and 6."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_train(_args(tiny_data, run_dir, 6), timeout=300)
    steps = [s for s, _, c in ckpt.list_checkpoints(run_dir / "checkpoints") if c]
    assert steps == [2, 4, 6]
    return run_dir


FULL_DISK_TRAIN = "tests/checkpoint/full_disk_train.py"


def _full_disk_run(cmd, env):
    """`cmd` (train.py through full_disk_train.py) from the repository root, output captured."""
    return subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )


def _copy(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    return run_dir


def test_damaged_checkpoints_are_set_aside_and_resume_matches(reference, tiny_data, tmp_path):
    run_dir = _copy(reference, tmp_path)
    ckpts = run_dir / "checkpoints"
    truncated = ckpts / "step_00000006" / "mp_rank_00_model_states.pt"
    os.truncate(truncated, truncated.stat().st_size // 2)  # a copy that stopped half-way
    flipped = ckpts / "step_00000004" / "trainer_state" / "rank00000.pt"
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # one bit: same size, only the checksum can tell
    flipped.write_bytes(bytes(raw))
    damaged = {tag: _digests(ckpts / tag) for tag in ("step_00000004", "step_00000006")}

    proc = run_train(_args(tiny_data, run_dir, 6), timeout=300)

    warnings = [line for line in stderr_lines(proc.stderr) if "is damaged" in line]
    assert len(warnings) == 2
    assert str(truncated) in warnings[0] and "bytes," in warnings[0]
    assert str(flipped) in warnings[1] and "CRC-32 mismatch" in warnings[1]
    assert all("resuming from step_00000002" in w for w in warnings)
    assert "resumed from" in proc.stderr + proc.stdout and "(step 2)" in proc.stderr + proc.stdout
    # The damaged checkpoints are still on disk, byte for byte, out of the way.
    for tag, digests in damaged.items():
        assert _digests(ckpts / f"{tag}{ckpt.DAMAGED_SUFFIX}") == digests
    # Resumed from step 2: steps 3..6 are exactly the uninterrupted run's.
    ref, again = _train_rows(reference), _train_rows(run_dir)
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(ref[2:], again[2:], strict=True):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr"):
            assert b[key] == pytest.approx(a[key], abs=1e-6, rel=0), (a["step"], key)
    # The new checkpoints at 4 and 6 are complete and intact.
    for step in (4, 6):
        tag_dir = ckpts / ckpt.tag_for_step(step)
        assert ckpt.find_damage(tag_dir, ckpt.read_manifest(tag_dir)) == []


def test_failed_save_keeps_the_previous_checkpoint(reference, tiny_data, tmp_path):
    run_dir = _copy(reference, tmp_path)
    ckpts = run_dir / "checkpoints"
    before = sorted(p.name for p in ckpts.iterdir())
    env = train_env() | {"FULL_DISK_AT": "step_00000008"}
    proc = _full_disk_run([sys.executable, FULL_DISK_TRAIN, *_args(tiny_data, run_dir, 8)], env)
    line = check_one_line(
        proc,
        "Checkpoint error: saving checkpoint",
        "step_00000008",
        "No space left on device",
        "Free space",
        f"resumes from {ckpts / 'step_00000006'}, which is intact",
        trained=True,
    )
    assert "mp_rank_00_model_states.pt" in line
    assert sorted(p.name for p in ckpts.iterdir()) == before  # no partial step_00000008
    step, tag_dir = ckpt.latest_complete(ckpts)
    assert step == 6 and ckpt.find_damage(tag_dir, ckpt.read_manifest(tag_dir)) == []
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


def test_reprepared_data_is_refused_at_resume(reference, tiny_data, tmp_path):
    run_dir = _copy(reference, tmp_path)
    before = _digests(run_dir)
    other = reprepared_copy(tiny_data, tmp_path / "reprepared")
    proc = run_train(
        TINY + other + ["logger=none", f"run_dir={run_dir}", "trainer.max_steps=8", "trainer.eval_every=0"],
        check=False,
        timeout=300,
    )
    check_one_line(
        proc,
        "Data error: the checkpoint was trained on data with fingerprint",
        str(tmp_path / "reprepared"),
        "point data.out_dir at the original data",
    )
    assert _digests(run_dir) == before  # nothing written, nothing set aside


def test_failed_save_on_one_rank_stops_both(tiny_data, tmp_path):
    """ENOSPC on rank 1 only, inside DeepSpeed's save: rank 0 waits in DeepSpeed's last barrier;
    both must still agree, report once and exit (no hang)."""
    run_dir = tmp_path / "run"
    env = train_env() | {"FULL_DISK_AT": "step_00000002", "FULL_DISK_RANK": "1"}
    cmd = command(2, "torchrun")
    cmd[-1] = FULL_DISK_TRAIN
    proc = _full_disk_run(
        cmd
        + TINY
        + tiny_data
        + [
            "logger=none",
            f"run_dir={run_dir}",
            "trainer.max_steps=2",
            "checkpoint.every=2",
            "trainer.eval_every=0",
            "optim.warmup_steps=1",
            "parallel.ep_size=2",
            "trainer.micro_batch_size=2",
        ],
        env,
    )
    assert proc.returncode != 0
    ours = [
        line
        for line in stderr_lines(proc.stderr)
        if re.match(r"(Config|Data|Checkpoint|Export) error: ", line)
    ]
    assert len(ours) == 1 and ours[0].startswith("Checkpoint error: saving checkpoint"), proc.stderr
    assert "failed on rank 1: No space left on device" in ours[0]
    assert "deepseek_moe/" not in proc.stderr  # no traceback from our code (torchrun adds its own)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "zero_to_fp32.py",
        "zero_to_torch.py",
    ]  # no partial step dir, no `latest` naming it
