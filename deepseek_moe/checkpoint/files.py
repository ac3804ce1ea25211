"""Checkpoint directory management around DeepSpeed's own save/load.

Layout under `<run_dir>/checkpoints/`:

    step_00000100/                  one DeepSpeed tag (model, optimizer, scheduler, experts)
        trainer_state/rank00000.pt  ours, per rank: step, RNG states, loader state, wandb run id,
                                    layout (world, EP, ZeRO, precision), model architecture
        COMPLETE                    written by rank 0 after every rank finished writing
    step_00000200.damaged/          a checkpoint that failed verification, set aside untouched
    latest                          DeepSpeed's pointer (informational; we do not trust it)

A checkpoint counts only if it has `COMPLETE`. DeepSpeed writes `latest` from rank 0 before the
other ranks are done, so a crash mid-save can leave `latest` pointing at a partial directory;
`COMPLETE` is written after a barrier that follows the last file write.

`COMPLETE` is also the manifest: the relative path, size and CRC-32 of every other file of the
checkpoint. A checkpoint can be damaged after it completed (a bad copy, a full shared disk, a
flaky node), and loading a damaged file either crashes deep inside torch.load or, worse, loads
wrong numbers. Resume therefore verifies the newest complete checkpoint against its manifest
before loading it; a damaged one is renamed to `<tag>.damaged` (its files untouched, for the
user to inspect or delete) and the next older one is tried. CRC-32 (zlib) because it is the
fastest checksum in the standard library and catches truncation, bit flips and zeroed blocks,
which is what storage does; it is not a defence against deliberate tampering. The work is split
over the ranks by file size (`share`), so every rank hashes about 1/world of the bytes, at save
and at resume (numbers: bench/reports/checksum_*.md).

After a successful save, complete checkpoints beyond the newest `keep` at or below the saved step
and all incomplete directories are deleted; `.damaged` directories are never deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Optional

from deepseek_moe.atomic import atomic_torch_save, atomic_write_bytes  # noqa: F401 - re-exported

_TAG = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"
DAMAGED_SUFFIX = ".damaged"
MANIFEST_VERSION = 1
_READ_BYTES = 16 << 20  # large reads: the checksum, not the syscalls, sets the pace


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


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


def checkpoint_files(tag_dir: Path) -> dict[str, int]:
    """{relative path: size} of every file of a checkpoint except its COMPLETE marker."""
    out = {}
    for path in sorted(tag_dir.rglob("*")):
        rel = path.relative_to(tag_dir).as_posix()
        if path.is_file() and rel != COMPLETE:
            out[rel] = path.stat().st_size
    return out


def share(sizes: dict[str, int], rank: int, world_size: int) -> list[str]:
    """The files `rank` checksums: largest first to the rank with the fewest bytes so far.
    Deterministic, so every rank computes the same split from the same listing."""
    load = [0] * world_size
    mine = []
    for rel in sorted(sizes, key=lambda r: (-sizes[r], r)):
        owner = min(range(world_size), key=lambda r: (load[r], r))
        load[owner] += sizes[rel]
        if owner == rank:
            mine.append(rel)
    return mine


def file_crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while data := f.read(_READ_BYTES):
            crc = zlib.crc32(data, crc)
    return f"{crc:08x}"


def describe_files(tag_dir: Path, rel_paths: list[str]) -> dict[str, dict[str, Any]]:
    """Manifest entries {relative path: {"size", "crc32"}} of some files of a checkpoint."""
    return {
        rel: {"size": (tag_dir / rel).stat().st_size, "crc32": file_crc32(tag_dir / rel)} for rel in rel_paths
    }


def mark_complete(tag_dir: Path, step: int, world_size: int, files: dict[str, dict[str, Any]]) -> None:
    """Rank 0, after all ranks wrote and checksummed: the checkpoint becomes eligible for resume."""
    info = {
        "step": step,
        "world_size": world_size,
        "time": time.time(),
        "manifest_version": MANIFEST_VERSION,
        "files": files,
    }
    atomic_write_bytes(tag_dir / COMPLETE, json.dumps(info, indent=1, sort_keys=True).encode())


def read_manifest(tag_dir: Path) -> Optional[dict[str, dict[str, Any]]]:
    """The `files` of a COMPLETE marker, None for a marker written before manifests existed
    (such a checkpoint is trusted as it is). An unreadable marker is damage: {"COMPLETE": ...}
    with no matching file, which `find_damage` reports."""
    try:
        info = json.loads((tag_dir / COMPLETE).read_text())
    except (OSError, ValueError):
        return {COMPLETE: {"size": -1, "crc32": "unreadable"}}
    return info.get("files")


def find_damage(tag_dir: Path, expected: dict[str, dict[str, Any]]) -> list[str]:
    """What is wrong with these files of a checkpoint, one `path: problem` string each (sizes
    first: a truncated multi-GB file is found without reading it)."""
    problems = []
    for rel, want in sorted(expected.items()):
        path = tag_dir / rel
        if rel == COMPLETE:
            problems.append(f"{path}: cannot be read as JSON")
        elif not path.is_file():
            problems.append(f"{path}: missing")
        elif (size := path.stat().st_size) != want["size"]:
            problems.append(f"{path}: {size} bytes, {want['size']} when saved (truncated or overwritten)")
        elif file_crc32(path) != want["crc32"]:
            problems.append(f"{path}: contents changed since it was saved (CRC-32 mismatch)")
    return problems


def discard_partial(tag_dir: Path) -> None:
    """Delete a save that failed, and DeepSpeed's `latest` if it already names it (rank 0)."""
    shutil.rmtree(tag_dir, ignore_errors=True)
    latest = tag_dir.parent / "latest"
    if latest.is_file() and latest.read_text().strip() == tag_dir.name:
        latest.unlink()


def set_aside(tag_dir: Path) -> Path:
    """Rename a damaged checkpoint out of the resume candidates, files untouched; returns the
    new path (`step_00000200.damaged`, or `.damaged-2`... if that exists)."""
    target, n = tag_dir.with_name(tag_dir.name + DAMAGED_SUFFIX), 1
    while target.exists():
        n += 1
        target = tag_dir.with_name(f"{tag_dir.name}{DAMAGED_SUFFIX}-{n}")
    os.replace(tag_dir, target)
    return target


def prune(ckpt_dir: Path, keep: int, saved_step: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints at or below `saved_step`, and every
    incomplete directory. Returns the deleted paths. Rank 0 only, right after the save of
    `saved_step` completed: one job writes a run directory at a time, so an incomplete directory
    then is a save that died (possibly at a higher step, from a launch whose later checkpoint
    never completed), never one in progress.

    Only checkpoints up to `saved_step` count towards `keep`: a complete checkpoint above it
    (left by a launch with checkpoint.resume=false) must not push the one just saved, or the
    older intact fallback, out. Damaged checkpoints were renamed at resume and never match."""
    entries = list_checkpoints(ckpt_dir)
    complete = [(s, p) for s, p, c in entries if c and s <= saved_step]
    if not complete:
        return []
    kept = {p for _, p in complete[-keep:]}
    doomed = [p for s, p, c in entries if not c or (s <= saved_step and p not in kept)]
    for path in doomed:
        # Remove the marker first: a crash mid-rmtree leaves an incomplete (ignored) directory.
        (path / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    return doomed
