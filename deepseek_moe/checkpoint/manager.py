"""The checkpoint protocol of one run: save, verify, pick the newest intact one, resume.

    checkpoints = CheckpointManager(run_dir / "checkpoints", dist=dist, keep=2, model_cfg=...,
                                    ep_size=2, zero_stage=1, precision="bf16", seed=1234)
    state = checkpoints.resume(engine, model, check=...)  # None: nothing to resume
    checkpoints.save(engine, step=100, state={"tokens_seen": ..., "loader": ..., ...})

The trainer decides when to save (every N steps, at the end, on a signal); this class decides
how. Every method except `newest_complete` is collective: call it on every rank at one point.

- save: every rank writes its DeepSpeed files and its own trainer state (the caller's `state`
  plus the RNG states, the layout and the model architecture, see `_rank_state`), checksums its
  share of the files (`files.share`), rank 0 writes the manifest as COMPLETE and prunes. A write
  that fails on any rank (disk full, quota) stops every rank with one CheckpointError; the
  partial directory is deleted and the previous checkpoint stays the resume point.
- newest_intact: the newest complete checkpoint whose files match its manifest; newer damaged
  ones are set aside (`<tag>.damaged`, files untouched).
- resume: that checkpoint's DeepSpeed state, loaded as saved or resharded when the world size,
  EP size or ZeRO stage changed (`reshard.py`), after everything that cannot resume was refused.

File rules (tags, manifest format, pruning) live in `files.py`, resharding in `reshard.py`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from deepseek_moe.checkpoint import files, reshard
from deepseek_moe.config.model import ModelConfig
from deepseek_moe.errors import CheckpointError
from deepseek_moe.train.distributed import DistInfo, all_gather_objects, barrier, broadcast_object
from deepseek_moe.train.rank_errors import fail_together, on_all_ranks
from deepseek_moe.train.rng import get_rng_state, rank_seed, seed_everything, set_rng_state

log = logging.getLogger("deepseek_moe.checkpoint")


class CheckpointManager:
    """Checkpoints of one run directory for one launch (its layout and model)."""

    def __init__(
        self,
        ckpt_dir: Path,
        *,
        dist: DistInfo,
        keep: int,
        model_cfg: ModelConfig,
        ep_size: int,
        zero_stage: int,
        precision: str,
        seed: int,
    ) -> None:
        self.dir = Path(ckpt_dir)
        self.dist = dist
        self.keep = keep
        """Complete checkpoints kept after a save (`files.prune`)."""
        self.model_cfg = model_cfg
        self.ep_size = ep_size
        self.zero_stage = zero_stage
        self.precision = precision
        self.seed = seed
        """The run's seed: a resume with another layout reseeds each rank from it."""
        self.last_saved_step: Optional[int] = None
        """The step of the newest checkpoint this launch saved or resumed from."""

    def newest_complete(self) -> Optional[tuple[int, Path]]:
        """(step, path) of the newest checkpoint with its COMPLETE marker, unverified; any rank."""
        return files.latest_complete(self.dir)

    # ---- save -------------------------------------------------------------------------------
    def save(self, engine, *, step: int, state: dict[str, Any]) -> Path:
        """Write checkpoint `step` (see the module docstring); returns its directory."""
        tag_dir = self.dir / files.tag_for_step(step)
        if self.dist.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # a partial save of this step from an interrupted launch
                shutil.rmtree(tag_dir)
        barrier()
        t0 = time.time()
        discard = functools.partial(files.discard_partial, tag_dir)
        error = self._write(engine, tag_dir, step, state)
        fail_together(self.dist, error, cleanup=discard)  # also the barrier: every rank's files exist
        checksums = self._checksum_shares(tag_dir)
        if self.dist.is_main:
            try:
                files.mark_complete(tag_dir, step, self.dist.world_size, checksums)
            except OSError as err:
                error = self._save_error(tag_dir, err)
        fail_together(self.dist, error, cleanup=discard)
        if self.dist.is_main:
            for path in files.prune(self.dir, self.keep, step):
                log.info("deleted old checkpoint %s", path.name)
            log.info("saved checkpoint %s in %.1fs", tag_dir, time.time() - t0)
        barrier()
        self.last_saved_step = step
        return tag_dir

    def _write(self, engine, tag_dir: Path, step: int, state: dict[str, Any]) -> Optional[Exception]:
        """This rank's DeepSpeed files and trainer state; the error of a failed write, if any."""
        try:
            engine.save_checkpoint(str(self.dir), tag=tag_dir.name, client_state={"step": step})
        except (OSError, RuntimeError) as err:
            # NOTE: after its first write, DeepSpeed's save has one collective left, the barrier
            # it ends with; ranks whose writes succeeded wait in it. Join it, so that every rank
            # then reaches the agreement that follows instead of waiting forever.
            barrier()
            return self._save_error(tag_dir, err)
        try:
            files.atomic_torch_save(
                self._rank_state(step, state), files.rank_state_path(tag_dir, self.dist.rank)
            )
        except (OSError, RuntimeError) as err:
            return self._save_error(tag_dir, err)
        return None

    def _rank_state(self, step: int, state: dict[str, Any]) -> dict[str, Any]:
        """The caller's state plus what resume needs to check and restore this rank."""
        return {
            **state,
            "step": step,
            "rng": get_rng_state(),
            "world_size": self.dist.world_size,
            "ep_size": self.ep_size,
            "zero_stage": self.zero_stage,
            "precision": self.precision,
            "architecture": reshard.architecture(self.model_cfg),
        }

    def _checksum_shares(self, tag_dir: Path) -> dict[str, dict[str, Any]]:
        """Manifest entries of every file: each rank checksums its share, all get the union."""
        sizes = broadcast_object(files.checkpoint_files(tag_dir) if self.dist.is_main else None)
        mine = files.share(sizes, self.dist.rank, self.dist.world_size)
        parts = all_gather_objects(files.describe_files(tag_dir, mine))
        return dict(itertools.chain.from_iterable(part.items() for part in parts))

    def _save_error(self, tag_dir: Path, err: Exception) -> Exception:
        """A failed checkpoint write as a CheckpointError naming the file and the way out.
        torch.save reports a failed write as a RuntimeError from its zip writer; other
        RuntimeErrors are bugs and keep their traceback."""
        if isinstance(err, RuntimeError) and "write" not in str(err).lower():
            return err
        what = f"{err.strerror} ({err.filename})" if isinstance(err, OSError) and err.strerror else err
        previous = self.newest_complete()
        resume = f"{previous[1]}, which is intact" if previous else "the start (no checkpoint yet)"
        return CheckpointError(
            f"saving checkpoint {tag_dir} failed on rank {self.dist.rank}: {what}; the partial "
            f"checkpoint is deleted. Free space (or fix permissions) under {self.dir} and "
            f"relaunch: the run resumes from {resume}"
        )

    # ---- verify -----------------------------------------------------------------------------
    def verify(self, tag_dir: Path) -> list[str]:
        """Problems of a complete checkpoint against its manifest (empty: intact). Every rank
        checks its share of the files; every rank gets the full list."""
        manifest = files.read_manifest(tag_dir)
        if manifest is None:  # marker from before manifests: nothing to check against
            return []
        sizes = {rel: entry["size"] for rel, entry in manifest.items()}
        mine = files.share(sizes, self.dist.rank, self.dist.world_size)
        problems = files.find_damage(tag_dir, {rel: manifest[rel] for rel in mine})
        return sorted(itertools.chain.from_iterable(all_gather_objects(problems)))

    def newest_intact(self) -> Optional[tuple[int, Path]]:
        """The newest complete checkpoint that passes `verify`, None when there is none. Newer
        damaged ones are set aside (renamed to `<tag>.damaged`, files untouched) after a warning
        naming the file, so that neither this resume, the next save of that step nor pruning
        touches their files; none intact among complete ones is a CheckpointError."""
        listing = files.list_checkpoints(self.dir) if self.dist.is_main else None
        complete = [(step, path) for step, path, done in broadcast_object(listing) if done]
        damaged, found = [], None
        for step, tag_dir in reversed(complete):
            problems = self.verify(tag_dir)
            if not problems:
                found = (step, tag_dir)
                break
            damaged.append((tag_dir, problems))
        if found is None and damaged:
            fail_together(
                self.dist,
                CheckpointError(
                    f"no intact checkpoint in {self.dir}: all {len(damaged)} complete ones are "
                    f"damaged ({damaged[0][1][0]}); restore the files from a copy, or start over "
                    "with another run_dir or checkpoint.resume=false"
                ),
            )
        if self.dist.is_main:
            for tag_dir, problems in damaged:
                aside = files.set_aside(tag_dir)
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                log.warning(
                    "checkpoint %s is damaged: %s%s. Set aside as %s with its files "
                    "untouched; resuming from %s",
                    tag_dir.name,
                    problems[0],
                    more,
                    aside.name,
                    found[1].name,
                )
        barrier()
        return found

    # ---- resume -----------------------------------------------------------------------------
    def resume(
        self, engine, model: torch.nn.Module, *, check: Callable[[dict[str, Any]], None]
    ) -> Optional[dict[str, Any]]:
        """Load the newest intact checkpoint into `engine`; returns its trainer state (the
        `state` given to `save`, plus `step`), None when there is none. With the layout it was
        saved with: DeepSpeed's own load, each rank's own state and RNG states. With another
        world size, EP size or ZeRO stage: `reshard.load_resharded` and rank 0's state (the
        caller's state must not depend on the layout), each rank's RNG reseeded. Everything
        that cannot resume is refused before any state is loaded: another model, a layout that
        cannot be resharded, and whatever `check(state)` raises (the caller's own state)."""
        found = self.newest_intact()
        if found is None:
            return None
        _, tag_dir = found
        state, change = on_all_ranks(self.dist, self._read_rank_state, tag_dir)
        on_all_ranks(self.dist, self._check_resumable, state, tag_dir, change, check)
        if change is None:
            load_path, _ = engine.load_checkpoint(
                str(self.dir), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            missing = load_path is None
            fail_together(
                self.dist,
                CheckpointError(
                    f"DeepSpeed found no checkpoint to load in {tag_dir} although its files match "
                    "its manifest; check that the DeepSpeed version can read it, or use a new run_dir"
                )
                if missing
                else None,
            )
            set_rng_state(state["rng"])
        else:
            log.info("resuming %s with another layout: %s", tag_dir.name, change)
            on_all_ranks(
                self.dist,
                lambda: reshard.load_resharded(engine, model, tag_dir, saved_ep_size=state["ep_size"]),
            )
            # RNG states are per rank and do not map onto another set of ranks: each rank
            # starts a stream of its own from the seed, the step and its rank (router noise is
            # the only draw in training; its values then differ from an unchanged layout's).
            seed_everything(rank_seed(self.seed + state["step"], self.dist.rank))
        self.last_saved_step = state["step"]
        log.info("resumed from %s (step %d)", tag_dir, state["step"])
        return state

    def _read_rank_state(self, tag_dir: Path) -> tuple[dict[str, Any], Optional[str]]:
        """(trainer state, layout change): this rank's own state when the layout is the saved
        one, else rank 0's (every rank reads rank 0's first, so all agree on the change)."""

        def read(rank: int) -> dict[str, Any]:
            path = files.rank_state_path(tag_dir, rank)
            if not path.exists():
                raise CheckpointError(
                    f"{tag_dir} has no trainer state for rank {rank} ({path}): the save did not "
                    "finish on every rank; restore the file from a copy, or use a new run_dir"
                )
            return torch.load(path, weights_only=False)

        state = read(0)
        change = reshard.layout_change(
            state, world_size=self.dist.world_size, ep_size=self.ep_size, zero_stage=self.zero_stage
        )
        if change is None and self.dist.rank != 0:
            state = read(self.dist.rank)
        return state, change

    def _check_resumable(
        self,
        state: dict[str, Any],
        tag_dir: Path,
        change: Optional[str],
        check: Callable[[dict[str, Any]], None],
    ) -> None:
        """Another model (CheckpointError), the caller's `check`, then a layout change that
        cannot be resharded."""
        reshard.check_same_model(state, self.model_cfg, tag_dir)
        check(state)
        if change is not None:
            reshard.check_reshardable(state, tag_dir, zero_stage=self.zero_stage, precision=self.precision)
