"""A real training run for the evaluate tests: train.py with 2 processes at EP 2 (torchrun, gloo),
2 steps, evaluated and checkpointed at step 2; its export; a second prepared directory with the
same tokenizer (for mixtures)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.train.helpers import TINY, run_train

STEPS = 2
# eval_batches=2 with 2 ranks of micro batch 4: the trainer's sample is 16 windows in 4 batches,
# interleaved over the ranks (batch i*W + r on rank r), which the evaluation must reproduce.
RUN = TINY + [
    "model.moe.topk_groups=2",  # plain top-k: the deepseek export represents it exactly
    "parallel.ep_size=2",
    f"trainer.max_steps={STEPS}",
    "optim.warmup_steps=1",
    "trainer.eval_batches=2",
    f"trainer.eval_every={STEPS}",
    f"checkpoint.every={STEPS}",
    "logger=none",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread while a test evaluates in-process: these tiny forwards gain nothing
    from two, and on a busy 2-core machine an oversubscribed pool makes them many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def data_dir(tiny_data: list[str]) -> Path:
    """The prepared directory of the session's `tiny_data` overrides."""
    return Path(next(o for o in tiny_data if o.startswith("data.out_dir=")).split("=", 1)[1])


@pytest.fixture(scope="session")
def ep2_run(tiny_data, tmp_path_factory) -> dict:
    """{"run": run dir, "hf": its export (deepseek format), "data": the prepared directory}."""
    from deepseek_moe.export import export

    root = tmp_path_factory.mktemp("evaluate")
    run_dir = root / "run"
    run_train(RUN + tiny_data + [f"run_dir={run_dir}"], nproc=2, launcher="torchrun")
    export(str(run_dir), str(root / "hf"))
    return {"run": run_dir, "hf": root / "hf", "data": data_dir(tiny_data)}


@pytest.fixture(scope="session")
def second_source(tiny_data, tmp_path_factory) -> Path:
    """Another small python_stdlib preparation with the session corpus's tokenizer."""
    from data_prep.prepare import ensure_prepared
    from deepseek_moe.config.data import DataConfig

    out = tmp_path_factory.mktemp("evaluate_data") / "other"
    ensure_prepared(
        DataConfig(
            out_dir=str(out),
            max_documents=8,
            val_fraction=0.2,
            tokenizer_model=str(data_dir(tiny_data) / "tokenizer.model"),
            num_proc=1,
        )
    )
    return out


def cli_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env
