"""Process setup that works under every launcher we support.

`deepspeed train.py`, `deepspeed --num_gpus N train.py`, `torchrun`, and `srun` (our SLURM
scripts in `launch/` export the torch variables from SLURM's) all set RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Plain `python train.py` sets none: we fill in a
1-process world on localhost so the rest of the code has a single path.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch

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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits. `device` is cuda:LOCAL_RANK when CUDA is available, else cpu."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes logs, metrics and wandb."""
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (NCCL on CUDA, gloo on CPU).

    Idempotent. For a plain `python train.py` the env vars are set to a 1-process world first."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if int(os.environ.get("WORLD_SIZE", "1")) != 1:
            raise RuntimeError("WORLD_SIZE > 1 but RANK is not set: launch with deepspeed, torchrun or srun")
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    import deepspeed  # slow import: keep it out of module import time

    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_max_flag(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank (e.g. a signal seen by one process)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _collective_device() -> torch.device:
    """NCCL reduces device tensors only; gloo host tensors."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def lowest_rank_with(flag: bool) -> Optional[int]:
    """The lowest rank whose `flag` is True, on every rank (None when no rank's is): one rank
    to report an error that several ranks may have seen."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return 0 if flag else None
    world = torch.distributed.get_world_size()
    t = torch.tensor([torch.distributed.get_rank() if flag else world], dtype=torch.int64,
                     device=_collective_device())
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


def all_reduce_mean_dict(values: dict[str, float]) -> dict[str, float]:
    """Mean of each float over ranks; every rank must pass the same keys in the same order."""
    if not values or not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    t /= torch.distributed.get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def main_print(*args, **kwargs) -> None:
    """print() on rank 0 only, flushed (launchers buffer stdout)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)
        sys.stdout.flush()
