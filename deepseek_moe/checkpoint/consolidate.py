"""Turn a DeepSpeed checkpoint written under expert parallelism into one HF-layout state dict.

DeepSpeed writes, per tag directory: `mp_rank_00_model_states.pt` (`["module"]` = every
non-expert tensor: embeddings, attention, norms, router gates, shared experts) and one
`layer_{m}_expert_{e}_mp_rank_00_model_states.pt` per MoE layer m and GLOBAL expert e, whose keys
already carry the global id:
`model.layers.{L}.mlp.experts.deepspeed_moe.experts.deepspeed_experts.{e}.<proj>.weight`.
The EP size at save time does not matter: the files are the same for every EP size.

`consolidate_deepspeed_checkpoint(tag_dir)` reads them (one process, no torch.distributed) and
returns `model.layers.{L}.mlp.experts.{e}.<proj>.weight` keys, the layout of an EP=1
`DeepSeekMoEForCausalLM` and of `consolidated_state_dict`; load it with
`load_consolidated_state_dict(model, sd)` at any EP size. The optimizer state is read by
`zero_shards.py` (and moved onto another layout by `reshard.py`).

CLI: python -m deepseek_moe.checkpoint.consolidate RUN/checkpoints/step_00000100 --out model.pt
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Container
from typing import Optional

import torch

from deepseek_moe.errors import CheckpointError, report_user_errors
from deepseek_moe.parallel.deepspeed_experts import LOCAL_EXPERT_KEY, global_expert_key

__all__ = ["consolidate_deepspeed_checkpoint"]

_EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")


def consolidate_deepspeed_checkpoint(
    tag_dir: str, experts: Optional[Container[tuple[int, int]]] = None
) -> dict[str, torch.Tensor]:
    """HF-layout state dict (all experts, global ids) from a DeepSpeed tag directory.

    `experts`: read only these (MoE layer ordinal, global expert id) files (a rank that holds
    some experts needs no others); default all."""
    main_path = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if not os.path.exists(main_path):
        raise CheckpointError(
            f"{main_path} not found: pass a DeepSpeed tag directory (the one holding "
            "mp_rank_00_model_states.pt), e.g. RUN/checkpoints/step_00000100"
        )
    state = torch.load(main_path, map_location="cpu", weights_only=False)
    out: dict[str, torch.Tensor] = dict(state["module"])
    expert_files = sorted(
        f
        for f in os.listdir(tag_dir)
        if (m := _EXPERT_FILE.match(f)) and (experts is None or (int(m[1]), int(m[2])) in experts)
    )
    for name in expert_files:
        part = torch.load(os.path.join(tag_dir, name), map_location="cpu", weights_only=True)
        for key, tensor in part.items():
            m = LOCAL_EXPERT_KEY.match(key)
            if m is None:
                raise ValueError(f"{name}: unexpected key {key!r} (not a DeepSpeed expert key)")
            hf_key = global_expert_key(m["layer"], int(m["l"]), m["rest"])  # files hold global ids
            if hf_key in out:
                raise ValueError(f"{name}: expert tensor {hf_key} appears twice in the checkpoint")
            out[hf_key] = tensor
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tag_dir", help="DeepSpeed tag directory (holds mp_rank_00_model_states.pt)")
    parser.add_argument("--out", required=True, help="output .pt file (HF-layout state dict)")
    args = parser.parse_args(argv)
    sd = consolidate_deepspeed_checkpoint(args.tag_dir)
    tmp = args.out + ".tmp"
    torch.save(sd, tmp)
    os.replace(tmp, args.out)  # never leave a half-written file under the final name
    n_expert = sum(1 for k in sd if ".experts." in k)
    print(f"wrote {args.out}: {len(sd)} tensors ({n_expert} routed-expert tensors)")


if __name__ == "__main__":
    report_user_errors(main)
