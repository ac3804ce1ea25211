"""What the target formats cannot represent, and the flags that accept a documented change.

Both targets compute softmax top-k routing over all routed experts with unscaled gates (plus
an optional renormalisation), no selection bias, and never drop tokens at inference. A model
trained with something else is refused with every difference named, unless a flag accepts the
documented change for that difference:

- `drop_group_limit`: device-limited routing (moe.topk_groups < moe.n_groups) becomes plain
  top-k over all experts at inference. Tokens whose top-k already lies in their best M groups
  (most tokens of a balanced model) are unaffected; the others may pick other experts. Neither
  target has a group limit (DeepSeek's release code and vLLM's `DeepseekForCausalLM` route with
  plain top-k); DeepSeek-V2's `group_limited_greedy` exists only in the V2/V3 formats, whose MLA
  attention (a normalised low-rank KV, a separate RoPE key) cannot represent ours.
- `drop_router_bias`: the V3 selection bias (moe.bias_update_rate > 0) is left out, so experts
  are selected by affinity alone.

Not differences: capacity dropping (ours drops only in training, never at inference), balance
losses, z-loss and router noise (training only).
"""

from __future__ import annotations

from dataclasses import dataclass

from deepseek_moe.config.model import ModelConfig
from deepseek_moe.errors import ExportError


@dataclass(kw_only=True)
class Accept:
    """Documented changes the user accepts (CLI flags of the same names)."""

    drop_group_limit: bool = False
    """Route with plain top-k at inference instead of device-limited routing."""
    drop_router_bias: bool = False
    """Leave out the V3 selection bias."""


def check_representable(cfg: ModelConfig, fmt: str, accept: Accept, *, head_dim_free: bool) -> list[str]:
    """Raise ExportError naming every difference `fmt` cannot represent; return the accepted
    changes (for the export's report). `head_dim_free`: the target has a head_dim field."""
    refused, accepted = [], []
    moe = cfg.moe
    if moe is not None:
        if moe.topk_groups < moe.n_groups:
            change = (
                f"device-limited routing (moe.topk_groups={moe.topk_groups} < "
                f"moe.n_groups={moe.n_groups}) becomes plain top-{moe.top_k}"
            )
            (accepted if accept.drop_group_limit else refused).append(
                change if accept.drop_group_limit else change + " [--drop-group-limit accepts]"
            )
        if moe.bias_update_rate > 0:
            change = f"the V3 selection bias (moe.bias_update_rate={moe.bias_update_rate}) is dropped"
            (accepted if accept.drop_router_bias else refused).append(
                change if accept.drop_router_bias else change + " [--drop-router-bias accepts]"
            )
        if moe.scoring_func != "softmax":
            refused.append(f"moe.scoring_func={moe.scoring_func!r} (the format scores with softmax)")
        if moe.routed_scaling_factor != 1.0:
            refused.append(
                f"moe.routed_scaling_factor={moe.routed_scaling_factor} (the format has no gate scaling)"
            )
    if not head_dim_free and cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        refused.append(
            f"model.head_dim={cfg.head_dim} != hidden_size/num_heads="
            f"{cfg.hidden_size // cfg.num_heads} (the format derives head_dim)"
        )
    if refused:
        raise ExportError(
            f"--format {fmt} cannot represent this model: "
            + "; ".join(refused)
            + ". Use the other --format if it can, or accept the change with the "
            "named flag"
        )
    return accepted
