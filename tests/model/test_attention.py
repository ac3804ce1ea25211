"""The "bmm" attention path against SDPA (fp32, bf16, GQA, ragged query blocks), causality, the
"auto" rule, config validation, and whole-model equality of attn_impl "sdpa" and "bmm"."""

import math

import pytest
import torch
import torch.nn.functional as F

from deepseek_moe.config.model import ModelConfig, MoEConfig
from deepseek_moe.model import attention as attention_mod
from deepseek_moe.model.attention import Attention, choose_attn_impl
from deepseek_moe.model.kernels.causal_bmm_attention import causal_bmm_attention
from deepseek_moe.model.transformer import DeepSeekMoEForCausalLM


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def _bmm(q, k, v, rows=None):
    return causal_bmm_attention(q, k, v) if rows is None else causal_bmm_attention(q, k, v, rows)


def _out_and_grads(fn, q, k, v, dy):
    """(y, dq, dk, dv) of fn at fresh leaf copies of q, k, v."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    y = fn(q, k, v)
    return (y, *torch.autograd.grad(y, (q, k, v), dy))


def _inputs(B, H, G, S, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, dy = (torch.randn(B, H, S, d, generator=gen) for _ in range(2))
    k, v = (torch.randn(B, G, S, d, generator=gen) for _ in range(2))
    return q, k, v, dy


# S = 37 and 150 are multiples of no block size: the last query block is always shorter.
# rows=None is the default block (64 rows: one block at S=37, blocks 64+64+22 at S=150).
@pytest.mark.parametrize("S, rows", [(37, None), (37, 16), (37, 10), (150, None)])
@pytest.mark.parametrize("G", [4, 2, 1])
def test_bmm_equals_sdpa_fp32(S, rows, G):
    q, k, v, dy = _inputs(2, 4, G, S, 16)
    ours = _out_and_grads(lambda *a: _bmm(*a, rows), q, k, v, dy)
    ref = _out_and_grads(_sdpa, q, k, v, dy)
    for name, a, b in zip(("y", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("S, rows", [(37, 16), (150, None)])
@pytest.mark.parametrize("G", [4, 2])
def test_bmm_bf16_error_comparable_to_sdpa(S, rows, G):
    """bf16 tolerance, justified: both paths are compared with an fp64 reference on the same
    bf16 inputs. SDPA's flash kernel keeps scores in fp32; ours stores scores and probabilities
    in bf16 (Megatron's unfused path) and accumulates dK/dV in bf16 across query blocks, so its
    error may be larger, but it must stay within 3x SDPA's own bf16 error and within 4 bf16
    ulps of the largest reference value (measured: at most 2.1x and ~2 ulps)."""
    q, k, v, dy = (t.bfloat16() for t in _inputs(2, 4, G, S, 32))
    ref = _out_and_grads(_sdpa, *(t.double() for t in (q, k, v, dy)))
    ours = _out_and_grads(lambda *a: _bmm(*a, rows), q, k, v, dy)
    sdpa = _out_and_grads(_sdpa, q, k, v, dy)
    for name, a, b, r in zip(("y", "dq", "dk", "dv"), ours, sdpa, ref):
        assert a.dtype == torch.bfloat16
        err_ours = (a.double() - r).abs().max().item()
        err_sdpa = (b.double() - r).abs().max().item()
        ulp = 2.0 ** (math.floor(math.log2(r.abs().max().item())) - 7)  # bf16: 8-bit mantissa
        assert err_ours <= 3 * err_sdpa, (name, err_ours, err_sdpa)
        assert err_ours <= 4 * ulp, (name, err_ours, ulp)


@pytest.mark.parametrize("rows", [None, 8])
def test_bmm_is_causal(rows):
    """Changing token t's q, k and v changes no output (or gradient of keys) before t."""
    q, k, v, dy = _inputs(2, 4, 2, 37, 16)
    t = 20
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, :, t] += 3.0
    dy[:, :, t:] = 0  # only earlier outputs get a gradient: then no key/value >= t is involved
    fn = lambda *a: _bmm(*a, rows)  # noqa: E731
    y, dq, dk, dv = _out_and_grads(fn, q, k, v, dy)
    y2, dq2, dk2, dv2 = _out_and_grads(fn, q2, k2, v2, dy)
    for a, b in ((y, y2), (dq, dq2), (dk, dk2), (dv, dv2)):
        torch.testing.assert_close(a[:, :, :t], b[:, :, :t], rtol=0, atol=0)
    assert not torch.allclose(y[:, :, t], y2[:, :, t])


