"""Expert parallelism: process groups, all-to-all dispatch, DeepSpeed integration.

Public API (imported lazily: `deepspeed` is only loaded when the DeepSpeed pieces are used):
    parallelize_moe(model, ep_size) -> model                 expert_parallel.py
    DeepSpeedExperts                                         deepspeed_experts.py
    optimizer_param_groups(model, weight_decay)             param_groups.py
    ep_metrics(model, reset=True)                            metrics.py
    ensure_ep_groups, expert_group_name                      groups.py
    AllToAllDispatcher                                       dispatcher.py
    all_to_all, exchange_counts                              all_to_all.py
The EP rules themselves (`validate_ep_size`) are config checks: deepseek_moe/config/parallel.py.
Weights and optimizer state at any EP size (`consolidated_state_dict`, resharding) live in
deepseek_moe/checkpoint/.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ensure_ep_groups": "groups",
    "expert_group_name": "groups",
    "parallelize_moe": "expert_parallel",
    "optimizer_param_groups": "param_groups",
    "ep_metrics": "metrics",
    "DeepSpeedExperts": "deepspeed_experts",
    "AllToAllDispatcher": "dispatcher",
    "all_to_all": "all_to_all",
    "exchange_counts": "all_to_all",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"deepseek_moe.parallel.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'deepseek_moe.parallel' has no attribute {name!r}")
