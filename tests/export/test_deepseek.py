"""`--format deepseek`: config.json and tensors exactly as DeepSeek's DeepSeekMoE release;
export -> import reproduces our logits exactly; a bf16 run exports its fp32 master weights."""

import json

import pytest
import torch
from safetensors.torch import load_file

from deepseek_moe.export import export
from deepseek_moe.export.importer import check_init_from, init_weights
from deepseek_moe.export.source import find_source
from deepseek_moe.model.transformer import DeepSeekMoEForCausalLM
from deepseek_moe.checkpoint.keys import load_consolidated_state_dict
from deepseek_moe.checkpoint.consolidate import consolidate_deepspeed_checkpoint

# The keyword arguments of `DeepseekConfig.__init__` in the release's configuration_deepseek.py
# (deepseek-ai/deepseek-moe-16b-base), plus what PretrainedConfig serialises with them.
RELEASE_CONFIG_FIELDS = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "n_shared_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_layer_freq",
    "first_k_dense_replace",
    "norm_topk_prob",
    "scoring_func",
    "aux_loss_alpha",
    "seq_aux",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "pretraining_tp",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "attention_dropout",
    "architectures",
    "model_type",
    "torch_dtype",
}


def release_tensor_shapes(c: dict) -> dict[str, tuple]:
    """Parameter names and shapes of the release's modeling_deepseek.py for config `c`:
    DeepseekModel (embed_tokens, layers, norm) + lm_head; DeepseekDecoderLayer (self_attn
    q/k/v/o_proj, input/post_attention_layernorm, mlp); `mlp` is DeepseekMoE when
    n_routed_experts and layer_idx >= first_k_dense_replace and layer_idx % moe_layer_freq == 0
    (gate.weight [E, D] of MoEGate; experts.{e} DeepseekMLP of moe_intermediate_size;
    shared_experts DeepseekMLP of moe_intermediate_size * n_shared_experts), else DeepseekMLP
    of intermediate_size. No biases (attention_bias false)."""
    D, V = c["hidden_size"], c["vocab_size"]
    hd = D // c["num_attention_heads"]

    def mlp(prefix, width):
        return {
            f"{prefix}.gate_proj.weight": (width, D),
            f"{prefix}.up_proj.weight": (width, D),
            f"{prefix}.down_proj.weight": (D, width),
        }

    out = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out.update(
            {
                f"{p}.self_attn.q_proj.weight": (c["num_attention_heads"] * hd, D),
                f"{p}.self_attn.k_proj.weight": (c["num_key_value_heads"] * hd, D),
                f"{p}.self_attn.v_proj.weight": (c["num_key_value_heads"] * hd, D),
                f"{p}.self_attn.o_proj.weight": (D, c["num_attention_heads"] * hd),
                f"{p}.input_layernorm.weight": (D,),
                f"{p}.post_attention_layernorm.weight": (D,),
            }
        )
        if c["n_routed_experts"] and i >= c["first_k_dense_replace"] and i % c["moe_layer_freq"] == 0:
            H = c["moe_intermediate_size"]
            out[f"{p}.mlp.gate.weight"] = (c["n_routed_experts"], D)
            for e in range(c["n_routed_experts"]):
                out.update(mlp(f"{p}.mlp.experts.{e}", H))
            out.update(mlp(f"{p}.mlp.shared_experts", H * c["n_shared_experts"]))
        else:
            out.update(mlp(f"{p}.mlp", c["intermediate_size"]))
    return out


@pytest.fixture(scope="module")
def exported(ep2_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("deepseek") / "model"
    export(ep2_runs["fp32"], out)
    return out


def _tensors(model_dir):
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(model_dir / shard))
    assert sorted(index["weight_map"]) == sorted(out)
    return out


def test_config_fields_are_the_releases(exported, ep2_runs):
    config = json.loads((exported / "config.json").read_text())
    assert set(config) == RELEASE_CONFIG_FIELDS
    cfg = find_source(ep2_runs["fp32"]).run_cfg.model
    assert config["model_type"] == "deepseek" and config["architectures"] == ["DeepseekForCausalLM"]
    assert (
        config["num_hidden_layers"],
        config["first_k_dense_replace"],
        config["n_routed_experts"],
        config["n_shared_experts"],
        config["num_experts_per_tok"],
        config["moe_intermediate_size"],
    ) == (3, 1, 4, 2, 2, 16)
    assert config["scoring_func"] == "softmax" and config["norm_topk_prob"] is False
    assert config["moe_layer_freq"] == 1 and config["vocab_size"] == cfg.vocab_size
    assert config["torch_dtype"] == "float32"
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"] == 2


