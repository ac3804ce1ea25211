"""The chunked LM head + cross-entropy (deepseek_moe/model/chunked_lm_loss.py) against plain
`F.cross_entropy` on the full logits (fp64), the model with chunking against the model without,
and the memory it must not use (the [T, V] logits)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from deepseek_moe.config.model import ModelConfig
from deepseek_moe.model.chunked_lm_loss import chunked_lm_cross_entropy
from deepseek_moe.model.transformer import DeepSeekMoEForCausalLM, lm_cross_entropy
from tests.parallel._ep_common import tiny_config
from tests.test_memory_plan import live_peak_bytes

T, D, V = 24, 16, 40
UPSTREAM = 0.7  # d(outer loss)/d(lm loss): the backward must scale by it


def _labels(kind: str) -> torch.Tensor:
    labels_T = torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(3))
    if kind == "scattered":
        labels_T[::3] = -100
        labels_T[7] = -100
    elif kind == "chunk_ignored":  # with chunks of 8, the second chunk has nothing to count
        labels_T[8:16] = -100
        labels_T[1] = -100
    elif kind == "all_ignored":
        labels_T[:] = -100
    return labels_T


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    h_TD = torch.randn(T, D, generator=g).to(dtype).requires_grad_()
    weight_VD = (torch.randn(V, D, generator=g) * 0.5).to(dtype).requires_grad_()
    return h_TD, weight_VD


def _reference(h_TD, weight_VD, labels_T):
    """Loss and (h, weight) gradients from F.cross_entropy on the full fp64 logits."""
    h, w = h_TD.detach().double().requires_grad_(), weight_VD.detach().double().requires_grad_()
    count = (labels_T != -100).sum().clamp_min(1)
    loss = F.cross_entropy(h @ w.T, labels_T, ignore_index=-100, reduction="sum") / count
    (loss * UPSTREAM).backward()
    return loss.detach(), h.grad, w.grad


def _chunked(h_TD, weight_VD, labels_T, chunk_tokens):
    loss = chunked_lm_cross_entropy(h_TD, weight_VD, labels_T, chunk_tokens=chunk_tokens)
    grad_h, grad_w = torch.autograd.grad(loss * UPSTREAM, (h_TD, weight_VD))
    return loss.detach(), grad_h, grad_w


@pytest.mark.parametrize("labels", ["none_ignored", "scattered", "chunk_ignored", "all_ignored"])
@pytest.mark.parametrize("chunk_tokens", [8, 5, 24, 100, 1])  # divides T, does not, = T, > T, 1
def test_fp32_equals_full_logits_cross_entropy(chunk_tokens, labels):
    h_TD, weight_VD = _inputs()
    labels_T = _labels(labels)
    loss, grad_h, grad_w = _chunked(h_TD, weight_VD, labels_T, chunk_tokens)
    ref_loss, ref_h, ref_w = _reference(h_TD, weight_VD, labels_T)
    assert loss.dtype == torch.float32 and grad_h.dtype == grad_w.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_h.double(), ref_h, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_w.double(), ref_w, rtol=1e-6, atol=1e-6)
    if labels == "all_ignored":  # 0, not NaN, and no gradient
        assert loss.item() == 0.0 and not grad_h.any() and not grad_w.any()
    else:
        assert ref_loss > 1.0 and ref_w.abs().max() > 1e-3  # a real signal was compared


def test_tied_weight_gets_embedding_and_head_gradients():
    """Tied head: the weight is also the embedding; its gradient is the sum of both uses."""
    g = torch.Generator().manual_seed(1)
    weight_VD = (torch.randn(V, D, generator=g) * 0.5).requires_grad_()
    ids_T = torch.randint(0, V, (T,), generator=g)
    labels_T = _labels("scattered")

    def loss_of(w, lm_loss):
        h_TD = torch.tanh(F.embedding(ids_T, w))
        return lm_loss(h_TD, w)

    chunked = loss_of(weight_VD, lambda h, w: chunked_lm_cross_entropy(h, w, labels_T, chunk_tokens=5))
    (grad_w,) = torch.autograd.grad(chunked * UPSTREAM, weight_VD)
    w64 = weight_VD.detach().double().requires_grad_()
    count = (labels_T != -100).sum()
    ref = loss_of(w64, lambda h, w: F.cross_entropy(h @ w.T, labels_T, reduction="sum") / count)
    (ref_w,) = torch.autograd.grad(ref * UPSTREAM, w64)
    torch.testing.assert_close(chunked.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_w.double(), ref_w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_tokens", [8, 5])
def test_bf16_matches_fp32_reference_and_todays_bf16_path(chunk_tokens):
    h_TD, weight_VD = _inputs(torch.bfloat16)
    labels_T = _labels("scattered")
    loss, grad_h, grad_w = _chunked(h_TD, weight_VD, labels_T, chunk_tokens)
    assert loss.dtype == torch.float32 and grad_h.dtype == grad_w.dtype == torch.bfloat16
    # within bf16 rounding of the exact (fp64) result on the same bf16 inputs
    ref_loss, ref_h, ref_w = _reference(h_TD, weight_VD, labels_T)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-2, atol=1e-2)
    for got, want in ((grad_h, ref_h), (grad_w, ref_w)):
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    # today's path: lm_head in bf16, lm_cross_entropy on the whole logits
    today = lm_cross_entropy(F.linear(h_TD, weight_VD), labels_T)
    today_h, today_w = torch.autograd.grad(today * UPSTREAM, (h_TD, weight_VD))
    torch.testing.assert_close(loss, today, rtol=1e-6, atol=1e-6)  # same bf16 logits, fp32 loss
    torch.testing.assert_close(grad_h, today_h, rtol=1.6e-2, atol=1e-5)  # one bf16 rounding
    # the weight gradient: each chunk's product rounded once, summed in fp32, rounded once more
    torch.testing.assert_close(grad_w, today_w, rtol=0, atol=2 * 2**-8 * today_w.abs().max().item())


def test_bf16_weight_gradient_is_summed_over_chunks_in_fp32():
    """One token per chunk (256 partial sums): the weight gradient stays as close to the exact
    one as the plain head's single bf16 result is; a bf16 running sum rounds at every chunk."""
    g = torch.Generator().manual_seed(5)
    n_tokens, vocab, dim = 256, 40, 16
    h_TD = torch.randn(n_tokens, dim, generator=g).to(torch.bfloat16).requires_grad_()
    weight_VD = (torch.randn(vocab, dim, generator=g) * 0.5).to(torch.bfloat16).requires_grad_()
    labels_T = torch.randint(0, vocab, (n_tokens,), generator=g)
    _, _, ref_w = _reference(h_TD, weight_VD, labels_T)
    _, _, chunked_w = _chunked(h_TD, weight_VD, labels_T, chunk_tokens=1)
    today = lm_cross_entropy(F.linear(h_TD, weight_VD), labels_T)
    (today_w,) = torch.autograd.grad(today * UPSTREAM, weight_VD)

    def rel_err(w):
        return ((w.double() - ref_w).norm() / ref_w.norm()).item()

    assert chunked_w.dtype == torch.bfloat16
    assert rel_err(chunked_w) <= 1.25 * rel_err(today_w), (rel_err(chunked_w), rel_err(today_w))


