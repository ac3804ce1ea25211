"""Per-parameter fp32 master weights and Adam moments out of ZeRO-1/2 and bf16 optimizer shards.

    shards = ZeroShards.open(tag_dir, ep_size=2)     # None: no ZeRO / bf16 optimizer files
    shards.step                                      # Adam's step count (the same in every group)
    shards.read(name, "exp_avg")                     # the whole parameter, flattened, fp32
    shards.read(name, "fp32", start, numel)          # or a slice of it (only that is read)

How DeepSpeed stores them: per data-parallel rank r, `[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_
states.pt` holds `optimizer_state_dict` with, per param group g,
`single_partition_of_fp32_groups[g]` (this rank's slice of the group's flat fp32 buffer),
`base_optimizer_state` (the torch optimizer's state of that flat slice: `exp_avg`, `exp_avg_sq`,
`step`; a torch `state_dict()` keyed by group index, or a list per group in DeepSpeed's
"elastic" format) and `param_slice_mappings[g]` (parameter name -> (start, numel) of its piece
in the slice). A parameter's pieces, in rank order, are its flattened values. Dense groups are
partitioned over all ranks; expert groups over the expert-data-parallel group (the ranks with
the same EP rank, `rank % ep_size`: EP groups are consecutive ranks).

Expert parameters are the stacks of one EP rank's L local experts (`[L, 2H, D]`, `[L, D, H]`;
`keys.STACKED_EXPERT_PARAM`). `read` returns them as the GLOBAL stack of all E experts
(`[E, 2H, D]` flattened: the EP ranks' stacks in EP-rank order, expert e = ep_rank * L + l), so
a reader at another EP size takes experts [offset, offset + L') out of it.

Files are opened memory-mapped: a reader pages in only the slices it reads.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from deepseek_moe.checkpoint.keys import STACKED_EXPERT_PARAM
from deepseek_moe.errors import CheckpointError

OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
STATES = ("fp32", "exp_avg", "exp_avg_sq")
"""What `read` returns: the fp32 master weight, Adam's first and second moments."""


@dataclass(frozen=True)
class _Piece:
    rank: int
    group: int
    start: int  # in the rank's flat slice of the group
    numel: int


class ZeroShards:
    """The optimizer shards of one checkpoint, indexed by parameter name (see module doc)."""

    def __init__(
        self,
        tag_dir: Path,
        flats: list[dict[str, list[torch.Tensor]]],
        pieces: dict[str, list[_Piece]],
        step: Optional[float],
    ):
        self.tag_dir = tag_dir
        self._flats = flats  # per old rank: {state: [flat slice per group]}
        self._pieces = pieces  # name -> pieces in flattened order (experts: global order)
        self.step = step

    @classmethod
    def open(cls, tag_dir: Path, *, ep_size: int) -> Optional["ZeroShards"]:
        """None when the checkpoint has no ZeRO-1/2 or bf16 optimizer shards (ZeRO-0 keeps
        the optimizer state without parameter names)."""
        files = sorted(
            (int(m[1]), Path(tag_dir) / name) for name in os.listdir(tag_dir) if (m := OPTIM_FILE.match(name))
        )
        if not files:
            return None
        if [rank for rank, _ in files] != list(range(len(files))):
            raise CheckpointError(
                f"{tag_dir}: optimizer shards of ranks {[r for r, _ in files]}; "
                "expected 0..N-1. Restore the missing files from a copy"
            )
        flats, by_key, steps = [], {}, set()
        for rank, path in files:
            osd = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
            fp32_groups = osd.get("single_partition_of_fp32_groups")
            mappings = osd.get("param_slice_mappings")
            if fp32_groups is None or mappings is None:
                return None  # not a ZeRO / bf16 optimizer: the module weights are the masters
            states = _group_states(osd.get("base_optimizer_state"), len(fp32_groups))
            flat = {"fp32": list(fp32_groups)}
            for key in ("exp_avg", "exp_avg_sq"):
                if all(key in s for s in states):
                    flat[key] = [s[key] for s in states]
            steps.update(float(s["step"]) for s in states if "step" in s)
            flats.append(flat)
            for group, mapping in enumerate(mappings):
                for name, frag in mapping.items():
                    # experts: pieces of EP rank r's stack, joined below in EP-rank order
                    key = (name, rank % ep_size) if STACKED_EXPERT_PARAM.match(name) else (name, 0)
                    by_key.setdefault(key, []).append(_Piece(rank, group, frag.start, frag.numel))
        if len(steps) > 1:
            raise CheckpointError(
                f"{tag_dir}: the optimizer shards disagree on Adam's step count "
                f"({sorted(steps)}); the checkpoint is inconsistent"
            )
        pieces: dict[str, list[_Piece]] = {}
        for name, ep_rank in sorted(by_key):
            pieces.setdefault(name, []).extend(by_key[(name, ep_rank)])
        return cls(Path(tag_dir), flats, pieces, steps.pop() if steps else None)

    def names(self) -> list[str]:
        """Parameter names (the model's; expert stacks by their local-stack name)."""
        return list(self._pieces)

    def has(self, state: str) -> bool:
        return all(state in flat for flat in self._flats)

    def numel(self, name: str) -> int:
        """Values of the parameter (experts: of the global stack)."""
        return sum(p.numel for p in self._pieces[name])

    def read(self, name: str, state: str, start: int = 0, numel: Optional[int] = None) -> torch.Tensor:
        """Values [start, start + numel) of the flattened parameter `name` (experts: of the
        global stack), as a new fp32 tensor; only the overlapping pieces are read."""
        if state not in STATES or not self.has(state):
            raise CheckpointError(
                f"{self.tag_dir}: the optimizer shards hold no {state!r}; was "
                "the checkpoint saved before the first optimizer step?"
            )
        total = self.numel(name)
        numel = total - start if numel is None else numel
        if start < 0 or numel < 0 or start + numel > total:
            raise ValueError(f"{name}: slice [{start}, {start + numel}) outside its {total} values")
        out = torch.empty(numel, dtype=torch.float32)
        at = 0  # offset of the current piece in the flattened parameter
        for piece in self._pieces[name]:
            lo, hi = max(start, at), min(start + numel, at + piece.numel)
            if lo < hi:
                src = self._flats[piece.rank][state][piece.group]
                out[lo - start : hi - start] = src.narrow(0, piece.start + lo - at, hi - lo)
            at += piece.numel
        return out


def _group_states(base: Any, n_groups: int) -> list[dict[str, Any]]:
    """The torch optimizer's state of each group's flat slice, whichever format DeepSpeed saved."""
    if base is None:
        return [{} for _ in range(n_groups)]
    if isinstance(base, dict):  # torch state_dict(): state keyed by param index = group index
        return [base["state"].get(g, {}) for g in range(n_groups)]
    return list(base)  # DeepSpeed's elastic format: one state dict per group
