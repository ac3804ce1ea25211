"""The chunked LM loss on CUDA in bf16: the plain head's loss and gradients, and a lower peak of
allocated memory (the caching allocator's own count) at a 32k vocabulary."""

import torch
import torch.nn.functional as F

from deepseek_moe.model.chunked_lm_loss import chunked_lm_cross_entropy
from deepseek_moe.model.transformer import lm_cross_entropy


def _loss_grads_and_peak(h_TD, weight_VD, labels_T, chunk_tokens):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    if chunk_tokens:
        loss = chunked_lm_cross_entropy(h_TD, weight_VD, labels_T, chunk_tokens=chunk_tokens)
    else:
        loss = lm_cross_entropy(F.linear(h_TD, weight_VD), labels_T)
    grads = torch.autograd.grad(loss, (h_TD, weight_VD))
    torch.cuda.synchronize()
    return loss.detach(), grads, torch.cuda.max_memory_allocated() - base


def test_cuda_bf16_chunked_equals_plain_with_less_memory():
    T, D, V = 8192, 256, 32768
    g = torch.Generator(device="cuda").manual_seed(0)
    h_TD = torch.randn(T, D, device="cuda", generator=g).bfloat16().requires_grad_()
    weight_VD = (torch.randn(V, D, device="cuda", generator=g) * 0.05).bfloat16().requires_grad_()
    labels_T = torch.randint(0, V, (T,), device="cuda", generator=g)
    labels_T[::5] = -100
    plain, (plain_h, plain_w), plain_peak = _loss_grads_and_peak(h_TD, weight_VD, labels_T, 0)
    loss, (grad_h, grad_w), peak = _loss_grads_and_peak(h_TD, weight_VD, labels_T, 1024)
    # cuBLAS may round some bf16 logits differently for 1024-row chunks than for all 8192 rows
    torch.testing.assert_close(loss, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_h, plain_h, rtol=1.6e-2, atol=1e-5)
    # the weight gradient: each chunk's product rounded once, summed in fp32, rounded once more
    torch.testing.assert_close(grad_w, plain_w, rtol=0, atol=4 * 2**-8 * plain_w.abs().max().item())
    # plain: >= 2 fp32 [T, V] gradients; chunked: one chunk's [1024, V] fp32 + bf16, the [T, D]
    # gradient, the fp32 [V, D] weight-gradient sum and the bf16 gradient it is cast to
    assert plain_peak > 2 * T * V * 4
    assert peak < 1024 * V * 6 + T * D * 2 + V * D * (4 + 2) + T * V // 4
