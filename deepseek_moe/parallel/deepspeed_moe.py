"""Model weights at any EP size: the HF-layout state dict with global expert ids.

    sd = consolidated_state_dict(model)               # collective; full HF-keyed dict on rank 0
    load_consolidated_state_dict(model, sd)            # any EP size, every rank passes the full sd

Keys under `DeepSpeedExperts` (see deepspeed_experts.py) name LOCAL experts
`model.layers.{L}.mlp.experts.deepspeed_moe.experts.deepspeed_experts.{l}.{gate,up,down}_proj.weight`;
the consolidated dict uses the HF layout `model.layers.{L}.mlp.experts.{e}...` with GLOBAL
e = ep_rank * L + l. The other parts of the DeepSpeed integration live next door:
`expert_parallel.py` (parallelize_moe), `deepspeed_experts.py` (the MoE wrapper),
`param_groups.py` (optimizer groups), `metrics.py` (all-to-all statistics).
"""

from __future__ import annotations

import re
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from deepseek_moe.model.moe import MoELayer
from deepseek_moe.parallel.deepspeed_experts import LOCAL_EXPERT_KEY
from deepseek_moe.parallel.groups import get_ep_group

__all__ = [
    "consolidated_state_dict",
    "load_consolidated_state_dict",
]


def _moe_layers(model: nn.Module) -> Iterator[tuple[str, MoELayer]]:
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            yield name, module


# ---- weights at any EP size -------------------------------------------------------------------

_LOCAL_KEY = LOCAL_EXPERT_KEY  # the one definition of a wrapped expert's key: deepspeed_experts.py
_PLAIN_KEY = re.compile(r"^(?P<layer>.*)\.experts\.(?P<l>\d+)\.(?P<rest>.*)$")


def _local_to_global_key(key: str, offsets: dict[str, int]) -> str:
    """Model key -> HF key with a global expert id (non-expert keys unchanged)."""
    for pattern in (_LOCAL_KEY, _PLAIN_KEY):
        m = pattern.match(key)
        if m and m["layer"] in offsets:
            return f"{m['layer']}.experts.{offsets[m['layer']] + int(m['l'])}.{m['rest']}"
    return key


def _layer_offsets(model: nn.Module) -> dict[str, int]:
    return {name: layer.local_expert_offset for name, layer in _moe_layers(model)}


def consolidated_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full model state dict in HF layout (all E experts per layer, global ids), CPU tensors.

    Collective over each EP group (every rank must call it). The full dict is returned on the
    first rank of each EP group (so on global rank 0); the other ranks get {}. Non-expert tensors
    are data-parallel replicas and are taken from the local copy.
    """
    offsets = _layer_offsets(model)
    local = {_local_to_global_key(k, offsets): v.detach().cpu().clone() for k, v in model.state_dict().items()}
    ep_size = getattr(model, "ep_size", 1)
    if ep_size == 1:
        return local
    group = get_ep_group(ep_size)
    me = dist.get_rank(group)
    dst = dist.get_global_rank(group, 0)
    out: dict[str, torch.Tensor] = {} if me != 0 else dict(local)
    # local expert keys in the same order on every rank (same model, same local count)
    state = model.state_dict()
    local_keys = [k for k in state if _LOCAL_KEY.match(k)]
    for key in local_keys:
        # gathered on the parameters' device (NCCL on GPUs), copied to CPU afterwards
        tensor = state[key].detach().contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(ep_size)] if me == 0 else None
        dist.gather(tensor, gathered, dst=dst, group=group)
        if me == 0:
            m = _LOCAL_KEY.match(key)
            L = model.get_submodule(m["layer"]).num_local_experts
            for r, t in enumerate(gathered):
                out[f"{m['layer']}.experts.{r * L + int(m['l'])}.{m['rest']}"] = t.cpu()
    return out


def load_consolidated_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a `consolidated_state_dict` (HF layout, all experts) into `model` at ANY EP size:
    each rank keeps the experts it owns. Not collective. Strict: missing or unexpected keys
    (other than the experts owned by other ranks) raise."""
    offsets = _layer_offsets(model)
    own = model.state_dict()
    wanted = {_local_to_global_key(k, offsets): k for k in own}
    missing = [g for g in wanted if g not in state_dict]
    expert_keys_elsewhere = {k for k in state_dict if _PLAIN_KEY.match(k) and _PLAIN_KEY.match(k)["layer"] in offsets}
    unexpected = [k for k in state_dict if k not in wanted and k not in expert_keys_elsewhere]
    if missing or unexpected:
        raise KeyError(
            f"load_consolidated_state_dict: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); is this checkpoint from "
            "the same model config?"
        )
    model.load_state_dict({wanted[g]: state_dict[g] for g in wanted}, strict=True)
