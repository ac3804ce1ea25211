"""train.py on a two-source mixture: per-source tokens and val losses in metrics.jsonl, exact
resume from world 2 to world 1, and the repetition cap as one line before anything is written.

Source "stdlib" is the session's tiny python_stdlib preparation; source "code" is this repo's
own modules prepared as local_text with the stdlib's tokenizer (data.tokenizer_model)."""

from __future__ import annotations

import shutil

import pytest

from deepseek_moe.data.meta import load_meta
from deepseek_moe.errors import DataError
from deepseek_moe.train.metrics import read_metrics
from tests.train.helpers import REPO, TINY, run_train

BASE = [o for o in TINY if not o.startswith("trainer.micro_batch_size")] + [
    "trainer.micro_batch_size=2",
    "trainer.max_steps=4",
    "trainer.eval_every=2",
    "checkpoint.every=0",
    "logger=none",
]


@pytest.fixture(scope="module")
def mixture(tiny_data, tmp_path_factory):
    from data_prep.prepare import ensure_prepared
    from deepseek_moe.config.data import DataConfig

    stdlib_dir = next(o.split("=", 1)[1] for o in tiny_data if o.startswith("data.out_dir="))
    root = tmp_path_factory.mktemp("mixture")
    texts = root / "texts"
    texts.mkdir()
    for i, path in enumerate(sorted((REPO / "deepseek_moe").rglob("*.py"))[:30]):
        (texts / f"{i:02d}.txt").write_text(path.read_text())
    code_dir = root / "code"
    ensure_prepared(
        DataConfig(
            name="code",
            source="local_text",
            path=str(texts),
            tokenizer_model=f"{stdlib_dir}/tokenizer.model",
            val_fraction=0.1,
            num_proc=1,
            out_dir=str(code_dir),
        )
    )
    sources = f"data.sources=[{{out_dir: {stdlib_dir}, weight: 3, name: stdlib}}, {{out_dir: {code_dir}, weight: 1}}]"
    return root, BASE + [sources]


def _train_rows(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_mixture_resumes_from_world_2_to_1_with_per_source_metrics(mixture):
    root, base = mixture
    run_train(base + [f"run_dir={root / 'reference'}"], nproc=1)
    stopped = root / "stopped"
    run_train(base + [f"run_dir={stopped}", "trainer.max_steps_per_launch=2"], nproc=2, launcher="torchrun")
    resumed = root / "resumed"
    shutil.copytree(stopped, resumed)
    proc = run_train(base + [f"run_dir={resumed}"], nproc=1)
    assert "resumed from" in proc.stdout + proc.stderr

    ref, got = _train_rows(root / "reference"), _train_rows(resumed)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for want, row in zip(ref, got, strict=True):
        # G=8 at weights 3:1: 6 stdlib + 2 code windows of 64 tokens per step
        assert row["tokens_seen/stdlib"] == want["tokens_seen/stdlib"] == 6 * 64 * row["step"]
        assert row["tokens_seen/code"] == want["tokens_seen/code"] == 2 * 64 * row["step"]
        assert row["loss"] == pytest.approx(want["loss"], abs=1e-5, rel=0), row["step"]

    evals = [r for r in read_metrics(resumed / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["val_loss"] == pytest.approx(
            0.75 * r["val_loss/stdlib"] + 0.25 * r["val_loss/code"], rel=1e-9
        )
        assert r["val_loss/stdlib"] != r["val_loss/code"]
    ref_evals = [r for r in read_metrics(root / "reference" / "metrics.jsonl") if "val_loss" in r]
    assert evals[-1]["val_loss/code"] == pytest.approx(ref_evals[-1]["val_loss/code"], abs=1e-5)


def _setup_data(overrides):
    """The trainer's data setup phases, in-process at world 1 (they run before anything is
    written: see Trainer._setup)."""
    import torch
    from omegaconf import OmegaConf

    from deepseek_moe.train.distributed import DistInfo
    from deepseek_moe.train.loaders import build_loaders, prepare_data
    from deepseek_moe.train.trainer import Trainer
    from tests.train.helpers import compose_config

    trainer = Trainer(OmegaConf.to_object(compose_config(overrides)))
    trainer.dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    trainer.train_loader, trainer.val_loader = build_loaders(
        trainer.cfg, trainer.dist, prepare_data(trainer.cfg, trainer.dist)
    )
    return trainer


def test_repetition_cap_and_another_tokenizer_fail_at_setup(mixture, tmp_path):
    root, base = mixture
    trainer = _setup_data(base + ["data.sources.1.max_repetitions=1"])  # 4 steps: far below one epoch
    assert set(trainer.val_loader.loaders) == {"stdlib", "code"}
    with pytest.raises(DataError, match=r"^mixture source 'code' would be read .* max_repetitions=0.01;"):
        _setup_data(base + ["data.sources.1.max_repetitions=0.01", "trainer.max_steps=400"])

    # the code source again, as if prepared with another tokenizer
    other = tmp_path / "other"
    shutil.copytree(root / "code", other)
    meta = load_meta(other)
    meta.tokenizer_sha256 = "0" * 64
    meta.fingerprint = meta.compute_fingerprint()
    (other / "meta.json").write_text(meta.to_json())
    sources = f"data.sources=[{{out_dir: {root / 'code'}}}, {{out_dir: {other}}}]"
    with pytest.raises(DataError, match="'code' .* and 'other' .* different tokenizers"):
        _setup_data(base + [sources])
