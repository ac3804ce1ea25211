"""MoE health: expert loads reduced once per logging step (EP 1 and EP 2, against np.bincount),
the expert_loads.bin sidecar (kill, resume, no duplicates), the alarms (constructed streams and a
trainer run that forces each one) and their silence on a normal run."""

import json
import math
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from deepseek_moe.config.health import HealthConfig
from deepseek_moe.train.metrics import read_metrics
from deepseek_moe.train.moe_health import (
    AlarmMonitor,
    ExpertLoadsFile,
    collect_router_stats,
    rank_loads,
    read_expert_loads,
    record_dtype,
)
from tests.train.helpers import REPO, TINY, command, run_train, train_env


# ---- reduction -------------------------------------------------------------------------------
def _routed_ids(model):
    """Collects the router's selections of every MoE layer (a hook on each gate)."""
    ids, handles = {}, []
    for layer in model.moe_layers():
        handles.append(
            layer.gate.register_forward_hook(
                lambda mod, args, out, i=layer.layer_idx: ids.setdefault(i, []).append(out.ids_TK.clone())
            )
        )
    return ids, handles


def _ep_counts(rank, world, ep_size):
    """Train forwards/backwards on this rank's batches, then one collect; returns what it saw."""
    from deepseek_moe.model.dispatch import LocalDispatcher
    from deepseek_moe.parallel.dispatcher import AllToAllDispatcher
    from deepseek_moe.train.distributed import all_gather_objects, reduce_sum_
    from tests.count_calls import count_histograms
    from tests.host_reads import count_host_reads
    from tests.parallel._ep_common import build_full_model, micro_batch, tiny_config

    model = build_full_model(tiny_config())
    E = model.cfg.moe.n_routed_experts
    if ep_size > 1:
        model.apply_ep(ep_rank=rank, ep_size=ep_size, make_dispatcher=lambda: AllToAllDispatcher(None, E))
    else:
        model.apply_ep(ep_rank=0, ep_size=1, make_dispatcher=LocalDispatcher)
    model.train()
    ids, handles = _routed_ids(model)
    calls = []
    for step in range(3):
        x, y = micro_batch(step, rank)
        with count_histograms() as c:
            model(x, y).loss.backward()
        calls.append(len(c))
    for h in handles:
        h.remove()
    with torch.no_grad():  # evaluation: counted nowhere
        model.eval()
        model(*micro_batch(7, rank))
        model.train()
    mine = {i: torch.cat(v).flatten().numpy() for i, v in ids.items()}
    with count_host_reads() as reads:
        snap = collect_router_stats(model, torch.device("cpu"), reduce_sum_, world, ep_size)
    again = collect_router_stats(model, torch.device("cpu"), reduce_sum_, world, ep_size)
    return {
        "calls": calls,
        "n_moe_layers": len(list(model.moe_layers())),
        "ids": all_gather_objects(mine),
        "counts": snap.counts_LE,
        "layers": snap.layers,
        "metrics": snap.metrics,
        "reads": reads.ops,
        "after_reset": again.counts_LE.sum(),
        "E": E,
    }


def _check_counts(results, ep_size):
    for r in results:
        # one histogram per MoE layer per forward, whatever else uses it
        assert r["calls"] == [r["n_moe_layers"]] * 3
        # one device-to-host transfer for all statistics (the all-reduce is the only collective)
        assert r["reads"] == ["tolist"]
        assert r["after_reset"] == 0
    E = results[0]["E"]
    for li, layer in enumerate(results[0]["layers"]):
        every_rank = np.concatenate([rank_ids[layer] for rank_ids in results[0]["ids"]])
        want = np.bincount(every_rank, minlength=E)
        for r in results:  # the global counts, the same on every rank
            assert r["counts"][li].tolist() == want.tolist()
            m = r["metrics"]
            assert m[f"moe/layer{layer}/load_imbalance"] == pytest.approx(want.max() / want.mean())
            assert m[f"moe/layer{layer}/min_expert_frac"] == pytest.approx(want.min() / want.sum())
            if ep_size > 1:
                ranks = want.reshape(ep_size, -1).sum(1)
                assert m[f"moe/layer{layer}/rank_imbalance"] == pytest.approx(ranks.max() / ranks.mean())
                assert m[f"moe/layer{layer}/a2a_bytes"] > 0


