"""Elastic resume: a run stopped at world 2, EP 2 continues at another world size, EP size or
ZeRO stage, and trains exactly as the uninterrupted run would have.

Reference: train.py at world 2, EP 2, ZeRO 1 for 6 steps, uninterrupted. Elastic: the same
command stopped after 3 steps (`trainer.max_steps_per_launch=3`), then relaunched on the same
run_dir at (a) world 1, EP 1; (b) world 4, EP 2; (c) world 4, EP 4, ZeRO 2. The global batches
are the same at every layout and the micro-batch is fixed, so only the order of fp32 sums
differs: steps 4-6 must match the reference's losses and gradient norms to 1e-5, and the
optimizer state after step 6 (fp32 master weights, exp_avg, exp_avg_sq, step count, read per
parameter with global expert ids from each run's own shards) to 1e-6. The V3 selection bias is
on, so the router-bias buffer (in the model states) must carry over as well.

bf16: the fp32 master weights and Adam moments a bf16 run saved must be on the new ranks bit for
bit right after the resume; they are read back through DeepSpeed's own gather
(`safe_get_full_fp32_param`, `safe_get_full_optimizer_state`), not through our reader.
"""

import shutil

import pytest
import torch

from deepseek_moe.checkpoint.consolidate import consolidate_deepspeed_checkpoint
from deepseek_moe.checkpoint.zero_shards import STATES, ZeroShards
from deepseek_moe.train.metrics import read_metrics
from tests.train.helpers import TINY, run_train

# No device-limited routing (n_groups=1), so that EP 1, 2 and 4 are all valid for the same model.
ELASTIC = [
    o
    for o in TINY
    if not o.startswith(("model.moe.n_groups", "model.moe.topk_groups", "trainer.micro_batch_size"))
] + [
    "model.moe.n_groups=1",
    "model.moe.topk_groups=1",
    "model.moe.bias_update_rate=0.01",
    "trainer.micro_batch_size=2",
    "trainer.max_steps=6",
    "trainer.eval_every=0",
    "checkpoint.every=0",
    "logger=none",
]
STEP3, STEP6 = "checkpoints/step_00000003", "checkpoints/step_00000006"


def _rows(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def _optimizer_state(run_dir, ep_size):
    shards = ZeroShards.open(run_dir / STEP6, ep_size=ep_size)
    return shards.step, {(name, s): shards.read(name, s) for name in shards.names() for s in STATES}


@pytest.fixture(scope="module")
def fp32_runs(tiny_data, tmp_path_factory):
    """The reference run and the run stopped after step 3 (copied once per resume case)."""
    root = tmp_path_factory.mktemp("elastic")
    base = ELASTIC + tiny_data + ["parallel.ep_size=2"]
    run_train(base + [f"run_dir={root / 'reference'}"], nproc=2, launcher="torchrun")
    run_train(
        base + [f"run_dir={root / 'stopped'}", "trainer.max_steps_per_launch=3"], nproc=2, launcher="torchrun"
    )
    assert [r["step"] for r in _rows(root / "stopped")] == [1, 2, 3]
    return root, base


@pytest.mark.parametrize(
    "nproc, ep, zero, change",
    [
        (1, 1, 1, "world 2 -> 1, ep 2 -> 1"),
        (4, 2, 1, "world 2 -> 4"),
        (4, 4, 2, "world 2 -> 4, ep 2 -> 4, zero 1 -> 2"),
    ],
    ids=["world1-ep1", "world4-ep2", "world4-ep4-zero2"],
)
def test_fp32_resume_at_another_layout_continues_the_run(fp32_runs, nproc, ep, zero, change):
    root, base = fp32_runs
    run_dir = root / f"w{nproc}ep{ep}z{zero}"
    shutil.copytree(root / "stopped", run_dir)
    relaunch = [o for o in base if o != "parallel.ep_size=2"] + [
        f"run_dir={run_dir}",
        f"parallel.ep_size={ep}",
        f"parallel.zero_stage={zero}",
    ]
    proc = run_train(relaunch, nproc=nproc, launcher="torchrun" if nproc > 1 else "python")
    out = proc.stdout + proc.stderr
    assert f"resuming step_00000003 with another layout: {change}\n" in out
    assert "resumed from" in out and "steps 3->6" in out

    reference, resumed = _rows(root / "reference"), _rows(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for want, got in zip(reference[3:], resumed[3:], strict=True):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], abs=1e-5, rel=0), (want["step"], key)
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)  # the schedule went on
        assert got["tokens_seen"] == want["tokens_seen"]

    ref_step, ref_state = _optimizer_state(root / "reference", ep_size=2)
    step, state = _optimizer_state(run_dir, ep_size=ep)
    assert step == ref_step == 6.0
    assert state.keys() == ref_state.keys()
    assert any("experts" in name for name, _ in state)  # expert stacks compared with global ids
    for key, want in ref_state.items():
        assert state[key].shape == want.shape, key
        assert torch.allclose(state[key], want, rtol=0, atol=1e-6), (key, (state[key] - want).abs().max())

    # weights and buffers, experts by global id; the V3 selection bias moved and carried over
    ref_weights = consolidate_deepspeed_checkpoint(str(root / "reference" / STEP6))
    weights = consolidate_deepspeed_checkpoint(str(run_dir / STEP6))
    assert weights.keys() == ref_weights.keys()
    biases = [k for k in weights if k.endswith("e_score_correction_bias")]
    assert biases and all(ref_weights[k].abs().sum() > 0 for k in biases)
    for key, want in ref_weights.items():
        assert torch.allclose(weights[key].float(), want.float(), rtol=0, atol=1e-5), key


