"""`parallelize_moe`: the post-construction expert-parallel step, for a DeepSpeed engine.

    deepspeed.init_distributed()
    cfg.check_world(world_size)                        # EP rules, before any work
    torch.manual_seed(seed)                            # same full model on every rank
    model = parallelize_moe(DeepSeekMoEForCausalLM(cfg.model), ep_size)
    opt = torch.optim.AdamW(optimizer_param_groups(model, weight_decay), lr=...)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)

The model applies parallelism to itself (`DeepSeekMoEForCausalLM.apply_ep` -> `MoELayer.apply_ep`);
this adapter only brings what the model must not know about: the process groups (created through
DeepSpeed, `groups.py`), the all-to-all dispatcher (`dispatcher.py`) and DeepSpeed's MoE marker
around the routed experts (`deepspeed_experts.py`).

Scaling note: a full model is sliced, so every rank builds all experts once (it is what makes
EP=N weights equal EP=1 weights from one seed). For presets whose experts do not fit one rank,
build with `DeepSeekMoEForCausalLM(cfg, ep_rank=r, ep_size=P)` under `torch.device("meta")`,
materialise, `parallelize_moe`, then `load_consolidated_state_dict`.
"""

from __future__ import annotations

import torch.distributed as dist

from deepseek_moe.config.parallel import validate_ep_size
from typing import TypeVar

from deepseek_moe.model.dispatch import LocalDispatcher
from deepseek_moe.model.moe import MoELayer
from deepseek_moe.model.transformer import DeepSeekMoEForCausalLM
from deepseek_moe.parallel.deepspeed_experts import DeepSpeedExperts
from deepseek_moe.parallel.dispatcher import AllToAllDispatcher
from deepseek_moe.parallel.groups import ensure_ep_groups, get_ep_group

__all__ = ["parallelize_moe"]

Module = TypeVar("Module", DeepSeekMoEForCausalLM, MoELayer)


def parallelize_moe(model: Module, ep_size: int) -> Module:
    """Apply expert parallelism of size `ep_size` to `model` (in place; returns it): the whole
    model, or one `MoELayer` (benchmarks). Collective when torch.distributed is initialised.

    Every MoE layer keeps the experts of this rank's index r in its EP group
    ([r*E/P, (r+1)*E/P)), wrapped in `DeepSpeedExperts`, and gets an all-to-all dispatcher
    (ep_size > 1). Also at ep_size = 1: then the dispatcher stays local but the wrapper still
    makes DeepSpeed treat the layer as MoE, so checkpoints have the same layout at every EP size.
    """
    if ep_size > 1 and not dist.is_initialized():
        raise RuntimeError(
            f"parallelize_moe(ep_size={ep_size}) needs torch.distributed initialised "
            "(deepspeed.init_distributed()) before it is called"
        )
    world = dist.get_world_size() if dist.is_initialized() else 1
    moe = model.cfg if isinstance(model, MoELayer) else model.cfg.moe
    validate_ep_size(ep_size, world, moe)
    if ep_size == 1 and not dist.is_initialized():
        ep_rank, group = 0, None
    else:
        ensure_ep_groups(ep_size)
        group = get_ep_group(ep_size)
        ep_rank = dist.get_rank(group)
    E = moe.n_routed_experts if moe is not None else 0
    model.apply_ep(
        ep_rank=ep_rank,
        ep_size=ep_size,
        make_dispatcher=lambda: AllToAllDispatcher(group, E) if ep_size > 1 else LocalDispatcher(),
        wrap_experts=DeepSpeedExperts.wrapper(num_experts=E, ep_size=ep_size),
    )
    return model
