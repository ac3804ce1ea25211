"""The training loop on the DeepSpeed engine.

`Trainer(cfg).fit()` does, in order:
 1. process setup (any launcher, see `distributed.py`) and the checks that need the world size;
 2. data: rank 0 prepares the corpus if needed while the others wait; the model vocab follows
    the tokenizer (padded to a multiple of 64) unless set explicitly;
 3. model built from the seed on every rank (so weights do not depend on the EP size), then
    `parallelize_moe` keeps this rank's experts; AdamW over MoE-aware param groups; our LR
    schedule; `deepspeed.initialize` with the generated config;
 4. resume from the newest complete checkpoint whose files match its manifest (DeepSpeed
    state + our per-rank state; damaged ones are set aside, see `checkpoint/files.py`); one
    written with another world size, EP size or ZeRO stage is resharded on load
    (`checkpoint/reshard.py`);
 5. the loop: accumulate micro-batches, step, log one metrics line per step (rank 0), eval,
    checkpoint, and stop cleanly on SIGTERM/SIGUSR1;
 6. print where the run directory, metrics and checkpoint are.

User errors (config, data, checkpoints) are raised as `deepseek_moe.errors` classes at points
every rank reaches together (`_on_all_ranks`, `_fail_together`): the lowest rank that saw the
error reports it as one line, every rank exits, none is left waiting in a collective.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from omegaconf import OmegaConf

from deepseek_moe.checkpoint import files as ckpt
from deepseek_moe.checkpoint import reshard
from deepseek_moe.config.train import RunConfig
from deepseek_moe.errors import CheckpointError, ConfigError, ReportedByAnotherRank
from deepseek_moe.train.distributed import (
    all_gather_objects,
    all_reduce_max_flag,
    all_reduce_mean_dict,
    barrier,
    broadcast_object,
    init_distributed,
    lowest_rank_with,
    main_print,
    reduce_sum_,
    to_device,
)
from deepseek_moe.train.ds_config import build_ds_config
from deepseek_moe.train.host_memory import keep_freed_host_memory
from deepseek_moe.train.metrics import MetricsWriter, mfu, peak_flops_per_device
from deepseek_moe.train.moe_health import MoEHealth
from deepseek_moe.train.precision import cpu_bf16_is_native, resolve_precision
from deepseek_moe.train.rng import get_rng_state, rank_seed, seed_everything, set_rng_state
from deepseek_moe.train.schedule import build_lr_scheduler
from deepseek_moe.train.signals import PreemptionFlag

log = logging.getLogger("deepseek_moe.train")


def check_finite(step: int, loss: float, grad_norm: Optional[float]) -> None:
    """Stop the run on a non-finite loss or gradient norm, before anything is saved.

    No precision skips such steps (bf16 has no overflow check, see ds_config.py), so after a
    non-finite gradient norm the weights are already damaged: the newest checkpoint is the
    last good state."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}; lower optim.lr or check the data")
    if grad_norm is not None and not math.isfinite(grad_norm):
        raise FloatingPointError(
            f"gradient norm is {grad_norm} at step {step}; the update made the weights unusable. "
            "Relaunch to resume from the last checkpoint, with a lower optim.lr"
        )


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Trainer:
    """One training run described by a validated `RunConfig`."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).absolute()
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step = 0  # optimizer steps completed
        self.tokens_seen = 0
        self.wandb_run_id: Optional[str] = None

    # ---- setup ------------------------------------------------------------------------------
    def _setup_logging(self) -> None:
        level = logging.INFO if self.dist.is_main else logging.WARNING
        logging.basicConfig(
            level=level, format="[%(asctime)s rank%(rank)s] %(message)s", datefmt="%H:%M:%S", force=True
        )
        rank = self.dist.rank
        old_factory = logging.getLogRecordFactory()

        def factory(*args, **kwargs):
            record = old_factory(*args, **kwargs)
            record.rank = rank
            return record

        logging.setLogRecordFactory(factory)
        # DeepSpeed logs every engine detail at INFO on every rank: keep its warnings only.
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)

    def _prepare_data(self):
        """Rank 0 prepares (no-op when complete) while the others wait; then all read meta."""
        from data_prep.prepare import ensure_prepared  # datasets/sentencepiece: lazy

        def on_main(main: bool):
            return ensure_prepared(self.cfg.data) if self.dist.is_main == main else None

        # The collective in _on_all_ranks doubles as the barrier, and a failure on rank 0
        # stops every rank instead of leaving them waiting for a barrier that never comes.
        meta = self._on_all_ranks(on_main, True)  # rank 0 prepares
        other = self._on_all_ranks(on_main, False)  # then the others read what it wrote
        return meta if self.dist.is_main else other

    # ---- errors -----------------------------------------------------------------------------
    def _fail_together(
        self, error: Optional[BaseException], cleanup: Optional[Callable[[], None]] = None
    ) -> None:
        """Call on every rank at the same point. If any rank holds an error, all stop: rank 0
        runs `cleanup`, the lowest failing rank raises its error (a user error is reported as
        one line), the others raise ReportedByAnotherRank (exit status 1, nothing printed)."""
        reporter = lowest_rank_with(error is not None, self.dist.device)
        if reporter is None:
            return
        if cleanup is not None and self.dist.is_main:
            cleanup()
        if reporter == self.dist.rank:
            raise error
        raise ReportedByAnotherRank(f"rank {reporter} reports the error")

    def _on_all_ranks(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on every rank; an error on any rank stops every rank (`_fail_together`)."""
        result, error = None, None
        try:
            result = fn(*args)
        except Exception as err:  # noqa: BLE001 - re-raised by _fail_together on its rank
            error = err
        self._fail_together(error)
        return result

    def _set_vocab(self, meta) -> None:
        """model.vocab_size = tokenizer vocab padded to a multiple of 64, unless set explicitly."""
        from deepseek_moe.data import check_model_vocab, padded_vocab_size

        if self.cfg.vocab_from_tokenizer:
            self.cfg.model.vocab_size = padded_vocab_size(meta.vocab_size)
        if self.cfg.model.init_from:  # its vocab wins; the other fields must match it
            from deepseek_moe.export.importer import check_init_from

            check_init_from(self.cfg)  # a ConfigError naming each mismatching field
        check_model_vocab(meta, self.cfg.model.vocab_size)

    def _build_engine(self) -> None:
        import deepspeed

        from deepseek_moe.model.transformer import DeepSeekMoEForCausalLM
        from deepseek_moe.parallel import optimizer_param_groups, parallelize_moe

        cfg = self.cfg
        seed_everything(cfg.trainer.seed)  # same init on every rank, whatever the EP size
        model = DeepSeekMoEForCausalLM(cfg.model)
        model.activation_checkpointing = cfg.trainer.activation_checkpointing
        model.loss_chunk_tokens = cfg.trainer.loss_chunk_tokens
        if cfg.model.moe is not None:
            model = parallelize_moe(model, cfg.parallel.ep_size)
        if cfg.model.init_from and not (cfg.checkpoint.resume and ckpt.latest_complete(self.ckpt_dir)):
            from deepseek_moe.export.importer import load_init_from

            load_init_from(model, cfg.model)  # a new run: continued pretraining from these weights
        self.model = model
        groups = optimizer_param_groups(model, cfg.optim.weight_decay)
        for group in groups:
            group["lr"] = cfg.optim.lr
        # NOTE: fused=True runs the whole AdamW update as one vectorised kernel per tensor (CPU
        # and CUDA) instead of a Python loop over parameters.
        optimizer = torch.optim.AdamW(
            groups,
            lr=cfg.optim.lr,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay,
            fused=self.dist.device.type in ("cpu", "cuda"),
        )
        scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.decay_steps)
        self.ds_config = build_ds_config(cfg, self.dist.world_size, self.dist.device.type)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )
        # The build seed was the same on every rank (same weights); from here on each rank draws
        # its own random numbers (router noise), else every rank would add the same noise.
        seed_everything(rank_seed(cfg.trainer.seed, self.dist.rank))

    def _build_loaders(self, meta) -> None:
        from deepseek_moe.data import build_eval_loader, build_train_loader

        cfg, dist = self.cfg, self.dist
        self.train_loader = build_train_loader(
            meta,
            seq_len=cfg.seq_len,
            global_batch_size=cfg.trainer.global_batch_size,
            micro_batch_size=cfg.trainer.micro_batch_size,
            dp_rank=dist.rank,
            dp_world=dist.world_size,
            seed=cfg.trainer.seed,
        )
        self.val_loader = build_eval_loader(
            meta,
            seq_len=cfg.seq_len,
            micro_batch_size=cfg.trainer.micro_batch_size,
            dp_rank=dist.rank,
            dp_world=dist.world_size,
            num_batches=cfg.trainer.eval_batches,
        )
        if self.val_loader.shortfall and cfg.trainer.eval_every and dist.is_main:
            log.warning("small validation split: %s", self.val_loader.shortfall)

    # ---- checkpoints ------------------------------------------------------------------------
    def _rank_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "rng": get_rng_state(),
            "loader": self.train_loader.state_dict(),
            "wandb_run_id": self.wandb_run_id,
            "world_size": self.dist.world_size,
            "ep_size": self.cfg.parallel.ep_size,
            "zero_stage": self.cfg.parallel.zero_stage,
            "precision": self.precision,
            "architecture": reshard.architecture(self.cfg.model),
        }

    def save_checkpoint(self) -> Path:
        """Every rank writes its files, checksums its share (`ckpt.share`), rank 0 writes the
        manifest as COMPLETE, then prunes. A write that fails on any rank (disk full, quota)
        stops the run with a CheckpointError; the partial directory is deleted and the previous
        checkpoint stays the resume point."""
        tag = ckpt.tag_for_step(self.step)
        tag_dir = self.ckpt_dir / tag
        if self.dist.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # a partial save of this step from an interrupted launch
                shutil.rmtree(tag_dir)
        barrier()
        t0 = time.time()
        discard = functools.partial(ckpt.discard_partial, tag_dir)
        error = None
        try:
            self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state={"step": self.step})
        except (OSError, RuntimeError) as err:
            error = self._save_error(tag_dir, err)
            # NOTE: after its first write, DeepSpeed's save has one collective left, the barrier
            # it ends with; ranks whose writes succeeded wait in it. Join it, so that every rank
            # then reaches the agreement below instead of waiting forever.
            barrier()
        if error is None:
            try:
                ckpt.atomic_torch_save(self._rank_state(), ckpt.rank_state_path(tag_dir, self.dist.rank))
            except (OSError, RuntimeError) as err:
                error = self._save_error(tag_dir, err)
        self._fail_together(error, cleanup=discard)  # also the barrier: every rank's files exist
        sizes = broadcast_object(ckpt.checkpoint_files(tag_dir) if self.dist.is_main else None)
        mine = ckpt.share(sizes, self.dist.rank, self.dist.world_size)
        files = dict(
            itertools.chain.from_iterable(
                part.items() for part in all_gather_objects(ckpt.describe_files(tag_dir, mine))
            )
        )
        if self.dist.is_main:
            try:
                ckpt.mark_complete(tag_dir, self.step, self.dist.world_size, files)
            except OSError as err:
                error = self._save_error(tag_dir, err)
        self._fail_together(error, cleanup=discard)
        if self.dist.is_main:
            for path in ckpt.prune(self.ckpt_dir, self.cfg.checkpoint.keep, self.step):
                log.info("deleted old checkpoint %s", path.name)
            log.info("saved checkpoint %s in %.1fs", tag_dir, time.time() - t0)
        barrier()
        self.last_saved_step = self.step
        return tag_dir

    def _save_error(self, tag_dir: Path, err: Exception) -> Exception:
        """A failed checkpoint write as a CheckpointError naming the file and the way out.
        torch.save reports a failed write as a RuntimeError from its zip writer; other
        RuntimeErrors are bugs and keep their traceback."""
        if isinstance(err, RuntimeError) and "write" not in str(err).lower():
            return err
        what = f"{err.strerror} ({err.filename})" if isinstance(err, OSError) and err.strerror else err
        previous = ckpt.latest_complete(self.ckpt_dir)
        resume = f"{previous[1]}, which is intact" if previous else "the start (no checkpoint yet)"
        return CheckpointError(
            f"saving checkpoint {tag_dir} failed on rank {self.dist.rank}: {what}; the partial "
            f"checkpoint is deleted. Free space (or fix permissions) under {self.ckpt_dir} and "
            f"relaunch: the run resumes from {resume}"
        )

    def _verify(self, tag_dir: Path) -> list[str]:
        """Problems of a complete checkpoint against its manifest (empty: intact). Every rank
        checks its share of the files; every rank gets the full list."""
        manifest = ckpt.read_manifest(tag_dir)
        if manifest is None:  # marker from before manifests: nothing to check against
            return []
        mine = ckpt.share(
            {rel: e["size"] for rel, e in manifest.items()}, self.dist.rank, self.dist.world_size
        )
        problems = ckpt.find_damage(tag_dir, {rel: manifest[rel] for rel in mine})
        return sorted(itertools.chain.from_iterable(all_gather_objects(problems)))

    def _newest_intact(self) -> Optional[tuple[int, Path]]:
        """The newest complete checkpoint that passes `_verify`. Newer damaged ones are set
        aside (renamed to `<tag>.damaged`, files untouched) after a warning naming the file, so
        that neither this resume, the next save of that step nor pruning touches their files;
        none intact among complete ones is a CheckpointError."""
        listing = ckpt.list_checkpoints(self.ckpt_dir) if self.dist.is_main else None
        complete = [(s, p) for s, p, c in broadcast_object(listing) if c]
        damaged, found = [], None
        for step, tag_dir in reversed(complete):
            problems = self._verify(tag_dir)
            if not problems:
                found = (step, tag_dir)
                break
            damaged.append((tag_dir, problems))
        if found is None and damaged:
            first = damaged[0][1][0]
            self._fail_together(
                CheckpointError(
                    f"no intact checkpoint in {self.ckpt_dir}: all {len(damaged)} complete ones are "
                    f"damaged ({first}); restore the files from a copy, or start over with another "
                    "run_dir or checkpoint.resume=false"
                )
            )
        if self.dist.is_main:
            for tag_dir, problems in damaged:
                aside = ckpt.set_aside(tag_dir)
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

    def _maybe_resume(self) -> None:
        """Resume from the newest intact checkpoint. With the layout it was saved with:
        DeepSpeed's own load and each rank's own state. With another world size, EP size or
        ZeRO stage: `reshard.load_resharded` and rank 0's state (step, loader position, wandb
        id; the loader's position counts global batches, which do not depend on the layout).
        Everything that cannot resume is refused before any state is loaded."""
        found = self._newest_intact() if self.cfg.checkpoint.resume else None
        if found is None:
            return
        step, tag_dir = found
        state, change = self._on_all_ranks(self._read_rank_state, tag_dir)
        self._on_all_ranks(self._check_resumable, state, tag_dir, change)
        if change is None:
            load_path, _ = self.engine.load_checkpoint(
                str(self.ckpt_dir),
                tag=tag_dir.name,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load {tag_dir}")
        else:
            log.info("resuming %s with another layout: %s", tag_dir.name, change)
            self._on_all_ranks(
                lambda: reshard.load_resharded(
                    self.engine, self.model, tag_dir, saved_ep_size=state["ep_size"]
                )
            )
        self._load_rank_state(state, same_layout=change is None)
        log.info("resumed from %s (step %d)", tag_dir, self.step)

    def _read_rank_state(self, tag_dir: Path) -> tuple[dict[str, Any], Optional[str]]:
        """(trainer state, layout change): this rank's own state when the layout is the saved
        one, else rank 0's (every rank reads rank 0's first, so all agree on the change)."""

        def read(rank: int) -> dict[str, Any]:
            path = ckpt.rank_state_path(tag_dir, rank)
            if not path.exists():
                raise CheckpointError(
                    f"{tag_dir} has no trainer state for rank {rank} ({path}): the save did not "
                    "finish on every rank; restore the file from a copy, or use a new run_dir"
                )
            return torch.load(path, weights_only=False)

        state = read(0)
        parallel = self.cfg.parallel
        change = reshard.layout_change(
            state, world_size=self.dist.world_size, ep_size=parallel.ep_size, zero_stage=parallel.zero_stage
        )
        if change is None and self.dist.rank != 0:
            state = read(self.dist.rank)
        return state, change

    def _check_resumable(self, state: dict[str, Any], tag_dir: Path, change: Optional[str]) -> None:
        """What cannot resume, before anything is loaded: another model (CheckpointError),
        other data or batch order (DataError, from the loader), a layout change that cannot
        be resharded. Also sets the loader's position."""
        reshard.check_same_model(state, self.cfg.model, tag_dir)
        self.train_loader.load_state_dict(state["loader"])
        if change is not None:
            reshard.check_reshardable(
                state, tag_dir, zero_stage=self.cfg.parallel.zero_stage, precision=self.precision
            )

    def _load_rank_state(self, state: dict[str, Any], *, same_layout: bool) -> None:
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.wandb_run_id = state["wandb_run_id"]
        if same_layout:
            set_rng_state(state["rng"])
        else:
            # RNG states are per rank and do not map onto another set of ranks: each rank
            # starts a stream of its own from the seed, the step and its rank (router noise is
            # the only draw in training; its values then differ from an unchanged layout's).
            seed_everything(rank_seed(self.cfg.trainer.seed + self.step, self.dist.rank))
        self.last_saved_step = self.step

    # ---- steps ------------------------------------------------------------------------------
    def _train_step(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over `accum` micro-batches; returns rank-averaged metrics.

        The loss parts are summed on the device and read once, after the all-reduce: no host
        sync per micro-batch (on a GPU each read would stall the launch queue)."""
        engine, device = self.engine, self.dist.device
        sums: dict[str, torch.Tensor] = {}
        accum = engine.gradient_accumulation_steps()
        for _ in range(accum):
            batch = next(batches)
            out = engine(to_device(batch["input_ids"], device), to_device(batch["labels"], device))
            engine.backward(out.loss)  # DeepSpeed scales by 1/accum
            engine.step()  # only updates at the accumulation boundary
            parts = {"loss": out.loss, "lm_loss": out.lm_loss, "aux_loss": out.aux_loss}
            parts.update({f"aux/{k}": v for k, v in out.aux_losses.items()})
            for key, value in parts.items():
                part = value.detach().float() / accum
                sums[key] = sums[key] + part if key in sums else part
        self._update_router_bias()
        return all_reduce_mean_dict(sums, device)

    def _update_router_bias(self) -> None:
        """V3 aux-free balancing: each router sums the loads every rank saw, then updates."""
        if self.cfg.model.moe is not None:
            self.model.update_router_bias(reduce_sum_)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean LM loss over the fixed validation micro-batches (eval mode: no token dropping)."""
        device = self.dist.device
        self.engine.eval()
        total, n = torch.zeros((), device=device), len(self.val_loader)  # the same n on every rank
        for batch in self.val_loader:
            out = self.engine(to_device(batch["input_ids"], device), to_device(batch["labels"], device))
            total += out.lm_loss.float() / n
        self.engine.train()
        # eval forwards (no_grad) count in no router statistic or all-to-all traffic
        return all_reduce_mean_dict({"val_loss": total}, device)["val_loss"]

    # ---- main -------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Set up, train to max_steps (or until a signal / max_steps_per_launch), save, report."""
        # Installed first: a SIGTERM during setup still ends in one step, a save and exit 0.
        self.preempt = PreemptionFlag()
        self.metrics: Optional[MetricsWriter] = None
        self.health: Optional[MoEHealth] = None
        self.wandb = None
        try:
            self._setup()
            return self._loop()
        finally:
            self.preempt.restore()
            if self.metrics is not None:
                self.metrics.close()
            if self.health is not None:
                self.health.close()
            if self.wandb is not None:
                self.wandb.finish()

    def _setup(self) -> None:
        cfg = self.cfg
        self.dist = dist = init_distributed()
        self._setup_logging()
        if cfg.trainer.reuse_host_memory and not keep_freed_host_memory():
            log.info("trainer.reuse_host_memory: no glibc mallopt here; using the default allocator")
        self.precision = self._on_all_ranks(self._check_world_and_device)
        meta = self._prepare_data()
        self._on_all_ranks(self._set_vocab, meta)
        self._build_engine()
        self._on_all_ranks(self._build_loaders, meta)
        self.last_saved_step = -1
        self._maybe_resume()
        if dist.is_main:  # only now: a config, data or resume error leaves the run dir as it was
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # the resolved config (vocab included), for humans and reruns
            ckpt.atomic_write_bytes(
                self.run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)).encode()
            )
            # exactly what the DeepSpeed engine was given, for humans
            ckpt.atomic_write_bytes(
                self.run_dir / "ds_config.json", (json.dumps(self.ds_config, indent=2) + "\n").encode()
            )

        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", enabled=dist.is_main)
        self.metrics.truncate_after(self.step)
        self.health = MoEHealth(
            cfg.health,
            self.model,
            run_dir=self.run_dir,
            is_main=dist.is_main,
            device=dist.device,
            world_size=dist.world_size,
            ep_size=cfg.parallel.ep_size,
            log_every=cfg.trainer.log_every,
            checkpoint_every=cfg.checkpoint.every,
            tokens_per_step=cfg.trainer.global_batch_size * cfg.seq_len,
            start_step=self.step,
            reduce_sum=reduce_sum_,
        )
        self.health.truncate_after(self.step)  # expert_loads.bin, as metrics.jsonl
        if dist.is_main and cfg.logger.kind == "wandb":
            from deepseek_moe.train.wandb_logger import WandbLogger

            try:
                self.wandb = WandbLogger(cfg.logger, self.run_dir, dataclasses.asdict(cfg), self.wandb_run_id)
            except Exception as err:  # noqa: BLE001 - the tracker must not block training
                log.warning(
                    "wandb.init failed (%s: %s); training without wandb (metrics.jsonl "
                    "is still written; logger=none silences this)",
                    type(err).__name__,
                    err,
                )
            else:
                # Stored in every checkpoint from now on; only rank 0's copy is ever read back.
                self.wandb_run_id = self.wandb.run_id

        if self.precision == "bf16" and dist.device.type == "cpu" and not cpu_bf16_is_native():
            log.warning(
                "trainer.precision=bf16 on a CPU without native bf16 matmuls (AVX512-BF16 "
                "or AMX): they are emulated and slower than fp32; use trainer.precision=fp32"
            )
        peak = peak_flops_per_device(dist.device, self.precision)
        self.peak_flops_total = peak * dist.world_size if peak else None
        self.flops_per_token = cfg.model.flops_per_token(cfg.seq_len)
        self.tokens_per_step = cfg.trainer.global_batch_size * cfg.seq_len
        main_print(
            f"run_dir {self.run_dir} | world {dist.world_size} (ep {cfg.parallel.ep_size}, zero "
            f"{cfg.parallel.zero_stage}, {self.precision}) | params {cfg.model.num_params() / 1e6:.2f}M "
            f"total, {cfg.model.num_active_params() / 1e6:.2f}M active | vocab {cfg.model.vocab_size} | "
            f"{self.tokens_per_step} tokens/step, accum {self.engine.gradient_accumulation_steps()} | "
            f"steps {self.step}->{cfg.trainer.max_steps}"
        )

    def _check_world_and_device(self) -> str:
        """Checks that need the world size or the device; returns the resolved precision."""
        try:
            self.cfg.check_world(self.dist.world_size)
            precision = resolve_precision(self.cfg.trainer.precision, self.dist.device.type)
            # the DeepSpeed config's own checks, before anything is written
            build_ds_config(self.cfg, self.dist.world_size, self.dist.device.type)
            return precision
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _log(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    # ---- MoE health hooks (the logic is in moe_health.py) -----------------------------------
    def _collect_health(self, record: dict[str, Any], stop_at: int) -> bool:
        """On logging steps: the router statistics of the interval (one collective, every rank)
        into `record`; rank 0 appends the expert loads to expert_loads.bin and wandb's heatmap."""
        if not self.health.due(self.step, stop_at):
            return False
        record.update(self.health.collect(self.step))
        if self.wandb is not None and self.health.snapshot is not None:
            self.wandb.log_expert_loads(
                self.health.snapshot.layers, self.health.snapshot.counts_LE, self.step
            )
        return True

    def _raise_alarms(self, record: dict[str, Any], collected: bool) -> None:
        """Rank 0: each alarm of this step as a warning line, a metrics.jsonl line, a wandb alert."""
        for alarm in self.health.alarms(self.step, record, collected):
            log.warning("ALARM step %d %s: %s", alarm.step, alarm.kind, alarm.message)
            self.metrics.write(alarm.record())
            if self.wandb is not None:
                self.wandb.alert(f"{alarm.kind} at step {alarm.step}", alarm.message)

    def _loop(self) -> dict[str, Any]:
        cfg, tcfg = self.cfg, self.cfg.trainer
        batches = iter(self.train_loader)
        stop_at = tcfg.max_steps
        if tcfg.max_steps_per_launch is not None:
            stop_at = min(stop_at, self.step + tcfg.max_steps_per_launch)
        last_val: Optional[float] = None
        start_step, t_start = self.step, time.time()
        stopped_by_signal = False
        while self.step < stop_at:
            lr = self.scheduler.get_last_lr()[0]  # the LR this step's update uses
            t0 = time.time()
            values = self._train_step(batches)
            dt = time.time() - t0
            self.step += 1
            self.tokens_seen += self.tokens_per_step
            grad_norm = self.engine.get_global_grad_norm()
            tok_s = self.tokens_per_step / dt
            record = {
                "step": self.step,
                **values,
                "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens_per_s": tok_s,
                "mfu": mfu(tok_s, self.flops_per_token, self.peak_flops_total),
                "tokens_seen": self.tokens_seen,
                "step_time_s": dt,
                "max_memory_gb": (
                    torch.cuda.max_memory_allocated(self.dist.device) / 2**30
                    if self.dist.device.type == "cuda"
                    else None
                ),
            }
            collected = self._collect_health(record, stop_at)
            self._log(record)
            self._raise_alarms(record, collected)
            check_finite(self.step, values["loss"], record["grad_norm"])
            if self.step % tcfg.log_every == 0 or self.step in (start_step + 1, stop_at):
                eta = (time.time() - t_start) / (self.step - start_step) * (tcfg.max_steps - self.step)
                main_print(
                    f"step {self.step:>6}/{tcfg.max_steps} | loss {values['loss']:.4f} "
                    f"(lm {values['lm_loss']:.4f}, aux {values['aux_loss']:.4f}) | lr {lr:.2e} | "
                    f"grad {record['grad_norm'] or 0:.3f} | {tok_s:,.0f} tok/s | eta {_fmt_duration(eta)}"
                )

            if tcfg.eval_every and (self.step % tcfg.eval_every == 0 or self.step == tcfg.max_steps):
                last_val = self.evaluate()
                self._log({"step": self.step, "val_loss": last_val})
                main_print(f"step {self.step:>6} | val_loss {last_val:.4f}")

            if all_reduce_max_flag(self.preempt.requested, self.dist.device):
                stopped_by_signal = True
                main_print(f"step {self.step}: stop requested by signal, saving and exiting")
                break
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                self.save_checkpoint()

        if self.last_saved_step != self.step:
            if self.health.due(self.step, self.step):  # a signal stopped it between logging steps
                record = {"step": self.step}
                self._collect_health(record, self.step)
                self._log(record)
            self.save_checkpoint()
        newest = ckpt.latest_complete(self.ckpt_dir)
        summary = {
            "run_dir": str(self.run_dir),
            "metrics": str(self.run_dir / "metrics.jsonl"),
            "checkpoint": str(newest[1]) if newest else None,
            "step": self.step,
            "val_loss": last_val,
            "stopped_by_signal": stopped_by_signal,
            "finished": self.step >= tcfg.max_steps,
        }
        lines = [
            f"done at step {self.step}/{tcfg.max_steps}"
            + (f" | val_loss {last_val:.4f}" if last_val is not None else ""),
            f"  run dir:    {summary['run_dir']}",
            f"  metrics:    {summary['metrics']}",
            f"  checkpoint: {summary['checkpoint']}",
        ]
        if self.wandb is not None:
            lines.append(f"  wandb:      {self.wandb.run_path} (mode {self.wandb.mode})")
        if not summary["finished"]:
            lines.append("  relaunch the same command to continue")
        main_print("\n".join(lines))
        return summary