def test_expert_counts_equal_bincount_ep1():
    from deepseek_moe.testing.distributed import run_distributed

    _check_counts(run_distributed(_ep_counts, 1, 1, timeout=120), 1)


def test_expert_counts_equal_bincount_ep2():
    from deepseek_moe.testing.distributed import run_distributed

    _check_counts(run_distributed(_ep_counts, 2, 2, timeout=120), 2)


def test_rank_loads_sum_each_ranks_block():
    counts = np.arange(8)
    assert rank_loads(counts, 2).tolist() == [0 + 1 + 2 + 3, 4 + 5 + 6 + 7]
    assert rank_loads(np.stack([counts, counts]), 4).tolist() == [[1, 5, 9, 13]] * 2


# ---- the sidecar -----------------------------------------------------------------------------
def _loads(step):
    return np.arange(6).reshape(2, 3) + 10 * step


def test_sidecar_appends_truncates_and_skips_a_cut_record(tmp_path):
    f = ExpertLoadsFile(tmp_path, [1, 3], 3, max_count=1000)
    f.truncate_after(0)
    for step in (2, 4, 6):
        f.append(step, step - 1, 2, _loads(step))
    f.close()
    size = record_dtype(2, 3, "<u4").itemsize
    assert size == 24 + 2 * 3 * 4 and (tmp_path / "expert_loads.bin").stat().st_size == 3 * size
    # a kill in the middle of the next record
    with open(tmp_path / "expert_loads.bin", "ab") as raw:
        raw.write(b"\x01" * (size // 2))
    got = read_expert_loads(tmp_path)  # a live reader skips the cut record
    assert got.steps.tolist() == [2, 4, 6] and got.layers == [1, 3]
    assert got.counts[1].tolist() == _loads(4).tolist() and got.first_steps.tolist() == [1, 3, 5]
    assert got.ep_sizes.tolist() == [2, 2, 2]
    # resume from a checkpoint at step 4: later records and the cut one are dropped
    f = ExpertLoadsFile(tmp_path, [1, 3], 3, max_count=1000)
    f.truncate_after(4)
    f.append(6, 5, 1, _loads(60))
    f.close()
    got = read_expert_loads(tmp_path)
    assert got.steps.tolist() == [2, 4, 6] and got.counts[2].tolist() == _loads(60).tolist()
    assert got.ep_sizes.tolist() == [2, 2, 1]
    # a fresh run in the same directory (step 0) starts over, with its own layout
    f = ExpertLoadsFile(tmp_path, [1], 4, max_count=2**40)
    f.truncate_after(0)
    f.append(1, 1, 1, np.array([[2**33, 0, 1, 2]]))
    f.close()
    got = read_expert_loads(tmp_path)
    assert got.steps.tolist() == [1] and got.counts.tolist() == [[[2**33, 0, 1, 2]]]
    assert json.loads((tmp_path / "expert_loads.json").read_text())["count_dtype"] == "<u8"


def test_sidecar_refuses_another_model_with_records_left(tmp_path):
    from deepseek_moe.errors import CheckpointError

    f = ExpertLoadsFile(tmp_path, [1, 3], 3, max_count=1000)
    f.truncate_after(0)
    f.append(2, 1, 1, _loads(2))
    f.close()
    with pytest.raises(CheckpointError, match="use a new run_dir"):
        ExpertLoadsFile(tmp_path, [1, 2, 3], 3, max_count=1000).truncate_after(2)


# ---- alarms on constructed streams ---------------------------------------------------------------
def _cfg(**kw):
    return HealthConfig(**{"warmup_steps": 0, **kw})


def _balanced(rng, E=8, tokens=8000):
    return rng.multinomial(tokens, np.full(E, 1 / E))


def test_dead_expert_fires_after_n_intervals_once_and_rearms():
    mon = AlarmMonitor(_cfg(dead_fraction=0.1, dead_intervals=3))
    rng = np.random.default_rng(0)
    fired = []
    for step in range(1, 11):
        c = _balanced(rng)
        if 2 <= step <= 6 or step >= 9:
            c[5] = 30  # 3% of the fair share 1000
        fired += [(step, a.details["experts"]) for a in mon.check_loads(step, [1], c[None], 1)]
    # below from step 2: the third interval in a row is step 4; recovers at 7, below again 9, 10
    assert fired == [(4, [5])]
    for step in (11,):
        c = _balanced(rng)
        c[5] = 0
        assert [a.kind for a in mon.check_loads(step, [1], c[None], 1)] == ["dead_expert"]


def test_collapsed_router_and_hot_rank_fire_on_entry():
    mon = AlarmMonitor(_cfg(hot_expert_factor=4.0, hot_rank_factor=1.5))
    c = np.full(8, 100)
    assert mon.check_loads(1, [1], c[None], 2) == []
    collapsed = c.copy()
    collapsed[2] = 100 * 5  # 5x the other experts: 500 / (1200 / 8) = 3.33x fair -> not yet
    assert mon.check_loads(2, [1], collapsed[None], 1) == []
    collapsed[2] = 100 * 10  # 1000 / (1700 / 8) = 4.7x fair
    alarms = mon.check_loads(3, [1], collapsed[None], 1)
    assert [(a.kind, a.details["expert"]) for a in alarms] == [("hot_expert", 2)]
    assert alarms[0].details["load_vs_fair"] == pytest.approx(1000 / (1700 / 8))
    assert mon.check_loads(4, [1], collapsed[None], 1) == []  # still hot: no repeat
    # EP 2: rank 0 holds experts 0-3; 1.6x its fair share
    hot_rank = np.array([160, 160, 160, 160, 40, 40, 40, 40])
    alarms = mon.check_loads(5, [1], hot_rank[None], 2)
    assert [(a.kind, a.details["ep_rank"]) for a in alarms] == [("hot_rank", 0)]
    assert alarms[0].details["load_vs_fair"] == pytest.approx(640 / 400)


def test_loss_and_grad_norm_spikes():
    mon = AlarmMonitor(_cfg(spike_sigmas=6.0, spike_window=20, spike_min_rise=0.1))
    rng = np.random.default_rng(1)
    fired = []
    for step in range(1, 61):
        loss = 3.0 - 0.01 * step + rng.normal(0, 0.01)  # falling: never a spike
        grad = 1.0 + rng.normal(0, 0.05)
        if step == 40:
            loss += 1.5
        if step == 50:
            grad = 4.0
        fired += [(a.step, a.kind) for a in mon.check_step(step, {"loss": loss, "grad_norm": grad})]
    assert fired == [(40, "loss_spike"), (50, "grad_norm_spike")]
    # a flat window: a tiny rise is many sigmas but not a spike (spike_min_rise)
    flat = AlarmMonitor(_cfg(spike_window=5))
    assert [flat.check_step(s, {"loss": 2.0 + 1e-9 * (s % 2)}) for s in range(1, 7)] == [[]] * 6
    assert flat.check_step(7, {"loss": 2.001}) == []  # a million sigmas, 0.05% above the mean
    assert flat.check_step(8, {"loss": 2.5, "grad_norm": None})[0].kind == "loss_spike"


def test_no_alarm_during_warmup_or_when_off():
    c = np.array([1000, 0, 0, 0, 0, 0, 0, 0])
    assert AlarmMonitor(HealthConfig(warmup_steps=10)).check_loads(10, [1], c[None], 2) == []
    assert AlarmMonitor(HealthConfig(warmup_steps=10, dead_intervals=1)).check_loads(11, [1], c[None], 2)
    off = _cfg(dead_fraction=0, hot_expert_factor=0, hot_rank_factor=0, spike_sigmas=0)
    assert AlarmMonitor(off).check_loads(11, [1], c[None], 2) == []


def test_silent_on_balanced_noisy_streams():
    mon = AlarmMonitor(_cfg(spike_window=50))
    rng = np.random.default_rng(2)
    for step in range(1, 400):
        assert mon.check_loads(step, [1, 2], np.stack([_balanced(rng), _balanced(rng)]), 2) == []
        loss = 4.0 * math.exp(-step / 200) + rng.normal(0, 0.05)
        assert mon.check_step(step, {"loss": loss, "grad_norm": abs(rng.normal(1, 0.2))}) == []


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"dead_fraction": 1.5}, "below 1"),
        ({"hot_expert_factor": 0.5}, "above 1"),
        ({"spike_window": 0}, "must be > 0"),
        ({"warmup_steps": -1}, ">= 0"),
        ({"spike_sigmas": -1.0}, "0 turns the alarm off"),
    ],
)
def test_health_config_checks(kw, needle):
    with pytest.raises(ValueError, match=needle):
        HealthConfig(**kw)


