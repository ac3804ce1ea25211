"""Launch hygiene: the training job prepares only small corpora itself (the rest get the
preparation command in one line), and the process-group timeout comes from the config."""

from __future__ import annotations

import shlex
import sysconfig
from pathlib import Path

import pytest
import torch

from deepseek_moe.config.data import DataConfig, MixtureSource
from deepseek_moe.errors import DataError
from deepseek_moe.train.prepare_budget import check_in_job_budget, estimated_source_bytes


def test_the_default_corpus_is_prepared_in_job(tmp_path):
    cfg = DataConfig(out_dir=str(tmp_path / "stdlib"))
    size = estimated_source_bytes(cfg)
    # independent count: every .py under the stdlib outside the excluded directories
    root = Path(sysconfig.get_paths()["stdlib"])
    want = sum(
        p.stat().st_size
        for p in root.rglob("*.py")
        if not set(p.relative_to(root).parts[:-1])
        & {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    )
    assert size == want and 1e6 < size < cfg.prepare_in_job_max_mb * 1e6
    check_in_job_budget(cfg)  # no error: the default command still prepares by itself


def test_a_large_corpus_gets_the_prepare_command(tmp_path):
    from data_prep.prepare import compose_data_config

    corpus = tmp_path / "corpus dir"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_bytes(b"x" * 700_000)
    (corpus / "sub" / "b.txt").write_bytes(b"y" * 600_000)
    (corpus / "sub" / "c.md").write_bytes(b"z" * 5_000_000)  # not matched by file_pattern
    cfg = DataConfig(
        name="big",
        source="local_text",
        path=str(corpus),
        val_fraction=0.01,
        exclude_dirs=[],
        out_dir=str(tmp_path / "big"),
        prepare_in_job_max_mb=1,
        sources=[],
    )
    assert estimated_source_bytes(cfg) == 1_300_000
    with pytest.raises(DataError) as err:
        check_in_job_budget(cfg)
    line = err.value.one_line()
    assert "about 1 MB of source, above data.prepare_in_job_max_mb=1" in line
    command = line.split("then relaunch: ")[1]
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "data_prep.prepare"]
    assert not any(a.startswith(("data.prepare_in_job_max_mb", "data.sources")) for a in argv)
    # the printed command composes the very same data config (what training will then read)
    assert compose_data_config(argv[3:]) == DataConfig(**{**vars(cfg), "prepare_in_job_max_mb": 200})

    # within the budget it is prepared in-job; once prepared, it is never estimated
    check_in_job_budget(DataConfig(**{**vars(cfg), "prepare_in_job_max_mb": 2}))
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "meta.json").write_text("{}")
    check_in_job_budget(cfg)


def test_a_hub_dataset_is_always_prepared_first(tmp_path):
    cfg = DataConfig(
        name="hub", source="hf_hub", path="roneneldan/TinyStories", out_dir=str(tmp_path / "hub")
    )
    with pytest.raises(
        DataError, match=r"hub dataset .*python -m data_prep.prepare data.name=hub data.source=hf_hub"
    ):
        check_in_job_budget(cfg)


def test_training_only_fields_are_not_part_of_the_preparation():
    from data_prep.prepare import _prepare_config

    plain = _prepare_config(DataConfig())
    mixed = _prepare_config(DataConfig(sources=[MixtureSource(out_dir="x")], prepare_in_job_max_mb=5))
    assert plain == mixed and "sources" not in plain and "prepare_in_job_max_mb" not in plain


def test_process_group_timeout_reaches_deepspeed(monkeypatch):
    import datetime

    import deepspeed

    from deepseek_moe.config.train import ParallelConfig
    from deepseek_moe.train import distributed

    calls = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    distributed.init_distributed(ParallelConfig(process_group_timeout_min=45).process_group_timeout_min)
    assert calls[-1]["timeout"] == datetime.timedelta(minutes=45)
    assert ParallelConfig().process_group_timeout_min == 30.0
    with pytest.raises(ValueError, match="parallel.process_group_timeout_min=0"):
        ParallelConfig(process_group_timeout_min=0)
