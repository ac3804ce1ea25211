"""The README's bad-input table, row by row: exit status 1, exactly one line on stderr that
names the key or file and the fix, no traceback, nothing left on disk.

Rows whose error is raised before anything heavy runs go through the same reporting function
as the entry points, in-process; the rows that need the trainer's wiring run `train.py`."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from deepseek_moe.config.data import DataConfig
from data_prep.prepare import ensure_prepared
from deepseek_moe.errors import TRACEBACK_ENV, ConfigError, DataError, report_user_errors
from deepseek_moe.train.cli import register_schema, run_entry, to_run_config
from deepseek_moe.train.distributed import DistInfo
from deepseek_moe.train.trainer import Trainer
from tests.train.helpers import REPO, TINY, run_train


def stderr_lines(err: str) -> list[str]:
    """The lines of stderr, without progress bars (tqdm redraws them after a carriage return)."""
    return [line for line in re.sub(r"\r[^\r\n]*", "", err).split("\n") if line]


def one_line_exit(capsys, fn, *args) -> str:
    """Run `fn` as an entry point would; return its single stderr line."""
    with pytest.raises(SystemExit) as exit_:
        report_user_errors(fn, *args)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    lines = stderr_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def check_one_line(proc, *needles: str, trained: bool = False) -> str:
    """A train.py subprocess: exit 1, one stderr line holding every needle. `trained`: the
    error came after training started, so the run's own log lines (`[12:00:00 rank0] ...`)
    precede it on stderr."""
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = stderr_lines(proc.stderr)
    if trained:
        lines = [line for line in lines if not re.match(r"\[\d\d:\d\d:\d\d rank\d+\] ", line)]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _compose(overrides):
    register_schema()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize(
    "override, needles",
    [
        ("trainer.max_stepz=5", ["Key 'max_stepz' not in 'TrainerConfig'", "--cfg job"]),
        ("trainer.max_steps=abc", ["trainer.max_steps", "could not be converted to Integer", "--cfg job"]),
        ("model=deepseek_moe_3b", ["'model/deepseek_moe_3b'", "Available options", "deepseek_moe_16b"]),
    ],
)
def test_hydra_composition_errors(override, needles, capsys, monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # run_entry sets it; restored afterwards
    line = one_line_exit(capsys, run_entry, lambda: _compose([override]))
    assert line.startswith("Config error: ")
    for needle in needles:
        assert needle in line


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["+trainer.max_stepz=5"], ["unknown key(s) ['trainer.max_stepz']", "--cfg job"]),
        (["optim.warmup_steps=500"], ["optim.warmup_steps=500", "lower optim.warmup_steps"]),
    ],
)
def test_schema_and_value_errors(overrides, needles, capsys):
    line = one_line_exit(capsys, to_run_config, _compose(overrides))
    assert line.startswith("Config error: ")
    for needle in needles:
        assert needle in line


@pytest.mark.parametrize(
    "world, overrides, needles",
    [
        (
            3,
            ["parallel.ep_size=3", "trainer.global_batch_size=24"],
            ["n_routed_experts=16 is not divisible by parallel.ep_size=3"],
        ),
        (1, ["parallel.ep_size=2"], ["parallel.ep_size=2 must divide the world size 1"]),
        (
            2,
            ["trainer.global_batch_size=12", "trainer.micro_batch_size=4"],
            ["global_batch_size=12 is not divisible by trainer.micro_batch_size=4 x world_size=2"],
        ),
    ],
)
def test_checks_that_need_the_world_size(world, overrides, needles, capsys, tmp_path):
    cfg = OmegaConf.to_object(_compose(overrides + [f"run_dir={tmp_path / 'run'}"]))
    trainer = Trainer(cfg)
    trainer.dist = DistInfo(rank=0, world_size=world, local_rank=0, device=torch.device("cpu"))
    line = one_line_exit(capsys, trainer._check_world_and_device)
    assert line.startswith("Config error: ")
    for needle in needles:
        assert needle in line
    assert not (tmp_path / "run").exists()


def _local_text(tmp_path: Path, files: dict[str, bytes]) -> DataConfig:
    src = tmp_path / "src"
    src.mkdir()
    for name, raw in files.items():
        (src / name).write_bytes(raw)
    return DataConfig(
        name="bad", source="local_text", path=str(src), out_dir=str(tmp_path / "out" / "bad"), num_proc=1
    )


@pytest.mark.parametrize(
    "files, needles",
    [
        ({}, ["matches no files", "check data.path"]),
        ({"a.txt": b"", "b.txt": b""}, ["all 2 files are empty or not UTF-8", "point data.path"]),
        (
            {"a.txt": b"caf\xe9\n", "b.txt": b"\xff\xfe\x00"},
            ["all 2 files are empty or not UTF-8", "'not_utf8': 2", "point data.path"],
        ),
    ],
    ids=["missing_data", "empty_corpus", "non_utf8"],
)
def test_data_source_errors(files, needles, capsys, tmp_path):
    cfg = _local_text(tmp_path, files)
    line = one_line_exit(capsys, ensure_prepared, cfg)
    assert line.startswith("Data error: ") and str(tmp_path / "src") in line
    for needle in needles:
        assert needle in line
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["model=deepseek_moe_3b"], ["no model preset 'deepseek_moe_3b'", "known presets"]),
        (["model=deepseek_moe_tiny", "model.moe.topk=2"], ["topk", "ModelConfig"]),
        (["model=deepseek_moe_tiny", "seq_len=long"], ["seq_len='long' must be a positive integer"]),
    ],
)
def test_summary_cli(argv, needles, capsys):
    from deepseek_moe import summary

    line = one_line_exit(capsys, summary.main, argv)
    assert line.startswith("Config error: ")
    for needle in needles:
        assert needle in line


def test_consolidate_cli(tmp_path, capsys):
    from deepseek_moe.checkpoint import consolidate as checkpoint

    line = one_line_exit(capsys, checkpoint.main, [str(tmp_path), "--out", str(tmp_path / "m.pt")])
    assert line.startswith("Checkpoint error: ") and "pass a DeepSpeed tag directory" in line
    assert list(tmp_path.iterdir()) == []


def test_traceback_on_request(capsys, monkeypatch):
    monkeypatch.setenv(TRACEBACK_ENV, "1")  # the exception itself, not SystemExit(1)
    with pytest.raises(ValueError, match="optim.warmup_steps=500"):
        report_user_errors(to_run_config, _compose(["optim.warmup_steps=500"]))


def test_programming_errors_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        report_user_errors(lambda: 1 / 0)
    assert issubclass(DataError, ValueError) and issubclass(ConfigError, ValueError)


def test_tokenizer_larger_than_model_vocab(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(
        TINY + tiny_data + ["model.vocab_size=256", "logger=none", f"run_dir={run_dir}"],
        check=False,
        timeout=120,
    )
    check_one_line(
        proc,
        "Config error: model.vocab_size=256 is smaller than the tokenizer vocab 512",
        "set model.vocab_size >= 512",
    )
    assert not run_dir.exists()


def reprepared_copy(tiny_data, dest: Path) -> list[str]:
    """The tiny data as if re-prepared from changed sources: same files and format, another
    source fingerprint (so another data fingerprint); returns overrides that point at it."""
    out = Path(next(o for o in tiny_data if o.startswith("data.out_dir=")).split("=", 1)[1])
    shutil.copytree(out, dest)
    from deepseek_moe.data.meta import load_meta

    meta = load_meta(dest)
    meta.source_fingerprint = "0" * 16
    meta.fingerprint = meta.compute_fingerprint()
    (dest / "meta.json").write_text(meta.to_json())
    return [o for o in tiny_data if not o.startswith("data.out_dir=")] + [f"data.out_dir={dest}"]
