"""The decoder: HF Llama parity (dense path), loss contract, aux losses, metrics, overfitting."""

import math

import pytest
import torch

from deepseek_moe.config.model import ModelConfig, MoEConfig
from deepseek_moe.model.moe import MoELayer
from deepseek_moe.model.transformer import DeepSeekMoEForCausalLM


def _tiny(**kw) -> ModelConfig:
    base = dict(
        vocab_size=64,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        intermediate_size=48,
        max_seq_len=16,
        init_std=0.05,
        moe=MoEConfig(
            n_routed_experts=8,
            n_shared_experts=1,
            top_k=2,
            moe_intermediate_size=16,
            n_groups=2,
            topk_groups=1,
        ),
    )
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_dense_model_matches_hf_llama(num_kv_heads):
    """Attention (RoPE, causal SDPA, GQA), RMSNorm, SwiGLU and the HF key layout, end to end."""
    import transformers

    cfg = _tiny(moe=None, num_kv_heads=num_kv_heads, rope_theta=500.0)
    torch.manual_seed(0)
    ours = DeepSeekMoEForCausalLM(cfg)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    hf.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    torch.testing.assert_close(ours(ids).logits_BSV, hf(ids).logits, rtol=1e-4, atol=1e-5)


def test_loss_contract_shifted_labels_and_ignore_index():
    cfg = _tiny()
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(cfg)
    ids = torch.randint(0, 64, (2, 10))
    labels = torch.randint(0, 64, (2, 10))
    labels[0, :4] = -100
    out = model(ids, labels)
    logits = out.logits_BSV
    keep = labels != -100
    ref = torch.nn.functional.cross_entropy(logits[keep], labels[keep])  # already shifted
    torch.testing.assert_close(out.lm_loss, ref)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    assert set(out.aux_losses) == {"expert_balance"}
    torch.testing.assert_close(out.aux_loss, sum(out.aux_losses.values()))
    # All labels ignored: 0, not NaN. No labels: no loss.
    assert model(ids, torch.full_like(labels, -100)).lm_loss.item() == 0.0
    assert model(ids).loss is None
    with pytest.raises(ValueError, match="already-shifted"):
        model(ids, labels[:, 1:])


def test_aux_losses_summed_over_layers():
    cfg = _tiny(
        moe=MoEConfig(
            n_routed_experts=8,
            top_k=2,
            moe_intermediate_size=16,
            n_groups=2,
            topk_groups=1,
            aux_loss_alpha=0.01,
            device_aux_alpha=0.1,
            z_loss_coef=1e-3,
        )
    )
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(cfg)
    per_layer = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o: per_layer.append(o[1])) for layer in model.moe_layers()
    ]
    out = model(torch.randint(0, 64, (2, 8)))
    for h in hooks:
        h.remove()
    assert len(per_layer) == 2  # layers 1 and 2 (first_k_dense = 1)
    for name in ("expert_balance", "device_balance", "z_loss"):
        torch.testing.assert_close(out.aux_losses[name], per_layer[0][name] + per_layer[1][name])


def test_dense_model_has_zero_aux_loss():
    out = DeepSeekMoEForCausalLM(_tiny(moe=None))(torch.randint(0, 64, (1, 4)), torch.randint(0, 64, (1, 4)))
    assert out.aux_loss.item() == 0.0 and out.aux_losses == {}


def test_router_metrics_and_bias_update():
    cfg = _tiny(moe=MoEConfig(n_routed_experts=8, top_k=2, moe_intermediate_size=16, bias_update_rate=0.01))
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(cfg)
    model.train()
    model(torch.randint(0, 64, (2, 8)))
    m = model.router_metrics(reset=True)
    for L in (1, 2):
        for name in ("load_imbalance", "router_entropy", "dropped_frac", "ranks_per_token"):
            assert f"moe/layer{L}/{name}" in m
    assert model.router_metrics() == {}
    layer = next(model.moe_layers())
    load = layer.gate.pending_load_E.clone()
    assert load.sum() == 2 * 8 * 2
    model.update_router_bias()
    torch.testing.assert_close(layer.gate.e_score_correction_bias, -0.01 * torch.sign(load - load.mean()))
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in model.state_dict()


def test_meta_build_then_materialise():
    cfg = _tiny()
    with torch.device("meta"):
        model = DeepSeekMoEForCausalLM(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    ref = DeepSeekMoEForCausalLM(cfg)
    rope, rope_ref = model.model.layers[0].self_attn.rotary, ref.model.layers[0].self_attn.rotary
    torch.testing.assert_close(rope.cos, rope_ref.cos)
    out = model(torch.randint(0, 64, (1, 8)), torch.randint(0, 64, (1, 8)))
    assert torch.isfinite(out.loss)


def test_tied_embeddings_share_storage():
    model = DeepSeekMoEForCausalLM(_tiny(tie_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tiny_model_overfits_fixed_batch():
    cfg = _tiny(
        num_layers=2,
        moe=MoEConfig(
            n_routed_experts=8,
            n_shared_experts=1,
            top_k=2,
            moe_intermediate_size=16,
            n_groups=2,
            topk_groups=1,
        ),
    )
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    window = torch.randint(0, 64, (4, 17))
    ids, labels = window[:, :-1], window[:, 1:]
    first = None
    for _ in range(60):
        out = model(ids, labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        model.update_router_bias()
        first = out.lm_loss.item() if first is None else first
    assert first > math.log(64) - 0.5
    assert out.lm_loss.item() < 0.5, (first, out.lm_loss.item())
    assert isinstance(next(model.moe_layers()), MoELayer)


def test_bf16_cast_keeps_router_and_rope_buffers_fp32():
    """DeepSpeed bf16 casts the whole module: the V3 bias, loads, stats and RoPE tables must not
    be rounded to bf16 (a 1e-3 bias step would vanish next to a bias of 1)."""
    cfg = _tiny(moe=MoEConfig(n_routed_experts=8, top_k=2, moe_intermediate_size=16, bias_update_rate=1e-3))
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(cfg)
    layer = next(model.moe_layers())
    with torch.no_grad():
        layer.gate.e_score_correction_bias.fill_(1.0 + 1e-3)  # not representable in bf16
    model = model.to(torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert layer.gate.e_score_correction_bias.dtype == torch.float32
    assert layer.gate.e_score_correction_bias[0].item() == pytest.approx(1.001, abs=1e-7)
    assert layer.stats.counters.dtype == torch.float64
    assert model.model.layers[0].self_attn.rotary.cos.dtype == torch.float32
    model.train()
    out = model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    assert out.logits_BSV.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert layer.gate.pending_load_E.dtype == torch.float32 and layer.gate.pending_load_E.sum() == 32


def test_model_code_imports_no_training_config():
    """The model is configured when it is built (its options are constructor arguments), so the
    model package reads no training config: no import of deepseek_moe.config.train anywhere."""
    import ast
    from pathlib import Path

    import deepseek_moe.model

    offenders = []
    for path in sorted(Path(deepseek_moe.model.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n == "deepseek_moe.config.train" for n in names):
                offenders.append(path.name)
    assert offenders == []
    # configured at build time; the forward does not re-check the options
    model = DeepSeekMoEForCausalLM(_tiny(), activation_checkpointing="full", loss_chunk_tokens=8)
    assert (model.activation_checkpointing, model.loss_chunk_tokens) == ("full", 8)
