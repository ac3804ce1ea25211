"""Process setup that works under every launcher we support.

`deepspeed train.py`, `deepspeed --num_gpus N train.py`, `torchrun`, and `srun` (our SLURM
scripts in `launch/` export the torch variables from SLURM's) all set RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Plain `python train.py` sets none: we fill in a
1-process world on localhost so the rest of the code has a single path.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch

from deepseek_moe.errors import ConfigError

_LOCAL_RANK_ARG = re.compile(r"^--local[_-]rank(=\d+)?$")


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop the `--local_rank=N` (or `--local_rank N`) the deepspeed launcher appends.

    Hydra rejects unknown `--` options; the launcher also exports LOCAL_RANK, which is what we
    read, so the argument carries nothing we need."""
    out: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        match = _LOCAL_RANK_ARG.match(arg)
        if match:
            skip_next = match.group(1) is None  # "--local_rank 3" form
            continue
        out.append(arg)
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, the OS chooses)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits. `device` is this process's GPU when CUDA is available
    (`cuda_device_for`), else cpu."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes logs, metrics and wandb."""
        return self.rank == 0


def process_group_backend(device_type: str, cuda_backend: str = "nccl") -> str:
    """The default process group's backend for a run on `device_type`.

    On CUDA: "cpu:gloo,cuda:nccl", torch's own default when no backend is named. Every tensor
    our code hands to a collective is on the run's device (NCCL), but a NCCL-only group has no
    backend for CPU tensors ("No backend type associated with device type cpu"), so one CPU
    collective anywhere (ours, DeepSpeed's, a future one) would crash the run; registering gloo
    for CPU makes that class of bug impossible, at no cost to the CUDA path. Groups made later
    with `new_group(ranks)` (DeepSpeed's EP/EDP groups) inherit the same pair. `cuda_backend`
    exists for the CPU tests, which have no NCCL (see docs/design.md)."""
    if device_type == "cuda":
        return f"cpu:gloo,cuda:{cuda_backend}"
    return "gloo"


# Launchers that name a process's rank within its node, in the order they are looked up.
_LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")


def local_rank_from_env(env: dict[str, str]) -> int:
    """This process's rank within its node. Only a 1-process world may go without one: RANK is
    no stand-in (on the second node RANK 8 is not GPU 8)."""
    for name in _LOCAL_RANK_VARS:
        if env.get(name, "") != "":
            return int(env[name])
    if int(env.get("WORLD_SIZE", "1")) == 1:
        return 0
    raise ConfigError(
        f"RANK={env.get('RANK')} of WORLD_SIZE={env['WORLD_SIZE']} but LOCAL_RANK is not set: "
        "launch with deepspeed, torchrun or srun (launch/train.sbatch), or export LOCAL_RANK"
    )


def cuda_device_for(local_rank: int, device_count: int, visible: Optional[str] = None) -> int:
    """The CUDA device index for the process with `local_rank` that sees `device_count` GPUs.

    One GPU per process of the node (deepspeed, torchrun, srun --gpus-per-node): GPU local_rank.
    One GPU per task (srun --gpus-per-task=1, or CUDA_VISIBLE_DEVICES set per process): each
    process sees its GPU as device 0. Anything else names a GPU that is not there: a one-line
    error instead of CUDA's "invalid device ordinal" later."""
    if 0 <= local_rank < device_count:
        return local_rank
    if device_count == 1:
        return 0
    raise ConfigError(
        f"LOCAL_RANK={local_rank} but this process sees {device_count} GPUs "
        f"(CUDA_VISIBLE_DEVICES={visible if visible is not None else 'unset'}): start at most "
        f"{device_count} processes per node, one per GPU, or give each process one GPU"
    )


