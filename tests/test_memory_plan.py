"""The memory plan's activation bytes against the tensors autograd really keeps (within 15%),
and its parameter / optimizer arithmetic against hand counts."""

import json

import pytest
import torch

from deepseek_moe.config.model import ModelConfig, MoEConfig
from deepseek_moe.memory_plan import activation_bytes, memory_plan
from deepseek_moe.model.transformer import DeepSeekMoEForCausalLM


def _cfg(impl: str) -> ModelConfig:
    return ModelConfig(
        vocab_size=512,
        hidden_size=64,
        num_layers=3,
        num_heads=4,
        intermediate_size=128,
        first_k_dense=1,
        max_seq_len=128,
        attn_impl="sdpa",
        moe=MoEConfig(
            n_routed_experts=8, n_shared_experts=2, top_k=2, moe_intermediate_size=32, experts_impl=impl
        ),
    )


def measured_forward_bytes(model, ids) -> int:
    """Bytes of distinct storages autograd saved in one training forward (parameters excluded)
    plus the logits the caller holds (none with the chunked loss)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, ids)
    logits = 0 if out.logits_BSV is None else out.logits_BSV.untyped_storage().nbytes()
    return sum(seen.values()) + logits


def _training_model(cfg: ModelConfig, precision: str, mode: str, chunk: int = 0) -> DeepSeekMoEForCausalLM:
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(cfg, activation_checkpointing=mode, loss_chunk_tokens=chunk)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    model.train()
    return model


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["none", "full"])
@pytest.mark.parametrize("chunk", [0, 100])
def test_activation_bytes_match_saved_tensors(impl, precision, mode, chunk):
    """chunk > 0: the chunked LM loss keeps no logits (the head's part shrinks from ~T x vocab
    x 6 bytes to ~T x hidden)."""
    cfg = _cfg(impl)
    model = _training_model(cfg, precision, mode, chunk)
    B, S = 4, 128
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    measured = measured_forward_bytes(model, ids)
    planned = activation_bytes(
        cfg,
        micro_batch=B,
        seq_len=S,
        precision=precision,
        activation_checkpointing=mode,
        experts_impl=impl,
        loss_chunk_tokens=chunk,
    )
    assert planned == pytest.approx(measured, rel=0.05), (planned, measured)


def live_peak_bytes(fn) -> int:
    """Peak of the live tensor bytes allocated while fn() runs (the profiler's allocator
    events: what a caching GPU allocator would have to hold, without host-heap retention)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _planned_and_live_peak(precision: str, mode: str, vocab: int, chunk: int = 0) -> tuple[dict, int]:
    """A micro-batch's forward + backward on top of existing gradients (accumulation): the
    plan's bytes and the peak live bytes."""
    cfg = _cfg("loop")
    cfg.vocab_size = vocab
    model = _training_model(cfg, precision, mode, chunk)
    B, S = 4, 128
    ids = torch.randint(0, vocab, (B, S))

    def micro_batch():
        out = model(ids, ids)  # held through the backward, as a training loop does
        out.loss.backward()

    micro_batch()  # the gradients now exist (and one-time lazy allocations are done)
    measured = live_peak_bytes(micro_batch)
    plan = memory_plan(
        cfg,
        micro_batch=B,
        seq_len=S,
        precision=precision,
        activation_checkpointing=mode,
        zero_stage=0,
        experts_impl="loop",
        loss_chunk_tokens=chunk,
    )["bytes"]
    return plan, measured


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode, vocab", [("none", 512), ("full", 512), ("full", 16)])
def test_planned_peak_matches_live_bytes(precision, mode, vocab):
    """Peak live bytes vs the plan's activations + logits gradient + recompute. vocab 512: the
    peak is the backward's start; vocab 16 with "full": a block's recompute is (the recompute
    term > 0)."""
    plan, measured = _planned_and_live_peak(precision, mode, vocab)
    planned = plan["activations"] + plan["logits_grad"] + plan["recompute"]
    assert (plan["recompute"] > 0) == (vocab == 16 and mode == "full")
    assert planned == pytest.approx(measured, rel=0.15), (planned, measured)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["none", "full"])
