"""Every collective of a training run works on the process group a CUDA run gets.

NCCL has no CPU backend: on a NCCL-only group any collective on a CPU tensor raises "No backend
type associated with device type cpu". A gloo group registered for the cuda device type only
(`backend="cuda:gloo"`) rejects CPU tensors the same way, which lets a CPU machine reproduce
that failure. The real Trainer (world 2, EP 2: data-preparation flag, per-step metrics,
preemption flag, eval, router and all-to-all metrics, checkpoint save; then a relaunch with
another model, refused by one rank for all, and one with another EP size, resharded on load)
then runs

- under `cuda:gloo`, standing for the NCCL-only group the trainer used to create: it must fail
  (this is what shows the test can see the bug), and
- under the group `init_distributed` creates on a CUDA machine (`process_group_backend("cuda")`,
  with gloo standing in for NCCL, which CPUs lack): it must train, evaluate, save, and
  consolidate the experts over DeepSpeed's EP group (whose sub-groups inherit the backends).

What CPU cannot show: that the tensors our helpers reduce are on the GPU (they are created on
`DistInfo.device`, which is the CPU here). That part runs in the GPU acceptance (tests/gpu/).
"""

import json

import pytest
import torch

from deepseek_moe.testing.distributed import run_distributed
from deepseek_moe.train.metrics import read_metrics
from tests.train.helpers import TINY


def _fit(rank, world, overrides, backend):
    from omegaconf import OmegaConf

    import deepseek_moe.train.distributed as distributed
    from deepseek_moe.checkpoint.keys import consolidated_state_dict
    from deepseek_moe.train.trainer import Trainer
    from tests.train.helpers import compose_config

    on_cuda = distributed.process_group_backend
    # init_distributed asks this function for the backend; answer as on a CUDA machine
    distributed.process_group_backend = (
        (lambda device_type: on_cuda("cuda", cuda_backend="gloo"))
        if backend == "cuda run"
        else (lambda device_type: backend)
    )
    cfg = OmegaConf.to_object(compose_config(overrides))
    trainer = Trainer(cfg)
    summary = trainer.fit()
    out = {"summary": summary, "backend": torch.distributed.get_backend(), "seed": torch.initial_seed()}
    model = trainer.model
    out["consolidated_keys"] = sorted(consolidated_state_dict(model))
    # eval forwards are not counted in the next training step's all-to-all metrics
    trainer.evaluate()
    out["calls_after_eval"] = [layer.dispatcher.pop_stats()["a2a_calls"] for layer in model.moe_layers()]
    # router metrics of the GLOBAL batch: rank 0 saw only expert 0, rank 1 only expert 1
    for layer in model.moe_layers():
        layer.stats.reset()
        layer.stats.tokens_per_expert_E[rank] = 6.0
        layer.stats.counters[0] = 3.0  # tokens
        layer.stats.counters[3] = 6.0  # copies
    from deepseek_moe.train.distributed import reduce_sum_
    from deepseek_moe.train.moe_health import collect_router_stats

    out["router"] = collect_router_stats(model, trainer.dist.device, reduce_sum_, world, 2).metrics
    # the layout is recorded in every rank's trainer state (read before the relaunches prune it)
    saved = torch.load(
        trainer.checkpoints.dir / "step_00000002" / "trainer_state" / f"rank{rank:05d}.pt", weights_only=False
    )
    out["saved_layout"] = (saved["world_size"], saved["ep_size"], saved["zero_stage"])
    # relaunching with another model: refused with what differs, before anything is loaded
    from deepseek_moe.errors import CheckpointError, ReportedByAnotherRank

    try:
        Trainer(
            OmegaConf.to_object(
                compose_config(overrides + ["model.moe.moe_intermediate_size=16", "trainer.max_steps=4"])
            )
        ).fit()
        out["resume_error"] = None
    except (CheckpointError, ReportedByAnotherRank) as err:  # one rank reports, the others stop
        out["resume_error"] = f"{type(err).__name__}: {err}"
    # relaunching with another EP size continues the run, resharded on load
    out["resumed"] = Trainer(
        OmegaConf.to_object(compose_config(overrides + ["parallel.ep_size=1", "trainer.max_steps=4"]))
    ).fit()
    return out


def _overrides(tiny_data, run_dir):
    return (
        TINY
        + tiny_data
        + [
            "parallel.ep_size=2",
            "trainer.max_steps=2",
            "trainer.eval_every=2",
            "checkpoint.every=1",
            "optim.warmup_steps=1",
            "logger=none",
            f"run_dir={run_dir}",
        ]
    )


def test_nccl_like_group_rejects_cpu_tensors(tiny_data, tmp_path):
    """The failure the CUDA run had: a group without a CPU backend."""
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        run_distributed(
            _fit,
            2,
            _overrides(tiny_data, tmp_path / "run"),
            "cuda:gloo",
            init_process_group=False,
            timeout=240,
        )


def test_trainer_collectives_on_the_cuda_run_group(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    results = run_distributed(
        _fit, 2, _overrides(tiny_data, run_dir), "cuda run", init_process_group=False, timeout=300
    )
    assert [r["backend"] for r in results] == ["cpu:gloo,cuda:gloo"] * 2
    assert all(r["summary"]["finished"] and r["summary"]["val_loss"] is not None for r in results)
    # every expert of every MoE layer, gathered over the EP group onto rank 0
    keys = results[0]["consolidated_keys"]
    assert results[1]["consolidated_keys"] == []
    n_experts = 4  # TINY: model.moe.n_routed_experts=4, one MoE layer
    assert len([k for k in keys if ".mlp.experts." in k and k.endswith("down_proj.weight")]) == n_experts
    assert all(calls == [0.0] for calls in (r["calls_after_eval"] for r in results))

    # global-batch router metrics: loads [6, 6, 0, 0] over both ranks -> max/mean = 6/3 = 2
    # (a mean of the per-rank ratios would say 4: each rank alone sees one hot expert)
    for r in results:
        assert r["router"]["moe/layer1/load_imbalance"] == pytest.approx(2.0)
        assert r["router"]["moe/layer1/max_expert_frac"] == pytest.approx(0.5)

    # each rank draws its own router noise after the shared build seed
    from deepseek_moe.train.rng import rank_seed

    assert [r["seed"] for r in results] == [rank_seed(1234, 0), rank_seed(1234, 1)]

    # the resolved DeepSpeed config is in the run directory
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 8 and ds["zero_optimization"] == {"stage": 1}
    # the layout is recorded in every rank's trainer state
    assert [r["saved_layout"] for r in results] == [(2, 2, 1)] * 2
    assert results[0]["resume_error"].startswith("CheckpointError: ")
    assert "model.moe.moe_intermediate_size=32 (this launch: 16)" in results[0]["resume_error"]
    assert results[1]["resume_error"] == "ReportedByAnotherRank: rank 0 reports the error"
    assert all(r["resumed"]["finished"] and r["resumed"]["step"] == 4 for r in results)
    steps = [row["step"] for row in read_metrics(run_dir / "metrics.jsonl") if "loss" in row]
    assert steps == [1, 2, 3, 4]
