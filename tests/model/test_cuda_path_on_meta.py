"""The CUDA path, checked on CPU: what a GPU run executes, traced on the meta device.

On the meta device torch runs its shape, dtype, stride and alignment checks (the meta kernels,
the same ones torch.compile traces with) without computing anything, and any host read of a
value fails. So these tests catch, without a GPU:
- a bf16 grouped GEMM whose shapes, dtypes or strides torch's `_grouped_mm` refuses, at every
  preset's real widths and local expert counts, forward and backward;
- a host sync anywhere in a dropless training step of the model (`.item()`, `.tolist()`,
  boolean indexing: "cannot be called on meta tensors");
- a tensor created without its inputs' device (it would be a CPU tensor on a GPU run): meta
  and CPU tensors refuse to mix.

What they cannot cover (a CPU build of torch has no CUDA device guard, so even a fake CUDA
tensor under FakeTensorMode fails at its first view or autograd node): the CUDA kernels
themselves and their numerics (groups with zero rows included: the meta kernel does not read
the offsets), NCCL, the DeepSpeed engine and the memory actually allocated. tests/gpu/ and
bench/gpu/acceptance.sh check those on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from deepseek_moe.model import experts as experts_mod
from deepseek_moe.model.attention import choose_attn_impl
from deepseek_moe.model.experts import RoutedExperts, grouped_swiglu, resolve_impl
from deepseek_moe.summary import load_model_config

META = torch.device("meta")
BF16 = torch.bfloat16

# preset -> EP sizes to check (each divides the preset's routed experts; 1 = all experts local)
PRESETS = {
    "deepseek_moe_tiny": (1, 2, 16),
    "deepseek_moe_16b": (1, 2, 8, 64),
    "deepseek_moe_145b": (1, 4, 16, 128),
}
TOKENS = 4096  # tokens of one micro-batch on one rank (the 16B/145B sequence length)


def _moe(name):
    return load_model_config(name).moe, load_model_config(name).hidden_size


def _grouped_step(L: int, D: int, H: int, N: int, dtype=BF16) -> tuple[torch.Tensor, ...]:
    """Forward + backward of the grouped experts on meta tensors: N copies over L local experts."""
    gate_up = torch.empty(L, 2 * H, D, device=META, dtype=dtype, requires_grad=True)
    down = torch.empty(L, D, H, device=META, dtype=dtype, requires_grad=True)
    x = torch.empty(N, D, device=META, dtype=dtype, requires_grad=True)
    counts = torch.empty(L, device=META, dtype=torch.int64)
    y = grouped_swiglu(x, counts, gate_up, down)
    y.sum().backward()  # an expanded (stride-0) gradient, as a plain `.sum()` loss gives
    return y, x.grad, gate_up.grad, down.grad


@pytest.mark.parametrize(
    "name,ep_size", [(name, ep) for name, eps in PRESETS.items() for ep in eps], ids=lambda v: str(v)
)
def test_grouped_experts_pass_torchs_checks_at_preset_shapes(monkeypatch, name, ep_size):
    moe, D = _moe(name)
    L, H = moe.n_routed_experts // ep_size, moe.moe_intermediate_size
    monkeypatch.setattr(experts_mod, "cuda_capability", lambda index: (9, 0))
    assert resolve_impl(moe.experts_impl, torch.device("cuda", 0), BF16, D % 8 == 0 == H % 8) == "grouped_mm"
    N = TOKENS * moe.top_k  # worst case: every copy of every token lands on this rank
    y, dx, d_gate_up, d_down = _grouped_step(L, D, H, N)
    assert y.shape == dx.shape == (N, D) and y.dtype == dx.dtype == BF16
    assert d_gate_up.shape == (L, 2 * H, D) and d_down.shape == (L, D, H)


def test_2b_expert_width_is_not_grouped_mm_aligned_so_auto_uses_the_loop(monkeypatch):
    """The 2B preset's experts are 853 wide (the paper's 0.25 x 1.33 x 2560 ... rounded): not a
    multiple of 8, which torch's grouped GEMM needs (16-byte strides). `auto` must pick the loop
    kernel on every GPU for it, and the grouped path must indeed be refused."""
    moe, D = _moe("deepseek_moe_2b")
    H = moe.moe_intermediate_size
    assert H % 8
    monkeypatch.setattr(experts_mod, "cuda_capability", lambda index: (9, 0))
    experts = RoutedExperts(moe.n_routed_experts, D, H, impl="loop")
    aligned = experts.dim % 8 == 0 and experts.hidden % 8 == 0
    assert resolve_impl(moe.experts_impl, torch.device("cuda", 0), BF16, aligned) == "loop"
    with pytest.raises(RuntimeError, match="16 bytes|Invalid strides"):
        _grouped_step(moe.n_routed_experts, D, H, 64)


def test_grouped_experts_are_refused_in_fp32_and_at_a_misaligned_width():
    """The checks the tests above rely on do run: fp32 (torch's CUDA kernel is bf16-only) and a
    width that is not a multiple of 8 both fail on meta, as they would on a GPU."""
    with pytest.raises(RuntimeError, match="BF16"):
        _grouped_step(4, 64, 32, 128, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="16 bytes|Invalid strides"):
        _grouped_step(4, 64, 30, 128)


def test_tiny_model_training_step_on_meta_takes_the_cuda_choices(monkeypatch):
    """A bf16 training forward + backward of the tiny preset with exactly what CUDA picks
    (grouped GEMM on Hopper, SDPA): it passes torch's checks, never reads a value on the host
    and creates no tensor off its inputs' device (meta would refuse to mix with it)."""
    from deepseek_moe.model.transformer import DeepSeekMoEForCausalLM
    from tests.host_reads import count_host_reads

    cfg = load_model_config("deepseek_moe_tiny")
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(experts_mod, "cuda_capability", lambda index: (9, 0))
    # what "auto" resolves to on an sm90 GPU in bf16 ...
    assert resolve_impl(cfg.moe.experts_impl, cuda, BF16) == "grouped_mm"
    assert choose_attn_impl(cfg.attn_impl, cuda, BF16, 2, cfg.num_heads, 256) == "sdpa"
    assert choose_attn_impl(cfg.attn_impl, META, BF16, 2, cfg.num_heads, 256) == "sdpa"
    # ... and the same choice on meta (the experts' "auto" is the loop off CUDA: force it)
    monkeypatch.setattr(experts_mod, "grouped_mm_is_native", lambda device, dtype: dtype == BF16)
    seen = []
    monkeypatch.setattr(
        experts_mod, "grouped_swiglu", lambda *a: seen.append(a[0].dtype) or grouped_swiglu(*a)
    )
    with torch.device("meta"):  # (the rope tables are built on the CPU: `.to` moves them)
        model = DeepSeekMoEForCausalLM(cfg).to(device=META, dtype=BF16).train()
    ids = torch.empty(2, 256, dtype=torch.long, device=META)
    with count_host_reads() as reads:
        out = model(ids, ids)
        out.loss.backward()
    assert reads.ops == []
    assert seen == [BF16] * len(list(model.moe_layers()))
    assert all(p.grad is not None and p.grad.device == META for p in model.parameters())


def test_meta_step_fails_on_a_host_read(monkeypatch):
    """The check above can fail: the loop kernel reads its counts on the host, which meta refuses."""
    from deepseek_moe.model.transformer import DeepSeekMoEForCausalLM

    cfg = load_model_config("deepseek_moe_tiny")
    cfg.moe.experts_impl = "loop"
    with torch.device("meta"):
        model = DeepSeekMoEForCausalLM(cfg).to(device=META, dtype=BF16).train()
    ids = torch.empty(2, 64, dtype=torch.long, device=META)
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        model(ids, ids)
