"""Checkpoint directory management around DeepSpeed's own save/load.

Layout under `<run_dir>/checkpoints/`:

    step_00000100/                  one DeepSpeed tag (model, optimizer, scheduler, experts)
        trainer_state/rank00000.pt  ours, per rank: step, RNG states, loader state, wandb run id
        COMPLETE                    written by rank 0 after every rank finished writing
    latest                          DeepSpeed's pointer (informational; we do not trust it)

A checkpoint counts only if it has `COMPLETE`. DeepSpeed writes `latest` from rank 0 before the
other ranks are done, so a crash mid-save can leave `latest` pointing at a partial directory;
`COMPLETE` is written after a barrier that follows the last file write. Resume picks the
highest-step complete checkpoint; after a successful save, complete checkpoints beyond the newest
`keep` and all incomplete directories are deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

_TAG = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then os.replace: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) for every step_XXXXXXXX directory, ascending by step."""
    if not ckpt_dir.is_dir():
        return []
    out = []
    for child in ckpt_dir.iterdir():
        match = _TAG.match(child.name)
        if match and child.is_dir():
            out.append((int(match.group(1)), child, (child / COMPLETE).is_file()))
    return sorted(out)


def latest_complete(ckpt_dir: Path) -> Optional[tuple[int, Path]]:
    """The highest-step checkpoint that has its COMPLETE marker, or None."""
    done = [(step, path) for step, path, complete in list_checkpoints(ckpt_dir) if complete]
    return done[-1] if done else None


def rank_state_path(tag_dir: Path, rank: int) -> Path:
    return tag_dir / "trainer_state" / f"rank{rank:05d}.pt"


def mark_complete(tag_dir: Path, step: int, world_size: int) -> None:
    """Rank 0, after all ranks wrote: the checkpoint becomes eligible for resume."""
    info = {"step": step, "world_size": world_size, "time": time.time()}
    atomic_write_bytes(tag_dir / COMPLETE, json.dumps(info).encode())


def prune(ckpt_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, and every incomplete directory.
    Returns the deleted paths. Rank 0 only, right after a save completed: one job writes a run
    directory at a time, so an incomplete directory then is a save that died (possibly at a
    higher step, from a launch whose later checkpoint never completed), never one in progress."""
    entries = list_checkpoints(ckpt_dir)
    complete = [(s, p) for s, p, c in entries if c]
    if not complete:
        return []
    kept = {p for _, p in complete[-keep:]}
    doomed = [p for _, p, c in entries if not (c and p in kept)]
    for path in doomed:
        # Remove the marker first: a crash mid-rmtree leaves an incomplete (ignored) directory.
        (path / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    return doomed
