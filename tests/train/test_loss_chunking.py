"""trainer.loss_chunk_tokens through the real Trainer (DeepSpeed, EP=2, gloo): the same losses,
gradient norms and validation loss as the plain LM head, and a one-line error for a negative
value."""

import pytest

from deepseek_moe.errors import ConfigError
from deepseek_moe.testing.distributed import run_distributed
from deepseek_moe.train.metrics import read_metrics
from tests.train.helpers import TINY, compose_config


def _fit_both(rank, world, overrides, tmp_dir):
    """Trainer.fit() without and with the chunked loss, in the same processes."""
    from omegaconf import OmegaConf

    from deepseek_moe.train.trainer import Trainer

    out = {}
    for name, extra in (("plain", []), ("chunked", ["trainer.loss_chunk_tokens=48"])):
        cfg = OmegaConf.to_object(compose_config(overrides + extra + [f"run_dir={tmp_dir}/{name}"]))
        trainer = Trainer(cfg)
        out[name] = {"summary": trainer.fit(), "chunk": trainer.model.loss_chunk_tokens}
    return out


def test_ep2_chunked_loss_trains_like_the_plain_head(tiny_data, tmp_path):
    # 4 x 64 tokens per micro-batch: chunks of 48 leave a short last chunk
    overrides = (
        TINY
        + tiny_data
        + [
            "parallel.ep_size=2",
            "trainer.max_steps=3",
            "trainer.eval_every=3",
            "checkpoint.every=0",
            "logger=none",
        ]
    )
    results = run_distributed(_fit_both, 2, overrides, str(tmp_path), timeout=300)
    assert [(r["plain"]["chunk"], r["chunked"]["chunk"]) for r in results] == [(0, 48)] * 2
    rows = {
        name: [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
        for name in ("plain", "chunked")
    }
    assert [r["step"] for r in rows["chunked"]] == [1, 2, 3]
    for plain, chunked in zip(rows["plain"], rows["chunked"], strict=True):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            assert chunked[key] == pytest.approx(plain[key], abs=1e-5, rel=0), (plain["step"], key)
    val = [results[0][name]["summary"]["val_loss"] for name in ("plain", "chunked")]
    assert val[0] is not None and val[1] == pytest.approx(val[0], abs=1e-5, rel=0)
    assert rows["plain"][-1]["lm_loss"] < rows["plain"][0]["lm_loss"]  # it trained


def test_negative_chunk_is_a_config_error():
    from deepseek_moe.train.cli import to_run_config

    with pytest.raises(ConfigError, match=r"^trainer.loss_chunk_tokens=-1 must be >= 0$"):
        to_run_config(compose_config(["trainer.loss_chunk_tokens=-1"]))
