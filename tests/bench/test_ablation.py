"""bench/ablation: the verdict arithmetic against hand computations, the variants' matching,
and a smoke ladder (2 variants, tiny budgets) end to end through train.py and evaluate."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.train.helpers import REPO

sys.path.insert(0, str(REPO / "bench" / "ablation"))

import analysis  # noqa: E402
import variants  # noqa: E402


def _runs(losses: dict[str, list[float]]) -> dict[str, dict]:
    return {
        f"{v}_s{i + 1}": {"variant": v, "seed": i + 1, "val_loss": loss}
        for v, seeds in losses.items()
        for i, loss in enumerate(seeds)
    }


def test_aggregate_mean_and_sample_std():
    agg = analysis.aggregate(_runs({"gshard": [4.0, 4.2, 4.1], "dense_half": [4.5]}))
    assert agg["gshard"]["mean"] == pytest.approx(4.1)
    assert agg["gshard"]["std"] == pytest.approx(0.1)  # sqrt((0.01 + 0.01 + 0) / 2)
    assert (agg["gshard"]["min"], agg["gshard"]["max"]) == (4.0, 4.2)
    assert agg["dense_half"]["std"] is None


def test_ordering_verdicts_are_paired_by_seed():
    # seed 2 is harder for every variant (its data order): the paired differences cancel that
    runs = _runs(
        {
            "dense_half": [4.5],
            "gshard": [4.0, 4.3, 4.1],
            "deepseek_moe": [3.95, 4.24, 4.06],  # per seed 0.05, 0.06, 0.04 below gshard
        }
    )
    pairs = (("dense_half", "gshard"), ("gshard", "deepseek_moe"), ("deepseek_moe", "gshard"))
    verdicts = analysis.ordering_verdicts(runs, pairs, ("gshard", "deepseek_moe"))
    by_pair = {(v["higher"], v["lower"]): v for v in verdicts}
    v = by_pair[("gshard", "deepseek_moe")]
    assert v["seeds"] == [1, 2, 3] and v["margin"] == pytest.approx(0.05)
    assert v["stderr"] == pytest.approx(0.01 / math.sqrt(3))  # stdev(0.05, 0.06, 0.04) = 0.01
    assert v["verdict"] == "held, beyond seed noise" and not v["borrowed_noise"]
    # unpaired, the same numbers would be within noise: the seeds' spread (0.15) dwarfs 0.05
    assert analysis.aggregate(runs)["gshard"]["std"] > 0.15
    # one common seed: the reference pair's spread of differences stands in
    v = by_pair[("dense_half", "gshard")]
    assert v["seeds"] == [1] and v["margin"] == pytest.approx(0.5) and v["borrowed_noise"]
    assert v["stderr"] == pytest.approx(0.01)
    assert by_pair[("deepseek_moe", "gshard")]["verdict"] == "did not hold"
    noisy = _runs({"gshard": [4.0, 4.3], "deepseek_moe": [3.9, 4.32]})  # differences 0.1, -0.02
    (v,) = analysis.ordering_verdicts(noisy, [("gshard", "deepseek_moe")], ("gshard", "deepseek_moe"))
    assert v["margin"] == pytest.approx(0.04) and v["stderr"] == pytest.approx(0.06)
    assert v["verdict"] == "held, within seed noise"


def test_redundancy_verdicts_pair_the_rises_by_seed():
    runs = _runs({"gshard": [0, 0], "deepseek_moe": [0, 0]})
    fig4 = {
        "gshard_s1": [4.0, 4.1, 4.3],
        "gshard_s2": [4.1, 4.2, 4.4],  # rises 0.1, 0.3 in both seeds
        "deepseek_moe_s1": [3.9, 4.2, 4.5],
        "deepseek_moe_s2": [3.95, 4.27, 4.58],  # rises 0.3/0.32, 0.6/0.63
    }
    for name, losses in fig4.items():
        runs[name]["fig4"] = {str(r): loss for r, loss in enumerate(losses)}
    out = analysis.redundancy_verdicts(runs, "deepseek_moe", "gshard")
    assert [v["r"] for v in out] == [1, 2]
    assert out[0]["rise"]["deepseek_moe"] == pytest.approx(0.31)
    assert out[0]["rise"]["gshard"] == pytest.approx(0.1)
    assert out[1]["margin"] == pytest.approx(0.615 - 0.3)
    # per-seed differences of the rises at r = 2: 0.3 and 0.33
    assert out[1]["stderr"] == pytest.approx(0.015) and out[1]["verdict"] == "held, beyond seed noise"


def test_moe_variants_are_matched_within_two_percent():
    summary = variants.summaries(list(variants.VARIANTS), vocab_size=8192, seq_len=256)
    assert variants.moe_mismatches(summary) == []
    # Fig. 4's shares of routed experts are computed from these counts
    assert {n: s["routed_experts"] for n, s in summary.items()} == {
        n: v.routed_experts for n, v in variants.VARIANTS.items()
    }
    # the three MoE variants have equal totals and activated FFN width 2F (hand count, F = 344)
    D, F, layers = 128, 344, 4
    gshard_ffn = 16 * 3 * D * F
    assert summary["gshard"]["total_params"] - summary["dense_half"]["total_params"] == layers * (
        gshard_ffn - 3 * D * F + 16 * D  # + the router
    )
    broken = {k: dict(v) for k, v in summary.items()}
    broken["deepseek_moe"]["active_params"] = int(broken["gshard"]["active_params"] * 1.03)
    assert any(p.startswith("active_params") for p in variants.moe_mismatches(broken))


def test_smoke_ladder_two_variants(tmp_path):
    data = tmp_path / "data"
    out = tmp_path / "ladder"
    report = tmp_path / "report" / "ablation_smoke.md"
    cmd = [
        sys.executable,
        "bench/ablation/ladder.py",
        f"--out={out}",
        "--steps=4",
        "--seeds=1",
        "--variants=gshard,deepseek_moe",
        "--eval-every=2",
        "--fig4-max-r=2",
        "--fig4-sequences=0",  # the whole split: r = 0 is then the table value itself
        f"--report={report}",
        f"--data-args=data.out_dir={data} data.max_documents=30 data.vocab_size=512 "
        "data.val_fraction=0.1 data.tokenizer_sentences=20000 data.num_proc=1",
        "--train-args=trainer.seq_len=64 trainer.global_batch_size=8 trainer.micro_batch_size=4 "
        "trainer.eval_batches=1 optim.warmup_steps=2",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ladder = json.loads((out / "results.json").read_text())
    assert set(ladder["runs"]) == {"gshard_s1", "deepseek_moe_s1"}
    for run in ladder["runs"].values():
        assert math.isfinite(run["val_loss"]) and run["step"] == 4
        assert run["fig4"]["0"] == run["val_loss"]  # r = 0 is the plain evaluation
        assert run["fig4"]["2"] != run["fig4"]["0"]
        # 2/16 of the routed experts: GShard 2 of 16, DeepSeekMoE round(2 * 63 / 16) = 8 of 63
        assert run["fig4_disabled"] == (
            {"0": 0, "1": 1, "2": 2} if run["variant"] == "gshard" else {"0": 0, "1": 4, "2": 8}
        )
        assert len(run["routing"]) == 4 and len(run["curve"]) == 2  # 4 MoE layers; evals at steps 2, 4
    text = report.read_text()
    assert (
        "| GShard (top-2 of 16) |" in text
        and "- 2/16 disabled (DeepSeekMoE 8 of 63 experts, GShard 2 of 16)" in text
    )
    for png in ("ablation_smoke_loss_curves.png", "ablation_smoke_fig4.png"):
        assert (report.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a relaunch finds everything done: no training, no evaluation
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "[ladder] train" not in again.stdout


def test_ladder_refuses_unknown_variant(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/ablation/ladder.py", f"--out={tmp_path}", "--variants=gshard,switch"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "ladder: unknown variants ['switch']; choose from "
        "['dense_half', 'gshard', 'gshard_shared', 'deepseek_moe', 'dense_equal']"
    ]
