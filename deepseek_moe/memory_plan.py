"""Per-GPU memory plan of a training run: parameters, gradients, optimizer state, activations,
all-to-all buffers, and the all-to-all bytes per step. Pure arithmetic on the config.

    plan = memory_plan(model_cfg, ep_size=8, world_size=64, zero_stage=1, micro_batch=1,
                       seq_len=4096, precision="bf16", activation_checkpointing="full",
                       loss_chunk_tokens=2048)
    plan["total_gb"]

`python -m deepseek_moe.summary model=X ep_size=.. world_size=..` prints it. What is counted
(T = micro_batch * seq_len tokens per rank, K = top_k, P = ep_size, W = world_size):
- parameters: non-expert parameters on every rank, routed experts / P; 4 bytes (fp32) or
  2 bytes (bf16: DeepSpeed's bf16 mode keeps bf16 weights, fp32 master weights in the
  optimizer).
- gradients: one per parameter in the weight dtype; ZeRO-2 keeps only its 1/W share of the
  non-expert ones and 1/(W/P) (the expert-data-parallel group) of the expert ones. bf16 adds
  the fp32 gradient copy DeepSpeed's bf16 optimizer accumulates into (partitioned like ZeRO).
- optimizer: AdamW m and v in fp32 (+ fp32 master weights in bf16), partitioned from ZeRO-1 on
  over the same groups.
- activations: the tensors autograd keeps from the forward for the backward, counted from the
  ops our model runs (SDPA attention, the grouped experts path; see `_block_saved_bytes`), plus
  the logits and their log-softmax; with "full" checkpointing only each block's input is kept.
  With `loss_chunk_tokens` N > 0 (deepseek_moe/model/chunked_lm_loss.py) the head keeps no
  logits, only the [T, D] hidden states and one fp32 log-sum-exp per token.
  Validated against the saved tensors of real runs (tests/test_memory_plan.py).
- logits_grad: the gradients of the log-softmax and of its input, both fp32, alive together
  with all activations when the backward starts (T x vocab each: the peak for large
  vocabularies). Chunked: one chunk's recomputed fp32 logits turned into their gradient
  (+ its activation-dtype cast in bf16), N x vocab, next to the head's [T, D] input gradient
  and [vocab, D] weight gradient (an fp32 sum in bf16), all alive during the head's backward
  (the forward's per-chunk transient, the logits and their fp32 upcast, is no larger).
- recompute ("full" only): what one block's recompute and backward add later in the backward,
  beyond the backward-start peak (see `recompute_bytes`; 0 when the logits' part is larger).
  The sum of the parts is the peak; validated against the allocator's live bytes of small
  CPU runs (tests/test_memory_plan.py, bench/bench_memory.py).
- all-to-all buffers: the dispatch send + receive buffers of one MoE layer (T*K rows of D), the
  largest transient of the exchange.
- a2a bytes per step: rows leaving the rank (a fraction (P-1)/P of T*K under uniform routing;
  device-limited routing sends less) x D x dtype, dispatch + combine, forward + backward
  (+ the forward again with "full"), over MoE layers and micro-batches.
Not counted: framework workspace (cuBLAS/NCCL, CUDA context: ~1-3 GB on a GPU; oneDNN's
memory on CPU, which grows with depth in bf16), allocator fragmentation and host-heap
retention, DeepSpeed's flat communication buckets.
"""

from __future__ import annotations

from typing import Any

from deepseek_moe.config.model import ModelConfig
from deepseek_moe.config.parallel import check_ep_world

GB = 1024**3
_F32 = 4
_I64 = 8


def _block_saved_bytes(cfg: ModelConfig, layer: int, T: int, b: int, experts_impl: str) -> int:
    """Bytes autograd saves for backward in block `layer` over T tokens, activation dtype of b
    bytes (parameters excluded: they exist anyway)."""
    D, H, G, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    # RMSNorm: its fp32 input (a new tensor in bf16, the residual stream itself in fp32), the
    # fp32 reciprocal rms, the normalised value in the activation dtype.
    norm = D * _F32 + _F32 + D * b
    # Attention: the normed input (shared by q/k/v), q, rotated k, v, the SDPA output (already
    # laid out for o_proj) in the activation dtype, and SDPA's fp32 log-sum-exp per head.
    attn = D * b + (2 * H + 2 * G) * d * b + H * _F32
    if not cfg.is_moe_layer(layer):
        return T * (2 * norm + attn + D * b + 4 * cfg.intermediate_size * b)
    m = cfg.moe
    K, E, Hx = m.top_k, m.n_routed_experts, m.moe_intermediate_size
    router = (D * _F32 if b != _F32 else 0) + E * _F32 + K * _I64  # fp32 input, scores, ids
    dispatch = K * _I64 + K * D * b  # source rows, gathered copies (the experts' input)
    # grouped: gate|up output, silu(gate), the product fed to down_proj.
    # loop kernel: only gate and up (it recomputes the rest in backward).
    experts = K * 4 * Hx * b if experts_impl == "grouped_mm" else K * 2 * Hx * b
    combine = K * _I64 + 2 * K * D * b + K * b  # order, expert outputs, [T,K,D] for bmm, gates
    shared = 4 * m.n_shared_experts * Hx * b  # SwiGLU: gate, up, silu(gate), product
    return T * (2 * norm + attn + D * b + router + dispatch + experts + combine + shared)