def init_distributed(timeout_min: Optional[float] = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (see `process_group_backend`).

    Idempotent. For a plain `python train.py` the env vars are set to a 1-process world first.
    `timeout_min`: the process group's timeout (`parallel.process_group_timeout_min`); None
    keeps DeepSpeed's default."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if int(os.environ.get("WORLD_SIZE", "1")) != 1:
            raise RuntimeError("WORLD_SIZE > 1 but RANK is not set: launch with deepspeed, torchrun or srun")
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = local_rank_from_env(dict(os.environ))
    # DeepSpeed reads LOCAL_RANK too: give it the value chosen here
    os.environ["LOCAL_RANK"] = str(local_rank)

    if torch.cuda.is_available():
        index = cuda_device_for(local_rank, torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")

    import deepspeed  # slow import: keep it out of module import time

    if not torch.distributed.is_initialized():
        timeout = {} if timeout_min is None else {"timeout": datetime.timedelta(minutes=timeout_min)}
        deepspeed.init_distributed(
            dist_backend=process_group_backend(device.type),
            auto_mpi_discovery=False,
            verbose=False,
            **timeout,
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def shutdown_distributed() -> None:
    """End the process group once every rank has finished (the entry point calls it after a
    successful run). A group left to the interpreter's exit is torn down while its backend's
    threads may still run, which can abort the process after the work is done (seen with gloo as
    "terminate called without an active exception"); torch asks for an explicit destroy."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# The helpers below take the run's device (`DistInfo.device`) and put every tensor they reduce
# there: on a CUDA run that is the NCCL backend, the fast one, whatever else the group holds.


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def all_reduce_max_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank (e.g. a signal seen by one process)."""
    if _world_size() == 1:
        return flag
    t = torch.full((1,), int(flag), dtype=torch.int32, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def lowest_rank_with(flag: bool, device: torch.device) -> Optional[int]:
    """The lowest rank whose `flag` is True, on every rank (None when no rank's is): one rank
    to report an error that several ranks may have seen."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return 0 if flag else None
    world = torch.distributed.get_world_size()
    t = torch.tensor([torch.distributed.get_rank() if flag else world], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    lowest = int(t.item())
    return None if lowest == world else lowest


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (a small picklable object, e.g. a file listing)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def all_reduce_dict(
    values: dict[str, float | torch.Tensor], device: torch.device, op: str = "mean"
) -> dict[str, float]:
    """Mean (op="mean") or sum (op="sum") of each value over ranks, as Python floats.

    Values may be floats or 0-d tensors (device tensors stay on the device until the one read
    at the end: one host sync for the whole dict). Every rank must pass the same keys."""
    if op not in ("mean", "sum"):
        raise ValueError(f"op={op!r} must be 'mean' or 'sum'")
    if not values:
        return {}
    keys = sorted(values)
    # torch.full for Python floats: torch.tensor(..., device="cuda") is a blocking copy (a sync)
    t = torch.stack(
        [
            values[k].to(device, torch.float64).reshape(())
            if torch.is_tensor(values[k])
            else torch.full((), float(values[k]), dtype=torch.float64, device=device)
            for k in keys
        ]
    )
    world = _world_size()
    if world > 1:
        torch.distributed.all_reduce(t)
        if op == "mean":
            t /= world
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def all_reduce_mean_dict(values: dict[str, float | torch.Tensor], device: torch.device) -> dict[str, float]:
    """Mean of each value over ranks (see `all_reduce_dict`)."""
    return all_reduce_dict(values, device, op="mean")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` without a host sync: a plain `.to("cuda")` from pageable memory waits for
    the copy; from pinned memory with non_blocking it is queued like a kernel (torch's pinned
    allocator keeps the buffer alive until the copy is done)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """In place: each tensor becomes its sum over ranks, in ONE all-reduce (same dtype and
    device for all; every rank passes the same shapes in the same order)."""
    if _world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def main_print(*args, **kwargs) -> None:
    """print() on rank 0 only, flushed (launchers buffer stdout)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)
        sys.stdout.flush()
