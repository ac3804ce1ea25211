"""The training loop on the DeepSpeed engine.

`Trainer(cfg).fit()` does, in order:
 1. process setup (any launcher, see `distributed.py`) and the checks that need the world size;
 2. data: rank 0 prepares the corpus if needed while the others wait; the model vocab follows
    the tokenizer (padded to a multiple of 64) unless set explicitly;
 3. model built from the seed on every rank (so weights do not depend on the EP size), then
    `parallelize_moe` keeps this rank's experts; AdamW over MoE-aware param groups; our LR
    schedule; `deepspeed.initialize` with the generated config;
 4. resume from the newest complete checkpoint (DeepSpeed state + our per-rank state);
 5. the loop: accumulate micro-batches, step, log one metrics line per step (rank 0), eval,
    checkpoint, and stop cleanly on SIGTERM/SIGUSR1;
 6. print where the run directory, metrics and checkpoint are.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from omegaconf import OmegaConf

from deepseek_moe.config.train import RunConfig
from deepseek_moe.train import checkpoint as ckpt
from deepseek_moe.train.distributed import (
    all_reduce_max_flag, all_reduce_mean_dict, barrier, init_distributed, main_print)
from deepseek_moe.train.ds_config import (build_ds_config, cpu_bf16_is_native, peak_flops_per_device,
                                         resolve_precision)
from deepseek_moe.train.host_memory import keep_freed_host_memory
from deepseek_moe.train.metrics import MetricsWriter, mfu
from deepseek_moe.train.rng import get_rng_state, seed_everything, set_rng_state
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
            "Relaunch to resume from the last checkpoint, with a lower optim.lr")


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
        logging.basicConfig(level=level, format="[%(asctime)s rank%(rank)s] %(message)s",
                            datefmt="%H:%M:%S", force=True)
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
        from deepseek_moe.data import ensure_prepared

        error: Optional[BaseException] = None
        if self.dist.is_main:
            try:
                meta = ensure_prepared(self.cfg.data)
            except Exception as err:  # noqa: BLE001 - re-raised below, after telling the others
                error = err
        # The collective doubles as the barrier, and a failure on rank 0 stops every rank
        # instead of leaving them waiting for a barrier that never comes.
        if all_reduce_max_flag(error is not None):
            if isinstance(error, (ValueError, FileNotFoundError)):
                # a user error (missing source, bad column, vocab...): its message names the
                # fix, so print it like a config error, without a traceback
                raise SystemExit(f"Data error: {error}") from None
            if error is not None:
                raise error
            raise SystemExit("rank 0 failed to prepare the data (see its error)")
        if not self.dist.is_main:
            meta = ensure_prepared(self.cfg.data)
        return meta

    def _set_vocab(self, meta) -> None:
        """model.vocab_size = tokenizer vocab padded to a multiple of 64, unless set explicitly."""
        from deepseek_moe.data import check_model_vocab, padded_vocab_size

        if self.cfg.vocab_from_tokenizer:
            self.cfg.model.vocab_size = padded_vocab_size(meta.vocab_size)
        if self.cfg.model.init_from:  # its vocab wins; the other fields must match it
            from deepseek_moe.errors import ConfigError
            from deepseek_moe.export.importer import check_init_from

            try:
                check_init_from(self.cfg)
            except ConfigError as err:
                raise SystemExit(err.one_line()) from None
        check_model_vocab(meta, self.cfg.model.vocab_size)

    def _build_engine(self) -> None:
        import deepspeed

        from deepseek_moe.model.transformer import DeepSeekMoEForCausalLM
        from deepseek_moe.parallel import optimizer_param_groups, parallelize_moe

        cfg = self.cfg
        seed_everything(cfg.trainer.seed)  # same init on every rank, whatever the EP size
        model = DeepSeekMoEForCausalLM(cfg.model)
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
        # and CUDA); measured 1.5 ms vs 15 ms (for-loop) for 3.4M fp32 params on one CPU core.
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                      eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
                                      fused=self.dist.device.type in ("cpu", "cuda"))
        scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.decay_steps)
        self.ds_config = build_ds_config(cfg, self.dist.world_size, self.dist.device.type)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False)

    def _build_loaders(self, meta) -> None:
        from deepseek_moe.data import build_eval_loader, build_train_loader

        cfg, dist = self.cfg, self.dist
        self.train_loader = build_train_loader(
            meta, seq_len=cfg.seq_len, global_batch_size=cfg.trainer.global_batch_size,
            micro_batch_size=cfg.trainer.micro_batch_size, dp_rank=dist.rank,
            dp_world=dist.world_size, seed=cfg.trainer.seed)
        self.val_loader = build_eval_loader(
            meta, seq_len=cfg.seq_len, micro_batch_size=cfg.trainer.micro_batch_size,
            dp_rank=dist.rank, dp_world=dist.world_size, num_batches=cfg.trainer.eval_batches)

    # ---- checkpoints ------------------------------------------------------------------------
    def _rank_state(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "rng": get_rng_state(),
                "loader": self.train_loader.state_dict(), "wandb_run_id": self.wandb_run_id,
                "world_size": self.dist.world_size}

    def save_checkpoint(self) -> Path:
        tag = ckpt.tag_for_step(self.step)
        tag_dir = self.ckpt_dir / tag
        if self.dist.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # a partial save of this step from an interrupted launch
                shutil.rmtree(tag_dir)
        barrier()
        t0 = time.time()
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state={"step": self.step})
        ckpt.atomic_torch_save(self._rank_state(), ckpt.rank_state_path(tag_dir, self.dist.rank))
        barrier()  # every rank's files are on disk
        if self.dist.is_main:
            ckpt.mark_complete(tag_dir, self.step, self.dist.world_size)
            for path in ckpt.prune(self.ckpt_dir, self.cfg.checkpoint.keep):
                log.info("deleted old checkpoint %s", path.name)
            log.info("saved checkpoint %s in %.1fs", tag_dir, time.time() - t0)
        barrier()
        self.last_saved_step = self.step
        return tag_dir

    def _maybe_resume(self) -> None:
        found = ckpt.latest_complete(self.ckpt_dir) if self.cfg.checkpoint.resume else None
        if found is None:
            return
        step, tag_dir = found
        state_path = ckpt.rank_state_path(tag_dir, self.dist.rank)
        if not state_path.exists():
            raise RuntimeError(
                f"{tag_dir} has no trainer state for rank {self.dist.rank}: it was written by a run "
                f"with a different number of processes. Relaunch with the same world size, or use a "
                f"new run_dir")
        load_path, _ = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag_dir.name,
                                                   load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {tag_dir}")
        state = torch.load(state_path, weights_only=False)
        if state["world_size"] != self.dist.world_size:
            raise RuntimeError(f"{tag_dir} was saved with world size {state['world_size']}, this launch "
                               f"has {self.dist.world_size}; relaunch with the same world size")
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.wandb_run_id = state["wandb_run_id"]
        self.train_loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.last_saved_step = self.step
        log.info("resumed from %s (step %d)", tag_dir, self.step)

    # ---- steps ------------------------------------------------------------------------------
    def _train_step(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over `accum` micro-batches; returns rank-averaged metrics."""
        engine, device = self.engine, self.dist.device
        sums: dict[str, float] = {}
        accum = engine.gradient_accumulation_steps()
        for _ in range(accum):
            batch = next(batches)
            out = engine(batch["input_ids"].to(device), batch["labels"].to(device))
            engine.backward(out.loss)  # DeepSpeed scales by 1/accum
            engine.step()  # only updates at the accumulation boundary
            parts = {"loss": out.loss, "lm_loss": out.lm_loss, "aux_loss": out.aux_loss}
            parts.update({f"aux/{k}": v for k, v in out.aux_losses.items()})
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) / accum
        self._update_router_bias()
        return all_reduce_mean_dict(sums)

    def _update_router_bias(self) -> None:
        """V3 aux-free balancing: sum the loads every rank saw, then let each layer update."""
        moe = self.cfg.model.moe
        if moe is None or moe.bias_update_rate == 0:
            return
        if torch.distributed.get_world_size() > 1:
            for layer in self.model.moe_layers():
                torch.distributed.all_reduce(layer.gate.pending_load_E)
        self.model.update_router_bias()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean LM loss over the fixed validation micro-batches (eval mode: no token dropping)."""
        self.engine.eval()
        total, n = 0.0, len(self.val_loader)  # the same n on every rank
        for batch in self.val_loader:
            out = self.engine(batch["input_ids"].to(self.dist.device), batch["labels"].to(self.dist.device))
            total += float(out.lm_loss) / n
        self.engine.train()
        if hasattr(self.model, "router_metrics"):
            self.model.router_metrics(reset=True)  # eval routing is not training statistics
        return all_reduce_mean_dict({"val_loss": total})["val_loss"]

    def _router_metrics(self) -> dict[str, float]:
        if self.cfg.model.moe is None:
            return {}
        from deepseek_moe.parallel import ep_metrics

        values = self.model.router_metrics(reset=True)
        values.update(ep_metrics(self.model, reset=True))  # all-to-all traffic (empty at EP=1)
        values = all_reduce_mean_dict(values)
        for key in values:  # bytes: total over ranks, the rest: mean over ranks
            if key.endswith("a2a_bytes"):
                values[key] *= self.dist.world_size
        return values

    # ---- main -------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Set up, train to max_steps (or until a signal / max_steps_per_launch), save, report."""
        # Installed first: a SIGTERM during setup still ends in one step, a save and exit 0.
        self.preempt = PreemptionFlag()
        self.metrics: Optional[MetricsWriter] = None
        self.wandb = None
        try:
            self._setup()
            return self._loop()
        finally:
            self.preempt.restore()
            if self.metrics is not None:
                self.metrics.close()
            if self.wandb is not None:
                self.wandb.finish()

    def _setup(self) -> None:
        cfg = self.cfg
        self.dist = dist = init_distributed()
        self._setup_logging()
        if cfg.trainer.reuse_host_memory and not keep_freed_host_memory():
            log.info("trainer.reuse_host_memory: no glibc mallopt here; using the default allocator")
        try:  # checks that need the world size or device: same clean exit as other config errors
            cfg.check_world(dist.world_size)
            self.precision = resolve_precision(cfg.trainer.precision, dist.device.type)
        except ValueError as err:
            raise SystemExit(f"Config error: {err}") from None

        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        meta = self._prepare_data()
        self._set_vocab(meta)
        if dist.is_main:  # the resolved config (vocab included), for humans and reruns
            ckpt.atomic_write_bytes(self.run_dir / "config.yaml",
                                    OmegaConf.to_yaml(OmegaConf.structured(cfg)).encode())
        self._build_engine()
        self._build_loaders(meta)
        self.last_saved_step = -1
        self._maybe_resume()

        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", enabled=dist.is_main)
        self.metrics.truncate_after(self.step)
        if dist.is_main and cfg.logger.kind == "wandb":
            from deepseek_moe.train.wandb_logger import WandbLogger

            try:
                self.wandb = WandbLogger(cfg.logger, self.run_dir, dataclasses.asdict(cfg),
                                         self.wandb_run_id)
            except Exception as err:  # noqa: BLE001 - the tracker must not block training
                log.warning("wandb.init failed (%s: %s); training without wandb (metrics.jsonl "
                            "is still written; logger=none silences this)", type(err).__name__, err)
            else:
                # Stored in every checkpoint from now on; only rank 0's copy is ever read back.
                self.wandb_run_id = self.wandb.run_id

        if self.precision == "bf16" and dist.device.type == "cpu" and not cpu_bf16_is_native():
            log.warning("trainer.precision=bf16 on a CPU without native bf16 matmuls (AVX512-BF16 "
                        "or AMX): they are emulated and slower than fp32; use trainer.precision=fp32")
        peak = peak_flops_per_device(dist.device, self.precision)
        self.peak_flops_total = peak * dist.world_size if peak else None
        self.flops_per_token = cfg.model.flops_per_token(cfg.seq_len)
        self.tokens_per_step = cfg.trainer.global_batch_size * cfg.seq_len
        main_print(
            f"run_dir {self.run_dir} | world {dist.world_size} (ep {cfg.parallel.ep_size}, zero "
            f"{cfg.parallel.zero_stage}, {self.precision}) | params {cfg.model.num_params() / 1e6:.2f}M "
            f"total, {cfg.model.num_active_params() / 1e6:.2f}M active | vocab {cfg.model.vocab_size} | "
            f"{self.tokens_per_step} tokens/step, accum {self.engine.gradient_accumulation_steps()} | "
            f"steps {self.step}->{cfg.trainer.max_steps}")

    def _log(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

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
            record = {"step": self.step, **values, "lr": lr,
                      "grad_norm": None if grad_norm is None else float(grad_norm),
                      "tokens_per_s": tok_s, "mfu": mfu(tok_s, self.flops_per_token, self.peak_flops_total),
                      "tokens_seen": self.tokens_seen, "step_time_s": dt}
            record.update(self._router_metrics())
            self._log(record)
            check_finite(self.step, values["loss"], record["grad_norm"])
            if self.step % tcfg.log_every == 0 or self.step in (start_step + 1, stop_at):
                eta = (time.time() - t_start) / (self.step - start_step) * (tcfg.max_steps - self.step)
                main_print(f"step {self.step:>6}/{tcfg.max_steps} | loss {values['loss']:.4f} "
                           f"(lm {values['lm_loss']:.4f}, aux {values['aux_loss']:.4f}) | lr {lr:.2e} | "
                           f"grad {record['grad_norm'] or 0:.3f} | {tok_s:,.0f} tok/s | eta {_fmt_duration(eta)}")

            if tcfg.eval_every and (self.step % tcfg.eval_every == 0 or self.step == tcfg.max_steps):
                last_val = self.evaluate()
                self._log({"step": self.step, "val_loss": last_val})
                main_print(f"step {self.step:>6} | val_loss {last_val:.4f}")

            if all_reduce_max_flag(self.preempt.requested):
                stopped_by_signal = True
                main_print(f"step {self.step}: stop requested by signal, saving and exiting")
                break
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                self.save_checkpoint()

        if self.last_saved_step != self.step:
            self.save_checkpoint()
        newest = ckpt.latest_complete(self.ckpt_dir)
        summary = {"run_dir": str(self.run_dir), "metrics": str(self.run_dir / "metrics.jsonl"),
                   "checkpoint": str(newest[1]) if newest else None, "step": self.step,
                   "val_loss": last_val, "stopped_by_signal": stopped_by_signal,
                   "finished": self.step >= tcfg.max_steps}
        lines = [f"done at step {self.step}/{tcfg.max_steps}"
                 + (f" | val_loss {last_val:.4f}" if last_val is not None else ""),
                 f"  run dir:    {summary['run_dir']}", f"  metrics:    {summary['metrics']}",
                 f"  checkpoint: {summary['checkpoint']}"]
        if self.wandb is not None:
            lines.append(f"  wandb:      {self.wandb.run_path} (mode {self.wandb.mode})")
        if not summary["finished"]:
            lines.append("  relaunch the same command to continue")
        main_print("\n".join(lines))
        return summary