def test_rejects_bad_arguments():
    h_TD, weight_VD = _inputs()
    with pytest.raises(ValueError, match="chunk_tokens=0 must be > 0"):
        chunked_lm_cross_entropy(h_TD, weight_VD, _labels("scattered"), chunk_tokens=0)
    with pytest.raises(ValueError, match=r"expected h_TD \[T, D\] and labels_T \[T\]"):
        chunked_lm_cross_entropy(h_TD, weight_VD, _labels("scattered")[:5], chunk_tokens=4)


def test_never_materialises_the_full_logits():
    """Saved tensors and the live peak of forward + backward stay far below one fp32 [T, V]
    tensor (the plain head keeps the logits, their fp32 upcast and two fp32 [T, V] gradients)."""
    T_big, D_small, V_big, N = 512, 8, 2048, 32
    g = torch.Generator().manual_seed(0)
    h_TD = torch.randn(T_big, D_small, generator=g).requires_grad_()
    weight_VD = (torch.randn(V_big, D_small, generator=g) * 0.3).requires_grad_()
    labels_T = torch.randint(0, V_big, (T_big,), generator=g)
    full_logits_fp32 = T_big * V_big * 4
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_lm_cross_entropy(h_TD, weight_VD, labels_T, chunk_tokens=N)
    # h, weight, labels and one fp32 scalar per token
    assert sum(saved.values()) == (T_big * D_small + V_big * D_small + T_big * 2 + T_big) * 4

    def step(chunk_tokens):
        h_TD.grad = weight_VD.grad = None
        if chunk_tokens:
            loss = chunked_lm_cross_entropy(h_TD, weight_VD, labels_T, chunk_tokens=chunk_tokens)
        else:
            loss = lm_cross_entropy(F.linear(h_TD, weight_VD), labels_T)
        loss.backward()

    chunked_peak = live_peak_bytes(lambda: step(N))
    assert chunked_peak < full_logits_fp32 / 4, chunked_peak
    # the same measurement sees the plain head's logits (the check can fail)
    assert live_peak_bytes(lambda: step(0)) > 2 * full_logits_fp32