def activation_bytes(
    cfg: ModelConfig,
    *,
    micro_batch: int,
    seq_len: int,
    precision: str,
    activation_checkpointing: str,
    experts_impl: str = "grouped_mm",
    loss_chunk_tokens: int = 0,
) -> int:
    """Bytes kept for backward at the end of one micro-batch's forward (with "full"
    checkpointing: each block's input only), plus the logits the caller holds (none with
    `loss_chunk_tokens` > 0)."""
    T = micro_batch * seq_len
    b = 2 if precision in ("bf16", "fp16") else _F32
    return _head_bytes(cfg, T, b, loss_chunk_tokens) + _body_bytes(
        cfg, T, b, activation_checkpointing, experts_impl
    )


def recompute_bytes(
    cfg: ModelConfig,
    *,
    micro_batch: int,
    seq_len: int,
    precision: str,
    activation_checkpointing: str,
    experts_impl: str = "grouped_mm",
    loss_chunk_tokens: int = 0,
) -> int:
    """With "full" checkpointing, what the backward of a recomputed block adds on top of the
    backward-start peak (activations + logits gradient); 0 without checkpointing or when the
    logits' part is larger.

    NOTE: the two peaks never coexist. The head's tensors and the logits' gradient are freed
    before the backward reaches the last block; the block being recomputed then holds its
    saved tensors, which its backward frees as it creates the gradients of the same
    intermediates, so one block's saved bytes, plus the gradients alive before any of them is
    freed (`_block_backward_grads_bytes`), bound the transient (validated against the
    allocator's live bytes in tests/test_memory_plan.py)."""
    if activation_checkpointing != "full":
        return 0
    T = micro_batch * seq_len
    b = 2 if precision in ("bf16", "fp16") else _F32
    largest = max(
        _block_saved_bytes(cfg, i, T, b, experts_impl) + _block_backward_grads_bytes(cfg, i, T, b)
        for i in range(cfg.num_layers)
    )
    # In bf16 the gradients of the block's fp32 upcasts (both RMSNorm inputs, the router input)
    # are fp32 [T, D] tensors, larger than the bf16 ones the saved-bytes bound pairs them with.
    upcast_grads = 3 * T * cfg.hidden_size * _F32 if b != _F32 else 0
    head = _head_bytes(cfg, T, b, loss_chunk_tokens) + _logits_grad_bytes(cfg, T, b, loss_chunk_tokens)
    return max(0, largest + upcast_grads - head)


def _block_backward_grads_bytes(cfg: ModelConfig, layer: int, T: int, b: int) -> int:
    """Gradients alive beside all of a block's saved tensors when its backward starts: the
    residual stream's [T, D] gradient (held through the block for the skip connection) and the
    first intermediate gradient the block makes before anything it saved is freed: the [T, K, D]
    expert outputs' in a MoE block (the combine), the [T, intermediate] product's in a dense one."""
    D = cfg.hidden_size
    first = cfg.moe.top_k * D if cfg.is_moe_layer(layer) else cfg.intermediate_size
    return T * (D + first) * b


def _head_bytes(cfg: ModelConfig, T: int, b: int, loss_chunk_tokens: int = 0) -> int:
    """Token ids, final norm, lm_head input; then the logits the caller holds and the fp32
    log-softmax, or, chunked, one fp32 log-sum-exp per token."""
    D, V = cfg.hidden_size, cfg.vocab_size
    kept = _I64 + D * _F32 + _F32 + 2 * D * b
    return T * (kept + (_F32 if loss_chunk_tokens > 0 else V * b + V * _F32))


def _body_bytes(cfg: ModelConfig, T: int, b: int, activation_checkpointing: str, experts_impl: str) -> int:
    if activation_checkpointing == "full":
        return cfg.num_layers * T * cfg.hidden_size * b  # block inputs
    return sum(_block_saved_bytes(cfg, i, T, b, experts_impl) for i in range(cfg.num_layers))


