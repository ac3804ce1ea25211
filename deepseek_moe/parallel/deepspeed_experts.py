"""`DeepSpeedExperts`: one layer's routed experts, dressed so that DeepSpeed treats them as MoE.

The engine recognises MoE by `isinstance(module, deepspeed.moe.layer.MoE)`, finds expert
parameters by `param.allreduce == False` + `param.group_name`, and its checkpoint code splits
expert files by the STATE-DICT key pattern `.deepspeed_moe.experts.deepspeed_experts.<i>.`.
The wrapper is a subclass of DeepSpeed's `MoE` that does NOT run `MoE.__init__` (no GShard gate,
no capacity buffers) and holds our `RoutedExperts` at `deepspeed_moe.experts.deepspeed_experts`;
its forward is `RoutedExperts.forward`. `MoELayer.apply_ep(wrap_experts=DeepSpeedExperts.wrapper(...))`
installs it; router, dispatcher and shared experts stay outside it, because DeepSpeed treats every
state-dict key containing "expert" under an MoE module as an expert parameter.
docs/design.md explains why this route was chosen over DeepSpeed's own MoE layers.

State-dict keys under the wrapper: `<layer>.experts.deepspeed_moe.experts.deepspeed_experts.
{l}.{gate,up,down}_proj.weight` with LOCAL l (`LOCAL_EXPERT_KEY`); the HF layout names the same
tensor `<layer>.experts.{e}.<proj>.weight` with GLOBAL e = local_expert_offset + l
(`global_expert_key`).
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from deepspeed.moe.layer import MoE as _DeepSpeedMoE
from torch import nn

from deepseek_moe.model.experts import RoutedExperts
from deepseek_moe.parallel.groups import ensure_ep_groups, expert_group_name

__all__ = ["DeepSpeedExperts", "DS_EXPERTS_PREFIX", "LOCAL_EXPERT_KEY", "global_expert_key"]

DS_EXPERTS_PREFIX = "deepspeed_moe.experts.deepspeed_experts."
"""Where the wrapper holds the routed experts (DeepSpeed's checkpoint code matches it)."""

LOCAL_EXPERT_KEY = re.compile(
    r"^(?P<layer>.*)\.experts\." + re.escape(DS_EXPERTS_PREFIX) + r"(?P<l>\d+)\.(?P<rest>.*)$"
)
"""A wrapped expert's state-dict key: groups `layer` (the MoE layer), `l` (local id), `rest`."""


def global_expert_key(layer: str, expert: int, rest: str) -> str:
    """The HF-layout key of global expert `expert` of MoE layer `layer` (e.g. `rest` =
    "up_proj.weight"): the one definition of that format."""
    return f"{layer}.experts.{expert}.{rest}"


class DeepSpeedExperts(_DeepSpeedMoE):
    """This rank's routed experts, dressed as a DeepSpeed MoE module (see module docstring).

    `forward(x_ND, counts_L) -> y_ND` is `RoutedExperts.forward`; `len()`, `expert_weights(l)`
    and the two stacked parameters go to the wrapped `RoutedExperts` (`local_experts`).
    """

    def __init__(self, experts: RoutedExperts, *, num_experts: int, ep_size: int) -> None:
        # NOTE: deliberately skip MoE.__init__ (it builds DeepSpeed's own gate and experts);
        # set exactly the attributes the engine and checkpoint code read.
        nn.Module.__init__(self)
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = len(experts)
        self.expert_group_name = expert_group_name(ep_size)
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False
        self.deepspeed_moe = nn.Module()
        self.deepspeed_moe.experts = nn.Module()
        self.deepspeed_moe.experts.deepspeed_experts = experts
        for p in experts.parameters():
            p.allreduce = False  # not in the data-parallel all-reduce ...
            p.group_name = self.expert_group_name  # ... reduced over this EDP group instead

    @classmethod
    def wrapper(cls, *, num_experts: int, ep_size: int) -> Callable[[RoutedExperts], DeepSpeedExperts]:
        """The `wrap_experts` argument of `MoELayer.apply_ep`."""
        return lambda experts: cls(experts, num_experts=num_experts, ep_size=ep_size)

    @property
    def local_experts(self) -> RoutedExperts:
        return self.deepspeed_moe.experts.deepspeed_experts

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by `deepspeed.initialize`: make sure the named EP/EDP groups exist."""
        if use_data_before_expert_parallel_:
            raise ValueError(
                "use_data_before_expert_parallel_ is not supported: our EP groups are consecutive "
                "ranks (DeepSpeed's E + D layout); remove it from the DeepSpeed config"
            )
        ensure_ep_groups(self.ep_size)

    def forward(self, x_ND: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.local_experts(x_ND, counts_L)

    def __len__(self) -> int:
        return len(self.local_experts)

    def expert_weights(self, l: int):
        return self.local_experts.expert_weights(l)

    @property
    def gate_up_proj(self) -> nn.Parameter:
        return self.local_experts.gate_up_proj

    @property
    def down_proj(self) -> nn.Parameter:
        return self.local_experts.down_proj
