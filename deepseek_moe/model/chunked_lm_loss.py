"""LM head + next-token cross-entropy over chunks of tokens, never holding the [T, V] logits.

Shapes: T tokens (batch x sequence, flattened), D model dim, V vocab, N tokens per chunk.

    loss = chunked_lm_cross_entropy(h_TD, lm_head.weight, labels_T, chunk_tokens=1024)

equals `lm_cross_entropy(lm_head(h), labels)` (transformer.py): the mean fp32 cross-entropy over
labels != -100, 0 (not NaN) when every label is ignored, with the same gradients for the hidden
states and the head weight (tied to the embedding or not: autograd adds the weight's gradient to
the embedding's).

Why: the plain head keeps the whole micro-batch's logits in the activation dtype, their fp32
upcast (the log-softmax input) and, when the backward starts, two fp32 [T, V] gradients: with a
100k vocabulary that is several GB per rank, more than all transformer blocks together under
activation checkpointing, and it grows with micro-batch x seq_len. Here only one chunk's [N, V]
logits exist at a time, in the forward and again in the backward, which recomputes them (one
extra head matmul per chunk: 2*T*D*V FLOPs more per micro-batch).

Saved for backward: the hidden states the caller holds anyway (the final norm's output), the
head weight (a parameter), the labels, and one fp32 log-sum-exp per token. Nothing of size V
per token.

Transients (what `deepseek_moe.memory_plan` counts for a chunked head):
- forward, per chunk: the logits in the activation dtype and their fp32 upcast, alive together
  during the upcast (in fp32 these are one tensor); the log-sum-exp is then computed in place.
- backward, per chunk: the recomputed fp32 logits, turned in place into the logits' gradient
  (softmax - onehot) * upstream / count, and its cast to the activation dtype (bf16 only); plus,
  for the whole backward, the [T, D] hidden-state gradient and the [V, D] weight gradient. A
  low-precision weight's gradient is summed over chunks in an fp32 [V, D] buffer and cast once
  at the end (plus each chunk's [V, D] product in the weight's dtype): summing in bf16 would
  round once per chunk where the plain head rounds once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100


def _logits_NV(h_ND: torch.Tensor, weight_VD: torch.Tensor) -> torch.Tensor:
    """One chunk's logits computed as `lm_head` does (activation dtype), then fp32 as the loss
    uses them. Always a fresh tensor (the matmul's output, or its upcast), safe to modify in place."""
    return F.linear(h_ND, weight_VD).float()


class ChunkedLMHeadCrossEntropy(torch.autograd.Function):
    """Sum-of-CE / count over chunks of `chunk_tokens` rows; see the module docstring."""

    @staticmethod
    def forward(ctx, h_TD, weight_VD, labels_T, chunk_tokens: int):  # type: ignore[override]
        T = h_TD.shape[0]
        keep_T = labels_T != IGNORE_INDEX
        lse_T = torch.empty(T, dtype=torch.float32, device=h_TD.device)
        total = torch.zeros((), dtype=torch.float32, device=h_TD.device)
        for start in range(0, T, chunk_tokens):
            end = min(start + chunk_tokens, T)
            logits_NV = _logits_NV(h_TD[start:end], weight_VD)
            target_N = logits_NV.gather(1, labels_T[start:end].clamp_min(0).unsqueeze(1)).squeeze(1)
            # log-sum-exp in place (no second [N, V] buffer): max + log(sum(exp(x - max)))
            max_N = logits_NV.amax(dim=1)
            max_N = torch.where(torch.isfinite(max_N), max_N, torch.zeros_like(max_N))
            lse_N = logits_NV.sub_(max_N.unsqueeze(1)).exp_().sum(dim=1).log_().add_(max_N)
            lse_T[start:end] = lse_N
            ce_N = torch.where(keep_T[start:end], lse_N - target_N, torch.zeros_like(lse_N))
            total = total + ce_N.sum()
            del logits_NV
        ctx.chunk_tokens = chunk_tokens
        ctx.save_for_backward(h_TD, weight_VD, labels_T, lse_T)
        return total / keep_T.sum().clamp_min(1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):  # type: ignore[override]
        h_TD, weight_VD, labels_T, lse_T = ctx.saved_tensors
        T, N = h_TD.shape[0], ctx.chunk_tokens
        keep_T = labels_T != IGNORE_INDEX
        # d loss / d CE_t for every kept token (a tensor: no host sync)
        scale = grad_loss.float() / keep_T.sum().clamp_min(1)
        grad_h_TD = torch.empty_like(h_TD) if ctx.needs_input_grad[0] else None
        grad_weight_VD = None
        if ctx.needs_input_grad[1]:
            grad_weight_VD = torch.zeros_like(
                weight_VD, dtype=torch.promote_types(weight_VD.dtype, torch.float32)
            )
        for start in range(0, T, N):
            end = min(start + N, T)
            h_ND = h_TD[start:end]
            # (softmax - onehot) * upstream / count, built in the recomputed fp32 logits
            grad_NV = _logits_NV(h_ND, weight_VD)
            grad_NV.sub_(lse_T[start:end].unsqueeze(1)).exp_()
            labels_N1 = labels_T[start:end].clamp_min(0).unsqueeze(1)
            grad_NV.scatter_add_(1, labels_N1, torch.full_like(labels_N1, -1.0, dtype=grad_NV.dtype))
            grad_NV.mul_((keep_T[start:end] * scale).unsqueeze(1))
            # the gradient of the activation-dtype logits, as autograd gives the plain head
            grad_NV = grad_NV.to(h_TD.dtype)
            if grad_h_TD is not None:
                torch.mm(grad_NV, weight_VD, out=grad_h_TD[start:end])
            if grad_weight_VD is not None:
                if grad_weight_VD.dtype == weight_VD.dtype:
                    grad_weight_VD.addmm_(grad_NV.t(), h_ND)
                else:  # fp32 sum of each chunk's low-precision product
                    grad_weight_VD += grad_NV.t() @ h_ND
            del grad_NV
        if grad_weight_VD is not None:
            grad_weight_VD = grad_weight_VD.to(weight_VD.dtype)
        return grad_h_TD, grad_weight_VD, None, None


def chunked_lm_cross_entropy(
    h_TD: torch.Tensor, weight_VD: torch.Tensor, labels_T: torch.Tensor, *, chunk_tokens: int
) -> torch.Tensor:
    """Mean fp32 cross-entropy of the logits h_TD @ weight_VD.T against labels_T (-100 ignored;
    0 if all are), computed `chunk_tokens` rows at a time (see the module docstring)."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be > 0")
    if h_TD.dim() != 2 or labels_T.shape != h_TD.shape[:1]:
        raise ValueError(
            f"expected h_TD [T, D] and labels_T [T], got {tuple(h_TD.shape)} and {tuple(labels_T.shape)}"
        )
    return ChunkedLMHeadCrossEntropy.apply(h_TD, weight_VD, labels_T, chunk_tokens)