def _model_cfg(tie: bool) -> ModelConfig:
    """The EP tests' tiny MoE (every aux loss on), its head tied or not."""
    return dataclasses.replace(tiny_config(), tie_embeddings=tie)


def _training_model(tie: bool, chunk_tokens: int, checkpointing: str) -> DeepSeekMoEForCausalLM:
    torch.manual_seed(0)  # the same weights for every setting
    model = DeepSeekMoEForCausalLM(
        _model_cfg(tie), loss_chunk_tokens=chunk_tokens, activation_checkpointing=checkpointing
    )
    return model.train()


def _loss_and_grads(model, ids_BS, labels_BS):
    out = model(ids_BS, labels_BS)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_model_chunked_equals_plain(tie, checkpointing):
    plain_model = _training_model(tie, 0, "none")
    model = _training_model(tie, 7, checkpointing)
    g = torch.Generator().manual_seed(5)
    vocab, seq = model.cfg.vocab_size, model.cfg.max_seq_len
    ids_BS = torch.randint(0, vocab, (3, seq), generator=g)
    labels_BS = torch.randint(0, vocab, (3, seq), generator=g)
    labels_BS[1, 3:] = -100  # 24 tokens in chunks of 7: the short last chunk, ignored labels
    plain, plain_grads = _loss_and_grads(plain_model, ids_BS, labels_BS)
    chunked, chunked_grads = _loss_and_grads(model, ids_BS, labels_BS)
    assert plain.logits_BSV.shape == (3, seq, vocab) and chunked.logits_BSV is None
    assert plain.aux_loss > 0  # the aux losses' gradients are in the comparison too
    torch.testing.assert_close(chunked.lm_loss, plain.lm_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-6, atol=1e-6)
    assert chunked_grads.keys() == plain_grads.keys()
    assert ("lm_head.weight" in plain_grads) == (not tie)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-6, atol=1e-6, msg=name)
    # without labels the model still returns the logits; eval (no_grad) takes the chunked path
    model.eval()
    plain_model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids_BS).logits_BSV, model.lm_head(model.model.norm(_body(model, ids_BS))))
        evaluated = model(ids_BS, labels_BS)
        evaluated_plain = plain_model(ids_BS, labels_BS)
    assert evaluated.logits_BSV is None
    torch.testing.assert_close(evaluated.lm_loss, evaluated_plain.lm_loss, rtol=1e-6, atol=1e-6)


def _body(model, ids_BS):
    x_BSD = model.model.embed_tokens(ids_BS)
    for block in model.model.layers:
        x_BSD, _ = block(x_BSD)
    return x_BSD


def test_model_rejects_bad_settings_when_built():
    with pytest.raises(ValueError, match="loss_chunk_tokens=-1 must be >= 0"):
        DeepSeekMoEForCausalLM(_model_cfg(False), loss_chunk_tokens=-1)
    with pytest.raises(ValueError, match="activation_checkpointing='some' must be one of"):
        DeepSeekMoEForCausalLM(_model_cfg(False), activation_checkpointing="some")