# ---- trainer runs ------------------------------------------------------------------------------
def _forced_run(rank, world, overrides):
    """A real Trainer run where expert 0 of every MoE layer always wins (selection bias +10; with
    TINY's device-limited routing, M=1 of 2 groups, its group-mate 1 is the second choice, so
    experts 2 and 3 get nothing), and the loss of step 14 is reported 10x (a spike)."""
    from omegaconf import OmegaConf

    import deepseek_moe.parallel.expert_parallel as ep
    from deepseek_moe.train.trainer import Trainer
    from tests.train.helpers import compose_config

    original = ep.parallelize_moe

    def parallelize(model, ep_size):
        model = original(model, ep_size)
        for layer in model.moe_layers():
            layer.gate.e_score_correction_bias.copy_(torch.tensor([10.0, 0.0, 0.0, -10.0]))
        return model

    ep.parallelize_moe = parallelize
    trainer = Trainer(OmegaConf.to_object(compose_config(overrides)))
    train_step = trainer._train_step

    def spiky(batches):
        values = train_step(batches)
        return {**values, "loss": values["loss"] * 10} if trainer.step == 13 else values

    trainer._train_step = spiky
    return trainer.fit()


def test_each_alarm_fires_in_a_trainer_run(tiny_data, tmp_path, caplog):
    from deepseek_moe.testing.distributed import run_distributed

    run_dir = tmp_path / "forced"
    overrides = TINY + tiny_data
    overrides += [
        "trainer.max_steps=16",
        "trainer.log_every=2",
        "trainer.eval_every=0",
        "checkpoint.every=0",
        "logger=none",
        "model.moe.bias_update_rate=1e-9",  # keeps the forced selection bias (it is only used when on)
        "health.warmup_steps=4",
        "health.dead_intervals=2",
        "health.hot_expert_factor=1.5",  # expert 0 takes every token: 2x its fair share at top-2 of 4
        "health.spike_window=8",
        f"run_dir={run_dir}",
    ]
    run_distributed(_forced_run, 1, overrides, timeout=240)
    rows = read_metrics(run_dir / "metrics.jsonl")
    alarms = [r for r in rows if "alarm" in r]
    kinds = {(r["alarm"], r["step"]) for r in alarms}
    # loads are checked on logging steps after the warm-up (6, 8, ...): hot at once, dead after 2
    assert ("hot_expert", 6) in kinds and ("dead_expert", 8) in kinds and ("loss_spike", 14) in kinds
    dead = next(r for r in alarms if r["alarm"] == "dead_expert")
    assert dead["experts"] == [2, 3] and dead["layer"] == 1  # M=1 of 2 groups: 0 and 1 always win
    assert all(a["step"] > 4 for a in alarms)
    # the sidecar: one record per logging step; each interval's counts are every copy routed
    loads = read_expert_loads(run_dir)
    assert loads.steps.tolist() == list(range(2, 17, 2)) and loads.first_steps.tolist() == list(
        range(1, 16, 2)
    )
    copies_per_step = 8 * 64 * 2  # global batch x seq_len x top-2
    assert (loads.counts.sum(axis=2) == copies_per_step * 2).all()
    assert (loads.counts[:, :, 0] == 8 * 64 * 2).all() and (loads.counts[:, :, 3] == 0).all()
    # metrics.jsonl has the router metrics on exactly those steps
    stats_steps = [r["step"] for r in rows if "moe/layer1/load_imbalance" in r]
    assert stats_steps == loads.steps.tolist()