def test_planned_peak_matches_live_bytes_chunked_loss(precision, mode):
    """The chunked LM loss (chunks of 96 tokens: 6 chunks, the last one short) at vocab 4096,
    where the plain head's [T, vocab] tensors would be most of the peak: the plan's chunked
    head (one chunk's logits gradient + the head's gradients) against the live bytes."""
    plan, measured = _planned_and_live_peak(precision, mode, 4096, chunk=96)
    planned = plan["activations"] + plan["logits_grad"] + plan["recompute"]
    assert planned == pytest.approx(measured, rel=0.15), (planned, measured)
    cfg = _cfg("loop")
    cfg.vocab_size = 4096
    plain = memory_plan(cfg, micro_batch=4, seq_len=128, precision=precision, activation_checkpointing=mode)
    plain_peak = sum(plain["bytes"][k] for k in ("activations", "logits_grad", "recompute"))
    assert measured < plain_peak / 3  # the plain head's peak (validated above at vocab 512)


def test_parameter_and_optimizer_bytes_by_hand():
    cfg = _cfg("grouped_mm")
    n = cfg.num_params()
    expert = 2 * 8 * 3 * 64 * 32  # 2 MoE layers x 8 experts x SwiGLU
    plan = memory_plan(
        cfg, ep_size=2, world_size=4, zero_stage=2, precision="fp32", micro_batch=1, seq_len=16
    )["bytes"]
    assert plan["params"] == 4 * (n - expert + expert // 2)
    # ZeRO-2: non-expert over 4 ranks, local experts over the 2 expert-data-parallel ranks
    assert plan["grads"] == int(4 * ((n - expert) / 4 + expert / 2 / 2))
    assert plan["optimizer"] == int(8 * ((n - expert) / 4 + expert / 2 / 2))
    bf16 = memory_plan(
        cfg, ep_size=1, world_size=1, zero_stage=0, precision="bf16", micro_batch=1, seq_len=16
    )["bytes"]
    assert bf16["params"] == 2 * n and bf16["grads"] == (2 + 4) * n
    assert bf16["optimizer"] == 12 * n and bf16["a2a_buffers"] == 0


def test_chunked_head_bytes_by_hand(capsys):
    """The DeepSeekMoE 16B head at micro-batch 1 x 4096 tokens, bf16, chunks of 1024 tokens: the
    head drops the bf16 logits and their fp32 upcast for one fp32 scalar per token, and its
    backward holds one chunk's fp32 gradient and bf16 cast next to the [T, D] gradient and the
    fp32 [V, D] sum of the weight gradient instead of two fp32 [T, V] tensors. `python -m deepseek_moe.summary` passes
    loss_chunk_tokens through."""
    from deepseek_moe.errors import ConfigError
    from deepseek_moe.summary import load_model_config, main

    cfg = load_model_config("deepseek_moe_16b")
    T, D, V, N = 4096, cfg.hidden_size, cfg.vocab_size, 1024
    args = dict(ep_size=8, world_size=8, micro_batch=1, seq_len=T, activation_checkpointing="full")
    plain = memory_plan(cfg, **args)["bytes"]
    chunked = memory_plan(cfg, **args, loss_chunk_tokens=N)["bytes"]
    assert plain["activations"] - chunked["activations"] == T * V * (2 + 4) - T * 4
    assert plain["logits_grad"] == T * V * 8
    # during a chunk's cast: fp32 + bf16 logits gradient; during its product: bf16 + [V, D] bf16
    assert chunked["logits_grad"] == T * D * 2 + V * D * 4 + max(N * V * (4 + 2), N * V * 2 + V * D * 2)
    assert memory_plan(cfg, **args, loss_chunk_tokens=10 * T)["bytes"]["logits_grad"] == (
        T * D * 2 + V * D * 4 + T * V * (4 + 2)  # a chunk is at most the micro-batch
    )
    main(
        ["model=deepseek_moe_16b", "micro_batch=1", "seq_len=4096", "activation_checkpointing=full"]
        + ["ep_size=8", "world_size=8", f"loss_chunk_tokens={N}"]
    )
    printed = json.loads(capsys.readouterr().out)["memory_plan"]
    assert printed["bytes"]["logits_grad"] == chunked["logits_grad"]
    assert printed["inputs"]["loss_chunk_tokens"] == N
    with pytest.raises(ConfigError, match="loss_chunk_tokens='-1' must be a non-negative integer"):
        main(["model=deepseek_moe_16b", "loss_chunk_tokens=-1"])
    with pytest.raises(ValueError, match="loss_chunk_tokens=-1 must be >= 0"):
        memory_plan(cfg, loss_chunk_tokens=-1)
