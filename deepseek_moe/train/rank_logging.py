"""Python logging for a multi-process run: every line names its rank, rank 0 logs at INFO."""

from __future__ import annotations

import logging

from deepseek_moe.train.distributed import DistInfo


def setup_rank_logging(dist: DistInfo) -> None:
    """INFO on rank 0, WARNING elsewhere; `[HH:MM:SS rankN] message`; DeepSpeed at WARNING."""
    level = logging.INFO if dist.is_main else logging.WARNING
    logging.basicConfig(
        level=level, format="[%(asctime)s rank%(rank)s] %(message)s", datefmt="%H:%M:%S", force=True
    )
    old_factory = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = old_factory(*args, **kwargs)
        record.rank = dist.rank
        return record

    logging.setLogRecordFactory(factory)
    # DeepSpeed logs every engine detail at INFO on every rank: keep its warnings only.
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
