"""Tests for `deepseek_moe/testing/distributed.py` (the shared multi-process test helper)."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from deepseek_moe.testing.distributed import run_distributed


def _allreduce_and_env(rank, world_size, offset):
    t = torch.tensor([float(rank + offset)])
    dist.all_reduce(t)
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {"sum": t, "env": env, "backend": dist.get_backend()}


def _raise_on_rank1(rank, world_size):
    if rank == 1:
        raise ValueError("boom from rank 1")
    # rank 0 blocks in a collective rank 1 never joins: the helper must still return
    dist.barrier()


def _hang(rank, world_size):
    time.sleep(60)


def _die(rank, world_size):
    if rank == 0:
        os._exit(3)
    return rank


def test_results_env_and_collectives():
    out = run_distributed(_allreduce_and_env, 2, 10.0)
    # hand computation: (0 + 10) + (1 + 10)
    assert [o["sum"].item() for o in out] == [21.0, 21.0]
    for rank, o in enumerate(out):
        assert o["backend"] == "gloo"
        assert o["env"]["RANK"] == o["env"]["LOCAL_RANK"] == str(rank)
        assert o["env"]["WORLD_SIZE"] == "2"
    assert out[0]["env"]["MASTER_PORT"] == out[1]["env"]["MASTER_PORT"]


def test_exception_propagates_with_traceback():
    with pytest.raises(RuntimeError, match="rank 1 of 2 raised(.|\n)*boom from rank 1"):
        run_distributed(_raise_on_rank1, 2, timeout=60)


def test_hang_times_out():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish"):
        run_distributed(_hang, 2, timeout=5, init_process_group=False)
    assert time.monotonic() - t0 < 30


def test_silent_death_is_reported():
    with pytest.raises(RuntimeError, match="rank 0 of 2 exited with code 3"):
        run_distributed(_die, 2, init_process_group=False)
