"""The ladder's variants (the DeepSeekMoE paper's Table 1 / Fig. 3 ablation at small scale) and
their parameter and FLOP counts from `deepseek_moe.summary`.

Every variant shares the attention stack, vocabulary, sequence length and initialisation
(bench/ablation/conf/model/ablation_*.yaml); they differ only in the FFN of each layer:

| variant        | FFN per layer                                         | activated | total |
|----------------|-------------------------------------------------------|-----------|-------|
| dense_half     | one SwiGLU of width F                                 | F         | F     |
| gshard         | 16 routed experts of width F, top-2                   | 2F        | 16F   |
| gshard_shared  | 1 shared + 15 routed of width F, top-1                | 2F        | 16F   |
| deepseek_moe   | 1 shared + 63 routed of width F/4, top-7              | 2F        | 16F   |
| dense_equal    | one SwiGLU of width 2F (a second reference)           | 2F        | 2F    |
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

CONF_DIR = Path(__file__).resolve().parent / "conf"


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    routed_experts: int = 0
    """0: dense."""

    @property
    def moe(self) -> bool:
        return self.routed_experts > 0

    @property
    def model_yaml(self) -> Path:
        return CONF_DIR / "model" / f"ablation_{self.name}.yaml"

    @property
    def preset(self) -> str:
        """`model=` value for `train.py --config-dir bench/ablation/conf`."""
        return f"ablation_{self.name}"


VARIANTS = {
    v.name: v
    for v in (
        Variant("dense_half", "Dense (half activated width)"),
        Variant("gshard", "GShard (top-2 of 16)", routed_experts=16),
        Variant("gshard_shared", "GShard + shared expert", routed_experts=15),
        Variant("deepseek_moe", "DeepSeekMoE (1 shared + 63 routed, top-7)", routed_experts=63),
        Variant("dense_equal", "Dense (equal activated width)"),
    )
}
SEEDED = ("gshard", "deepseek_moe")
"""The pair the paper's claim is about: trained with every seed; the others with the first."""

ORDERINGS = (
    ("dense_half", "gshard"),
    ("gshard", "gshard_shared"),
    ("gshard_shared", "deepseek_moe"),
    ("gshard", "deepseek_moe"),
)
"""The paper's orderings of validation loss, (higher, lower): Table 1 and Fig. 3."""

MOE_MATCH_TOLERANCE = 0.02
FIG4_RATIO_DENOMINATOR = 16
"""Fig. 4 disables routed experts in steps of 1/16 of a variant's routed experts (the paper's
x-axis is the ratio disabled, so the variants lose the same share of expert parameters)."""


def summaries(names: Sequence[str], *, vocab_size: int, seq_len: int) -> dict[str, dict]:
    """`deepseek_moe.summary` of each variant at the run's vocab and sequence length."""
    from deepseek_moe.summary import load_model_config, summarize

    out = {}
    for name in names:
        cfg = load_model_config(str(VARIANTS[name].model_yaml), [f"vocab_size={vocab_size}"])
        s = summarize(cfg, seq_len)
        out[name] = {k: s[k] for k in ("total_params", "active_params", "flops_per_token")}
        out[name]["routed_experts"] = s["experts"]["routed"] if "experts" in s else 0
    return out


def moe_mismatches(summary: dict[str, dict], tolerance: float = MOE_MATCH_TOLERANCE) -> list[str]:
    """Each count on which the MoE variants differ by more than `tolerance` (relative to the
    smallest); empty when they are matched as the paper requires."""
    moe = [n for n in summary if VARIANTS[n].moe]
    problems = []
    for key in ("total_params", "active_params", "flops_per_token"):
        values = [summary[n][key] for n in moe]
        if values and max(values) > min(values) * (1 + tolerance):
            problems.append(
                f"{key}: "
                + ", ".join(f"{n} {summary[n][key]:,}" for n in moe)
                + f" differ by more than {tolerance:.0%}"
            )
    return problems
