"""Expert parallelism inside DeepSpeed: what the trainer calls.

    import deepspeed
    from deepseek_moe.parallel import (parallelize_moe, optimizer_param_groups, validate_ep_size,
                                       consolidated_state_dict, load_consolidated_state_dict,
                                       ep_metrics)

    deepspeed.init_distributed()                       # (or torch.distributed + our wrapper)
    validate_ep_size(ep_size, world_size, cfg.model.moe,
                     zero_stage=cfg.parallel.zero_stage, grad_clip=cfg.optim.grad_clip)
    torch.manual_seed(seed)                            # same full model on every rank
    model = parallelize_moe(DeepSeekMoEForCausalLM(cfg.model), ep_size)
    opt = torch.optim.AdamW(optimizer_param_groups(model, weight_decay), lr=...)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    ...
    sd = consolidated_state_dict(model)               # collective; full HF-keyed dict on rank 0
    load_consolidated_state_dict(model, sd)            # any EP size, every rank passes the full sd
    metrics = ep_metrics(model)                        # {"moe/layer{L}/a2a_bytes": ...} per rank

How DeepSpeed is made to treat our layers as MoE (see docs/design.md for why this route):
the engine recognises MoE by `isinstance(module, deepspeed.moe.layer.MoE)` and finds expert
parameters by `param.allreduce == False` + `param.group_name`, and its checkpoint code splits
expert files by the STATE-DICT key pattern `.deepspeed_moe.experts.deepspeed_experts.<i>.`.
`RoutedExperts` stores its experts stacked (`gate_up_proj` [L, 2H, D], `down_proj` [L, D, H])
but its `state_dict()` / `load_state_dict()` speak the per-expert keys `<l>.<proj>.weight`, so
that pattern (and our consolidation) sees one expert per index as before. So
`parallelize_moe` replaces each `MoELayer.experts` (a `RoutedExperts` holding only this rank's
experts) with a `DeepSpeedExperts` wrapper: a subclass of DeepSpeed's `MoE` that does
NOT run `MoE.__init__` (no GShard gate, no capacity buffers) and holds the same `RoutedExperts`
at `deepspeed_moe.experts.deepspeed_experts`. Its forward is our grouped expert compute; the
router and the all-to-all dispatcher stay in `MoELayer`. Only the routed experts live under the
wrapper: DeepSpeed treats every state-dict key containing "expert" under an MoE module as an
expert parameter, so the shared experts and the gate must stay outside it (they do).

Resulting state-dict keys: `model.layers.{L}.mlp.experts.deepspeed_moe.experts.deepspeed_experts.
{l}.{gate,up,down}_proj.weight` with LOCAL l (the parameters themselves are the two stacks
`...deepspeed_experts.{gate_up_proj,down_proj}`); `consolidated_state_dict` maps them back to the HF
layout `model.layers.{L}.mlp.experts.{e}...` with GLOBAL e = ep_rank * L + l.

Scaling note: `parallelize_moe` slices a full model, so every rank builds all experts once
(cheap for the presets we train on CPU/few GPUs; it is what makes EP=N weights equal EP=1
weights from one seed). For presets whose experts do not fit one rank, build with
`DeepSeekMoEForCausalLM(cfg, ep_rank=r, ep_size=P)` under `torch.device("meta")`, materialise,
then `load_consolidated_state_dict`: `parallelize_moe` accepts such an already-local model.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as _DeepSpeedMoE
from torch import nn

from deepseek_moe.checkpoint.keys import consolidated_state_dict, load_consolidated_state_dict  # noqa: F401 (re-export)
from deepseek_moe.model.dispatch import LocalDispatcher
from deepseek_moe.model.experts import RoutedExperts
from deepseek_moe.model.moe import MoELayer
from deepseek_moe.parallel.dispatcher import AllToAllDispatcher
from deepseek_moe.parallel.groups import (ensure_ep_groups, expert_group_name, get_ep_group,
                                          validate_ep_size)

__all__ = [
    "DeepSpeedExperts",
    "parallelize_moe",
    "optimizer_param_groups",
    "consolidated_state_dict",
    "load_consolidated_state_dict",
    "ep_metrics",
]

class DeepSpeedExperts(_DeepSpeedMoE):
    """This rank's routed experts, dressed as a DeepSpeed MoE module (see module docstring).

    `forward(x_ND, counts_L) -> y_ND` is `RoutedExperts.forward`; `len()` and
    `expert_weights(l)` go to the wrapped `RoutedExperts`.
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