def test_sidecar_survives_a_kill_and_a_resume_without_duplicates(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    args = TINY + tiny_data
    args += ["trainer.eval_every=0", "checkpoint.every=4", "trainer.log_every=3", "logger=none"]
    args += [f"run_dir={run_dir}"]
    proc = subprocess.Popen(
        command(1, "python") + args + ["trainer.max_steps=100000"],
        cwd=REPO,
        env=train_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 180

    def progressed():  # a complete checkpoint, and steps logged after it
        done = [int(p.parent.name[5:]) for p in (run_dir / "checkpoints").glob("step_*/COMPLETE")]
        loads = read_expert_loads(run_dir)
        return done and loads is not None and len(loads.steps) and loads.steps[-1] > max(done)

    try:
        while time.time() < deadline and proc.poll() is None and not progressed():
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # no chance to save or close anything
        proc.wait()
    last_ckpt = max(int(p.parent.name[5:]) for p in (run_dir / "checkpoints").glob("step_*/COMPLETE"))
    before = read_expert_loads(run_dir)
    assert before.steps[-1] > last_ckpt  # records the resume must drop
    with open(run_dir / "expert_loads.bin", "ab") as raw:  # as if killed in the middle of a write
        raw.write(b"\x07" * 11)
    end = last_ckpt + 5
    run_train(args + [f"trainer.max_steps={end}"])
    loads = read_expert_loads(run_dir)
    steps = loads.steps.tolist()
    # no duplicates, nothing lost: the logging steps (every 3), the checkpoint steps (every 4)
    # up to the resumed one, and the relaunch's last step
    want = sorted({s for s in range(1, end + 1) if s % 3 == 0 or s % 4 == 0} | {end})
    assert steps == want
    assert loads.first_steps.tolist() == [1] + [s + 1 for s in steps[:-1]]  # contiguous intervals
    copies = 8 * 64 * 2
    assert (loads.counts.sum(axis=2) == copies * (loads.steps - loads.first_steps + 1)[:, None]).all()
    assert (run_dir / "expert_loads.bin").stat().st_size == len(steps) * record_dtype(1, 4, "<u4").itemsize
    # metrics.jsonl, truncated the same way, has the router metrics on exactly those steps
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "moe/layer1/load_imbalance" in r] == steps


def test_stats_steps_are_logging_checkpoint_and_last_steps(tmp_path):
    """The statistics are reduced on logging steps, on checkpoint steps (so a resume loses no
    interval) and on a launch's last step; a signal between them makes the trainer flush with
    due(step, step)."""
    from deepseek_moe.config.model import MoEConfig
    from deepseek_moe.model.moe import MoELayer
    from deepseek_moe.train.moe_health import MoEHealth

    class Model:
        layers = [MoELayer(8, MoEConfig(n_routed_experts=4, top_k=2, moe_intermediate_size=4), layer_idx=1)]

        def moe_layers(self):
            return iter(self.layers)

    def health(cfg=HealthConfig(), start=0):
        return MoEHealth(
            cfg,
            Model(),
            run_dir=tmp_path,
            is_main=True,
            device=torch.device("cpu"),
            world_size=1,
            ep_size=1,
            log_every=10,
            checkpoint_every=25,
            tokens_per_step=100,
            start_step=start,
            reduce_sum=lambda ts: None,
        )

    h = health()
    assert [s for s in range(1, 48) if h.due(s, 47)] == [10, 20, 25, 30, 40, 47]
    h.truncate_after(33)  # resumed at 33: nothing up to it is due again
    assert not h.due(30, 47) and h.due(34, 34) and not h.due(34, 47)
    off = health(HealthConfig(expert_stats=False))
    assert not any(off.due(s, 47) for s in range(1, 48))
    assert not Model.layers[0].stats.enabled  # the layers stop counting too
    h.close()
