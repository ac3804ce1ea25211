"""`shutdown_distributed`: the entry point ends the process group itself, on every rank."""

import torch

from deepseek_moe.testing.distributed import run_distributed
from deepseek_moe.train.distributed import shutdown_distributed


def _shutdown(rank: int, world_size: int) -> tuple[bool, bool]:
    before = torch.distributed.is_initialized()
    shutdown_distributed()
    return before, torch.distributed.is_initialized()


def test_shutdown_destroys_the_group_on_every_rank():
    assert run_distributed(_shutdown, 2) == [(True, False), (True, False)]


def test_shutdown_without_a_group_is_a_no_op():
    assert not torch.distributed.is_initialized()
    shutdown_distributed()
    assert not torch.distributed.is_initialized()
