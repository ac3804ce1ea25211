"""Expert parallelism: process groups, all-to-all dispatch, DeepSpeed integration.

Import from the modules (no re-exports here: importing one module loads only what it needs;
`deepspeed` is loaded by `expert_parallel` and `deepspeed_experts`, not by the others):
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
