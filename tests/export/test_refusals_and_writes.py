"""What a format cannot represent is refused with each difference named (flags accept the
documented changes); writes are staged in a temp directory and renamed; `init_from` names every
mismatching field."""

import dataclasses

import pytest

from deepseek_moe.config.model import ModelConfig, MoEConfig
from deepseek_moe.errors import ConfigError, ExportError
from deepseek_moe.export import export, exporter
from deepseek_moe.export.__main__ import main
from deepseek_moe.export.importer import config_differences, read_model_config
from deepseek_moe.export.refusals import Accept, check_representable


def _cfg(**moe):
    base = dict(n_routed_experts=8, top_k=2, n_groups=4, topk_groups=4)
    base.update(moe)
    return ModelConfig(hidden_size=64, num_heads=2, moe=MoEConfig(**base))


def test_plain_model_is_representable_in_both_formats():
    for head_dim_free in (False, True):
        assert check_representable(_cfg(), "x", Accept(), head_dim_free=head_dim_free) == []


def test_every_difference_is_named():
    cfg = _cfg(topk_groups=1, scoring_func="sigmoid", routed_scaling_factor=2.5,
               bias_update_rate=1e-3, capacity_factor=1.0)
    cfg = dataclasses.replace(cfg, head_dim=48)
    with pytest.raises(ExportError) as err:
        check_representable(cfg, "deepseek", Accept(), head_dim_free=False)
    msg = str(err.value)
    for needle in ("topk_groups=1 < moe.n_groups=4", "--drop-group-limit", "bias_update_rate",
                   "--drop-router-bias", "scoring_func='sigmoid'", "routed_scaling_factor=2.5",
                   "head_dim=48"):
        assert needle in msg
    assert "capacity" not in msg  # capacity dropping never happens at inference
    with pytest.raises(ExportError) as err:  # qwen2_moe has a head_dim field
        check_representable(cfg, "qwen2_moe", Accept(), head_dim_free=True)
    assert "head_dim" not in str(err.value)


def test_flags_accept_only_their_documented_change():
    both = Accept(drop_group_limit=True, drop_router_bias=True)
    accepted = check_representable(_cfg(topk_groups=1, bias_update_rate=1e-3), "deepseek", both,
                                   head_dim_free=False)
    assert len(accepted) == 2 and "plain top-2" in accepted[0]
    with pytest.raises(ExportError, match="scoring_func"):
        check_representable(_cfg(topk_groups=1, scoring_func="sigmoid"), "deepseek", both,
                            head_dim_free=False)


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
    assert str(exit_.value).startswith("Export error: ") and "\n" not in str(exit_.value)


def test_init_from_names_each_mismatching_field(ep2_runs, tmp_path):
    from deepseek_moe.export.source import find_source

    export(ep2_runs["fp32"], tmp_path / "m", "qwen2_moe")
    _, fields = read_model_config(tmp_path / "m")
    cfg = find_source(ep2_runs["fp32"]).run_cfg.model
    assert config_differences(cfg, fields) == []
    other = dataclasses.replace(cfg, hidden_size=48, moe=dataclasses.replace(cfg.moe, top_k=3))
    assert config_differences(other, fields) == ["model.hidden_size=48 (checkpoint: 32)",
                                                 "model.moe.top_k=3 (checkpoint: 2)"]
    with pytest.raises(ConfigError, match="model_type"):
        (tmp_path / "m" / "config.json").write_text('{"model_type": "llama"}')
        read_model_config(tmp_path / "m")