def _moe_layers(model: nn.Module) -> Iterator[tuple[str, MoELayer]]:
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            yield name, module


def _ep_rank_and_group(ep_size: int):
    if ep_size == 1 and not dist.is_initialized():
        return 0, None
    ensure_ep_groups(ep_size)
    group = get_ep_group(ep_size)
    return dist.get_rank(group), group


def parallelize_moe(model: nn.Module, ep_size: int) -> nn.Module:
    """Post-construction EP step (collective when torch.distributed is initialised).

    For every `MoELayer`: keep only this rank's contiguous slice of routed experts
    [r*E/P, (r+1)*E/P) (r = rank in the EP group), wrap them in `DeepSpeedExperts`, and install
    the all-to-all dispatcher (ep_size > 1). Also at ep_size = 1: then the dispatcher stays local
    but the wrapper still makes DeepSpeed treat the layer as MoE, so checkpoints have the same
    layout at every EP size. Returns `model` (modified in place).

    `model` is either a full model (every rank built all experts from the same seed: EP=P then
    starts from exactly the EP=1 weights), or one built with `ep_rank=r, ep_size=P`.
    """
    layers = list(_moe_layers(model))
    if not layers:
        raise ValueError("parallelize_moe: the model has no MoELayer (dense model?); do not call it")
    if ep_size > 1 and not dist.is_initialized():
        raise RuntimeError(
            f"parallelize_moe(ep_size={ep_size}) needs torch.distributed initialised "
            "(deepspeed.init_distributed()) before it is called"
        )
    world = dist.get_world_size() if dist.is_initialized() else 1
    ep_rank, group = _ep_rank_and_group(ep_size)
    for name, layer in layers:
        validate_ep_size(ep_size, world, layer.cfg)
        E = layer.num_experts
        L = E // ep_size
        experts = layer.experts
        if isinstance(experts, DeepSpeedExperts):
            raise ValueError(f"parallelize_moe: layer {name} is already parallelized")
        if len(experts) == E:
            experts.keep_experts(ep_rank * L, (ep_rank + 1) * L)
        elif len(experts) != L or layer.local_expert_offset != ep_rank * L:
            raise ValueError(
                f"parallelize_moe: layer {name} holds {len(experts)} experts from offset "
                f"{layer.local_expert_offset}; expected all {E}, or the {L} experts of EP rank "
                f"{ep_rank} (offset {ep_rank * L}). Build it with ep_rank={ep_rank}, ep_size={ep_size}"
            )
        layer.experts = DeepSpeedExperts(experts, num_experts=E, ep_size=ep_size)
        layer.num_local_experts = L
        layer.local_expert_offset = ep_rank * L
        layer.dispatcher = AllToAllDispatcher(group, E) if ep_size > 1 else LocalDispatcher()
        # the model's router stats count distinct EP ranks per token with this
        if hasattr(layer, "stats") and hasattr(layer.stats, "num_ranks"):
            layer.stats.num_ranks = ep_size
    model.ep_size = ep_size
    return model


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW param groups, split for DeepSpeed MoE.

    Decay: every matrix (ndim >= 2: linear, embedding, router weights). No decay: norms, biases,
    other vectors. Then `split_params_into_different_moe_groups_for_optimizer` moves expert
    params into groups marked `moe=True` and named by their EDP group, which ZeRO-1/2 partition
    over the expert-data-parallel group instead of the whole data-parallel world.
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    groups = split_params_into_different_moe_groups_for_optimizer(groups)
    # an empty group makes ZeRO's flattening fail; drop them (e.g. a model without vectors)
    return [g for g in groups if len(g["params"]) > 0]


def ep_metrics(model: nn.Module, reset: bool = True) -> dict[str, float]:
    """Per MoE layer, this rank's all-to-all statistics since the last reset:
    `moe/layer{L}/a2a_bytes` (bytes sent to other ranks, forward dispatch + combine; backward
    moves as much again) and `moe/layer{L}/a2a_ranks_per_token` (mean distinct EP ranks a token
    was sent to). Empty for layers without an all-to-all dispatcher. Reduce across ranks
    (sum bytes, mean ranks) in the trainer."""
    out: dict[str, float] = {}
    for _, layer in _moe_layers(model):
        if isinstance(layer.dispatcher, AllToAllDispatcher):
            stats = layer.dispatcher.pop_stats(reset=reset)
            out[f"moe/layer{layer.layer_idx}/a2a_bytes"] = stats["a2a_bytes"]
            out[f"moe/layer{layer.layer_idx}/a2a_ranks_per_token"] = stats["ranks_per_token"]
    return out
