"""The run's data: prepared (or found prepared), then its loaders, for one corpus
(`data/loader.py`) or a weighted mixture (`data/mixture.py`).

    meta = prepare_data(cfg, dist)                  # every rank; rank 0 prepares a small corpus
    train_loader, val_loader = build_loaders(cfg, dist, meta)

`meta` is one prepared directory's `DataMeta`, or the list of a mixture's sources. For a mixture `val_loader` is a `MixtureEvalLoaders` (one fixed validation
sample per source, plus their weighted mean) and the repetition caps are checked against
`trainer.max_steps` here, before anything is written.
"""

from __future__ import annotations

import logging
from typing import Any

from deepseek_moe.config.train import RunConfig
from deepseek_moe.data import build_eval_loader, build_train_loader
from deepseek_moe.data.mixture import MixtureEvalLoaders, MixtureLoader
from deepseek_moe.train.distributed import DistInfo
from deepseek_moe.train.rank_errors import on_all_ranks

log = logging.getLogger("deepseek_moe.train")


def prepare_data(cfg: RunConfig, dist: DistInfo):
    """Rank 0 prepares (no-op when complete) while the others wait; then all read the meta.
    A mixture (data.sources) is prepared beforehand: every rank reads its sources."""
    if cfg.data.sources:
        from deepseek_moe.data.mixture import load_sources

        return on_all_ranks(dist, load_sources, cfg.data.sources)
    from data_prep.prepare import ensure_prepared  # datasets/sentencepiece: lazy
    from deepseek_moe.train.prepare_budget import check_in_job_budget

    def on_main(main: bool):
        if dist.is_main != main:
            return None
        if main:  # only a small corpus is prepared in-job (the others wait in a collective)
            check_in_job_budget(cfg.data)
        return ensure_prepared(cfg.data)

    # The collective in on_all_ranks doubles as the barrier, and a failure on rank 0 stops every
    # rank instead of leaving them waiting for a barrier that never comes.
    meta = on_all_ranks(dist, on_main, True)  # rank 0 prepares
    other = on_all_ranks(dist, on_main, False)  # then the others read what it wrote
    return meta if dist.is_main else other


def build_loaders(cfg: RunConfig, dist: DistInfo, meta) -> tuple[Any, Any]:
    """(train loader, validation loader(s)) of this rank."""
    batch = dict(micro_batch_size=cfg.trainer.micro_batch_size, dp_rank=dist.rank, dp_world=dist.world_size)
    warn = cfg.trainer.eval_every and dist.is_main
    if isinstance(meta, list):  # a mixture's sources (data.sources)
        train = MixtureLoader(
            meta,
            seq_len=cfg.seq_len,
            global_batch_size=cfg.trainer.global_batch_size,
            seed=cfg.trainer.seed,
            max_steps=cfg.trainer.max_steps,
            **batch,
        )
        val = MixtureEvalLoaders(meta, seq_len=cfg.seq_len, num_batches=cfg.trainer.eval_batches, **batch)
        for name, loader in val.items():
            if loader.shortfall and warn:
                log.warning("small validation split of source %s: %s", name, loader.shortfall)
        return train, val
    train = build_train_loader(
        meta,
        seq_len=cfg.seq_len,
        global_batch_size=cfg.trainer.global_batch_size,
        seed=cfg.trainer.seed,
        **batch,
    )
    val = build_eval_loader(meta, seq_len=cfg.seq_len, num_batches=cfg.trainer.eval_batches, **batch)
    if val.shortfall and warn:
        log.warning("small validation split: %s", val.shortfall)
    return train, val
