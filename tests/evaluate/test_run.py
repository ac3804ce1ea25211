"""evaluate() against the trainer's own val_loss: a checkpoint written at EP 2 by 2 processes,
evaluated in one process at EP 1, and its Hugging Face export; 2 processes at EP 2 against 1;
`disable_top_experts=0` against the plain evaluation; mixtures against their sources."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from deepseek_moe.evaluate import evaluate
from deepseek_moe.train.distributed import free_port
from deepseek_moe.train.metrics import read_metrics
from tests.evaluate.conftest import RUN, STEPS, cli_env
from tests.train.helpers import REPO, run_train


def _trainer_val_loss(run_dir) -> float:
    (row,) = [r for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r and r["step"] == STEPS]
    return row["val_loss"]


def test_checkpoint_and_its_export_give_the_trainers_val_loss(ep2_run):
    want = _trainer_val_loss(ep2_run["run"])
    got = evaluate(ep2_run["run"])  # one process, EP 1; the run was trained at EP 2 by 2 processes
    assert got["step"] == STEPS and got["train_world_size"] == 2 and got["ep_size"] == 1
    assert got["sequences"] == 16 and got["tokens"] == 16 * 64 and got["sample"] == "trainer"
    assert got["precision"] == "fp32"
    assert got["val_loss"] == pytest.approx(want, abs=1e-6, rel=0)
    # another micro batch (other batches, padding) reads the same windows: the same mean
    other = evaluate(ep2_run["run"], micro_batch_size=3)
    assert other["val_loss"] == pytest.approx(want, abs=1e-6, rel=0)

    # the exported HF directory on the same data and the same 16 windows
    hf = evaluate(ep2_run["hf"], [f"data.out_dir={ep2_run['data']}"], sequences=16)
    assert hf["kind"] == "hf" and hf["step"] is None and hf["seq_len"] == 64  # the model's context
    assert hf["val_loss"] == pytest.approx(want, abs=1e-6, rel=0)


def test_two_processes_at_ep2_equal_one_process(ep2_run):
    """torchrun, 2 processes, EP 2: 7 windows in batches of 3, so rank 0 reads batches 0 and 2
    (one real window in the last) and rank 1 batch 1 plus a dummy batch."""
    args = [str(ep2_run["run"]), "--sequences", "7", "--micro-batch", "3", "--routing-stats"]
    one = evaluate(ep2_run["run"], sequences=7, routing_stats=True)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
        ]
        + ["-m", "deepseek_moe.evaluate", *args, "--ep-size", "2"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("{")]  # rank 0 only
    two = json.loads(line)
    assert (two["world_size"], two["ep_size"], two["sequences"], two["tokens"]) == (2, 2, 7, 7 * 64)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-6, rel=0)
    # the routing statistics count the same tokens (padding and the dummy batch excluded)
    for a, b in zip(one["routing"], two["routing"], strict=True):
        assert a["tokens"] == b["tokens"] == 7 * 64
        assert b["load"] == pytest.approx(a["load"], abs=1e-12)
        assert b["router_entropy"] == pytest.approx(a["router_entropy"], abs=1e-6)
    assert "val_loss" in proc.stderr and "7 x 64 tokens" in proc.stderr


def test_disable_top_experts_zero_is_the_plain_evaluation(ep2_run):
    plain = evaluate(ep2_run["run"])
    zero = evaluate(ep2_run["run"], disable_top_experts=0)
    assert zero["val_loss"] == plain["val_loss"] and zero["disable_top_experts"] == 0
    # and both are the trainer's, whose router never had the knob set
    assert zero["val_loss"] == pytest.approx(_trainer_val_loss(ep2_run["run"]), abs=1e-6, rel=0)
    skipped = evaluate(ep2_run["run"], disable_top_experts=1)
    assert abs(skipped["val_loss"] - plain["val_loss"]) > 1e-4 and skipped["disable_top_experts"] == 1


def test_mixture_gives_each_source_and_the_weighted_mean(ep2_run, second_source):
    a, b = ep2_run["data"], second_source
    mix = evaluate(
        ep2_run["run"],
        [f"data.sources=[{{out_dir: '{a}', weight: 3, name: a}}, {{out_dir: '{b}', weight: 1, name: b}}]"],
    )
    alone = {n: evaluate(ep2_run["run"], [f"data.out_dir={d}"]) for n, d in (("a", a), ("b", b))}
    for name in ("a", "b"):
        assert mix[f"val_loss/{name}"] == pytest.approx(alone[name]["val_loss"], abs=1e-12)
    assert mix["val_loss"] == pytest.approx(0.75 * alone["a"]["val_loss"] + 0.25 * alone["b"]["val_loss"])
    assert [s["name"] for s in mix["sources"]] == ["a", "b"]
    assert mix["tokens"] == alone["a"]["tokens"] + alone["b"]["tokens"]


def test_hf_directory_default_is_the_whole_split(ep2_run, second_source):
    from deepseek_moe.data import load_meta
    from deepseek_moe.data.packed import PackedTokens

    windows = PackedTokens(load_meta(second_source), "val").num_windows(64)
    got = evaluate(ep2_run["hf"], [f"data.out_dir={second_source}"])
    assert got["sample"] == "all" and got["sequences"] == windows and got["tokens"] == windows * 64


def test_bf16_mixture_run_gives_the_trainers_val_losses(ep2_run, second_source, tmp_path):
    """A bf16 run (1 process, ZeRO-1) on a two-source mixture: `precision=auto` evaluates in the
    run's bf16 (the fp32 masters cast to bf16 are the engine's weights), and every source's
    loss and their weighted mean are the trainer's, under the trainer's names."""
    run_dir = tmp_path / "bf16_mixture"
    a, b = ep2_run["data"], second_source
    sources = f"data.sources=[{{out_dir: {a}, weight: 3, name: a}}, {{out_dir: {b}, weight: 1, name: b}}]"
    overrides = [o for o in RUN if o != "parallel.ep_size=2"]
    run_train(overrides + ["trainer.precision=bf16", "parallel.zero_stage=1", sources, f"run_dir={run_dir}"])
    (want,) = [r for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r]
    got = evaluate(run_dir)
    assert got["precision"] == "bf16" and got["train_world_size"] == 1
    for key in ("val_loss", "val_loss/a", "val_loss/b"):
        assert got[key] == pytest.approx(want[key], abs=1e-6, rel=0), key
    # data.out_dir alone evaluates one directory of the mixture: the same sample as its part
    alone = evaluate(run_dir, [f"data.out_dir={b}"])
    assert "sources" not in alone and alone["val_loss"] == pytest.approx(got["val_loss/b"], abs=1e-12)
    fp32 = evaluate(run_dir, precision="fp32")
    assert fp32["precision"] == "fp32" and fp32["val_loss"] != got["val_loss"]