def _logits_grad_bytes(cfg: ModelConfig, T: int, b: int, loss_chunk_tokens: int = 0) -> int:
    """The log-softmax's fp32 gradient and the gradient of its fp32 input, alive together (with
    every saved activation) when the backward starts: the peak for large vocabularies.

    NOTE: both are fp32 in bf16 too (the loss upcasts the logits); the bf16 logits' gradient
    is made only after the log-softmax's gradient is freed.

    Chunked (N = loss_chunk_tokens > 0): the head's backward holds the [T, D] input gradient it
    fills chunk by chunk, the [V, D] weight gradient it accumulates, and one chunk's fp32 logits
    gradient. In bf16 the weight gradient is an fp32 sum, and a chunk's logits gradient is cast
    to bf16 (both alive during the cast; then the fp32 one is freed) before the chunk's bf16
    [V, D] product is added to the sum."""
    D, V = cfg.hidden_size, cfg.vocab_size
    if loss_chunk_tokens <= 0:
        return T * V * 2 * _F32
    N = min(loss_chunk_tokens, T)
    if b == _F32:
        return T * D * b + V * D * _F32 + N * V * _F32
    return T * D * b + V * D * _F32 + max(N * V * (_F32 + b), N * V * b + V * D * b)


def memory_plan(
    cfg: ModelConfig,
    *,
    ep_size: int = 1,
    world_size: int = 1,
    zero_stage: int = 1,
    micro_batch: int = 1,
    seq_len: int | None = None,
    precision: str = "bf16",
    activation_checkpointing: str = "none",
    grad_accum_steps: int = 1,
    experts_impl: str = "grouped_mm",
    loss_chunk_tokens: int = 0,
) -> dict[str, Any]:
    """Per-GPU bytes of each kind (and GB), and all-to-all bytes per optimizer step.
    `loss_chunk_tokens`: 0 = the LM head's full logits, N > 0 = the chunked head and loss."""
    if loss_chunk_tokens < 0:
        raise ValueError(f"loss_chunk_tokens={loss_chunk_tokens} must be >= 0 (0 = no chunking)")
    check_ep_world(ep_size, world_size)
    S = cfg.max_seq_len if seq_len is None else seq_len
    m = cfg.moe
    expert = (
        (cfg.num_moe_layers * m.n_routed_experts * 3 * cfg.hidden_size * m.moe_intermediate_size)
        if m is not None
        else 0
    )
    dense = cfg.num_params() - expert
    local_expert = expert // ep_size
    edp = world_size // ep_size
    w = 2 if precision in ("bf16", "fp16") else _F32
    params = (dense + local_expert) * w

    def shard(n_dense: float, n_expert: float, stage: int) -> float:
        return n_dense / world_size + n_expert / edp if zero_stage >= stage else n_dense + n_expert

    grads = shard(dense, local_expert, 2) * w
    if w != _F32:
        grads += shard(dense, local_expert, 1) * _F32  # fp32 accumulation copy
    opt_per_param = 2 * _F32 + (_F32 if w != _F32 else 0)  # Adam m, v (+ fp32 master)
    optimizer = shard(dense, local_expert, 1) * opt_per_param
    act_args = {
        "micro_batch": micro_batch,
        "seq_len": S,
        "precision": precision,
        "activation_checkpointing": activation_checkpointing,
        "experts_impl": experts_impl,
        "loss_chunk_tokens": loss_chunk_tokens,
    }
    acts = activation_bytes(cfg, **act_args)
    recompute = recompute_bytes(cfg, **act_args)
    T = micro_batch * S
    logits_grad = _logits_grad_bytes(cfg, T, w, loss_chunk_tokens)
    a2a_buffers = 2 * T * m.top_k * cfg.hidden_size * w if (m is not None and ep_size > 1) else 0
    passes = 3 if activation_checkpointing == "full" else 2  # fwd, bwd (+ recompute fwd)
    a2a_step = (
        0
        if m is None
        else int(
            2
            * T
            * m.top_k
            * (ep_size - 1)
            / ep_size
            * cfg.hidden_size
            * w
            * passes
            * cfg.num_moe_layers
            * grad_accum_steps
        )
    )
    parts = {
        "params": params,
        "grads": grads,
        "optimizer": optimizer,
        "activations": acts,
        "logits_grad": logits_grad,
        "recompute": recompute,
        "a2a_buffers": a2a_buffers,
    }
    total = sum(parts.values())
    out: dict[str, Any] = {
        "inputs": {
            "ep_size": ep_size,
            "world_size": world_size,
            "zero_stage": zero_stage,
            "micro_batch": micro_batch,
            "seq_len": S,
            "precision": precision,
            "activation_checkpointing": activation_checkpointing,
            "grad_accum_steps": grad_accum_steps,
            "loss_chunk_tokens": loss_chunk_tokens,
        },
        "bytes": {**{k: int(v) for k, v in parts.items()}, "total": int(total)},
        "gb": {**{k: round(v / GB, 2) for k, v in parts.items()}, "total": round(total / GB, 2)},
        "a2a_bytes_per_step": a2a_step,
        "a2a_gb_per_step": round(a2a_step / GB, 2),
    }
    return out
