"""Shared pieces of the multi-process EP tests: a tiny config, per-rank batches, and a
single-process EP=1 reference (a loop over the ranks' micro-batches in ONE process)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from deepseek_moe.config.model import ModelConfig, MoEConfig
from deepseek_moe.model.transformer import DeepSeekMoEForCausalLM

SEED = 1234
B, S, V = 2, 8, 64


def tiny_config(**moe_overrides) -> ModelConfig:
    """Routing groups = the 2 EP ranks of the 2-process tests (the device/comm losses need
    n_groups == ep_size); 4-rank EP tests override n_groups."""
    moe = dict(
        n_routed_experts=8,
        n_shared_experts=1,
        top_k=2,
        moe_intermediate_size=8,
        n_groups=2,
        topk_groups=1,
        aux_loss_alpha=0.01,
        seq_aux=True,
        device_aux_alpha=0.01,
        comm_aux_alpha=0.01,
        z_loss_coef=1e-3,
    )
    moe.update(moe_overrides)
    return ModelConfig(
        vocab_size=V,
        hidden_size=16,
        num_layers=3,
        num_heads=2,
        intermediate_size=32,
        first_k_dense=1,
        max_seq_len=S,
        init_std=0.2,
        moe=MoEConfig(**moe),
    )


def build_full_model(cfg: ModelConfig, seed: int = SEED, **options) -> DeepSeekMoEForCausalLM:
    """The model from `seed` (the same weights whatever the `options`, e.g. loss_chunk_tokens)."""
    torch.manual_seed(seed)
    return DeepSeekMoEForCausalLM(cfg, **options)


def micro_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids_BS, labels_BS) of `rank` at `step`; same on every process."""
    g = torch.Generator().manual_seed(10_000 * step + rank)
    window = torch.randint(0, V, (B, S + 1), generator=g)
    return window[:, :-1], window[:, 1:]


def set_bias(model, bias_by_expert: dict[int, float]) -> None:
    """Selection-only router bias (needs bias_update_rate > 0): a large negative value keeps an
    expert from ever being chosen."""
    for layer in model.moe_layers():
        for e, b in bias_by_expert.items():
            layer.gate.e_score_correction_bias[e] = b


def grads_by_state_key(model) -> dict[str, torch.Tensor]:
    """Each parameter's gradient (zeros if none) under its state-dict key(s): stacked expert
    gradients split per expert, like the weights in `state_dict()`."""
    from deepseek_moe.model.experts import stacked_to_per_expert

    grads = {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }
    return stacked_to_per_expert(grads)


def hf_grads(model) -> dict[str, torch.Tensor]:
    """Gradients after the EP run, as the EP=1 model would hold them (HF keys, all experts):
    non-expert grads summed over the world, expert grads summed over the EDP group then gathered
    over the EP group. Collective."""
    from deepseek_moe.parallel.deepspeed_experts import LOCAL_EXPERT_KEY, global_expert_key
    from deepseek_moe.parallel.groups import get_edp_group, get_ep_group

    P = model.ep_size
    out = {}
    for name, g in grads_by_state_key(model).items():
        m = LOCAL_EXPERT_KEY.match(name)
        if m is None:
            dist.all_reduce(g)
            out[name] = g
            continue
        dist.all_reduce(g, group=get_edp_group(P))
        parts = [torch.empty_like(g) for _ in range(P)]
        dist.all_gather(parts, g, group=get_ep_group(P))
        L = model.get_submodule(m["layer"]).num_local_experts
        for r, t in enumerate(parts):
            out[global_expert_key(m["layer"], r * L + int(m["l"]), m["rest"])] = t
    return out


def reference_forward_backward(cfg, world: int, bias=None):
    """EP=1 in one process: per-rank outputs, and grads of mean_r(loss_r)."""
    model = build_full_model(cfg)
    if bias:
        set_bias(model, bias)
    outs = []
    total = 0.0
    for r in range(world):
        ids, labels = micro_batch(0, r)
        o = model(ids, labels)
        outs.append({"logits": o.logits_BSV.detach(), "loss": o.loss.detach(), "aux": o.aux_loss.detach()})
        total = total + o.loss / world
    total.backward()
    return outs, grads_by_state_key(model)
