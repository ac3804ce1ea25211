"""The training loop on the DeepSpeed engine.

`Trainer(cfg).fit()` does, in order:
 1. process setup (any launcher, see `distributed.py`) and the checks that need the world size;
 2. data: rank 0 prepares the corpus if needed (a small one only, `prepare_budget.py`) while
    the others wait, or every rank reads the prepared sources of a mixture (`data.sources`);
    the model vocab follows the tokenizer (padded to a multiple of 64) unless set explicitly;
 3. model built from the seed on every rank (so weights do not depend on the EP size), then
    `parallelize_moe` keeps this rank's experts; AdamW over MoE-aware param groups; our LR
    schedule; `deepspeed.initialize` with the generated config;
 4. resume from the newest intact checkpoint (`checkpoint/manager.py`: verified against its
    manifest, damaged ones set aside; one written with another world size, EP size or ZeRO
    stage is resharded on load);
 5. the loop: accumulate micro-batches, step, log one metrics line per step (rank 0), eval,
    checkpoint, and stop cleanly on SIGTERM/SIGUSR1;
 6. print where the run directory, metrics and checkpoint are.

User errors (config, data, checkpoints) are raised as `deepseek_moe.errors` classes at points
every rank reaches together (`rank_errors.py`): the lowest rank that saw the error reports it as
one line, every rank exits, none is left waiting in a collective.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from omegaconf import OmegaConf

from deepseek_moe.atomic import atomic_write_bytes
from deepseek_moe.checkpoint.manager import CheckpointManager
from deepseek_moe.config.train import RunConfig
from deepseek_moe.data.mixture import MixtureEvalLoaders, MixtureLoader
from deepseek_moe.train.distributed import (
    DistInfo,
    all_reduce_max_flag,
    all_reduce_mean_dict,
    init_distributed,
    main_print,
    reduce_sum_,
    to_device,
)
from deepseek_moe.train.ds_config import build_ds_config
from deepseek_moe.train.host_memory import keep_freed_host_memory
from deepseek_moe.train.loaders import build_loaders, prepare_data
from deepseek_moe.train.metrics import MetricsWriter, mfu, peak_flops_per_device
from deepseek_moe.train.optimizer import build_optimizer
from deepseek_moe.train.precision import resolve_precision, warn_if_bf16_is_emulated
from deepseek_moe.train.rank_errors import on_all_ranks
from deepseek_moe.train.rank_logging import setup_rank_logging
from deepseek_moe.train.rng import rank_seed, seed_everything
from deepseek_moe.train.moe_health import MoEHealth
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
    """One training run described by a validated `RunConfig`.

    All of its state is declared in `__init__`; `_setup` builds it in the order listed there."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).absolute()
        # Progress: what a checkpoint restores.
        self.step = 0  # optimizer steps completed
        self.tokens_seen = 0
        self.wandb_run_id: Optional[str] = None
        # Built by `_setup`, in this order.
        self.dist: Optional[DistInfo] = None
        self.precision: Optional[str] = None  # "fp32" / "bf16" / "fp16" (trainer.precision resolved)
        self.checkpoints: Optional[CheckpointManager] = None  # saves and resumes (how; we say when)
        self.model: Optional[torch.nn.Module] = None  # the module inside the engine
        self.engine = None  # DeepSpeed engine: forward, backward, step, its own save/load
        self.scheduler = None
        self.train_loader = None
        self.val_loader = None  # an eval loader; for a mixture, one per source (MixtureEvalLoaders)
        self.metrics: Optional[MetricsWriter] = None
        self.health: Optional[MoEHealth] = None  # router statistics, expert_loads.bin, alarms
        self.wandb = None  # WandbLogger on rank 0 with logger=wandb, else None
        self.tokens_per_step = cfg.trainer.global_batch_size * cfg.seq_len
        self.flops_per_token: Optional[float] = None  # for MFU, once the vocab is known
        self.peak_flops_total: Optional[float] = None  # over all devices; None: unknown device
        # Installed by `fit` before anything else.
        self.preempt: Optional[PreemptionFlag] = None

    # ---- main -------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Set up, train to max_steps (or until a signal / max_steps_per_launch), save, report."""
        # Installed first: a SIGTERM during setup still ends in one step, a save and exit 0.
        self.preempt = PreemptionFlag()
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
        """Build the state declared in `__init__`. A user error on any rank stops every rank
        before the run directory is written."""
        cfg = self.cfg
        self.dist = dist = init_distributed(cfg.parallel.process_group_timeout_min)
        setup_rank_logging(dist)
        if cfg.trainer.reuse_host_memory and not keep_freed_host_memory():
            log.info("trainer.reuse_host_memory: no glibc mallopt here; using the default allocator")
        self.precision = on_all_ranks(dist, self._check_world_and_device)
        meta = prepare_data(cfg, dist)
        on_all_ranks(dist, self._set_vocab, meta)
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints",
            dist=dist,
            keep=cfg.checkpoint.keep,
            model_cfg=cfg.model,  # its vocab is final now
            ep_size=cfg.parallel.ep_size,
            zero_stage=cfg.parallel.zero_stage,
            precision=self.precision,
            seed=cfg.trainer.seed,
        )
        self.model, self.engine, self.scheduler, ds_config = self._build_engine()
        self.train_loader, self.val_loader = on_all_ranks(dist, build_loaders, cfg, dist, meta)
        if cfg.checkpoint.resume:
            self._resume()
        if dist.is_main:  # only now: a config, data or resume error leaves the run dir as it was
            self._write_run_files(ds_config)
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
            tokens_per_step=self.tokens_per_step,
            start_step=self.step,
            reduce_sum=reduce_sum_,
        )
        self.health.truncate_after(self.step)  # expert_loads.bin, as metrics.jsonl
        if dist.is_main and cfg.logger.kind == "wandb":
            from deepseek_moe.train.wandb_logger import start_wandb

            self.wandb = start_wandb(cfg.logger, self.run_dir, dataclasses.asdict(cfg), self.wandb_run_id)
            if self.wandb is not None:  # stored in every checkpoint; only rank 0's is read back
                self.wandb_run_id = self.wandb.run_id
        self.flops_per_token = cfg.model.flops_per_token(cfg.seq_len)
        peak = peak_flops_per_device(dist.device, self.precision)
        self.peak_flops_total = peak * dist.world_size if peak else None
        self._print_run_line()

    # ---- setup steps ------------------------------------------------------------------------
    def _check_world_and_device(self) -> str:
        """Checks that need the world size or the device (ConfigErrors); returns the resolved
        precision."""
        self.cfg.check_world(self.dist.world_size)
        precision = resolve_precision(self.cfg.trainer.precision, self.dist.device.type)
        # the DeepSpeed config's own checks, before anything is written
        build_ds_config(self.cfg, self.dist.world_size, self.dist.device.type)
        return precision

    def _set_vocab(self, meta) -> None:
        """model.vocab_size = tokenizer vocab padded to a multiple of 64, unless set explicitly."""
        from deepseek_moe.data import check_model_vocab, padded_vocab_size

        if isinstance(meta, list):  # mixture sources share one tokenizer (checked)
            meta = meta[0].meta

        if self.cfg.vocab_from_tokenizer:
            self.cfg.model.vocab_size = padded_vocab_size(meta.vocab_size)
        if self.cfg.model.init_from:  # its vocab wins; the other fields must match it
            from deepseek_moe.export.importer import check_init_from

            check_init_from(self.cfg)  # a ConfigError naming each mismatching field
        check_model_vocab(meta, self.cfg.model.vocab_size)

    def _build_engine(self) -> tuple[torch.nn.Module, Any, Any, dict[str, Any]]:
        """(model, DeepSpeed engine, LR scheduler, the DeepSpeed config it was given)."""
        import deepspeed

        from deepseek_moe.model.transformer import DeepSeekMoEForCausalLM
        from deepseek_moe.parallel.expert_parallel import parallelize_moe

        cfg = self.cfg
        seed_everything(cfg.trainer.seed)  # same init on every rank, whatever the EP size
        model = DeepSeekMoEForCausalLM(
            cfg.model,
            activation_checkpointing=cfg.trainer.activation_checkpointing,
            loss_chunk_tokens=cfg.trainer.loss_chunk_tokens,
        )
        if cfg.model.moe is not None:
            model = parallelize_moe(model, cfg.parallel.ep_size)
        if cfg.model.init_from and not (cfg.checkpoint.resume and self.checkpoints.newest_complete()):
            from deepseek_moe.export.importer import load_init_from

            load_init_from(model, cfg.model)  # a new run: continued pretraining from these weights
        optimizer = build_optimizer(model, cfg.optim, self.dist.device.type)
        scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.decay_steps)
        ds_config = build_ds_config(cfg, self.dist.world_size, self.dist.device.type)
        engine, _, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config,
            dist_init_required=False,
        )
        # The build seed was the same on every rank (same weights); from here on each rank draws
        # its own random numbers (router noise), else every rank would add the same noise.
        seed_everything(rank_seed(cfg.trainer.seed, self.dist.rank))
        return model, engine, scheduler, ds_config

    def _write_run_files(self, ds_config: dict[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # the resolved config (vocab included), for humans and reruns
        config_yaml = OmegaConf.to_yaml(OmegaConf.structured(self.cfg))
        atomic_write_bytes(self.run_dir / "config.yaml", config_yaml.encode())
        # exactly what the DeepSpeed engine was given, for humans
        atomic_write_bytes(self.run_dir / "ds_config.json", (json.dumps(ds_config, indent=2) + "\n").encode())

    def _print_run_line(self) -> None:
        cfg, dist = self.cfg, self.dist
        warn_if_bf16_is_emulated(self.precision, dist.device.type)
        main_print(
            f"run_dir {self.run_dir} | world {dist.world_size} (ep {cfg.parallel.ep_size}, zero "
            f"{cfg.parallel.zero_stage}, {self.precision}) | params {cfg.model.num_params() / 1e6:.2f}M "
            f"total, {cfg.model.num_active_params() / 1e6:.2f}M active | vocab {cfg.model.vocab_size} | "
            f"{self.tokens_per_step} tokens/step, accum {self.engine.gradient_accumulation_steps()} | "
            f"steps {self.step}->{cfg.trainer.max_steps}"
        )

    # ---- checkpoints (the protocol is CheckpointManager's) -----------------------------------
    def _resume(self) -> None:
        """Continue from the newest intact checkpoint, if any. The loader's position is checked
        (another data set or batch order is a DataError) and set before any state is loaded."""
        state = self.checkpoints.resume(
            self.engine, self.model, check=lambda saved: self.train_loader.load_state_dict(saved["loader"])
        )
        if state is not None:
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.wandb_run_id = state["wandb_run_id"]

    def save_checkpoint(self) -> Path:
        """Checkpoint this step (a CheckpointError on every rank when a write fails)."""
        state = {
            "tokens_seen": self.tokens_seen,
            "loader": self.train_loader.state_dict(),
            "wandb_run_id": self.wandb_run_id,
        }
        return self.checkpoints.save(self.engine, step=self.step, state=state)

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
    def evaluate(self, loader=None) -> float:
        """Mean LM loss over the fixed validation micro-batches of `loader` (default: the run's
        validation split) in eval mode (no token dropping)."""
        device = self.dist.device
        loader = self.val_loader if loader is None else loader
        self.engine.eval()
        total, n = torch.zeros((), device=device), len(loader)  # the same n on every rank
        for batch in loader:
            out = self.engine(to_device(batch["input_ids"], device), to_device(batch["labels"], device))
            total += out.lm_loss.float() / n
        self.engine.train()
        # eval forwards (no_grad) count in no router statistic or all-to-all traffic
        return all_reduce_mean_dict({"val_loss": total}, device)["val_loss"]

    def _eval_metrics(self) -> dict[str, float]:
        """`val_loss`; for a mixture also `val_loss/<source>` (each source's own validation
        sample), and `val_loss` is their mean weighted by the mixture weights."""
        if not isinstance(self.val_loader, MixtureEvalLoaders):
            return {"val_loss": self.evaluate()}
        per_source = {name: self.evaluate(loader) for name, loader in self.val_loader.items()}
        return {
            "val_loss": self.val_loader.overall(per_source),
            **{f"val_loss/{name}": value for name, value in per_source.items()},
        }

    def _data_metrics(self) -> dict[str, int]:
        """For a mixture: `tokens_seen/<source>`, the training tokens drawn from each source
        since the start of the run (the same on every rank: the quotas are deterministic)."""
        if not isinstance(self.train_loader, MixtureLoader):
            return {}
        return {f"tokens_seen/{name}": n for name, n in self.train_loader.tokens_by_source().items()}

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

    # ---- the loop ---------------------------------------------------------------------------
    def _loop(self) -> dict[str, Any]:
        cfg, tcfg = self.cfg, self.cfg.trainer
        batches = iter(self.train_loader)
        stop_at = tcfg.max_steps
        if tcfg.max_steps_per_launch is not None:
            stop_at = min(stop_at, self.step + tcfg.max_steps_per_launch)
        last_val: Optional[float] = None
        start = (self.step, time.time())
        stopped_by_signal = False
        while self.step < stop_at:
            self._step_and_log(batches, start, stop_at)
            if tcfg.eval_every and (self.step % tcfg.eval_every == 0 or self.step == tcfg.max_steps):
                evals = self._eval_metrics()
                last_val = evals["val_loss"]
                self._log({"step": self.step, **evals})
                main_print(f"step {self.step:>6} | val_loss {last_val:.4f}")
            if all_reduce_max_flag(self.preempt.requested, self.dist.device):
                stopped_by_signal = True
                main_print(f"step {self.step}: stop requested by signal, saving and exiting")
                break
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                self.save_checkpoint()
        if self.checkpoints.last_saved_step != self.step:
            if self.health.due(self.step, self.step):  # a signal stopped it between logging steps
                record = {"step": self.step}
                self._collect_health(record, self.step)
                self._log(record)
            self.save_checkpoint()
        return self._finish(last_val, stopped_by_signal)

    def _step_and_log(self, batches, start: tuple[int, float], stop_at: int) -> None:
        """One optimizer step; its metrics line (rank 0), a progress line every log_every."""
        lr = self.scheduler.get_last_lr()[0]  # the LR this step's update uses
        t0 = time.time()
        values = self._train_step(batches)
        dt = time.time() - t0
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        grad_norm = self.engine.get_global_grad_norm()
        tok_s = self.tokens_per_step / dt
        device = self.dist.device
        record = {
            "step": self.step,
            **values,
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens_per_s": tok_s,
            "mfu": mfu(tok_s, self.flops_per_token, self.peak_flops_total),
            "tokens_seen": self.tokens_seen,
            "step_time_s": dt,
            "max_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30
            if device.type == "cuda"
            else None,
        }
        record.update(self._data_metrics())
        collected = self._collect_health(record, stop_at)
        self._log(record)
        self._raise_alarms(record, collected)
        check_finite(self.step, values["loss"], record["grad_norm"])
        start_step, t_start = start
        if self.step % self.cfg.trainer.log_every == 0 or self.step in (start_step + 1, stop_at):
            max_steps = self.cfg.trainer.max_steps
            eta = (time.time() - t_start) / (self.step - start_step) * (max_steps - self.step)
            main_print(
                f"step {self.step:>6}/{max_steps} | loss {values['loss']:.4f} "
                f"(lm {values['lm_loss']:.4f}, aux {values['aux_loss']:.4f}) | lr {lr:.2e} | "
                f"grad {record['grad_norm'] or 0:.3f} | {tok_s:,.0f} tok/s | eta {_fmt_duration(eta)}"
            )

    def _log(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def _finish(self, last_val: Optional[float], stopped_by_signal: bool) -> dict[str, Any]:
        """The run's summary, printed (rank 0) and returned."""
        max_steps = self.cfg.trainer.max_steps
        newest = self.checkpoints.newest_complete()
        summary = {
            "run_dir": str(self.run_dir),
            "metrics": str(self.run_dir / "metrics.jsonl"),
            "checkpoint": str(newest[1]) if newest else None,
            "step": self.step,
            "val_loss": last_val,
            "stopped_by_signal": stopped_by_signal,
            "finished": self.step >= max_steps,
        }
        lines = [
            f"done at step {self.step}/{max_steps}"
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