def test_tensor_names_and_shapes_are_the_releases(exported):
    config = json.loads((exported / "config.json").read_text())
    got = {k: tuple(v.shape) for k, v in _tensors(exported).items()}
    assert got == release_tensor_shapes(config)


def test_import_reproduces_logits_exactly(exported, ep2_runs):
    src = find_source(ep2_runs["fp32"])
    cfg = src.run_cfg.model
    ours = DeepSeekMoEForCausalLM(cfg).eval()
    load_consolidated_state_dict(ours, consolidate_deepspeed_checkpoint(str(src.tag_dir)))
    torch.manual_seed(5)
    imported = DeepSeekMoEForCausalLM(cfg).eval()  # a different random init, then overwritten
    load_consolidated_state_dict(imported, init_weights(exported, cfg))
    for key, value in ours.state_dict().items():
        assert torch.equal(imported.state_dict()[key], value), key
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(imported(ids).logits_BSV, ours(ids).logits_BSV)
    check_init_from(_with_init_from(src.run_cfg, exported))  # the run's own config matches


def _with_init_from(run_cfg, path):
    import copy

    cfg = copy.deepcopy(run_cfg)
    cfg.model.init_from = str(path)
    return cfg


def test_bf16_run_exports_fp32_master_weights(ep2_runs, tmp_path):
    """The masters are what the bf16 weights were rounded from, for every parameter including
    the experts that lived on EP rank 1; they hold more bits than the bf16 copies."""
    src = find_source(ep2_runs["bf16"])
    bf16 = consolidate_deepspeed_checkpoint(str(src.tag_dir))
    summary = export(ep2_runs["bf16"], tmp_path / "out")
    assert summary["dtype"] == "float32"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "float32"
    masters = _tensors(tmp_path / "out")
    assert "model.layers.2.mlp.experts.3.down_proj.weight" in masters
    more_bits = 0
    for key, low in bf16.items():
        if key.endswith("e_score_correction_bias"):
            continue
        assert low.dtype == torch.bfloat16 and masters[key].dtype == torch.float32
        assert torch.equal(masters[key].bfloat16(), low), key
        more_bits += int(not torch.equal(masters[key], low.float()))
    assert more_bits > len(bf16) // 2


def test_import_at_ep2_gives_every_rank_its_experts(ep2_runs):
    """Export, then `load_init_from` at EP=2 (in the conftest's 2-process run): the gathered
    weights are the checkpoint's, bit for bit."""
    src = find_source(ep2_runs["fp32"])
    got = ep2_runs["ep2_import"]
    want = consolidate_deepspeed_checkpoint(str(src.tag_dir))
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


# config.json of DeepSeek's published deepseek-moe-16b-base.
RELEASE_16B_CONFIG = {
    "architectures": ["DeepseekForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekConfig",
        "AutoModel": "modeling_deepseek.DeepseekModel",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "max_position_embeddings": 4096,
    "model_type": "deepseek",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 28,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0",
    "use_cache": True,
    "vocab_size": 102400,
}


def test_16b_preset_is_the_published_16b():
    """Our 16B preset imports DeepSeek's checkpoint (no field differs) and exports its config."""
    from omegaconf import OmegaConf

    from deepseek_moe.config.model import ModelConfig
    from deepseek_moe.export import deepseek
    from deepseek_moe.export.importer import config_differences
    from tests.train.helpers import REPO

    preset = OmegaConf.to_object(
        OmegaConf.merge(
            OmegaConf.structured(ModelConfig), OmegaConf.load(REPO / "conf/model/deepseek_moe_16b.yaml")
        )
    )
    assert config_differences(preset, deepseek.model_config_fields(RELEASE_16B_CONFIG)) == []
    ours = deepseek.config_json(preset, dtype=torch.bfloat16, special_ids={"bos": 100000, "eos": 100001})
    assert set(ours) == set(RELEASE_16B_CONFIG) - {"auto_map", "transformers_version"}
    differ = {k for k in ours if ours[k] != RELEASE_16B_CONFIG[k]}
    assert differ == {"initializer_range"}  # the paper's 0.006 (the release file says 0.02)
