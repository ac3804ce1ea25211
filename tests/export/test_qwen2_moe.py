"""`--format qwen2_moe`: transformers' own Qwen2MoeForCausalLM computes our logits, from a real
EP=2 DeepSpeed checkpoint; the tokenizer gives our ids; the shared-expert trick is exact."""

import glob
import sysconfig

import pytest
import torch

from deepseek_moe.export import export
from deepseek_moe.export.importer import init_weights
from deepseek_moe.export.qwen2_moe import to_tensors
from deepseek_moe.export.source import find_source
from deepseek_moe.model.transformer import DeepSeekMoEForCausalLM
from deepseek_moe.checkpoint.keys import load_consolidated_state_dict
from deepseek_moe.checkpoint.consolidate import consolidate_deepspeed_checkpoint


@pytest.fixture(scope="module")
def exported(ep2_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen") / "model"
    summary = export(ep2_runs["fp32"], out, "qwen2_moe")
    assert summary["dtype"] == "float32"
    return out


def _ours(run_dir):
    src = find_source(run_dir)
    model = DeepSeekMoEForCausalLM(src.run_cfg.model).eval()
    load_consolidated_state_dict(model, consolidate_deepspeed_checkpoint(str(src.tag_dir)))
    return model, src


def test_transformers_logits_equal_ours(ep2_runs, exported):
    from transformers import AutoModelForCausalLM

    ours, src = _ours(ep2_runs["fp32"])
    hf, info = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32, output_loading_info=True)
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert hf.config.mlp_only_layers == [0] and hf.config.num_experts_per_tok == 2
    ids = torch.randint(0, src.run_cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ours(ids).logits_BSV, hf.eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_import_round_trip_is_bit_identical(ep2_runs, exported):
    ours, src = _ours(ep2_runs["fp32"])
    back = init_weights(exported, src.run_cfg.model)
    for key, value in ours.state_dict().items():
        if "deepspeed" not in key and "experts." not in key:
            assert torch.equal(back[key], value), key
    consolidated = consolidate_deepspeed_checkpoint(str(src.tag_dir))
    assert back.keys() == consolidated.keys()
    for key, value in consolidated.items():
        assert torch.equal(back[key], value), key


def test_tokenizer_ids_equal_ours(exported, tokenizer_data):
    from transformers import AutoTokenizer

    from deepseek_moe.data import load_meta
    from deepseek_moe.data.tokenizer import Tokenizer

    hf = AutoTokenizer.from_pretrained(exported)
    ours = Tokenizer(load_meta(tokenizer_data).tokenizer_path)
    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))[:20]
    sample = [open(f, encoding="utf-8").read() for f in files]
    sample.append("naïve café ✓ 🤖 \t tabs\r\n  and 12345 digits")
    for text in sample:
        assert hf(text)["input_ids"] == ours.encode(text)
        assert hf.decode(hf(text)["input_ids"]) == text
    # the one escaped character: ours keeps U+2581 "▁", the HF tokenizer reads it as a space
    assert hf("a\u2581b")["input_ids"] == hf("a b")["input_ids"] != ours.encode("a\u2581b")
    assert hf.eos_token_id == ours.eos_id


def test_shared_expert_gate_is_neutralised_exactly():
    """sigmoid(0) == 0.5 and 0.5 * ((2 W) h) == W h bit for bit, through transformers' own
    Qwen2-MoE block; also in bf16."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    from deepseek_moe.model.ffn import SwiGLU

    assert torch.sigmoid(torch.zeros(3)).eq(0.5).all()
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        ours = SwiGLU(32, 2 * 16).to(dtype)
        cfg = Qwen2MoeConfig(
            hidden_size=32,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            shared_expert_intermediate_size=32,
        )
        block = Qwen2MoeSparseMoeBlock(cfg).to(dtype)
        weights = {f"model.layers.0.mlp.shared_experts.{k}": v for k, v in ours.state_dict().items()}
        weights["model.embed_tokens.weight"] = torch.zeros(1, 32, dtype=dtype)
        mapped = to_tensors(weights, _one_moe_layer_config())
        with torch.no_grad():
            for name in ("gate_proj", "up_proj", "down_proj"):
                block.shared_expert.get_submodule(name).weight.copy_(
                    mapped[f"model.layers.0.mlp.shared_expert.{name}.weight"]
                )
            block.shared_expert_gate.weight.copy_(mapped["model.layers.0.mlp.shared_expert_gate.weight"])
            x = torch.randn(64, 32).to(dtype)
            hf = torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
            assert torch.equal(hf, ours(x)), dtype


def _one_moe_layer_config():
    from deepseek_moe.config.model import ModelConfig, MoEConfig

    return ModelConfig(
        vocab_size=1,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        first_k_dense=0,
        moe=MoEConfig(n_routed_experts=4, top_k=2, n_shared_experts=2, moe_intermediate_size=16),
    )


@pytest.mark.parametrize("fmt", ["qwen2_moe", "deepseek"])
def test_no_shared_experts_tied_embeddings_and_free_head_dim(fmt, tmp_path):
    """Layouts the EP=2 run does not cover: Ks = 0 (qwen2_moe: a width-1 shared expert adding
    exactly 0), tied embeddings, and (qwen2_moe only) head_dim != hidden_size / num_heads."""
    from transformers import AutoModelForCausalLM

    from deepseek_moe.config.model import ModelConfig, MoEConfig
    from deepseek_moe.export import FORMATS, hf_dir
    from deepseek_moe.export.importer import read_model_config

    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=24 if fmt == "qwen2_moe" else None,
        intermediate_size=48,
        max_seq_len=16,
        init_std=0.1,
        tie_embeddings=True,
        moe=MoEConfig(
            n_routed_experts=4, n_shared_experts=0, top_k=2, moe_intermediate_size=8, norm_topk_prob=True
        ),
    )
    torch.manual_seed(0)
    ours = DeepSeekMoEForCausalLM(cfg).eval()
    layout = FORMATS[fmt]
    hf_dir.write_safetensors(tmp_path, layout.to_tensors(ours.state_dict(), cfg))
    hf_dir.write_json(
        tmp_path / "config.json", layout.config_json(cfg, dtype=torch.float32, special_ids={"eos": 2})
    )
    _, fields = read_model_config(tmp_path)
    from deepseek_moe.export.importer import config_differences

    assert config_differences(cfg, fields) == []
    back = init_weights(tmp_path, cfg)
    for key, value in ours.state_dict().items():
        assert torch.equal(back[key], value), key
    if fmt == "qwen2_moe":
        hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            want, got = ours(ids).logits_BSV, hf(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
