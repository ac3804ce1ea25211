"""Expert parallelism: process groups, all-to-all dispatch, DeepSpeed integration.

Public API (imported lazily: `deepspeed` is only loaded when the DeepSpeed pieces are used):
    validate_ep_size(ep_size, world_size, moe_cfg)          groups.py
    parallelize_moe(model, ep_size) -> model                 deepspeed_moe.py
    optimizer_param_groups(model, weight_decay)             deepspeed_moe.py
    consolidated_state_dict(model) / load_consolidated_state_dict(model, sd)
    ep_metrics(model, reset=True)
    AllToAllDispatcher                                       dispatcher.py
    all_to_all, exchange_counts                              all_to_all.py
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "validate_ep_size": "groups",
    "ensure_ep_groups": "groups",
    "expert_group_name": "groups",
    "parallelize_moe": "deepspeed_moe",
    "optimizer_param_groups": "deepspeed_moe",
    "consolidated_state_dict": "deepspeed_moe",
    "load_consolidated_state_dict": "deepspeed_moe",
    "ep_metrics": "deepspeed_moe",
    "DeepSpeedExperts": "deepspeed_moe",
    "AllToAllDispatcher": "dispatcher",
    "all_to_all": "all_to_all",
    "exchange_counts": "all_to_all",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"deepseek_moe.parallel.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'deepseek_moe.parallel' has no attribute {name!r}")
