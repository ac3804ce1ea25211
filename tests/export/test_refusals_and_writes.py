"""What a format cannot represent is refused with each difference named (flags accept the
documented changes); writes are staged in a temp directory and renamed; `init_from` names every
mismatching field."""

import dataclasses

import torch

import pytest

from deepseek_moe.config.model import ModelConfig, MoEConfig
from deepseek_moe.errors import ConfigError, ExportError
from deepseek_moe.export import export, exporter
from deepseek_moe.export.__main__ import main
from deepseek_moe.export.importer import check_init_from, config_differences, read_model_config
from deepseek_moe.export.refusals import Accept, check_representable


def _cfg(**moe):
    base = dict(n_routed_experts=8, top_k=2, n_groups=4, topk_groups=4)
    base.update(moe)
    return ModelConfig(hidden_size=64, num_heads=2, moe=MoEConfig(**base))


def test_plain_model_is_representable_in_both_formats():
    for head_dim_free in (False, True):
        assert check_representable(_cfg(), "x", Accept(), head_dim_free=head_dim_free) == []


def test_every_difference_is_named():
    cfg = _cfg(
        topk_groups=1,
        scoring_func="sigmoid",
        routed_scaling_factor=2.5,
        bias_update_rate=1e-3,
        capacity_factor=1.0,
    )
    cfg = dataclasses.replace(cfg, head_dim=48)
    with pytest.raises(ExportError) as err:
        check_representable(cfg, "deepseek", Accept(), head_dim_free=False)
    msg = str(err.value)
    for needle in (
        "topk_groups=1 < moe.n_groups=4",
        "--drop-group-limit",
        "bias_update_rate",
        "--drop-router-bias",
        "scoring_func='sigmoid'",
        "routed_scaling_factor=2.5",
        "head_dim=48",
    ):
        assert needle in msg
    assert "capacity" not in msg  # capacity dropping never happens at inference
    with pytest.raises(ExportError) as err:  # qwen2_moe has a head_dim field
        check_representable(cfg, "qwen2_moe", Accept(), head_dim_free=True)
    assert "head_dim" not in str(err.value)


def test_flags_accept_only_their_documented_change():
    both = Accept(drop_group_limit=True, drop_router_bias=True)
    accepted = check_representable(
        _cfg(topk_groups=1, bias_update_rate=1e-3), "deepseek", both, head_dim_free=False
    )
    assert len(accepted) == 2 and "plain top-2" in accepted[0]
    with pytest.raises(ExportError, match="scoring_func"):
        check_representable(
            _cfg(topk_groups=1, scoring_func="sigmoid"), "deepseek", both, head_dim_free=False
        )


def test_non_empty_out_needs_force_and_failures_leave_nothing(ep2_runs, tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="--force"):
        export(ep2_runs["fp32"], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(exporter, "write_tokenizer", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export(ep2_runs["fp32"], out, force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the old directory is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # and no temp directory is left
    monkeypatch.undo()
    export(ep2_runs["fp32"], out, force=True)
    assert "keep.txt" not in {p.name for p in out.iterdir()}
    assert (out / "config.json").is_file() and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_cli_reports_user_errors_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), "--out", str(tmp_path / "o")])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("Export error: ") and err.count("\n") == 1


def test_init_from_names_each_mismatching_field(ep2_runs, tmp_path):
    from deepseek_moe.export.source import find_source

    export(ep2_runs["fp32"], tmp_path / "m", "qwen2_moe")
    _, fields = read_model_config(tmp_path / "m")
    cfg = find_source(ep2_runs["fp32"]).run_cfg.model
    assert config_differences(cfg, fields) == []
    other = dataclasses.replace(cfg, hidden_size=48, moe=dataclasses.replace(cfg.moe, top_k=3))
    assert config_differences(other, fields) == [
        "model.hidden_size=48 (checkpoint: 32)",
        "model.moe.top_k=3 (checkpoint: 2)",
    ]
    run_cfg = find_source(ep2_runs["fp32"]).run_cfg
    run_cfg.model = dataclasses.replace(other, init_from=str(tmp_path / "m"), vocab_size=7)
    with pytest.raises(ConfigError, match=r"hidden_size=48 \(checkpoint: 32\); model.moe.top_k=3"):
        check_init_from(run_cfg)
    assert run_cfg.model.vocab_size == fields["vocab_size"]  # the vocab follows the checkpoint
    with pytest.raises(ConfigError, match="model_type"):
        (tmp_path / "m" / "config.json").write_text('{"model_type": "llama"}')
        read_model_config(tmp_path / "m")


def test_train_starts_from_init_from(ep2_runs, tokenizer_data, tmp_path):
    """train.py with model.init_from: at an LR too small to move a weight, the run's first
    checkpoint holds exactly the imported weights (a random init would not)."""
    from deepseek_moe.export.source import find_source, read_weights
    from tests.train.helpers import run_train

    export(ep2_runs["fp32"], tmp_path / "init")
    m = find_source(ep2_runs["fp32"]).run_cfg.model
    overrides = [
        f"model.init_from={tmp_path / 'init'}",
        f"run_dir={tmp_path / 'run'}",
        f"data.out_dir={tokenizer_data}",
        "data.max_documents=12",
        "data.vocab_size=512",
        "data.val_fraction=0.2",
        "data.tokenizer_sentences=5000",
        "data.num_proc=1",
        f"model.hidden_size={m.hidden_size}",
        f"model.num_layers={m.num_layers}",
        f"model.num_heads={m.num_heads}",
        f"model.num_kv_heads={m.num_kv_heads}",
        f"model.head_dim={m.head_dim}",
        f"model.intermediate_size={m.intermediate_size}",
        f"model.max_seq_len={m.max_seq_len}",
        f"model.first_k_dense={m.first_k_dense}",
        f"model.moe.n_routed_experts={m.moe.n_routed_experts}",
        f"model.moe.top_k={m.moe.top_k}",
        f"model.moe.n_shared_experts={m.moe.n_shared_experts}",
        f"model.moe.moe_intermediate_size={m.moe.moe_intermediate_size}",
        "model.moe.n_groups=1",
        "model.moe.topk_groups=1",
        "optim.lr=1e-30",
        "optim.weight_decay=0",
        "optim.warmup_steps=0",
        "trainer.max_steps=1",
        "trainer.global_batch_size=2",
        "trainer.micro_batch_size=2",
        "trainer.eval_every=0",
        "logger=none",
    ]
    run_train(overrides)
    got, _ = read_weights(find_source(tmp_path / "run"))
    want, _ = read_weights(find_source(ep2_runs["fp32"]))
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_shards_and_index_hold_every_tensor_once(tmp_path):
    import json

    from deepseek_moe.export import hf_dir

    tensors = {f"t{i}": torch.full((i + 1, 4), float(i)) for i in range(7)}
    tensors["tied"] = tensors["t0"]  # shared storage is written as its own copy
    names = hf_dir.write_safetensors(tmp_path, tensors, max_shard_bytes=64)
    assert len(names) > 2 and names[0] == f"model-00001-of-{len(names):05d}.safetensors"
    index = json.loads((tmp_path / hf_dir.INDEX_FILE).read_text())
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
    back = hf_dir.read_safetensors(tmp_path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    assert hf_dir.read_safetensors(tmp_path, keep=lambda k: k == "t3").keys() == {"t3"}
