"""Count the places where the host reads tensor values: on a GPU each one waits for the device
(a host sync), so the hot path should have as few as possible.

    with count_host_reads() as reads:
        dispatcher.dispatch(...)
    assert reads.count == 1, reads.ops

Counted: `.item()` / `int()` / `float()` / `bool()` of a tensor (aten._local_scalar_dense),
`.tolist()`, `nonzero`, `masked_select` and indexing with a boolean mask (output sizes that
depend on values). The count is device-independent, so CPU tests check the GPU-relevant
property.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_VALUE_DEPENDENT = {"_local_scalar_dense", "nonzero", "masked_select"}


@dataclass
class HostReads:
    ops: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.ops)


class _Mode(TorchDispatchMode):
    def __init__(self, reads: HostReads) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _VALUE_DEPENDENT:
            self.reads.ops.append(name)
        elif (
            name in ("index", "index_put", "index_put_")
            and len(args) > 1
            and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1])
        ):
            self.reads.ops.append(f"{name}[bool mask]")
        return func(*args, **(kwargs or {}))


@contextmanager
def count_host_reads():
    reads = HostReads()
    original = torch.Tensor.tolist

    depth = [0]

    def tolist(self):
        # a torch-function mode (e.g. a default-device context) calls it again from inside
        if depth[0] == 0:
            reads.ops.append("tolist")
        depth[0] += 1
        try:
            return original(self)
        finally:
            depth[0] -= 1

    torch.Tensor.tolist = tolist
    try:
        with _Mode(reads):
            yield reads
    finally:
        torch.Tensor.tolist = original


def created_on_meta_by_default():
    """Within it, a tensor made without an explicit device lands on the meta device, so code that
    mixes it with real tensors fails loudly. On a CUDA run such a tensor would be a CPU tensor: a
    blocking host-to-device copy where it meets device tensors, or a crash in a NCCL collective.
    CPU tests wrap the hot path in it to check that every tensor follows its inputs' device."""
    return torch.device("meta")
