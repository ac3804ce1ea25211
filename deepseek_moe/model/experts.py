"""Routed experts: one layer's L local SwiGLU experts, stored stacked, computed grouped.

Shapes: N token copies (grouped by local expert), D model dim, H expert hidden, L local experts.

Parameters (the layout of HF transformers 5.x `DeepseekV2Experts`):
- `gate_up_proj` [L, 2H, D]: expert l's gate rows `[l, :H]`, then its up rows `[l, H:]`;
- `down_proj` [L, D, H].

The PUBLIC layout stays per expert: `state_dict()` yields `{l}.gate_proj.weight` [H, D],
`{l}.up_proj.weight` [H, D] and `{l}.down_proj.weight` [D, H] (views of the stacks), and
`load_state_dict()` accepts those keys (or the stacked ones) and stacks them back. So every
checkpoint, the DeepSpeed expert files and the consolidated HF dict are unchanged by the
storage; docs/design.md explains why this seam was chosen over DeepSpeed's AutoEP format.

Compute (`impl`, from `moe.experts_impl`):
- "grouped_mm": one grouped GEMM per projection (`grouped_mm(x_ND, W^T, offs)` with the group
  ends `offs` built on the device from counts_L): the number of ops does not grow with L and
  nothing waits for the host, where torch has a native kernel (see `grouped_mm_is_native`).
- "loop": a per-expert loop with a hand-written backward (`deepseek_moe/model/kernels/
  expert_loop.py`): one host read of the counts per forward, then plain matmuls.
- "auto": "grouped_mm" where it is native, "loop" everywhere else (`resolve_impl`).
Both compute the same function; every expert gets a gradient (zeros when it had no tokens).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

PROJ_NAMES = ("gate_proj", "up_proj", "down_proj")

# torch.nn.functional.grouped_mm is public from torch 2.9 on; older builds only have the private
# op (same signature). None: no grouped GEMM at all, the loop kernel is used instead.
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@functools.lru_cache(maxsize=None)
def cuda_capability(index: int) -> tuple[int, int]:
    """(major, minor) compute capability of CUDA device `index` (cached: read once per device)."""
    return torch.cuda.get_device_capability(index)


def grouped_mm_is_native(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch runs grouped_mm on `device` as ONE kernel with no host sync.

    NOTE: on CUDA, torch's kernel covers bf16 on sm90 and sm100 (Hopper, datacenter Blackwell)
    only. Any other dtype or GPU takes torch's fallback, which copies the group offsets to the
    host on every call (three calls per projection per step: six syncs per MoE layer) and loops
    over the groups; its meta kernel also rejects non-bf16 inputs, so torch.compile cannot trace
    it. On CPU it always loops over the groups."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return False
    return cuda_capability(device.index if device.index is not None else torch.cuda.current_device())[0] in (
        9,
        10,
    )


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype, aligned: bool = True) -> str:
    """The compute path actually run for `impl` ("grouped_mm" or "loop") on `device` in `dtype`.

    "auto": grouped_mm where torch has a native kernel (`grouped_mm_is_native`), else the loop
    kernel (one host read per forward instead of the fallback's six, and plain matmuls; on CPU
    also the faster path in training, see bench/reports/). `aligned`: both widths are multiples
    of 8, as grouped_mm requires."""
    if impl == "auto":
        impl = "grouped_mm" if aligned and grouped_mm_is_native(device, dtype) else "loop"
    if impl == "grouped_mm" and _grouped_mm is None:
        return "loop"  # fallback: this torch build has no grouped GEMM
    return impl


def per_expert_tensors(
    gate_up_L2HD: torch.Tensor, down_LDH: torch.Tensor, first: int = 0
) -> dict[str, torch.Tensor]:
    """Stacked tensors (weights or their gradients) -> `{e}.{gate,up,down}_proj.weight` views,
    e = first + l. The single definition of the per-expert key format."""
    H = down_LDH.shape[-1]
    out: dict[str, torch.Tensor] = {}
    for l in range(down_LDH.shape[0]):
        e = first + l
        out[f"{e}.gate_proj.weight"] = gate_up_L2HD[l, :H]
        out[f"{e}.up_proj.weight"] = gate_up_L2HD[l, H:]
        out[f"{e}.down_proj.weight"] = down_LDH[l]
    return out


class RoutedExperts(nn.Module):
    def __init__(self, num_experts: int, dim: int, hidden: int, impl: str = "auto") -> None:
        super().__init__()
        if impl == "grouped_mm" and (dim % 8 or hidden % 8):
            # NOTE: grouped_mm needs 16-byte aligned strides (8 elements covers fp32 and bf16).
            raise ValueError(
                f"experts_impl='grouped_mm' needs hidden_size ({dim}) and moe_intermediate_size "
                f"({hidden}) divisible by 8: change the widths or use experts_impl='loop'."
            )
        self.impl, self.dim, self.hidden = impl, dim, hidden
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.register_state_dict_post_hook(_split_state_dict)
        self.register_load_state_dict_pre_hook(_stack_state_dict)

    def __len__(self) -> int:
        return self.down_proj.shape[0]

    def expert_weights(self, l: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [H, D], up [H, D], down [D, H]) of local expert l: views of the stacks."""
        H = self.hidden
        return self.gate_up_proj[l, :H], self.gate_up_proj[l, H:], self.down_proj[l]

    @torch.no_grad()
    def keep_experts(self, start: int, stop: int) -> None:
        """Keep only local experts [start, stop) (expert parallelism slices a full layer)."""
        self.gate_up_proj = nn.Parameter(self.gate_up_proj[start:stop].clone())
        self.down_proj = nn.Parameter(self.down_proj[start:stop].clone())

    def forward(self, x_ND: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        """x_ND grouped contiguously by local expert (counts_L rows each) -> y_ND, same order."""
        if counts_L.numel() != len(self):
            raise ValueError(
                f"counts_L has {counts_L.numel()} entries but this rank holds {len(self)} experts."
            )
        aligned = self.dim % 8 == 0 and self.hidden % 8 == 0
        if resolve_impl(self.impl, x_ND.device, self.gate_up_proj.dtype, aligned) == "loop":
            from deepseek_moe.model.kernels.expert_loop import expert_loop

            return expert_loop(x_ND, counts_L, self.gate_up_proj, self.down_proj)
        return grouped_swiglu(x_ND, counts_L, self.gate_up_proj, self.down_proj)


def grouped_swiglu(
    x_ND: torch.Tensor, counts_L: torch.Tensor, gate_up_L2HD: torch.Tensor, down_LDH: torch.Tensor
) -> torch.Tensor:
    """SwiGLU of each row with its expert's weights: two grouped GEMMs, no host sync.

    grouped_mm multiplies rows [offs[l-1], offs[l]) of x by mat2[l], mat2 as (groups, in, out):
    the transposed views of the [out, in] stacks. The cumsum stays on x's device.
    """
    offs_L = torch.cumsum(counts_L.to(device=x_ND.device), dim=0).to(torch.int32)
    h_N2H = _grouped_mm(x_ND, gate_up_L2HD.transpose(-2, -1), offs=offs_L)
    g_NH, u_NH = h_N2H.chunk(2, dim=-1)
    y_ND = _grouped_mm(F.silu(g_NH) * u_NH, down_LDH.transpose(-2, -1), offs=offs_L)
    return _GradContiguous.apply(y_ND)


class _GradContiguous(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    NOTE: grouped_mm's CPU backward rejects stride-0 (expanded) output grads, e.g. from
    `y.sum().backward()` (tests/model/test_experts.py backpropagates exactly that).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


# ---- the per-expert public layout -------------------------------------------------------------


def _split_state_dict(module: RoutedExperts, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: replace the two stacks by per-expert views (no copy)."""
    gate_up = state_dict.pop(prefix + "gate_up_proj")
    down = state_dict.pop(prefix + "down_proj")
    for key, tensor in per_expert_tensors(gate_up, down).items():
        state_dict[prefix + key] = tensor


def _stack_state_dict(
    module: RoutedExperts,
    state_dict: dict,
    prefix: str,
    local_metadata,
    strict,
    missing_keys,
    unexpected_keys,
    error_msgs,
) -> None:
    """load_state_dict pre-hook: stack per-expert tensors into `gate_up_proj` / `down_proj`.

    If any expert key is absent the stacks are not built, so the load reports the stacked key
    as missing (strict) or leaves the weights untouched (non-strict)."""
    if prefix + "gate_up_proj" in state_dict:
        return
    L = len(module)
    keys = [[prefix + f"{l}.{name}.weight" for name in PROJ_NAMES] for l in range(L)]
    if not all(k in state_dict for row in keys for k in row):
        return
    rows = [[state_dict.pop(k) for k in row] for row in keys]
    state_dict[prefix + "gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u, _ in rows])
    state_dict[prefix + "down_proj"] = torch.stack([d for _, _, d in rows])


def stacked_to_per_expert(
    state_dict: dict[str, torch.Tensor], first: Optional[dict[str, int]] = None
) -> dict[str, torch.Tensor]:
    """Any dict keyed like `named_parameters()` (e.g. gradients) with `<m>.gate_up_proj` /
    `<m>.down_proj` stacks -> the per-expert keys `<m>.{e}.<proj>.weight`, e = first[m] + l."""
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(".gate_up_proj")]:
        module = key[: -len(".gate_up_proj")]
        gate_up, down = out.pop(key), out.pop(module + ".down_proj")
        offset = (first or {}).get(module, 0)
        out.update({f"{module}.{k}": v for k, v in per_expert_tensors(gate_up, down, offset).items()})
    return out