def test_auto_rule_on_cpu_and_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    f32, bf16 = torch.float32, torch.bfloat16
    max_seq, max_scores = attention_mod.AUTO_BMM_MAX_SEQ, attention_mod.AUTO_BMM_MAX_SCORES
    assert choose_attn_impl("auto", cpu, f32, 8, 4, 256) == "bmm"  # the tiny preset's shape
    assert choose_attn_impl("auto", cpu, f32, 1, 1, max_seq) == "bmm"
    assert choose_attn_impl("auto", cpu, f32, 1, 1, max_seq + 1) == "sdpa"  # fp32: no gain
    assert choose_attn_impl("auto", cpu, bf16, 1, 1, 2 * max_seq) == "bmm"  # bf16: still faster
    B = max_scores // (4 * 512 * 512)  # largest batch within the score bound at H=4, S=512
    for dtype in (f32, bf16):
        assert choose_attn_impl("auto", cpu, dtype, B, 4, 512) == "bmm"
        assert choose_attn_impl("auto", cpu, dtype, B + 1, 4, 512) == "sdpa"  # memory bound
        assert choose_attn_impl("auto", cuda, dtype, 1, 1, 16) == "sdpa"
    for impl in ("sdpa", "bmm"):
        assert choose_attn_impl(impl, cpu, f32, 1, 1, max_seq + 1) == impl
        assert choose_attn_impl(impl, cpu, f32, B + 1, 4, 512) == impl
        assert choose_attn_impl(impl, cuda, f32, 1, 1, 16) == impl


def test_auto_module_calls_the_chosen_path(monkeypatch):
    cfg = ModelConfig(hidden_size=32, num_heads=4, max_seq_len=16, moe=None)
    torch.manual_seed(0)
    attn = Attention(cfg)
    calls = []
    real = attention_mod.causal_bmm_attention
    monkeypatch.setattr(attention_mod, "causal_bmm_attention", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 16, 32)
    y_bmm = attn(x)
    assert calls == [1]
    monkeypatch.setattr(attention_mod, "AUTO_BMM_MAX_SEQ", 15)
    y_sdpa = attn(x)
    assert calls == [1]
    torch.testing.assert_close(y_bmm, y_sdpa, rtol=1e-5, atol=1e-6)


def test_bad_attn_impl_is_rejected():
    with pytest.raises(ValueError, match=r"attn_impl='flash' must be one of \('auto', 'sdpa', 'bmm'\)"):
        ModelConfig(attn_impl="flash")


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_model_loss_and_grads_equal_for_sdpa_and_bmm(num_kv_heads):
    """Whole model in fp32; S = 131 so the bmm path runs 3 query blocks, the last one short."""
    losses, grads = {}, {}
    ids = torch.randint(0, 64, (2, 131), generator=torch.Generator().manual_seed(0))
    for impl in ("sdpa", "bmm"):
        cfg = ModelConfig(
            vocab_size=64,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=num_kv_heads,
            intermediate_size=48,
            max_seq_len=131,
            init_std=0.05,
            attn_impl=impl,
            moe=MoEConfig(n_routed_experts=4, top_k=2, moe_intermediate_size=16),
        )
        torch.manual_seed(0)
        model = DeepSeekMoEForCausalLM(cfg)
        out = model(ids, ids.roll(-1, dims=1))
        out.loss.backward()
        losses[impl] = out.loss.detach()
        grads[impl] = {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(losses["bmm"], losses["sdpa"], rtol=1e-6, atol=1e-6)
    for name, g in grads["sdpa"].items():
        torch.testing.assert_close(grads["bmm"][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_bmm_without_autograd_gives_the_same_output():
    """Under no_grad the forward keeps no probabilities, and must compute the same values."""
    q, k, v, _ = _inputs(2, 4, 2, 150, 16)
    with torch.no_grad():
        y = causal_bmm_attention(q, k, v)
    torch.testing.assert_close(y, _sdpa(q, k, v), rtol=1e-5, atol=1e-5)
