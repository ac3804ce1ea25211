"""Checkpoint key names under expert parallelism: local expert ids <-> global expert ids.

Three spellings of the same tensors (layer prefix `P` = `model.layers.{i}.mlp`):

- the model's state dict under EP (`parallelize_moe`): `P.experts.deepspeed_moe.experts.
  deepspeed_experts.{l}.<proj>.weight` with LOCAL expert id l (`LOCAL_EXPERT_KEY`, defined
  with the wrapper in parallel/deepspeed_experts.py; DeepSpeed's expert files use the same
  pattern with the GLOBAL id);
- the model's parameters: the two stacks `P.experts.deepspeed_moe.experts.deepspeed_experts.
  {gate_up_proj,down_proj}` ([L, 2H, D], [L, D, H]; `STACKED_EXPERT_PARAM`), the names in ZeRO's
  optimizer shards;
- the HF layout `P.experts.{e}.<proj>.weight` with GLOBAL e = ep_rank * L + l: what
  `consolidated_state_dict` returns and `load_consolidated_state_dict` takes, at any EP size.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn

from deepseek_moe.errors import CheckpointError
from deepseek_moe.parallel.deepspeed_experts import DS_EXPERTS_PREFIX, LOCAL_EXPERT_KEY, global_expert_key

STACKED_EXPERT_PARAM = re.compile(
    r"^(?P<layer>.*)\.experts\." + re.escape(DS_EXPERTS_PREFIX) + r"(?P<proj>gate_up_proj|down_proj)$"
)
"""A stacked expert parameter's name (the names in ZeRO's optimizer shards): groups `layer`, `proj`."""
_PLAIN_KEY = re.compile(r"^(?P<layer>.*)\.experts\.(?P<l>\d+)\.(?P<rest>.*)$")


def _local_to_global_key(key: str, offsets: dict[str, int]) -> str:
    """Model key -> HF key with a global expert id (non-expert keys unchanged)."""
    for pattern in (LOCAL_EXPERT_KEY, _PLAIN_KEY):
        m = pattern.match(key)
        if m and m["layer"] in offsets:
            return global_expert_key(m["layer"], offsets[m["layer"]] + int(m["l"]), m["rest"])
    return key


def _layer_offsets(model: nn.Module) -> dict[str, int]:
    """{MoE layer module name: global id of its first local expert}."""
    from deepseek_moe.model.moe import MoELayer

    return {
        name: module.local_expert_offset
        for name, module in model.named_modules()
        if isinstance(module, MoELayer)
    }


def consolidated_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full model state dict in HF layout (all E experts per layer, global ids), CPU tensors.

    Collective over each EP group (every rank must call it). The full dict is returned on the
    first rank of each EP group (so on global rank 0); the other ranks get {}. Non-expert tensors
    are data-parallel replicas and are taken from the local copy.
    """
    from deepseek_moe.parallel.groups import get_ep_group

    offsets = _layer_offsets(model)
    local = {
        _local_to_global_key(k, offsets): v.detach().cpu().clone() for k, v in model.state_dict().items()
    }
    ep_size = getattr(model, "ep_size", 1)
    if ep_size == 1:
        return local
    group = get_ep_group(ep_size)
    me = dist.get_rank(group)
    dst = dist.get_global_rank(group, 0)
    out: dict[str, torch.Tensor] = {} if me != 0 else dict(local)
    # local expert keys in the same order on every rank (same model, same local count)
    state = model.state_dict()
    local_keys = [k for k in state if LOCAL_EXPERT_KEY.match(k)]
    for key in local_keys:
        # gathered on the parameters' device (NCCL on GPUs), copied to CPU afterwards
        tensor = state[key].detach().contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(ep_size)] if me == 0 else None
        dist.gather(tensor, gathered, dst=dst, group=group)
        if me == 0:
            m = LOCAL_EXPERT_KEY.match(key)
            L = model.get_submodule(m["layer"]).num_local_experts
            for r, t in enumerate(gathered):
                out[global_expert_key(m["layer"], r * L + int(m["l"]), m["rest"])] = t.cpu()
    return out


def load_consolidated_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a `consolidated_state_dict` (HF layout, all experts) into `model` at ANY EP size:
    each rank keeps the experts it owns. Not collective. Strict: missing or unexpected keys
    (other than the experts owned by other ranks) raise."""
    offsets = _layer_offsets(model)
    own = model.state_dict()
    wanted = {_local_to_global_key(k, offsets): k for k in own}
    missing = [g for g in wanted if g not in state_dict]
    expert_keys_elsewhere = {
        k for k in state_dict if _PLAIN_KEY.match(k) and _PLAIN_KEY.match(k)["layer"] in offsets
    }
    unexpected = [k for k in state_dict if k not in wanted and k not in expert_keys_elsewhere]
    if missing or unexpected:
        raise CheckpointError(
            f"the weights do not fit the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); load them into a model "
            "built with the model config they were saved with"
        )
    model.load_state_dict({wanted[g]: state_dict[g] for g in wanted}, strict=True)