def test_resume_refuses_another_model_or_other_data(fp32_runs, tiny_data, tmp_path):
    """Another model or other data: one line naming the difference, before anything is loaded
    or written (the checkpoints and config.yaml stay as they were)."""
    root, base = fp32_runs
    run_dir = tmp_path / "run"
    shutil.copytree(root / "stopped", run_dir)
    before = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*"))
    config = (run_dir / "config.yaml").read_text()
    one_proc = [o for o in base if o != "parallel.ep_size=2"] + [f"run_dir={run_dir}"]

    proc = run_train(one_proc + ["model.moe.moe_intermediate_size=16"], check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("Checkpoint error: ")]
    assert "model.moe.moe_intermediate_size=32 (this launch: 16)" in line and "new run_dir" in line

    other_data = [
        o.replace("data.max_documents=40", "data.max_documents=30").replace("data.out_dir=", "data.out_dir=")
        for o in tiny_data
    ]
    other_data = [
        f"data.out_dir={tmp_path / 'other_data'}" if o.startswith("data.out_dir=") else o for o in other_data
    ]
    proc = run_train([o for o in one_proc if o not in tiny_data] + other_data, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("Data error: ")]
    assert "fingerprint" in line and "point data.out_dir at the original data" in line

    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")) == before
    assert (run_dir / "config.yaml").read_text() == config


def _full_optimizer_state(trainer):
    """Every parameter's fp32 master and Adam moments, gathered by DeepSpeed itself (collective:
    every rank calls it for every parameter in the same order), plus where this rank's experts
    start, and Adam's step count."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from deepseek_moe.model.moe import MoELayer

    out = {}
    for name, param in trainer.model.named_parameters():
        out[(name, "fp32")] = safe_get_full_fp32_param(param).cpu().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[(name, key)] = safe_get_full_optimizer_state(param, key).cpu().clone()
    offsets = {
        name: m.local_expert_offset for name, m in trainer.model.named_modules() if isinstance(m, MoELayer)
    }
    base = trainer.engine.optimizer.optimizer
    steps = {float(base.state[g["params"][0]]["step"]) for g in base.param_groups}
    return {"state": out, "offsets": offsets, "steps": steps, "step": trainer.step}


def _bf16_train_or_resume(rank, world, overrides, stop_after_resume):
    """Trainer.fit() (stop_after_resume=False), or only its setup, which resumes; then the
    optimizer state gathered by DeepSpeed."""
    from omegaconf import OmegaConf

    from deepseek_moe.train.signals import PreemptionFlag
    from deepseek_moe.train.trainer import Trainer
    from tests.train.helpers import compose_config

    trainer = Trainer(OmegaConf.to_object(compose_config(overrides)))
    if not stop_after_resume:
        trainer.fit()
        return _full_optimizer_state(trainer)
    trainer.preempt, trainer.metrics, trainer.wandb = PreemptionFlag(), None, None
    try:
        trainer._setup()
        state = _full_optimizer_state(trainer)
        state["summary"] = trainer._loop()  # and the resumed run trains on to the end
        return state
    finally:
        trainer.preempt.restore()
        if trainer.metrics is not None:
            trainer.metrics.close()


def _global(results):
    """{(name, state): tensor} with expert stacks joined over the EP ranks in expert order."""
    from deepseek_moe.checkpoint.keys import STACKED_EXPERT_PARAM

    out, parts = {}, {}
    for res in results:
        for (name, key), tensor in res["state"].items():
            m = STACKED_EXPERT_PARAM.match(name)
            if m:
                parts.setdefault((name, key), {})[res["offsets"][m["layer"]]] = tensor
            else:
                out[(name, key)] = tensor
    for key, by_offset in parts.items():
        out[key] = torch.cat([by_offset[o] for o in sorted(by_offset)])
    return out


def test_bf16_master_weights_and_moments_survive_resharding_exactly(tiny_data, tmp_path):
    """bf16 at world 2, EP 2, ZeRO 1 (DeepSpeed's BF16 optimizer) stopped after step 3, resumed
    at world 4, EP 4, ZeRO 2 (its ZeRO-2 optimizer): masters and moments are equal bit for bit."""
    from deepseek_moe.testing.distributed import run_distributed

    run_dir = tmp_path / "run"
    base = ELASTIC + tiny_data + ["trainer.precision=bf16", f"run_dir={run_dir}"]
    launches = (
        (2, ["parallel.ep_size=2", "trainer.max_steps_per_launch=3"], False),  # saved
        (4, ["parallel.ep_size=4", "parallel.zero_stage=2"], True),  # resumed
    )
    saved, resumed = (
        run_distributed(
            _bf16_train_or_resume, world, base + extra, stop, timeout=300, init_process_group=False
        )
        for world, extra, stop in launches
    )
    assert [r["step"] for r in saved + resumed] == [3] * 6
    assert all(r["steps"] == {3.0} for r in saved + resumed)
    want, got = _global(saved), _global(resumed)
    assert want.keys() == got.keys() and any("experts" in name for name, _ in want)
    for key, tensor in want.items():
        assert got[key].dtype == torch.float32 and torch.equal(got[key], tensor), key
    # our shard reader (used by the fp32 test above and by export) agrees with DeepSpeed's gather
    shards = ZeroShards.open(run_dir / STEP3, ep_size=2)
    assert shards.step == 3.0 and sorted(shards.names()) == sorted({name for name, _ in want})
    for (name, key), tensor in want.items():
        assert torch.equal(shards.read(name, key), tensor.reshape(-1)), (name, key)
        middle = tensor.numel() // 3
        assert torch.equal(shards.read(name, key, middle, middle), tensor.reshape(-1)[middle : 2 * middle])
    assert all(r["summary"]["finished"] and r["summary"]["step"] == 6 for r in resumed)
